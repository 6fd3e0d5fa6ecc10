//! Stays, trips and rebuilt models on the whole mesh with the Staten Island ferries' week of
//! real AIS positions: trips between terminal stays that match the stored fixes, a relearn
//! that gives back what online learning gave (also while fixes arrive, and after a Redis
//! flush), and a re-seeded refinement that rejects a late old fix again.
#![allow(clippy::print_stdout)]

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use futures::StreamExt as _;
use trackmesh_proto::v1::{
    DevicePlacesRequest, DevicePredictRequest, Fix, Place, Prediction, RefinedFix, RelearnProgress,
    RelearnRequest, ReseedRequest, Stay, Trip, Verdict,
};
use trackmesh_shared::geo;

const WEEK: &str = "ais-ny-harbor-2020-12-01..07.csv";
const FERRIES: [&str; 2] = ["366952790", "367000150"];
/// The ferry terminals: St. George (Staten Island) and Whitehall (Manhattan).
const TERMINALS: [(f64, f64); 2] = [(40.6437, -74.0727), (40.7010, -74.0130)];
/// 2020-12-04T00:00:00Z: the ferries' last day in the sample starts (one ferry reports until
/// Dec 4, the other until Dec 5).
const LAST_DAY_MS: i64 = 1_607_040_000_000;

async fn places(client: &mut Client, device: &str) -> Vec<Place> {
    let request = DevicePlacesRequest {
        device_id: device.into(),
        k: 0,
    };
    client
        .get_places(request)
        .await
        .unwrap()
        .into_inner()
        .places
}

async fn predictions(client: &mut Client, device: &str) -> Vec<Prediction> {
    let request = DevicePredictRequest {
        device_id: device.into(),
        k: 5,
    };
    let answer = client.predict_next(request).await.unwrap().into_inner();
    answer.predictions
}

/// What learning knows of a device and what storage holds of its history, once storage holds
/// every stay the places count (a place's visits are its stays) and a trip between each two.
#[derive(Debug, PartialEq)]
struct Learned {
    places: Vec<Place>,
    predictions: Vec<Prediction>,
    stays: Vec<Stay>,
    trips: Vec<Trip>,
}

async fn learned(client: &mut Client, device: &str) -> Learned {
    let start = std::time::Instant::now();
    loop {
        let places = places(client, device).await;
        let visits: u32 = places.iter().map(|p| p.visits).sum();
        let stays = stays(client, device).await;
        let trips = trips(client, device).await;
        if (stays.len() == visits as usize && trips.len() + 1 == stays.len())
            || start.elapsed() > Duration::from_secs(60)
        {
            let predictions = predictions(client, device).await;
            return Learned {
                places,
                predictions,
                stays,
                trips,
            };
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn ingest_all(client: &mut Client, fixes: &[Fix], batch: usize) {
    for chunk in fixes.chunks(batch) {
        let answer = ingest(client, chunk.to_vec()).await.unwrap();
        assert!(answer.stored && answer.learning_ok, "{answer:?}");
    }
}

async fn relearn(client: &mut Client, request: RelearnRequest) -> Vec<RelearnProgress> {
    let mut stream = client.relearn(request).await.unwrap().into_inner();
    let mut progress = Vec::new();
    while let Some(message) = stream.next().await {
        progress.push(message.unwrap());
    }
    progress
}

/// The stored fixes with `from <= time <= to` (what a trip covers), recomputed here.
fn along(track: &[RefinedFix], from_ms: i64, to_ms: i64) -> (u32, f64, f64) {
    let fixes: Vec<&Fix> = track
        .iter()
        .filter_map(|f| f.fix.as_ref())
        .filter(|f| (from_ms..=to_ms).contains(&f.time_ms))
        .collect();
    let mut distance_m = 0.0;
    let mut max_kmh: f64 = 0.0;
    for pair in fixes.windows(2) {
        let hop = geo::haversine_m(pair[0].lat, pair[0].lon, pair[1].lat, pair[1].lon);
        distance_m += hop;
        max_kmh = max_kmh.max(geo::speed_kmh(hop, pair[1].time_ms - pair[0].time_ms));
    }
    (fixes.len() as u32, distance_m, max_kmh)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

fn terminal(lat: f64, lon: f64) -> Option<usize> {
    TERMINALS
        .iter()
        .position(|(t_lat, t_lon)| geo::haversine_m(lat, lon, *t_lat, *t_lon) < 500.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn ferry_trips_run_between_terminal_stays_and_match_the_stored_fixes() {
    let mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    ingest_all(&mut client, &ais(WEEK, &FERRIES), 500).await;

    for ferry in FERRIES {
        let learned = learned(&mut client, ferry).await;
        let (stays, trips) = (&learned.stays, &learned.trips);
        let track = track(&mut client, ferry).await;
        assert!(stays.len() > 20, "{ferry}: {} stays", stays.len());
        assert_eq!(
            trips.len() + 1,
            stays.len(),
            "{ferry}: a trip between each two stays"
        );
        for (trip, pair) in trips.iter().zip(stays.windows(2)) {
            let (from, to) = (&pair[0], &pair[1]);
            // From the end of one stay to the start of the next: trips do not overlap.
            assert_eq!((trip.start_ms, trip.end_ms), (from.end_ms, to.start_ms));
            assert!(from.start_ms < from.end_ms && trip.start_ms <= trip.end_ms);
            let places = (trip.from_place.as_ref(), trip.to_place.as_ref());
            let (Some(from_place), Some(to_place)) = places else {
                panic!("trip without places: {trip:?}");
            };
            assert_eq!(
                (&from_place.place_id, &to_place.place_id),
                (&from.place_id, &to.place_id)
            );
            let (fixes, distance_m, max_kmh) = along(&track, trip.start_ms, trip.end_ms);
            assert_eq!(trip.fixes, fixes, "{trip:?}");
            assert!(
                close(trip.distance_m, distance_m),
                "{trip:?}: {distance_m} m"
            );
            assert!(
                close(trip.max_speed_kmh, max_kmh),
                "{trip:?}: {max_kmh} km/h"
            );
            let hours = (trip.end_ms - trip.start_ms) as f64 / 3_600_000.0;
            if hours > 0.0 {
                assert!(close(trip.mean_speed_kmh, distance_m / 1000.0 / hours));
            }
        }
        // Stays are at the terminals; a ferry docked there long enough to count twice in a
        // row (a stay, then another after a jump or a gap) makes a trip from it back to it.
        let at_terminal = stays
            .iter()
            .filter(|s| terminal(s.lat, s.lon).is_some())
            .count();
        let round = trips
            .iter()
            .filter(|t| {
                let from = t.from_place.as_ref().unwrap();
                let to = t.to_place.as_ref().unwrap();
                terminal(from.lat, from.lon).is_some()
                    && terminal(from.lat, from.lon) == terminal(to.lat, to.lon)
            })
            .count();
        let crossing = trips
            .iter()
            .filter(|t| t.distance_m > 7_000.0 && t.end_ms - t.start_ms < 3_600_000)
            .count();
        println!(
            "ferry {ferry}: {} stays, {at_terminal} at a terminal; {} trips, {round} from a \
             terminal back to it, {crossing} crossings of 7 km or more under an hour",
            stays.len(),
            trips.len()
        );
        assert!(
            at_terminal * 10 >= stays.len() * 9,
            "{ferry}: {at_terminal} of {} stays at a terminal",
            stays.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn relearn_gives_back_what_online_learning_gave() {
    // Its own Redis, to flush it.
    let redis = testkit::Backend::start(testkit::Kind::Redis);
    let mesh = Mesh::start(Options {
        redis: Some(redis.addr()),
        // Fixes reach ClickHouse up to 2 s after learning observed them: a relearn that ends
        // while they arrive must wait for them, or lose them.
        storage_env: vec![("BATCH_MAX_WAIT", "2s".into())],
        ..Options::default()
    })
    .await;
    let week = ais(WEEK, &FERRIES);
    let (before, last_day): (Vec<Fix>, Vec<Fix>) =
        week.iter().cloned().partition(|f| f.time_ms < LAST_DAY_MS);

    // Tenant 1 learns the whole week online: the reference.
    let mut online = mesh.client(1).await;
    ingest_all(&mut online, &week, 500).await;
    let mut reference = BTreeMap::new();
    for ferry in FERRIES {
        let learned = learned(&mut online, ferry).await;
        assert!(learned.places.len() >= 2 && !learned.predictions.is_empty());
        reference.insert(ferry, learned);
    }

    // Tenant 0 learns the week but its last day online, then relearns while that day arrives.
    let mut client = mesh.client(0).await;
    ingest_all(&mut client, &before, 500).await;
    let request = RelearnRequest {
        device_ids: FERRIES.iter().map(|&d| d.into()).collect(),
        ..RelearnRequest::default()
    };
    let mut feed = mesh.client(0).await;
    let late = last_day.clone();
    let arriving = tokio::spawn(async move {
        for chunk in late.chunks(20) {
            ingest_all(&mut feed, chunk, 20).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let progress = relearn(&mut client, request.clone()).await;
    arriving.await.unwrap();
    let done: Vec<&RelearnProgress> = progress.iter().filter(|p| p.done).collect();
    assert_eq!(done.len(), 2, "one summary per device: {progress:?}");
    let last = progress.last().unwrap();
    assert_eq!((last.devices_done, last.devices_total), (2, 2));
    assert!(last.fixes_total as usize >= before.len(), "{last:?}");
    for ferry in FERRIES {
        assert_eq!(
            learned(&mut client, ferry).await,
            reference[ferry],
            "{ferry}"
        );
    }

    // Twice gives the same.
    relearn(&mut client, request).await;
    for ferry in FERRIES {
        assert_eq!(
            learned(&mut client, ferry).await,
            reference[ferry],
            "{ferry}"
        );
    }

    // Redis lost: every learned place and every track anchor gone.
    let flushed = std::process::Command::new("redis-cli")
        .args(["-u", &format!("redis://{}", redis.addr()), "FLUSHALL"])
        .output()
        .unwrap();
    assert!(flushed.status.success(), "{flushed:?}");
    assert!(places(&mut client, FERRIES[0]).await.is_empty());

    // Without re-seeding, a late old fix of a device would be accepted and stored out of
    // order; after it, it is OUT_OF_ORDER.
    let old = Fix {
        time_ms: LAST_DAY_MS - 3_600_000,
        ..last_day[0].clone()
    };
    let reseeded = client
        .reseed(ReseedRequest {
            all_devices: true,
            ..ReseedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reseeded.seeded, reseeded.kept), (2, 0), "{reseeded:?}");
    let answer = ingest(&mut client, vec![old]).await.unwrap();
    assert_eq!(answer.accepted, 0, "{answer:?}");
    assert_eq!(answer.rejections[0].verdict(), Verdict::OutOfOrder);

    // Relearn restores the places, visits and transitions.
    let progress = relearn(
        &mut client,
        RelearnRequest {
            all_devices: true,
            ..RelearnRequest::default()
        },
    )
    .await;
    let last = progress.last().unwrap();
    assert_eq!((last.devices_done, last.devices_total), (2, 2));
    for summary in progress.iter().filter(|p| p.done) {
        assert_eq!(summary.places_before, 0, "{summary:?}");
    }
    for ferry in FERRIES {
        assert_eq!(
            learned(&mut client, ferry).await,
            reference[ferry],
            "{ferry}"
        );
    }
}
