"""End-to-end test of the web console in a real headless Chromium (Debian's), driven by Playwright.

Against a running stack: replays the AIS vessels of data/ais-virginia-beach-*.csv through
/v1/ingest (unless the tenant has them already), then checks in the browser that /#key=
logs in and leaves the address bar, the device list shows the vessels, a vessel's track is
drawn with as many segments as its JSON export has, playback moves the marker, its learned
places are drawn, a fix ingested now appears live (when the gateway serves /v1/live), a
wrong key gets a clear message, and all this with the basemap's tiles unreachable. Geofences:
a circle drawn with the mouse is saved and drawn, a self-intersecting polygon gets the API's
400 message, a polygon drawn is saved, fixes crossing the circle show ENTER and EXIT in the
selected device's event list (live, then fetched), and both fences are deleted from their
popups.
Screenshots go to --out (default target/console-e2e/). Exits 1 naming the first failure.

    python3 scripts/lib/console_e2e.py --addr http://127.0.0.1:15050 --key demo-key [--full]

--full also ingests a 1M-fix track (--full-fixes) and measures the page drawing it.

Run with any python3: it installs Debian's chromium when missing (apt, as root or with sudo),
and its pinned Playwright into .tools/console-e2e-venv (never Playwright's own browsers), then
re-runs itself there.
"""

import argparse
import calendar
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pinned_venv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Pinned: a new release must not break CI on its own; raise it on purpose.
WANT = ["playwright==1.65.2"]
DATA = os.path.join(ROOT, "data", "ais-virginia-beach-2020-06-04..06.csv")
INGEST_TOKEN = "demo-ingest"


def chromium_path():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def install_chromium():
    if chromium_path():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("console-e2e: apt-get install chromium", file=sys.stderr)
    install = sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.run(install, env=env, stdin=subprocess.DEVNULL).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, check=True,
                       stdin=subprocess.DEVNULL)
        subprocess.run(install, env=env, check=True, stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    install_chromium()
    pinned_venv.reexec("console-e2e", WANT)

from playwright.sync_api import sync_playwright  # noqa: E402 (after the venv bootstrap)


class Failure(Exception):
    pass


def expect(condition, what):
    if not condition:
        raise Failure(what)


def call(addr, key, path, body=None, method=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(addr + path, data=data, method=method,
                                     headers={"x-api-key": key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, error.read()[:300]


def get(addr, key, path):
    status, body = call(addr, key, path)
    if status != 200:
        raise Failure(f"GET {path}: HTTP {status}: {body!r}")
    return body


def ingest(addr, fixes):
    for start in range(0, len(fixes), 10000):
        status, body = call(addr, INGEST_TOKEN, "/v1/ingest", {"fixes": fixes[start:start + 10000]})
        if status != 200:
            raise Failure(f"POST /v1/ingest: HTTP {status}: {body!r}")


def quote(device):
    return urllib.parse.quote(device, safe="")


def replay_ais(addr, key):
    """The sample's vessels, each in time order; returns their ids."""
    by_device = {}
    with open(DATA, newline="") as file:
        for row in csv.DictReader(file):
            ms = calendar.timegm(time.strptime(row["timestamp"], "%Y-%m-%dT%H:%M:%SZ")) * 1000
            by_device.setdefault(row["device_id"], []).append(
                {"deviceId": row["device_id"], "timeMs": str(ms),
                 "lat": float(row["lat"]), "lon": float(row["lon"])})
    listing = get(addr, key, "/v1/devices?page_size=1000")["devices"]
    if {d["deviceId"] for d in listing} >= set(by_device):
        return sorted(by_device)
    fixes = []
    for device in sorted(by_device):
        fixes.extend(sorted(by_device[device], key=lambda f: int(f["timeMs"])))
    started = time.monotonic()
    ingest(addr, fixes)
    print(f"console-e2e: replayed {len(fixes)} fixes of {len(by_device)} vessels "
          f"in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return sorted(by_device)


def settle(addr, key, vessels, deadline_s=60):
    """Waits until storage lists the vessels and learning has places for one with several
    segments (preferably a labelled one); returns it and its places."""
    deadline = time.monotonic() + deadline_s
    while True:
        listing = get(addr, key, "/v1/devices?sort=-fixes&page_size=1000")["devices"]
        present = [d for d in listing if d["deviceId"] in set(vessels)]
        if len(present) == len(vessels):
            # Not one that an earlier run sent a live fix to (its default range is then today).
            month_ago = (time.time() - 30 * 86400) * 1000
            fallback = None
            for device in [d for d in present if int(d["lastMs"]) < month_ago][:30]:
                places = get(addr, key, f"/v1/devices/{quote(device['deviceId'])}/places?k=20")["places"]
                segments, _ = export_segments(addr, key, device["deviceId"], 0, 0)
                if places and segments >= 2:
                    if any(p["label"].endswith(("HOME", "WORK")) for p in places):
                        return device["deviceId"], places
                    fallback = fallback or (device["deviceId"], places)
            if fallback:
                return fallback
        if time.monotonic() > deadline:
            raise Failure(f"after {deadline_s} s: {len(present)} of {len(vessels)} vessels "
                          "listed, none of the busiest with learned places and 2+ segments")
        time.sleep(1)


def export_segments(addr, key, device, from_ms, to_ms):
    doc = get(addr, key, f"/v1/devices/{quote(device)}/track?format=json&from={from_ms}&to={to_ms}")
    segments, previous = 0, None
    for refined in doc["fixes"]:
        segment = refined.get("segment", 0)
        if segments == 0 or segment != previous:
            segments += 1
        previous = segment
    return segments, len(doc["fixes"])


def state(page):
    return page.evaluate("""() => {
        const c = window.__console;
        return JSON.parse(JSON.stringify({...c, detail: c.detail && {...c.detail, bounds: null}}));
    }""")


def wait_for(page, js, what, timeout_s=30):
    try:
        page.wait_for_function(js, timeout=timeout_s * 1000)
    except Exception as error:  # Playwright's TimeoutError, with the page's state for the log
        raise Failure(f"{what}: not within {timeout_s} s ({type(error).__name__}); "
                      f"page state: {json.dumps(state(page))[:800]}") from None


def new_page(browser, out, name):
    context = browser.new_context(viewport={"width": 1400, "height": 860})
    # No basemap: every check runs with the tile host (any host but the gateway) unreachable.
    context.route(lambda url: not url.startswith(browser.tm_addr), lambda route: route.abort())
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Blocked tiles log load failures: only the gateway's own failures count.
    page.on("console", lambda m: m.type == "error" and (m.location or {}).get("url", "").startswith(
        browser.tm_addr) and errors.append(f"{m.text} ({m.location})"))
    page.errors = errors
    page.shot = lambda label: page.screenshot(path=os.path.join(out, f"{name}-{label}.png"))
    return page


def check_console(browser, addr, key, vessel, places, other, out):
    page = new_page(browser, out, "console")
    started = time.monotonic()
    page.goto(f"{addr}/#key={key}")
    wait_for(page, "() => window.__console && window.__console.loggedIn && window.__console.devices > 0",
             "log in with /#key=")
    load_s = time.monotonic() - started
    expect("#key" not in page.url and key not in page.url,
           f"the key stays in the address bar: {page.url}")
    expect(page.evaluate("() => sessionStorage.length") == 1, "the key is not in sessionStorage")
    s = state(page)
    listing = get(addr, key, "/v1/devices?page_size=1000")["devices"]
    expect(s["devices"] == len(listing), f"the page lists {s['devices']} devices, the API {len(listing)}")
    items = page.locator("#device-list li").count()
    expect(items >= min(len(listing), 100), f"{items} rows in the device list")
    # Most recently seen first.
    first = page.locator("#device-list li").first.get_attribute("data-id")
    latest = max(listing, key=lambda d: int(d["lastMs"]))
    expect(first == latest["deviceId"] or int(latest["lastMs"]) == int(
        next(d for d in listing if d["deviceId"] == first)["lastMs"]),
        f"first row {first}, most recently seen {latest['deviceId']}")
    page.shot("1-fleet")
    # Search narrows the list to the vessel.
    page.fill("#search", vessel)
    expect(page.locator("#device-list li").count() == 1, "search does not narrow the list")

    page.click(f"#device-list li[data-id='{vessel}']")
    wait_for(page, "() => window.__console.track && window.__console.places > 0",
             "the vessel's track and places")
    s = state(page)
    track = s["track"]
    want, fixes = export_segments(addr, key, vessel, track["from"], track["to"])
    expect(track["deviceId"] == vessel, f"track of {track['deviceId']}")
    expect(track["segments"] == want and track["layers"] == want,
           f"{track['segments']} segments fetched, {track['layers']} drawn; the JSON export has {want}")
    expect(want >= 2, f"the vessel has {want} segment(s): pick one with several")
    expect(s["places"] == len(places), f"{s['places']} places drawn, the API has {len(places)}")
    labels = sorted(p["label"].rsplit("_", 1)[-1] for p in places if p["label"].endswith(("HOME", "WORK")))
    shown = sorted(page.locator(".tm-label").all_inner_texts())
    expect(shown == labels, f"place labels on the map {shown}, the API has {labels}")
    stats_rows = page.locator("#stats tr").count()
    expect(stats_rows >= 2, f"{stats_rows} rows in the daily stats")
    # Fitted to the track, the page fetches it again at the finer tolerance of the new zoom.
    coarse = track["simplifyM"]
    wait_for(page, f"() => window.__console.track.simplifyM < {coarse} / 4", "the finer track after the fit")
    s = state(page)
    expect(s["track"]["layers"] == want, f"{s['track']['layers']} segments drawn after the finer fetch")
    page.shot("2-track")
    # Zoomed in further, the part in view is fetched in more detail.
    page.click(".leaflet-control-zoom-in")
    page.wait_for_timeout(500)  # a click during the zoom animation is dropped
    page.click(".leaflet-control-zoom-in")
    wait_for(page, f"() => window.__console.detail && window.__console.detail.simplifyM < "
             f"{s['track']['simplifyM']}", "detail for the view after zooming in")
    print(f"console-e2e: {vessel}: {want} segments, {s['track']['fixes']} of {fixes} fixes drawn at "
          f"{s['track']['simplifyM']} m ({track['fixes']} at {coarse} m before the fit), "
          f"{s['places']} places, {s['predictions']} predictions", file=sys.stderr)

    # Playback moves the marker.
    before = state(page)["playback"]
    page.click("#play")
    wait_for(page, f"() => window.__console.playback.timeMs > {before['timeMs']} && "
             f"(window.__console.playback.lat !== {before['lat']} || "
             f"window.__console.playback.lon !== {before['lon']})", "playback moves the marker", 10)
    page.wait_for_timeout(1500)
    page.click("#play")
    after = state(page)["playback"]
    expect(after["value"] > before["value"], f"slider at {after['value']}")
    page.shot("3-playback")

    # Offline: no tile loaded, the scale and the drawing are there anyway.
    s = state(page)
    expect(s["tiles"]["loaded"] == 0, "a tile loaded although the tile host is blocked")
    expect(page.locator(".leaflet-control-scale").count() == 1, "no scale")
    expect(page.locator(".tm-note").count() == 1, "no note that the basemap is unavailable")

    # Live: a fix ingested now reaches the page.
    live_s = None
    status, _ = call(addr, key, "/v1/live/token", body={}, method="POST")
    if status == 404:
        print("console-e2e: /v1/live is not served: live check skipped", file=sys.stderr)
        wait_for(page, "() => window.__console.live.status === 'unavailable'", "'live updates unavailable'")
    else:
        wait_for(page, "() => window.__console.live.status === 'on'", "the live stream opens")
        page.fill("#search", "")
        page.click("#fit-fleet")
        now = int(time.time() * 1000)
        lat, lon = 36.95, -76.05
        sent = time.monotonic()
        # Another vessel than the one shown: live updates are for the whole fleet.
        ingest(addr, [{"deviceId": other, "timeMs": str(now), "lat": lat, "lon": lon}])
        wait_for(page, f"() => window.__console.live.last && window.__console.live.last.deviceId === "
                 f"'{other}' && window.__console.live.last.timeMs === {now}",
                 "the fix ingested now appears live", 60)
        live_s = time.monotonic() - sent
        marker = page.evaluate(f"() => window.__console.markerAt('{other}')")
        expect(marker and abs(marker[0] - lat) < 1e-9 and abs(marker[1] - lon) < 1e-9,
               f"the vessel's marker is at {marker}, not at the live fix")
        wait_for(page, f"""() => document.querySelector("#device-list li[data-id='{other}']")
                 .dataset.lastMs === '{now}'""", "the list's last seen follows the live fix", 5)
        seen = page.locator(f"#device-list li[data-id='{other}'] .seen").inner_text()
        expect(seen.endswith(" s ago"), f"the list says {other} was last seen {seen!r}")
        page.shot("4-live")
    # Logging out forgets the key and the tenant's data.
    page.click("#logout")
    page.locator("#login").wait_for(state="visible", timeout=5000)
    expect(page.evaluate("() => sessionStorage.length") == 0, "the key outlives the log-out")
    expect(page.locator("#device-list li").count() == 0, "devices stay listed after the log-out")
    expect(state(page)["markers"] == 0 and state(page)["track"] is None, "the map keeps the tenant's data")
    expect(not page.errors, f"errors in the page: {page.errors[:3]}")
    page.context.close()
    return load_s, live_s


def check_wrong_key(browser, addr, out):
    page = new_page(browser, out, "wrong-key")
    page.goto(f"{addr}/#key=not-a-key-123")
    error = page.locator("#login-error")
    error.wait_for(state="visible", timeout=15000)
    text = error.inner_text()
    expect("API key not accepted" in text and len(text) > len("API key not accepted: "),
           f"wrong key message: {text!r}")
    expect("#key" not in page.url, f"the key stays in the address bar: {page.url}")
    expect(page.locator("#app").is_hidden(), "the app shows with a wrong key")
    page.shot("login")
    page.context.close()


def synthetic_track(device, n):
    """`n` fixes one second apart, a wandering course at about 10 m/s, a gap every 100 000."""
    fixes, lat, lon, heading, t = [], 36.9, -76.2, 0.0, 1_700_000_000_000
    for i in range(n):
        heading += math.sin(i / 500.0) * 0.02
        lat += 9e-5 * math.cos(heading)
        lon += 1.1e-4 * math.sin(heading)
        t += 1000 if i % 100_000 else 13 * 3600 * 1000
        fixes.append({"deviceId": device, "timeMs": str(t), "lat": round(lat, 6), "lon": round(lon, 6)})
    return fixes


def check_full(browser, addr, key, n, out):
    device = f"console-full-{n}"
    listing = get(addr, key, "/v1/devices?page_size=1000")["devices"]
    have = next((d for d in listing if d["deviceId"] == device), None)
    if not have or int(have["fixes"]) < n:
        started = time.monotonic()
        ingest(addr, synthetic_track(device, n))
        deadline = time.monotonic() + 300
        while True:
            listing = get(addr, key, "/v1/devices?page_size=1000")["devices"]
            have = next((d for d in listing if d["deviceId"] == device), None)
            if have and int(have["fixes"]) >= n:
                break
            expect(time.monotonic() < deadline, f"{device}: not stored within 300 s")
            time.sleep(2)
        print(f"console-e2e: stored {n} fixes of {device} in {time.monotonic() - started:.0f} s",
              file=sys.stderr)
    page = new_page(browser, out, "full")
    page.goto(f"{addr}/#key={key}")
    wait_for(page, "() => window.__console.loggedIn && window.__console.devices > 0", "log in")
    page.fill("#search", device)
    started = time.monotonic()
    page.click(f"#device-list li[data-id='{device}']")
    wait_for(page, "() => window.__console.track", "the 1M-fix track", 120)
    drawn_s = time.monotonic() - started
    s = state(page)
    page.wait_for_timeout(1000)
    page.shot("track")
    print(f"console-e2e: --full: {n} fixes: drawn in {drawn_s:.2f} s from the click "
          f"(fetch {s['track']['fetchMs']} ms, draw {s['track']['drawMs']} ms, "
          f"{s['track']['fixes']} points at {s['track']['simplifyM']} m, "
          f"{s['track']['segments']} segments)", file=sys.stderr)
    page.context.close()


FENCE_DEVICE = "console-fence-e2e"
# Open sea off Virginia Beach, away from the replayed vessels: the fence the test draws.
FENCE_AT = (36.80, -75.80)
FENCE_RADIUS_M = 300
FENCE_LABELS = "[...document.querySelectorAll('.tm-fence-label')].map((e) => e.textContent)"


def offset(lat, lon, north_m, east_m):
    return (lat + north_m / 111_320.0, lon + east_m / (111_320.0 * math.cos(math.radians(lat))))


def drop_test_fences(addr, key):
    """Fences a failed earlier run left (named "e2e …")."""
    for fence in get(addr, key, "/v1/geofences")["geofences"]:
        if fence["name"].startswith("e2e "):
            call(addr, key, f"/v1/geofences/{quote(fence['geofenceId'])}", method="DELETE")


def screen(page, lat, lon):
    return page.evaluate(f"() => window.__console.screenPoint({lat}, {lon})")


def check_fences(browser, addr, key, out):
    """Draws a circle fence with the mouse, sees a device's fixes cross it as ENTER and EXIT
    in the event list (live, then fetched), a bad polygon's 400 message, a polygon drawn, and
    both deleted from their popups."""
    drop_test_fences(addr, key)
    lat0, lon0 = FENCE_AT
    # A loop 400 m west of the fence → its centre → 400 m east → back west (no fix inside),
    # 15 s, 15 s and 30 s apart (at most 96 km/h), after the device's last fix: a run soon after
    # another must not send fixes older than its, nor jump (refinement would drop them).
    last = max([int(d["lastMs"]) for d in get(addr, key, "/v1/devices?page_size=1000")["devices"]
                if d["deviceId"] == FENCE_DEVICE] or [0])
    t0 = max(int(time.time() * 1000) - 60_000, last + 1000)
    # The device exists before the fence (its first fix 400 m west of it), so it can be selected.
    start = offset(lat0, lon0, 0, -400)
    ingest(addr, [{"deviceId": FENCE_DEVICE, "timeMs": str(t0), "lat": start[0], "lon": start[1]}])
    deadline = time.monotonic() + 60
    while not any(d["deviceId"] == FENCE_DEVICE and int(d["lastMs"]) >= t0
                  for d in get(addr, key, "/v1/devices?sort=-last_ms&page_size=1000")["devices"]):
        expect(time.monotonic() < deadline, f"{FENCE_DEVICE}: not listed within 60 s")
        time.sleep(0.5)
    page = new_page(browser, out, "fences")
    page.goto(f"{addr}/#key={key}")
    wait_for(page, "() => window.__console.loggedIn && window.__console.devices > 0", "log in")
    page.fill("#search", FENCE_DEVICE)
    # The row shows the device's figures of the day, as ListDevices counts them.
    listed = next(d for d in get(addr, key, "/v1/devices?page_size=1000")["devices"]
                  if d["deviceId"] == FENCE_DEVICE)
    row = page.locator(f"#device-list li[data-id='{FENCE_DEVICE}'] .nums").inner_text()
    expect(f"today: {int(listed['fixesToday']):,} fixes" in row,
           f"the row says {row!r}; the API has {listed['fixesToday']} fixes today")
    page.click(f"#device-list li[data-id='{FENCE_DEVICE}']")
    wait_for(page, f"() => window.__console.track && window.__console.events && "
             f"window.__console.events.deviceId === '{FENCE_DEVICE}'", "the device's track and events")
    page.wait_for_timeout(300)  # the fit to its one fix
    page.evaluate(f"() => window.__console.setView({lat0}, {lon0}, 15)")
    before = state(page)["fences"]["layers"]

    # A circle: press at the centre, drag to the edge.
    page.click("#draw-circle")
    x0, y0 = screen(page, lat0, lon0)
    x1, y1 = screen(page, *offset(lat0, lon0, FENCE_RADIUS_M, 0))
    page.mouse.move(x0, y0)
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(x0 + (x1 - x0) * step / 5, y0 + (y1 - y0) * step / 5)
    page.mouse.up()
    draft = state(page)["fences"]["draft"]
    expect(draft and draft["kind"] == "circle", f"no circle drawn: {draft}")
    expect(abs(draft["radiusM"] - FENCE_RADIUS_M) < 0.05 * FENCE_RADIUS_M and
           abs(draft["lat"] - lat0) < 1e-3 and abs(draft["lon"] - lon0) < 1e-3,
           f"the circle drawn is {draft}, not {FENCE_RADIUS_M} m around {FENCE_AT}")
    page.fill("#fence-name", "e2e pier")
    page.click("#fence-save")
    wait_for(page, f"() => window.__console.fences.layers === {before + 1} && "
             "!window.__console.fences.draft", "the new circle fence drawn")
    fence = next((f for f in get(addr, key, "/v1/geofences")["geofences"] if f["name"] == "e2e pier"),
                 None)
    expect(fence and fence.get("circle"), f"the API has no circle fence 'e2e pier': {fence}")
    # A replaced label fades out for 200 ms.
    wait_for(page, f"() => {FENCE_LABELS}.filter((t) => t === 'e2e pier').length === 1",
             "the fence's name on the map", 5)

    # A bow-tie polygon: its 400 message shows, the draft stays until cancelled.
    page.click("#draw-polygon")
    corners = [offset(lat0, lon0, n, e) for n, e in
               [(600, 600), (1000, 1000), (600, 1000), (1000, 600)]]
    for corner in corners + corners[:1]:
        page.mouse.click(*screen(page, *corner))
    draft = state(page)["fences"]["draft"]
    expect(draft and draft["kind"] == "polygon" and len(draft["ring"]) == 4,
           f"the polygon drawn is {draft}")
    page.fill("#fence-name", "e2e bow-tie")
    page.click("#fence-save")
    error = page.locator("#fence-error")
    error.wait_for(state="visible", timeout=15000)
    text = error.inner_text()
    expect("intersects itself" in text, f"the bad polygon's message: {text!r}")
    page.click("#fence-cancel")
    expect(error.is_hidden() and state(page)["fences"]["draft"] is None, "cancel keeps the draft")
    # A triangle, closed by a double-click.
    page.click("#draw-polygon")
    triangle = [offset(lat0, lon0, n, e) for n, e in [(-500, 600), (-900, 900), (-500, 1100)]]
    for corner in triangle[:-1]:
        page.mouse.click(*screen(page, *corner))
    page.mouse.dblclick(*screen(page, *triangle[-1]))
    page.fill("#fence-name", "e2e yard")
    page.click("#fence-save")
    wait_for(page, f"() => window.__console.fences.layers === {before + 2}", "the triangle drawn")

    # Fixes crossing the circle: ENTER and EXIT, live in the list, then fetched.
    inside = offset(lat0, lon0, 0, 0)
    beyond = offset(lat0, lon0, 0, 400)
    sent = time.monotonic()
    ingest(addr, [{"deviceId": FENCE_DEVICE, "timeMs": str(t0 + 15_000), "lat": inside[0], "lon": inside[1]},
                  {"deviceId": FENCE_DEVICE, "timeMs": str(t0 + 30_000), "lat": beyond[0], "lon": beyond[1]},
                  {"deviceId": FENCE_DEVICE, "timeMs": str(t0 + 60_000), "lat": start[0], "lon": start[1]}])
    # This fence's events (earlier runs left theirs), in time order.
    has_both = (f"(e) => e && JSON.stringify(e.types.filter((t, i) => e.fences[i] === "
                f"'{fence['geofenceId']}')) === '[\"ENTER\",\"EXIT\"]'")
    wait_for(page, f"() => ({has_both})(window.__console.events)", "ENTER and EXIT in the event list", 90)
    events_s = time.monotonic() - sent
    s = state(page)
    live = s["live"]["events"] >= 2
    # Newest first; earlier runs' events name their fence "deleted fence …".
    rows = page.locator("#events li[data-type]").all_inner_texts()[:2]
    expect(len(rows) == 2 and rows[0].startswith("EXIT") and rows[1].startswith("ENTER") and
           all("e2e pier" in r for r in rows), f"the newest event rows: {rows}")
    # Stored a moment after they stream: fetched again until storage has them.
    deadline = time.monotonic() + 60
    while True:
        api_events = get(addr, key, f"/v1/events?device_id={FENCE_DEVICE}&from_ms={t0}"
                         f"&to_ms={t0 + 30_001}&types=ENTER,EXIT")["events"]
        mine = [e["type"] for e in api_events if e.get("geofenceId") == fence["geofenceId"]]
        if mine == ["ENTER", "EXIT"]:
            break
        expect(time.monotonic() < deadline, f"GET /v1/events has {mine} for the fence after 60 s")
        time.sleep(0.5)
    clicked = page.evaluate("() => Date.now()")
    page.click("#range-all")
    wait_for(page, f"() => window.__console.eventsFetched && window.__console.eventsFetched.atMs >= "
             f"{clicked} && ({has_both})(window.__console.eventsFetched)", "ENTER and EXIT fetched", 30)
    s = state(page)
    expect(s["events"]["markers"] == s["events"]["count"] == s["eventsFetched"]["count"],
           f"{s['events']['markers']} event markers, {s['events']['count']} events listed, "
           f"{s['eventsFetched']['count']} fetched")
    page.evaluate(f"() => window.__console.setView({lat0 - 0.002}, {lon0 + 0.004}, 14)")
    page.wait_for_timeout(300)
    page.shot("1-events")

    # Deleted from their popups (the list opens them).
    for name in ["e2e pier", "e2e yard"]:
        page.click(f"#fence-list li:has-text('{name}')")
        page.click(".leaflet-popup button.danger")
        wait_for(page, f"() => !document.querySelector('#fence-list').textContent.includes('{name}')",
                 f"{name} deleted", 15)
    expect(state(page)["fences"]["layers"] == before, "fence layers stay after the deletes")
    wait_for(page, f"() => !{FENCE_LABELS}.some((t) => t.startsWith('e2e '))",
             "the deleted fences' names leave the map", 5)
    left = [f["name"] for f in get(addr, key, "/v1/geofences")["geofences"] if f["name"].startswith("e2e ")]
    expect(not left, f"the API still has {left}")
    # The browser logs the bow-tie's 400 itself.
    errors = [e for e in page.errors if not ("status of 400" in e and "/v1/geofences'" in e)]
    expect(len(errors) == len(page.errors) - 1, f"the bow-tie's 400 is not in the log: {page.errors}")
    expect(not errors, f"errors in the page: {errors[:3]}")
    page.context.close()
    return events_s, live


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="http://127.0.0.1:50050")
    parser.add_argument("--key", default="demo-key")
    parser.add_argument("--out", default=os.path.join(ROOT, "target", "console-e2e"))
    parser.add_argument("--full", action="store_true", help="also draw a 1M-fix track")
    parser.add_argument("--full-fixes", type=int, default=1_000_000)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    try:
        vessels = replay_ais(args.addr, args.key)
        vessel, places = settle(args.addr, args.key, vessels)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True,
                                                 args=["--no-sandbox"])
            browser.tm_addr = args.addr
            try:
                other = next(v for v in vessels if v != vessel)
                load_s, live_s = check_console(browser, args.addr, args.key, vessel, places, other,
                                               args.out)
                check_wrong_key(browser, args.addr, args.out)
                events_s, events_live = check_fences(browser, args.addr, args.key, args.out)
                if args.full:
                    check_full(browser, args.addr, args.key, args.full_fixes, args.out)
            finally:
                browser.close()
    except Failure as failure:
        print(f"console-e2e: FAILED: {failure} (screenshots: {args.out})", file=sys.stderr)
        return 1
    live = f"{live_s:.2f} s" if live_s is not None else "skipped (no /v1/live)"
    print(f"console-e2e: passed in {time.monotonic() - started:.0f} s: page loaded and listed the "
          f"fleet in {load_s:.2f} s, live fix shown {live} after its ingest, geofence ENTER/EXIT "
          f"listed {events_s:.2f} s after the ingest ({'live' if events_live else 'fetched'}); screenshots in "
          f"{os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
