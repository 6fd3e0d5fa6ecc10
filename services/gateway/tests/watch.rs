//! Watch and `/v1/live` on the whole mesh (real Redis, ClickHouse and tansu): a subscriber
//! gets exactly its tenant's stored fixes in order, filtered by device and area; it resumes
//! after a disconnect without a gap; a subscriber that stalls is told what it missed and
//! holds back nobody.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use futures::StreamExt as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tonic::{Code, Streaming};
use trackmesh_proto::v1::{
    BoundingBox, Fix, RefinedFix, WatchMessage, WatchRequest, watch_message::Item,
};

/// Messages until `fixes` fixes have come (a minute at most).
async fn read(stream: &mut Streaming<WatchMessage>, fixes: usize) -> Vec<WatchMessage> {
    let mut messages = Vec::new();
    let mut seen = 0;
    while seen < fixes {
        let message = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{seen} of {fixes} fixes came within a minute"))
            .expect("stream ended")
            .expect("stream failed");
        seen += usize::from(matches!(message.item, Some(Item::Fix(_))));
        messages.push(message);
    }
    messages
}

/// Nothing more arrives for a while.
async fn quiet(stream: &mut Streaming<WatchMessage>) {
    if let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), stream.next()).await {
        panic!("unexpected message: {message:?}");
    }
}

fn fixes(messages: &[WatchMessage]) -> Vec<RefinedFix> {
    messages
        .iter()
        .filter_map(|m| match &m.item {
            Some(Item::Fix(fix)) => Some(fix.clone()),
            _ => None,
        })
        .collect()
}

fn of(device: &str, fixes: &[RefinedFix]) -> Vec<RefinedFix> {
    fixes
        .iter()
        .filter(|f| f.fix.as_ref().unwrap().device_id == device)
        .cloned()
        .collect()
}

/// The fields storage keeps, to compare a streamed fix with the stored one.
fn key(fix: &RefinedFix) -> (String, i64, u64, u64, u32) {
    let f = fix.fix.as_ref().unwrap();
    (
        f.device_id.clone(),
        f.time_ms,
        f.lat.to_bits(),
        f.lon.to_bits(),
        fix.segment,
    )
}

fn keys(fixes: &[RefinedFix]) -> Vec<(String, i64, u64, u64, u32)> {
    fixes.iter().map(key).collect()
}

fn shifted(fixes: Vec<Fix>, dlon: f64) -> Vec<Fix> {
    fixes
        .into_iter()
        .map(|f| Fix {
            lon: f.lon + dlon,
            ..f
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_get_exactly_their_tenants_stored_fixes_in_order() {
    let mesh = Mesh::start(Options::default()).await;
    let (mut c0, mut c1) = (mesh.client(0).await, mesh.client(1).await);
    let (a, b) = ("vessel-a", "vessel-b");
    let mut all = watch(&mut c0, WatchRequest::default()).await;
    let mut only_a = watch(
        &mut c0,
        WatchRequest {
            device_ids: vec![a.into()],
            ..WatchRequest::default()
        },
    )
    .await;
    let area = BoundingBox {
        min_lat: 36.0,
        max_lat: 36.9195,
        min_lon: -76.31,
        max_lon: -76.29,
    };
    let mut boxed = watch(
        &mut c0,
        WatchRequest {
            bbox: Some(area),
            ..WatchRequest::default()
        },
    )
    .await;
    let mut other = watch(&mut c1, WatchRequest::default()).await;

    let track_a = moving(a, 20);
    let track_b = shifted(moving(b, 20), 0.5);
    for i in 0..4 {
        let mut batch: Vec<Fix> = track_a[i * 5..(i + 1) * 5].to_vec();
        batch.extend_from_slice(&track_b[i * 5..(i + 1) * 5]);
        if i == 2 {
            // Impossible: 1 000 km in a second. Refused, so never streamed.
            let last = batch[4].clone();
            batch.push(Fix {
                time_ms: last.time_ms + 1_000,
                lat: last.lat + 9.0,
                ..last
            });
        }
        let answer = ingest(&mut c0, batch).await.unwrap();
        assert!(answer.stored, "{answer:?}");
    }
    let answer = ingest(&mut c1, moving(a, 10)).await.unwrap();
    assert_eq!(answer.accepted, 10);

    let stored_a = stored(&mut c0, a, 20).await;
    let stored_b = stored(&mut c0, b, 20).await;
    assert_eq!((stored_a.len(), stored_b.len()), (20, 20));

    let streamed = fixes(&read(&mut all, 40).await);
    assert_eq!(
        keys(&of(a, &streamed)),
        keys(&stored_a),
        "device a, in order"
    );
    assert_eq!(
        keys(&of(b, &streamed)),
        keys(&stored_b),
        "device b, in order"
    );
    assert_eq!(keys(&fixes(&read(&mut only_a, 20).await)), keys(&stored_a));
    let inside: Vec<RefinedFix> = stored_a
        .iter()
        .chain(&stored_b)
        .filter(|f| {
            let f = f.fix.as_ref().unwrap();
            f.lat <= area.max_lat && (area.min_lon..=area.max_lon).contains(&f.lon)
        })
        .cloned()
        .collect();
    assert_eq!(
        inside.len(),
        10,
        "the area holds the first half of a's track"
    );
    assert_eq!(keys(&fixes(&read(&mut boxed, 10).await)), keys(&inside));
    let theirs = fixes(&read(&mut other, 10).await);
    assert_eq!(keys(&theirs), keys(&stored(&mut c1, a, 10).await));

    // Nothing more: not the other tenant's fixes, not the refused one, not a filtered one.
    quiet(&mut all).await;
    quiet(&mut only_a).await;
    quiet(&mut boxed).await;
    quiet(&mut other).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resumed_subscription_continues_where_it_stopped() {
    let mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let track = moving("ferry", 20);
    let mut first = watch(&mut client, WatchRequest::default()).await;
    ingest(&mut client, track[..10].to_vec()).await.unwrap();
    let had = read(&mut first, 4).await;
    let token = had.last().unwrap().resume_token.clone();
    drop(first);
    // Sent while nobody watches.
    ingest(&mut client, track[10..].to_vec()).await.unwrap();
    let stored = stored(&mut client, "ferry", 20).await;

    let mut resumed = watch(
        &mut client,
        WatchRequest {
            resume_token: token.clone(),
            ..WatchRequest::default()
        },
    )
    .await;
    let rest = fixes(&read(&mut resumed, 16).await);
    assert_eq!(keys(&fixes(&had)), keys(&stored[..4]));
    assert_eq!(keys(&rest), keys(&stored[4..]), "no gap, no repeat");
    quiet(&mut resumed).await;

    for bad in ["nope", "MTsx", &token[..token.len() - 3]] {
        let err = client
            .watch(WatchRequest {
                resume_token: bad.into(),
                ..WatchRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("resume_token"), "{err:?}");
    }
    let err = client
        .watch(WatchRequest {
            bbox: Some(BoundingBox {
                min_lat: 10.0,
                max_lat: 95.0,
                ..BoundingBox::default()
            }),
            ..WatchRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("bbox.max_lat"), "{err:?}");

    // Shutdown ends open subscriptions (they would hold it up otherwise), with a clear
    // UNAVAILABLE: the client resumes on another replica.
    let mut open = watch(&mut client, WatchRequest::default()).await;
    let pid = mesh.gateway.pid().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let end = tokio::time::timeout(Duration::from_secs(30), open.next())
        .await
        .expect("the stream ends at shutdown")
        .expect("an error first");
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_subscriber_is_told_what_it_missed_and_holds_back_nobody() {
    let mesh = Mesh::start(Options {
        // Small, but enough for a subscriber that keeps reading.
        gateway_env: vec![("WATCH_BUFFER", "256".into())],
        ..Options::default()
    })
    .await;
    let mut client = mesh.client(0).await;
    // Small HTTP/2 windows of its own, so that not reading soon stops the gateway's sending
    // (a client's default windows hold megabytes).
    let channel = tonic::transport::Channel::from_shared(mesh.gateway.url())
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut stalled = watch(&mut mesh.client_on(channel, 0), WatchRequest::default()).await;
    let mut reader = watch(&mut client, WatchRequest::default()).await;
    let n = 1500;
    let track = moving("busy", n);
    // One Kafka message per call: far more than the buffer and what the transport holds.
    let sender = tokio::spawn({
        let mut client = client.clone();
        async move {
            for fix in track {
                let answer = ingest(&mut client, vec![fix]).await.unwrap();
                assert!(answer.stored);
            }
        }
    });
    let live = fixes(&read(&mut reader, n).await);
    sender.await.unwrap();
    let stored = stored(&mut client, "busy", n).await;
    assert_eq!(
        keys(&live),
        keys(&stored),
        "the reading subscriber got everything"
    );

    // The stalled one reads now: what was buffered, then a Lag, then live again.
    let mut got = Vec::new();
    let lag = loop {
        let message = tokio::time::timeout(Duration::from_secs(30), stalled.next())
            .await
            .expect("a Lag message")
            .unwrap()
            .unwrap();
        match message.item {
            Some(Item::Lag(lag)) => break (lag, message.resume_token),
            Some(Item::Fix(fix)) => got.push(fix),
            _ => {}
        }
    };
    assert!(lag.0.dropped > 0, "{lag:?}");
    assert!(
        got.len() < n,
        "its buffer is bounded: {} of {n} kept",
        got.len()
    );
    assert_eq!(keys(&got), keys(&stored[..got.len()]));
    // What it missed, from the Lag's token: every fix after the kept ones, none twice.
    let mut resumed = watch(
        &mut client,
        WatchRequest {
            resume_token: lag.1,
            ..WatchRequest::default()
        },
    )
    .await;
    let missed = fixes(&read(&mut resumed, n - got.len()).await);
    assert_eq!(keys(&missed), keys(&stored[got.len()..]));
}

// ------------------------------------------------------------------- SSE

/// An open `GET /v1/live` whose events are read one at a time.
struct Sse {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
}

struct SseEvent {
    id: String,
    data: Value,
}

/// Opens `path` with `headers`; the status and, on 200, the stream.
async fn open(addr: SocketAddr, path: &str, headers: &str) -> (u16, Option<Sse>, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    let status_line = lines.next_line().await.unwrap().unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let mut head = String::new();
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.is_empty() {
            break;
        }
        head.push_str(&line);
        head.push('\n');
    }
    if status != 200 {
        // Chunk sizes and the body: enough to check the message.
        let mut body = String::new();
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
        {
            body.push_str(&line);
        }
        return (status, None, body);
    }
    (status, Some(Sse { lines }), head)
}

impl Sse {
    async fn next(&mut self) -> SseEvent {
        let (mut id, mut data) = (String::new(), String::new());
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
                .await
                .expect("an event within a minute")
                .unwrap()
                .expect("stream open");
            if let Some(value) = line.strip_prefix("id: ").or(line.strip_prefix("id:")) {
                id = value.to_owned();
            } else if let Some(value) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                data.push_str(value);
            } else if line.is_empty() && !data.is_empty() {
                return SseEvent {
                    id,
                    data: serde_json::from_str(&data).unwrap(),
                };
            }
            // Else a chunk size or a keep-alive comment.
        }
    }
}

async fn stream_token(addr: SocketAddr, key: &str) -> (u16, Value) {
    let head = format!("POST /v1/live/token HTTP/1.1\r\nx-api-key: {key}");
    let answer = send(addr, &head, b"").await;
    let json = serde_json::from_str(answer.body.trim()).unwrap_or(Value::Null);
    (answer.status, json)
}

#[tokio::test(flavor = "multi_thread")]
async fn live_server_sent_events_with_a_stream_token() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let key = mesh.tenants[0].1.clone();
    let mut client = mesh.client(0).await;
    // The tail is reading once gRPC Watch answers.
    drop(watch(&mut client, WatchRequest::default()).await);

    let (status, body) = stream_token(addr, &key).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_owned();
    assert!(body["expiresMs"].as_str().unwrap().parse::<i64>().unwrap() > now_ms());

    let path = format!("/v1/live?token={token}&device_id=car");
    let (status, sse, head) = open(addr, &path, "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    let mut sse = sse.unwrap();
    let track = moving("car", 3);
    ingest(
        &mut client,
        vec![Fix {
            device_id: "truck".into(),
            ..track[0].clone()
        }],
    )
    .await
    .unwrap();
    ingest(&mut client, track.clone()).await.unwrap();
    let mut events = Vec::new();
    for _ in 0..3 {
        events.push(sse.next().await);
    }
    for (event, sent) in events.iter().zip(&track) {
        let fix = &event.data["fix"]["fix"];
        assert_eq!(fix["deviceId"], "car", "filtered to its device");
        assert_eq!(fix["timeMs"], sent.time_ms.to_string());
        assert_eq!(fix["lat"].as_f64().unwrap(), sent.lat);
        assert_eq!(event.data["fix"]["verdict"], "ACCEPTED");
        assert_eq!(event.data["resumeToken"], event.id.as_str());
    }
    drop(sse);

    // A browser's reconnect: Last-Event-ID resumes after that event.
    let (status, sse, _) = open(addr, &path, &format!("Last-Event-ID: {}\r\n", events[0].id)).await;
    assert_eq!(status, 200);
    let mut sse = sse.unwrap();
    for sent in &track[1..] {
        assert_eq!(
            sse.next().await.data["fix"]["fix"]["timeMs"],
            sent.time_ms.to_string()
        );
    }
    drop(sse);

    // The API key works as a header, never in the URL; a bad token or area is refused.
    let (status, sse, _) = open(addr, "/v1/live", &format!("x-api-key: {key}\r\n")).await;
    assert_eq!(status, 200);
    drop(sse);
    for (path, expected, says) in [
        (format!("/v1/live?token={key}"), 401, "stream token"),
        ("/v1/live".to_owned(), 401, "API key"),
        (
            format!("/v1/live?token={}x", &token[..token.len() - 1]),
            401,
            "stream token",
        ),
        (format!("/v1/live?token={token}&bbox=1,2,3"), 400, "bbox"),
        (
            format!("/v1/live?token={token}&bbox=-76,95,-75,96"),
            400,
            "bbox.min_lat",
        ),
    ] {
        let (status, _, body) = open(addr, &path, "").await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(body.contains(says), "{path}: {body}");
    }
    let (status, _) = stream_token(addr, "wrong-key-wrong").await;
    assert_eq!(status, 401);
    let ingest_token = &mesh.ingest_tokens[0];
    let (status, body) = stream_token(addr, ingest_token).await;
    assert_eq!(status, 403, "an ingest token cannot read: {body}");
}
