//! Every verdict and its edges, and the properties of the chain over arbitrary streams.

use proptest::prelude::*;

use super::*;

const HOUR_MS: i64 = 3_600_000;
const NOW_MS: i64 = 1_780_000_000_000;

fn rules() -> Rules {
    Rules {
        max_speed_kmh: 150.0,
        max_time_diff_ms: 12 * HOUR_MS,
        max_future_skew_ms: 5 * 60_000,
        max_accuracy_m: None,
        min_distance_m: None,
        reanchor_after: 3,
    }
}

fn fix(time_ms: i64, lat: f64, lon: f64) -> Fix {
    Fix {
        device_id: "d".into(),
        time_ms,
        lat,
        lon,
        ..Fix::default()
    }
}

/// One device in memory: state and an untrimmed replay log.
#[derive(Default)]
struct Harness {
    state: DeviceState,
    log: Vec<Record>,
}

impl Harness {
    /// Runs a batch like the service does: static checks, then the device's chain.
    fn run(&mut self, batch: &[Fix], rules: &Rules) -> (Vec<Refined>, Vec<Refined>) {
        let mut results: Vec<Option<Refined>> = vec![None; batch.len()];
        let mut passed = Vec::new();
        for (index, fix) in batch.iter().enumerate() {
            match check_fix(fix, NOW_MS, rules) {
                Ok(()) => passed.push((index, fix)),
                Err((verdict, detail)) => results[index] = Some(rejected(fix, verdict, detail)),
            }
        }
        let outcome = match refine_device(&self.state, None, &passed, rules) {
            Ok(outcome) => outcome,
            Err(NeedHistory) => {
                refine_device(&self.state, Some(&self.log), &passed, rules).unwrap()
            }
        };
        for (index, result) in outcome.results {
            results[index] = Some(result);
        }
        self.state = outcome.state;
        self.log.extend(outcome.appended);
        (
            results.into_iter().map(Option::unwrap).collect(),
            outcome.recovered,
        )
    }

    fn one(&mut self, fix: Fix) -> Refined {
        self.run(&[fix], &rules()).0.remove(0)
    }
}

fn verdict(result: &Refined) -> Verdict {
    Verdict::try_from(result.verdict).unwrap()
}

// ---- verdicts 1–4: no state needed

#[test]
fn invalid_coordinates_and_times() {
    let r = rules();
    let check = |f: Fix| check_fix(&f, NOW_MS, &r).err().map(|(v, _)| v);
    assert_eq!(check(fix(NOW_MS, 90.0, 180.0)), None);
    assert_eq!(check(fix(NOW_MS, -90.0, -180.0)), None);
    assert_eq!(check(fix(NOW_MS, 90.000_001, 0.0)), Some(Verdict::Invalid));
    assert_eq!(
        check(fix(NOW_MS, 0.0, -180.000_001)),
        Some(Verdict::Invalid)
    );
    assert_eq!(check(fix(NOW_MS, f64::NAN, 1.0)), Some(Verdict::Invalid));
    assert_eq!(
        check(fix(NOW_MS, 1.0, f64::INFINITY)),
        Some(Verdict::Invalid)
    );
    assert_eq!(check(fix(0, 1.0, 1.0)), Some(Verdict::Invalid));
    let mut f = fix(NOW_MS, 1.0, 1.0);
    f.speed_mps = Some(f32::NAN);
    assert_eq!(check(f), Some(Verdict::Invalid));
    let mut f = fix(NOW_MS, 1.0, 1.0);
    f.accuracy_m = Some(-1.0);
    assert_eq!(check(f), Some(Verdict::Invalid));
}

#[test]
fn invalid_detail_names_the_field() {
    let (_, detail) = check_fix(&fix(NOW_MS, 91.0, 0.0), NOW_MS, &rules()).unwrap_err();
    assert!(detail.starts_with("lat:"), "{detail}");
}

#[test]
fn null_island_is_exactly_zero_zero() {
    let r = rules();
    assert_eq!(
        check_fix(&fix(NOW_MS, 0.0, 0.0), NOW_MS, &r).unwrap_err().0,
        Verdict::NullIsland
    );
    assert!(check_fix(&fix(NOW_MS, 0.0, 1e-9), NOW_MS, &r).is_ok());
    assert!(check_fix(&fix(NOW_MS, -1e-9, 0.0), NOW_MS, &r).is_ok());
}

#[test]
fn future_beyond_the_skew() {
    let r = rules();
    assert!(check_fix(&fix(NOW_MS + r.max_future_skew_ms, 1.0, 1.0), NOW_MS, &r).is_ok());
    assert_eq!(
        check_fix(
            &fix(NOW_MS + r.max_future_skew_ms + 1, 1.0, 1.0),
            NOW_MS,
            &r
        )
        .unwrap_err()
        .0,
        Verdict::Future
    );
}

#[test]
fn inaccurate_only_when_enabled_and_worse() {
    let mut r = rules();
    let mut f = fix(NOW_MS, 1.0, 1.0);
    f.accuracy_m = Some(50.0);
    assert!(check_fix(&f, NOW_MS, &r).is_ok(), "off by default");
    r.max_accuracy_m = Some(50.0);
    assert!(
        check_fix(&f, NOW_MS, &r).is_ok(),
        "exactly the limit passes"
    );
    f.accuracy_m = Some(50.5);
    assert_eq!(
        check_fix(&f, NOW_MS, &r).unwrap_err().0,
        Verdict::Inaccurate
    );
}

#[test]
fn static_checks_come_in_order() {
    // Invalid beats everything, null island beats future.
    let mut r = rules();
    r.max_accuracy_m = Some(1.0);
    let mut f = fix(NOW_MS + HOUR_MS, 0.0, 0.0);
    f.accuracy_m = Some(100.0);
    assert_eq!(
        check_fix(&f, NOW_MS, &r).unwrap_err().0,
        Verdict::NullIsland
    );
    f.lat = 1.0;
    assert_eq!(check_fix(&f, NOW_MS, &r).unwrap_err().0, Verdict::Future);
    f.time_ms = NOW_MS;
    assert_eq!(
        check_fix(&f, NOW_MS, &r).unwrap_err().0,
        Verdict::Inaccurate
    );
}

// ---- verdicts 5–9: against the device's state

#[test]
fn first_fix_starts_segment_one() {
    let mut h = Harness::default();
    let first = h.one(fix(1000, 52.0, 13.0));
    assert_eq!(verdict(&first), Verdict::Accepted);
    assert_eq!((first.segment, first.distance_m, first.dt_ms), (1, 0.0, 0));
    assert!(!first.replay);
    assert_eq!(h.state.accepted_count, 1);
}

#[test]
fn accepted_fixes_are_annotated() {
    let mut h = Harness::default();
    h.one(fix(1, 52.0, 13.0));
    let second = h.one(fix(60_001, 52.001, 13.0));
    assert_eq!(verdict(&second), Verdict::Accepted);
    assert_eq!(second.segment, 1);
    assert_eq!(second.dt_ms, 60_000);
    assert!(
        (second.distance_m - 111.195).abs() < 0.01,
        "{}",
        second.distance_m
    );
    assert!(
        (second.speed_kmh - 6.6717).abs() < 0.001,
        "{}",
        second.speed_kmh
    );
}

#[test]
fn same_time_other_position_is_duplicate_same_position_is_replay() {
    let mut h = Harness::default();
    h.one(fix(1000, 52.0, 13.0));
    assert_eq!(
        verdict(&h.one(fix(1000, 52.0001, 13.0))),
        Verdict::Duplicate
    );
    let again = h.one(fix(1000, 52.0, 13.0));
    assert_eq!(verdict(&again), Verdict::Accepted);
    assert!(again.replay);
    assert_eq!(h.state.accepted_count, 1, "a replay is not a new fix");
}

#[test]
fn earlier_fix_is_out_of_order_unless_it_was_accepted() {
    let mut h = Harness::default();
    h.one(fix(1000, 52.0, 13.0));
    h.one(fix(2000, 52.0001, 13.0));
    assert_eq!(verdict(&h.one(fix(1500, 52.0, 13.0))), Verdict::OutOfOrder);
    let replay = h.one(fix(1000, 52.0, 13.0));
    assert_eq!(verdict(&replay), Verdict::Accepted);
    assert!(replay.replay);
    assert_eq!(replay.segment, 1);
    // Same time as an accepted fix but elsewhere: not a replay.
    assert_eq!(verdict(&h.one(fix(1000, 52.5, 13.0))), Verdict::OutOfOrder);
}

#[test]
fn replays_need_the_history_only_for_older_fixes() {
    let r = rules();
    let mut h = Harness::default();
    h.run(&[fix(1000, 52.0, 13.0), fix(2000, 52.0001, 13.0)], &r);
    let older = fix(1000, 52.0, 13.0);
    assert_eq!(
        refine_device(&h.state, None, &[(0, &older)], &r).unwrap_err(),
        NeedHistory
    );
    let newer = fix(3000, 52.0002, 13.0);
    assert!(refine_device(&h.state, None, &[(0, &newer)], &r).is_ok());
}

#[test]
fn gap_longer_than_max_time_diff_starts_a_segment_without_speed_check() {
    let r = rules();
    let mut h = Harness::default();
    h.one(fix(1, 52.0, 13.0));
    // Exactly MAX_TIME_DIFF is not a gap: 1000 km in 12 h is 83 km/h, accepted in segment 1.
    let exact = h.one(fix(1 + r.max_time_diff_ms, 52.0, 27.7));
    assert_eq!((verdict(&exact), exact.segment), (Verdict::Accepted, 1));
    // One millisecond more is a gap: a new segment, however far it went.
    let gap = h.one(fix(1 + 2 * r.max_time_diff_ms + 1, -33.9, 151.2));
    assert_eq!((verdict(&gap), gap.segment), (Verdict::Accepted, 2));
    assert!(gap.speed_kmh > 150.0, "annotated anyway: {}", gap.speed_kmh);
}

#[test]
fn exactly_max_time_diff_still_gets_the_speed_check() {
    let r = rules();
    let mut h = Harness::default();
    h.one(fix(1, 0.0, 10.0));
    // ~4000 km in exactly 12 h is ~333 km/h.
    let far = h.one(fix(1 + r.max_time_diff_ms, 0.0, 46.0));
    assert_eq!(verdict(&far), Verdict::Speed);
}

#[test]
fn exactly_max_speed_is_accepted() {
    let (a, b) = (fix(1_000, 52.0, 13.0), fix(61_000, 52.0, 13.05));
    let speed = geo::speed_kmh(distance(&a, &b), 60_000);
    let mut r = rules();
    r.max_speed_kmh = speed;
    let mut h = Harness::default();
    h.run(std::slice::from_ref(&a), &r);
    assert_eq!(
        verdict(&h.run(std::slice::from_ref(&b), &r).0[0]),
        Verdict::Accepted
    );
    r.max_speed_kmh = speed - 1e-9;
    let mut h = Harness::default();
    h.run(&[a], &r);
    let outlier = h.run(&[b], &r).0.remove(0);
    assert_eq!(verdict(&outlier), Verdict::Speed);
    assert!(outlier.detail.contains("km/h"), "{}", outlier.detail);
}

#[test]
fn speed_outlier_leaves_the_anchor() {
    let mut h = Harness::default();
    h.one(fix(1_000, 52.0, 13.0));
    assert_eq!(verdict(&h.one(fix(61_000, 53.0, 13.0))), Verdict::Speed);
    // The next fix is judged from the old anchor, not from the outlier.
    let next = h.one(fix(121_000, 52.001, 13.0));
    assert_eq!(verdict(&next), Verdict::Accepted);
    assert_eq!(next.dt_ms, 120_000);
}

#[test]
fn antimeridian_crossing_is_a_short_hop() {
    let mut h = Harness::default();
    h.one(fix(1_000, 10.0, 179.999));
    let crossed = h.one(fix(61_000, 10.0, -179.999));
    assert_eq!(verdict(&crossed), Verdict::Accepted);
    assert!(crossed.distance_m < 250.0, "{}", crossed.distance_m);
}

#[test]
fn at_the_pole_every_longitude_is_the_same_place() {
    let mut h = Harness::default();
    h.one(fix(1_000, 90.0, 0.0));
    let pole = h.one(fix(2_000, 90.0, 180.0));
    assert_eq!(verdict(&pole), Verdict::Accepted);
    assert!(pole.distance_m < 1e-6);
    let south = h.one(fix(3_000, -90.0, 0.0));
    assert_eq!(verdict(&south), Verdict::Speed, "pole to pole in a second");
}

#[test]
fn stationary_only_when_enabled() {
    let mut r = rules();
    let mut h = Harness::default();
    h.run(&[fix(1_000, 52.0, 13.0)], &r);
    assert_eq!(
        verdict(&h.run(&[fix(2_000, 52.00001, 13.0)], &r).0[0]),
        Verdict::Accepted
    );
    r.min_distance_m = Some(5.0);
    assert_eq!(
        verdict(&h.run(&[fix(3_000, 52.00002, 13.0)], &r).0[0]),
        Verdict::Stationary
    );
    assert_eq!(
        verdict(&h.run(&[fix(4_000, 52.0001, 13.0)], &r).0[0]),
        Verdict::Accepted
    );
}

#[test]
fn fixes_in_a_batch_are_decided_in_time_order() {
    let mut h = Harness::default();
    let (results, _) = h.run(
        &[
            fix(3_000, 52.0002, 13.0),
            fix(1_000, 52.0, 13.0),
            fix(2_000, 52.0001, 13.0),
        ],
        &rules(),
    );
    assert!(results.iter().all(|r| verdict(r) == Verdict::Accepted));
    assert_eq!(results[1].dt_ms, 0);
    assert_eq!(results[0].dt_ms, 1_000);
    assert_eq!(h.state.last.unwrap().fix.unwrap().time_ms, 3_000);
}

#[test]
fn consistent_outliers_reanchor_the_track() {
    // A bad first fix far away; the device's real track elsewhere.
    let mut h = Harness::default();
    h.one(fix(1_000, 10.0, 10.0));
    let real = [
        fix(61_000, 52.0, 13.0),
        fix(121_000, 52.001, 13.0),
        fix(181_000, 52.002, 13.0),
    ];
    let (results, recovered) = h.run(&real, &rules());
    assert_eq!(verdict(&results[0]), Verdict::Speed);
    assert_eq!(verdict(&results[1]), Verdict::Speed);
    assert_eq!(verdict(&results[2]), Verdict::Accepted);
    assert!(results[2].reanchored);
    assert_eq!(results[2].segment, 2);
    // The earlier two are accepted too, reported as recovered, in time order.
    assert_eq!(recovered.len(), 2);
    assert!(
        recovered
            .iter()
            .all(|r| verdict(r) == Verdict::Accepted && r.reanchored && r.segment == 2)
    );
    assert_eq!(recovered[1].dt_ms, 60_000);
    assert_eq!(h.state.accepted_count, 4);
    assert!(h.state.pending.is_empty());
    // The track goes on from the new anchor.
    assert_eq!(
        verdict(&h.one(fix(241_000, 52.003, 13.0))),
        Verdict::Accepted
    );
}

#[test]
fn a_retried_reanchor_recovers_its_run_again() {
    // The run arrives one fix per call; the answer to the completing call is lost.
    let mut h = Harness::default();
    h.one(fix(1_000, 10.0, 10.0));
    let real = [
        fix(61_000, 52.0, 13.0),
        fix(121_000, 52.001, 13.0),
        fix(181_000, 52.002, 13.0),
    ];
    assert_eq!(verdict(&h.one(real[0].clone())), Verdict::Speed);
    assert_eq!(verdict(&h.one(real[1].clone())), Verdict::Speed);
    let (_, recovered) = h.run(&real[2..], &rules());
    assert_eq!(recovered.len(), 2);
    let state = h.state.clone();

    let (again, recovered_again) = h.run(&real[2..], &rules());
    assert!(again[0].replay);
    // The run's other fixes were answered SPEED and never stored: they come back too.
    assert_eq!(
        recovered_again
            .iter()
            .map(|r| (r.fix.clone(), r.replay, r.segment))
            .collect::<Vec<_>>(),
        recovered
            .iter()
            .map(|r| (r.fix.clone(), true, r.segment))
            .collect::<Vec<_>>()
    );
    assert_eq!(h.state, state, "a retry changes nothing");

    // Re-sent together with the completing fix, they are answered in `results` only.
    let (whole, recovered_whole) = h.run(&real, &rules());
    assert!(
        whole
            .iter()
            .all(|r| verdict(r) == Verdict::Accepted && r.replay)
    );
    assert!(recovered_whole.is_empty());
}

#[test]
fn inconsistent_outliers_do_not_reanchor() {
    let mut h = Harness::default();
    h.one(fix(1_000, 10.0, 10.0));
    let scattered = [
        fix(61_000, 52.0, 13.0),
        fix(121_000, -30.0, 100.0),
        fix(181_000, 40.0, -70.0),
    ];
    let (results, recovered) = h.run(&scattered, &rules());
    assert!(results.iter().all(|r| verdict(r) == Verdict::Speed));
    assert!(recovered.is_empty());
    assert_eq!(h.state.pending.len(), 1, "each outlier restarted the run");
}

#[test]
fn reanchoring_can_be_turned_off() {
    let mut r = rules();
    r.reanchor_after = 0;
    let mut h = Harness::default();
    h.run(&[fix(1_000, 10.0, 10.0)], &r);
    let real: Vec<Fix> = (1..=5)
        .map(|i| fix(1_000 + i * 60_000, 52.0 + i as f64 * 0.001, 13.0))
        .collect();
    let (results, _) = h.run(&real, &r);
    assert!(results.iter().all(|x| verdict(x) == Verdict::Speed));
}

#[test]
fn resent_outlier_does_not_advance_the_run() {
    let mut h = Harness::default();
    h.one(fix(1_000, 10.0, 10.0));
    let p1 = fix(61_000, 52.0, 13.0);
    let p2 = fix(121_000, 52.001, 13.0);
    h.run(&[p1.clone(), p2.clone()], &rules());
    let before = h.state.clone();
    assert_eq!(verdict(&h.one(p1)), Verdict::Speed);
    assert_eq!(verdict(&h.one(p2)), Verdict::Speed);
    assert_eq!(h.state, before);
}

#[test]
fn records_round_trip() {
    let record = Record {
        time_ms: -5,
        lat: 52.123_456_789,
        lon: -0.000_000_1,
        segment: 7,
        dt_ms: 123,
        distance_m: 1.5,
        reanchored: true,
    };
    let mut bytes = Vec::new();
    record.encode(&mut bytes);
    record.encode(&mut bytes);
    assert_eq!(bytes.len(), 2 * Record::SIZE);
    bytes.push(1); // a torn tail is ignored
    assert_eq!(Record::decode_all(&bytes), vec![record, record]);
}

// ---- properties over arbitrary streams

/// A stream of one device's fixes in time order: small moves, big jumps, long gaps,
/// repeats and same-time conflicts.
fn stream() -> impl Strategy<Value = Vec<Fix>> {
    let step = (0u8..100, 0i64..600_000, -0.02f64..0.02, -0.02f64..0.02);
    (
        -60.0f64..60.0,
        -170.0f64..170.0,
        prop::collection::vec(step, 1..80),
    )
        .prop_map(|(lat0, lon0, steps)| {
            let mut fixes = vec![fix(NOW_MS - 100 * 24 * HOUR_MS, lat0, lon0)];
            for (kind, dt, dlat, dlon) in steps {
                let last = fixes.last().unwrap().clone();
                let next = match kind {
                    0..=59 => fix(
                        last.time_ms + dt + 1,
                        last.lat + dlat / 10.0,
                        last.lon + dlon / 10.0,
                    ),
                    60..=74 => fix(
                        last.time_ms + dt + 1,
                        last.lat + dlat * 100.0,
                        last.lon + dlon * 100.0,
                    ),
                    75..=79 => fix(
                        last.time_ms + 13 * HOUR_MS + dt,
                        last.lat + dlat * 500.0,
                        last.lon + dlon,
                    ),
                    80..=89 => last.clone(),
                    _ => fix(last.time_ms, last.lat + dlat, last.lon),
                };
                fixes.push(next);
            }
            fixes
        })
}

/// Splits `fixes` into consecutive batches at the given cut points.
fn split(fixes: &[Fix], cuts: &[usize]) -> Vec<Vec<Fix>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (fixes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut batches = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([fixes.len()]) {
        if cut > start {
            batches.push(fixes[start..cut].to_vec());
            start = cut;
        }
    }
    batches
}

fn run_batches(batches: &[Vec<Fix>]) -> (Harness, Vec<Refined>, Vec<Refined>) {
    let mut h = Harness::default();
    let (mut results, mut recovered) = (Vec::new(), Vec::new());
    for batch in batches {
        let (r, rec) = h.run(batch, &rules());
        results.extend(r);
        recovered.extend(rec);
    }
    (h, results, recovered)
}

fn accepted_sequence(results: &[Refined], recovered: &[Refined]) -> Vec<Refined> {
    let mut accepted: Vec<Refined> = results
        .iter()
        .chain(recovered)
        .filter(|r| verdict(r) == Verdict::Accepted && !r.replay)
        .cloned()
        .collect();
    accepted.sort_by_key(|r| r.fix.as_ref().unwrap().time_ms);
    accepted
}

proptest! {
    #[test]
    fn accepted_track_is_increasing_and_plausible(fixes in stream(), cuts in prop::collection::vec(0usize..100, 0..6)) {
        let r = rules();
        let (h, results, recovered) = run_batches(&split(&fixes, &cuts));
        let accepted = accepted_sequence(&results, &recovered);
        prop_assert_eq!(accepted.len() as u64, h.state.accepted_count);
        for pair in accepted.windows(2) {
            let (a, b) = (pair[0].fix.as_ref().unwrap(), pair[1].fix.as_ref().unwrap());
            prop_assert!(b.time_ms > a.time_ms, "not increasing: {} then {}", a.time_ms, b.time_ms);
            let dt = b.time_ms - a.time_ms;
            if pair[1].segment == pair[0].segment {
                prop_assert!(dt <= r.max_time_diff_ms);
                prop_assert!(geo::speed_kmh(distance(a, b), dt) <= r.max_speed_kmh);
            } else {
                prop_assert_eq!(pair[1].segment, pair[0].segment + 1);
                prop_assert!(dt > r.max_time_diff_ms || pair[1].reanchored);
            }
        }
    }

    #[test]
    fn batching_does_not_change_the_result(fixes in stream(), cuts in prop::collection::vec(0usize..100, 1..8)) {
        let (whole, results, recovered) = run_batches(std::slice::from_ref(&fixes));
        let (split_h, split_results, split_recovered) = run_batches(&split(&fixes, &cuts));
        prop_assert_eq!(results, split_results);
        // A fix re-sent in a later batch may bring its re-anchor run back as replays (for
        // storage, which drops what it has); the first acceptances are the same.
        let first = |recovered: Vec<Refined>| -> Vec<Refined> {
            recovered.into_iter().filter(|r| !r.replay).collect()
        };
        prop_assert_eq!(first(recovered), first(split_recovered));
        prop_assert_eq!(whole.state, split_h.state);
    }

    #[test]
    fn replaying_a_prefix_changes_nothing(fixes in stream(), k in 0usize..100, j in 0usize..100) {
        let k = k % (fixes.len() + 1);
        let j = j % (k + 1);
        let (_, results, recovered) = run_batches(std::slice::from_ref(&fixes));
        let accepted = accepted_sequence(&results, &recovered);

        let mut h = Harness::default();
        let (first, _) = h.run(&fixes[..k], &rules());
        let state_before = h.state.clone();
        let (replayed, replay_recovered) = h.run(&fixes[..j], &rules());
        prop_assert_eq!(&h.state, &state_before);
        // Only a re-sent re-anchor brings its run back, as replays of accepted fixes.
        for again in &replay_recovered {
            let f = again.fix.as_ref().unwrap();
            prop_assert!(again.replay);
            prop_assert!(accepted.iter().any(|a| a.fix.as_ref().unwrap().time_ms == f.time_ms));
        }
        // Whatever was accepted is accepted again, as a replay with the same annotations.
        for (original, again) in first.iter().zip(&replayed) {
            let f = again.fix.as_ref().unwrap();
            let was_accepted = accepted.iter().any(|a| {
                let af = a.fix.as_ref().unwrap();
                af.time_ms == f.time_ms && af.lat == f.lat && af.lon == f.lon
            });
            if was_accepted && original.verdict == Verdict::Accepted as i32 {
                prop_assert_eq!(verdict(again), Verdict::Accepted);
                prop_assert!(again.replay);
                prop_assert_eq!(
                    (again.segment, again.dt_ms, again.distance_m),
                    (original.segment, original.dt_ms, original.distance_m)
                );
            }
        }
        let (rest, _) = h.run(&fixes[k..], &rules());
        prop_assert_eq!(&rest[..], &results[k..]);
    }
}
