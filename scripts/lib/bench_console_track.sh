# shellcheck shell=bash
# Sourced by scripts/bench: `run_console_track`, the console's long-track figure (issue 16).
# One fresh local stack (release, rate limits off, its own ports so it can run beside the
# other runs); a synthetic vessel of 1 000 000 fixes (one every 2 s for 23 days, ~5 m/s, a
# slowly wandering heading, ~3 m of GPS noise, 4 gaps over MAX_TIME_DIFF so 5 segments)
# ingested through POST /v1/ingest in 10 000-fix batches; then
# `GET /v1/devices/<id>/track?format=geojson&simplify=<m>` for several tolerances (0 = every
# fix): response time, bytes, points and features. Figures only, never asserted.
# CONSOLE_TRACK_FIXES overrides the size, CONSOLE_TRACK_TOLERANCES the tolerances.

run_console_track() {
    section "console-track: a 1M-fix track as GeoJSON, simplified"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26490 TM_CLICKHOUSE_HTTP_PORT=28290 TM_CLICKHOUSE_TCP_PORT=29390 \
        TM_KAFKA_PORT=29490 TM_GATEWAY_PORT=25150 TM_REFINEMENT_PORT=25151 TM_LEARNING_PORT=25152 TM_STORAGE_PORT=25153
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 RUST_LOG=warn
    # cleanup reads the exit status from $?: keep the script's, not stack down's.
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    scripts/stack up >"$dir/stack.txt" 2>&1 || {
        cat "$dir/stack.txt"
        return 1
    }
    local base="http://127.0.0.1:$TM_GATEWAY_PORT" device="vessel-1m"
    local n="${CONSOLE_TRACK_FIXES:-1000000}"
    echo "-- ingest $n fixes of $device"
    python3 scripts/lib/synthetic_vessel.py "$base" "$device" "$n"
    # Stored once the device's count reaches n (ClickHouse inserts follow Kafka by a moment).
    local deadline=$((SECONDS + 600)) count=0
    while ((SECONDS < deadline)); do
        count="$(curl -sf -H 'x-api-key: demo-key' "$base/v1/devices?page_size=10" |
            python3 -c 'import json,sys; d=[x for x in json.load(sys.stdin)["devices"] if x["deviceId"]==sys.argv[1]]; print(d[0]["fixes"] if d else 0)' "$device")"
        ((count >= n)) && break
        sleep 2
    done
    echo "-- stored: $count fixes"
    local tolerance
    printf '%-10s %10s %12s %10s %9s\n' "simplify" "seconds" "bytes" "points" "features"
    for tolerance in ${CONSOLE_TRACK_TOLERANCES:-0 1 5 20 100}; do
        curl -sf -o "$dir/track.geojson" -w '%{time_total} %{size_download}\n' -H 'x-api-key: demo-key' \
            "$base/v1/devices/$device/track?format=geojson&simplify=$tolerance" >"$dir/curl.txt"
        python3 - "$tolerance" "$dir/curl.txt" "$dir/track.geojson" <<'PY'
import json, sys
tolerance, timing, path = sys.argv[1:]
seconds, size = open(timing).read().split()
features = json.load(open(path))["features"]
points = sum(1 if f["geometry"]["type"] == "Point" else len(f["geometry"]["coordinates"]) for f in features)
print(f"{tolerance:<10} {float(seconds):>10.2f} {int(size):>12} {points:>10} {len(features):>9}")
PY
    done
    scripts/stack down --purge >/dev/null
}
