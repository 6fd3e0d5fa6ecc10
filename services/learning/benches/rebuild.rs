//! Throughput of what a Rebuild does per chunk, without I/O: `model::observe` over one long
//! synthetic track (a vessel's million fixes: stays in port, voyages, now and then a gap) in
//! chunks of 5 000 fixes, as the gateway streams stored fixes.
//!
//! `cargo bench -p learning --bench rebuild` prints fixes/s, stays and trips.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::Instant;

use learning::{
    calendar::Calendar,
    model::{self, Model, Point, Rules},
};

const FIXES: usize = 1_000_000;
const CHUNK: usize = 5_000;
/// Monday 2024-01-01 00:00 UTC.
const T0: i64 = 1_704_067_200_000;
const PORTS: [(f64, f64); 4] = [
    (36.85, -76.30),
    (36.95, -76.00),
    (37.30, -76.20),
    (36.60, -75.90),
];

/// Fix `i`: a cycle of 400 fixes a minute apart, 240 in port with a few metres of jitter,
/// then 160 under way to the next port; every 50th cycle starts after a 13-hour gap.
fn point(i: usize) -> Point {
    let (cycle, step) = (i / 400, i % 400);
    let from = PORTS[cycle % PORTS.len()];
    let to = PORTS[(cycle + 1) % PORTS.len()];
    let gaps = (cycle / 50) as i64;
    let time_ms = T0 + i as i64 * 60_000 + gaps * 13 * 3_600_000;
    let (lat, lon) = if step < 240 {
        let h = (i * 104_729) % 1000;
        (
            from.0 + (h as f64 - 500.0) * 2e-7,
            from.1 + ((h * 37) % 1000) as f64 * 2e-7,
        )
    } else {
        let f = (step - 239) as f64 / 161.0;
        (from.0 + (to.0 - from.0) * f, from.1 + (to.1 - from.1) * f)
    };
    Point { time_ms, lat, lon }
}

fn main() {
    let rules = Rules {
        stay_radius_m: 200.0,
        stay_min_duration_ms: 20 * 60_000,
        place_radius_m: 200.0,
        max_places: 200,
        max_speed_kmh: 150.0,
        max_time_diff_ms: 12 * 3_600_000,
        min_label_visits: 3,
        calendar: Calendar::default(),
    };
    let points: Vec<Point> = (0..FIXES).map(point).collect();
    let mut model = Model::default();
    let (mut stays, mut trips) = (0, 0);
    let started = Instant::now();
    for chunk in points.chunks(CHUNK) {
        let outcome = model::observe(&mut model, chunk, &rules);
        stays += outcome.stays.len();
        trips += outcome.trips.len();
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(model.fixes_observed, FIXES as u64);
    println!(
        "rebuild (model::observe, {CHUNK}-fix chunks): {FIXES} fixes in {elapsed:.2} s = {:.0} fixes/s; {stays} stays, {trips} trips, {} places",
        FIXES as f64 / elapsed,
        model.places.len()
    );
}
