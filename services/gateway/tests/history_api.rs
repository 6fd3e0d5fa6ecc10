//! The gateway's stays, trips, relearn and reseed API on the whole mesh (real Redis,
//! ClickHouse and tansu): requests refused naming the field over gRPC and JSON, the JSON
//! shapes beside their gRPC twins, tenant isolation, Relearn's progress stream (one done
//! message per device, totals over all devices) and Reseed's counts.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt as _;
use serde_json::Value;
use tonic::Code;
use trackmesh_proto::v1::{
    Fix, GetStaysRequest, GetTripsRequest, RelearnProgress, RelearnRequest, ReseedRequest,
    ResetDeviceRequest, Stay, Trip, Verdict, refinement_client::RefinementClient,
};

/// Metres per degree of latitude, near enough.
const M: f64 = 1.0 / 111_195.0;

/// A ferry between two docks 5 km apart: 30 minutes at each (a fix a minute), a 10-minute
/// crossing (a fix every two), three times over: 210 fixes, six stays, trips between them.
fn ferry(device: &str, start_ms: i64, base: (f64, f64)) -> Vec<Fix> {
    let mut fixes = Vec::new();
    let mut t = start_ms;
    let fix = |t: i64, lat: f64, lon: f64| Fix {
        device_id: device.into(),
        time_ms: t,
        lat,
        lon,
        ..Fix::default()
    };
    for _ in 0..3 {
        for dock in [0.0, 5_000.0] {
            for i in 0..31 {
                fixes.push(fix(t, base.0 + (i % 3) as f64 * M, base.1 + dock * M));
                t += 60_000;
            }
            for i in 1..5 {
                let x = if dock == 0.0 {
                    i as f64 * 1_000.0
                } else {
                    5_000.0 - i as f64 * 1_000.0
                };
                fixes.push(fix(t, base.0, base.1 + x * M));
                t += 120_000;
            }
        }
    }
    fixes
}

/// The device's stays and trips once storage holds `n` stays and a trip between each two
/// (a minute at most).
async fn history(client: &mut Client, device: &str, n: usize) -> (Vec<Stay>, Vec<Trip>) {
    let start = std::time::Instant::now();
    loop {
        let (stays, trips) = (stays(client, device).await, trips(client, device).await);
        if (stays.len() >= n && trips.len() + 1 >= stays.len())
            || start.elapsed() > Duration::from_secs(60)
        {
            return (stays, trips);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
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

/// One request with a JSON body (`key` None: no credentials).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Answer {
    let auth = key.map_or(String::new(), |key| format!("\r\nx-api-key: {key}"));
    let head = format!("{method} {path} HTTP/1.1{auth}\r\nContent-Type: application/json");
    send(addr, &head, body.as_bytes()).await
}

/// The refusal is a 400 INVALID_ARGUMENT whose message starts with `field`.
fn refused(answer: &Answer, field: &str) {
    assert_eq!(answer.status, 400, "{field}: {}", answer.body);
    let body = answer.json();
    assert_eq!(body["code"], "INVALID_ARGUMENT", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.starts_with(field), "{field}: {message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn history_requests_are_refused_naming_the_field() {
    // One long-lived stream per tenant: Relearn is one.
    let mesh = Mesh::start(Options {
        gateway_env: vec![("TENANT_MAX_STREAMS", "1".into())],
        ..Options::default()
    })
    .await;
    let mut client = mesh.client(0).await;
    let long = "x".repeat(129);

    // gRPC: the field and its rule, before anything reaches a downstream.
    let stays = client.get_stays(GetStaysRequest::default()).await;
    let trips = GetTripsRequest {
        device_id: long.clone(),
        ..GetTripsRequest::default()
    };
    let mut errors = vec![
        (stays.unwrap_err(), "device_id"),
        (client.get_trips(trips).await.unwrap_err(), "device_id"),
    ];
    let relearn = |device_ids: &[&str], all_devices, from_ms| RelearnRequest {
        device_ids: device_ids.iter().map(|id| (*id).to_owned()).collect(),
        all_devices,
        from_ms,
    };
    for (request, field) in [
        (relearn(&[], false, 0), "device_ids"),
        (relearn(&["a"], true, 0), "all_devices"),
        (relearn(&["a", &long], false, 0), "device_ids[1]"),
        (relearn(&[], true, -1), "from_ms"),
    ] {
        errors.push((client.relearn(request).await.unwrap_err(), field));
    }
    for (all_devices, field) in [(false, "device_ids"), (true, "all_devices")] {
        let request = ReseedRequest {
            device_ids: all_devices.then(|| "a".to_owned()).into_iter().collect(),
            all_devices,
        };
        errors.push((client.reseed(request).await.unwrap_err(), field));
    }
    for (err, field) in errors {
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{field}: {err:?}"
        );
    }

    // JSON: 400 with the same names.
    let addr = mesh.gateway.addr();
    let key = Some(mesh.tenants[0].1.as_str());
    for (path, field) in [
        (format!("/v1/devices/{long}/stays"), "device_id"),
        (format!("/v1/devices/{long}/trips"), "device_id"),
        ("/v1/devices/a/stays?from=yesterday".to_owned(), "from"),
        ("/v1/devices/a/trips?to=1.5".to_owned(), "to"),
    ] {
        refused(&http(addr, "GET", &path, key, "").await, field);
    }
    for (path, body, field) in [
        ("/v1/relearn", "{}", "device_ids"),
        ("/v1/relearn", "", "device_ids"),
        (
            "/v1/relearn",
            r#"{"device_ids":["a"],"all_devices":true}"#,
            "all_devices",
        ),
        (
            "/v1/relearn",
            r#"{"deviceIds":["a"],"fromMs":-5}"#,
            "from_ms",
        ),
        ("/v1/relearn", r#"{"deviceIds":["a",7]}"#, "deviceIds[1]"),
        ("/v1/relearn", r#"{"fromMs":"soon"}"#, "fromMs"),
        ("/v1/relearn", r#"{"devices":["a"]}"#, "devices"),
        ("/v1/relearn", "[", "body"),
        ("/v1/reseed", "{}", "device_ids"),
        ("/v1/reseed", r#"{"all_devices":"yes"}"#, "all_devices"),
        (
            "/v1/reseed",
            r#"{"all_devices":true,"from_ms":1}"#,
            "from_ms",
        ),
    ] {
        refused(&http(addr, "POST", path, key, body).await, field);
    }
    // An API key is needed; an ingest token may only send fixes.
    let body = r#"{"all_devices":true}"#;
    for path in ["/v1/relearn", "/v1/reseed"] {
        assert_eq!(http(addr, "POST", path, None, body).await.status, 401);
        let token = Some(mesh.ingest_tokens[0].as_str());
        assert_eq!(http(addr, "POST", path, token, body).await.status, 403);
    }
    assert_eq!(
        http(addr, "GET", "/v1/devices/a/stays", None, "")
            .await
            .status,
        401
    );

    // Relearn takes one of the tenant's TENANT_MAX_STREAMS slots, not a request slot.
    let watching = watch(&mut client, trackmesh_proto::v1::WatchRequest::default()).await;
    let request = RelearnRequest {
        all_devices: true,
        ..RelearnRequest::default()
    };
    let err = client.relearn(request).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("TENANT_MAX_STREAMS=1"), "{err:?}");
    let answer = http(addr, "POST", "/v1/relearn", key, r#"{"all_devices":true}"#).await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert!(
        answer.body.contains("TENANT_MAX_STREAMS=1"),
        "{}",
        answer.body
    );
    // Unary calls are not affected.
    refused(
        &http(addr, "POST", "/v1/reseed", key, "{}").await,
        "device_ids",
    );
    drop(watching);
}

#[tokio::test(flavor = "multi_thread")]
async fn stays_trips_relearn_and_reseed_through_the_gateway() {
    // Small chunks: a relearn of 210 fixes takes several, with progress between.
    let mesh = Mesh::start(Options {
        env: vec![("STREAMING_CHUNK_SIZE", "50".into())],
        ..Options::default()
    })
    .await;
    let (mut client, mut other) = (mesh.client(0).await, mesh.client(1).await);
    let addr = mesh.gateway.addr();
    let (key, other_key) = (
        Some(mesh.tenants[0].1.as_str()),
        Some(mesh.tenants[1].1.as_str()),
    );
    let t0 = now_ms() - 12 * 3_600_000;
    for (device, base) in [("a", (42.0, -71.0)), ("b", (43.0, -70.0))] {
        let fixes = ferry(device, t0, base);
        let answer = ingest(&mut client, fixes.clone()).await.unwrap();
        assert_eq!(answer.accepted as usize, fixes.len(), "{answer:?}");
    }
    let (stays_a, trips_a) = history(&mut client, "a", 5).await;
    assert!(stays_a.len() >= 5, "{stays_a:?}");
    assert_eq!(trips_a.len() + 1, stays_a.len(), "{trips_a:?}");
    history(&mut client, "b", 5).await;

    // JSON answers the proto3 JSON of the same stays and trips.
    let answer = http(addr, "GET", "/v1/devices/a/stays", key, "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    let listed = json["stays"].as_array().unwrap();
    assert_eq!(listed.len(), stays_a.len());
    for (json, stay) in listed.iter().zip(&stays_a) {
        assert_eq!(json["deviceId"], "a");
        assert_eq!(json["placeId"], stay.place_id.as_str());
        assert_eq!(json["startMs"], stay.start_ms.to_string());
        assert_eq!(json["endMs"], stay.end_ms.to_string());
        assert_eq!(json["fixes"], stay.fixes);
        assert_eq!(json["lat"].as_f64().unwrap(), stay.lat);
        assert_eq!(json["lon"].as_f64().unwrap(), stay.lon);
    }
    let answer = http(addr, "GET", "/v1/devices/a/trips", key, "").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    let listed = json["trips"].as_array().unwrap();
    assert_eq!(listed.len(), trips_a.len());
    for (json, trip) in listed.iter().zip(&trips_a) {
        assert_eq!(json["deviceId"], "a");
        assert_eq!(json["startMs"], trip.start_ms.to_string());
        assert_eq!(json["endMs"], trip.end_ms.to_string());
        assert_eq!(json["fixes"], trip.fixes);
        assert_eq!(json["distanceM"].as_f64().unwrap(), trip.distance_m);
        assert_eq!(json["maxSpeedKmh"].as_f64().unwrap(), trip.max_speed_kmh);
        assert_eq!(json["meanSpeedKmh"].as_f64().unwrap(), trip.mean_speed_kmh);
        let from = trip.from_place.as_ref().unwrap();
        assert_eq!(json["fromPlace"]["placeId"], from.place_id.as_str());
        assert_eq!(json["fromPlace"]["lat"].as_f64().unwrap(), from.lat);
        let to = trip.to_place.as_ref().unwrap();
        assert_eq!(json["toPlace"]["placeId"], to.place_id.as_str());
    }
    // from/to reach storage: up to the first stay's end, the last stay is not in range.
    let first = &stays_a[0];
    let last = stays_a.last().unwrap();
    let path = format!("/v1/devices/a/stays?from=0&to={}", first.end_ms);
    let json = http(addr, "GET", &path, key, "").await.json();
    let starts: Vec<&str> = json["stays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["startMs"].as_str().unwrap())
        .collect();
    assert!(
        starts.contains(&first.start_ms.to_string().as_str()),
        "{json}"
    );
    assert!(
        !starts.contains(&last.start_ms.to_string().as_str()),
        "{json}"
    );

    // Another tenant sees none of it, and its relearn or reseed of the same ids touches none.
    assert!(stays(&mut other, "a").await.is_empty());
    assert!(trips(&mut other, "a").await.is_empty());
    let json = http(addr, "GET", "/v1/devices/a/stays", other_key, "")
        .await
        .json();
    assert_eq!(json["stays"], serde_json::json!([]));
    let progress = relearn(
        &mut other,
        RelearnRequest {
            device_ids: vec!["a".into()],
            ..RelearnRequest::default()
        },
    )
    .await;
    let done: Vec<&RelearnProgress> = progress.iter().filter(|p| p.done).collect();
    assert_eq!(done.len(), 1, "{progress:?}");
    assert_eq!((done[0].fixes, done[0].devices_total), (0, 1), "{done:?}");
    let reseeded = other
        .reseed(ReseedRequest {
            device_ids: vec!["a".into()],
            ..ReseedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reseeded.seeded, reseeded.kept, reseeded.without_fixes),
        (0, 0, 1)
    );
    assert_eq!(stays(&mut client, "a").await, stays_a, "tenant 0 untouched");

    // Relearn of two devices: progress as chunks are learned, one done per device, totals
    // over both.
    let stored_a = track(&mut client, "a").await.len() as u64;
    let stored_b = track(&mut client, "b").await.len() as u64;
    let progress = relearn(
        &mut client,
        RelearnRequest {
            device_ids: vec!["a".into(), "b".into(), "a".into()],
            ..RelearnRequest::default()
        },
    )
    .await;
    for device in ["a", "b"] {
        let mine: Vec<&RelearnProgress> =
            progress.iter().filter(|p| p.device_id == device).collect();
        let done: Vec<&&RelearnProgress> = mine.iter().filter(|p| p.done).collect();
        assert_eq!(done.len(), 1, "{device}: {progress:?}");
        let stored = if device == "a" { stored_a } else { stored_b };
        assert_eq!(done[0].fixes, stored, "{device}: {done:?}");
        assert!(done[0].places_after >= 2, "{done:?}");
        assert_eq!(done[0].stays as usize, stays_a.len(), "{done:?}");
        assert!(
            mine.iter().any(|p| !p.done && p.fixes < stored),
            "{device}: progress before done: {progress:?}"
        );
        assert!(mine.last().unwrap().done, "done comes last: {mine:?}");
    }
    assert!(
        progress.iter().all(|p| p.devices_total == 2),
        "{progress:?}"
    );
    for pair in progress.windows(2) {
        assert!(pair[0].devices_done <= pair[1].devices_done, "{pair:?}");
        assert!(pair[0].fixes_total <= pair[1].fixes_total, "{pair:?}");
    }
    let end = progress.last().unwrap();
    assert_eq!(
        (end.devices_done, end.fixes_total),
        (2, stored_a + stored_b),
        "{end:?}"
    );
    // Stays and trips were written again, as many.
    let (again, _) = history(&mut client, "a", stays_a.len()).await;
    assert_eq!(again.len(), stays_a.len());

    // The same over JSON for all devices: NDJSON lines, streamed.
    let answer = http(addr, "POST", "/v1/relearn", key, r#"{"allDevices":true}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(
        answer
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{}",
        answer.head
    );
    let lines: Vec<Value> = answer
        .body
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut done: Vec<&str> = lines
        .iter()
        .filter(|l| l["done"] == true)
        .map(|l| l["deviceId"].as_str().unwrap())
        .collect();
    done.sort_unstable();
    assert_eq!(done, ["a", "b"], "{lines:?}");
    let end = lines.last().unwrap();
    assert_eq!(end["devicesDone"], 2, "{end}");
    assert_eq!(end["devicesTotal"], 2, "{end}");
    assert_eq!(
        end["fixesTotal"],
        (stored_a + stored_b).to_string(),
        "{end}"
    );

    // Reseed: both devices still have refinement state; a device without fixes is counted.
    let reseeded = client
        .reseed(ReseedRequest {
            device_ids: vec!["a".into(), "b".into(), "ghost".into()],
            ..ReseedRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (reseeded.seeded, reseeded.kept, reseeded.without_fixes),
        (0, 2, 1)
    );
    // With a's refinement state gone (as after a Redis loss), reseed anchors it on its last
    // stored fix: a late old fix is out of order again.
    let mut refinement = RefinementClient::connect(mesh.refinement[0].url())
        .await
        .unwrap();
    refinement
        .reset_device(ResetDeviceRequest {
            tenant_id: mesh.tenants[0].0.clone(),
            device_id: "a".into(),
        })
        .await
        .unwrap();
    let answer = http(addr, "POST", "/v1/reseed", key, r#"{"device_ids":["a"]}"#).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        serde_json::json!({ "seeded": 1, "kept": 0, "withoutFixes": 0 })
    );
    let late = Fix {
        device_id: "a".into(),
        time_ms: t0 + 60_000 + 30_000,
        lat: 42.0,
        lon: -71.0,
        ..Fix::default()
    };
    let answer = ingest(&mut client, vec![late]).await.unwrap();
    assert_eq!(answer.rejected, 1, "{answer:?}");
    assert_eq!(answer.rejections[0].verdict(), Verdict::OutOfOrder);
}
