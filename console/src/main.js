// The trackmesh console: the tenant's devices on a Leaflet map, a device's track with playback,
// its daily stats, learned places and next-place prediction, its geofence and place events,
// the tenant's geofences (drawn, created by drawing, deleted), and live positions and events
// over SSE. Plain DOM and the gateway's JSON API; window.__console exposes what is drawn, for tests.
import L from 'leaflet';
import 'leaflet/dist/leaflet.css';
import './console.css';
import { draw } from './draw.js';

const KEY_STORAGE = 'trackmesh.apiKey';
const DAY_MS = 86400000;
const SEGMENT_COLOURS = ['#2563eb', '#ea580c', '#059669', '#c026d3', '#0891b2', '#ca8a04'];
const MAX_DEVICES = 5000;
const EVENT_COLOURS = { ENTER: '#16a34a', EXIT: '#dc2626', ARRIVE: '#2563eb', DEPART: '#ea580c' };
// The list shows the newest; the map the newest markers (GET /v1/events answers up to 10 000).
const MAX_EVENT_ROWS = 300;
const MAX_EVENT_MARKERS = 2000;
// How long a live event stays highlighted.
const FRESH_MS = 4000;

const $ = (id) => document.getElementById(id);

const debug = {
  loggedIn: false,
  devices: 0,
  markers: 0,
  track: null,
  detail: null,
  playback: null,
  places: 0,
  predictions: 0,
  live: { status: 'off', fixes: 0, last: null, events: 0, lastEvent: null },
  fences: { count: 0, layers: 0, drawing: null, draft: null, saving: false },
  events: null,
  eventsFetched: null,
  tiles: { loaded: 0, failed: 0 },
  errors: [],
};
window.__console = debug;
// Where device `id`'s last-position marker is, [lat, lon] (for tests).
debug.markerAt = (id) => {
  const marker = layers.deviceMarkers && layers.deviceMarkers.get(id);
  if (!marker) return null;
  const at = marker.getLatLng();
  return [at.lat, at.lng];
};
// For tests that drive the mouse: where (lat, lon) is on the page, and a view to draw in.
debug.screenPoint = (lat, lon) => {
  const p = map.latLngToContainerPoint([lat, lon]);
  const box = map.getContainer().getBoundingClientRect();
  return [box.left + p.x, box.top + p.y];
};
debug.setView = (lat, lon, zoom) => {
  map.setView([lat, lon], zoom, { animate: false });
};

let apiKey = null;
let map = null;
let devices = new Map();
let selectedId = null;
let live = null;
const layers = {};
// The tenant's geofences by id; the selected device's events, in time order.
let fences = new Map();
let events = [];
// Set while a drawing tool is active: cancels it.
let drawing = null;
let draft = null;

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { 'x-api-key': apiKey, ...(options.headers || {}) },
  });
  if (!response.ok) {
    let code = `HTTP ${response.status}`;
    let message = response.statusText;
    try {
      const body = await response.json();
      code = body.code || code;
      message = body.message || message;
    } catch (_) {
      // Not our JSON error (a proxy's page): the status says enough.
    }
    throw new ApiError(response.status, code, message);
  }
  return response.json();
}

const enc = encodeURIComponent;

function showError(error) {
  const banner = $('error');
  if (!error) {
    banner.hidden = true;
    return;
  }
  const text = error instanceof ApiError ? `${error.code}: ${error.message}` : String(error.message || error);
  debug.errors.push(text);
  banner.textContent = text;
  banner.hidden = false;
  if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
    logout(`API key not accepted: ${error.message}`);
  }
}

// ------------------------------------------------------------------ formatting

const int = (text) => Number(text || 0);

function utc(ms) {
  if (!ms) return '—';
  return new Date(ms).toISOString().slice(0, 16).replace('T', ' ');
}

const utcSeconds = (ms) => new Date(ms).toISOString().slice(0, 19).replace('T', ' ');

function ago(ms) {
  if (!ms) return 'never';
  const s = (Date.now() - ms) / 1000;
  if (s < 0) return utc(ms);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  if (s < 30 * 86400) return `${Math.round(s / 86400)} d ago`;
  return utc(ms).slice(0, 10);
}

function km(metres) {
  const m = Number(metres || 0);
  return m >= 10000 ? `${(m / 1000).toFixed(0)} km` : `${(m / 1000).toFixed(1)} km`;
}

function hours(ms) {
  const h = int(ms) / 3600000;
  return h >= 10 ? `${h.toFixed(0)} h` : `${h.toFixed(1)} h`;
}

// datetime-local inputs hold UTC here (the console says so beside them).
const toInput = (ms) => new Date(ms).toISOString().slice(0, 16);
const fromInput = (text) => (text ? Date.parse(`${text}:00Z`) : NaN);

/** HOME or WORK (the proto enum's name without its prefix), else ''. */
function labelOf(place) {
  const label = String(place?.label || '').replace(/^PLACE_LABEL_/, '');
  return label === 'HOME' || label === 'WORK' ? label : '';
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// ------------------------------------------------------------------ login

async function login(key) {
  apiKey = key;
  const error = $('login-error');
  try {
    await loadDevices();
  } catch (e) {
    apiKey = null;
    sessionStorage.removeItem(KEY_STORAGE);
    showLogin(
      e instanceof ApiError && (e.status === 401 || e.status === 403)
        ? `API key not accepted: ${e.message}`
        : `Cannot reach the gateway: ${e.message}`,
    );
    return;
  }
  error.hidden = true;
  sessionStorage.setItem(KEY_STORAGE, key);
  debug.loggedIn = true;
  $('login').hidden = true;
  $('app').hidden = false;
  setUpMap();
  renderDevices();
  fitFleet();
  startLive();
  loadFences();
}

function showLogin(message) {
  debug.loggedIn = false;
  $('app').hidden = true;
  $('login').hidden = false;
  const error = $('login-error');
  error.textContent = message || '';
  error.hidden = !message;
  $('key-input').focus();
}

function logout(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  apiKey = null;
  stopLive();
  // Nothing of this tenant stays on the page for the next key.
  if (map) closeDetail();
  cancelDraft();
  fences = new Map();
  renderFences();
  devices = new Map();
  debug.devices = 0;
  renderMarkers();
  renderDevices();
  $('search').value = '';
  showError(null);
  showLogin(message);
}

// ------------------------------------------------------------------ map

async function setUpMap() {
  if (map) {
    map.invalidateSize();
    return;
  }
  map = L.map('map', { preferCanvas: true, worldCopyJump: true }).setView([20, 0], 2);
  L.control.scale({ imperial: false }).addTo(map);
  addLegend();
  // In drawing order: fences at the bottom, the fleet's markers above tracks, places and
  // events, the draft of a new fence and the playback marker on top.
  layers.fences = L.layerGroup().addTo(map);
  layers.fenceById = new Map();
  layers.track = L.layerGroup().addTo(map);
  layers.detail = L.layerGroup().addTo(map);
  layers.places = L.layerGroup().addTo(map);
  layers.events = L.layerGroup().addTo(map);
  layers.devices = L.layerGroup().addTo(map);
  layers.deviceMarkers = new Map();
  layers.draft = L.layerGroup().addTo(map);
  layers.playback = L.layerGroup().addTo(map);
  map.on('zoomend moveend', scheduleDetail);
  renderMarkers();
  renderFences();
  fitFleet();
  let config = { tileUrl: '', attribution: '' };
  try {
    config = await (await fetch('/console/config.json')).json();
  } catch (_) {
    // Without the config the map has no basemap: tracks and places still draw.
  }
  if (config.tileUrl) {
    const tiles = L.tileLayer(config.tileUrl, { attribution: config.attribution, maxZoom: 19 });
    const note = L.control({ position: 'bottomleft' });
    note.onAdd = () => {
      const div = L.DomUtil.create('div', 'tm-note');
      div.textContent = 'basemap unavailable: tiles do not load';
      return div;
    };
    tiles.on('tileload', () => {
      debug.tiles.loaded += 1;
    });
    tiles.on('tileerror', () => {
      debug.tiles.failed += 1;
      if (debug.tiles.loaded === 0 && !note._map) note.addTo(map);
    });
    // Under everything drawn so far.
    tiles.addTo(map).bringToBack();
  }
}

function addLegend() {
  const legend = L.control({ position: 'topright' });
  legend.onAdd = () => {
    const div = L.DomUtil.create('div', 'tm-legend');
    div.innerHTML = `<div><i class="dot" style="background:#1d4ed8"></i>device, last position <i class="dot" style="background:#06b6d4"></i>moved live <i class="dot" style="background:#dc2626"></i>selected</div>
<div><i class="line" style="background:${SEGMENT_COLOURS[0]}"></i><i class="line" style="background:${SEGMENT_COLOURS[1]}"></i>track, one colour per segment</div>
<div><i class="dot" style="background:#16a34a"></i>start <i class="dot" style="background:#111827"></i>end <i class="dot" style="background:#facc15"></i>playback</div>
<div><i class="ring"></i>learned place, size: time spent</div>
<div><i class="dash"></i>next place, probability</div>
<div><i class="fence"></i>geofence <i class="dot" style="background:${EVENT_COLOURS.ENTER}"></i>enter <i class="dot" style="background:${EVENT_COLOURS.EXIT}"></i>exit <i class="dot" style="background:${EVENT_COLOURS.ARRIVE}"></i>arrive <i class="dot" style="background:${EVENT_COLOURS.DEPART}"></i>depart</div>`;
    return div;
  };
  legend.addTo(map);
}

/** Metres per screen pixel at the map's centre: the simplification the view can show. */
function metresPerPixel() {
  const lat = map.getCenter().lat;
  return (40075016.686 * Math.cos((lat * Math.PI) / 180)) / 2 ** (map.getZoom() + 8);
}

function tolerance() {
  return Math.min(5000, Math.max(0.5, Number(metresPerPixel().toPrecision(2))));
}

function fitFleet() {
  if (!map) return;
  const points = [...devices.values()].filter(hasPosition).map((d) => [d.lastLat, d.lastLon]);
  if (points.length) map.fitBounds(L.latLngBounds(points).pad(0.1), { maxZoom: 12 });
}

// ------------------------------------------------------------------ devices

const hasPosition = (d) => Number.isFinite(d.lastLat) && Number.isFinite(d.lastLon);

async function loadDevices() {
  const list = [];
  let token = '';
  do {
    const page = await api(`/v1/devices?sort=-last_ms&page_size=1000${token ? `&page_token=${enc(token)}` : ''}`);
    list.push(...(page.devices || []));
    token = page.nextPageToken;
  } while (token && list.length < MAX_DEVICES);
  const next = new Map();
  for (const d of list) {
    const old = devices.get(d.deviceId);
    next.set(d.deviceId, {
      id: d.deviceId,
      fixes: int(d.fixes),
      lastMs: Math.max(int(d.lastMs), old ? old.lastMs : 0),
      firstMs: int(d.firstMs),
      distanceM: Number(d.distanceM || 0),
      fixesToday: int(d.fixesToday || 0),
      distanceTodayM: Number(d.distanceTodayM || 0),
      lastLat: d.lastLat ?? old?.lastLat,
      lastLon: d.lastLon ?? old?.lastLon,
      fresh: old?.fresh || false,
    });
  }
  devices = next;
  debug.devices = devices.size;
  renderDevices();
  renderMarkers();
}

let renderQueued = false;
function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    renderDevices();
  }, 300);
}

function sortedDevices() {
  const filter = $('search').value.trim().toLowerCase();
  const by = $('sort').value;
  const list = [...devices.values()].filter((d) => !filter || d.id.toLowerCase().includes(filter));
  const keys = {
    last: (a, b) => b.lastMs - a.lastMs,
    fixes: (a, b) => b.fixesToday - a.fixesToday,
    distance: (a, b) => b.distanceTodayM - a.distanceTodayM,
    name: (a, b) => a.id.localeCompare(b.id),
  };
  return list.sort((a, b) => keys[by](a, b) || a.id.localeCompare(b.id));
}

function renderDevices() {
  const list = sortedDevices();
  const ol = $('device-list');
  const shown = list.slice(0, 1000);
  ol.innerHTML = shown
    .map(
      (d) => `<li data-id="${escapeHtml(d.id)}" data-last-ms="${d.lastMs}" class="${d.id === selectedId ? 'selected' : ''}${d.fresh ? ' fresh' : ''}">
<span class="id">${escapeHtml(d.id)}</span><span class="seen" title="${utc(d.lastMs)} UTC">${ago(d.lastMs)}</span>
<span class="nums" title="${d.fixes.toLocaleString('en')} fixes, ${km(d.distanceM)} in all">today: ${d.fixesToday.toLocaleString('en')} fixes · ${km(d.distanceTodayM)}</span></li>`,
    )
    .join('');
  $('device-count').textContent =
    `${devices.size} devices` + (list.length !== devices.size ? `, ${list.length} match` : '') +
    (shown.length < list.length ? `, first ${shown.length} shown` : '');
}

function renderMarkers() {
  if (!layers.devices) return;
  layers.devices.clearLayers();
  layers.deviceMarkers = new Map();
  for (const d of devices.values()) placeMarker(d);
  debug.markers = layers.deviceMarkers.size;
}

function placeMarker(d) {
  if (!hasPosition(d) || !layers.devices) return;
  let marker = layers.deviceMarkers.get(d.id);
  const selected = d.id === selectedId;
  const style = {
    radius: selected ? 8 : 6,
    color: '#fff',
    weight: 2,
    fillColor: selected ? '#dc2626' : d.fresh ? '#06b6d4' : '#1d4ed8',
    fillOpacity: 0.9,
  };
  if (!marker) {
    marker = L.circleMarker([d.lastLat, d.lastLon], style).bindTooltip(d.id);
    marker.on('click', () => drawing || select(d.id));
    marker.addTo(layers.devices);
    layers.deviceMarkers.set(d.id, marker);
  } else {
    marker.setLatLng([d.lastLat, d.lastLon]).setStyle(style);
  }
}

// ------------------------------------------------------------------ selection

async function select(id) {
  const d = devices.get(id);
  if (!d) return;
  const previous = selectedId;
  selectedId = id;
  if (previous && devices.get(previous)) placeMarker(devices.get(previous));
  placeMarker(d);
  renderDevices();
  $('detail').hidden = false;
  const row = $('device-list').querySelector('li.selected');
  if (row) row.scrollIntoView({ block: 'nearest' });
  $('detail-title').textContent = id;
  setRange(d, 'all');
  await Promise.all([loadTrack(true), loadStats(), loadPlaces(), loadEvents()]);
}

function setRange(d, which) {
  const to = d.lastMs || Date.now();
  const from = which === 'day' ? to - DAY_MS : Math.max(d.firstMs || to - DAY_MS, to - 31 * DAY_MS);
  $('from').value = toInput(Math.floor(from / 60000) * 60000);
  $('to').value = toInput(Math.ceil((to + 1) / 60000) * 60000);
}

function range() {
  return { from: fromInput($('from').value), to: fromInput($('to').value) };
}

function closeDetail() {
  const previous = selectedId;
  selectedId = null;
  track = null;
  trackRequest += 1;
  stopPlayback();
  for (const layer of [layers.track, layers.detail, layers.places, layers.events, layers.playback]) layer.clearLayers();
  playMarker = null;
  events = [];
  debug.events = null;
  debug.track = null;
  debug.detail = null;
  debug.playback = null;
  if (previous && devices.get(previous)) placeMarker(devices.get(previous));
  $('detail').hidden = true;
  renderDevices();
}

// ------------------------------------------------------------------ track

let trackRequest = 0;
let track = null;

/** The device's track in [from, to) simplified to `simplifyM` metres: segments of fixes. */
async function fetchTrack(id, from, to, simplifyM) {
  const doc = await api(
    `/v1/devices/${enc(id)}/track?format=json&from=${from}&to=${to}&simplify=${simplifyM}`,
  );
  const segments = [];
  let current = null;
  for (const refined of doc.fixes || []) {
    const fix = refined.fix || {};
    if (!Number.isFinite(fix.lat) || !Number.isFinite(fix.lon)) continue;
    const segment = refined.segment || 0;
    if (!current || current.segment !== segment) {
      current = { segment, points: [], times: [] };
      segments.push(current);
    }
    current.points.push([fix.lat, fix.lon]);
    current.times.push(int(fix.timeMs));
  }
  return segments;
}

async function loadTrack(fit) {
  const id = selectedId;
  const { from, to } = range();
  if (!Number.isFinite(from) || !Number.isFinite(to) || from >= to) {
    showError(new Error('time range: "From" must be before "To"'));
    return;
  }
  showError(null);
  const request = ++trackRequest;
  // Fitting the track changes the zoom: start coarse (at least 100 m, even when zoomed in
  // elsewhere: a long track at street-level detail is large), refine after the fit.
  const simplifyM = Math.max(100, tolerance());
  const started = performance.now();
  $('track-info').textContent = 'loading track…';
  let segments;
  try {
    segments = await fetchTrack(id, from, to, simplifyM);
  } catch (e) {
    showError(e);
    $('track-info').textContent = '';
    return;
  }
  if (request !== trackRequest) return;
  const fetched = performance.now();
  track = { id, from, to, simplifyM, segments };
  drawTrack();
  const drawn = performance.now();
  const fixes = segments.reduce((n, s) => n + s.points.length, 0);
  debug.track = {
    deviceId: id,
    from,
    to,
    segments: segments.length,
    layers: layers.track.getLayers().filter((l) => l.options.tmSegment !== undefined).length,
    fixes,
    simplifyM,
    fetchMs: Math.round(fetched - started),
    drawMs: Math.round(drawn - fetched),
  };
  $('track-info').textContent = trackInfo();
  setUpPlayback();
  // Without a last position from the list, the track's last fix stands in for it.
  const d = devices.get(id);
  if (d && !hasPosition(d) && segments.length) {
    [d.lastLat, d.lastLon] = lastTrackPoint();
    placeMarker(d);
  }
  if (fit && segments.length) {
    const bounds = L.latLngBounds(segments.flatMap((s) => s.points));
    map.fitBounds(bounds.pad(0.05), { maxZoom: 16 });
  }
  scheduleDetail();
}

function trackInfo() {
  const fixes = track.segments.reduce((n, s) => n + s.points.length, 0);
  return track.segments.length
    ? `${track.segments.length} segment${track.segments.length === 1 ? '' : 's'}, ${fixes.toLocaleString('en')} points drawn (simplified to ${track.simplifyM} m)`
    : 'no fixes in this range';
}

function drawTrack() {
  layers.track.clearLayers();
  layers.detail.clearLayers();
  debug.detail = null;
  const segments = track.segments;
  segments.forEach((s, i) => {
    const colour = SEGMENT_COLOURS[i % SEGMENT_COLOURS.length];
    const label = `segment ${s.segment}: ${utc(s.times[0])} – ${utc(s.times[s.times.length - 1])} UTC`;
    const layer =
      s.points.length === 1
        ? L.circleMarker(s.points[0], { radius: 4, color: colour, fillOpacity: 1, tmSegment: s.segment })
        : L.polyline(s.points, { color: colour, weight: 3, opacity: 0.9, tmSegment: s.segment });
    layer.bindTooltip(label, { sticky: true }).addTo(layers.track);
  });
  if (segments.length) {
    const first = segments[0];
    const last = segments[segments.length - 1];
    endpoint(first.points[0], '#16a34a', `start ${utc(first.times[0])} UTC`);
    endpoint(last.points[last.points.length - 1], '#111827', `end ${utc(last.times[last.times.length - 1])} UTC`);
  }
}

function endpoint(latLng, colour, label) {
  L.circleMarker(latLng, { radius: 7, color: '#fff', weight: 2, fillColor: colour, fillOpacity: 1 })
    .bindTooltip(label)
    .addTo(layers.track);
}

// Zoomed in beyond what the loaded track resolves: fetch the part in view at the finer tolerance.
let detailTimer = null;
function scheduleDetail() {
  clearTimeout(detailTimer);
  detailTimer = setTimeout(loadDetail, 250);
}

async function loadDetail() {
  if (!track || !track.segments.length) return;
  const fine = tolerance();
  const have = debug.detail && debug.detail.simplifyM <= fine * 2 && debug.detail.bounds.contains(map.getBounds());
  if (fine * 2 > track.simplifyM || have) {
    if (fine * 2 > track.simplifyM && debug.detail) {
      layers.detail.clearLayers();
      debug.detail = null;
      layers.track.eachLayer((l) => l.setStyle && l.setStyle({ opacity: 0.9 }));
    }
    return;
  }
  const view = map.getBounds().pad(0.5);
  let from = Infinity;
  let to = -Infinity;
  // The loaded lines that cross the view: the fixes simplification dropped lie between their ends.
  for (const s of track.segments) {
    for (let i = 0; i < s.points.length; i += 1) {
      const j = Math.min(i + 1, s.points.length - 1);
      if (view.intersects(L.latLngBounds(s.points[i], s.points[j]))) {
        from = Math.min(from, s.times[i]);
        to = Math.max(to, s.times[j] + 1);
      }
    }
  }
  if (!Number.isFinite(from)) return;
  const request = ++trackRequest;
  const id = track.id;
  try {
    const segments = await fetchTrack(id, Math.max(from, track.from), Math.min(to, track.to), fine);
    if (request !== trackRequest || !track || track.id !== id) return;
    const { start, end } = trackTimes();
    if (from <= start && to > end) {
      // The whole track is in view: the finer one replaces it (same segments, more points).
      track = { ...track, simplifyM: fine, segments };
      const slider = $('slider').value;
      drawTrack();
      debug.track = {
        ...debug.track,
        segments: segments.length,
        layers: layers.track.getLayers().filter((l) => l.options.tmSegment !== undefined).length,
        fixes: segments.reduce((n, s) => n + s.points.length, 0),
        simplifyM: fine,
      };
      $('track-info').textContent = trackInfo();
      if (playMarker) {
        layers.playback.clearLayers();
        playMarker = null;
        moveTo(slider);
      }
      return;
    }
    layers.detail.clearLayers();
    layers.track.eachLayer((l) => l.options.tmSegment !== undefined && l.setStyle({ opacity: 0.35 }));
    const colourOf = new Map(track.segments.map((s, i) => [s.segment, SEGMENT_COLOURS[i % SEGMENT_COLOURS.length]]));
    for (const s of segments) {
      if (s.points.length > 1) {
        L.polyline(s.points, { color: colourOf.get(s.segment) || '#2563eb', weight: 3 }).addTo(layers.detail);
      }
    }
    debug.detail = {
      simplifyM: fine,
      from,
      to,
      fixes: segments.reduce((n, s) => n + s.points.length, 0),
      bounds: view,
    };
  } catch (e) {
    showError(e);
  }
}

// ------------------------------------------------------------------ playback

let playTimer = null;
let playMarker = null;

function setUpPlayback() {
  stopPlayback();
  layers.playback.clearLayers();
  playMarker = null;
  debug.playback = null;
  const has = track && track.segments.some((s) => s.points.length);
  $('playback').hidden = !has;
  if (!has) return;
  $('slider').value = 0;
  moveTo(0);
}

function trackTimes() {
  const segments = track.segments;
  return { start: segments[0].times[0], end: segments[segments.length - 1].times.at(-1) };
}

/** Where the device was at slider position `value` (0..1000): interpolated between fixes. */
function moveTo(value) {
  const { start, end } = trackTimes();
  const t = start + ((end - start) * value) / 1000;
  let position = null;
  for (const s of track.segments) {
    if (t > s.times.at(-1)) {
      position = s.points.at(-1);
      continue;
    }
    if (t <= s.times[0]) {
      position = position || s.points[0];
      break;
    }
    let lo = 0;
    let hi = s.times.length - 1;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (s.times[mid] <= t) lo = mid;
      else hi = mid;
    }
    const span = s.times[hi] - s.times[lo] || 1;
    const f = (t - s.times[lo]) / span;
    const [a, b] = [s.points[lo], s.points[hi]];
    position = [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f];
    break;
  }
  if (!playMarker) {
    playMarker = L.circleMarker(position, {
      radius: 9,
      color: '#111827',
      weight: 3,
      fillColor: '#facc15',
      fillOpacity: 1,
    }).addTo(layers.playback);
  } else {
    playMarker.setLatLng(position);
  }
  $('play-time').textContent = `${utc(t)} UTC`;
  debug.playback = { value: Number(value), timeMs: Math.round(t), lat: position[0], lon: position[1] };
}

function stopPlayback() {
  clearInterval(playTimer);
  playTimer = null;
  $('play').textContent = '▶';
}

function togglePlayback() {
  if (playTimer) {
    stopPlayback();
    return;
  }
  const slider = $('slider');
  if (Number(slider.value) >= 1000) slider.value = 0;
  $('play').textContent = '❚❚';
  // The whole range in about 20 s.
  playTimer = setInterval(() => {
    const value = Math.min(1000, Number(slider.value) + 2);
    slider.value = value;
    moveTo(value);
    if (value >= 1000) stopPlayback();
  }, 40);
}

// ------------------------------------------------------------------ stats, places, predictions

async function loadStats() {
  const id = selectedId;
  const { from, to } = range();
  const table = $('stats');
  try {
    const { days = [] } = await api(`/v1/devices/${enc(id)}/stats?from=${from}&to=${to}`);
    if (id !== selectedId) return;
    const rows = days
      .slice(-14)
      .reverse()
      .map(
        (d) =>
          `<tr><td>${escapeHtml(d.day)}</td><td>${int(d.fixes).toLocaleString('en')}</td><td>${km(d.distanceM)}</td><td>${Number(d.maxSpeedKmh || 0).toFixed(0)} km/h</td></tr>`,
      );
    table.innerHTML = days.length
      ? `<tr><th>Day (UTC)</th><th>Fixes</th><th>Distance</th><th>Max speed</th></tr>${rows.join('')}`
      : '<tr><td class="muted">no stats in this range</td></tr>';
  } catch (e) {
    showError(e);
  }
}

async function loadPlaces() {
  const id = selectedId;
  layers.places.clearLayers();
  debug.places = 0;
  debug.predictions = 0;
  $('places').innerHTML = '';
  $('predictions').innerHTML = '';
  let places = [];
  let predictions = [];
  try {
    [{ places = [] }, { predictions = [] }] = await Promise.all([
      api(`/v1/devices/${enc(id)}/places?k=20`),
      api(`/v1/devices/${enc(id)}/predict?k=3`),
    ]);
  } catch (e) {
    showError(e);
    return;
  }
  if (id !== selectedId) return;
  for (const p of places) {
    const dwellH = int(p.totalDwellMs) / 3600000;
    const label = labelOf(p);
    const labelled = Boolean(label);
    const circle = L.circleMarker([p.lat, p.lon], {
      radius: Math.min(28, 6 + 4 * Math.sqrt(dwellH)),
      color: labelled ? '#b45309' : '#7c3aed',
      weight: 2,
      fillOpacity: 0.25,
      tmPlace: p.placeId,
    }).bindPopup(
      `<b>Place ${escapeHtml(p.placeId)}</b>${labelled ? ` (${label})` : ''}<br>${p.visits} visits, ${hours(p.totalDwellMs)} dwell<br>last ${utc(int(p.lastVisitMs))} UTC`,
    );
    if (labelled) {
      circle.bindTooltip(label, { permanent: true, direction: 'top', className: 'tm-label' });
    }
    circle.addTo(layers.places);
  }
  debug.places = places.length;
  $('places').innerHTML = places.length
    ? places
        .map(
          (p) =>
            `<li>${labelOf(p) ? `<b>${labelOf(p)}</b> ` : ''}place ${escapeHtml(p.placeId)}: ${p.visits} visits, ${hours(p.totalDwellMs)}</li>`,
        )
        .join('')
    : '<li class="muted">none learned yet (stays of 20 min or more)</li>';

  const d = devices.get(id);
  const here = d && hasPosition(d) ? [d.lastLat, d.lastLon] : lastTrackPoint();
  for (const prediction of predictions) {
    const p = prediction.place;
    if (!p || !here) continue;
    const probability = `${Math.round(Number(prediction.probability || 0) * 100)}%`;
    L.polyline([here, [p.lat, p.lon]], { color: '#7c3aed', weight: 2, dashArray: '6 6', tmPrediction: p.placeId })
      .bindTooltip(`next: place ${escapeHtml(p.placeId)} ${probability}`, { sticky: true })
      .addTo(layers.places);
    arrowHead(here, [p.lat, p.lon], probability);
  }
  debug.predictions = predictions.length;
  $('predictions').innerHTML = predictions.length
    ? predictions
        .map(
          (x) =>
            `<li>place ${escapeHtml(x.place?.placeId ?? '?')}${labelOf(x.place) ? ` (${labelOf(x.place)})` : ''}: ${Math.round(Number(x.probability || 0) * 100)}%</li>`,
        )
        .join('')
    : '<li class="muted">no prediction yet</li>';
}

function lastTrackPoint() {
  const s = track && track.segments.at(-1);
  return s ? s.points.at(-1) : null;
}

/** An arrowhead near `to` pointing away from `from`, labelled with the probability. */
function arrowHead(from, to, label) {
  if (!map) return;
  const a = map.latLngToLayerPoint(from);
  const b = map.latLngToLayerPoint(to);
  const angle = (Math.atan2(b.y - a.y, b.x - a.x) * 180) / Math.PI;
  const at = [from[0] + (to[0] - from[0]) * 0.85, from[1] + (to[1] - from[1]) * 0.85];
  L.marker(at, {
    interactive: false,
    icon: L.divIcon({
      className: 'tm-arrow',
      html: `<div style="transform: rotate(${angle.toFixed(0)}deg)">➤</div>`,
      iconSize: [18, 18],
    }),
  })
    .bindTooltip(label, { permanent: true, direction: 'right', className: 'tm-prob', offset: [8, 0] })
    .addTo(layers.places);
}

// ------------------------------------------------------------------ live

function setLive(status, text) {
  debug.live.status = status;
  const badge = $('live-status');
  badge.textContent = text;
  badge.className = `badge ${status === 'on' ? 'on' : status === 'connecting' ? '' : 'off'}`;
}

function stopLive() {
  if (live) {
    clearTimeout(live.retry);
    if (live.source) live.source.close();
  }
  live = null;
}

async function startLive() {
  stopLive();
  // lastId: the resume token of the last event, so that a new stream (new token) goes on from there.
  const session = { source: null, retry: null, failures: 0, lastId: '' };
  live = session;
  connectLive(session);
}

async function connectLive(session) {
  if (live !== session || !apiKey) return;
  setLive('connecting', 'live: connecting');
  let token;
  try {
    const response = await fetch('/v1/live/token', { method: 'POST', headers: { 'x-api-key': apiKey } });
    if (response.status === 404 || response.status === 405 || response.status === 501) {
      setLive('unavailable', 'live updates unavailable');
      return;
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try {
        message = (await response.json()).message || message;
      } catch (_) {
        // not our JSON error
      }
      throw new Error(message);
    }
    token = (await response.json()).token;
  } catch (e) {
    retryLive(session, `live: ${e.message}`);
    return;
  }
  if (live !== session) return;
  // A resume token that keeps failing (too old to resume from) is dropped: live from now on.
  const resume = session.lastId && session.failures < 3 ? `&resume_token=${enc(session.lastId)}` : '';
  const source = new EventSource(`/v1/live?token=${enc(token)}${resume}`);
  session.source = source;
  source.onopen = () => {
    session.failures = 0;
    setLive('on', 'live');
  };
  source.onmessage = (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (_) {
      return;
    }
    if (event.lastEventId) session.lastId = event.lastEventId;
    if (message.fix) onLiveFix(message.fix);
    else if (message.event) onLiveEvent(message.event);
    else if (message.lag) {
      // Fixes were skipped: the list catches up from the API.
      loadDevices().catch(showError);
    }
  };
  source.onerror = () => {
    // EventSource retries by itself (with Last-Event-ID) while CONNECTING; CLOSED means the
    // server refused it, e.g. an expired token: get a new one.
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      retryLive(session, 'live: reconnecting');
    } else {
      setLive('connecting', 'live: reconnecting');
    }
  };
}

function retryLive(session, text) {
  if (live !== session) return;
  setLive('connecting', text);
  session.failures += 1;
  const delay = Math.min(30000, 1000 * 2 ** Math.min(session.failures, 5));
  session.retry = setTimeout(async () => {
    // Without a resume token, fixes may have been missed while disconnected.
    if (!session.lastId) await loadDevices().catch(() => {});
    connectLive(session);
  }, delay);
}

function onLiveFix(refined) {
  const fix = refined.fix || {};
  const id = fix.deviceId;
  if (!id || !Number.isFinite(fix.lat) || !Number.isFinite(fix.lon)) return;
  const timeMs = int(fix.timeMs);
  let d = devices.get(id);
  if (!d) {
    d = { id, fixes: 0, lastMs: 0, firstMs: timeMs, distanceM: 0, fixesToday: 0, distanceTodayM: 0, lastLat: null, lastLon: null };
    devices.set(id, d);
    debug.devices = devices.size;
  }
  d.fixes += 1;
  d.distanceM += Number(refined.distanceM || 0);
  // Today as storage counts days: UTC.
  if (Math.floor(timeMs / 86400000) === Math.floor(Date.now() / 86400000)) {
    d.fixesToday += 1;
    d.distanceTodayM += Number(refined.distanceM || 0);
  }
  if (timeMs >= d.lastMs) {
    d.lastMs = timeMs;
    d.lastLat = fix.lat;
    d.lastLon = fix.lon;
  }
  d.fresh = true;
  placeMarker(d);
  debug.markers = layers.deviceMarkers ? layers.deviceMarkers.size : 0;
  debug.live.fixes += 1;
  debug.live.last = { deviceId: id, timeMs, lat: fix.lat, lon: fix.lon, receivedMs: Date.now() };
  queueRender();
}

// ------------------------------------------------------------------ geofences

/** A fence's outline as Leaflet rings ([lat, lon], open), or null when it is not a Polygon. */
function polygonRings(fence) {
  try {
    const geometry = JSON.parse(fence.polygonGeojson);
    if (geometry.type !== 'Polygon') return null;
    return geometry.coordinates.map((ring) => ring.slice(0, -1).map(([lon, lat]) => [lat, lon]));
  } catch (_) {
    return null;
  }
}

function describeFence(f) {
  if (f.circle) return `circle, ${Math.round(f.circle.radiusM).toLocaleString('en')} m radius`;
  const rings = polygonRings(f);
  return rings ? `polygon, ${rings[0].length} vertices${rings.length > 1 ? `, ${rings.length - 1} hole(s)` : ''}` : 'polygon';
}

const fenceName = (id) => (fences.has(id) ? fences.get(id).name : '(deleted fence)');

async function loadFences() {
  try {
    const { geofences = [] } = await api('/v1/geofences');
    if (!apiKey) return;
    fences = new Map(geofences.map((f) => [f.geofenceId, f]));
  } catch (e) {
    showError(e);
    return;
  }
  renderFences();
  if (events.length) renderEvents();
}

function renderFences() {
  const sorted = [...fences.values()].sort((a, b) => a.name.localeCompare(b.name) || a.geofenceId.localeCompare(b.geofenceId));
  $('fence-count').textContent = fences.size ? `(${fences.size})` : '';
  $('fence-list').innerHTML = sorted.length
    ? sorted
        .map(
          (f) =>
            `<li data-fence="${escapeHtml(f.geofenceId)}" title="Show on the map"><span class="name">${escapeHtml(f.name)}</span><span class="muted">${describeFence(f)}${f.deviceIds.length ? `, ${f.deviceIds.length} device(s)` : ''}</span></li>`,
        )
        .join('')
    : '<li class="muted">none: draw one with ◯ Circle or ⬠ Polygon</li>';
  debug.fences.count = fences.size;
  if (!layers.fences) return;
  layers.fences.clearLayers();
  layers.fenceById = new Map();
  for (const f of sorted) {
    const style = { color: '#0f766e', weight: 2, fillColor: '#14b8a6', fillOpacity: 0.12, tmFence: f.geofenceId };
    const rings = f.circle ? null : polygonRings(f);
    let layer;
    if (f.circle) layer = L.circle([f.circle.lat, f.circle.lon], { ...style, radius: f.circle.radiusM });
    else if (rings) layer = L.polygon(rings, style);
    else continue;
    // The name above the fence, not over its centre (where events often are).
    const top = f.circle
      ? [f.circle.lat + f.circle.radiusM / 111320, f.circle.lon]
      : rings[0].reduce((a, b) => (b[0] > a[0] ? b : a));
    L.tooltip({ permanent: true, direction: 'top', className: 'tm-fence-label', interactive: false })
      .setLatLng(top)
      .setContent(escapeHtml(f.name))
      .addTo(layers.fences);
    // Not bindPopup: a click while drawing is a vertex, not a request for the popup.
    layer.on('click', (e) => drawing || showFence(f.geofenceId, false, e.latlng));
    layer.addTo(layers.fences);
    layers.fenceById.set(f.geofenceId, layer);
  }
  debug.fences.layers = layers.fenceById.size;
}

/** Opens fence `id`'s popup (name, shape, devices, Delete), zooming to it when `fit`. */
function showFence(id, fit, at) {
  const f = fences.get(id);
  const layer = layers.fenceById && layers.fenceById.get(id);
  if (!f || !layer || drawing) return;
  if (fit) map.fitBounds(layer.getBounds().pad(0.3), { maxZoom: 16 });
  const div = document.createElement('div');
  div.innerHTML = `<b>${escapeHtml(f.name)}</b><br>${describeFence(f)}<br>${
    f.deviceIds.length ? `devices: ${f.deviceIds.map(escapeHtml).join(', ')}` : 'every device'
  }<br><span class="muted">${escapeHtml(f.geofenceId)}, created ${utc(int(f.createdMs))} UTC</span><br>`;
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'danger';
  button.textContent = 'Delete fence';
  button.dataset.fence = id;
  button.addEventListener('click', () => deleteFence(id, button));
  div.append(button);
  L.popup().setLatLng(at || layer.getBounds().getCenter()).setContent(div).openOn(map);
}

async function deleteFence(id, button) {
  button.disabled = true;
  button.textContent = 'deleting…';
  try {
    await api(`/v1/geofences/${enc(id)}`, { method: 'DELETE' });
  } catch (e) {
    button.disabled = false;
    button.textContent = 'Delete fence';
    fenceError(e);
    return;
  }
  map.closePopup();
  fences.delete(id);
  renderFences();
  loadFences();
}

function fenceError(error) {
  const p = $('fence-error');
  if (!error) {
    p.hidden = true;
    return;
  }
  const text = error instanceof ApiError ? `${error.code}: ${error.message}` : String(error.message || error);
  debug.errors.push(text);
  p.textContent = text;
  p.hidden = false;
}

function drawHint(text) {
  $('draw-hint').textContent = text || '';
  $('draw-hint').hidden = !text;
}

function startDrawing(kind) {
  const again = debug.fences.drawing === kind;
  cancelDraft();
  // The active tool's button again: off.
  if (again || !map) return;
  map.closePopup();
  fenceError(null);
  debug.fences.drawing = kind;
  $(`draw-${kind}`).classList.add('active');
  drawing = draw(
    map,
    kind,
    (shape) => {
      drawing = null;
      debug.fences.drawing = null;
      $(`draw-${kind}`).classList.remove('active');
      drawHint('');
      if (shape) showDraft(shape);
    },
    drawHint,
  );
}

/** The shape just drawn, dashed on the map, waiting for a name. */
function showDraft(shape) {
  draft = shape;
  debug.fences.draft = shape;
  const style = { color: '#0f766e', weight: 2, dashArray: '5 5', fillOpacity: 0.2, interactive: false };
  layers.draft.clearLayers();
  if (shape.kind === 'circle') L.circle([shape.lat, shape.lon], { ...style, radius: shape.radiusM }).addTo(layers.draft);
  else L.polygon(shape.ring, style).addTo(layers.draft);
  $('fence-form').hidden = false;
  drawHint(
    shape.kind === 'circle'
      ? `New circle, ${shape.radiusM.toLocaleString('en')} m radius: name it and save.`
      : `New polygon, ${shape.ring.length} vertices: name it and save.`,
  );
  $('fence-name').focus();
}

function cancelDraft() {
  if (drawing) drawing();
  drawing = null;
  draft = null;
  debug.fences.drawing = null;
  debug.fences.draft = null;
  for (const kind of ['circle', 'polygon']) $(`draw-${kind}`).classList.remove('active');
  if (layers.draft) layers.draft.clearLayers();
  $('fence-form').hidden = true;
  $('fence-name').value = '';
  drawHint('');
  fenceError(null);
}

async function saveDraft() {
  if (!draft || debug.fences.saving) return;
  const name = $('fence-name').value.trim();
  const body = { name };
  if (draft.kind === 'circle') {
    body.circle = { lat: draft.lat, lon: draft.lon, radiusM: draft.radiusM };
  } else {
    // GeoJSON: [lon, lat], the ring closed.
    const ring = [...draft.ring, draft.ring[0]].map(([lat, lon]) => [lon, lat]);
    body.polygonGeojson = { type: 'Polygon', coordinates: [ring] };
  }
  const save = $('fence-save');
  save.disabled = true;
  save.textContent = 'saving…';
  debug.fences.saving = true;
  fenceError(null);
  try {
    // Answers once every learning replica applies the fence (about 2 s).
    const created = await api('/v1/geofences', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    fences.set(created.geofenceId, created);
    cancelDraft();
    renderFences();
    loadFences();
  } catch (e) {
    // The draft stays: rename it, or cancel and draw again.
    fenceError(e);
  } finally {
    save.disabled = false;
    save.textContent = 'Save';
    debug.fences.saving = false;
  }
}

// ------------------------------------------------------------------ events

async function loadEvents() {
  const id = selectedId;
  const { from, to } = range();
  if (!id || !Number.isFinite(from) || !Number.isFinite(to) || from >= to) return;
  try {
    const { events: list = [] } = await api(`/v1/events?device_id=${enc(id)}&from_ms=${from}&to_ms=${to}`);
    if (id !== selectedId) return;
    events = list;
    debug.eventsFetched = {
      deviceId: id,
      count: list.length,
      types: list.map((e) => e.type),
      fences: list.map((e) => e.geofenceId || null),
      atMs: Date.now(),
    };
  } catch (e) {
    showError(e);
    return;
  }
  renderEvents();
}

function eventWhat(e) {
  if (e.geofenceId) return fenceName(e.geofenceId);
  return e.placeId !== undefined ? `place ${e.placeId}` : '';
}

function renderEvents() {
  const now = Date.now();
  const fresh = (e) => e.freshUntil && e.freshUntil > now;
  const newest = events
    .map((e, i) => [e, i])
    .slice(-MAX_EVENT_ROWS)
    .reverse();
  $('events').innerHTML = newest.length
    ? newest
        .map(
          ([e, i]) =>
            `<li data-index="${i}" data-type="${escapeHtml(e.type)}" class="${fresh(e) ? 'fresh' : ''}" title="${escapeHtml(e.geofenceId || '')}"><span class="type" style="color:${EVENT_COLOURS[e.type] || '#1d2430'}">${escapeHtml(e.type)}</span><span class="what">${escapeHtml(eventWhat(e))}</span><span class="muted">${utcSeconds(int(e.timeMs))}</span></li>`,
        )
        .join('')
    : '<li class="muted">no geofence or place events in this range</li>';
  $('event-count').textContent = events.length
    ? `(${events.length}${events.length > MAX_EVENT_ROWS ? `, newest ${MAX_EVENT_ROWS} listed` : ''})`
    : '';
  if (!layers.events) return;
  layers.events.clearLayers();
  for (const e of events.slice(-MAX_EVENT_MARKERS)) {
    if (!Number.isFinite(e.lat) || !Number.isFinite(e.lon)) continue;
    L.circleMarker([e.lat, e.lon], {
      radius: fresh(e) ? 10 : 5,
      color: fresh(e) ? '#facc15' : '#fff',
      weight: fresh(e) ? 3 : 1,
      fillColor: EVENT_COLOURS[e.type] || '#1d2430',
      fillOpacity: 1,
      tmEvent: e.type,
    })
      .bindTooltip(`${escapeHtml(e.type)} ${escapeHtml(eventWhat(e))}<br>${utcSeconds(int(e.timeMs))} UTC`)
      .addTo(layers.events);
  }
  debug.events = {
    deviceId: selectedId,
    count: events.length,
    types: events.map((e) => e.type),
    fences: events.map((e) => e.geofenceId || null),
    rows: newest.length,
    markers: layers.events.getLayers().length,
  };
}

const sameEvent = (a, b) =>
  a.type === b.type && a.timeMs === b.timeMs && a.geofenceId === b.geofenceId && a.placeId === b.placeId;

function onLiveEvent(e) {
  debug.live.events += 1;
  debug.live.lastEvent = { type: e.type, deviceId: e.deviceId, geofenceId: e.geofenceId, timeMs: int(e.timeMs), receivedMs: Date.now() };
  // The fence it concerns flashes, whichever device it is.
  const layer = e.geofenceId && layers.fenceById && layers.fenceById.get(e.geofenceId);
  if (layer) {
    layer.setStyle({ color: EVENT_COLOURS[e.type] || '#0f766e', weight: 4 });
    setTimeout(() => layer.setStyle({ color: '#0f766e', weight: 2 }), FRESH_MS);
  }
  if (e.deviceId !== selectedId || events.some((x) => sameEvent(x, e))) return;
  e.freshUntil = Date.now() + FRESH_MS;
  events.push(e);
  events.sort((a, b) => int(a.timeMs) - int(b.timeMs));
  renderEvents();
  setTimeout(renderEvents, FRESH_MS + 100);
}

// ------------------------------------------------------------------ wiring

function wire() {
  $('login-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const key = $('key-input').value.trim();
    if (key) login(key);
  });
  $('logout').addEventListener('click', () => logout());
  $('fit-fleet').addEventListener('click', fitFleet);
  $('close-detail').addEventListener('click', closeDetail);
  $('search').addEventListener('input', renderDevices);
  $('sort').addEventListener('change', renderDevices);
  $('device-list').addEventListener('click', (event) => {
    const li = event.target.closest('li[data-id]');
    if (li) select(li.dataset.id);
  });
  $('show-track').addEventListener('click', () => {
    loadTrack(true);
    loadStats();
    loadEvents();
  });
  $('range-day').addEventListener('click', () => {
    const d = devices.get(selectedId);
    if (d) {
      setRange(d, 'day');
      loadTrack(true);
      loadStats();
      loadEvents();
    }
  });
  $('range-all').addEventListener('click', () => {
    const d = devices.get(selectedId);
    if (d) {
      setRange(d, 'all');
      loadTrack(true);
      loadStats();
      loadEvents();
    }
  });
  $('slider').addEventListener('input', (event) => {
    stopPlayback();
    moveTo(event.target.value);
  });
  $('play').addEventListener('click', togglePlayback);
  $('draw-circle').addEventListener('click', () => startDrawing('circle'));
  $('draw-polygon').addEventListener('click', () => startDrawing('polygon'));
  $('fence-form').addEventListener('submit', (event) => {
    event.preventDefault();
    saveDraft();
  });
  $('fence-cancel').addEventListener('click', cancelDraft);
  $('fence-list').addEventListener('click', (event) => {
    const li = event.target.closest('li[data-fence]');
    if (li) showFence(li.dataset.fence, true);
  });
  $('events').addEventListener('click', (event) => {
    const li = event.target.closest('li[data-index]');
    const e = li && events[Number(li.dataset.index)];
    if (e && map) map.setView([e.lat, e.lon], Math.max(map.getZoom(), 14));
  });
  // "last seen … ago" stays current.
  setInterval(() => debug.loggedIn && queueRender(), 30000);
}

function start() {
  wire();
  // /#key=<api key> logs in without typing; the key leaves the address bar (and history) at once.
  const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(KEY_STORAGE, decodeURIComponent(match[1]));
    history.replaceState(null, '', location.pathname + location.search);
  }
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) login(key);
  else showLogin();
}

start();
