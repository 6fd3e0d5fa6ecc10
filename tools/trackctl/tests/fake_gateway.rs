//! trackctl (the binary) against an in-process fake of the Gateway API: checks
//! the client side — auth metadata, batching, per-device order across lanes,
//! retries of UNAVAILABLE / RESOURCE_EXHAUSTED, the JSON summary, resumed
//! track streams, paging and the output formats. The real gateway is tested
//! by its own end-to-end tests.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::{
    collections::HashMap,
    pin::Pin,
    process::Output,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status, Streaming, transport::Server};
use tonic_types::{ErrorDetails, StatusExt};
use trackmesh_proto::v1::{
    DailyStat, DailyStatsResponse, DeleteDeviceRequest, DeleteDeviceResponse,
    DeleteGeofenceRequest, DeleteGeofenceResponse, DevicePlacesRequest, DevicePredictRequest,
    DeviceSummary, Fix, Geofence, GetDailyStatsRequest, GetEventsRequest, GetEventsResponse,
    GetPlacesResponse, GetTrackRequest, IngestRequest, IngestResponse, Lag, ListDevicesRequest,
    ListDevicesResponse, ListGeofencesRequest, ListGeofencesResponse, Place, PlaceLabel,
    PredictNextResponse, Prediction, RefinedFix, Rejection, TrackChunk, Verdict, WatchMessage,
    WatchRequest,
    gateway_server::{Gateway, GatewayServer},
    watch_message,
};

const KEY: &str = "test-key";
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/");

#[derive(Default)]
struct State {
    ingest_calls: u64,
    /// Fixes of each device in the order they arrived.
    received: HashMap<String, Vec<Fix>>,
    /// Largest batch seen.
    max_batch: usize,
    /// GetTrack calls; the first one breaks off after one chunk.
    track_calls: u64,
    deleted: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

fn authenticate<T>(request: &Request<T>) -> Result<(), Status> {
    let expected = format!("Bearer {KEY}");
    match request.metadata().get("authorization") {
        Some(value) if value.to_str().ok() == Some(expected.as_str()) => Ok(()),
        _ => Err(Status::unauthenticated("no valid API key")),
    }
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for Fake {
    type IngestStreamStream = Stream<IngestResponse>;
    type GetTrackStream = Stream<TrackChunk>;

    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        authenticate(&request)?;
        let mut state = self.0.lock().unwrap();
        state.ingest_calls += 1;
        // Transient failures: the first call is rate limited, every fifth finds a downstream down.
        if state.ingest_calls == 1 {
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                "rate limit",
                ErrorDetails::with_retry_info(Some(Duration::from_millis(20))),
            ));
        }
        if state.ingest_calls.is_multiple_of(5) {
            return Err(Status::unavailable("storage is down"));
        }
        let fixes = request.into_inner().fixes;
        state.max_batch = state.max_batch.max(fixes.len());
        let mut response = IngestResponse {
            stored: true,
            learning_ok: true,
            ..Default::default()
        };
        for (index, fix) in fixes.into_iter().enumerate() {
            let received = state.received.entry(fix.device_id.clone()).or_default();
            let verdict = match received.last() {
                Some(last) if last.time_ms == fix.time_ms => Verdict::Duplicate,
                Some(last) if last.time_ms > fix.time_ms => Verdict::OutOfOrder,
                _ => Verdict::Accepted,
            };
            received.push(fix);
            if verdict == Verdict::Accepted {
                response.accepted += 1;
            } else {
                response.rejected += 1;
                response.rejections.push(Rejection {
                    index: index as u32,
                    verdict: verdict as i32,
                    detail: String::new(),
                });
            }
        }
        Ok(Response::new(response))
    }

    async fn ingest_stream(
        &self,
        _: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn get_track(
        &self,
        request: Request<GetTrackRequest>,
    ) -> Result<Response<Self::GetTrackStream>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let mut state = self.0.lock().unwrap();
        state.track_calls += 1;
        let break_off = state.track_calls == 1;
        let mut fixes: Vec<Fix> = state
            .received
            .get(&request.device_id)
            .cloned()
            .unwrap_or_default();
        fixes.sort_by_key(|f| f.time_ms);
        fixes.dedup_by_key(|f| f.time_ms);
        let start: usize = request.resume_token.parse().unwrap_or(0);
        let mut items = Vec::new();
        let mut segment = 0;
        let mut previous: Option<i64> = None;
        let refined: Vec<RefinedFix> = fixes
            .into_iter()
            .map(|fix| {
                // A new segment after a gap of more than an hour.
                if previous.is_some_and(|p| fix.time_ms - p > 3_600_000) {
                    segment += 1;
                }
                previous = Some(fix.time_ms);
                RefinedFix {
                    fix: Some(fix),
                    verdict: Verdict::Accepted as i32,
                    segment,
                    distance_m: 10.0,
                    ..Default::default()
                }
            })
            .collect();
        let start = start.min(refined.len());
        let end = match request.limit {
            0 => refined.len(),
            limit => (start + limit as usize).min(refined.len()),
        };
        let chunks: Vec<(usize, Vec<RefinedFix>)> = refined[start..end]
            .chunks(100)
            .enumerate()
            .map(|(i, chunk)| (start + i * 100 + chunk.len(), chunk.to_vec()))
            .collect();
        for (i, (end, chunk)) in chunks.into_iter().enumerate() {
            items.push(Ok(TrackChunk {
                fixes: chunk,
                resume_token: end.to_string(),
            }));
            if break_off && i == 0 {
                items.push(Err(Status::unavailable("storage replica restarted")));
                break;
            }
        }
        Ok(Response::new(Box::pin(futures::stream::iter(items))))
    }

    async fn get_daily_stats(
        &self,
        request: Request<GetDailyStatsRequest>,
    ) -> Result<Response<DailyStatsResponse>, Status> {
        authenticate(&request)?;
        let device_id = request.into_inner().device_id;
        Ok(Response::new(DailyStatsResponse {
            days: vec![DailyStat {
                device_id,
                day: "2020-06-04".into(),
                fixes: 1234,
                distance_m: 56_789.0,
                max_speed_kmh: 31.5,
                first_ms: 1_591_240_036_000,
                last_ms: 1_591_315_200_000,
            }],
        }))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        if request
            .sort
            .first()
            .map(|s| (s.field.as_str(), s.descending))
            != Some(("fixes", true))
        {
            return Err(Status::invalid_argument(
                "the fake sorts by fixes:desc only",
            ));
        }
        let state = self.0.lock().unwrap();
        let mut devices: Vec<DeviceSummary> = state
            .received
            .iter()
            .map(|(id, fixes)| DeviceSummary {
                device_id: id.clone(),
                fixes: fixes.len() as u64,
                ..Default::default()
            })
            .collect();
        devices.sort_by(|a, b| b.fixes.cmp(&a.fixes).then(a.device_id.cmp(&b.device_id)));
        let offset: usize = request.page_token.parse().unwrap_or(0);
        let size = request.page_size.max(1) as usize;
        let page: Vec<DeviceSummary> = devices.iter().skip(offset).take(size).cloned().collect();
        let next = offset + page.len();
        Ok(Response::new(ListDevicesResponse {
            devices: page,
            next_page_token: if next < devices.len() {
                next.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn get_places(
        &self,
        request: Request<DevicePlacesRequest>,
    ) -> Result<Response<GetPlacesResponse>, Status> {
        authenticate(&request)?;
        Ok(Response::new(GetPlacesResponse {
            places: vec![
                place("berth-1", PlaceLabel::Home),
                place("berth-2", PlaceLabel::Unspecified),
            ],
        }))
    }

    async fn predict_next(
        &self,
        request: Request<DevicePredictRequest>,
    ) -> Result<Response<PredictNextResponse>, Status> {
        authenticate(&request)?;
        Ok(Response::new(PredictNextResponse {
            predictions: vec![Prediction {
                place: Some(place("berth-2", PlaceLabel::Unspecified)),
                probability: 0.75,
            }],
            from: Some(place("berth-1", PlaceLabel::Home)),
            no_history: false,
        }))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        authenticate(&request)?;
        self.0
            .lock()
            .unwrap()
            .deleted
            .push(request.into_inner().device_id);
        Ok(Response::new(DeleteDeviceResponse {}))
    }

    type WatchStream = Stream<WatchMessage>;

    /// Two fixes of the requested devices (or "v1"), a Lag, then the end.
    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let device = request.device_ids.first().cloned().unwrap_or("v1".into());
        let fix = |time_ms: i64| WatchMessage {
            item: Some(watch_message::Item::Fix(RefinedFix {
                fix: Some(Fix {
                    device_id: device.clone(),
                    time_ms,
                    lat: 40.5,
                    lon: -74.25,
                    ..Fix::default()
                }),
                verdict: Verdict::Accepted as i32,
                segment: 2,
                ..RefinedFix::default()
            })),
            resume_token: format!("t{time_ms}"),
        };
        let lag = WatchMessage {
            item: Some(watch_message::Item::Lag(Lag { dropped: 7 })),
            resume_token: "t".into(),
        };
        let messages = vec![Ok(fix(1_000)), Ok(fix(2_000)), Ok(lag)];
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn create_geofence(&self, _: Request<Geofence>) -> Result<Response<Geofence>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn list_geofences(
        &self,
        _: Request<ListGeofencesRequest>,
    ) -> Result<Response<ListGeofencesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn delete_geofence(
        &self,
        _: Request<DeleteGeofenceRequest>,
    ) -> Result<Response<DeleteGeofenceResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn get_events(
        &self,
        _: Request<GetEventsRequest>,
    ) -> Result<Response<GetEventsResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

fn place(id: &str, label: PlaceLabel) -> Place {
    Place {
        place_id: id.into(),
        lat: 40.64409,
        lon: -74.07157,
        visits: 2,
        total_dwell_ms: 3_600_000,
        first_visit_ms: 1_593_475_200_000,
        last_visit_ms: 1_593_478_800_000,
        label: label as i32,
        ..Default::default()
    }
}

async fn start() -> (Fake, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let fake = Fake::default();
    let service = GatewayServer::new(fake.clone());
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, addr)
}

async fn trackctl(addr: &str, key: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_trackctl"));
    command
        .env_remove("TRACKMESH_API_KEY")
        .env("TRACKMESH_ADDR", addr)
        .args(args);
    if let Some(key) = key {
        command.env("TRACKMESH_API_KEY", key);
    }
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("trackctl finished in time")
        .unwrap();
    eprintln!(
        "trackctl {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "trackctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The fixes of a CSV file per device, in file order (as the dry run reads them).
fn file_order(path: &str) -> HashMap<String, Vec<i64>> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header = reader.headers().unwrap().clone();
    let raw = header.iter().any(|h| h == "MMSI");
    let (device, time) = if raw {
        ("MMSI", "BaseDateTime")
    } else {
        ("device_id", "timestamp")
    };
    let column = |name| header.iter().position(|h| h == name).unwrap();
    let (device, time) = (column(device), column(time));
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for record in reader.records() {
        let record = record.unwrap();
        let text = record[time].trim_end_matches('Z');
        let seconds = humantime::parse_rfc3339_weak(text)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        order
            .entry(record[device].to_owned())
            .or_default()
            .push(seconds);
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_keeps_order_retries_and_summarises() {
    let (fake, addr) = start().await;
    let ny = format!("{DATA}ais-ny-harbor-2020-06-30-first-hour.raw.csv");
    let vb = format!("{DATA}ais-virginia-beach-2020-06-04..06.csv");
    let output = trackctl(
        &addr,
        Some(KEY),
        &[
            "replay",
            "--json",
            "--batch",
            "500",
            "--concurrency",
            "3",
            &ny,
            &vb,
        ],
    )
    .await;
    let summary: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let human = String::from_utf8_lossy(&output.stderr);
    assert!(
        human.contains("sent 48,511 fixes"),
        "human summary on stderr: {human}"
    );

    assert_eq!(summary["fixes_sent"], 48_511);
    assert_eq!(summary["files"][0]["format"], "raw_ais");
    assert_eq!(summary["files"][1]["devices"], 84);
    let accepted = summary["accepted"].as_u64().unwrap();
    let rejected = summary["rejected"].as_u64().unwrap();
    assert_eq!(accepted + rejected, 48_511);
    assert_eq!(summary["batches"], summary["batches_stored"]);
    assert!(
        summary["retries"].as_u64().unwrap() >= 2,
        "rate limit + unavailable retried"
    );
    assert_eq!(summary["failed_batches"], 0);
    let by_verdict = summary["rejected_by_verdict"].as_object().unwrap();
    assert_eq!(
        by_verdict
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        rejected
    );

    // Every device's fixes arrived exactly once and in file order, although
    // three lanes were sending concurrently and calls were retried.
    let state = fake.0.lock().unwrap();
    assert!(state.max_batch <= 500);
    let mut expected = file_order(&ny);
    expected.extend(file_order(&vb));
    assert_eq!(state.received.len(), expected.len());
    for (device, times) in expected {
        let got: Vec<i64> = state.received[&device].iter().map(|f| f.time_ms).collect();
        assert_eq!(got, times, "device {device}");
    }
    // Knots became metres per second on the way.
    let newhouse = &state.received["367000140"];
    assert!(
        newhouse
            .iter()
            .all(|f| f.speed_mps.is_some_and(|s| s < 15.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_and_their_formats() {
    let (fake, addr) = start().await;
    let vb = format!("{DATA}ais-virginia-beach-2020-06-04..06.csv");
    stdout(&trackctl(&addr, Some(KEY), &["replay", "--quiet", &vb]).await);

    // GeoJSON track, resumed after the stream broke off after the first chunk.
    let dir = std::env::temp_dir().join(format!("trackctl-test-{}", std::process::id()));
    let out = dir.join("track.geojson");
    let out_arg = out.to_str().unwrap();
    let device = "369990276";
    let output = trackctl(
        &addr,
        Some(KEY),
        &["track", device, "--format", "geojson", "--out", out_arg],
    )
    .await;
    stdout(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("resuming"));
    let collection: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(collection["type"], "FeatureCollection");
    let features = collection["features"].as_array().unwrap();
    let fixes: u64 = features
        .iter()
        .map(|f| f["properties"]["fixes"].as_u64().unwrap())
        .sum();
    let stored = {
        let state = fake.0.lock().unwrap();
        let mut times: Vec<i64> = state.received[device].iter().map(|f| f.time_ms).collect();
        times.sort_unstable();
        times.dedup();
        times.len() as u64
    };
    assert_eq!(
        fixes, stored,
        "every fix once, although the stream was resumed"
    );
    for (i, feature) in features.iter().enumerate() {
        assert_eq!(feature["properties"]["segment"], i as u64);
        assert_eq!(feature["properties"]["device_id"], device);
        let coordinates = &feature["geometry"]["coordinates"];
        let first = if feature["geometry"]["type"] == "LineString" {
            &coordinates[0]
        } else {
            coordinates
        };
        assert!(first[0].as_f64().unwrap() < -75.0, "[lon, lat]");
    }

    // CSV track with a limit.
    let csv = stdout(&trackctl(&addr, Some(KEY), &["track", device, "--limit", "150"]).await);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("device_id,time,time_ms,lat,lon,segment"));
    assert_eq!(lines.len(), 151);

    // All devices over several pages.
    let devices = stdout(
        &trackctl(
            &addr,
            Some(KEY),
            &[
                "devices",
                "--sort",
                "fixes:desc",
                "--page-size",
                "10",
                "--all",
                "--format",
                "csv",
            ],
        )
        .await,
    );
    assert_eq!(devices.lines().count(), 1 + 84);
    let table = stdout(
        &trackctl(
            &addr,
            Some(KEY),
            &["devices", "--sort", "fixes:desc", "--page-size", "5"],
        )
        .await,
    );
    assert!(table.contains("5 devices"), "{table}");
    let bad = trackctl(&addr, Some(KEY), &["devices", "--sort", "speed"]).await;
    assert!(!bad.status.success());

    let places = stdout(&trackctl(&addr, Some(KEY), &["places", device]).await);
    assert!(
        places.contains("berth-1") && places.contains("home") && places.contains("1h 00m"),
        "{places}"
    );
    let places_geojson =
        stdout(&trackctl(&addr, Some(KEY), &["places", device, "--format", "geojson"]).await);
    let places_geojson: Value = serde_json::from_str(&places_geojson).unwrap();
    assert_eq!(places_geojson["features"][0]["geometry"]["type"], "Point");

    let predict = stdout(&trackctl(&addr, Some(KEY), &["predict", device, "-k", "2"]).await);
    assert!(
        predict.contains("75.0%") && predict.contains("from place berth-1"),
        "{predict}"
    );

    let stats =
        stdout(&trackctl(&addr, Some(KEY), &["stats", device, "--from", "2020-06-04"]).await);
    assert!(
        stats.contains("2020-06-04") && stats.contains("56.79"),
        "{stats}"
    );

    stdout(&trackctl(&addr, Some(KEY), &["delete", device, "other"]).await);
    assert_eq!(
        fake.0.lock().unwrap().deleted,
        vec![device.to_owned(), "other".to_owned()]
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_keys_and_addresses() {
    let (_fake, addr) = start().await;
    let missing = trackctl(&addr, None, &["devices"]).await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no API key"));

    let wrong = trackctl(&addr, Some("wrong"), &["places", "x"]).await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("UNAUTHENTICATED"));

    let nobody = trackctl("http://127.0.0.1:1", Some(KEY), &["places", "x"]).await;
    assert!(!nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("cannot reach the gateway"));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_noop_calls_health_and_ingests_nothing() {
    let (fake, addr) = start().await;
    let output = trackctl(
        &addr,
        Some(KEY),
        &[
            "load",
            "--noop",
            "--concurrency",
            "8",
            "--duration",
            "1s",
            "--json",
        ],
    )
    .await;
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["noop"], true);
    assert!(report["batches"].as_u64().unwrap() > 0, "{report}");
    assert!(report["calls_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["fixes_sent"], 0);
    assert!(fake.0.lock().unwrap().received.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generates_accepted_fixes() {
    let (fake, addr) = start().await;
    let output = trackctl(
        &addr,
        Some(KEY),
        &[
            "load",
            "--devices",
            "10",
            "--batch",
            "50",
            "--duration",
            "1s",
            "--json",
            "--prefix",
            "t",
            "--cleanup",
        ],
    )
    .await;
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert!(report["fixes_sent"].as_u64().unwrap() > 0);
    assert_eq!(report["rejected"], 0, "synthetic fixes are in order");
    assert!(report["latency_ms"]["count"].as_u64().unwrap() > 0);
    assert!(
        report["latency_ms"]["p99"].as_f64().unwrap()
            >= report["latency_ms"]["p50"].as_f64().unwrap()
    );
    let state = fake.0.lock().unwrap();
    assert_eq!(state.received.len(), 10);
    assert_eq!(
        state.deleted.len(),
        10,
        "--cleanup deletes the generated devices"
    );
    assert!(state.received.keys().all(|id| id.starts_with("t-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_line_per_fix_and_counts_subscribers() {
    let (_, addr) = start().await;
    let output = trackctl(&addr, Some(KEY), &["watch", "--device", "ferry-9"]).await;
    assert!(output.status.success());
    let lines: Vec<String> = stdout(&output).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        vec![
            "ferry-9\t1000\t40.500000\t-74.250000\tsegment 2",
            "ferry-9\t2000\t40.500000\t-74.250000\tsegment 2",
        ]
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lagged: 7 messages dropped"), "{stderr}");

    // Counting over several subscribers: a JSON summary.
    let output = trackctl(
        &addr,
        Some(KEY),
        &["watch", "--subscribers", "3", "--duration", "1s", "--json"],
    )
    .await;
    assert!(output.status.success());
    let summary: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(summary["subscribers"], 3);
    assert_eq!(summary["fixes"], 6);
    assert_eq!(summary["lag_messages"], 3);
    assert_eq!(summary["dropped_messages"], 21);
    let output = trackctl(&addr, Some(KEY), &["watch", "--bbox", "1,2,3"]).await;
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--bbox"));
}
