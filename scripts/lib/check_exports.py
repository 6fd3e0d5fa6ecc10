"""Checks the gateway's track exports with independent parsers against its JSON export.

For a few devices of `GET /v1/devices`, downloads `/v1/devices/{id}/track` as json, geojson,
gpx and csv, and checks that each document parses with a library that is not ours (gpxpy,
the geojson package, the csv module) and says the same as the JSON export (proto3 JSON of
the stored RefinedFix): one GPX trkseg and one GeoJSON feature per segment, every fix with
its exact latitude, longitude, time and values. Exits 1 naming the first difference.

    python3 scripts/lib/check_exports.py --addr http://127.0.0.1:50050 --key demo-key [--devices 3]

Run with any python3: it installs its pinned parsers into .tools/check-exports-venv and re-runs
itself there.
"""

import argparse
import csv
import io
import json
import math
import os
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pinned_venv  # noqa: E402

# Pinned: a new parser release must not break CI on its own; raise them on purpose.
WANT = ["gpxpy==1.6.2", "geojson==3.3.0"]

pinned_venv.reexec("check-exports", WANT)

import geojson  # noqa: E402 (after the venv bootstrap)
import gpxpy  # noqa: E402


class Mismatch(Exception):
    pass


def get(addr, key, path):
    request = urllib.request.Request(addr + path, headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as error:
        raise Mismatch(f"GET {path}: HTTP {error.code}: {error.read()[:300]!r}") from None


def number(value):
    """A proto3 JSON double: a number, or "NaN"/"Infinity"/"-Infinity"."""
    return float(value)


def f32(value):
    """`value` rounded to f32, as the optional measurements are stored."""
    return struct.unpack("f", struct.pack("f", value))[0]


def same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def expect(condition, what):
    if not condition:
        raise Mismatch(what)


def positioned(fixes):
    """The fixes GeoJSON and GPX carry: those with a position on Earth."""
    out = []
    for refined in fixes:
        fix = refined.get("fix")
        if fix is None:
            continue
        lat, lon = number(fix["lat"]), number(fix["lon"])
        if math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180:
            out.append(refined)
    return out


def segments(fixes):
    """Consecutive runs of the same segment number: [(segment, [refined, ...]), ...]."""
    runs = []
    for refined in fixes:
        if runs and runs[-1][0] == refined["segment"]:
            runs[-1][1].append(refined)
        else:
            runs.append((refined["segment"], [refined]))
    return runs


def check_gpx(text, fixes, device):
    gpx = gpxpy.parse(text)
    expect(len(gpx.tracks) == 1, f"gpx: {len(gpx.tracks)} tracks, expected 1")
    track = gpx.tracks[0]
    expect(track.name == device, f"gpx: track name {track.name!r}, expected {device!r}")
    runs = segments(positioned(fixes))
    expect(len(track.segments) == len(runs),
           f"gpx: {len(track.segments)} trksegs, json has {len(runs)} segments")
    for s, (segment, (number_, run)) in enumerate(zip(track.segments, runs)):
        expect(len(segment.points) == len(run),
               f"gpx: trkseg {s} (segment {number_}) has {len(segment.points)} points, "
               f"json {len(run)}")
        for i, (point, refined) in enumerate(zip(segment.points, run)):
            fix = refined["fix"]
            lon = number(fix["lon"])
            lon = -180.0 if lon == 180.0 else lon
            where = f"gpx: trkseg {s} point {i} (time {fix['timeMs']})"
            expect(point.latitude == number(fix["lat"]),
                   f"{where}: lat {point.latitude} != {fix['lat']}")
            expect(point.longitude == lon, f"{where}: lon {point.longitude} != {lon}")
            ms = round(point.time.timestamp() * 1000)
            expect(ms == int(fix["timeMs"]), f"{where}: time {point.time} is {ms} ms")
            altitude = fix.get("altitudeM")
            if altitude is not None and math.isfinite(number(altitude)):
                expect(point.elevation is not None
                       and f32(point.elevation) == number(altitude),
                       f"{where}: ele {point.elevation} != {altitude}")
            else:
                expect(point.elevation is None, f"{where}: ele {point.elevation}, json none")


def check_geojson(text, fixes, device):
    document = geojson.loads(text)
    expect(document.is_valid, f"geojson: invalid: {document.errors()}")
    expect(document["type"] == "FeatureCollection", f"geojson: type {document['type']}")
    # The geojson package rounds coordinates to 6 decimals: compare exact values from json.
    features = json.loads(text)["features"]
    runs = segments(positioned(fixes))
    expect(len(features) == len(runs),
           f"geojson: {len(features)} features, json has {len(runs)} segments")
    for s, (feature, (number_, run)) in enumerate(zip(features, runs)):
        where = f"geojson: feature {s} (segment {number_})"
        geometry = feature["geometry"]
        coordinates = [geometry["coordinates"]] if geometry["type"] == "Point" \
            else geometry["coordinates"]
        expect(geometry["type"] == ("Point" if len(run) == 1 else "LineString"),
               f"{where}: {geometry['type']} for {len(run)} fixes")
        expect(len(coordinates) == len(run),
               f"{where}: {len(coordinates)} positions, json {len(run)}")
        for i, (position, refined) in enumerate(zip(coordinates, run)):
            fix = refined["fix"]
            expect(position == [number(fix["lon"]), number(fix["lat"])],
                   f"{where} position {i}: {position} != [{fix['lon']}, {fix['lat']}]")
        properties = feature["properties"]
        wanted = {"deviceId": device, "segment": number_, "fixes": len(run),
                  "startMs": int(run[0]["fix"]["timeMs"]),
                  "endMs": int(run[-1]["fix"]["timeMs"])}
        expect(properties == wanted, f"{where}: properties {properties} != {wanted}")


CSV_COLUMNS = ["device_id", "time_ms", "lat", "lon", "segment", "accuracy_m", "speed_mps",
               "heading_deg", "altitude_m", "distance_m", "speed_kmh"]
OPTIONAL = {"accuracy_m": "accuracyM", "speed_mps": "speedMps", "heading_deg": "headingDeg",
            "altitude_m": "altitudeM"}


def check_csv(text, fixes, device):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    expect(reader.fieldnames == CSV_COLUMNS, f"csv: header {reader.fieldnames}")
    rows = list(reader)
    with_fix = [refined for refined in fixes if "fix" in refined]
    expect(len(rows) == len(with_fix), f"csv: {len(rows)} rows, json {len(with_fix)} fixes")
    for i, (row, refined) in enumerate(zip(rows, with_fix)):
        fix = refined["fix"]
        where = f"csv: row {i + 1} (time {fix['timeMs']})"
        expect(row["device_id"] == device, f"{where}: device_id {row['device_id']!r}")
        expect(int(row["time_ms"]) == int(fix["timeMs"]), f"{where}: time_ms {row['time_ms']}")
        for column, name, value in [("lat", "lat", fix["lat"]), ("lon", "lon", fix["lon"]),
                                    ("distance_m", "distanceM", refined["distanceM"]),
                                    ("speed_kmh", "speedKmh", refined["speedKmh"])]:
            expect(same(float(row[column]), number(value)),
                   f"{where}: {column} {row[column]} != json {name} {value}")
        expect(int(row["segment"]) == refined["segment"], f"{where}: segment {row['segment']}")
        for column, name in OPTIONAL.items():
            value = fix.get(name)
            if value is None:
                expect(row[column] == "", f"{where}: {column} {row[column]!r}, json none")
            else:
                # Written in f32's shortest form; the JSON holds the same f32 widened to f64.
                expect(row[column] != "" and same(f32(float(row[column])), number(value)),
                       f"{where}: {column} {row[column]!r} != json {name} {value}")


def post(addr, key, path, body):
    request = urllib.request.Request(
        addr + path, data=json.dumps(body).encode(), method="POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise Mismatch(f"POST {path}: HTTP {error.code}: {error.read()[:300]!r}") from None


def ingest_crafted(addr, key, device):
    """A device the demo data lacks: three segments (gaps over refinement's 12 h), one of a
    single fix, every optional measurement with values f32 cannot hold exactly, the
    antimeridian, and a name that needs escaping. Returns once all of it is stored."""
    day = 86_400_000
    start = (int(time.time() * 1000) // day - 5) * day
    fixes = []
    for s, count in enumerate([5, 1, 4]):
        for i in range(count):
            fixes.append({"deviceId": device, "timeMs": str(start + s * day + i * 60_000),
                          "lat": 12.345678901234 + i * 0.001, "lon": 179.99 + i * 0.0025
                          if s == 2 else -45.6789012345 - i * 0.001,
                          "accuracyM": 4.2, "speedMps": 1.1 + i, "headingDeg": 271.7,
                          "altitudeM": -12.3 + i})
    fixes[-1]["lon"] = 180.0
    del fixes[1]["altitudeM"], fixes[2]["speedMps"]
    post(addr, key, "/v1/ingest", {"fixes": fixes})
    path = f"/v1/devices/{urllib.parse.quote(device, safe='')}/track?format=json"
    for _ in range(300):
        if len(json.loads(get(addr, key, path))["fixes"]) >= len(fixes):
            return
        time.sleep(0.2)
    raise Mismatch(f"{device}: {len(fixes)} fixes sent, not all stored within a minute")


def check_device(addr, key, device):
    path = f"/v1/devices/{urllib.parse.quote(device, safe='')}/track?format="
    document = json.loads(get(addr, key, path + "json"))
    expect(document["deviceId"] == device, f"json: deviceId {document['deviceId']!r}")
    fixes = document["fixes"]
    expect(fixes, f"json: no fixes for {device}")
    check_gpx(get(addr, key, path + "gpx"), fixes, device)
    check_geojson(get(addr, key, path + "geojson"), fixes, device)
    check_csv(get(addr, key, path + "csv"), fixes, device)
    return len(fixes), len(segments(positioned(fixes)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="http://127.0.0.1:50050")
    parser.add_argument("--key", default="demo-key")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--no-crafted", action="store_true",
                        help="check only existing devices (do not ingest, nor delete, one)")
    args = parser.parse_args()
    crafted = f"check-exports,\"{os.getpid()}\"<&>"
    try:
        if not args.no_crafted:
            ingest_crafted(args.addr, args.key, crafted)
        listing = json.loads(get(args.addr, args.key, "/v1/devices?page_size=1000"))["devices"]
        listing.sort(key=lambda d: (-int(d["fixes"]), d["deviceId"]))
        # The busiest devices (most segments to get wrong), and the quietest.
        listing = [d for d in listing if d["deviceId"] != crafted]
        chosen = listing[:max(args.devices - 1, 1)]
        if len(listing) > len(chosen) and args.devices > 1:
            chosen.append(listing[-1])
        if not args.no_crafted:
            chosen.append({"deviceId": crafted})
        for device in chosen:
            device_id = device["deviceId"]
            try:
                fixes, runs = check_device(args.addr, args.key, device_id)
            except Mismatch as error:
                raise Mismatch(f"device {device_id}: {error}") from None
            print(f"check-exports: {device_id}: {fixes} fixes, {runs} segments: "
                  "json = gpx = geojson = csv")
    except Mismatch as error:
        print(f"check-exports: {error}", file=sys.stderr)
        return 1
    finally:
        if not args.no_crafted:
            request = urllib.request.Request(
                f"{args.addr}/v1/devices/{urllib.parse.quote(crafted, safe='')}",
                method="DELETE", headers={"authorization": f"Bearer {args.key}"})
            try:
                urllib.request.urlopen(request, timeout=60).close()
            except OSError:
                pass  # best effort: the check's verdict stands
    print(f"check-exports: {len(chosen)} devices agree (gpxpy {gpxpy.__version__}, "
          f"geojson {geojson.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
