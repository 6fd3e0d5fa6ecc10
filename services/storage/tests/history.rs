//! Stays and trips against the real tansu broker and ClickHouse: produced to the events topic
//! (as learning produces them), stored once however often they come, the latest produced
//! (by Kafka timestamp) winning; GetStays/GetTrips return those overlapping a range, within
//! the tenant; DeleteHistory removes them from a time on, DeleteDevice altogether.

mod common;

use std::time::Duration;

use common::{Topic, config, start, start_with_events};
use tonic::{Code, transport::Channel};
use trackmesh_proto::v1::{
    DeleteHistoryRequest, DeleteStoredDeviceRequest, Place, Stay, StoredHistoryRequest, Trip,
    storage_client::StorageClient,
};
use trackmesh_shared::event_messages::TenantEvents;

const T0: i64 = 1_750_000_000_000;
const MIN: i64 = 60_000;
/// Kafka message timestamps: well before now, so a message without one (now) wins over them.
const TS: i64 = 1_760_000_000_000;

/// One message as learning produces it (key `tenant/device`), with the Kafka timestamp `ts`.
async fn produce(
    events: &Topic,
    tenant: &str,
    device: &str,
    stays: &[Stay],
    trips: &[Trip],
    ts: i64,
) {
    let message = TenantEvents {
        tenant_id: tenant.into(),
        events: vec![],
        stays: stays.iter().cloned().map(Into::into).collect(),
        trips: trips.iter().cloned().map(Into::into).collect(),
    };
    events.send_events(device, message, Some(ts)).await;
}

/// A stay of `device` from `T0 + start_min` to `T0 + end_min` minutes.
fn stay(device: &str, place: &str, start_min: i64, end_min: i64) -> Stay {
    Stay {
        place_id: place.into(),
        lat: 40.6 + start_min as f64 * 1e-4,
        lon: -74.0,
        start_ms: T0 + start_min * MIN,
        end_ms: T0 + end_min * MIN,
        fixes: u32::try_from(end_min - start_min).unwrap() + 1,
        device_id: device.into(),
    }
}

fn place(id: &str, lat: f64) -> Place {
    Place {
        place_id: id.into(),
        lat,
        lon: -74.0,
        ..Place::default()
    }
}

/// A trip of `device` between the stays `from` and `to`.
fn trip(from: &Stay, to: &Stay) -> Trip {
    let distance_m = (to.lat - from.lat).abs() * 111_000.0;
    let hours = (to.start_ms - from.end_ms) as f64 / 3_600_000.0;
    Trip {
        from_place: Some(place(&from.place_id, from.lat)),
        to_place: Some(place(&to.place_id, to.lat)),
        start_ms: from.end_ms,
        end_ms: to.start_ms,
        distance_m,
        max_speed_kmh: 2.0 * distance_m / 1000.0 / hours,
        mean_speed_kmh: distance_m / 1000.0 / hours,
        fixes: 7,
        device_id: from.device_id.clone(),
    }
}

fn request(tenant: &str, device: &str, from_ms: i64, to_ms: i64) -> StoredHistoryRequest {
    StoredHistoryRequest {
        tenant_id: tenant.into(),
        device_id: device.into(),
        from_ms,
        to_ms,
    }
}

fn all(tenant: &str, device: &str) -> StoredHistoryRequest {
    request(tenant, device, 0, 0)
}

async fn stays(client: &mut StorageClient<Channel>, request: StoredHistoryRequest) -> Vec<Stay> {
    client.get_stays(request).await.unwrap().into_inner().stays
}

async fn trips(client: &mut StorageClient<Channel>, request: StoredHistoryRequest) -> Vec<Trip> {
    client.get_trips(request).await.unwrap().into_inner().trips
}

/// Waits until the device's stored stays include `last` (produced after the others on the
/// device's partition, so the ones before it, trips included, are stored too).
async fn wait_for(client: &mut StorageClient<Channel>, tenant: &str, last: &Stay) {
    testkit::wait_until(
        Duration::from_secs(60),
        "the stays were not stored",
        async || {
            client
                .get_stays(all(tenant, &last.device_id))
                .await
                .is_ok_and(|answer| answer.into_inner().stays.contains(last))
        },
    )
    .await;
}

#[tokio::test]
async fn stays_and_trips_are_stored_once_the_latest_produced_winning_within_the_tenant() {
    let (_service, mut client, events) = start_with_events().await;
    let (a, b) = (testkit::unique("ta"), testkit::unique("tb"));
    let home = stay("d1", "home", 0, 60);
    let work = stay("d1", "work", 90, 300);
    let commute = trip(&home, &work);
    // Relearned: the same starts, other content, produced later.
    let mut work_again = stay("d1", "work-2", 90, 310);
    work_again.fixes = 99;
    let mut commute_again = trip(&home, &work_again);
    commute_again.distance_m += 123.0;
    commute_again.fixes = 8;

    produce(&events, &a, "d1", std::slice::from_ref(&home), &[], TS).await;
    // Twice in one message, and the whole message again (a producer's retry).
    let closing = [work.clone(), work.clone()];
    let closing_trip = std::slice::from_ref(&commute);
    produce(&events, &a, "d1", &closing, closing_trip, TS + 1).await;
    produce(&events, &a, "d1", &closing, closing_trip, TS + 1).await;
    let relearned_trip = std::slice::from_ref(&commute_again);
    let relearned = std::slice::from_ref(&work_again);
    produce(&events, &a, "d1", relearned, relearned_trip, TS + 5000).await;
    // The original again, after the relearned one but stamped before it: it loses.
    produce(&events, &a, "d1", &closing, closing_trip, TS + 1).await;
    // An invalid stay and trip beside good ones: the good ones are stored.
    let mut backwards = stay("d1", "x", 500, 510);
    backwards.end_ms = backwards.start_ms - 1;
    let mut no_place = trip(&work, &home);
    no_place.from_place = None;
    let gym = stay("d1", "gym", 400, 450);
    let to_gym = trip(&work_again, &gym);
    produce(
        &events,
        &a,
        "d1",
        &[backwards, gym.clone()],
        &[no_place, to_gym.clone()],
        TS + 6000,
    )
    .await;
    // The other tenant, the same device name.
    let elsewhere = stay("d1", "elsewhere", 0, 30);
    produce(&events, &b, "d1", std::slice::from_ref(&elsewhere), &[], TS).await;

    wait_for(&mut client, &a, &gym).await;
    wait_for(&mut client, &b, &elsewhere).await;

    assert_eq!(
        stays(&mut client, all(&a, "d1")).await,
        [home.clone(), work_again, gym]
    );
    assert_eq!(
        trips(&mut client, all(&a, "d1")).await,
        [commute_again, to_gym]
    );
    assert_eq!(
        stays(&mut client, all(&b, "d1")).await,
        std::slice::from_ref(&elsewhere)
    );
    assert!(trips(&mut client, all(&b, "d1")).await.is_empty());
    assert!(stays(&mut client, all(&a, "d2")).await.is_empty());
    assert!(
        stays(&mut client, all(&testkit::unique("tc"), "d1"))
            .await
            .is_empty()
    );
}

/// Three stays (minutes 0–10, 20–30, 40–50) and the two trips between them.
fn day(device: &str) -> (Vec<Stay>, Vec<Trip>) {
    let stays = vec![
        stay(device, "p1", 0, 10),
        stay(device, "p2", 20, 30),
        stay(device, "p3", 40, 50),
    ];
    let trips = vec![trip(&stays[0], &stays[1]), trip(&stays[1], &stays[2])];
    (stays, trips)
}

/// A day of each device, produced and stored.
async fn stored_days<const N: usize>(
    client: &mut StorageClient<Channel>,
    events: &Topic,
    tenant: &str,
    devices: [&str; N],
) -> [(Vec<Stay>, Vec<Trip>); N] {
    let days = devices.map(day);
    for (device, (stays, trips)) in devices.iter().zip(&days) {
        produce(events, tenant, device, stays, trips, TS).await;
    }
    for (stays, _) in &days {
        wait_for(client, tenant, &stays[2]).await;
    }
    days
}

#[tokio::test]
async fn get_stays_and_trips_return_those_overlapping_the_range_in_start_order() {
    let (_service, mut client, events) = start_with_events().await;
    let tenant = testkit::unique("t");
    let (s, t) = day("d");
    // Out of start order over two messages.
    produce(&events, &tenant, "d", &[s[2].clone()], &[t[1].clone()], TS).await;
    produce(&events, &tenant, "d", &s[..2], &t[..1], TS).await;
    wait_for(&mut client, &tenant, &s[1]).await;

    let at = |min: i64| T0 + min * MIN;
    let cases: [(i64, i64, &[usize], &[usize]); 8] = [
        // (from, to, stays, trips); to 0 is open.
        (0, 0, &[0, 1, 2], &[0, 1]),
        // Both ends touch: inclusive.
        (at(10), at(20), &[0, 1], &[0]),
        (at(11), at(19), &[], &[0]),
        (at(25), 0, &[1, 2], &[1]),
        (at(31), 0, &[2], &[1]),
        (at(51), 0, &[], &[]),
        (0, at(5), &[0], &[]),
        (at(5), at(45), &[0, 1, 2], &[0, 1]),
    ];
    for (from, to, want_stays, want_trips) in cases {
        let want: Vec<Stay> = want_stays.iter().map(|&i| s[i].clone()).collect();
        let got = stays(&mut client, request(&tenant, "d", from, to)).await;
        assert_eq!(got, want, "stays from {from} to {to}");
        let want: Vec<Trip> = want_trips.iter().map(|&i| t[i].clone()).collect();
        let got = trips(&mut client, request(&tenant, "d", from, to)).await;
        assert_eq!(got, want, "trips from {from} to {to}");
    }
}

#[tokio::test]
async fn delete_history_removes_from_a_time_on_and_a_relearn_stores_again() {
    let (_service, mut client, events) = start_with_events().await;
    let tenant = testkit::unique("t");
    let [(s, t), (other_s, other_t)] =
        stored_days(&mut client, &events, &tenant, ["d", "other"]).await;

    // From the second stay's start: the first trip (it starts before) stays.
    client
        .delete_history(DeleteHistoryRequest {
            tenant_id: tenant.clone(),
            device_id: "d".into(),
            from_ms: s[1].start_ms,
        })
        .await
        .unwrap();
    // Applied once it answers.
    assert_eq!(stays(&mut client, all(&tenant, "d")).await, [s[0].clone()]);
    assert_eq!(trips(&mut client, all(&tenant, "d")).await, [t[0].clone()]);
    assert_eq!(stays(&mut client, all(&tenant, "other")).await, other_s);
    assert_eq!(trips(&mut client, all(&tenant, "other")).await, other_t);

    // What a relearn produces next is stored, the same starts included.
    let mut again = s[2].clone();
    again.place_id = "p3-relearned".into();
    produce(
        &events,
        &tenant,
        "d",
        std::slice::from_ref(&again),
        &t[1..],
        TS + 1,
    )
    .await;
    wait_for(&mut client, &tenant, &again).await;
    assert_eq!(
        stays(&mut client, all(&tenant, "d")).await,
        [s[0].clone(), again]
    );
    assert_eq!(trips(&mut client, all(&tenant, "d")).await, t);

    // From 0: everything of the device.
    client
        .delete_history(DeleteHistoryRequest {
            tenant_id: tenant.clone(),
            device_id: "d".into(),
            from_ms: 0,
        })
        .await
        .unwrap();
    assert!(stays(&mut client, all(&tenant, "d")).await.is_empty());
    assert!(trips(&mut client, all(&tenant, "d")).await.is_empty());
    assert_eq!(stays(&mut client, all(&tenant, "other")).await, other_s);
}

#[tokio::test]
async fn delete_device_removes_its_stays_and_trips() {
    let (_service, mut client, events) = start_with_events().await;
    let tenant = testkit::unique("t");
    let [_, (kept_s, kept_t)] = stored_days(&mut client, &events, &tenant, ["gone", "kept"]).await;

    client
        .delete_device(DeleteStoredDeviceRequest {
            tenant_id: tenant.clone(),
            device_id: "gone".into(),
        })
        .await
        .unwrap();
    // ALTER … DELETE is a mutation: DeleteDevice does not wait for it.
    testkit::wait_until(Duration::from_secs(30), "delete not applied", async || {
        stays(&mut client, all(&tenant, "gone")).await.is_empty()
            && trips(&mut client, all(&tenant, "gone")).await.is_empty()
    })
    .await;
    assert_eq!(stays(&mut client, all(&tenant, "kept")).await, kept_s);
    assert_eq!(trips(&mut client, all(&tenant, "kept")).await, kept_t);
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let (_service, mut client) = start(config()).await;
    let cases = [
        (request("", "d", 0, 0), "tenant_id: required"),
        (request("a/b", "d", 0, 0), "tenant_id: "),
        (request("t", "", 0, 0), "device_id: required"),
        (
            request("t", "bad\ndevice", 0, 0),
            "device_id: contains control characters",
        ),
        (
            request("t", &"x".repeat(129), 0, 0),
            "device_id: longer than 128 bytes",
        ),
        (
            request("t", "d", T0 + 1, T0),
            "from_ms: 1750000000001 is after to_ms 1750000000000",
        ),
    ];
    for (request, expected) in cases {
        let err = client.get_stays(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "stays {request:?}");
        assert!(
            err.message().starts_with(expected),
            "stays {request:?}: {}",
            err.message()
        );
        let err = client.get_trips(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "trips {request:?}");
        assert!(
            err.message().starts_with(expected),
            "trips {request:?}: {}",
            err.message()
        );
        if expected.starts_with("from_ms") {
            continue;
        }
        let delete = DeleteHistoryRequest {
            tenant_id: request.tenant_id.clone(),
            device_id: request.device_id.clone(),
            from_ms: 0,
        };
        let err = client.delete_history(delete).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "delete {request:?}");
        assert!(
            err.message().starts_with(expected),
            "delete {request:?}: {}",
            err.message()
        );
    }
}
