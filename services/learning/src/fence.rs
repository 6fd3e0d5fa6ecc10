//! Geofences, no I/O: validation of a tenant's fences, where a fix lies relative to one
//! (inside, outside, or straddling the boundary given its accuracy), and per-device ENTER/EXIT
//! evaluation with dwell and hysteresis over an R-tree of the tenant's fences.
//!
//! Circles are measured with haversine distances. Polygons are GeoJSON rings in [lon, lat]
//! degrees taken as a plane (even-odd ray casting, holes included); the distance from a fix to
//! their edges is measured in local equirectangular metres around the fix, which is what the
//! straddling test needs at accuracy scales. Polygons may not cross the antimeridian.

use std::f64::consts::PI;

use rstar::{
    AABB, RTree,
    primitives::{GeomWithData, Rectangle},
};
use serde_json::Value;
use trackmesh_shared::{
    domain::{DeviceId, Fix, Invalid},
    event_messages::{Event, EventType, Geofence},
    geo,
};

/// Longest fence name, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Largest circle radius, metres.
pub const MAX_RADIUS_M: f64 = 1_000_000.0;
/// Most polygon vertices, all rings together (a ring's closing position is not counted).
pub const MAX_VERTICES: usize = 1_000;
/// Most devices in a fence's filter.
pub const MAX_DEVICE_IDS: usize = 1_000;
/// Longest `polygon_geojson`: 1 000 vertices in full precision with generous whitespace fit,
/// and the parser never sees megabytes.
pub const MAX_POLYGON_BYTES: usize = 256 * 1024;

/// Metres per degree of latitude (and of longitude at the equator) on `geo`'s sphere.
const M_PER_DEG: f64 = geo::EARTH_RADIUS_M * PI / 180.0;

/// Where a fix is relative to a fence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    Inside,
    Outside,
    /// The fix's accuracy circle crosses the boundary: it may be on either side.
    Straddling,
}

/// An axis-aligned box in degrees, `[lon, lat]` corners.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bbox {
    min: [f64; 2],
    max: [f64; 2],
}

impl Bbox {
    fn intersects(&self, other: &Bbox) -> bool {
        self.min[0] <= other.max[0]
            && other.min[0] <= self.max[0]
            && self.min[1] <= other.max[1]
            && other.min[1] <= self.max[1]
    }
}

/// A box holding every point within `radius_m` of (`lat`, `lon`), both by great-circle
/// distance and by the local equirectangular distance `locate` uses for polygons. A disc over
/// a pole or across the antimeridian gets the whole longitude range: rare, and only costlier.
fn disc_bbox(lat: f64, lon: f64, radius_m: f64) -> Bbox {
    // A hair of margin so that rounding never drops a fence at exactly the distance.
    let r = radius_m * (1.0 + 1e-9) + 1e-6;
    let dlat = r / M_PER_DEG;
    let (min_lat, max_lat) = (lat - dlat, lat + dlat);
    let world_wide = |min_lat: f64, max_lat: f64| Bbox {
        min: [-180.0, min_lat.max(-90.0)],
        max: [180.0, max_lat.min(90.0)],
    };
    if !dlat.is_finite() || dlat >= 90.0 || min_lat <= -90.0 || max_lat >= 90.0 {
        return world_wide(min_lat, max_lat);
    }
    let cos_lat = lat.to_radians().cos();
    // The widest longitude of a spherical cap of angular radius δ at latitude φ is
    // asin(sin δ / cos φ) (the cap holds no pole here); the equirectangular one is δ / cos φ.
    let s = (r / geo::EARTH_RADIUS_M).sin() / cos_lat;
    if s.is_nan() || s >= 1.0 {
        return world_wide(min_lat, max_lat);
    }
    let dlon = s.asin().to_degrees().max(dlat / cos_lat);
    if lon - dlon < -180.0 || lon + dlon > 180.0 {
        return world_wide(min_lat, max_lat);
    }
    Bbox {
        min: [lon - dlon, min_lat],
        max: [lon + dlon, max_lat],
    }
}

/// The radius of a fix's accuracy circle; 0 (a point) when unknown or not positive.
fn accuracy_radius(accuracy_m: Option<f32>) -> f64 {
    match accuracy_m {
        Some(a) if a > 0.0 => f64::from(a),
        _ => 0.0,
    }
}

#[derive(Clone, Debug)]
enum Shape {
    Circle {
        lat: f64,
        lon: f64,
        radius_m: f64,
    },
    /// Closed rings of `[lon, lat]`, the outer one first; no consecutive repeated positions.
    Polygon {
        rings: Vec<Vec<[f64; 2]>>,
    },
}

/// A validated geofence, ready to evaluate.
#[derive(Clone, Debug)]
pub struct Fence {
    pub id: String,
    pub name: String,
    shape: Shape,
    bbox: Bbox,
    /// Sorted and unique; empty: every device.
    devices: Vec<String>,
}

impl Fence {
    /// Validates a `Geofence`. The error names the field (`name`, `circle`,
    /// `circle.lat`, `circle.lon`, `circle.radius_m`, `polygon_geojson`, `device_ids`) and the
    /// rule it breaks. The id is taken as it is (the caller assigns it).
    pub fn new(geofence: &Geofence) -> Result<Fence, Invalid> {
        if geofence.name.chars().count() > MAX_NAME_CHARS {
            return Err(Invalid::new(
                "name",
                format!("longer than {MAX_NAME_CHARS} characters"),
            ));
        }
        let (shape, bbox) = match (&geofence.circle, geofence.polygon_geojson.is_empty()) {
            (Some(_), false) => {
                return Err(Invalid::new(
                    "circle",
                    "exactly one of circle and polygon_geojson must be set, not both",
                ));
            }
            (None, true) => {
                return Err(Invalid::new(
                    "circle",
                    "exactly one of circle and polygon_geojson must be set (neither is)",
                ));
            }
            (Some(circle), true) => {
                if !(circle.lat.is_finite() && (-90.0..=90.0).contains(&circle.lat)) {
                    return Err(Invalid::new(
                        "circle.lat",
                        format!("must be a finite number in -90..=90, not {}", circle.lat),
                    ));
                }
                if !(circle.lon.is_finite() && (-180.0..=180.0).contains(&circle.lon)) {
                    return Err(Invalid::new(
                        "circle.lon",
                        format!("must be a finite number in -180..=180, not {}", circle.lon),
                    ));
                }
                if !(circle.radius_m > 0.0 && circle.radius_m <= MAX_RADIUS_M) {
                    return Err(Invalid::new(
                        "circle.radius_m",
                        format!(
                            "must be over 0 and at most {MAX_RADIUS_M} metres, not {}",
                            circle.radius_m
                        ),
                    ));
                }
                let bbox = disc_bbox(circle.lat, circle.lon, circle.radius_m);
                (
                    Shape::Circle {
                        lat: circle.lat,
                        lon: circle.lon,
                        radius_m: circle.radius_m,
                    },
                    bbox,
                )
            }
            (None, false) => {
                let rings = parse_polygon(&geofence.polygon_geojson)
                    .map_err(|rule| Invalid::new("polygon_geojson", rule))?;
                let bbox = ring_bbox(&rings[0]);
                (Shape::Polygon { rings }, bbox)
            }
        };
        if geofence.device_ids.len() > MAX_DEVICE_IDS {
            return Err(Invalid::new(
                "device_ids",
                format!(
                    "more than {MAX_DEVICE_IDS} devices ({})",
                    geofence.device_ids.len()
                ),
            ));
        }
        for (i, device) in geofence.device_ids.iter().enumerate() {
            DeviceId::check(device)
                .map_err(|rule| Invalid::new("device_ids", format!("device_ids[{i}]: {rule}")))?;
        }
        let mut devices = geofence.device_ids.clone();
        devices.sort_unstable();
        devices.dedup();
        Ok(Fence {
            id: geofence.geofence_id.clone(),
            name: geofence.name.clone(),
            shape,
            bbox,
            devices,
        })
    }

    /// True when the fence's device filter lets `device` in (an empty filter lets all in).
    pub fn applies_to(&self, device: &str) -> bool {
        self.devices.is_empty()
            || self
                .devices
                .binary_search_by(|d| d.as_str().cmp(device))
                .is_ok()
    }

    /// Where a fix with this accuracy circle is: inside, outside, or straddling the boundary
    /// (its accuracy circle crosses the boundary: neither certain). `accuracy_m` None or ≤ 0:
    /// a point. A point exactly on a circle's boundary is inside.
    pub fn locate(&self, lat: f64, lon: f64, accuracy_m: Option<f32>) -> Where {
        let accuracy = accuracy_radius(accuracy_m);
        match &self.shape {
            Shape::Circle {
                lat: c_lat,
                lon: c_lon,
                radius_m,
            } => {
                let d = geo::haversine_m(*c_lat, *c_lon, lat, lon);
                if (d - radius_m).abs() < accuracy {
                    Where::Straddling
                } else if d <= *radius_m {
                    Where::Inside
                } else {
                    Where::Outside
                }
            }
            Shape::Polygon { rings } => {
                // Cheap rejection first: most fences a fix is tested against are not near it.
                if !disc_bbox(lat, lon, accuracy).intersects(&self.bbox) {
                    return Where::Outside;
                }
                if accuracy > 0.0 && edge_closer_than(rings, lat, lon, accuracy) {
                    Where::Straddling
                } else if contains(rings, lon, lat) {
                    Where::Inside
                } else {
                    Where::Outside
                }
            }
        }
    }
}

fn ring_bbox(ring: &[[f64; 2]]) -> Bbox {
    let mut bbox = Bbox {
        min: [f64::INFINITY; 2],
        max: [f64::NEG_INFINITY; 2],
    };
    for &[lon, lat] in ring {
        bbox.min = [bbox.min[0].min(lon), bbox.min[1].min(lat)];
        bbox.max = [bbox.max[0].max(lon), bbox.max[1].max(lat)];
    }
    bbox
}

/// Even-odd ray casting over every ring (so holes are out), in the [lon, lat] plane.
fn contains(rings: &[Vec<[f64; 2]>], x: f64, y: f64) -> bool {
    let mut inside = false;
    for ring in rings {
        for edge in ring.windows(2) {
            let (a, b) = (edge[0], edge[1]);
            if (a[1] > y) != (b[1] > y) {
                let x_cross = a[0] + (y - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
                if x < x_cross {
                    inside = !inside;
                }
            }
        }
    }
    inside
}

/// True when some edge is closer than `distance_m` to (`lat`, `lon`), in local
/// equirectangular metres around that point.
fn edge_closer_than(rings: &[Vec<[f64; 2]>], lat: f64, lon: f64, distance_m: f64) -> bool {
    let kx = M_PER_DEG * lat.to_radians().cos();
    let project = |p: [f64; 2]| [(p[0] - lon) * kx, (p[1] - lat) * M_PER_DEG];
    let limit = distance_m * distance_m;
    rings.iter().any(|ring| {
        ring.windows(2).any(|edge| {
            let (a, b) = (project(edge[0]), project(edge[1]));
            let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
            let length2 = dx * dx + dy * dy;
            let t = if length2 > 0.0 {
                (-(a[0] * dx + a[1] * dy) / length2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let (px, py) = (a[0] + t * dx, a[1] + t * dy);
            px * px + py * py < limit
        })
    })
}

/// The orientation of `c` relative to the line `a` → `b` (twice the signed triangle area).
fn orient(a: [f64; 2], b: [f64; 2], c: [f64; 2]) -> f64 {
    (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
}

/// For `p` collinear with `a`–`b`: whether it lies on that segment.
fn within(a: [f64; 2], b: [f64; 2], p: [f64; 2]) -> bool {
    p[0] >= a[0].min(b[0])
        && p[0] <= a[0].max(b[0])
        && p[1] >= a[1].min(b[1])
        && p[1] <= a[1].max(b[1])
}

/// Whether segments `p1`–`p2` and `q1`–`q2` share any point (touching counts).
fn segments_meet(p1: [f64; 2], p2: [f64; 2], q1: [f64; 2], q2: [f64; 2]) -> bool {
    let (d1, d2) = (orient(q1, q2, p1), orient(q1, q2, p2));
    let (d3, d4) = (orient(p1, p2, q1), orient(p1, p2, q2));
    if ((d1 > 0.0 && d2 < 0.0) || (d1 < 0.0 && d2 > 0.0))
        && ((d3 > 0.0 && d4 < 0.0) || (d3 < 0.0 && d4 > 0.0))
    {
        return true;
    }
    (d1 == 0.0 && within(q1, q2, p1))
        || (d2 == 0.0 && within(q1, q2, p2))
        || (d3 == 0.0 && within(p1, p2, q1))
        || (d4 == 0.0 && within(p1, p2, q2))
}

fn show(p: [f64; 2]) -> String {
    format!("[{}, {}]", p[0], p[1])
}

/// Parses and checks a GeoJSON Polygon geometry; the rule broken, if any.
fn parse_polygon(text: &str) -> Result<Vec<Vec<[f64; 2]>>, String> {
    if text.len() > MAX_POLYGON_BYTES {
        return Err(format!(
            "longer than {MAX_POLYGON_BYTES} bytes ({})",
            text.len()
        ));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or("must be a GeoJSON Polygon object {\"type\": \"Polygon\", \"coordinates\": […]}")?;
    match object.get("type").and_then(Value::as_str) {
        Some("Polygon") => {}
        Some(other) => return Err(format!("\"type\" must be \"Polygon\", not {other:?}")),
        None => return Err("\"type\": \"Polygon\" is missing".into()),
    }
    let raw_rings = object
        .get("coordinates")
        .and_then(Value::as_array)
        .ok_or("\"coordinates\" must be an array of rings")?;
    if raw_rings.is_empty() {
        return Err("\"coordinates\" has no ring (the outer ring is required)".into());
    }
    let mut rings = Vec::with_capacity(raw_rings.len());
    let mut vertices = 0;
    for (r, raw_ring) in raw_rings.iter().enumerate() {
        let positions = raw_ring
            .as_array()
            .ok_or_else(|| format!("ring {r} must be an array of [lon, lat] positions"))?;
        if positions.len() < 4 {
            return Err(format!(
                "ring {r} has {} positions; a ring needs at least 4 (3 vertices and the first again to close it)",
                positions.len()
            ));
        }
        let mut ring: Vec<[f64; 2]> = Vec::with_capacity(positions.len());
        for (p, position) in positions.iter().enumerate() {
            let point = parse_position(position)
                .ok_or_else(|| format!("ring {r} position {p} must be [lon, lat] (numbers)"))?;
            if !geo::valid_coordinates(point[1], point[0]) {
                return Err(format!(
                    "ring {r} position {p} {} is out of range (lon -180..=180, lat -90..=90)",
                    show(point)
                ));
            }
            if p == 0 || ring.last() != Some(&point) {
                ring.push(point);
            }
        }
        let (first, last) = (ring[0], ring[ring.len() - 1]);
        if first != last {
            let last_position = parse_position(&positions[positions.len() - 1]).unwrap_or(last);
            return Err(format!(
                "ring {r} is not closed: its first position {} differs from its last {}",
                show(first),
                show(last_position)
            ));
        }
        if ring.len() < 4 {
            return Err(format!("ring {r} has fewer than 3 distinct vertices"));
        }
        vertices += ring.len() - 1;
        if vertices > MAX_VERTICES {
            return Err(format!("more than {MAX_VERTICES} vertices in all rings"));
        }
        for (e, edge) in ring.windows(2).enumerate() {
            if (edge[1][0] - edge[0][0]).abs() > 180.0 {
                return Err(format!(
                    "ring {r} edge {e} {} → {} crosses the antimeridian; split the area at ±180°",
                    show(edge[0]),
                    show(edge[1])
                ));
            }
        }
        rings.push(ring);
    }
    check_simple(&rings)?;
    Ok(rings)
}

fn parse_position(position: &Value) -> Option<[f64; 2]> {
    // GeoJSON allows an altitude as a third number; it plays no part here.
    let numbers = position
        .as_array()
        .filter(|n| n.len() == 2 || n.len() == 3)?;
    let lon = numbers[0].as_f64()?;
    let lat = numbers[1].as_f64()?;
    numbers
        .get(2)
        .map_or(Some(()), |alt| alt.as_f64().map(|_| ()))?;
    Some([lon, lat])
}

/// No ring crosses or touches itself or another ring, and every hole lies in the outer ring
/// and outside the other holes: the even-odd rule then means what the rings draw. Edges are
/// compared pairwise: O(n²), fine at `MAX_VERTICES`.
fn check_simple(rings: &[Vec<[f64; 2]>]) -> Result<(), String> {
    // (ring, edge index, from, to), with each edge's bbox for a cheap first test.
    let edges: Vec<(usize, usize, [f64; 2], [f64; 2])> = rings
        .iter()
        .enumerate()
        .flat_map(|(r, ring)| {
            ring.windows(2)
                .enumerate()
                .map(move |(e, w)| (r, e, w[0], w[1]))
        })
        .collect();
    let boxes: Vec<Bbox> = edges
        .iter()
        .map(|&(_, _, a, b)| Bbox {
            min: [a[0].min(b[0]), a[1].min(b[1])],
            max: [a[0].max(b[0]), a[1].max(b[1])],
        })
        .collect();
    for i in 0..edges.len() {
        let (ri, ei, a, b) = edges[i];
        let ring_edges = rings[ri].len() - 1;
        for j in i + 1..edges.len() {
            if !boxes[i].intersects(&boxes[j]) {
                continue;
            }
            let (rj, ej, c, d) = edges[j];
            let crosses = if ri != rj {
                segments_meet(a, b, c, d)
            } else if ej == ei + 1 || (ei == 0 && ej == ring_edges - 1) {
                // Neighbours share a vertex; they only go wrong by doubling back over each
                // other (collinear, pointing the same way from the shared vertex).
                let (shared, x, y) = if ej == ei + 1 { (b, a, d) } else { (a, b, c) };
                orient(x, shared, y) == 0.0
                    && (x[0] - shared[0]) * (y[0] - shared[0])
                        + (x[1] - shared[1]) * (y[1] - shared[1])
                        > 0.0
            } else {
                segments_meet(a, b, c, d)
            };
            if crosses {
                let what = if ri == rj {
                    format!("ring {ri} intersects itself")
                } else {
                    format!("rings {ri} and {rj} cross or touch")
                };
                return Err(format!(
                    "{what}: edge {ei} {} → {} meets edge {ej} {} → {}",
                    show(a),
                    show(b),
                    show(c),
                    show(d)
                ));
            }
        }
    }
    for (r, ring) in rings.iter().enumerate() {
        if ring_area(ring) == 0.0 {
            return Err(format!("ring {r} encloses no area"));
        }
    }
    // With no crossings, one vertex tells on which side of another ring a whole ring is.
    for (h, hole) in rings.iter().enumerate().skip(1) {
        let probe = hole[0];
        if !contains(&rings[..1], probe[0], probe[1]) {
            return Err(format!(
                "ring {h} (a hole) is not inside ring 0 (the outer ring)"
            ));
        }
        for (o, other) in rings.iter().enumerate().skip(1) {
            if o != h && contains(std::slice::from_ref(other), probe[0], probe[1]) {
                return Err(format!(
                    "ring {h} (a hole) lies inside ring {o}, another hole"
                ));
            }
        }
    }
    Ok(())
}

/// Twice the signed area of a closed ring (shoelace), degrees².
fn ring_area(ring: &[[f64; 2]]) -> f64 {
    ring.windows(2)
        .map(|w| w[0][0] * w[1][1] - w[1][0] * w[0][1])
        .sum()
}

type Indexed = GeomWithData<Rectangle<[f64; 2]>, usize>;

/// One tenant's fences with an R-tree over their bounding boxes, so a fix is tested against
/// the fences near it only.
pub struct Fences {
    /// Sorted by id, so candidate indices in ascending order are fences in id order.
    fences: Vec<Fence>,
    tree: RTree<Indexed>,
}

impl Fences {
    /// Any order; ids should be unique (of duplicates, one is kept).
    pub fn new(mut fences: Vec<Fence>) -> Self {
        fences.sort_by(|a, b| a.id.cmp(&b.id));
        fences.dedup_by(|a, b| a.id == b.id);
        let boxes = fences
            .iter()
            .enumerate()
            .map(|(i, f)| GeomWithData::new(Rectangle::from_corners(f.bbox.min, f.bbox.max), i))
            .collect();
        Fences {
            fences,
            tree: RTree::bulk_load(boxes),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fences.is_empty()
    }

    pub fn len(&self) -> usize {
        self.fences.len()
    }

    pub fn get(&self, id: &str) -> Option<&Fence> {
        self.index(id).map(|i| &self.fences[i])
    }

    /// The fences in id order.
    pub fn iter(&self) -> impl Iterator<Item = &Fence> {
        self.fences.iter()
    }

    fn index(&self, id: &str) -> Option<usize> {
        self.fences.binary_search_by(|f| f.id.as_str().cmp(id)).ok()
    }

    /// Indices of the fences whose box meets the box of the fix's accuracy circle: a superset
    /// of those the fix is inside of or straddles.
    fn near(&self, lat: f64, lon: f64, accuracy_m: Option<f32>) -> Vec<usize> {
        let b = disc_bbox(lat, lon, accuracy_radius(accuracy_m));
        self.tree
            .locate_in_envelope_intersecting(&AABB::from_corners(b.min, b.max))
            .map(|entry| entry.data)
            .collect()
    }
}

/// A device's evaluation state for one fence. Only fences the device is inside of or pending
/// in have one.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FenceState {
    #[prost(string, tag = "1")]
    pub fence_id: String,
    #[prost(bool, tag = "2")]
    pub inside: bool,
    /// First fix time of an unconfirmed entry (dwell pending); 0: none.
    #[prost(int64, tag = "3")]
    pub pending_since_ms: i64,
}

/// Evaluates one accepted fix of `device` (fixes come in time order) against `fences`,
/// updating `states` (kept sparse and sorted by fence id: only fences the device is inside of
/// or pending in; states of fences that no longer exist, or no longer apply to the device, are
/// dropped without an event) and returning the ENTER/EXIT transitions it triggers, by fence
/// id. A fix with invalid coordinates changes nothing.
pub fn evaluate(
    states: &mut Vec<FenceState>,
    fences: &Fences,
    device: &str,
    fix: &Fix,
    min_dwell_ms: i64,
) -> Vec<Event> {
    if fences.is_empty() {
        states.clear();
        return Vec::new();
    }
    let near = if geo::valid_coordinates(fix.lat, fix.lon) {
        fences.near(fix.lat, fix.lon, fix.accuracy_m)
    } else {
        Vec::new()
    };
    evaluate_candidates(states, fences, device, fix, min_dwell_ms, near)
}

/// `evaluate` over the fences at `candidates` (indices) and those of `states`.
fn evaluate_candidates(
    states: &mut Vec<FenceState>,
    fences: &Fences,
    device: &str,
    fix: &Fix,
    min_dwell_ms: i64,
    mut candidates: Vec<usize>,
) -> Vec<Event> {
    states.retain(|s| {
        fences
            .get(&s.fence_id)
            .is_some_and(|f| f.applies_to(device))
    });
    if !geo::valid_coordinates(fix.lat, fix.lon) {
        return Vec::new();
    }
    states.sort_by(|a, b| a.fence_id.cmp(&b.fence_id));
    // A device inside a fence must be able to leave it from anywhere, however far.
    candidates.extend(states.iter().filter_map(|s| fences.index(&s.fence_id)));
    candidates.sort_unstable();
    candidates.dedup();
    let mut events = Vec::new();
    for i in candidates {
        let fence = &fences.fences[i];
        if !fence.applies_to(device) {
            continue;
        }
        let at = states.binary_search_by(|s| s.fence_id.as_str().cmp(&fence.id));
        match fence.locate(fix.lat, fix.lon, fix.accuracy_m) {
            // Hysteresis: neither side is certain, so nothing changes, not even a dwell.
            Where::Straddling => {}
            Where::Outside => {
                if let Ok(k) = at
                    && states.remove(k).inside
                {
                    events.push(event(EventType::Exit, device, &fence.id, fix));
                }
            }
            Where::Inside => {
                let k = at.unwrap_or_else(|k| {
                    states.insert(
                        k,
                        FenceState {
                            fence_id: fence.id.clone(),
                            inside: false,
                            pending_since_ms: fix.time_ms,
                        },
                    );
                    k
                });
                let state = &mut states[k];
                if !state.inside
                    && fix.time_ms.saturating_sub(state.pending_since_ms) >= min_dwell_ms
                {
                    state.inside = true;
                    state.pending_since_ms = 0;
                    events.push(event(EventType::Enter, device, &fence.id, fix));
                }
            }
        }
    }
    events
}

fn event(kind: EventType, device: &str, fence_id: &str, fix: &Fix) -> Event {
    Event {
        r#type: kind as i32,
        device_id: device.to_owned(),
        geofence_id: fence_id.to_owned(),
        place_id: String::new(),
        time_ms: fix.time_ms,
        lat: fix.lat,
        lon: fix.lon,
        fix: Some(fix.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use testkit::Rng;
    use trackmesh_shared::event_messages::Circle;

    const T0: i64 = 1_750_000_000_000;
    const LAT: f64 = 40.0;
    const LON: f64 = -74.0;

    /// The point `north_m`, `east_m` metres from (`lat`, `lon`) (locally flat).
    fn offset(lat: f64, lon: f64, north_m: f64, east_m: f64) -> (f64, f64) {
        (
            lat + north_m / M_PER_DEG,
            lon + east_m / (M_PER_DEG * lat.to_radians().cos()),
        )
    }

    fn circle_fence(id: &str, lat: f64, lon: f64, radius_m: f64) -> Geofence {
        Geofence {
            geofence_id: id.into(),
            name: format!("circle {id}"),
            circle: Some(Circle { lat, lon, radius_m }),
            ..Geofence::default()
        }
    }

    fn polygon_fence(id: &str, rings: &[Vec<[f64; 2]>]) -> Geofence {
        Geofence {
            geofence_id: id.into(),
            name: format!("polygon {id}"),
            polygon_geojson: json!({"type": "Polygon", "coordinates": rings}).to_string(),
            ..Geofence::default()
        }
    }

    /// A closed ring of `[lon, lat]` from points given as metres (east, north) from the origin.
    fn ring_m(points: &[(f64, f64)]) -> Vec<[f64; 2]> {
        let mut ring: Vec<[f64; 2]> = points
            .iter()
            .map(|&(e, n)| {
                let (lat, lon) = offset(LAT, LON, n, e);
                [lon, lat]
            })
            .collect();
        ring.push(ring[0]);
        ring
    }

    fn fix(t_s: i64, (lat, lon): (f64, f64), accuracy_m: Option<f32>) -> Fix {
        Fix {
            device_id: "dev".into(),
            time_ms: T0 + t_s * 1000,
            lat,
            lon,
            accuracy_m,
            ..Fix::default()
        }
    }

    /// Runs `fixes` of device "dev" through `evaluate`; (type, fence, seconds after T0).
    fn run(fences: &Fences, fixes: &[Fix], min_dwell_ms: i64) -> Vec<(EventType, String, i64)> {
        let mut states = Vec::new();
        let mut out = Vec::new();
        for f in fixes {
            for e in evaluate(&mut states, fences, "dev", f, min_dwell_ms) {
                assert_eq!((e.time_ms, e.lat, e.lon), (f.time_ms, f.lat, f.lon));
                assert_eq!(e.fix.as_ref(), Some(f));
                assert_eq!(e.device_id, "dev");
                assert!(e.place_id.is_empty());
                out.push((e.r#type(), e.geofence_id, (e.time_ms - T0) / 1000));
            }
        }
        out
    }

    fn one(geofence: Geofence) -> Fences {
        Fences::new(vec![Fence::new(&geofence).unwrap()])
    }

    /// A U opening north, 300 m wide and 300 m tall, arms 100 m wide: metres (east, north).
    fn u_shape() -> Vec<[f64; 2]> {
        ring_m(&[
            (0.0, 0.0),
            (300.0, 0.0),
            (300.0, 300.0),
            (200.0, 300.0),
            (200.0, 100.0),
            (100.0, 100.0),
            (100.0, 300.0),
            (0.0, 300.0),
        ])
    }

    fn square(west: f64, south: f64, side: f64) -> Vec<[f64; 2]> {
        ring_m(&[
            (west, south),
            (west + side, south),
            (west + side, south + side),
            (west, south + side),
        ])
    }

    fn rejects(geofence: &Geofence, field: &str, rule: &str) {
        match Fence::new(geofence) {
            Ok(_) => panic!("accepted, expected {field}: {rule}"),
            Err(Invalid { field: f, rule: r }) => {
                assert_eq!(f, field, "{r}");
                assert!(r.contains(rule), "{field}: {r:?} lacks {rule:?}");
            }
        }
    }

    fn raw_polygon(geojson: &str) -> Geofence {
        Geofence {
            geofence_id: "p".into(),
            polygon_geojson: geojson.into(),
            ..Geofence::default()
        }
    }

    #[test]
    fn validation_names_field_and_rule() {
        let ok = circle_fence("c", LAT, LON, 100.0);
        assert!(Fence::new(&ok).is_ok());
        rejects(
            &Geofence {
                name: "x".repeat(201),
                ..ok.clone()
            },
            "name",
            "longer than 200 characters",
        );
        assert!(
            Fence::new(&Geofence {
                name: "é".repeat(200),
                ..ok.clone()
            })
            .is_ok()
        );
        rejects(
            &Geofence {
                circle: None,
                ..ok.clone()
            },
            "circle",
            "neither",
        );
        rejects(
            &Geofence {
                polygon_geojson: polygon_fence("p", &[square(0.0, 0.0, 10.0)]).polygon_geojson,
                ..ok.clone()
            },
            "circle",
            "not both",
        );
        for (lat, lon, radius, field) in [
            (90.5, 0.0, 10.0, "circle.lat"),
            (f64::NAN, 0.0, 10.0, "circle.lat"),
            (0.0, -180.5, 10.0, "circle.lon"),
            (0.0, f64::INFINITY, 10.0, "circle.lon"),
            (0.0, 0.0, 0.0, "circle.radius_m"),
            (0.0, 0.0, -5.0, "circle.radius_m"),
            (0.0, 0.0, 1_000_000.5, "circle.radius_m"),
            (0.0, 0.0, f64::NAN, "circle.radius_m"),
        ] {
            rejects(&circle_fence("c", lat, lon, radius), field, "must be");
        }
        assert!(Fence::new(&circle_fence("c", 90.0, 180.0, 1_000_000.0)).is_ok());

        let p = "polygon_geojson";
        for (geojson, rule) in [
            ("{", "not valid JSON"),
            ("[1, 2]", "must be a GeoJSON Polygon object"),
            (
                r#"{"type":"Point","coordinates":[1,2]}"#,
                r#""type" must be "Polygon", not "Point""#,
            ),
            (r#"{"coordinates":[]}"#, r#""type""#),
            (r#"{"type":"Polygon"}"#, r#""coordinates" must be an array"#),
            (r#"{"type":"Polygon","coordinates":[]}"#, "no ring"),
        ] {
            rejects(&raw_polygon(geojson), p, rule);
        }
        // A polygon of one ring, its positions as written.
        for (ring, rule) in [
            (
                "[0,0],[1,0],[0,0]",
                "ring 0 has 3 positions; a ring needs at least 4",
            ),
            (
                "[0,0],[1,0],[1,1],[0,1]",
                "ring 0 is not closed: its first position [0, 0] differs from its last [0, 1]",
            ),
            (
                r#"[0,0],[1,"0"],[1,1],[0,0]"#,
                "ring 0 position 1 must be [lon, lat]",
            ),
            (
                "[0,0],[1,0,2,3],[1,1],[0,0]",
                "ring 0 position 1 must be [lon, lat]",
            ),
            (
                "[0,0],[1,0],[1,91],[0,0]",
                "ring 0 position 2 [1, 91] is out of range",
            ),
            ("[0,0],[1,0],[1,0],[0,0]", "fewer than 3 distinct vertices"),
            (
                "[0,0],[0,0],[0,0],[0,0]",
                "ring 0 has fewer than 3 distinct vertices",
            ),
            // A bow tie.
            (
                "[0,0],[1,1],[1,0],[0,1],[0,0]",
                "ring 0 intersects itself: edge 0 [0, 0] → [1, 1] meets edge 2",
            ),
            // A spike doubling back along its own edge.
            ("[0,0],[2,0],[1,0],[1,1],[0,0]", "ring 0 intersects itself"),
            // Collinear: no area, and it doubles back.
            ("[0,0],[1,0],[2,0],[0,0]", "ring 0 intersects itself"),
            (
                "[179,0],[-179,0],[-179,1],[179,0]",
                "ring 0 edge 0 [179, 0] → [-179, 0] crosses the antimeridian",
            ),
        ] {
            let geojson = format!(r#"{{"type":"Polygon","coordinates":[[{ring}]]}}"#);
            rejects(&raw_polygon(&geojson), p, rule);
        }
        let outer = square(0.0, 0.0, 1000.0);
        rejects(
            &polygon_fence("p", &[outer.clone(), square(2000.0, 0.0, 100.0)]),
            p,
            "ring 1 (a hole) is not inside ring 0",
        );
        rejects(
            &polygon_fence("p", &[outer.clone(), square(900.0, 100.0, 300.0)]),
            p,
            "rings 0 and 1 cross or touch",
        );
        rejects(
            &polygon_fence(
                "p",
                &[
                    outer.clone(),
                    square(100.0, 100.0, 500.0),
                    square(200.0, 200.0, 100.0),
                ],
            ),
            p,
            "ring 2 (a hole) lies inside ring 1, another hole",
        );
        let big = |n: usize| {
            let mut ring: Vec<[f64; 2]> = (0..n)
                .map(|k| {
                    let a = k as f64 / n as f64 * 2.0 * PI;
                    [a.cos(), a.sin()]
                })
                .collect();
            ring.push(ring[0]);
            ring
        };
        assert!(Fence::new(&polygon_fence("p", &[big(1000)])).is_ok());
        rejects(
            &polygon_fence("p", &[big(1001)]),
            p,
            "more than 1000 vertices in all rings",
        );
        rejects(
            &raw_polygon(&" ".repeat(MAX_POLYGON_BYTES + 1)),
            p,
            "longer than 262144 bytes",
        );
        // Valid: concave, with a hole, with an altitude, with a repeated vertex.
        assert!(Fence::new(&polygon_fence("u", &[u_shape()])).is_ok());
        assert!(
            Fence::new(&polygon_fence(
                "h",
                &[outer.clone(), square(100.0, 100.0, 500.0)]
            ))
            .is_ok()
        );
        assert!(Fence::new(&raw_polygon(
            r#"{"type":"Polygon","coordinates":[[[0,0,5],[1,0,5],[1,0],[1,1],[0,0]]],"bbox":[0,0,1,1]}"#
        ))
        .is_ok());

        rejects(
            &Geofence {
                device_ids: vec!["a".into(), String::new()],
                ..ok.clone()
            },
            "device_ids",
            "device_ids[1]: required",
        );
        rejects(
            &Geofence {
                device_ids: vec!["a\nb".into()],
                ..ok.clone()
            },
            "device_ids",
            "device_ids[0]: contains control characters",
        );
        rejects(
            &Geofence {
                device_ids: (0..1001).map(|i| format!("d{i}")).collect(),
                ..ok.clone()
            },
            "device_ids",
            "more than 1000 devices",
        );
    }

    #[test]
    fn circle_track_enters_and_exits() {
        let fences = one(circle_fence("c", LAT, LON, 200.0));
        // West to east through the centre, 50 m a fix, then back.
        let mut fixes: Vec<Fix> = (0..=12)
            .map(|k| {
                fix(
                    k * 10,
                    offset(LAT, LON, 0.0, -300.0 + 50.0 * k as f64),
                    None,
                )
            })
            .collect();
        fixes.extend((0..=12).map(|k| {
            fix(
                200 + k * 10,
                offset(LAT, LON, 0.0, 300.0 - 50.0 * k as f64),
                Some(10.0),
            )
        }));
        use EventType::{Enter, Exit};
        assert_eq!(
            run(&fences, &fixes, 0),
            vec![
                // -200 m is on the boundary (inside); +250 m is out.
                (Enter, "c".into(), 20),
                (Exit, "c".into(), 110),
                // Back with 10 m accuracy: +200 and -200 straddle, so +150 enters, -250 exits.
                (Enter, "c".into(), 230),
                (Exit, "c".into(), 310),
            ]
        );
    }

    #[test]
    fn concave_polygon_track_enters_each_arm() {
        let fences = one(polygon_fence("u", &[u_shape()]));
        // Eastwards at 200 m north, through the left arm, the notch, the right arm.
        let fixes: Vec<Fix> = (0..=8)
            .map(|k| {
                fix(
                    k * 10,
                    offset(LAT, LON, 200.0, -50.0 + 50.0 * k as f64),
                    Some(5.0),
                )
            })
            .collect();
        use EventType::{Enter, Exit};
        assert_eq!(
            run(&fences, &fixes, 0),
            vec![
                // -50 m out; 0 m on the edge straddles (t 10); 50 m in the left arm.
                (Enter, "u".into(), 20),
                // 100 m straddles; 150 m is in the notch.
                (Exit, "u".into(), 40),
                // 200 m straddles; 250 m in the right arm.
                (Enter, "u".into(), 60),
                // 300 m straddles; 350 m out.
                (Exit, "u".into(), 80),
            ]
        );
        // At 50 m north the U is solid: one visit (points off the edges: a point exactly on
        // one is on the side ray casting puts it).
        let fixes: Vec<Fix> = (0..=8)
            .map(|k| {
                fix(
                    k * 10,
                    offset(LAT, LON, 50.0, -25.0 + 50.0 * k as f64),
                    None,
                )
            })
            .collect();
        assert_eq!(
            run(&fences, &fixes, 0),
            vec![(Enter, "u".into(), 10), (Exit, "u".into(), 70)]
        );
    }

    #[test]
    fn hole_is_outside() {
        let fences = one(polygon_fence(
            "h",
            &[square(0.0, 0.0, 900.0), square(300.0, 300.0, 300.0)],
        ));
        let fixes: Vec<Fix> = (0..=10)
            .map(|k| {
                fix(
                    k * 10,
                    offset(LAT, LON, 450.0, -50.0 + 100.0 * k as f64),
                    None,
                )
            })
            .collect();
        use EventType::{Enter, Exit};
        assert_eq!(
            run(&fences, &fixes, 0),
            vec![
                (Enter, "h".into(), 10),
                (Exit, "h".into(), 40),
                (Enter, "h".into(), 70),
                (Exit, "h".into(), 100),
            ]
        );
    }

    /// Fixes alternating 5 m either side of the boundary of a 100 m circle and of a square.
    fn jitter(accuracy: Option<f32>) -> (Fences, Vec<Fix>) {
        let fences = Fences::new(vec![
            Fence::new(&circle_fence("c", LAT, LON, 100.0)).unwrap(),
            // Its west edge at 2 km east, shared by no circle point.
            Fence::new(&polygon_fence("s", &[square(2000.0, -500.0, 1000.0)])).unwrap(),
        ]);
        let fixes = (0..40)
            .map(|k| {
                let side = if k % 2 == 0 { -5.0 } else { 5.0 };
                let at = if k < 20 {
                    offset(LAT, LON, 100.0 + side, 0.0)
                } else {
                    offset(LAT, LON, 0.0, 2000.0 - side)
                };
                fix(k * 10, at, accuracy)
            })
            .collect();
        (fences, fixes)
    }

    #[test]
    fn boundary_jitter_within_accuracy_does_not_flap() {
        let (fences, fixes) = jitter(Some(20.0));
        assert_eq!(run(&fences, &fixes, 0), vec![]);
        // Already inside: the jitter neither exits nor re-enters.
        let mut track = vec![fix(-20, offset(LAT, LON, 0.0, 0.0), Some(20.0))];
        track.extend(fixes[..20].iter().cloned());
        track.push(fix(500, offset(LAT, LON, 300.0, 0.0), Some(20.0)));
        use EventType::{Enter, Exit};
        assert_eq!(
            run(&fences, &track, 0),
            vec![(Enter, "c".into(), -20), (Exit, "c".into(), 500)]
        );
    }

    #[test]
    fn boundary_jitter_without_accuracy_flaps() {
        let (fences, fixes) = jitter(None);
        let events = run(&fences, &fixes, 0);
        // Each fence: in at every even fix (circle) / odd fix (square, 5 m west of its edge
        // is outside), so 10 ENTERs and 10 EXITs per fence, alternating.
        assert_eq!(events.len(), 40, "{events:?}");
        for fence in ["c", "s"] {
            let kinds: Vec<EventType> = events
                .iter()
                .filter(|e| e.1 == fence)
                .map(|e| e.0)
                .collect();
            assert_eq!(kinds.len(), 20);
            assert!(
                kinds
                    .chunks(2)
                    .all(|p| p == [EventType::Enter, EventType::Exit])
            );
        }
    }

    #[test]
    fn dwell_confirms_only_after_min_dwell() {
        let fences = one(circle_fence("c", LAT, LON, 100.0));
        let inside = offset(LAT, LON, 0.0, 0.0);
        let outside = offset(LAT, LON, 500.0, 0.0);
        let mut fixes = Vec::new();
        // 30 s inside, then out: never confirmed.
        fixes.extend((0..=3).map(|k| fix(k * 10, inside, None)));
        fixes.push(fix(40, outside, None));
        // In again from 100 s: 70 s inside, with a straddling fix that does not reset the
        // dwell; confirmed by the fix at 160 s, 60 s after the first.
        fixes.extend((0..=7).map(|k| {
            let accuracy = if k == 2 { Some(500.0) } else { None };
            fix(100 + k * 10, inside, accuracy)
        }));
        fixes.push(fix(200, outside, None));
        use EventType::{Enter, Exit};
        assert_eq!(
            run(&fences, &fixes, 60_000),
            vec![(Enter, "c".into(), 160), (Exit, "c".into(), 200)]
        );
        // The pending state is kept while waiting.
        let mut states = Vec::new();
        evaluate(&mut states, &fences, "dev", &fix(0, inside, None), 60_000);
        assert_eq!(
            states,
            vec![FenceState {
                fence_id: "c".into(),
                inside: false,
                pending_since_ms: T0,
            }]
        );
    }

    #[test]
    fn deleted_fence_state_is_dropped_silently() {
        let a = Fence::new(&circle_fence("a", LAT, LON, 100.0)).unwrap();
        let b = Fence::new(&circle_fence("b", LAT, LON, 100.0)).unwrap();
        let at = offset(LAT, LON, 0.0, 0.0);
        let mut states = Vec::new();
        let both = Fences::new(vec![b.clone(), a]);
        let events = evaluate(&mut states, &both, "dev", &fix(0, at, None), 0);
        let ids: Vec<&str> = events.iter().map(|e| e.geofence_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "by fence id");
        assert_eq!(states.len(), 2);
        // "a" deleted: leaving everything gives one EXIT, for "b" only.
        let only_b = Fences::new(vec![b]);
        let far = fix(10, offset(LAT, LON, 10_000.0, 0.0), None);
        let events = evaluate(&mut states, &only_b, "dev", &far, 0);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].geofence_id, "b");
        assert_eq!(events[0].r#type(), EventType::Exit);
        assert!(states.is_empty());
        // No fences at all: every state goes, no event.
        let mut states = vec![FenceState {
            fence_id: "gone".into(),
            inside: true,
            pending_since_ms: 0,
        }];
        assert!(evaluate(&mut states, &Fences::new(vec![]), "dev", &far, 0).is_empty());
        assert!(states.is_empty());
    }

    #[test]
    fn device_filter_is_honoured() {
        let fence = Fence::new(&Geofence {
            device_ids: vec!["z".into(), "dev".into(), "z".into()],
            ..circle_fence("c", LAT, LON, 100.0)
        })
        .unwrap();
        assert!(fence.applies_to("dev") && fence.applies_to("z") && !fence.applies_to("other"));
        let fences = Fences::new(vec![fence]);
        let at = fix(0, offset(LAT, LON, 0.0, 0.0), None);
        let mut states = Vec::new();
        assert!(evaluate(&mut states, &fences, "other", &at, 0).is_empty());
        assert!(states.is_empty());
        assert_eq!(evaluate(&mut states, &fences, "dev", &at, 0).len(), 1);
        // Unfiltered fences apply to all.
        assert!(
            Fence::new(&circle_fence("c", 0.0, 0.0, 1.0))
                .unwrap()
                .applies_to("any")
        );
    }

    #[test]
    fn fence_state_round_trips_as_protobuf() {
        use prost::Message;
        let state = FenceState {
            fence_id: "f".into(),
            inside: false,
            pending_since_ms: T0,
        };
        assert_eq!(
            FenceState::decode(state.encode_to_vec().as_slice()).unwrap(),
            state
        );
    }

    /// A star-shaped polygon of 3 to 22 vertices around a centre.
    fn star(rng: &mut Rng, id: &str, lat: f64, lon: f64, size_m: f64) -> Geofence {
        let n = 3 + (rng.u64() % 20) as usize;
        polygon_fence(id, &[rng.star(n, size_m, |n, e| offset(lat, lon, n, e))])
    }

    /// The R-tree path gives what testing every fence gives, on tracks with accuracies, also
    /// near the antimeridian and at high latitude where boxes are widest.
    #[test]
    fn rtree_matches_testing_every_fence() {
        for (seed, lat0, lon0) in [(1, 45.0, 10.0), (2, 70.0, 179.9), (3, -60.0, -179.95)] {
            let mut rng = Rng(seed);
            let mut list = Vec::new();
            while list.len() < 500 {
                let (lat, lon) = offset(
                    lat0,
                    lon0,
                    rng.range(-20_000.0, 20_000.0),
                    rng.range(-20_000.0, 20_000.0),
                );
                let lon = if lon > 180.0 {
                    lon - 360.0
                } else if lon < -180.0 {
                    lon + 360.0
                } else {
                    lon
                };
                let id = format!("f{:03}", list.len());
                let size = rng.range(50.0, 3000.0);
                let geofence = if rng.u64().is_multiple_of(2) {
                    circle_fence(&id, lat, lon, size)
                } else {
                    star(&mut rng, &id, lat, lon, size)
                };
                // Stars drawn across the antimeridian are refused; draw another.
                if let Ok(fence) = Fence::new(&geofence) {
                    list.push(fence);
                }
            }
            let fences = Fences::new(list);
            let all: Vec<usize> = (0..fences.len()).collect();
            let (mut indexed, mut every) = (Vec::new(), Vec::new());
            let (mut lat, mut lon) = (lat0, lon0);
            let mut total = 0;
            for k in 0..3000 {
                (lat, lon) = offset(lat, lon, rng.range(-400.0, 400.0), rng.range(-400.0, 400.0));
                lat = lat.clamp(lat0 - 0.2, lat0 + 0.2);
                if lon > 180.0 {
                    lon -= 360.0;
                } else if lon < -180.0 {
                    lon += 360.0;
                }
                let accuracy = match rng.u64() % 3 {
                    0 => None,
                    1 => Some(rng.range(1.0, 50.0) as f32),
                    _ => Some(rng.range(50.0, 1500.0) as f32),
                };
                let f = fix(k * 5, (lat, lon), accuracy);
                let a = evaluate(&mut indexed, &fences, "dev", &f, 20_000);
                let b = evaluate_candidates(&mut every, &fences, "dev", &f, 20_000, all.clone());
                assert_eq!(a, b, "seed {seed} fix {k}");
                assert_eq!(indexed, every);
                total += a.len();
            }
            assert!(
                total > 100,
                "seed {seed}: only {total} events; the test checks little"
            );
        }
    }

    /// Brute force for one circle: inside by haversine directly, the dwell rule spelled out.
    fn brute_force(
        circles: &[(f64, f64, f64)],
        track: &[(i64, f64, f64)],
        min_dwell_ms: i64,
    ) -> Vec<(EventType, String, i64)> {
        let mut state = vec![(false, None::<i64>); circles.len()];
        let mut out = Vec::new();
        for &(t, lat, lon) in track {
            for (c, &(clat, clon, r)) in circles.iter().enumerate() {
                let inside_now = geo::haversine_m(clat, clon, lat, lon) <= r;
                let (inside, pending) = &mut state[c];
                if inside_now {
                    if !*inside {
                        let since = *pending.get_or_insert(t);
                        if t - since >= min_dwell_ms {
                            *inside = true;
                            *pending = None;
                            out.push((EventType::Enter, format!("c{c}"), t));
                        }
                    }
                } else {
                    if *inside {
                        out.push((EventType::Exit, format!("c{c}"), t));
                    }
                    *inside = false;
                    *pending = None;
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn circles_match_brute_force(
            lat0 in -80.0f64..80.0,
            lon0 in -180.0f64..180.0,
            circles in prop::collection::vec((-3000.0f64..3000.0, -3000.0f64..3000.0, 1.0f64..2500.0), 1..6),
            steps in prop::collection::vec((1i64..120, -3000.0f64..3000.0, -3000.0f64..3000.0), 1..80),
            min_dwell_s in prop_oneof![Just(0i64), 0i64..300],
        ) {
            let wrap = |lon: f64| if lon > 180.0 { lon - 360.0 } else if lon < -180.0 { lon + 360.0 } else { lon };
            let circles: Vec<(f64, f64, f64)> = circles
                .into_iter()
                .map(|(n, e, r)| {
                    let (lat, lon) = offset(lat0, lon0, n, e);
                    (lat, wrap(lon), r)
                })
                .collect();
            let mut t = T0;
            let track: Vec<(i64, f64, f64)> = steps
                .into_iter()
                .map(|(dt, n, e)| {
                    t += dt * 1000;
                    let (lat, lon) = offset(lat0, lon0, n, e);
                    (t, lat, wrap(lon))
                })
                .collect();
            let fences = Fences::new(
                circles
                    .iter()
                    .enumerate()
                    .map(|(c, &(lat, lon, r))| Fence::new(&circle_fence(&format!("c{c}"), lat, lon, r)).unwrap())
                    .collect(),
            );
            let mut states = Vec::new();
            let mut got = Vec::new();
            for &(t, lat, lon) in &track {
                let f = Fix { device_id: "dev".into(), time_ms: t, lat, lon, ..Fix::default() };
                for e in evaluate(&mut states, &fences, "dev", &f, min_dwell_s * 1000) {
                    got.push((e.r#type(), e.geofence_id, e.time_ms));
                }
            }
            prop_assert_eq!(&got, &brute_force(&circles, &track, min_dwell_s * 1000));
            for c in 0..circles.len() {
                let kinds: Vec<EventType> = got.iter().filter(|e| e.1 == format!("c{c}")).map(|e| e.0).collect();
                for (k, kind) in kinds.iter().enumerate() {
                    prop_assert_eq!(*kind, if k.is_multiple_of(2) { EventType::Enter } else { EventType::Exit });
                }
            }
        }
    }
}
