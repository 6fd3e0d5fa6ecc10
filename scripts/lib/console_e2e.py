"""End-to-end test of the web console in a real headless Chromium (Debian's), driven by Playwright.

Against a running stack: replays the AIS vessels of data/ais-virginia-beach-*.csv through
/v1/ingest (unless the tenant has them already), then checks in the browser that /#key=
logs in and leaves the address bar, the device list shows the vessels, a vessel's track is
drawn with as many segments as its JSON export has, playback moves the marker, its learned
places are drawn, a fix ingested now appears live (when the gateway serves /v1/live), a
wrong key gets a clear message, and all this with the basemap's tiles unreachable.
Screenshots go to --out (default target/console-e2e/). Exits 1 naming the first failure.

    python3 scripts/lib/console_e2e.py --addr http://127.0.0.1:15050 --key demo-key [--full]

--full also ingests a 1M-fix track (--full-fixes) and measures the page drawing it.

Run with any python3: it installs Debian's chromium when missing (apt, as root or with sudo),
and its pinned Playwright into .tools/console-venv (never Playwright's own browsers), then
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV = os.path.join(ROOT, ".tools", "console-venv")
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


if "CONSOLE_E2E_IN_VENV" not in os.environ:
    install_chromium()
    python = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, ".requirements")
    if not os.path.exists(stamp) or open(stamp).read() != " ".join(WANT):
        print(f"console-e2e: installing {' '.join(WANT)} into {VENV}", file=sys.stderr)
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--no-input", *WANT], check=True, stdin=subprocess.DEVNULL)
        with open(stamp, "w") as file:
            file.write(" ".join(WANT))
    os.environ["CONSOLE_E2E_IN_VENV"] = "1"
    os.execv(python, [python, *sys.argv])

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
                if args.full:
                    check_full(browser, args.addr, args.key, args.full_fixes, args.out)
            finally:
                browser.close()
    except Failure as failure:
        print(f"console-e2e: FAILED: {failure} (screenshots: {args.out})", file=sys.stderr)
        return 1
    live = f"{live_s:.2f} s" if live_s is not None else "skipped (no /v1/live)"
    print(f"console-e2e: passed in {time.monotonic() - started:.0f} s: page loaded and listed the "
          f"fleet in {load_s:.2f} s, live fix shown {live} after its ingest; screenshots in "
          f"{os.path.relpath(args.out, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
