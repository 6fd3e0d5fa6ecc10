# shellcheck shell=bash
# Sourced by scripts/bench: `run_relearn`, rebuilding learned models from stored fixes (issue 15).
# One fresh local stack (release, rate limits off, its own ports): the New York harbor week
# (data/ais-ny-harbor-2020-12-01..07.csv, 140 vessels) replayed, then `trackctl relearn --all`;
# then two synthetic vessels of 1 000 000 fixes each (scripts/lib/synthetic_vessel.py: one that
# never stops, one shuttling between 4 ports), and `trackctl relearn` of each. Before each relearn the four services restart, so that each one's
# peak resident memory (VmHWM) afterwards is the relearn's. Figures only, never asserted.
# RELEARN_FIXES overrides the synthetic vessel's size.

# Restarts the four services (fresh peak-memory counters).
relearn_restart() {
    local name pid
    for name in gateway storage-service learning-api refinement-api; do
        pid="$(cat "$TM_STACK_DIR/run/$name.pid")"
        scripts/stack kill "$name" TERM >/dev/null
        # Draining takes a moment: start again only once it is gone.
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    done
    for name in refinement-api learning-api storage-service gateway; do
        scripts/stack start "$name" >/dev/null
    done
}

# Times `trackctl relearn ARGS…` and prints fixes/s and each service's peak memory.
relearn_measure() {
    local label="$1" fixes="$2" started elapsed name pid
    shift 2
    relearn_restart
    started="$(date +%s%N)"
    "${trackctl[@]}" relearn --quiet "$@"
    elapsed="$(($(date +%s%N) - started))"
    awk -v label="$label" -v n="$fixes" -v ns="$elapsed" \
        'BEGIN { printf "-- %s: %d fixes in %.1f s: %.0f fixes/s\n", label, n, ns / 1e9, n / (ns / 1e9) }'
    for name in refinement-api learning-api storage-service gateway; do
        pid="$(cat "$TM_STACK_DIR/run/$name.pid")"
        printf '   %-16s peak RSS %s\n' "$name" "$(awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$pid/status")"
    done
}

# Waits until the tenant's stored fixes stop growing; prints their count.
relearn_stored() {
    local last=-1 total
    for _ in $(seq 200); do
        total="$(curl -sf -H 'x-api-key: demo-key' "$base/v1/devices?page_size=1000" |
            python3 -c 'import json,sys; print(sum(int(d["fixes"]) for d in json.load(sys.stdin)["devices"]))')"
        [[ $total == "$last" ]] && break
        last="$total"
        sleep 3
    done
    echo "$total"
}

run_relearn() {
    section "relearn: models rebuilt from stored fixes (NY harbor week, a 1M-fix vessel)"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26790 TM_CLICKHOUSE_HTTP_PORT=28790 TM_CLICKHOUSE_TCP_PORT=29890 \
        TM_KAFKA_PORT=29990 TM_GATEWAY_PORT=25450 TM_REFINEMENT_PORT=25451 TM_LEARNING_PORT=25452 TM_STORAGE_PORT=25453
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 RUST_LOG=warn
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    cargo build --release --locked -p trackctl
    scripts/stack up >"$dir/stack.txt" 2>&1 || {
        cat "$dir/stack.txt"
        return 1
    }
    local base="http://127.0.0.1:$TM_GATEWAY_PORT"
    local trackctl=("${CARGO_TARGET_DIR:-target}/release/trackctl" --addr "$base" --api-key demo-key)
    "${trackctl[@]}" replay --quiet data/ais-ny-harbor-2020-12-01..07.csv
    local stored
    stored="$(relearn_stored)"
    relearn_measure "NY harbor week, every vessel" "$stored" --all
    local n="${RELEARN_FIXES:-1000000}"
    python3 scripts/lib/synthetic_vessel.py "$base" vessel-1m "$n"
    python3 scripts/lib/synthetic_vessel.py "$base" shuttle-1m "$n" shuttle
    stored="$(relearn_stored)"
    relearn_measure "one vessel of $n fixes, never stopping" "$n" vessel-1m
    relearn_measure "one shuttle of $n fixes, 40 minutes at each of 4 ports" "$n" shuttle-1m
    scripts/stack down --purge >/dev/null
}
