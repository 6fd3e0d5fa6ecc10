# Sourced by scripts/bench: `run_ingest`, the device-grade ingest benchmark. One local stack
# (release, rate limits off), one load client (trackctl load), all runs in one go:
#   1. the no-op ceiling: grpc.health.v1.Health/Check on the gateway, 256 in flight
#   2. single-fix Ingest at 1, 16, 256 and 1 024 in flight over 10 000 devices
#   3. single-fix IngestStream over 256 streams
#   4. 1 000-fix batches over 100 devices, 4 in flight
#   5. h2load's no-op ceiling (an independent, low-overhead client) as a cross-check
#   6. single-fix OsmAnd over HTTP/1.1 (`GET /osmand/<token>?id=&lat=&lon=&timestamp=`),
#      256 connections, with h2load --h1: the HTTP front door beside gRPC's ingest-256
# For each: calls/s, fixes/s, p50/p99, the ratio to the no-op ceiling, and CPU per component
# (process CPU time over the run, in % of one core). Figures only, never asserted.
# Each run gets a fresh stack: tansu keeps every message in memory and slows down as its log
# grows, so a run after others would measure the earlier runs too.

# cpu_percent BEFORE AFTER START END TIMEFILE: the CPU each stack process (cpu_ticks before
# and after) and the client (bash `time` output "user system" in TIMEFILE) used from START to
# END, in % of one core, as one JSON object.
cpu_percent() {
    python3 - "$@" "$(getconf CLK_TCK)" <<'PY'
import json, sys
before, after, start, end, timing, hz = sys.argv[1:]
elapsed = float(end) - float(start)
parse = lambda text: dict(l.split() for l in text.splitlines() if l.strip())
before, after = parse(before), parse(after)
cpu = {n: round(100 * (int(t) - int(before.get(n, t))) / int(hz) / elapsed) for n, t in after.items()}
user, system = (float(x) for x in open(timing).read().split())
cpu["client"] = round(100 * (user + system) / elapsed)
print(json.dumps(cpu))
PY
}

# CPU ticks (utime + stime) of each running stack process: "name ticks" lines.
cpu_ticks() {
    local name pid
    scripts/stack status | while read -r name _ pidfield _; do
        pid="${pidfield#pid=}"
        [[ $pid =~ ^[0-9]+$ ]] || continue
        awk -v n="$name" '{ print n, $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || true
    done
}

# h2load's no-op ceiling on the running stack (an independent, low-overhead client): sets h2.
h2load_ceiling() {
    h2=""
    if ! command -v h2load >/dev/null; then
        echo "-- h2load not installed (Debian nghttp2-client): no cross-check"
        return
    fi
    echo "-- h2load no-op ceiling, 256 streams on one connection"
    # An empty HealthCheckRequest as one gRPC frame: no compression, length 0.
    printf '\x00\x00\x00\x00\x00' >"$dir/empty.grpc"
    h2load -n 200000 -c 1 -m 256 -d "$dir/empty.grpc" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$TM_GATEWAY_PORT/grpc.health.v1.Health/Check" >"$dir/h2load.txt" 2>&1 || true
    h2="$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$dir/h2load.txt")"
    grep -E '^(finished|requests|status codes)' "$dir/h2load.txt" || true
}

# osmand_h1 NAME: single-fix OsmAnd GETs over 256 HTTP/1.1 connections, on a fresh stack; a
# results row like `one`'s, plus the status codes. h2load sends its URI list from the top on
# every connection, so each connection is its own h2load (-c 1) with its own list: distinct
# devices per connection, each device's timestamps increasing in sending order (a repeated
# or older fix would be a cheaper refusal, not an ingest).
osmand_h1() {
    local name="$1" conns=256 total="${BENCH_OSMAND_REQUESTS:-100000}" before after start end i
    echo "-- $name"
    if ! command -v h2load >/dev/null; then
        echo "-- h2load not installed (Debian nghttp2-client): no OsmAnd run"
        return
    fi
    scripts/stack up >"$dir/$name.stack.txt" 2>&1
    mkdir -p "$dir/$name"
    python3 - "$dir/$name" "$conns" "$total" "$TM_GATEWAY_PORT" <<'PY'
import sys, time
out, conns, total, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
per_device = 10  # fixes per device: 10 000 devices for the default 100 000 requests
start = int(time.time()) - 86_400
for c in range(conns):
    lines = []
    n = total // conns
    devices = max(1, n // per_device)
    for k in range(n):
        device, step = c + conns * (k % devices), k // devices
        lat = -60 + (device % 1200) * 0.1 + step * 0.001
        lon = -170 + (device // 1200) * 0.5
        lines.append(f"http://127.0.0.1:{port}/osmand/demo-ingest?id=osm{device}"
                     f"&lat={lat:.6f}&lon={lon:.6f}&timestamp={start + step * 60}&speed=1.8")
    open(f"{out}/uris.{c}", "w").write("\n".join(lines) + "\n")
PY
    before="$(cpu_ticks)"
    start="$(date +%s.%N)"
    TIMEFORMAT="%U %S"
    local pids=()
    {
        time {
            for ((i = 0; i < conns; i++)); do
                h2load --h1 -c 1 -n "$(wc -l <"$dir/$name/uris.$i")" -i "$dir/$name/uris.$i" \
                    --log-file "$dir/$name/log.$i" >"$dir/$name/out.$i" 2>&1 &
                pids+=($!)
            done
            # Only the h2loads: a bare `wait` would also wait for the test backends, which
            # scripts/bench started in the background of this same shell.
            wait "${pids[@]}"
        }
    } 2>"$dir/$name.time"
    end="$(date +%s.%N)"
    after="$(cpu_ticks)"
    scripts/stack down --purge >/dev/null
    python3 - "$name" "$start" "$end" "$dir/$name" "$conns" "$results" \
        "$(cpu_percent "$before" "$after" "$start" "$end" "$dir/$name.time")" <<'PY'
import collections, json, sys
name, start, end, folder, conns, out, cpu = sys.argv[1:]
elapsed, cpu = float(end) - float(start), json.loads(cpu)
codes, latencies = collections.Counter(), []
for c in range(int(conns)):
    for line in open(f"{folder}/log.{c}"):
        _, status, micros = line.split("\t")[:3]
        codes["failed" if status == "-1" else status] += 1
        latencies.append(int(micros) / 1000)
latencies.sort()
pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0
ok = sum(n for s, n in codes.items() if s.startswith("2"))
r = {"name": name, "noop": False, "calls_per_s": sum(codes.values()) / elapsed,
     "fixes_per_s": ok / elapsed, "latency_ms": {"p50": pct(0.5), "p99": pct(0.99)},
     "status_codes": dict(sorted(codes.items())), "cpu_percent": cpu}
if ok < sum(codes.values()):
    r["errors"] = {s: n for s, n in codes.items() if not s.startswith("2")}
print(f"{sum(codes.values())} requests in {elapsed:.1f} s, status codes: {r['status_codes']}")
open(out, "a").write(json.dumps(r) + "\n")
PY
}

run_ingest() {
    section "ingest: device-grade ingest through the gateway"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    # The stack's own folder, deleted by each `down --purge`; the results stay in $dir.
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26390 TM_CLICKHOUSE_HTTP_PORT=28190 TM_CLICKHOUSE_TCP_PORT=29190 \
        TM_KAFKA_PORT=29290 TM_GATEWAY_PORT=25050 TM_REFINEMENT_PORT=25051 TM_LEARNING_PORT=25052 TM_STORAGE_PORT=25053
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 RUST_LOG=warn
    # 1 024 callers of one tenant in flight: above the default per-tenant slots.
    export TENANT_MAX_CONCURRENT_REQUESTS=0 MAX_CONCURRENT_REQUESTS=4096
    # cleanup reads the exit status from $?: keep the script's, not stack down's.
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    cargo build --release --locked -p trackctl
    local trackctl=("${CARGO_TARGET_DIR:-target}/release/trackctl" --addr "http://127.0.0.1:$TM_GATEWAY_PORT" --api-key demo-key)
    local results="$dir/results.jsonl" h2=""
    : >"$results"

    # one NAME ARGS...: a trackctl load run, its report and the CPU each process used.
    one() {
        local name="$1" before after start end
        shift
        echo "-- $name"
        scripts/stack up >"$dir/$name.stack.txt" 2>&1
        before="$(cpu_ticks)"
        start="$(date +%s.%N)"
        TIMEFORMAT="%U %S"
        { time "${trackctl[@]}" load --duration "${SECONDS_EACH}s" --json "$@" >"$dir/$name.json" 2>"$dir/$name.txt"; } 2>"$dir/$name.time"
        end="$(date +%s.%N)"
        after="$(cpu_ticks)"
        [[ $name == noop ]] || scripts/stack down --purge >/dev/null
        tail -n 3 "$dir/$name.txt"
        python3 - "$name" "$dir/$name.json" "$results" \
            "$(cpu_percent "$before" "$after" "$start" "$end" "$dir/$name.time")" <<'PY'
import json, sys
name, report, out, cpu = sys.argv[1:]
r = json.load(open(report))
r["name"], r["cpu_percent"] = name, json.loads(cpu)
open(out, "a").write(json.dumps(r) + "\n")
PY
    }

    one noop --noop --devices 10000 --concurrency 256
    h2load_ceiling
    scripts/stack down --purge >/dev/null
    one ingest-1 --devices 10000 --batch 1 --concurrency 1
    one ingest-16 --devices 10000 --batch 1 --concurrency 16
    one ingest-256 --devices 10000 --batch 1 --concurrency 256
    osmand_h1 osmand-h1-256
    one ingest-1024 --devices 10000 --batch 1 --concurrency 1024
    one stream-256 --devices 10000 --batch 1 --concurrency 256 --stream
    one batch-1000 --devices 100 --batch 1000 --concurrency 4

    python3 - "$results" "${h2:-0}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
h2 = float(sys.argv[2] or 0)
ceiling = next(r["calls_per_s"] for r in rows if r["name"] == "noop")
names = ["gateway", "refinement-api", "learning-api", "storage-service", "redis", "kafka", "clickhouse", "client"]
short = ["gw", "ref", "learn", "stor", "redis", "kafka", "ch", "client"]
print()
print(f"{'run':<12} {'calls/s':>9} {'fixes/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'÷ no-op':>8}   CPU % of one core: " + " ".join(f"{s:>6}" for s in short))
for r in rows:
    ratio = r["calls_per_s"] / ceiling if ceiling else 0
    fixes = "" if r["noop"] else f"{r['fixes_per_s']:.0f}"
    cpu = " ".join(f"{r['cpu_percent'].get(n, 0):>6}" for n in names)
    print(f"{r['name']:<12} {r['calls_per_s']:>9.0f} {fixes:>9} {r['latency_ms']['p50']:>8.2f} {r['latency_ms']['p99']:>8.2f} {ratio:>8.2f}                      {cpu}")
    if r.get("status_codes"):
        print(f"{'':<12} HTTP status codes: {r['status_codes']}")
    if r.get("errors"):
        print(f"{'':<12} failed calls: {r['errors']}")
if h2:
    print(f"\nh2load no-op ceiling: {h2:.0f} calls/s (trackctl's: {ceiling:.0f}, {ceiling / h2:.2f} of it); "
          f"single-fix Ingest at 256 in flight is {next(r['calls_per_s'] for r in rows if r['name'] == 'ingest-256') / h2:.2f} of h2load's ceiling")
osmand = next((r for r in rows if r["name"] == "osmand-h1-256"), None)
grpc = next((r for r in rows if r["name"] == "ingest-256"), None)
if osmand and grpc and grpc["fixes_per_s"]:
    print(f"single-fix OsmAnd over HTTP/1.1 (256 connections): {osmand['fixes_per_s']:.0f} fixes/s, "
          f"{osmand['fixes_per_s'] / grpc['fixes_per_s']:.2f} of gRPC Ingest at 256 in flight")
PY
}
