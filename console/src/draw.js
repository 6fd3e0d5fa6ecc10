// Drawing a geofence on the map with plain Leaflet mouse events (no plugin):
// circle: press at the centre and drag, or click the centre then click the edge;
// polygon: click the vertices, then click the first one or double-click to close.
// Escape cancels either.
import L from 'leaflet';

const STYLE = { color: '#0f766e', weight: 2, dashArray: '5 5', fillOpacity: 0.15, interactive: false };
// Screen distance under which two clicks are the same point (a double-click's second click,
// a click on the first vertex that closes the ring).
const SAME_PX = 8;

/**
 * Starts drawing a `kind` ('circle' or 'polygon') on `map`; calls `done(shape)` once with
 * `{ kind: 'circle', lat, lon, radiusM }` or `{ kind: 'polygon', ring: [[lat, lon], …] }`
 * (open ring, 3+ vertices), or `done(null)` when cancelled. Returns a function that cancels.
 */
export function draw(map, kind, done, hint) {
  const layer = L.layerGroup().addTo(map);
  const container = map.getContainer();
  const dragging = map.dragging.enabled();
  const dblclickZoom = map.doubleClickZoom.enabled();
  container.classList.add('tm-drawing');
  map.doubleClickZoom.disable();
  // A circle is drawn by dragging, so the map must not pan meanwhile; a polygon tool keeps
  // panning (Leaflet sends no click after a drag).
  if (kind === 'circle') map.dragging.disable();

  let finished = false;
  const handlers = {};
  function finish(shape) {
    if (finished) return;
    finished = true;
    for (const [name, fn] of Object.entries(handlers)) map.off(name, fn);
    document.removeEventListener('keydown', onKey);
    container.classList.remove('tm-drawing');
    if (dragging) map.dragging.enable();
    if (dblclickZoom) map.doubleClickZoom.enable();
    layer.remove();
    done(shape);
  }
  function onKey(event) {
    if (event.key === 'Escape') finish(null);
  }
  document.addEventListener('keydown', onKey);

  if (kind === 'circle') {
    let centre = null;
    let downAt = null;
    let circle = null;
    hint('Circle: press at the centre and drag to the edge (or click the centre, then the edge). Esc cancels.');
    const radiusTo = (latlng) => Math.max(1, Math.round(map.distance(centre, latlng)));
    handlers.mousedown = (e) => {
      if (!centre) {
        centre = e.latlng;
        downAt = e.containerPoint;
        circle = L.circle(centre, { ...STYLE, radius: 1 }).addTo(layer);
        hint('Circle: move to the edge and click (or release the drag). Esc cancels.');
      } else {
        finish({ kind: 'circle', lat: centre.lat, lon: centre.lng, radiusM: radiusTo(e.latlng) });
      }
    };
    handlers.mousemove = (e) => {
      if (circle) circle.setRadius(radiusTo(e.latlng));
    };
    handlers.mouseup = (e) => {
      // Released away from where it was pressed: a drag, its end is the edge.
      if (centre && downAt && e.containerPoint.distanceTo(downAt) > SAME_PX) {
        finish({ kind: 'circle', lat: centre.lat, lon: centre.lng, radiusM: radiusTo(e.latlng) });
      }
      downAt = null;
    };
  } else {
    const ring = [];
    const line = L.polyline([], STYLE).addTo(layer);
    const rubber = L.polyline([], { ...STYLE, opacity: 0.6 }).addTo(layer);
    hint('Polygon: click each vertex; click the first one or double-click to close. Esc cancels.');
    const px = (latlng) => map.latLngToContainerPoint(latlng);
    const close = () => {
      if (ring.length >= 3) finish({ kind: 'polygon', ring: ring.map((p) => [p.lat, p.lng]) });
    };
    handlers.click = (e) => {
      if (ring.length >= 3 && px(ring[0]).distanceTo(e.containerPoint) <= SAME_PX) {
        close();
        return;
      }
      // A double-click's clicks land on the last vertex: no new vertex.
      if (ring.length && px(ring.at(-1)).distanceTo(e.containerPoint) <= SAME_PX) return;
      ring.push(e.latlng);
      line.setLatLngs(ring);
      if (ring.length === 1) L.circleMarker(e.latlng, { ...STYLE, radius: 5, dashArray: null, fillOpacity: 1 }).addTo(layer);
    };
    handlers.mousemove = (e) => {
      if (ring.length) rubber.setLatLngs([ring.at(-1), e.latlng, ring[0]]);
    };
    handlers.dblclick = close;
  }
  for (const [name, fn] of Object.entries(handlers)) map.on(name, fn);
  return () => finish(null);
}
