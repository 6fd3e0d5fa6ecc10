//! Geofences and events on the whole mesh (real Redis, ClickHouse and tansu): fences created
//! through the gateway, ENTER/EXIT evaluated in fix-time order with hysteresis, ARRIVE/DEPART
//! of learned places, stored once each (also when learning was down or a batch is retried),
//! queried with GetEvents and streamed by Watch.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt as _;
use tonic::Code;
use trackmesh_proto::v1::{
    Circle, DeleteGeofenceRequest, Event, EventType, Fix, Geofence, GetEventsRequest,
    ListGeofencesRequest, WatchRequest, watch_message::Item,
};

/// Metres per degree of latitude (and of longitude at the equator), near enough.
const M: f64 = 1.0 / 111_195.0;

fn circle(name: &str, lat: f64, lon: f64, radius_m: f64) -> Geofence {
    Geofence {
        name: name.into(),
        circle: Some(Circle { lat, lon, radius_m }),
        ..Geofence::default()
    }
}

/// A U open to the north, 300 m wide and tall, arms 100 m wide, south-west corner at
/// (lat, lon): inside the U's gap is outside the fence.
fn u_shape(lat: f64, lon: f64) -> Geofence {
    let p = |x: f64, y: f64| format!("[{},{}]", lon + x * M, lat + y * M);
    let ring = [
        p(0.0, 0.0),
        p(300.0, 0.0),
        p(300.0, 300.0),
        p(200.0, 300.0),
        p(200.0, 100.0),
        p(100.0, 100.0),
        p(100.0, 300.0),
        p(0.0, 300.0),
        p(0.0, 0.0),
    ];
    Geofence {
        name: "u".into(),
        polygon_geojson: format!(
            r#"{{"type":"Polygon","coordinates":[[{}]]}}"#,
            ring.join(",")
        ),
        ..Geofence::default()
    }
}

/// Fixes of `device` one minute apart at the given (lat, lon) offsets in metres from a base.
fn walk(device: &str, start_ms: i64, base: (f64, f64), steps: &[(f64, f64)]) -> Vec<Fix> {
    steps
        .iter()
        .enumerate()
        .map(|(i, (y, x))| Fix {
            device_id: device.into(),
            time_ms: start_ms + i as i64 * 60_000,
            lat: base.0 + y * M,
            lon: base.1 + x * M,
            ..Fix::default()
        })
        .collect()
}

/// The stored events of `device` once there are `n` (a minute at most).
async fn events(client: &mut Client, device: &str, n: usize) -> Vec<Event> {
    let start = std::time::Instant::now();
    loop {
        let events = client
            .get_events(GetEventsRequest {
                device_id: device.into(),
                ..GetEventsRequest::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        if events.len() >= n || start.elapsed() > Duration::from_secs(60) {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn summary(events: &[Event], names: &[(String, &str)]) -> Vec<(String, String, i64)> {
    events
        .iter()
        .map(|e| {
            let kind = EventType::try_from(e.r#type)
                .unwrap()
                .as_str_name()
                .to_owned();
            let what = if e.geofence_id.is_empty() {
                e.place_id.clone()
            } else {
                names
                    .iter()
                    .find(|(id, _)| *id == e.geofence_id)
                    .map_or(e.geofence_id.clone(), |(_, n)| (*n).to_owned())
            };
            (kind, what, e.time_ms)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn geofence_transitions_are_stored_once_and_streamed_in_fix_time_order() {
    let mesh = Mesh::start(Options::default()).await;
    let (mut client, mut other) = (mesh.client(0).await, mesh.client(1).await);
    let base = (40.0, -74.0);

    // Refused with the field and the rule; nothing created.
    for (bad, field) in [
        (circle("c", 95.0, 0.0, 10.0), "circle.lat"),
        (circle("c", 40.0, -74.0, -1.0), "circle.radius_m"),
        (Geofence::default(), "circle"),
        (
            Geofence {
                polygon_geojson: r#"{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1]]]}"#.into(),
                ..Geofence::default()
            },
            "polygon_geojson",
        ),
    ] {
        let err = client.create_geofence(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {err:?}");
    }
    // A circle of 100 m around (base + 500 m east) and the U with its corner at base.
    let round = client
        .create_geofence(circle("round", base.0, base.1 + 500.0 * M, 100.0))
        .await
        .unwrap()
        .into_inner();
    let u = client
        .create_geofence(u_shape(base.0, base.1))
        .await
        .unwrap()
        .into_inner();
    assert!(round.geofence_id.starts_with("gf-") && round.created_ms > 0);
    let listed = client
        .list_geofences(ListGeofencesRequest {})
        .await
        .unwrap()
        .into_inner()
        .geofences;
    assert_eq!(listed, vec![round.clone(), u.clone()]);
    let theirs = other
        .list_geofences(ListGeofencesRequest {})
        .await
        .unwrap()
        .into_inner()
        .geofences;
    assert!(theirs.is_empty(), "fences are per tenant");
    let names = vec![
        (round.geofence_id.clone(), "round"),
        (u.geofence_id.clone(), "u"),
    ];

    let mut live = watch(&mut client, WatchRequest::default()).await;
    // Up the U's left arm (inside), across its gap (outside) into the right arm (inside),
    // then east through the circle and out.
    let t0 = now_ms() - 3_600_000;
    let steps = [
        (-50.0, 50.0),  // 0 south of the U: outside
        (150.0, 50.0),  // 1 left arm: ENTER u
        (250.0, 50.0),  // 2 still inside
        (250.0, 150.0), // 3 the gap: EXIT u
        (250.0, 250.0), // 4 right arm: ENTER u
        (250.0, 350.0), // 5 east of it: EXIT u
        (0.0, 480.0),   // 6 in the circle: ENTER round
        (0.0, 700.0),   // 7 out: EXIT round
    ];
    let track = walk("walker", t0, base, &steps);
    // Sent in two batches, the second with its fixes shuffled: evaluated in fix-time order.
    ingest(&mut client, track[..4].to_vec()).await.unwrap();
    let mut rest = track[4..].to_vec();
    rest.reverse();
    let answer = ingest(&mut client, rest).await.unwrap();
    assert_eq!(answer.accepted, 4, "{answer:?}");

    let at = |i: usize| track[i].time_ms;
    let expected = vec![
        ("ENTER".to_owned(), "u".to_owned(), at(1)),
        ("EXIT".into(), "u".into(), at(3)),
        ("ENTER".into(), "u".into(), at(4)),
        ("EXIT".into(), "u".into(), at(5)),
        ("ENTER".into(), "round".into(), at(6)),
        ("EXIT".into(), "round".into(), at(7)),
    ];
    let stored = events(&mut client, "walker", expected.len()).await;
    assert_eq!(summary(&stored, &names), expected);
    let first = &stored[0];
    assert_eq!((first.lat, first.lon), (track[1].lat, track[1].lon));
    assert_eq!(
        first.fix.as_ref().unwrap().time_ms,
        at(1),
        "carries its fix"
    );

    let mut streamed = Vec::new();
    while streamed.len() < expected.len() {
        let message = tokio::time::timeout(Duration::from_secs(60), live.next())
            .await
            .expect("events streamed within a minute")
            .unwrap()
            .unwrap();
        if let Some(Item::Event(event)) = message.item {
            streamed.push(event);
        }
    }
    assert_eq!(summary(&streamed, &names), expected);

    // The same batch again (a client retry): replays, no new events.
    let again = ingest(&mut client, track[4..].to_vec()).await.unwrap();
    assert_eq!(again.replayed, 4, "{again:?}");
    // Boundary jitter: ±5 m around the circle's northern edge (north-south, where M is
    // exact) with 20 m accuracy toggles nothing.
    let jitter: Vec<Fix> = (0..10)
        .map(|i| Fix {
            device_id: "jitter".into(),
            time_ms: t0 + i * 60_000,
            lat: base.0 + (100.0 + if i % 2 == 0 { 5.0 } else { -5.0 }) * M,
            lon: base.1 + 500.0 * M,
            accuracy_m: Some(20.0),
            ..Fix::default()
        })
        .collect();
    ingest(&mut client, jitter).await.unwrap();
    // A marker after both: once its events are stored, anything before would be too.
    let marker = walk(
        "walker",
        t0 + 8 * 60_000,
        base,
        &[(0.0, 500.0), (0.0, 900.0)],
    );
    ingest(&mut client, marker).await.unwrap();
    let stored = events(&mut client, "walker", expected.len() + 2).await;
    assert_eq!(stored.len(), expected.len() + 2, "each transition once");
    let jitter = events(&mut client, "jitter", 0).await;
    assert!(jitter.is_empty(), "no flapping: {jitter:?}");
    let none = other
        .get_events(GetEventsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(none.is_empty(), "another tenant's events: {none:?}");

    // Deleted: no more events from it; deleting again is fine.
    let deleted = client
        .delete_geofence(DeleteGeofenceRequest {
            geofence_id: round.geofence_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.existed);
    let again = client
        .delete_geofence(DeleteGeofenceRequest {
            geofence_id: round.geofence_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.existed);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_fixes_ingested_while_learning_was_down_are_not_lost() {
    let mut mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let base = (41.0, -73.0);
    let fence = client
        .create_geofence(circle("dock", base.0, base.1, 100.0))
        .await
        .unwrap()
        .into_inner();
    mesh.learning.kill().await;
    let t0 = now_ms() - 3_600_000;
    let track = walk(
        "tug",
        t0,
        base,
        &[(-500.0, 0.0), (0.0, 0.0), (0.0, 30.0), (500.0, 0.0)],
    );
    let answer = ingest(&mut client, track.clone()).await.unwrap();
    assert!(answer.stored && !answer.learning_ok, "{answer:?}");
    mesh.learning.restart().await;
    // Learning reads the fixes topic from where its group stopped.
    let stored = events(&mut client, "tug", 2).await;
    let names = vec![(fence.geofence_id.clone(), "dock")];
    assert_eq!(
        summary(&stored, &names),
        vec![
            ("ENTER".to_owned(), "dock".to_owned(), track[1].time_ms),
            ("EXIT".into(), "dock".into(), track[3].time_ms),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn arrive_and_depart_follow_the_stays_at_a_learned_place() {
    let mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let base = (42.0, -71.0);
    // Two docks 5 km apart; 30 minutes at each (fixes every minute), three times over.
    let t0 = now_ms() - 10 * 3_600_000;
    let mut fixes = Vec::new();
    let mut t = t0;
    for _ in 0..3 {
        for dock in [0.0, 5_000.0] {
            for i in 0..31 {
                fixes.push(Fix {
                    device_id: "ferry".into(),
                    time_ms: t,
                    lat: base.0 + (i % 3) as f64 * M,
                    lon: base.1 + dock * M,
                    ..Fix::default()
                });
                t += 60_000;
            }
            // The crossing: 10 minutes, a fix every two.
            for i in 1..5 {
                let x = if dock == 0.0 {
                    i as f64 * 1_000.0
                } else {
                    5_000.0 - i as f64 * 1_000.0
                };
                fixes.push(Fix {
                    device_id: "ferry".into(),
                    time_ms: t,
                    lat: base.0,
                    lon: base.1 + x * M,
                    ..Fix::default()
                });
                t += 120_000;
            }
        }
    }
    let answer = ingest(&mut client, fixes.clone()).await.unwrap();
    assert_eq!(answer.accepted as usize, fixes.len());
    // First visits found the places (no ARRIVE: no place yet); later stays at a known place
    // each give ARRIVE then DEPART (the last crossing closes the last stay).
    let stored = events(&mut client, "ferry", 8).await;
    let kinds: Vec<(String, String)> = summary(&stored, &[])
        .into_iter()
        .map(|(kind, place, _)| (kind, place))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("ARRIVE".to_owned(), "p1".to_owned()),
            ("DEPART".into(), "p1".into()),
            ("ARRIVE".into(), "p2".into()),
            ("DEPART".into(), "p2".into()),
            ("ARRIVE".into(), "p1".into()),
            ("DEPART".into(), "p1".into()),
            ("ARRIVE".into(), "p2".into()),
            ("DEPART".into(), "p2".into()),
        ]
    );
    // ARRIVE once the stay lasted STAY_MIN_DURATION (20 min); DEPART at the first fix away.
    let arrive = &stored[0];
    // Dock A's second stay starts after one round: 2 × (31 stays + 4 crossing fixes).
    let second_at_a = fixes[2 * 35].time_ms;
    assert_eq!(arrive.time_ms, second_at_a + 20 * 60_000, "{arrive:?}");
    let depart = &stored[1];
    assert_eq!(depart.time_ms, fixes[2 * 35 + 31].time_ms, "{depart:?}");
    let places = client
        .get_places(trackmesh_proto::v1::DevicePlacesRequest {
            device_id: "ferry".into(),
            k: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .places;
    assert_eq!(places.len(), 2);
}

/// One HTTP/1.1 request; the status and the JSON body (Null when not JSON).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let head =
        format!("{method} {path} HTTP/1.1\r\nx-api-key: {key}\r\nContent-Type: application/json");
    let answer = send(addr, &head, body.as_bytes()).await;
    let json = serde_json::from_str(answer.body.trim()).unwrap_or(serde_json::Value::Null);
    (answer.status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_json_api_creates_lists_gets_and_deletes_fences_and_lists_events() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let key = mesh.tenants[0].1.clone();
    let mut client = mesh.client(0).await;
    let (status, created) = http(
        addr,
        "POST",
        "/v1/geofences",
        &key,
        r#"{"name":"pier","circle":{"lat":43.0,"lon":-70.0,"radiusM":100},"deviceIds":["boat"]}"#,
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["geofenceId"].as_str().unwrap().to_owned();
    assert_eq!(created["circle"]["radiusM"], 100.0);
    assert_eq!(created["deviceIds"], serde_json::json!(["boat"]));
    // A polygon given as the GeoJSON object itself.
    let (status, polygon) = http(
        addr,
        "POST",
        "/v1/geofences",
        &key,
        r#"{"name":"yard","polygonGeojson":{"type":"Polygon","coordinates":[[[-70.01,43.01],[-70.0,43.01],[-70.0,43.02],[-70.01,43.01]]]}}"#,
    )
    .await;
    assert_eq!(status, 200, "{polygon}");
    let (status, listed) = http(addr, "GET", "/v1/geofences", &key, "").await;
    assert_eq!(status, 200);
    assert_eq!(listed["geofences"].as_array().unwrap().len(), 2);
    let (status, got) = http(addr, "GET", &format!("/v1/geofences/{id}"), &key, "").await;
    assert_eq!((status, &got), (200, &created));
    for (body, says) in [
        ("[]", "body"),
        (
            r#"{"name":"x","circle":{"lat":43,"lon":-70}}"#,
            "circle.radiusM",
        ),
        (
            r#"{"name":"x","circle":{"lat":43,"lon":-70,"radiusM":5,"r":1}}"#,
            "circle.r",
        ),
        (r#"{"name":"x","color":"red"}"#, "color"),
        (
            r#"{"name":"x","polygonGeojson":{"type":"Point","coordinates":[1,2]}}"#,
            "polygon_geojson",
        ),
    ] {
        let (status, answer) = http(addr, "POST", "/v1/geofences", &key, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains(says),
            "{body}: {answer}"
        );
    }
    let (status, _) = http(addr, "GET", "/v1/geofences/gf-none", &key, "").await;
    assert_eq!(status, 404);
    let (status, _) = http(addr, "GET", "/v1/geofences", &mesh.ingest_tokens[0], "").await;
    assert_eq!(status, 403, "an ingest token cannot read fences");

    // The filter: only "boat" enters.
    let t0 = now_ms() - 3_600_000;
    for device in ["boat", "car"] {
        let fixes = walk(
            device,
            t0,
            (43.0, -70.0),
            &[(-500.0, 0.0), (0.0, 0.0), (500.0, 0.0)],
        );
        ingest(&mut client, fixes).await.unwrap();
    }
    events(&mut client, "boat", 2).await;
    let (status, answer) = http(
        addr,
        "GET",
        "/v1/events?device_id=boat&types=EXIT",
        &key,
        "",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let listed = answer["events"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{answer}");
    assert_eq!(listed[0]["type"], "EXIT");
    assert_eq!(listed[0]["geofenceId"], id.as_str());
    assert_eq!(listed[0]["fix"]["deviceId"], "boat");
    let (status, answer) = http(addr, "GET", "/v1/events?device_id=car", &key, "").await;
    assert_eq!(
        (status, answer["events"].as_array().unwrap().len()),
        (200, 0)
    );
    let (status, answer) = http(addr, "GET", "/v1/events?types=LEAVE", &key, "").await;
    assert_eq!(status, 400);
    assert!(
        answer["message"].as_str().unwrap().contains("types"),
        "{answer}"
    );

    let (status, answer) = http(addr, "DELETE", &format!("/v1/geofences/{id}"), &key, "").await;
    assert_eq!((status, answer["existed"].as_bool()), (200, Some(true)));
    let (_, listed) = http(addr, "GET", "/v1/geofences", &key, "").await;
    assert_eq!(listed["geofences"].as_array().unwrap().len(), 1);
}
