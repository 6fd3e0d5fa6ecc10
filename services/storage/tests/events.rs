//! Geofence and place events against the real tansu broker and ClickHouse: `TenantEvents`
//! produced to the events topic (as learning produces them) are stored once however often
//! they come, GetEvents filters them by device, time and type within the tenant, a message
//! that does not decode is skipped, and DeleteDevice removes a device's events.

mod common;

use std::time::Duration;

use common::{Topic, config, start, start_with_events};
use prost::Message as _;
use testkit::{Backend, Kind};
use tonic::{Code, transport::Channel};
use trackmesh_proto::v1::{
    DeleteStoredDeviceRequest, Event, EventType, Fix, StoredEventsRequest,
    storage_client::StorageClient,
};
use trackmesh_shared::event_messages::TenantEvents;

const T0: i64 = 1_750_000_000_000;

/// Produces `events` (of one device) as learning does.
async fn produce_events(topic: &Topic, tenant: &str, events: &[Event]) {
    let message = TenantEvents {
        tenant_id: tenant.into(),
        events: events.iter().cloned().map(Into::into).collect(),
        ..TenantEvents::default()
    };
    topic.send_events(&events[0].device_id, message, None).await;
}

/// An event at `T0 + offset_ms`, with its triggering fix.
fn event(kind: EventType, device: &str, fence_or_place: &str, offset_ms: i64) -> Event {
    let (geofence_id, place_id) = match kind {
        EventType::Enter | EventType::Exit => (fence_or_place.to_owned(), String::new()),
        _ => (String::new(), fence_or_place.to_owned()),
    };
    let lat = 40.6 + offset_ms as f64 * 1e-7;
    Event {
        r#type: kind as i32,
        device_id: device.into(),
        geofence_id,
        place_id,
        time_ms: T0 + offset_ms,
        lat,
        lon: -74.0,
        fix: Some(Fix {
            device_id: device.into(),
            time_ms: T0 + offset_ms,
            lat,
            lon: -74.0,
            accuracy_m: Some(8.5),
            speed_mps: Some(1.25),
            ..Fix::default()
        }),
    }
}

fn request(tenant: &str) -> StoredEventsRequest {
    StoredEventsRequest {
        tenant_id: tenant.into(),
        ..StoredEventsRequest::default()
    }
}

async fn get(client: &mut StorageClient<Channel>, request: StoredEventsRequest) -> Vec<Event> {
    client
        .get_events(request)
        .await
        .unwrap()
        .into_inner()
        .events
}

/// Waits until the tenant's stored events include `last` (produced after the others on its
/// device's partition, so the ones before it are stored too).
async fn wait_for(client: &mut StorageClient<Channel>, tenant: &str, last: &Event) {
    testkit::wait_until(
        Duration::from_secs(60),
        "the events were not stored",
        async || {
            // Tolerates a ClickHouse that is just coming back.
            client
                .get_events(request(tenant))
                .await
                .is_ok_and(|answer| answer.into_inner().events.contains(last))
        },
    )
    .await;
}

#[tokio::test]
async fn events_are_stored_once_and_filtered_by_device_time_and_type_within_the_tenant() {
    let (_service, mut client, events) = start_with_events().await;
    let (a, b) = (testkit::unique("ta"), testkit::unique("tb"));
    let d1_enter = event(EventType::Enter, "d1", "g1", 1000);
    let d1_arrive = event(EventType::Arrive, "d1", "p1", 3000);
    let d1_exit = event(EventType::Exit, "d1", "g1", 5000);
    let d1_depart = event(EventType::Depart, "d1", "p1", 9000);
    let d2_depart = event(EventType::Depart, "d2", "p2", 2000);
    let d2_enter = event(EventType::Enter, "d2", "g1", 3000);
    // Same time and device as d2_enter, another fence: a distinct event.
    let d2_enter_g2 = event(EventType::Enter, "d2", "g2", 3000);
    let b_enter = event(EventType::Enter, "d1", "g9", 1000);

    let first = [d1_enter.clone(), d1_arrive.clone()];
    produce_events(&events, &a, &first).await;
    // The same event twice in one message, and again in a second one.
    produce_events(
        &events,
        &a,
        &[d1_enter.clone(), d1_exit.clone(), d1_exit.clone()],
    )
    .await;
    produce_events(
        &events,
        &a,
        &[d2_depart.clone(), d2_enter.clone(), d2_enter_g2.clone()],
    )
    .await;
    produce_events(&events, &b, std::slice::from_ref(&b_enter)).await;
    // The whole first message again (a producer's retry), then the last event of d1.
    produce_events(&events, &a, &first).await;
    produce_events(&events, &a, std::slice::from_ref(&d1_depart)).await;
    // d2's partition: its first message again, after the original.
    produce_events(&events, &a, std::slice::from_ref(&d2_enter)).await;

    wait_for(&mut client, &a, &d1_depart).await;
    wait_for(&mut client, &a, &d2_enter_g2).await;
    wait_for(&mut client, &b, &b_enter).await;

    // Each once, by (time, device, type, geofence, place).
    let all = get(&mut client, request(&a)).await;
    assert_eq!(
        all,
        [
            d1_enter.clone(),
            d2_depart.clone(),
            d1_arrive.clone(),
            d2_enter.clone(),
            d2_enter_g2.clone(),
            d1_exit.clone(),
            d1_depart.clone(),
        ]
    );
    assert_eq!(all[0].fix.as_ref().unwrap().accuracy_m, Some(8.5));

    let d1 = StoredEventsRequest {
        device_id: "d1".into(),
        ..request(&a)
    };
    assert_eq!(
        get(&mut client, d1.clone()).await,
        [
            d1_enter.clone(),
            d1_arrive.clone(),
            d1_exit.clone(),
            d1_depart.clone()
        ]
    );
    // Both bounds are inclusive; to_ms 0 is open.
    let window = StoredEventsRequest {
        from_ms: T0 + 2000,
        to_ms: T0 + 3000,
        ..request(&a)
    };
    assert_eq!(
        get(&mut client, window).await,
        [
            d2_depart.clone(),
            d1_arrive.clone(),
            d2_enter.clone(),
            d2_enter_g2.clone()
        ]
    );
    let from = StoredEventsRequest {
        from_ms: T0 + 5000,
        ..d1.clone()
    };
    assert_eq!(
        get(&mut client, from).await,
        [d1_exit.clone(), d1_depart.clone()]
    );
    let enters = StoredEventsRequest {
        types: vec![EventType::Enter as i32],
        ..request(&a)
    };
    assert_eq!(
        get(&mut client, enters).await,
        [d1_enter.clone(), d2_enter.clone(), d2_enter_g2.clone()]
    );
    let places = StoredEventsRequest {
        types: vec![EventType::Depart as i32, EventType::Arrive as i32],
        ..d1
    };
    assert_eq!(
        get(&mut client, places).await,
        [d1_arrive.clone(), d1_depart.clone()]
    );

    // The other tenant sees its own event only, even for a device name both use.
    assert_eq!(
        get(&mut client, request(&b)).await,
        std::slice::from_ref(&b_enter)
    );
    let b_d1 = StoredEventsRequest {
        device_id: "d1".into(),
        ..request(&b)
    };
    assert_eq!(get(&mut client, b_d1).await, [b_enter]);
    assert!(
        get(&mut client, request(&testkit::unique("tc")))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn an_undecodable_message_is_skipped_and_later_events_are_stored() {
    let (_service, mut client, events) = start_with_events().await;
    let tenant = testkit::unique("t");
    let key = format!("{tenant}/d1");
    // Not protobuf at all, then a TenantEvents without a valid tenant.
    events
        .send(&key, b"\xff\xff\xff not an event", None, None)
        .await;
    let no_tenant = TenantEvents {
        tenant_id: String::new(),
        events: vec![event(EventType::Enter, "d1", "g0", 0).into()],
        ..TenantEvents::default()
    };
    events
        .send(&key, &no_tenant.encode_to_vec(), None, None)
        .await;
    // An event of an unknown type beside a good one: the good one is stored.
    let mut unknown = event(EventType::Exit, "d1", "g1", 500);
    unknown.r#type = 42;
    let good = event(EventType::Enter, "d1", "g1", 1000);
    produce_events(&events, &tenant, &[unknown, good.clone()]).await;
    let later = event(EventType::Exit, "d1", "g1", 2000);
    produce_events(&events, &tenant, std::slice::from_ref(&later)).await;

    wait_for(&mut client, &tenant, &later).await;
    assert_eq!(get(&mut client, request(&tenant)).await, [good, later]);
}

/// Events produced while ClickHouse is down are stored once it is back (the insert is
/// retried), and events held when the service stops with ClickHouse down are not committed:
/// the next instance stores them.
#[tokio::test]
async fn clickhouse_outages_delay_events_but_lose_none() {
    let mut clickhouse = Backend::start(Kind::ClickHouse);
    let mut config = config();
    config.storage.clickhouse_url = clickhouse.addr();
    config.common.shutdown_grace = trackmesh_shared::config::Duration::from_secs(3);
    let events = Topic::new(&config.storage.kafka_events_topic);
    let (service, mut client) = start(config.clone()).await;
    let tenant = testkit::unique("t");
    let first = event(EventType::Enter, "v", "g1", 1000);
    produce_events(&events, &tenant, std::slice::from_ref(&first)).await;
    wait_for(&mut client, &tenant, &first).await;

    clickhouse.stop();
    let second = event(EventType::Exit, "v", "g1", 2000);
    produce_events(&events, &tenant, std::slice::from_ref(&second)).await;
    // The consumer holds the event and retries its insert.
    tokio::time::sleep(Duration::from_secs(3)).await;
    clickhouse.restart();
    wait_for(&mut client, &tenant, &second).await;

    clickhouse.stop();
    let third = event(EventType::Enter, "v", "g2", 3000);
    produce_events(&events, &tenant, std::slice::from_ref(&third)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    service.shutdown().await.unwrap();
    clickhouse.restart();
    let (_service, mut client) = start(config).await;
    wait_for(&mut client, &tenant, &third).await;
    assert_eq!(
        get(&mut client, request(&tenant)).await,
        [first, second, third],
        "every event, once"
    );
}

#[tokio::test]
async fn delete_device_removes_its_events() {
    let (_service, mut client, events) = start_with_events().await;
    let tenant = testkit::unique("t");
    let gone = event(EventType::Arrive, "gone", "p1", 1000);
    let kept = event(EventType::Arrive, "kept", "p1", 1000);
    produce_events(&events, &tenant, std::slice::from_ref(&gone)).await;
    produce_events(&events, &tenant, std::slice::from_ref(&kept)).await;
    wait_for(&mut client, &tenant, &gone).await;
    wait_for(&mut client, &tenant, &kept).await;

    client
        .delete_device(DeleteStoredDeviceRequest {
            tenant_id: tenant.clone(),
            device_id: "gone".into(),
        })
        .await
        .unwrap();
    // ALTER … DELETE is a mutation: applied in the background, soon.
    testkit::wait_until(Duration::from_secs(30), "delete not applied", async || {
        get(&mut client, request(&tenant)).await == std::slice::from_ref(&kept)
    })
    .await;
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let (_service, mut client) = start(config()).await;
    let cases = [
        (request(""), "tenant_id: required"),
        (request("a/b"), "tenant_id: "),
        (
            StoredEventsRequest {
                device_id: "bad\ndevice".into(),
                ..request("t")
            },
            "device_id: contains control characters",
        ),
        (
            StoredEventsRequest {
                device_id: "x".repeat(129),
                ..request("t")
            },
            "device_id: longer than 128 bytes",
        ),
        (
            StoredEventsRequest {
                from_ms: T0 + 1,
                to_ms: T0,
                ..request("t")
            },
            "from_ms: ",
        ),
        (
            StoredEventsRequest {
                types: vec![0],
                ..request("t")
            },
            "types[0]: 0 is not an event type",
        ),
        (
            StoredEventsRequest {
                types: vec![EventType::Enter as i32, 7],
                ..request("t")
            },
            "types[1]: 7 is not an event type",
        ),
    ];
    for (request, expected) in cases {
        let err = client.get_events(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{request:?}");
        assert!(
            err.message().starts_with(expected),
            "{request:?}: {}",
            err.message()
        );
    }
}
