//! Track simplification (issue 16, `simplify=<metres>`): Douglas–Peucker on the sphere, per
//! segment, so a long track draws fast in a browser.
//!
//! - **Distances** are great-circle distances in metres: from a fix to the arc between two
//!   kept fixes (the cross-track distance where the fix projects inside the arc, else the
//!   distance to the nearer end). Positions become unit vectors once, so each comparison is a
//!   few dot products: no trigonometry in the loop and no projection that distorts long
//!   segments.
//! - **Guarantee**: the output is a subsequence of the input in order; the first and last fix
//!   of every segment are kept; every dropped fix lies within the tolerance of the arc between
//!   the kept fixes around it.
//! - **Tolerance 0 keeps every fix** (no simplification at all, also not of exact duplicates):
//!   0 is the proto default, "off".
//! - **Bounded memory**: a segment is simplified in windows of at most [`WINDOW`] fixes; a
//!   window's last fix is kept and opens the next window. This costs a kept fix per window
//!   (1 in 32 768) against Douglas–Peucker over the whole segment, and keeps the guarantee.
//! - **Cost**: O(n log n) for ordinary tracks (the explicit stack, no recursion, holds one
//!   entry per pending sub-range); Douglas–Peucker's O(n²) worst case (e.g. a spiral) is
//!   bounded by the window.
//! - A fix without a position (storage never returns one) counts as infinitely far: it is
//!   kept rather than hidden.

use std::future::ready;

use futures::{Stream, StreamExt as _};
use tonic::Status;
use trackmesh_proto::v1::{RefinedFix, TrackChunk};
use trackmesh_shared::{domain::Invalid, geo::EARTH_RADIUS_M};

/// Fixes of one segment simplified at once (about 5 MB of `RefinedFix`es).
pub const WINDOW: usize = 32_768;

/// Fixes per output chunk, like storage's default `STREAMING_CHUNK_SIZE`.
const CHUNK: usize = 1000;

/// A tolerance read from parameter `field`: a distance in metres.
pub fn tolerance(field: &str, value: f64) -> Result<f64, Invalid> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(Invalid::new(field, "a finite number of metres >= 0"))
    }
}

/// A point on the unit sphere.
type Vector = [f64; 3];

fn unit(lat: f64, lon: f64) -> Vector {
    let (lat, lon) = (lat.to_radians(), lon.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

fn dot(a: &Vector, b: &Vector) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: &Vector, b: &Vector) -> Vector {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Half the squared chord between two unit vectors: 1 - cos(angle), computed without the
/// cancellation of `1 - dot` (metre-scale angles are ~1e-7 rad).
fn half_chord2(a: &Vector, b: &Vector) -> f64 {
    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    dot(&d, &d) / 2.0
}

/// `1 - cos(angle)` of an angle in radians: the measure distances are compared in (it grows
/// with the angle on [0, π]).
fn key_of_angle(angle: f64) -> f64 {
    2.0 * (angle.min(std::f64::consts::PI) / 2.0).sin().powi(2)
}

/// The arc between two kept fixes, ready to measure fixes against.
struct Arc {
    a: Vector,
    b: Vector,
    /// The unit normal of the arc's great circle; None when `a` and `b` (nearly) coincide.
    normal: Option<Vector>,
    ab: f64,
}

impl Arc {
    fn new(a: Vector, b: Vector) -> Self {
        let n = cross(&a, &b);
        let norm = dot(&n, &n).sqrt();
        // Below ~1e-12 rad (6 µm) the normal is noise: measure from the point instead.
        let normal = (norm > 1e-12).then(|| [n[0] / norm, n[1] / norm, n[2] / norm]);
        Self {
            a,
            b,
            normal,
            ab: dot(&a, &b),
        }
    }

    /// `1 - cos` of the angular distance from `p` to the arc.
    fn key(&self, p: &Vector) -> f64 {
        let ends = || half_chord2(p, &self.a).min(half_chord2(p, &self.b));
        let Some(normal) = &self.normal else {
            return ends();
        };
        let (pa, pb) = (dot(p, &self.a), dot(p, &self.b));
        // p projects inside the arc iff (a × p)·(a × b) >= 0 and (p × b)·(a × b) >= 0; by
        // Lagrange's identity on unit vectors these are the two expressions below.
        if pb - self.ab * pa >= 0.0 && pa - self.ab * pb >= 0.0 {
            let s = dot(p, normal).abs().min(1.0); // sin of the cross-track angle
            s * s / (1.0 + (1.0 - s * s).sqrt())
        } else {
            ends()
        }
    }
}

/// Which of `points` (lat, lon in degrees, one segment in order) Douglas–Peucker keeps at
/// `tolerance_m`: always the first and the last; all of them at tolerance 0.
pub fn keep(points: &[(f64, f64)], tolerance_m: f64) -> Vec<bool> {
    let n = points.len();
    if n <= 2 || tolerance_m <= 0.0 {
        return vec![true; n];
    }
    let limit = key_of_angle(tolerance_m / EARTH_RADIUS_M);
    let vectors: Vec<Vector> = points.iter().map(|&(lat, lon)| unit(lat, lon)).collect();
    let mut kept = vec![false; n];
    kept[0] = true;
    kept[n - 1] = true;
    let mut stack = vec![(0, n - 1)];
    while let Some((first, last)) = stack.pop() {
        if last <= first + 1 {
            continue;
        }
        let arc = Arc::new(vectors[first], vectors[last]);
        let (mut worst, mut at) = (f64::NEG_INFINITY, first);
        for (i, p) in vectors.iter().enumerate().take(last).skip(first + 1) {
            let key = arc.key(p);
            // NaN: no position; it must not hide behind a tolerance.
            let key = if key.is_nan() { f64::INFINITY } else { key };
            if key > worst {
                (worst, at) = (key, i);
            }
        }
        if worst > limit {
            kept[at] = true;
            stack.push((first, at));
            stack.push((at, last));
        }
    }
    kept
}

fn lat_lon(fix: &RefinedFix) -> (f64, f64) {
    fix.fix
        .as_ref()
        .map_or((f64::NAN, f64::NAN), |fix| (fix.lat, fix.lon))
}

/// Simplifies a track fed in order, one segment (or window of it) at a time.
#[derive(Debug)]
pub struct Simplifier {
    tolerance_m: f64,
    window: usize,
    /// Fixes of the open segment not decided yet.
    pending: Vec<RefinedFix>,
}

impl Simplifier {
    /// `tolerance_m` as checked by [`tolerance`].
    pub fn new(tolerance_m: f64) -> Self {
        Self::with_window(tolerance_m, WINDOW)
    }

    fn with_window(tolerance_m: f64, window: usize) -> Self {
        Self {
            tolerance_m,
            window: window.max(2),
            pending: Vec::new(),
        }
    }

    /// Takes the next fixes of the track; appends to `out` those decided and kept.
    pub fn push(&mut self, fixes: Vec<RefinedFix>, out: &mut Vec<RefinedFix>) {
        for fix in fixes {
            if self
                .pending
                .last()
                .is_some_and(|last| last.segment != fix.segment)
            {
                self.flush(out, true);
            }
            self.pending.push(fix);
            if self.pending.len() >= self.window {
                self.flush(out, false);
            }
        }
    }

    /// The end of the track: appends the kept fixes of the open segment to `out`.
    pub fn finish(&mut self, out: &mut Vec<RefinedFix>) {
        self.flush(out, true);
    }

    /// Simplifies the pending fixes; unless the segment is closed, their last fix (always
    /// kept) stays pending to open the next window.
    fn flush(&mut self, out: &mut Vec<RefinedFix>, closed: bool) {
        let points: Vec<(f64, f64)> = self.pending.iter().map(lat_lon).collect();
        let kept = keep(&points, self.tolerance_m);
        let mut pending = std::mem::take(&mut self.pending);
        let carried = if closed { None } else { pending.pop() };
        out.extend(
            pending
                .into_iter()
                .zip(kept)
                .filter_map(|(fix, kept)| kept.then_some(fix)),
        );
        self.pending.extend(carried);
    }
}

/// A track stream simplified at `tolerance_m` (> 0, checked by [`tolerance`]). An output
/// chunk's resume token is the time of its last fix, as storage makes them, so resuming
/// continues after the last fix sent; a segment cut by a resume is simplified in two parts
/// (each keeps its ends, so the guarantee holds). An error ends the stream.
pub fn simplified<S>(
    chunks: S,
    tolerance_m: f64,
) -> impl Stream<Item = Result<TrackChunk, Status>> + Send + 'static
where
    S: Stream<Item = Result<TrackChunk, Status>> + Send + 'static,
{
    let end = futures::stream::once(ready(None));
    chunks
        .map(Some)
        .chain(end)
        .scan(
            (Simplifier::new(tolerance_m), false),
            |(simplifier, failed), item| {
                if *failed {
                    return ready(None);
                }
                let mut fixes = Vec::new();
                match item {
                    Some(Ok(chunk)) => simplifier.push(chunk.fixes, &mut fixes),
                    Some(Err(status)) => {
                        *failed = true;
                        return ready(Some(vec![Err(status)]));
                    }
                    None => simplifier.finish(&mut fixes),
                }
                ready(Some(chunked(fixes)))
            },
        )
        .flat_map(futures::stream::iter)
}

fn chunked(fixes: Vec<RefinedFix>) -> Vec<Result<TrackChunk, Status>> {
    let mut chunks = Vec::with_capacity(fixes.len().div_ceil(CHUNK));
    let mut fixes = fixes.into_iter().peekable();
    while fixes.peek().is_some() {
        let part: Vec<RefinedFix> = fixes.by_ref().take(CHUNK).collect();
        let resume_token = part
            .last()
            .and_then(|last| last.fix.as_ref())
            .map(|fix| fix.time_ms.to_string())
            .unwrap_or_default();
        chunks.push(Ok(TrackChunk {
            fixes: part,
            resume_token,
        }));
    }
    chunks
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use trackmesh_proto::v1::Fix;
    use trackmesh_shared::geo::haversine_m;

    use super::*;

    fn refined(segment: u32, time_ms: i64, lat: f64, lon: f64) -> RefinedFix {
        RefinedFix {
            fix: Some(Fix {
                device_id: "v1".into(),
                time_ms,
                lat,
                lon,
                ..Fix::default()
            }),
            segment,
            ..RefinedFix::default()
        }
    }

    /// Distance from `p` to the great-circle arc a–b, by brute force: the least haversine
    /// distance to points spread along the arc (spherical interpolation), minus nothing; the
    /// caller allows for the sampling step.
    fn arc_distance_m(p: (f64, f64), a: (f64, f64), b: (f64, f64), samples: usize) -> f64 {
        let (va, vb) = (unit(a.0, a.1), unit(b.0, b.1));
        let omega = dot(&va, &vb).clamp(-1.0, 1.0).acos();
        (0..=samples)
            .map(|i| {
                let t = i as f64 / samples as f64;
                let v = if omega < 1e-12 {
                    va
                } else {
                    let (wa, wb) = (
                        ((1.0 - t) * omega).sin() / omega.sin(),
                        (t * omega).sin() / omega.sin(),
                    );
                    [
                        wa * va[0] + wb * vb[0],
                        wa * va[1] + wb * vb[1],
                        wa * va[2] + wb * vb[2],
                    ]
                };
                let lat = v[2].clamp(-1.0, 1.0).asin().to_degrees();
                let lon = v[1].atan2(v[0]).to_degrees();
                haversine_m(p.0, p.1, lat, lon)
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Checks the guarantee on one segment: every dropped point within `tolerance_m` (plus
    /// the sampling step) of the arc between the kept points around it.
    fn assert_within(points: &[(f64, f64)], kept: &[bool], tolerance_m: f64) {
        assert!(kept[0] && kept[points.len() - 1], "ends kept: {kept:?}");
        let indices: Vec<usize> = (0..points.len()).filter(|&i| kept[i]).collect();
        for pair in indices.windows(2) {
            let (a, b) = (points[pair[0]], points[pair[1]]);
            let length = haversine_m(a.0, a.1, b.0, b.1);
            let samples = 2000;
            let slack = length / samples as f64 + 1e-6 * (1.0 + tolerance_m);
            for &p in &points[pair[0] + 1..pair[1]] {
                let d = arc_distance_m(p, a, b, samples);
                assert!(
                    d <= tolerance_m + slack,
                    "dropped {p:?} is {d} m from {a:?}-{b:?}, tolerance {tolerance_m}"
                );
            }
        }
    }

    /// A point `north_m` north and `east_m` east of (lat, lon), small offsets.
    fn offset(lat: f64, lon: f64, north_m: f64, east_m: f64) -> (f64, f64) {
        let dlat = (north_m / EARTH_RADIUS_M).to_degrees();
        let dlon = (east_m / (EARTH_RADIUS_M * lat.to_radians().cos())).to_degrees();
        (lat + dlat, lon + dlon)
    }

    #[test]
    fn a_straight_line_keeps_its_ends_only() {
        // Along the equator: a great circle, so every inner point is on the arc.
        let points: Vec<(f64, f64)> = (0..100).map(|i| (0.0, f64::from(i) * 0.001)).collect();
        let kept = keep(&points, 1.0);
        let indices: Vec<usize> = (0..points.len()).filter(|&i| kept[i]).collect();
        assert_eq!(indices, [0, 99]);
    }

    #[test]
    fn a_zigzag_keeps_its_corners_above_the_tolerance_only() {
        // East along a parallel in 100 m steps; every 10th point 50 m north (a spike).
        let points: Vec<(f64, f64)> = (0..41)
            .map(|i| {
                offset(
                    40.0,
                    -74.0,
                    if i % 10 == 5 { 50.0 } else { 0.0 },
                    100.0 * i as f64,
                )
            })
            .collect();
        let indices = |tolerance: f64| -> Vec<usize> {
            let kept = keep(&points, tolerance);
            (0..points.len()).filter(|&i| kept[i]).collect()
        };
        // 20 m: the spikes and the points around them (a spike's neighbours are ~0 m off
        // the baseline but far off the lines from the spike to the ends).
        let spikes = indices(20.0);
        for spike in [5, 15, 25, 35] {
            assert!(spikes.contains(&spike), "{spikes:?}");
        }
        // 60 m: above the spikes (and the parallel's curvature over 4 km, under 2 m).
        assert_eq!(indices(60.0), [0, 40]);
        assert_within(&points, &keep(&points, 20.0), 20.0);
    }

    #[test]
    fn tolerance_zero_keeps_everything_even_duplicates() {
        let points = [(1.0, 1.0), (1.0, 1.0), (1.0, 1.5), (1.0, 2.0)];
        assert_eq!(keep(&points, 0.0), [true; 4]);
        assert_eq!(keep(&[], 10.0), Vec::<bool>::new());
        assert_eq!(keep(&[(1.0, 1.0)], 10.0), [true]);
    }

    #[test]
    fn a_point_off_a_long_arc_is_measured_on_the_sphere() {
        // New York to Lisbon: the great circle bulges far north of the straight line in
        // lat/lon, so a point on the rhumb line midway is hundreds of km off the arc.
        let (ny, lisbon) = ((40.7, -74.0), (38.7, -9.1));
        let rhumb_mid = (39.7, -41.55);
        let d = arc_distance_m(rhumb_mid, ny, lisbon, 20_000);
        assert!(d > 300_000.0, "{d}");
        let points = [ny, rhumb_mid, lisbon];
        assert_eq!(keep(&points, d - 1000.0), [true, true, true]);
        assert_eq!(keep(&points, d + 1000.0), [true, false, true]);
    }

    #[test]
    fn a_point_beyond_an_end_is_measured_to_that_end() {
        // A loop back: the middle point lies on the great circle but beyond b.
        let a = (0.0, 0.0);
        let beyond = (0.0, 0.02); // ~2.2 km east
        let b = (0.0, 0.01);
        let points = [a, beyond, b];
        assert_eq!(keep(&points, 1000.0), [true, true, true]);
        assert_eq!(keep(&points, 1200.0), [true, false, true]);
        // Both ends at the same place: distances are from that place.
        let points = [(0.0, 0.0), (0.0, 0.001), (0.0, 0.0)];
        assert_eq!(keep(&points, 100.0), [true, true, true]);
        assert_eq!(keep(&points, 120.0), [true, false, true]);
    }

    #[test]
    fn a_fix_without_a_position_is_kept() {
        let points = [(0.0, 0.0), (f64::NAN, 0.0), (0.0, 0.001), (0.0, 0.002)];
        let kept = keep(&points, 1000.0);
        assert!(kept[1], "{kept:?}");
    }

    #[test]
    fn bad_tolerances_name_the_field() {
        assert_eq!(tolerance("simplify", 2.5), Ok(2.5));
        assert_eq!(tolerance("simplify", 0.0), Ok(0.0));
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err = tolerance("simplify", bad).unwrap_err();
            assert!(err.to_string().starts_with("simplify: "), "{err}");
        }
    }

    #[test]
    fn a_million_points_simplify_without_recursion() {
        // A slow sine wave along the equator: deep splits, no stack overflow.
        let points: Vec<(f64, f64)> = (0..1_000_000)
            .map(|i| {
                let x = f64::from(i) * 1e-5;
                ((x * 10.0).sin() * 0.01, x)
            })
            .collect();
        let kept = keep(&points, 5.0);
        let count = kept.iter().filter(|&&k| k).count();
        assert!(count > 2 && count < 100_000, "{count}");
        assert!(kept[0] && kept[999_999]);
    }

    #[tokio::test]
    async fn the_stream_simplifies_per_segment_with_resume_tokens() {
        // Segment 0: a straight 5-point line; segment 3: two points; split across chunks.
        let mut fixes: Vec<RefinedFix> = (0..5)
            .map(|i| refined(0, 1000 + i, 0.0, i as f64 * 0.001))
            .collect();
        fixes.push(refined(3, 2000, 1.0, 1.0));
        fixes.push(refined(3, 2001, 1.0, 1.001));
        let input: Vec<Result<TrackChunk, Status>> = fixes
            .chunks(3)
            .map(|part| {
                Ok(TrackChunk {
                    fixes: part.to_vec(),
                    resume_token: String::new(),
                })
            })
            .collect();
        let output: Vec<TrackChunk> = simplified(futures::stream::iter(input), 1.0)
            .map(Result::unwrap)
            .collect()
            .await;
        let times: Vec<i64> = output
            .iter()
            .flat_map(|chunk| &chunk.fixes)
            .map(|fix| fix.fix.as_ref().unwrap().time_ms)
            .collect();
        assert_eq!(times, [1000, 1004, 2000, 2001]);
        for chunk in &output {
            let last = chunk.fixes.last().unwrap().fix.as_ref().unwrap().time_ms;
            assert_eq!(chunk.resume_token, last.to_string());
        }
    }

    #[tokio::test]
    async fn an_error_ends_the_stream() {
        let input = vec![
            Ok(TrackChunk {
                fixes: vec![refined(0, 1, 0.0, 0.0), refined(0, 2, 0.0, 1.0)],
                resume_token: "2".into(),
            }),
            Err(Status::unavailable("gone")),
            Ok(TrackChunk::default()),
        ];
        let output: Vec<Result<TrackChunk, Status>> = simplified(futures::stream::iter(input), 1.0)
            .collect()
            .await;
        assert_eq!(output.len(), 1, "{output:?}");
        assert_eq!(
            output[0].as_ref().unwrap_err().code(),
            tonic::Code::Unavailable
        );
    }

    /// A wandering track: segments of random walks (steps up to ~300 m), around a random
    /// start away from the poles.
    fn track() -> impl Strategy<Value = Vec<(u32, (f64, f64))>> {
        let walk = (
            -60.0..60.0f64,
            -179.0..179.0f64,
            prop::collection::vec((-300.0..300.0f64, -300.0..300.0f64), 1..60),
        );
        prop::collection::vec((walk, 1..3u32), 1..4).prop_map(|segments| {
            let mut out = Vec::new();
            let mut number = 0;
            for ((lat, lon, steps), gap) in segments {
                let mut here = (lat, lon);
                for (north, east) in steps {
                    out.push((number, here));
                    here = offset(here.0, here.1, north, east);
                }
                number += gap;
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn simplified_tracks_keep_the_guarantee(
            track in track(),
            tolerance in prop_oneof![Just(0.0), 0.5..2000.0f64],
            window in 2..40usize,
        ) {
            let fixes: Vec<RefinedFix> = track
                .iter()
                .enumerate()
                .map(|(i, &(segment, (lat, lon)))| refined(segment, i as i64, lat, lon))
                .collect();
            let mut simplifier = Simplifier::with_window(tolerance, window);
            let mut out = Vec::new();
            for part in fixes.chunks(7) {
                simplifier.push(part.to_vec(), &mut out);
            }
            simplifier.finish(&mut out);
            let times: Vec<i64> = out.iter().map(|f| f.fix.as_ref().unwrap().time_ms).collect();
            // A subsequence in order (times are the input indices).
            prop_assert!(times.windows(2).all(|w| w[0] < w[1]), "{:?}", times);
            if tolerance == 0.0 {
                prop_assert_eq!(times.len(), fixes.len());
            }
            // Per segment: first and last kept, every dropped point within the tolerance.
            let mut start = 0;
            while start < track.len() {
                let segment = track[start].0;
                let end = start + track[start..].iter().take_while(|p| p.0 == segment).count();
                let points: Vec<(f64, f64)> = track[start..end].iter().map(|p| p.1).collect();
                let kept: Vec<bool> = (start..end).map(|i| times.contains(&(i as i64))).collect();
                assert_within(&points, &kept, tolerance);
                start = end;
            }
        }
    }
}
