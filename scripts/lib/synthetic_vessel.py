#!/usr/bin/env python3
"""A synthetic vessel for the long-track benchmarks (console-track, relearn): N fixes, one every
2 s (~5 m/s, a slowly wandering heading, ~3 m of GPS noise, 4 gaps over MAX_TIME_DIFF so 5
segments), ingested through POST /v1/ingest in 10 000-fix batches with the demo key.
With `shuttle`, it runs a loop of 4 ports about 9 km apart instead, docking 40 minutes at
each (so it has stays, 4 places and a trip per leg), one fix every 2 s.

    scripts/lib/synthetic_vessel.py BASE_URL DEVICE N [shuttle]
"""
import json, math, random, sys, time, urllib.request
base, device, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(16)
step_ms, speed = 2000, 5.0
t = (int(time.time()) - 40 * 86400) * 1000
lat, lon, heading = 40.0, -70.0, 90.0
gaps = {n * k // 5 for k in range(1, 5)}
batch, started = [], time.time()
def send(fixes):
    body = json.dumps({"fixes": fixes}).encode()
    request = urllib.request.Request(base + "/v1/ingest", body,
        {"x-api-key": "demo-key", "content-type": "application/json"})
    answer = json.load(urllib.request.urlopen(request, timeout=120))
    if answer.get("accepted", 0) != len(fixes):
        sys.exit(f"ingest: {answer.get('accepted')} of {len(fixes)} accepted: {str(answer)[:300]}")
shuttle = sys.argv[4:] == ["shuttle"]
ports = [(40.0, -70.0), (40.08, -70.0), (40.08, -70.105), (40.0, -70.105)]
dock_s, leg_s = 2400, 8900 / speed

def docked_or_sailing(seconds):
    """Where the shuttle is `seconds` after it first docked."""
    seconds %= len(ports) * (dock_s + leg_s)
    k, into = int(seconds // (dock_s + leg_s)), seconds % (dock_s + leg_s)
    (a_lat, a_lon), (b_lat, b_lon) = ports[k], ports[(k + 1) % len(ports)]
    f = max(0.0, into - dock_s) / leg_s
    return a_lat + (b_lat - a_lat) * f, a_lon + (b_lon - a_lon) * f

for i in range(n):
    if shuttle:
        t += step_ms
        lat, lon = docked_or_sailing(i * step_ms / 1000)
    else:
        t += step_ms + (13 * 3600 * 1000 if i in gaps else 0)
        heading = (heading + rng.gauss(0, 1.0)) % 360
        d = speed * step_ms / 1000
        lat += d * math.cos(math.radians(heading)) / 111320
        lon += d * math.sin(math.radians(heading)) / (111320 * math.cos(math.radians(lat)))
        if not 30 < lat < 50:
            heading = (heading + 180) % 360
    noise = lambda: rng.gauss(0, 3.0) / 111320
    batch.append({"deviceId": device, "timeMs": str(t), "lat": lat + noise(),
                  "lon": lon + noise() / math.cos(math.radians(lat))})
    if len(batch) == 10000:
        send(batch)
        batch = []
if batch:
    send(batch)
print(f"ingested {n} fixes in {time.time() - started:.0f} s")
