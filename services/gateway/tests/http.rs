//! The HTTP front door on the whole mesh (four processes, real Redis, ClickHouse and tansu):
//! each device protocol's own example requests read back through gRPC `GetTrack`, the JSON
//! API beside its gRPC twin, and every refusal with its status and nothing stored.

mod common;

use std::{net::SocketAddr, time::Duration};

use base64::Engine as _;
use common::*;
use serde_json::Value;
use tonic::{Code, Request};
use trackmesh_proto::v1::{Fix, GetTrackRequest, IngestRequest, ListDevicesRequest, RefinedFix};

/// 2025-06-15T15:06:40Z.
const T0_S: i64 = 1_750_000_000;

async fn get(addr: SocketAddr, path: &str, key: &str) -> Answer {
    send(
        addr,
        &format!("GET {path} HTTP/1.1\r\nx-api-key: {key}"),
        b"",
    )
    .await
}

fn stored_fix(fixes: &[RefinedFix]) -> Fix {
    assert_eq!(fixes.len(), 1, "one stored fix: {fixes:?}");
    fixes[0].fix.clone().unwrap()
}

#[tokio::test]
async fn osmand_requests_are_stored_with_their_values() {
    let mesh = Mesh::start(Options::default()).await;
    let (addr, token) = (mesh.gateway.addr(), mesh.ingest_tokens[0].clone());
    let mut client = mesh.client(0).await;
    let ms = T0_S * 1000;
    // (device, method and target, content type, body, the fix stored)
    let form = format!("id=form&lat=52.5&lon=13.4&timestamp={T0_S}&speed=10");
    let json = r#"{"device_id":"json","location":{"timestamp":"2025-06-15T15:06:40.250Z","coords":{"latitude":52.5,"longitude":13.4,"accuracy":7.5,"speed":3.5,"heading":181,"altitude":12},"battery":{"level":0.5}}}"#.to_owned();
    let cases: Vec<(&str, String, Option<&str>, String, Fix)> = vec![
        (
            "all",
            format!(
                "GET /osmand/{token}?id=all&lat=52.5&lon=13.4&timestamp={T0_S}&hdop=1.2&altitude=34&speed=10&bearing=90&accuracy=5&batt=80&unknown=x"
            ),
            None,
            String::new(),
            Fix {
                device_id: "all".into(),
                time_ms: ms,
                lat: 52.5,
                lon: 13.4,
                accuracy_m: Some(5.0),
                speed_mps: Some((10.0 * 1852.0 / 3600.0) as f32),
                heading_deg: Some(90.0),
                altitude_m: Some(34.0),
            },
        ),
        (
            "ms",
            format!("GET /osmand/{token}?deviceid=ms&location=52.5,13.4&timestamp={ms}"),
            None,
            String::new(),
            Fix {
                device_id: "ms".into(),
                time_ms: ms,
                lat: 52.5,
                lon: 13.4,
                ..Fix::default()
            },
        ),
        (
            "iso",
            format!(
                "GET /osmand/{token}?id=iso&lat=-33.9&lon=151.2&timestamp=2025-06-15T17:06:40%2B02:00&heading=45"
            ),
            None,
            String::new(),
            Fix {
                device_id: "iso".into(),
                time_ms: ms,
                lat: -33.9,
                lon: 151.2,
                heading_deg: Some(45.0),
                ..Fix::default()
            },
        ),
        (
            "plain",
            format!("GET /osmand/{token}?id=plain&lat=1.5&lon=2.5&timestamp=2025-06-15%2015:06:40"),
            None,
            String::new(),
            Fix {
                device_id: "plain".into(),
                time_ms: ms,
                lat: 1.5,
                lon: 2.5,
                ..Fix::default()
            },
        ),
        (
            "form",
            format!("POST /osmand/{token}"),
            Some("application/x-www-form-urlencoded"),
            form,
            Fix {
                device_id: "form".into(),
                time_ms: ms,
                lat: 52.5,
                lon: 13.4,
                speed_mps: Some((10.0 * 1852.0 / 3600.0) as f32),
                ..Fix::default()
            },
        ),
        (
            "json",
            format!("POST /osmand/{token}"),
            Some("application/json"),
            json,
            Fix {
                device_id: "json".into(),
                time_ms: ms + 250,
                lat: 52.5,
                lon: 13.4,
                accuracy_m: Some(7.5),
                speed_mps: Some(3.5),
                heading_deg: Some(181.0),
                altitude_m: Some(12.0),
            },
        ),
    ];
    for (device, target, content_type, body, expected) in cases {
        let mut head = format!("{target} HTTP/1.1");
        if let Some(content_type) = content_type {
            head.push_str(&format!("\r\ncontent-type: {content_type}"));
        }
        let answer = send(addr, &head, body.as_bytes()).await;
        assert_eq!(answer.status, 200, "{device}: {}", answer.body);
        let fixes = stored(&mut client, device, 1).await;
        assert_eq!(stored_fix(&fixes), expected, "{device}");
    }
}

#[tokio::test]
async fn owntracks_locations_are_stored_and_answered_with_an_empty_list() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let (tenant, token) = (&mesh.tenants[0].0, &mesh.ingest_tokens[0]);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{tenant}:{token}"));
    let mut client = mesh.client(0).await;
    // The example of OwnTracks' JSON documentation, with the app's identity headers.
    let body = format!(
        r#"{{"_type":"location","acc":12,"alt":50,"batt":86,"cog":270,"lat":48.8566,"lon":2.3522,"tid":"jj","tst":{T0_S},"vel":54,"t":"u"}}"#
    );
    let head = format!(
        "POST /owntracks HTTP/1.1\r\nauthorization: Basic {auth}\r\ncontent-type: application/json\r\nx-limit-u: alice\r\nx-limit-d: phone"
    );
    let answer = send(addr, &head, body.as_bytes()).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "[]"));
    let fixes = stored(&mut client, "alice/phone", 1).await;
    assert_eq!(
        stored_fix(&fixes),
        Fix {
            device_id: "alice/phone".into(),
            time_ms: T0_S * 1000,
            lat: 48.8566,
            lon: 2.3522,
            accuracy_m: Some(12.0),
            speed_mps: Some(15.0),
            heading_deg: Some(270.0),
            altitude_m: Some(50.0),
        }
    );
    // Without the headers the device is the tracker id; other message types are acknowledged.
    let head = format!("POST /owntracks HTTP/1.1\r\nauthorization: Basic {auth}");
    let answer = send(addr, &head, body.as_bytes()).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "[]"));
    assert_eq!(stored(&mut client, "jj", 1).await.len(), 1);
    let transition = br#"{"_type":"transition","event":"enter","tid":"zz","tst":1750000000}"#;
    let answer = send(addr, &head, transition).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, "[]"));
    // A password that is not the tenant's token.
    let other = &mesh.tenants[1].0;
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{other}:{token}"));
    let head = format!("POST /owntracks HTTP/1.1\r\nauthorization: Basic {wrong}");
    assert_eq!(send(addr, &head, body.as_bytes()).await.status, 401);
    assert!(track(&mut client, "zz").await.is_empty());
}

#[tokio::test]
async fn json_ingest_answers_like_grpc() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let mut client = mesh.client(0).await;
    let body = format!(
        r#"{{"fixes":[{{"deviceId":"j1","timeMs":"{ms}","lat":40.5,"lon":-74.0}},{{"device_id":"j1","time_ms":{later},"lat":41.5,"lon":-74.0}}],"sequence":"7"}}"#,
        ms = T0_S * 1000,
        later = T0_S * 1000 + 1000
    );
    let head = format!(
        "POST /v1/ingest HTTP/1.1\r\nauthorization: Bearer {}\r\ncontent-type: application/json",
        mesh.ingest_tokens[0]
    );
    let answer = send(addr, &head, body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let response: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(response["accepted"], 1, "{response}");
    assert_eq!(response["rejected"], 1, "{response}");
    assert_eq!(response["rejections"][0]["index"], 1, "{response}");
    assert_eq!(response["rejections"][0]["verdict"], "SPEED", "{response}");
    assert_eq!(response["stored"], true, "{response}");
    assert_eq!(response["sequence"], "7", "{response}");
    assert_eq!(stored(&mut client, "j1", 1).await.len(), 1);
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_is_stored() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let token = mesh.ingest_tokens[0].clone();
    let ok = format!("timestamp={T0_S}");
    let cases: Vec<(String, &[u8], u16, &str)> = vec![
        (
            format!("GET /osmand/not-a-token?id=bad1&lat=1&lon=2&{ok}"),
            b"",
            401,
            "invalid",
        ),
        (
            format!("GET /osmand/{token}?id=bad2&lat=abc&lon=2&{ok}"),
            b"",
            400,
            "lat",
        ),
        (
            format!("GET /osmand/{token}?id=bad3&lat=91&lon=2&{ok}"),
            b"",
            400,
            "lat",
        ),
        (
            format!("GET /osmand/{token}?id=bad4&lat=1&lon=181&{ok}"),
            b"",
            400,
            "lon",
        ),
        (
            format!("GET /osmand/{token}?lat=1&lon=2&{ok}"),
            b"",
            400,
            "id",
        ),
        (format!("GET /osmand/{token}?id=bad6&{ok}"), b"", 400, "lat"),
        (
            format!("GET /osmand/{token}?id=bad7%ff&lat=1&lon=2&{ok}"),
            b"",
            400,
            "id",
        ),
        (
            format!("POST /osmand/{token}\r\ncontent-type: application/x-www-form-urlencoded"),
            b"id=bad8&lat=1&lon=2\xff",
            400,
            "lon",
        ),
        (
            format!("POST /osmand/{token}\r\ncontent-type: application/json"),
            b"{\"device_id\":\"bad9\",\"location\":",
            400,
            "",
        ),
        (
            format!("POST /v1/ingest\r\nx-api-key: {token}"),
            b"{\"fixes\":[{\"deviceId\":\"bad10\",\"lat\":\"north\"}]}",
            400,
            "fixes[0].lat",
        ),
        (
            format!("GET /v1/devices\r\nx-api-key: {token}"),
            b"",
            403,
            "ingest token",
        ),
        (
            "GET /v1/devices\r\nx-api-key: wrong-key-0".to_owned(),
            b"",
            401,
            "",
        ),
        ("GET /nowhere".to_owned(), b"", 404, ""),
        // Found by the fuzz test: an error quoting this overflowed storage's HTTP/2 headers,
        // failed the connection (500) and, five times over, opened the storage breaker.
        (
            format!(
                "GET /v1/devices?sort={}\r\nx-api-key: {}",
                "a".repeat(20_000),
                mesh.tenants[0].1
            ),
            b"",
            400,
            "sort[0].field",
        ),
        (
            format!(
                "GET /v1/devices/x/track?format=kml\r\nx-api-key: {}",
                mesh.tenants[0].1
            ),
            b"",
            400,
            "format",
        ),
    ];
    for (head, body, status, names) in cases {
        // The request line is the first line of `head`.
        let full = match head.split_once("\r\n") {
            Some((line, headers)) => format!("{line} HTTP/1.1\r\n{headers}"),
            None => format!("{head} HTTP/1.1"),
        };
        let answer = send(addr, &full, body).await;
        assert_eq!(answer.status, status, "{head}: {}", answer.body);
        assert!(
            answer.body.contains(names),
            "{head}: {} should name {names}",
            answer.body
        );
        assert!(
            !answer.body.contains('\n') || answer.body.trim_end().lines().count() == 1,
            "{head}: one line"
        );
    }
    // An unknown gRPC method is still gRPC's UNIMPLEMENTED, not a 404.
    let head = "POST /trackmesh.v1.Nope/Call HTTP/1.1\r\ncontent-type: application/grpc";
    let answer = send(addr, head, b"").await;
    assert_eq!(answer.status, 200);
    assert!(answer.head.contains("grpc-status: 12"), "{}", answer.head);
    // Over the device protocols' body limit.
    let big = format!("id=bad11&lat=1&lon=2&pad={}", "x".repeat(20_000));
    let head =
        format!("POST /osmand/{token} HTTP/1.1\r\ncontent-type: application/x-www-form-urlencoded");
    assert_eq!(send(addr, &head, big.as_bytes()).await.status, 413);
    // A fix that refinement rejects is answered 200: the app must not resend it forever.
    let fix = format!("GET /osmand/{token}?id=dup&lat=1&lon=2&{ok} HTTP/1.1");
    assert_eq!(send(addr, &fix, b"").await.status, 200);
    assert_eq!(send(addr, &fix, b"").await.status, 200);
    // gRPC: the ingest token sends fixes and reads nothing.
    let mut with_token = mesh.client_with(Some(&token)).await;
    let fixes = vec![Fix {
        device_id: "grpc".into(),
        time_ms: T0_S * 1000,
        lat: 1.0,
        lon: 2.0,
        ..Fix::default()
    }];
    with_token
        .ingest(IngestRequest { fixes, sequence: 0 })
        .await
        .unwrap();
    let status = with_token
        .get_track(GetTrackRequest {
            device_id: "grpc".into(),
            ..GetTrackRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Only the good fixes are stored.
    let mut client = mesh.client(0).await;
    assert_eq!(stored(&mut client, "grpc", 1).await.len(), 1);
    assert_eq!(stored(&mut client, "dup", 1).await.len(), 1);
    let devices = client
        .list_devices(ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    let mut names: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["dup", "grpc"]);
}

#[tokio::test]
async fn json_queries_answer_what_grpc_answers() {
    let mesh = Mesh::start(Options::default()).await;
    let (addr, key) = (mesh.gateway.addr(), mesh.tenants[0].1.clone());
    let mut client = mesh.client(0).await;
    let fixes = moving("v1", 12);
    ingest(&mut client, fixes.clone()).await.unwrap();
    let grpc = stored(&mut client, "v1", 12).await;
    assert_eq!(grpc.len(), 12);

    let answer = get(addr, "/v1/devices?sort=-last_ms", &key).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let devices: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(devices["devices"][0]["deviceId"], "v1");
    assert_eq!(devices["devices"][0]["fixes"], "12");

    let answer = get(addr, "/v1/devices/v1/track", &key).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let exported: Value = serde_json::from_str(&answer.body).unwrap();
    let json_fixes = exported["fixes"].as_array().unwrap();
    assert_eq!(json_fixes.len(), 12);
    for (json, grpc) in json_fixes.iter().zip(&grpc) {
        let fix = grpc.fix.as_ref().unwrap();
        assert_eq!(json["fix"]["timeMs"], fix.time_ms.to_string());
        assert_eq!(json["fix"]["lat"].as_f64(), Some(fix.lat));
    }
    let from = fixes[3].time_ms;
    let answer = get(
        addr,
        &format!("/v1/devices/v1/track?from={from}&format=csv"),
        &key,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(answer.head.contains("text/csv"), "{}", answer.head);
    assert_eq!(
        answer.body.trim_end().lines().count(),
        1 + 9,
        "{}",
        answer.body
    );
    let answer = get(addr, "/v1/devices/v1/track?format=gpx", &key).await;
    assert_eq!(answer.body.matches("<trkpt").count(), 12);
    let answer = get(addr, "/v1/devices/v1/track?format=geojson", &key).await;
    let geojson: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(geojson["type"], "FeatureCollection");
    assert_eq!(
        geojson["features"][0]["geometry"]["coordinates"]
            .as_array()
            .unwrap()
            .len(),
        12
    );

    let answer = get(addr, "/v1/devices/v1/stats", &key).await;
    let stats: Value = serde_json::from_str(&answer.body).unwrap();
    let total: u64 = stats["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["fixes"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 12, "{stats}");
    for path in ["/v1/devices/v1/places", "/v1/devices/v1/predict?k=3"] {
        let answer = get(addr, path, &key).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.body);
        serde_json::from_str::<Value>(&answer.body).unwrap();
    }
    // Another tenant's key sees nothing of it.
    let answer = get(addr, "/v1/devices/v1/track", &mesh.tenants[1].1).await;
    let other: Value = serde_json::from_str(&answer.body).unwrap();
    assert_eq!(other["fixes"].as_array().map(Vec::len), Some(0), "{other}");

    let head = format!("DELETE /v1/devices/v1 HTTP/1.1\r\nx-api-key: {key}");
    let answer = send(addr, &head, b"").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    testkit::wait_until(
        Duration::from_secs(30),
        "the device was not deleted",
        async || track(&mut client, "v1").await.is_empty(),
    )
    .await;
}

#[tokio::test]
async fn storage_down_answers_503_with_retry_after() {
    let mut mesh = Mesh::start(Options::default()).await;
    let (addr, token) = (mesh.gateway.addr(), mesh.ingest_tokens[0].clone());
    mesh.storage.kill().await;
    let fix = format!("GET /osmand/{token}?id=down&lat=1&lon=2&timestamp={T0_S} HTTP/1.1");
    let mut answer = send(addr, &fix, b"").await;
    for _ in 0..100 {
        if answer.status == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        answer = send(addr, &fix, b"").await;
    }
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert!(
        answer.head.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        answer.head
    );
}

/// The same fix through OsmAnd, OwnTracks, the JSON API and gRPC is the same stored row.
#[tokio::test]
async fn a_fix_through_every_protocol_is_the_same_stored_row() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let (tenant, key) = mesh.tenants[0].clone();
    let token = mesh.ingest_tokens[0].clone();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{tenant}:{token}"));
    let mut client = mesh.client(0).await;
    let mut rng = fastrand::Rng::with_seed(11);
    for case in 0..8 {
        // Values every protocol carries exactly: OwnTracks has whole seconds, km/h and degrees.
        let time_s = T0_S + i64::from(rng.u32(0..10_000_000));
        let (lat, lon) = (rng.f64() * 170.0 - 85.0, rng.f64() * 350.0 - 175.0);
        let (acc, alt, cog, kmh) = (
            rng.u16(1..500),
            rng.i16(-100..3000),
            rng.u16(0..360),
            rng.u16(0..200),
        );
        let device = |protocol: &str| format!("{protocol}-{case}");
        let osmand = format!(
            "GET /osmand/{token}?id={}&lat={lat}&lon={lon}&timestamp={time_s}&accuracy={acc}&altitude={alt}&bearing={cog}&speed={} HTTP/1.1",
            device("osmand"),
            f64::from(kmh) / 1.852
        );
        assert_eq!(send(addr, &osmand, b"").await.status, 200);
        let owntracks = format!(
            r#"{{"_type":"location","lat":{lat},"lon":{lon},"tst":{time_s},"acc":{acc},"alt":{alt},"cog":{cog},"vel":{kmh},"tid":"{}"}}"#,
            device("owntracks")
        );
        let head = format!("POST /owntracks HTTP/1.1\r\nauthorization: Basic {auth}");
        assert_eq!(send(addr, &head, owntracks.as_bytes()).await.status, 200);
        let speed = (f64::from(kmh) / 3.6) as f32;
        let json = format!(
            r#"{{"fixes":[{{"deviceId":"{}","timeMs":"{}","lat":{lat},"lon":{lon},"accuracyM":{acc},"altitudeM":{alt},"headingDeg":{cog},"speedMps":{speed}}}]}}"#,
            device("json"),
            time_s * 1000
        );
        let head = format!("POST /v1/ingest HTTP/1.1\r\nx-api-key: {key}");
        let answer = send(addr, &head, json.as_bytes()).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        let grpc = Fix {
            device_id: device("grpc"),
            time_ms: time_s * 1000,
            lat,
            lon,
            accuracy_m: Some(f32::from(acc)),
            speed_mps: Some(speed),
            heading_deg: Some(f32::from(cog)),
            altitude_m: Some(f32::from(alt)),
        };
        client
            .ingest(Request::new(IngestRequest {
                fixes: vec![grpc.clone()],
                sequence: 0,
            }))
            .await
            .unwrap();
        for protocol in ["osmand", "owntracks", "json", "grpc"] {
            let fixes = stored(&mut client, &device(protocol), 1).await;
            let mut row = fixes[0].clone();
            let fix = row.fix.as_mut().unwrap();
            fix.device_id = device("grpc");
            // Knots and km/h: the same speed to within f32 rounding.
            let got = fix.speed_mps.take().unwrap();
            assert!(
                (got - speed).abs() <= speed * f32::EPSILON,
                "{protocol}: speed {got} != {speed}"
            );
            let mut expected = grpc.clone();
            expected.speed_mps = None;
            assert_eq!(row.fix.as_ref(), Some(&expected), "{protocol}, case {case}");
            assert_eq!(
                (row.segment, row.verdict),
                (fixes[0].segment, fixes[0].verdict)
            );
        }
    }
}

/// 1e-3 degree of longitude on the equator, metres (about 111.3).
const EQUATOR_STEP_M: f64 = 111.319_490_8;

/// A track with known simplifications, one fix a minute from T0: segment A goes east along the
/// equator from 10°E (a great circle: inner points lie exactly on the arc) in 21 steps of 1e-3°, with
/// spikes 2e-3° (~220 m) north at 5 and 15; after a 13-hour gap (a new segment), segment B is
/// three fixes in a line; after another, segment C is one fix.
fn known_track(device: &str) -> Vec<Fix> {
    let fix = |minute: i64, lat: f64, lon: f64| Fix {
        device_id: device.into(),
        time_ms: T0_S * 1000 + minute * 60_000,
        lat,
        lon,
        ..Fix::default()
    };
    let mut fixes: Vec<Fix> = (0..21)
        .map(|i| {
            let lat = if i == 5 || i == 15 { 0.002 } else { 0.0 };
            fix(i, lat, 10.0 + i as f64 * 0.001)
        })
        .collect();
    let b = 21 + 13 * 60;
    fixes.extend((0..3).map(|i| fix(b + i, 0.0, 11.0 + i as f64 * 0.001)));
    fixes.push(fix(b + 2 + 13 * 60, 0.5, 0.5));
    fixes
}

/// The track's features: per segment, the GeoJSON `[lon, lat]` points.
fn geojson_segments(body: &str) -> Vec<Vec<(f64, f64)>> {
    let doc: Value = serde_json::from_str(body).unwrap();
    doc["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|feature| {
            let coordinates = &feature["geometry"]["coordinates"];
            let point = |c: &Value| (c[0].as_f64().unwrap(), c[1].as_f64().unwrap());
            match feature["geometry"]["type"].as_str().unwrap() {
                "Point" => vec![point(coordinates)],
                _ => coordinates.as_array().unwrap().iter().map(point).collect(),
            }
        })
        .collect()
}

#[tokio::test]
async fn track_simplify_keeps_the_expected_fixes_per_segment_in_every_format() {
    let mesh = Mesh::start(Options::default()).await;
    let (addr, key) = (mesh.gateway.addr(), mesh.tenants[0].1.clone());
    let mut client = mesh.client(0).await;
    let fixes = known_track("zz");
    let response = ingest(&mut client, fixes.clone()).await.unwrap();
    assert_eq!(response.accepted as usize, fixes.len(), "{response:?}");
    let stored = stored(&mut client, "zz", fixes.len()).await;
    assert_eq!(stored.len(), fixes.len());
    let at = |indices: &[usize]| -> Vec<(f64, f64)> {
        indices
            .iter()
            .map(|&i| (fixes[i].lon, fixes[i].lat))
            .collect()
    };
    let segments = |path: &str| {
        let path = path.to_owned();
        let key = key.clone();
        async move {
            let answer = get(addr, &path, &key).await;
            assert_eq!(answer.status, 200, "{path}: {}", answer.body);
            geojson_segments(&answer.body)
        }
    };
    let all = segments("/v1/devices/zz/track?format=geojson").await;
    assert_eq!(
        all.iter().map(Vec::len).collect::<Vec<_>>(),
        [21, 3, 1],
        "three segments"
    );
    // 0: everything.
    assert_eq!(
        segments("/v1/devices/zz/track?format=geojson&simplify=0").await,
        all
    );
    // 10 m: each spike with its two neighbours (the lines from the spike to the far ends pass
    // over 150 m from them), the ends; the inner points on the equator go.
    let spikes = [0, 4, 5, 6, 14, 15, 16, 20];
    let expected = vec![at(&spikes), at(&[21, 23]), at(&[24])];
    assert_eq!(
        segments("/v1/devices/zz/track?format=geojson&simplify=10").await,
        expected
    );
    // Above the spikes' distance from the line (2e-3° of latitude, ~222 m): only the ends.
    let spike_m = 2.0 * EQUATOR_STEP_M;
    let ends = vec![at(&[0, 20]), at(&[21, 23]), at(&[24])];
    let path = format!(
        "/v1/devices/zz/track?format=geojson&simplify={}",
        spike_m + 5.0
    );
    assert_eq!(segments(&path).await, ends);
    let path = format!(
        "/v1/devices/zz/track?format=geojson&simplify={}",
        spike_m - 5.0
    );
    assert_ne!(segments(&path).await, ends);

    // The other formats carry the same fixes.
    let kept_times: Vec<String> = spikes
        .iter()
        .chain(&[21, 23, 24])
        .map(|&i| fixes[i].time_ms.to_string())
        .collect();
    let answer = get(addr, "/v1/devices/zz/track?simplify=10", &key).await;
    let json: Value = serde_json::from_str(&answer.body).unwrap();
    let times: Vec<String> = json["fixes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fix"]["timeMs"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(times, kept_times);
    let answer = get(addr, "/v1/devices/zz/track?format=csv&simplify=10", &key).await;
    let csv_times: Vec<String> = answer
        .body
        .lines()
        .skip(1)
        .map(|row| row.split(',').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(csv_times, kept_times);
    let answer = get(addr, "/v1/devices/zz/track?format=gpx&simplify=10", &key).await;
    let per_segment: Vec<usize> = answer
        .body
        .split("<trkseg>")
        .skip(1)
        .map(|segment| segment.matches("<trkpt ").count())
        .collect();
    assert_eq!(per_segment, [8, 2, 1], "{}", answer.body);
    // With a time range: the range's own ends are kept.
    let path = format!(
        "/v1/devices/zz/track?format=geojson&simplify=10&from={}&to={}",
        fixes[2].time_ms, fixes[12].time_ms
    );
    assert_eq!(segments(&path).await, vec![at(&[2, 4, 5, 6, 12])]);

    // gRPC's simplify_m is the same.
    use futures::StreamExt as _;
    let mut stream = client
        .get_track(GetTrackRequest {
            device_id: "zz".into(),
            simplify_m: 10.0,
            ..GetTrackRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut grpc_times = Vec::new();
    while let Some(chunk) = stream.next().await {
        grpc_times.extend(
            chunk
                .unwrap()
                .fixes
                .iter()
                .map(|f| f.fix.as_ref().unwrap().time_ms.to_string()),
        );
    }
    assert_eq!(grpc_times, kept_times);

    // Bad tolerances: 400 naming the parameter, over HTTP and gRPC.
    for bad in ["-1", "NaN", "inf", "ten", "1e999", ""] {
        let answer = get(addr, &format!("/v1/devices/zz/track?simplify={bad}"), &key).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
        let error: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(error["code"], "INVALID_ARGUMENT");
        assert!(
            error["message"].as_str().unwrap().starts_with("simplify: "),
            "{bad}: {error}"
        );
    }
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let status = client
            .get_track(GetTrackRequest {
                device_id: "zz".into(),
                simplify_m: bad,
                ..GetTrackRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("simplify_m"), "{status:?}");
    }
}

#[tokio::test]
async fn device_list_has_each_devices_last_position() {
    let mesh = Mesh::start(Options::default()).await;
    let (addr, key) = (mesh.gateway.addr(), mesh.tenants[0].1.clone());
    let mut client = mesh.client(0).await;
    let mut expected = Vec::new();
    for (device, n) in [("a", 5), ("b", 9)] {
        let mut fixes = moving(device, n);
        for fix in &mut fixes {
            fix.lon += if device == "a" { 1.0 } else { 2.0 };
        }
        let last = fixes.last().unwrap().clone();
        ingest(&mut client, fixes).await.unwrap();
        expected.push((device.to_owned(), n.to_string(), last.lat, last.lon));
    }
    let mut listed = Vec::new();
    testkit::wait_until(
        Duration::from_secs(60),
        "the devices were not listed with all their fixes",
        async || {
            let answer = get(addr, "/v1/devices?sort=device_id", &key).await;
            assert_eq!(answer.status, 200, "{}", answer.body);
            let doc: Value = serde_json::from_str(&answer.body).unwrap();
            listed = doc["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["deviceId"].as_str().unwrap().to_owned(),
                        d["fixes"].as_str().unwrap().to_owned(),
                        d["lastLat"].as_f64().unwrap_or(f64::NAN),
                        d["lastLon"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect();
            listed.iter().map(|d| &d.1).collect::<Vec<_>>() == ["5", "9"]
        },
    )
    .await;
    assert_eq!(listed, expected);
    // gRPC passes them through.
    let devices = client
        .list_devices(ListDevicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .devices;
    let grpc: Vec<(f64, f64)> = devices.iter().map(|d| (d.last_lat, d.last_lon)).collect();
    let want: Vec<(f64, f64)> = expected.iter().map(|d| (d.2, d.3)).collect();
    assert_eq!(grpc, want);
}
