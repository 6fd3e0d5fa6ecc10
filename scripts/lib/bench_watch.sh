# shellcheck shell=bash
# Sourced by scripts/bench: `run_watch`, Watch fan-out (issue 14). One fresh local stack
# (release, rate and stream limits off, its own ports); for 1, 100 and 1 000 subscribers of
# the whole tenant (`trackctl watch --subscribers N`, 100 per connection), 1 000-fix batches
# over 100 devices are ingested for BENCH_SECONDS; reported: ingest fixes/s, the share of the
# stored fixes each subscriber received, fixes/s delivered in all, Lag messages, and the
# gateway's CPU. The subscribers' client runs on the same machine. Figures only.
# WATCH_SUBSCRIBERS overrides the subscriber counts.

run_watch() {
    section "watch: fan-out of live fixes to subscribers"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26590 TM_CLICKHOUSE_HTTP_PORT=28590 TM_CLICKHOUSE_TCP_PORT=29590 \
        TM_KAFKA_PORT=29690 TM_GATEWAY_PORT=25250 TM_REFINEMENT_PORT=25251 TM_LEARNING_PORT=25252 TM_STORAGE_PORT=25253
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 TENANT_MAX_STREAMS=0 RUST_LOG=warn
    # cleanup reads the exit status from $?: keep the script's, not stack down's.
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    scripts/stack up >"$dir/stack.txt" 2>&1 || {
        cat "$dir/stack.txt"
        return 1
    }
    cargo build --release --locked -p trackctl
    local trackctl=("${CARGO_TARGET_DIR:-target}/release/trackctl" --addr "http://127.0.0.1:$TM_GATEWAY_PORT" --api-key demo-key)
    local seconds="${BENCH_SECONDS:-10}" n gateway_pid
    gateway_pid="$(scripts/stack status | sed -n 's/^gateway .* pid=\([0-9][0-9]*\) .*/\1/p')"
    for n in ${WATCH_SUBSCRIBERS:-1 100 1000}; do
        "${trackctl[@]}" watch --subscribers "$n" --duration "$((seconds + 4))s" --json >"$dir/watch-$n.json" &
        local watcher=$!
        sleep 2
        local before
        before="$(awk '{print $14 + $15}' "/proc/$gateway_pid/stat")"
        "${trackctl[@]}" load --devices 100 --batch 1000 --concurrency 4 --duration "${seconds}s" --json \
            >"$dir/load-$n.json" 2>/dev/null
        local after
        after="$(awk '{print $14 + $15}' "/proc/$gateway_pid/stat")"
        wait "$watcher"
        python3 - "$n" "$dir/load-$n.json" "$dir/watch-$n.json" "$((after - before))" "$seconds" "$(getconf CLK_TCK)" <<'PY'
import json, sys
n, load, watch, ticks, seconds, hz = int(sys.argv[1]), json.load(open(sys.argv[2])), json.load(open(sys.argv[3])), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
stored = load.get("fixes_stored", 0)
each = watch["fixes"] / n
print(f"{n:>5} subscribers: ingest {load['fixes_per_s']:,.0f} fixes/s ({stored:,} stored); each subscriber got "
      f"{each:,.0f} ({100 * each / max(stored, 1):.0f} %), {watch['fixes'] / load['elapsed_s']:,.0f} fixes/s delivered in all; "
      f"{watch['lag_messages']} lag messages ({watch['dropped_messages']} topic messages skipped); gateway CPU {100 * ticks / hz / seconds:.0f} %")
PY
    done
    scripts/stack down --purge
}
