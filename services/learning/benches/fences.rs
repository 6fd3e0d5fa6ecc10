//! Geofence evaluation cost per fix: one device driving through a tenant's 0, 100 and 10 000
//! fences (half circles, half concave polygons, random in a 100 km square), pure logic, no I/O.
//!
//! `cargo bench -p learning --bench fences` prints the time per fix and the events, for each
//! fence count.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::{hint::black_box, time::Instant};

use learning::fence::{Fence, Fences, evaluate};
use serde_json::json;
use testkit::Rng;
use trackmesh_shared::{
    domain::Fix,
    event_messages::{Circle, Geofence},
};

/// South-west corner of the square.
const LAT0: f64 = 52.0;
const LON0: f64 = 4.5;
const SIDE_M: f64 = 100_000.0;
const M_PER_DEG: f64 = 111_195.08;
/// A fix every 5 s at 15 m/s with 10 m accuracy, zig-zagging across the square.
const FIXES: usize = 200_000;
const STEP_M: f64 = 75.0;
const WARM_UP: usize = 2_000;

/// (lat, lon) of the point `north_m`, `east_m` from the square's south-west corner.
fn at(north_m: f64, east_m: f64) -> (f64, f64) {
    (
        LAT0 + north_m / M_PER_DEG,
        LON0 + east_m / (M_PER_DEG * LAT0.to_radians().cos()),
    )
}

/// `count` fences: circles of 50 m to 2 km, and star-shaped polygons of 4 to 40 vertices.
fn fences(count: usize) -> Fences {
    let mut rng = Rng(7);
    let list = (0..count)
        .map(|i| {
            let (n, e) = (rng.range(0.0, SIDE_M), rng.range(0.0, SIDE_M));
            let size = rng.range(50.0, 2000.0);
            let mut geofence = Geofence {
                geofence_id: format!("fence-{i:05}"),
                name: format!("fence {i}"),
                ..Geofence::default()
            };
            if i.is_multiple_of(2) {
                let (lat, lon) = at(n, e);
                geofence.circle = Some(Circle {
                    lat,
                    lon,
                    radius_m: size,
                });
            } else {
                let vertices = 4 + (rng.u64() % 37) as usize;
                let ring = rng.star(vertices, size, |dn, de| at(n + dn, e + de));
                geofence.polygon_geojson =
                    json!({"type": "Polygon", "coordinates": [ring]}).to_string();
            }
            Fence::new(&geofence).unwrap()
        })
        .collect();
    Fences::new(list)
}

/// Fix `i` of the device: east and west across the square, 1 km further north each pass.
fn fix(i: usize) -> Fix {
    let along = i as f64 * STEP_M;
    let pass = (along / SIDE_M) as usize;
    let x = along % SIDE_M;
    let east = if pass.is_multiple_of(2) {
        x
    } else {
        SIDE_M - x
    };
    let (lat, lon) = at((pass as f64 * 1000.0) % SIDE_M, east);
    Fix {
        device_id: "bench".into(),
        time_ms: 1_750_000_000_000 + i as i64 * 5_000,
        lat,
        lon,
        accuracy_m: Some(10.0),
        ..Fix::default()
    }
}

fn main() {
    let track: Vec<Fix> = (0..WARM_UP + FIXES).map(fix).collect();
    for count in [0, 100, 10_000] {
        let started = Instant::now();
        let fences = fences(count);
        let built = started.elapsed();
        let mut states = Vec::new();
        for f in &track[..WARM_UP] {
            black_box(evaluate(&mut states, &fences, "bench", f, 0));
        }
        let mut events = 0;
        let started = Instant::now();
        for f in &track[WARM_UP..] {
            events += black_box(evaluate(&mut states, &fences, "bench", f, 0)).len();
        }
        let elapsed = started.elapsed();
        // What the index saves: locating each fix in every fence, the least a scan would do.
        let sample = &track[WARM_UP..WARM_UP + 2_000];
        let started = Instant::now();
        for f in sample {
            for fence in fences.iter() {
                black_box(fence.locate(f.lat, f.lon, f.accuracy_m));
            }
        }
        let scan = started.elapsed();
        println!(
            "fences {count:>6}: {:>7.0} ns/fix over {FIXES} fixes ({events} events); \
             testing every fence instead: {:>9.0} ns/fix; validating and indexing the fences: \
             {:.1} ms",
            elapsed.as_nanos() as f64 / FIXES as f64,
            scan.as_nanos() as f64 / sample.len() as f64,
            built.as_secs_f64() * 1e3,
        );
    }
}
