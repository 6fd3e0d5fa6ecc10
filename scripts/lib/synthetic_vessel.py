#!/usr/bin/env python3
"""A synthetic vessel for the long-track benchmarks (console-track, relearn): N fixes, one every
2 s (~5 m/s, a slowly wandering heading, ~3 m of GPS noise, 4 gaps over MAX_TIME_DIFF so 5
segments), ingested through POST /v1/ingest in 10 000-fix batches with the demo key.

    scripts/lib/synthetic_vessel.py BASE_URL DEVICE N
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
for i in range(n):
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
