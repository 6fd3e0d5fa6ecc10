//! Stay edges, places, transitions, labels and predictions, and the properties of the model
//! over arbitrary streams (batch splitting and re-observing change nothing).

use proptest::prelude::*;

use super::*;
use crate::calendar::HOUR_MS;

const MINUTE_MS: i64 = 60_000;
/// Monday 2024-01-01 00:00 UTC.
const T0: i64 = 1_704_067_200_000;
/// Metres per degree of latitude on the sphere `geo` uses.
const M_PER_DEG: f64 = 111_195.08;
const BASE: (f64, f64) = (36.85, -76.30);

fn rules() -> Rules {
    Rules {
        stay_radius_m: 200.0,
        stay_min_duration_ms: 20 * MINUTE_MS,
        place_radius_m: 200.0,
        max_places: 50,
        max_speed_kmh: 150.0,
        max_time_diff_ms: 12 * HOUR_MS,
        min_label_visits: 3,
        calendar: Calendar::default(),
    }
}

/// A point `east_m`, `north_m` metres from `BASE`.
fn at(time_ms: i64, east_m: f64, north_m: f64) -> Point {
    Point {
        time_ms,
        lat: BASE.0 + north_m / M_PER_DEG,
        lon: BASE.1 + east_m / (M_PER_DEG * BASE.0.to_radians().cos()),
    }
}

/// A fix every `every` from `from` (inclusive) to `to` (inclusive) at one spot.
fn dwell(from: i64, to: i64, every: i64, east_m: f64, north_m: f64) -> Vec<Point> {
    (0..)
        .map(|i| from + i * every)
        .take_while(|t| *t <= to)
        .map(|t| at(t, east_m, north_m))
        .collect()
}

fn run(points: &[Point], rules: &Rules) -> (Model, Outcome) {
    let mut model = Model::default();
    let outcome = observe(&mut model, points, rules);
    (model, outcome)
}

/// The forecast over the known places only (what `predict` gives them before keeping
/// `novelty` for a place never seen).
fn among_known(model: &Model, forecast: &Forecast) -> Vec<(u32, f64)> {
    let known = 1.0 - novelty(model);
    forecast
        .next
        .iter()
        .map(|(id, p)| (*id, p / known))
        .collect()
}

// ---- stay detection edges

#[test]
fn exactly_the_radius_has_left() {
    let anchor = at(T0, 0.0, 0.0);
    let edge = at(T0 + 25 * MINUTE_MS, 150.0, 130.0);
    let distance = geo::haversine_m(anchor.lat, anchor.lon, edge.lat, edge.lon);
    let mut points = dwell(T0, T0 + 20 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.push(edge);

    // At exactly the radius the device has left: the stay closes at that fix.
    let exact = Rules {
        stay_radius_m: distance,
        ..rules()
    };
    let (model, outcome) = run(&points, &exact);
    assert_eq!(outcome.stays.len(), 1);
    assert_eq!(outcome.stays[0].start_ms, T0);
    assert_eq!(outcome.stays[0].end_ms, edge.time_ms);
    assert_eq!(outcome.stays[0].fixes, 21);
    assert_eq!(
        model.candidate.as_ref().map(|c| c.start_ms),
        Some(edge.time_ms)
    );

    // A hair further out, the same fix is inside and the stay goes on.
    let wider = Rules {
        stay_radius_m: distance.next_up(),
        ..rules()
    };
    let (model, outcome) = run(&points, &wider);
    assert!(outcome.stays.is_empty());
    assert_eq!(model.candidate.as_ref().map(|c| c.fixes), Some(22));
}

#[test]
fn exactly_the_duration_is_a_stay() {
    let mut points = dwell(T0, T0 + 15 * MINUTE_MS, 5 * MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 20 * MINUTE_MS, 1_000.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 1);
    assert_eq!(
        outcome.stays[0].end_ms - outcome.stays[0].start_ms,
        20 * MINUTE_MS
    );

    // One millisecond short: not a stay, and the far fix anchors the next candidate.
    let last = points.len() - 1;
    points[last].time_ms -= 1;
    let (model, outcome) = run(&points, &rules());
    assert!(outcome.stays.is_empty());
    assert_eq!(model.places.len(), 0);
    assert_eq!(
        model.candidate.as_ref().map(|c| c.start_ms),
        Some(T0 + 20 * MINUTE_MS - 1)
    );
}

#[test]
fn gap_inside_a_stay_keeps_it_open() {
    // Fixes, then nothing for 11 hours, then fixes at the same spot, then the device leaves.
    let mut points = dwell(T0, T0 + 10 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let back = T0 + 10 * MINUTE_MS + 11 * HOUR_MS;
    points.extend(dwell(back, back + 5 * MINUTE_MS, MINUTE_MS, 20.0, 0.0));
    points.push(at(back + 6 * MINUTE_MS, 900.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 1);
    assert_eq!(
        (outcome.stays[0].start_ms, outcome.stays[0].end_ms),
        (T0, back + 6 * MINUTE_MS)
    );
}

#[test]
fn gap_over_max_time_diff_closes_at_the_last_fix() {
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let back = T0 + 30 * MINUTE_MS + 12 * HOUR_MS + 1;
    points.extend(dwell(back, back + 10 * MINUTE_MS, MINUTE_MS, 0.0, 0.0));
    let (model, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 1);
    assert_eq!(
        (outcome.stays[0].start_ms, outcome.stays[0].end_ms),
        (T0, T0 + 30 * MINUTE_MS)
    );
    assert_eq!(model.candidate.as_ref().map(|c| c.start_ms), Some(back));

    // Exactly MAX_TIME_DIFF is not a gap yet.
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 30 * MINUTE_MS + 12 * HOUR_MS, 0.0, 0.0));
    let (model, outcome) = run(&points, &rules());
    assert!(outcome.stays.is_empty());
    assert_eq!(model.candidate.as_ref().map(|c| c.fixes), Some(32));

    // A short candidate before a gap is no stay.
    let mut points = dwell(T0, T0 + 19 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 13 * HOUR_MS, 0.0, 0.0));
    assert!(run(&points, &rules()).1.stays.is_empty());
}

#[test]
fn jump_faster_than_max_speed_closes_at_the_last_fix() {
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    // 10 km in one minute: 600 km/h.
    points.push(at(T0 + 31 * MINUTE_MS, 10_000.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 1);
    assert_eq!(outcome.stays[0].end_ms, T0 + 30 * MINUTE_MS);

    // 10 km in 10 minutes (60 km/h): an ordinary departure, ending at the outside fix.
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 40 * MINUTE_MS, 10_000.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays[0].end_ms, T0 + 40 * MINUTE_MS);
}

#[test]
fn stay_open_at_the_end_of_a_batch_is_closed_by_the_next() {
    let rules = rules();
    let mut model = Model::default();
    let first = observe(
        &mut model,
        &dwell(T0, T0 + 45 * MINUTE_MS, 5 * MINUTE_MS, 0.0, 0.0),
        &rules,
    );
    assert_eq!((first.observed, first.stays.len()), (10, 0));
    let open = current_stay(&model, &rules).expect("open stay past the minimum duration");
    assert_eq!(
        (open.start_ms, open.end_ms, open.place_id),
        (T0, T0 + 45 * MINUTE_MS, 0)
    );

    let second = observe(
        &mut model,
        &[
            at(T0 + 50 * MINUTE_MS, 10.0, 0.0),
            at(T0 + 55 * MINUTE_MS, 2_000.0, 0.0),
        ],
        &rules,
    );
    assert_eq!(second.stays.len(), 1);
    assert_eq!(second.places_created, 1);
    let stay = &second.stays[0];
    assert_eq!(
        (stay.start_ms, stay.end_ms, stay.fixes),
        (T0, T0 + 55 * MINUTE_MS, 11)
    );
    assert_eq!(stay.place_id, 1);
    assert!(current_stay(&model, &rules).is_none(), "just left");
}

// ---- trips

/// Distance, fastest hop and count of the fixes of `points` (time-ordered) within
/// `from..=to`: a trip computed the slow way.
fn brute_trip(points: &[Point], from: i64, to: i64) -> (f64, f64, u32) {
    let inside: Vec<&Point> = points
        .iter()
        .filter(|p| from <= p.time_ms && p.time_ms <= to)
        .collect();
    let (mut distance, mut fastest) = (0.0, 0.0f64);
    for hop in inside.windows(2) {
        let m = geo::haversine_m(hop[0].lat, hop[0].lon, hop[1].lat, hop[1].lon);
        distance += m;
        fastest = fastest.max(geo::speed_kmh(m, hop[1].time_ms - hop[0].time_ms));
    }
    (distance, fastest, inside.len() as u32)
}

#[test]
fn trip_runs_from_the_end_of_one_stay_to_the_start_of_the_next() {
    // Home for 30 minutes, a drive east with short halts (candidates that are no stay), work
    // for 40 minutes, then away.
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let drive = [
        (32, 800.0),
        (34, 1_900.0),
        (35, 1_950.0),
        (37, 3_200.0),
        (40, 5_000.0),
    ];
    points.extend(
        drive
            .iter()
            .map(|(m, east)| at(T0 + m * MINUTE_MS, *east, 0.0)),
    );
    points.extend(dwell(
        T0 + 41 * MINUTE_MS,
        T0 + 80 * MINUTE_MS,
        MINUTE_MS,
        5_010.0,
        0.0,
    ));
    points.push(at(T0 + 85 * MINUTE_MS, 9_000.0, 0.0));
    let (model, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 2);
    let (home, work) = (&outcome.stays[0], &outcome.stays[1]);
    // Home ends at the first fix outside its radius; work starts at the drive's last fix.
    assert_eq!(
        (home.end_ms, work.start_ms),
        (T0 + 32 * MINUTE_MS, T0 + 40 * MINUTE_MS)
    );
    assert_eq!(outcome.trips.len(), 1);
    let trip = &outcome.trips[0];
    assert_eq!((&trip.from, &trip.to), (home, work));
    let (distance, fastest, fixes) = brute_trip(&points, home.end_ms, work.start_ms);
    assert_eq!(fixes, 5);
    assert_eq!(trip.fixes, fixes);
    assert!(
        (trip.distance_m - distance).abs() < 1e-6,
        "{} vs {distance}",
        trip.distance_m
    );
    assert!((distance - 4_200.0).abs() < 1.0, "{distance}");
    assert_eq!(trip.max_speed_kmh, fastest);

    let message = trip.to_trip("v1");
    assert_eq!(
        (message.start_ms, message.end_ms),
        (home.end_ms, work.start_ms)
    );
    let from = message.from_place.expect("from place");
    assert_eq!(
        (from.place_id.as_str(), from.lat, from.lon),
        ("p1", home.lat, home.lon)
    );
    let to = message.to_place.expect("to place");
    assert_eq!(
        (to.place_id.as_str(), to.lat, to.lon),
        ("p2", work.lat, work.lon)
    );
    // 4.2 km in 8 minutes.
    assert!(
        (message.mean_speed_kmh - 31.5).abs() < 0.01,
        "{}",
        message.mean_speed_kmh
    );
    assert_eq!((message.fixes, message.device_id.as_str()), (5, "v1"));

    // The next trip has begun at work's end: the fix that left.
    let open = model.trip.expect("trip in progress");
    assert_eq!(
        (open.start_ms, open.fixes, open.distance_m),
        (T0 + 85 * MINUTE_MS, 1, 0.0)
    );
}

#[test]
fn trip_after_a_gap_starts_at_the_stays_last_fix() {
    // A stay closed by a gap: it ends at its last fix, and the trip takes the gap's hop.
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let back = T0 + 30 * MINUTE_MS + 13 * HOUR_MS;
    points.push(at(back, 3_000.0, 0.0));
    points.extend(dwell(
        back + MINUTE_MS,
        back + 40 * MINUTE_MS,
        MINUTE_MS,
        6_000.0,
        0.0,
    ));
    points.push(at(back + 50 * MINUTE_MS, 12_000.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 2);
    assert_eq!(outcome.stays[0].end_ms, T0 + 30 * MINUTE_MS);
    let trip = &outcome.trips[0];
    assert_eq!(
        (trip.start_ms, trip.end_ms),
        (T0 + 30 * MINUTE_MS, back + MINUTE_MS)
    );
    let (distance, fastest, fixes) = brute_trip(&points, trip.start_ms, trip.end_ms);
    assert_eq!((trip.fixes, fixes), (3, 3));
    assert!((trip.distance_m - distance).abs() < 1e-6);
    assert_eq!(trip.max_speed_kmh, fastest);
}

#[test]
fn a_stay_straight_after_a_stay_is_a_trip_of_one_fix() {
    // Leaving home, the device halts at once at the first fix outside for 20 minutes.
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.extend(dwell(
        T0 + 31 * MINUTE_MS,
        T0 + 60 * MINUTE_MS,
        MINUTE_MS,
        1_000.0,
        0.0,
    ));
    points.push(at(T0 + 70 * MINUTE_MS, 5_000.0, 0.0));
    let (_, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 2);
    let trip = outcome.trips[0].to_trip("v1");
    assert_eq!(
        (trip.start_ms, trip.end_ms, trip.fixes),
        (T0 + 31 * MINUTE_MS, T0 + 31 * MINUTE_MS, 1)
    );
    assert_eq!(
        (trip.distance_m, trip.max_speed_kmh, trip.mean_speed_kmh),
        (0.0, 0.0, 0.0)
    );
}

#[test]
fn no_trip_before_the_first_stay_nor_in_a_model_from_before_trips() {
    let rules = rules();
    let first = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let mut later = vec![at(T0 + 40 * MINUTE_MS, 5_000.0, 0.0)];
    later.extend(dwell(
        T0 + 41 * MINUTE_MS,
        T0 + 70 * MINUTE_MS,
        MINUTE_MS,
        5_000.0,
        0.0,
    ));
    later.push(at(T0 + 80 * MINUTE_MS, 0.0, 0.0));
    let mut model = Model::default();
    let outcome = observe(&mut model, &first, &rules);
    assert!(
        outcome.trips.is_empty() && model.trip.is_none(),
        "no stay closed yet"
    );

    // A model written before trips: its last stay is known but no trip was accumulated, so
    // the stay it closes next starts one rather than ending one from the middle.
    let mut old = model.clone();
    let both: Vec<Point> = first.iter().chain(&later).copied().collect();
    let (_, whole) = run(&both, &rules);
    assert_eq!((whole.stays.len(), whole.trips.len()), (2, 1));
    observe(&mut old, &later[..1], &rules);
    assert!(old.trip.is_some());
    old.trip = None;
    let outcome = observe(&mut old, &later[1..], &rules);
    assert_eq!(outcome.stays.len(), 1);
    assert!(outcome.trips.is_empty());
    assert!(old.trip.is_some(), "the next trip is accumulated");
}

#[test]
fn centroid_is_the_mean_of_the_stay_fixes() {
    let points = [
        at(T0, 0.0, 0.0),
        at(T0 + 10 * MINUTE_MS, 100.0, 0.0),
        at(T0 + 20 * MINUTE_MS, 50.0, 90.0),
        at(T0 + 30 * MINUTE_MS, 5_000.0, 0.0),
    ];
    let (_, outcome) = run(&points, &rules());
    let stay = &outcome.stays[0];
    let expected = at(0, 50.0, 30.0);
    assert!(geo::haversine_m(stay.lat, stay.lon, expected.lat, expected.lon) < 0.01);
}

#[test]
fn centroid_across_the_antimeridian() {
    let points = [
        Point {
            time_ms: T0,
            lat: 10.0,
            lon: 179.9995,
        },
        Point {
            time_ms: T0 + 15 * MINUTE_MS,
            lat: 10.0,
            lon: -179.9995,
        },
        Point {
            time_ms: T0 + 2 * HOUR_MS,
            lat: 10.5,
            lon: 179.0,
        },
    ];
    let (_, outcome) = run(&points, &rules());
    let stay = &outcome.stays[0];
    assert!(stay.lon.abs() > 179.99, "{stay:?}");
    assert!(
        geo::haversine_m(stay.lat, stay.lon, 10.0, 180.0) < 1.0,
        "{stay:?}"
    );
}

// ---- the watermark

#[test]
fn fixes_at_or_before_the_watermark_are_ignored() {
    let rules = rules();
    let points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    let mut model = Model::default();
    observe(&mut model, &points, &rules);
    let before = model.clone();
    let again = observe(&mut model, &points, &rules);
    assert_eq!((again.observed, again.ignored), (0, 31));
    assert!(!again.changed());
    assert_eq!(model, before);
    // The same time at another position: the first one sent counts.
    let twin = observe(&mut model, &[at(T0 + 30 * MINUTE_MS, 500.0, 0.0)], &rules);
    assert_eq!(twin.ignored, 1);
    assert_eq!(model, before);
}

#[test]
fn out_of_order_fixes_in_a_batch_are_sorted() {
    let mut points = dwell(T0, T0 + 30 * MINUTE_MS, MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 31 * MINUTE_MS, 3_000.0, 0.0));
    let (sorted_model, sorted) = run(&points, &rules());
    points.reverse();
    points.swap(3, 17);
    let (model, outcome) = run(&points, &rules());
    assert_eq!(outcome, sorted);
    assert_eq!(model, sorted_model);
    assert_eq!(outcome.stays.len(), 1);
}

// ---- places and transitions

/// Stays at the given spots (metres from BASE), 2 hours each, with a fix on the road 20 km
/// away 15 minutes after each (which closes the stay, and is too short to be one itself).
fn itinerary(spots: &[(f64, f64)]) -> Vec<Point> {
    let mut points = Vec::new();
    let mut t = T0;
    for (east, north) in spots {
        points.extend(dwell(t, t + 2 * HOUR_MS, 10 * MINUTE_MS, *east, *north));
        points.push(at(
            t + 2 * HOUR_MS + 15 * MINUTE_MS,
            *east,
            north + 20_000.0,
        ));
        t += 2 * HOUR_MS + 30 * MINUTE_MS;
    }
    points
}

#[test]
fn near_stays_join_one_place_with_a_dwell_weighted_centroid() {
    let mut points = dwell(T0, T0 + HOUR_MS, 10 * MINUTE_MS, 0.0, 0.0);
    points.push(at(T0 + 70 * MINUTE_MS, 3_000.0, 0.0));
    // Back 10 minutes later, 150 m east of the first spot, for three hours.
    let back = T0 + 80 * MINUTE_MS;
    points.extend(dwell(back, back + 3 * HOUR_MS, 10 * MINUTE_MS, 150.0, 0.0));
    points.push(at(back + 3 * HOUR_MS + 10 * MINUTE_MS, 3_000.0, 0.0));
    let (model, outcome) = run(&points, &rules());
    assert_eq!(outcome.stays.len(), 2);
    assert_eq!(model.places.len(), 1, "{:?}", model.places);
    let place = &model.places[0];
    assert_eq!(place.visits, 2);
    assert_eq!(place.dwell_ms, 70 * MINUTE_MS + 190 * MINUTE_MS);
    assert_eq!(
        (place.first_ms, place.last_ms),
        (T0, back + 190 * MINUTE_MS)
    );
    // Weighted by dwell: 70 minutes at 0 m, 190 minutes at 150 m.
    let expected = at(0, 150.0 * 190.0 / 260.0, 0.0);
    assert!(geo::haversine_m(place.lat, place.lon, expected.lat, expected.lon) < 0.5);
    assert_eq!(
        place.dwell_by_hour_ms.iter().sum::<u64>(),
        u64::try_from(place.dwell_ms).unwrap()
    );
    assert!(model.transitions.is_empty(), "same place twice is no move");
}

#[test]
fn transitions_count_moves_between_different_places() {
    let (home, work, shop) = ((0.0, 0.0), (5_000.0, 0.0), (0.0, 5_000.0));
    let (model, outcome) = run(
        &itinerary(&[home, work, work, home, shop, home, work]),
        &rules(),
    );
    assert_eq!(outcome.stays.len(), 7);
    assert_eq!(outcome.places_created, 3);
    let count = |from, to| {
        model
            .transitions
            .iter()
            .find(|t| t.from == from && t.to == to)
            .map_or(0, |t| t.count)
    };
    assert_eq!(
        (count(1, 2), count(2, 1), count(1, 3), count(3, 1)),
        (2, 1, 1, 1)
    );
    assert_eq!(count(2, 2), 0);
    assert_eq!(model.last_place_id, 2);
    assert_eq!(model.stays, 7);
}

#[test]
fn full_device_evicts_the_place_with_least_dwell() {
    let rules = Rules {
        max_places: 2,
        ..rules()
    };
    // p1 twice (most dwell), p2 once, then a new spot: p2 goes, with its transitions.
    let (a, b, c) = ((0.0, 0.0), (5_000.0, 0.0), (0.0, 5_000.0));
    let (model, outcome) = run(&itinerary(&[a, b, a, c]), &rules);
    assert_eq!((outcome.places_created, outcome.places_evicted), (3, 1));
    let ids: Vec<u32> = model.places.iter().map(|p| p.id).collect();
    assert_eq!(ids, [1, 3]);
    assert_eq!(
        model.transitions,
        [Transition {
            from: 1,
            to: 3,
            count: 1,
            // Left the second stay at p1 at 07:15 on Monday: the 06-12 bin.
            by_time_of_day: vec![0, 1, 0, 0],
            last_ms: T0 + 7 * HOUR_MS + 15 * MINUTE_MS,
        }]
    );
}

#[test]
fn evicting_the_last_place_forgets_where_the_device_came_from() {
    let rules = Rules {
        max_places: 1,
        ..rules()
    };
    let (model, outcome) = run(&itinerary(&[(0.0, 0.0), (5_000.0, 0.0)]), &rules);
    assert_eq!((outcome.places_created, outcome.places_evicted), (2, 1));
    assert_eq!(model.places.len(), 1);
    assert!(model.transitions.is_empty());
    assert_eq!(model.last_place_id, 2);
}

// ---- labels and predictions

/// Night at home, weekdays at work, from Monday for `days` days (UTC).
fn routine(days: i64) -> Vec<Point> {
    let day_ms = 24 * HOUR_MS;
    let mut points = Vec::new();
    for day in 0..days {
        let midnight = T0 + day * day_ms;
        points.extend(dwell(
            midnight,
            midnight + 8 * HOUR_MS,
            15 * MINUTE_MS,
            0.0,
            0.0,
        ));
        if day % 7 < 5 {
            points.extend(dwell(
                midnight + 9 * HOUR_MS,
                midnight + 17 * HOUR_MS,
                15 * MINUTE_MS,
                8_000.0,
                0.0,
            ));
        }
        points.extend(dwell(
            midnight + 18 * HOUR_MS,
            midnight + day_ms - MINUTE_MS,
            15 * MINUTE_MS,
            0.0,
            0.0,
        ));
    }
    points
}

#[test]
fn home_has_the_night_and_work_the_weekday_hours() {
    let rules = rules();
    let (model, _) = run(&routine(7), &rules);
    let labels = labels(&model, &rules);
    assert_eq!(
        labels,
        Labels {
            home: Some(1),
            work: Some(2)
        }
    );
    assert_eq!(labels.of(1), PlaceLabel::Home);
    assert_eq!(labels.of(2), PlaceLabel::Work);
}

#[test]
fn labels_need_enough_visits() {
    // Two days: two closed stays at home and two at work.
    let lenient = Rules {
        min_label_visits: 2,
        ..rules()
    };
    let (model, _) = run(&routine(2), &lenient);
    assert_eq!(
        labels(&model, &lenient),
        Labels {
            home: Some(1),
            work: Some(2)
        }
    );
    assert_eq!(labels(&model, &rules()), Labels::default());
}

#[test]
fn labels_follow_the_configured_offset() {
    // At UTC-12 the "nights" of `routine` are at midday and its work hours in the evening.
    let rules = Rules {
        calendar: Calendar {
            utc_offset_ms: -12 * HOUR_MS,
            ..Calendar::default()
        },
        ..rules()
    };
    let (model, _) = run(&routine(7), &rules);
    let labels = labels(&model, &rules);
    assert_eq!(labels.home, Some(2), "{labels:?}");
    assert_eq!(labels.work, Some(1), "{labels:?}");
}

#[test]
fn predicts_from_the_last_place() {
    let rules = rules();
    let (home, work, shop) = ((0.0, 0.0), (5_000.0, 0.0), (0.0, 5_000.0));
    let mut points = itinerary(&[home, work, home, shop, home, work, home]);
    // At home again since 15:00 (no leaving fix): home is where the forecast starts from.
    points.pop();
    let (model, _) = run(&points, &rules);
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.from, Some(1));
    // Home → work twice, home → shop once: 2/3 and 1/3 on all moves (the visits, equally
    // far, say the same). In the 12-18 bin of now (17:00) home → work once (at 12:15):
    // (1 + 2/3) / 2 for work, (0 + 1/3) / 2 for shop.
    let next = among_known(&model, &forecast);
    assert_eq!(next.iter().map(|n| n.0).collect::<Vec<_>>(), [2, 3]);
    assert!((next[0].1 - 5.0 / 6.0).abs() < 1e-6, "{forecast:?}");
    assert!((next[1].1 - 1.0 / 6.0).abs() < 1e-6, "{forecast:?}");
    assert_eq!(predict(&model, &rules, 1).next.len(), 1);
}

#[test]
fn novelty_keeps_a_share_for_places_never_seen() {
    let rules = rules();
    let (home, work) = ((0.0, 0.0), (5_000.0, 0.0));
    // Five stays founded two places: (2 + 1) / (5 + 2) of the mass is for a new place.
    let (model, _) = run(&itinerary(&[home, work, home, work, home]), &rules);
    assert_eq!((model.stays, model.places.len()), (5, 2));
    assert!((novelty(&model) - 3.0 / 7.0).abs() < 1e-12);
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.next.len(), 1);
    assert!(
        (forecast.next[0].1 - 4.0 / 7.0).abs() < 1e-9,
        "{forecast:?}"
    );
    assert_eq!(novelty(&Model::default()), 0.5);
}

/// Home A; mornings A → B → A, afternoons A → C → A, every day. Plain counts from A are a
/// tie; the time of day of departure separates them.
fn two_errands(days: i64) -> Vec<Point> {
    let (a, b, c) = ((0.0, 0.0), (4_000.0, 0.0), (-4_000.0, 0.0));
    let mut points = Vec::new();
    for day in 0..days {
        let d = T0 + day * 24 * HOUR_MS;
        for (spot, from_h, to_h) in [(a, 0, 7), (b, 8, 11), (a, 12, 14), (c, 15, 19), (a, 20, 24)] {
            points.extend(dwell(
                d + from_h * HOUR_MS,
                d + to_h * HOUR_MS - 10 * MINUTE_MS,
                10 * MINUTE_MS,
                spot.0,
                spot.1,
            ));
        }
    }
    points
}

#[test]
fn the_time_of_day_of_departure_picks_the_next_place() {
    let rules = rules();
    let mut points = two_errands(3);
    let day = T0 + 3 * 24 * HOUR_MS;
    // Day 4, at home until 06:50: the morning errand comes next.
    points.extend(dwell(
        day,
        day + 6 * HOUR_MS + 50 * MINUTE_MS,
        10 * MINUTE_MS,
        0.0,
        0.0,
    ));
    let (model, _) = run(&points, &rules);
    let morning = predict(&model, &rules, 3);
    assert_eq!(morning.from, Some(1));
    assert_eq!(morning.next.first().map(|n| n.0), Some(2), "{morning:?}");
    assert!(among_known(&model, &morning)[0].1 > 0.7, "{morning:?}");
    // Back from B, at home until 13:50: the afternoon errand.
    let mut points = two_errands(3);
    points.extend(dwell(
        day,
        day + 6 * HOUR_MS + 50 * MINUTE_MS,
        10 * MINUTE_MS,
        0.0,
        0.0,
    ));
    points.extend(dwell(
        day + 8 * HOUR_MS,
        day + 10 * HOUR_MS + 50 * MINUTE_MS,
        10 * MINUTE_MS,
        4_000.0,
        0.0,
    ));
    points.extend(dwell(
        day + 12 * HOUR_MS,
        day + 13 * HOUR_MS + 50 * MINUTE_MS,
        10 * MINUTE_MS,
        0.0,
        0.0,
    ));
    let (model, _) = run(&points, &rules);
    let afternoon = predict(&model, &rules, 3);
    assert_eq!(afternoon.from, Some(1));
    assert_eq!(
        afternoon.next.first().map(|n| n.0),
        Some(3),
        "{afternoon:?}"
    );
    assert!(among_known(&model, &afternoon)[0].1 > 0.7, "{afternoon:?}");
    let total: f64 = afternoon.next.iter().map(|n| n.1).sum();
    assert!((total - (1.0 - novelty(&model))).abs() < 1e-9);
}

#[test]
fn a_place_behind_a_moving_device_is_unlikely() {
    let rules = rules();
    // A → B and A → C once each (B east, C west), then A again and leaving it eastwards.
    let (a, b, c) = ((0.0, 0.0), (4_000.0, 0.0), (-4_000.0, 0.0));
    let mut points = itinerary(&[a, c, a, b, a]);
    points.pop();
    let t = points.last().map_or(0, |p| p.time_ms);
    points.push(at(t + 5 * MINUTE_MS, 600.0, 0.0));
    let (model, _) = run(&points, &rules);
    assert!(current_stay(&model, &rules).is_none(), "on its way");
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.from, Some(1));
    let next: Vec<u32> = forecast.next.iter().map(|n| n.0).collect();
    // B lies ahead; C (visited as often, and the more recent move) lies behind.
    assert_eq!(next, [3, 2], "{forecast:?}");
    assert!(among_known(&model, &forecast)[0].1 > 0.7, "{forecast:?}");
}

#[test]
fn predicts_from_the_current_stay() {
    let rules = rules();
    let (home, work) = ((0.0, 0.0), (5_000.0, 0.0));
    let mut points = itinerary(&[home, work, home]);
    points.pop();
    // Back at work and there for 30 minutes: the stay is still open.
    let t = points.last().map_or(0, |p| p.time_ms) + HOUR_MS;
    points.extend(dwell(t, t + 30 * MINUTE_MS, 10 * MINUTE_MS, 5_000.0, 10.0));
    let (model, _) = run(&points, &rules);
    assert_eq!(model.last_place_id, 1);
    // At work now: that wins over home, the last closed stay.
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.from, Some(2));
    assert_eq!(among_known(&model, &forecast), [(1, 1.0)]);
}

#[test]
fn staying_somewhere_new_predicts_from_the_visits() {
    let rules = rules();
    let mut points = itinerary(&[(0.0, 0.0), (5_000.0, 0.0)]);
    let t = points.last().map_or(0, |p| p.time_ms) + HOUR_MS;
    points.extend(dwell(t, t + HOUR_MS, 10 * MINUTE_MS, 50_000.0, 50_000.0));
    let (model, _) = run(&points, &rules);
    // At no known place: no starting point, but where the device goes is where it went.
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.from, None);
    assert_eq!(forecast.next.len(), model.places.len());
    let next = among_known(&model, &forecast);
    assert!(
        next.iter().all(|n| (n.1 - 1.0 / 3.0).abs() < 1e-9),
        "{next:?}"
    );
    assert_eq!(predict(&Model::default(), &rules, 3), Forecast::default());
    // A place with no way out yet and no other place: a starting point, but no next place.
    let (model, _) = run(&itinerary(&[(0.0, 0.0)]), &rules);
    assert_eq!(
        predict(&model, &rules, 3),
        Forecast {
            from: Some(1),
            next: vec![]
        }
    );
}

#[test]
fn ten_thousand_places_visited_once_stay_bounded() {
    let rules = rules();
    let mut model = Model::default();
    // 10 000 spots 5 km apart on a line, 30 minutes at each, observed in batches of 500.
    let points: Vec<Point> = (0..10_000)
        .flat_map(|i| {
            dwell(
                T0 + i * HOUR_MS,
                T0 + i * HOUR_MS + 30 * MINUTE_MS,
                10 * MINUTE_MS,
                0.0,
                i as f64 * 5_000.0 % 4_000_000.0,
            )
        })
        .collect();
    let mut created = 0;
    for batch in points.chunks(500) {
        created += observe(&mut model, batch, &rules).places_created;
    }
    assert!(created >= 9_000, "{created} places created");
    assert_eq!(model.places.len(), rules.max_places);
    // Every place visited once moves on to the next: at most one way out of each.
    assert!(
        model.transitions.len() < rules.max_places,
        "{}",
        model.transitions.len()
    );
    assert!(
        model
            .transitions
            .iter()
            .all(|t| t.by_time_of_day.len() == DAY_BINS)
    );
    let bytes = prost::Message::encoded_len(&model);
    assert!(bytes < 100_000, "{bytes} bytes in Redis");
    let forecast = predict(&model, &rules, 3);
    assert_eq!(forecast.next.len(), 3);
}

/// The transition of models written before the time-of-day bins.
#[derive(Clone, PartialEq, prost::Message)]
struct TransitionV1 {
    #[prost(uint32, tag = "1")]
    from: u32,
    #[prost(uint32, tag = "2")]
    to: u32,
    #[prost(uint32, tag = "3")]
    count: u32,
}

#[test]
fn models_written_before_time_of_day_bins_still_predict_and_learn() {
    use prost::Message as _;
    let rules = rules();
    let (home, work, shop) = ((0.0, 0.0), (5_000.0, 0.0), (0.0, 5_000.0));
    let mut points = itinerary(&[home, work, home, shop, home, work, home]);
    let leaving = points.pop();
    let (mut model, _) = run(&points, &rules);
    // Re-encode its transitions as the old layout wrote them.
    let old: Vec<TransitionV1> = model
        .transitions
        .iter()
        .map(|t| TransitionV1 {
            from: t.from,
            to: t.to,
            count: t.count,
        })
        .collect();
    model.transitions.clear();
    let mut bytes = model.encode_to_vec();
    for t in &old {
        prost::encoding::message::encode(5, t, &mut bytes);
    }
    let mut decoded = Model::decode(bytes.as_slice()).unwrap();
    assert!(
        decoded
            .transitions
            .iter()
            .all(|t| t.by_time_of_day.is_empty() && t.last_ms == 0)
    );
    // Plain counts only: 2/3 work, 1/3 shop.
    let forecast = predict(&decoded, &rules, 3);
    let next = among_known(&decoded, &forecast);
    assert!((next[0].1 - 2.0 / 3.0).abs() < 1e-6, "{forecast:?}");
    // Learning on fills the bins of the moves it sees.
    let t = leaving.map_or(0, |p| p.time_ms);
    let mut more = vec![at(t, 0.0, 20_000.0)];
    more.extend(dwell(
        t + 10 * MINUTE_MS,
        t + HOUR_MS,
        10 * MINUTE_MS,
        5_000.0,
        0.0,
    ));
    more.push(at(t + 75 * MINUTE_MS, 5_000.0, 20_000.0));
    observe(&mut decoded, &more, &rules);
    let home_work = decoded
        .transitions
        .iter()
        .find(|t| t.from == 1 && t.to == 2)
        .unwrap();
    assert_eq!(home_work.count, 3);
    // Left home at 17:15: the 12-18 bin; the two older moves stay in the plain count only.
    assert_eq!(home_work.by_time_of_day, [0, 0, 1, 0]);
}

// ---- properties over arbitrary streams

/// Four sites: two near each other, one 5 km away, one so far that going there is a jump.
const SITES: [(f64, f64); 4] = [(0.0, 0.0), (600.0, 0.0), (5_000.0, 0.0), (400_000.0, 0.0)];

/// A time-ordered stream: steps of 10 s to 10 minutes, sometimes hours (gaps), at a site with
/// up to 150 m of noise on each axis.
fn stream() -> impl Strategy<Value = Vec<Point>> {
    let step = (
        prop_oneof![19 => 10_000i64..600_000, 1 => 600_000i64..50_000_000],
        prop_oneof![6 => Just(0usize), 1 => 0usize..4],
        -150.0..150.0f64,
        -150.0..150.0f64,
    );
    prop::collection::vec(step, 1..400).prop_map(|steps| {
        let (mut t, mut site) = (T0, 0);
        steps
            .into_iter()
            .map(|(dt, change, east, north)| {
                t += dt;
                site = (site + change) % SITES.len();
                at(t, SITES[site].0 + east, SITES[site].1 + north)
            })
            .collect()
    })
}

/// Rules small enough that eviction happens.
fn tight_rules() -> Rules {
    Rules {
        max_places: 3,
        place_radius_m: 150.0,
        ..rules()
    }
}

/// Cuts `points` into consecutive batches at `cuts` (fractions), each batch shuffled.
fn batches(points: &[Point], cuts: &[f64], seed: u64) -> Vec<Vec<Point>> {
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|c| ((points.len() as f64) * c) as usize)
        .collect();
    bounds.push(0);
    bounds.push(points.len());
    bounds.sort_unstable();
    let mut state = seed | 1;
    bounds
        .windows(2)
        .map(|w| {
            let mut batch = points[w[0]..w[1]].to_vec();
            // A small deterministic shuffle (xorshift), so order inside a batch varies.
            for i in (1..batch.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                batch.swap(i, (state % (i as u64 + 1)) as usize);
            }
            batch
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn batch_splitting_changes_nothing(
        points in stream(),
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
        seed in any::<u64>(),
    ) {
        let rules = tight_rules();
        let (whole, outcome) = run(&points, &rules);
        let mut model = Model::default();
        let mut stays = Vec::new();
        let mut trips = Vec::new();
        let (mut created, mut evicted) = (0, 0);
        for batch in batches(&points, &cuts, seed) {
            let part = observe(&mut model, &batch, &rules);
            stays.extend(part.stays);
            trips.extend(part.trips);
            created += part.places_created;
            evicted += part.places_evicted;
        }
        prop_assert_eq!(&model, &whole);
        prop_assert_eq!(stays, outcome.stays);
        prop_assert_eq!(trips, outcome.trips);
        prop_assert_eq!((created, evicted), (outcome.places_created, outcome.places_evicted));
        prop_assert_eq!(model.fixes_observed, points.len() as u64);
    }

    #[test]
    fn observing_twice_changes_nothing(
        points in stream(),
        cuts in prop::collection::vec(0.0..1.0f64, 0..8),
        seed in any::<u64>(),
    ) {
        let rules = tight_rules();
        let (whole, _) = run(&points, &rules);
        let mut model = Model::default();
        let mut sent: Vec<Point> = Vec::new();
        for batch in batches(&points, &cuts, seed) {
            observe(&mut model, &batch, &rules);
            let after = model.clone();
            // The batch again, and everything sent so far again (a client retrying late).
            let again = observe(&mut model, &batch, &rules);
            prop_assert_eq!(again.observed, 0);
            prop_assert!(again.stays.is_empty());
            sent.extend(&batch);
            let replay = observe(&mut model, &sent, &rules);
            prop_assert_eq!(replay.ignored as usize, sent.len());
            prop_assert_eq!(&model, &after);
            prop_assert_eq!(predict(&model, &rules, 10), predict(&after, &rules, 10));
        }
        prop_assert_eq!(&model, &whole);
    }

    #[test]
    fn trips_are_the_fixes_between_consecutive_stays(points in stream()) {
        let rules = tight_rules();
        let (model, outcome) = run(&points, &rules);
        // One trip between each two consecutive stays, chaining them.
        prop_assert_eq!(outcome.trips.len(), outcome.stays.len().saturating_sub(1));
        for (trip, pair) in outcome.trips.iter().zip(outcome.stays.windows(2)) {
            prop_assert_eq!(&trip.from, &pair[0]);
            prop_assert_eq!(&trip.to, &pair[1]);
            prop_assert_eq!((trip.start_ms, trip.end_ms), (pair[0].end_ms, pair[1].start_ms));
            prop_assert!(trip.start_ms <= trip.end_ms);
            let (distance, fastest, fixes) = brute_trip(&points, trip.start_ms, trip.end_ms);
            prop_assert_eq!(trip.fixes, fixes);
            prop_assert!(
                (trip.distance_m - distance).abs() <= 1e-9 * distance + 1e-6,
                "distance {} vs {}", trip.distance_m, distance
            );
            prop_assert_eq!(trip.max_speed_kmh, fastest);
        }
        for pair in outcome.trips.windows(2) {
            prop_assert!(pair[0].end_ms <= pair[1].start_ms, "trips overlap");
        }
        // The trip in progress is the same sums up to the candidate's anchor.
        if let (Some(trip), Some(last), Some(candidate)) =
            (&model.trip, outcome.stays.last(), &model.candidate)
        {
            prop_assert_eq!(trip.start_ms, last.end_ms);
            let (distance, fastest, fixes) = brute_trip(&points, last.end_ms, candidate.start_ms);
            prop_assert_eq!(trip.fixes, fixes);
            prop_assert!((trip.distance_m - distance).abs() <= 1e-9 * distance + 1e-6);
            prop_assert_eq!(trip.max_kmh, fastest);
        } else {
            prop_assert!(model.trip.is_none() && outcome.stays.is_empty());
        }
    }

    #[test]
    fn places_stay_bounded_and_consistent(points in stream()) {
        let rules = tight_rules();
        let (model, outcome) = run(&points, &rules);
        prop_assert!(model.places.len() <= rules.max_places);
        prop_assert_eq!(model.stays, outcome.stays.len() as u64);
        for place in &model.places {
            prop_assert_eq!(place.dwell_by_hour_ms.len(), HOURS_PER_WEEK);
            prop_assert_eq!(
                place.dwell_by_hour_ms.iter().sum::<u64>(),
                u64::try_from(place.dwell_ms).unwrap_or(0)
            );
            prop_assert!(place.first_ms <= place.last_ms);
        }
        for transition in &model.transitions {
            prop_assert!(transition.from != transition.to);
            prop_assert!(place_by_id(&model, transition.from).is_some());
            prop_assert!(place_by_id(&model, transition.to).is_some());
        }
        for stay in &outcome.stays {
            prop_assert!(stay.end_ms - stay.start_ms >= rules.stay_min_duration_ms);
        }
        let forecast = predict(&model, &rules, 10);
        let total: f64 = forecast.next.iter().map(|(_, p)| p).sum();
        let known = 1.0 - novelty(&model);
        prop_assert!(forecast.next.is_empty() || (total - known).abs() < 1e-9);
    }
}
