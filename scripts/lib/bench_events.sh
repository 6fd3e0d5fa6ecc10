# shellcheck shell=bash
# Sourced by scripts/bench: `run_events`, geofence and place events on real data (issue 14).
# One fresh local stack (release, rate limits off): the New York harbor week
# (data/ais-ny-harbor-2020-12-01..07.csv) up to Dec 6 is replayed so that learning finds the
# ferry terminals; then a circle geofence (PLACE_RADIUS_M, 200 m) is created around every
# learned place of every vessel (filtered to that vessel), Dec 6 is replayed, and the events
# are counted: per place, ARRIVE events against the stays learning counted there on Dec 6
# (visits after - visits before, plus a stay still open at the end), and ENTER events of the
# fence around it. Figures only, never asserted.

run_events() {
    section "events: geofences around the learned places, NY harbor Dec 6"
    local dir
    dir="$(mktemp -d "${TMPDIR:-/tmp}/trackmesh-bench.XXXXXX")"
    export TM_STACK_DIR="$dir/stack" TM_REDIS_PORT=26690 TM_CLICKHOUSE_HTTP_PORT=28690 TM_CLICKHOUSE_TCP_PORT=29790 \
        TM_KAFKA_PORT=29890 TM_GATEWAY_PORT=25350 TM_REFINEMENT_PORT=25351 TM_LEARNING_PORT=25352 TM_STORAGE_PORT=25353
    export RATE_LIMIT_FIXES_PER_SEC=0 RATE_LIMIT_REQUESTS_PER_SEC=0 MAX_GEOFENCES_PER_TENANT=100000 RUST_LOG=warn
    # shellcheck disable=SC2154 # rc is assigned by the trap itself
    trap 'rc=$?; set +e; scripts/stack down --purge >/dev/null 2>&1; (exit $rc); cleanup' EXIT
    local profile="${TM_PROFILE:-release}" build=(cargo build --locked -p trackctl)
    [[ $profile == release ]] && build+=(--release)
    "${build[@]}"
    scripts/stack up >"$dir/stack.txt" 2>&1 || {
        cat "$dir/stack.txt"
        return 1
    }
    local trackctl=("${CARGO_TARGET_DIR:-target}/$profile/trackctl" --addr "http://127.0.0.1:$TM_GATEWAY_PORT" --api-key demo-key)
    local data=data/ais-ny-harbor-2020-12-01..07.csv
    awk -F, 'NR == 1 || $2 < "2020-12-06"' "$data" >"$dir/train.csv"
    awk -F, 'NR == 1 || ($2 >= "2020-12-06" && $2 < "2020-12-07")' "$data" >"$dir/test.csv"
    "${trackctl[@]}" replay --quiet "$dir/train.csv"
    python3 - "http://127.0.0.1:$TM_GATEWAY_PORT" "$dir" before <<'PY'
import concurrent.futures, json, sys, time, urllib.request
base, dir, phase = sys.argv[1:4]
def call(method, path, body=None):
    request = urllib.request.Request(base + path, None if body is None else json.dumps(body).encode(),
                                     {"x-api-key": "demo-key", "content-type": "application/json"}, method=method)
    return json.load(urllib.request.urlopen(request, timeout=60))
# Listed once ClickHouse has the replayed fixes (the consumer inserts a moment behind Kafka).
devices, last, deadline = [], -1, time.time() + 300
while time.time() < deadline:
    listed = call("GET", "/v1/devices?page_size=1000")["devices"]
    total = sum(int(d["fixes"]) for d in listed)
    if listed and total == last:
        break
    last = total
    time.sleep(3)
devices = [d["deviceId"] for d in listed]
places = {device: call("GET", f"/v1/devices/{device}/places")["places"] for device in devices}
wanted = [{"name": f"{device} {p['placeId']}", "deviceIds": [device],
           "circle": {"lat": p["lat"], "lon": p["lon"], "radiusM": 200}}
          for device, known in places.items() for p in known]
# Each CreateGeofence answers once every learning replica can have it (2 s): many at once.
with concurrent.futures.ThreadPoolExecutor(64) as pool:
    list(pool.map(lambda fence: call("POST", "/v1/geofences", fence), wanted))
json.dump(places, open(f"{dir}/places-before.json", "w"))
print(f"{len(devices)} vessels, {len(wanted)} geofences around their learned places")
PY
    "${trackctl[@]}" replay --quiet "$dir/test.csv"
    python3 - "http://127.0.0.1:$TM_GATEWAY_PORT" "$dir" <<'PY'
import collections, json, sys, time, urllib.request
base, dir = sys.argv[1:3]
DEC6_MS = 1607212800000
def call(path):
    request = urllib.request.Request(base + path, None, {"x-api-key": "demo-key"})
    return json.load(urllib.request.urlopen(request, timeout=60))
before = json.load(open(f"{dir}/places-before.json"))
names = {g["geofenceId"]: g["name"] for g in call("/v1/geofences")["geofences"]}
events, last, deadline = [], -1, time.time() + 120
while time.time() < deadline:  # stored once the count stops moving
    # Dec 6 only: ARRIVE/DEPART of the earlier days' stays are there too.
    events = [e for d in before for e in call(f"/v1/events?device_id={d}&from_ms={DEC6_MS}")["events"]]
    if len(events) == last:
        break
    last = len(events)
    time.sleep(3)
arrive = collections.Counter((e["deviceId"], e["placeId"]) for e in events if e["type"] == "ARRIVE")
depart = collections.Counter((e["deviceId"], e["placeId"]) for e in events if e["type"] == "DEPART")
enter = collections.Counter(names[e["geofenceId"]] for e in events if e["type"] == "ENTER")
stays, matched, places_seen = 0, 0, 0
for device, known in before.items():
    after = {p["placeId"]: p for p in call(f"/v1/devices/{device}/places")["places"]}
    for place in known:
        gained = after.get(place["placeId"], place)["visits"] - place["visits"]
        key = (device, place["placeId"])
        if gained or arrive[key] or depart[key]:
            stays += gained
            places_seen += 1
            matched += gained == depart[key]
total = lambda c: sum(c.values())
print(f"events stored: {len(events)} (ENTER {total(enter)}, EXIT {sum(1 for e in events if e['type'] == 'EXIT')}, "
      f"ARRIVE {total(arrive)}, DEPART {total(depart)})")
print(f"Dec 6 stays that joined a known place: {stays}; DEPART events: {total(depart)}; "
      f"ARRIVE events: {total(arrive)} (a stay still open at the end has ARRIVE only)")
print(f"places with Dec 6 stays or events: {places_seen}; of them, places where DEPARTs equal the stays: {matched}")
print(f"ENTER events at the fences around those places: {total(enter)} (ferries dock ~10 min, a stay needs 20)")
PY
    scripts/stack down --purge
}
