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
    GetPlacesResponse, GetStaysRequest, GetStaysResponse, GetTrackRequest, GetTripsRequest,
    GetTripsResponse, IngestRequest, IngestResponse, Lag, ListDevicesRequest, ListDevicesResponse,
    ListGeofencesRequest, ListGeofencesResponse, Place, PlaceLabel, PredictNextResponse,
    Prediction, RefinedFix, Rejection, RelearnProgress, RelearnRequest, ReseedRequest,
    ReseedResponse, Stay, TrackChunk, Trip, Verdict, WatchMessage, WatchRequest,
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
    /// Relearn and Reseed requests as received.
    relearns: Vec<RelearnRequest>,
    reseeds: Vec<ReseedRequest>,
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
        // Both ends included; to_ms 0: no upper bound.
        fixes.retain(|f| {
            f.time_ms >= request.from_ms && (request.to_ms == 0 || f.time_ms <= request.to_ms)
        });
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

    /// [`history`]'s stays overlapping the time range.
    async fn get_stays(
        &self,
        request: Request<GetStaysRequest>,
    ) -> Result<Response<GetStaysResponse>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let (stays, _) = history(&request.device_id);
        let stays = stays
            .into_iter()
            .filter(|s| overlaps(s.start_ms, s.end_ms, request.from_ms, request.to_ms))
            .collect();
        Ok(Response::new(GetStaysResponse { stays }))
    }

    /// [`history`]'s trips overlapping the time range.
    async fn get_trips(
        &self,
        request: Request<GetTripsRequest>,
    ) -> Result<Response<GetTripsResponse>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let (_, trips) = history(&request.device_id);
        let trips = trips
            .into_iter()
            .filter(|t| overlaps(t.start_ms, t.end_ms, request.from_ms, request.to_ms))
            .collect();
        Ok(Response::new(GetTripsResponse { trips }))
    }

    type RelearnStream = Stream<RelearnProgress>;

    /// Per device (the named ones, or v1, v2, v3 for all): two progress messages, then done
    /// with 250 fixes, places 2 → 3 and 5 stays. A device named "broken" breaks the stream.
    async fn relearn(
        &self,
        request: Request<RelearnRequest>,
    ) -> Result<Response<Self::RelearnStream>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let devices: Vec<String> = if request.all_devices {
            vec!["v1".into(), "v2".into(), "v3".into()]
        } else {
            request.device_ids.clone()
        };
        if devices.is_empty() {
            return Err(Status::invalid_argument(
                "device_ids: name devices or set all_devices",
            ));
        }
        self.0.lock().unwrap().relearns.push(request);
        let total = devices.len() as u32;
        let mut messages = Vec::new();
        let mut fixes_total = 0;
        for (done, device) in devices.into_iter().enumerate() {
            if device == "broken" {
                messages.push(Err(Status::unavailable("learning restarted")));
                break;
            }
            for fixes in [100, 250] {
                messages.push(Ok(RelearnProgress {
                    device_id: device.clone(),
                    fixes,
                    devices_done: done as u32,
                    devices_total: total,
                    fixes_total: fixes_total + fixes,
                    ..Default::default()
                }));
            }
            fixes_total += 250;
            messages.push(Ok(RelearnProgress {
                device_id: device,
                fixes: 250,
                done: true,
                places_before: 2,
                places_after: 3,
                stays: 5,
                devices_done: done as u32 + 1,
                devices_total: total,
                fixes_total,
            }));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    /// Devices named "busy…" are kept, "empty…" have no fixes, the others are seeded;
    /// all devices: 5 seeded, 2 kept, 1 without fixes.
    async fn reseed(
        &self,
        request: Request<ReseedRequest>,
    ) -> Result<Response<ReseedResponse>, Status> {
        authenticate(&request)?;
        let request = request.into_inner();
        let mut response = ReseedResponse::default();
        if request.all_devices {
            (response.seeded, response.kept, response.without_fixes) = (5, 2, 1);
        }
        for device in &request.device_ids {
            if device.starts_with("busy") {
                response.kept += 1;
            } else if device.starts_with("empty") {
                response.without_fixes += 1;
            } else {
                response.seeded += 1;
            }
        }
        self.0.lock().unwrap().reseeds.push(request);
        Ok(Response::new(response))
    }
}

/// 2020-06-30T00:00:00Z
const DAY: i64 = 1_593_475_200_000;
const HOUR: i64 = 3_600_000;

fn overlaps(start_ms: i64, end_ms: i64, from_ms: i64, to_ms: i64) -> bool {
    end_ms >= from_ms && (to_ms == 0 || start_ms <= to_ms)
}

/// Any device's learned history: stays at berth-1 00:00–02:00, berth-2 03:00–05:00 and
/// berth-1 06:00–08:00 (2020-06-30), the two trips between them.
fn history(device: &str) -> (Vec<Stay>, Vec<Trip>) {
    let berth = |n: u32| Place {
        place_id: format!("berth-{n}"),
        lat: 40.6 + f64::from(n) * 0.05,
        lon: -74.05,
        ..Place::default()
    };
    let stay = |n: u32, start_hour: i64| {
        let place = berth(n);
        Stay {
            place_id: place.place_id,
            lat: place.lat,
            lon: place.lon,
            start_ms: DAY + start_hour * HOUR,
            end_ms: DAY + (start_hour + 2) * HOUR,
            fixes: 121,
            device_id: device.into(),
        }
    };
    let trip = |from: u32, to: u32, start_hour: i64| Trip {
        from_place: Some(berth(from)),
        to_place: Some(berth(to)),
        start_ms: DAY + start_hour * HOUR,
        end_ms: DAY + (start_hour + 1) * HOUR,
        distance_m: 5_560.0,
        max_speed_kmh: 9.8,
        mean_speed_kmh: 5.56,
        fixes: 61,
        device_id: device.into(),
    };
    (
        vec![stay(1, 0), stay(2, 3), stay(1, 6)],
        vec![trip(1, 2, 2), trip(2, 1, 5)],
    )
}

/// A fix a minute from 00:00 to 08:00 of [`DAY`] for `device`, stored in the fake as if
/// ingested: at berth-1, over to berth-2 (02:00–03:00), there, and back (05:00–06:00).
fn store_day(fake: &Fake, device: &str) {
    let lat = |minute: i64| match minute {
        ..=120 => 40.65,
        121..=180 => 40.65 + (minute - 120) as f64 / 60.0 * 0.05,
        181..=300 => 40.70,
        301..=360 => 40.70 - (minute - 300) as f64 / 60.0 * 0.05,
        _ => 40.65,
    };
    let fixes = (0..=480)
        .map(|minute: i64| Fix {
            device_id: device.into(),
            time_ms: DAY + minute * 60_000,
            lat: lat(minute),
            lon: -74.05,
            altitude_m: Some(2.0),
            ..Fix::default()
        })
        .collect();
    fake.0.lock().unwrap().received.insert(device.into(), fixes);
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

fn csv_rows(text: &str) -> Vec<csv::StringRecord> {
    csv::Reader::from_reader(text.as_bytes())
        .records()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_in_every_format() {
    let (_fake, addr) = start().await;
    let stays = |args: &'static [&'static str]| {
        let addr = addr.clone();
        async move {
            let mut all = vec!["stays", "ferry-1"];
            all.extend(args);
            stdout(&trackctl(&addr, Some(KEY), &all).await)
        }
    };

    let table = stays(&[]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 3 + 1, "{table}");
    assert!(lines[0].starts_with("place_id"), "{table}");
    assert!(
        lines[2].starts_with("berth-2 ")
            && lines[2].contains("2020-06-30T03:00:00Z")
            && lines[2].contains("2h 00m"),
        "{table}"
    );
    assert_eq!(lines[4], "3 stays, 6h 00m in all");
    // Columns are aligned: every row's end column starts where the header's does.
    let end_at = lines[0].find("end").unwrap();
    assert!(lines[1..4].iter().all(|l| l[end_at..].starts_with("2020-")));

    let csv = stays(&["--format", "csv"]).await;
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 3);
    assert!(csv.starts_with("device_id,place_id,lat,lon,start,start_ms,end,end_ms,duration,"));
    assert_eq!(&rows[1][0], "ferry-1");
    assert_eq!(&rows[1][9], "7200000");
    // Only the stays overlapping the range.
    let rows = csv_rows(
        &stays(&[
            "--format",
            "csv",
            "--from",
            "2020-06-30T02:30:00Z",
            "--to",
            "2020-06-30T05:30:00Z",
        ])
        .await,
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(&rows[0][1], "berth-2");

    let geojson: Value = serde_json::from_str(&stays(&["--format", "geojson"]).await).unwrap();
    assert_eq!(geojson["type"], "FeatureCollection");
    let features = geojson["features"].as_array().unwrap();
    assert_eq!(features.len(), 3);
    assert_eq!(features[0]["geometry"]["type"], "Point");
    assert_eq!(
        features[0]["geometry"]["coordinates"],
        serde_json::json!([-74.05, 40.65]),
        "[lon, lat]"
    );
    assert_eq!(features[1]["properties"]["place_id"], "berth-2");
    assert_eq!(features[1]["properties"]["duration"], "2h 00m");

    let gpx = stays(&["--format", "gpx"]).await;
    let document = roxmltree::Document::parse(&gpx).expect("GPX is XML");
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "gpx");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.topografix.com/GPX/1/1")
    );
    let waypoints: Vec<_> = root.children().filter(|n| n.has_tag_name("wpt")).collect();
    assert_eq!(waypoints.len(), 3);
    assert_eq!(waypoints[1].attribute("lat"), Some("40.7000000"));
    let child = |node: roxmltree::Node, name: &str| {
        node.children()
            .find(|n| n.has_tag_name(name))
            .and_then(|n| n.text())
            .map(str::to_owned)
    };
    assert_eq!(child(waypoints[1], "name").as_deref(), Some("berth-2"));
    assert_eq!(
        child(waypoints[1], "time").as_deref(),
        Some("2020-06-30T03:00:00Z")
    );
    assert_eq!(root.children().filter(|n| n.has_tag_name("trk")).count(), 0);

    let empty = stays(&["--from", "2020-07-01"]).await;
    assert_eq!(empty, "no stays of device ferry-1 in that time range\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trips_in_every_format_along_the_stored_fixes() {
    let (fake, addr) = start().await;
    store_day(&fake, "ferry-1");
    let run = |args: Vec<String>| {
        let addr = addr.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            trackctl(&addr, Some(KEY), &args).await
        }
    };
    let trips = |args: &[&str]| {
        let mut all = vec!["trips".to_owned(), "ferry-1".to_owned()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        all
    };

    let table = stdout(&run(trips(&[])).await);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 1 + 2 + 1, "{table}");
    assert!(lines[0].starts_with("start "), "{table}");
    assert!(
        lines[1].contains("berth-1") && lines[1].contains("berth-2") && lines[1].contains("1h 00m"),
        "{table}"
    );
    assert!(
        lines[1].contains("5.56") && lines[1].contains("9.8"),
        "{table}"
    );
    assert_eq!(lines[3], "2 trips, 11.12 km in 2h 00m");

    let csv = stdout(&run(trips(&["--format", "csv"])).await);
    assert!(
        csv.starts_with("device_id,from_place,from_lat,from_lon,to_place,to_lat,to_lon,start,")
    );
    let rows = csv_rows(&csv);
    assert_eq!(rows.len(), 2);
    assert_eq!((&rows[1][1], &rows[1][4]), ("berth-2", "berth-1"));
    let rows = csv_rows(&stdout(
        &run(trips(&[
            "--format",
            "csv",
            "--from",
            "2020-06-30T04:00:00Z",
        ]))
        .await,
    ));
    assert_eq!(rows.len(), 1);

    // GeoJSON to a file: one LineString per trip, from place to place along the stored fixes
    // of the trip (the first GetTrack breaks off and is resumed).
    let dir = std::env::temp_dir().join(format!("trackctl-trips-{}", std::process::id()));
    let out = dir.join("trips.geojson");
    let output = run(trips(&["--format", "geojson", "-o", out.to_str().unwrap()])).await;
    stdout(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("resuming"), "{stderr}");
    assert!(
        stderr.contains("wrote 2 trips with 122 stored fixes"),
        "{stderr}"
    );
    let geojson: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let features = geojson["features"].as_array().unwrap();
    assert_eq!(features.len(), 2);
    for feature in features {
        assert_eq!(feature["geometry"]["type"], "LineString");
        let coordinates = feature["geometry"]["coordinates"].as_array().unwrap();
        assert_eq!(coordinates.len(), 61 + 2, "both places and the 61 fixes");
        assert_eq!(feature["properties"]["track_fixes"], 61);
    }
    let line = &features[0]["geometry"]["coordinates"];
    assert_eq!(
        line[0],
        serde_json::json!([-74.05, 40.65]),
        "starts at berth-1"
    );
    assert!(
        (line[31][1].as_f64().unwrap() - 40.675).abs() < 1e-9,
        "halfway"
    );
    assert_eq!(
        line[62],
        serde_json::json!([-74.05, 40.7]),
        "ends at berth-2"
    );
    assert_eq!(features[1]["properties"]["from_place"], "berth-2");
    std::fs::remove_dir_all(&dir).ok();

    // GPX: the places as waypoints, one track per trip, its points the trip's stored fixes.
    let gpx = stdout(&run(trips(&["--format", "gpx"])).await);
    let document = roxmltree::Document::parse(&gpx).expect("GPX is XML");
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "gpx");
    let waypoints = root.children().filter(|n| n.has_tag_name("wpt")).count();
    assert_eq!(waypoints, 2, "berth-1 and berth-2 once each");
    let tracks: Vec<_> = root.children().filter(|n| n.has_tag_name("trk")).collect();
    assert_eq!(tracks.len(), 2);
    let windows = [("02:00", "03:00"), ("05:00", "06:00")];
    for (track, (start, end)) in tracks.iter().zip(windows) {
        let times: Vec<String> = track
            .descendants()
            .filter(|n| n.has_tag_name("trkpt"))
            .map(|p| {
                p.children()
                    .find(|n| n.has_tag_name("time"))
                    .and_then(|n| n.text())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(times.len(), 61);
        assert_eq!(times[0], format!("2020-06-30T{start}:00Z"));
        assert_eq!(times[60], format!("2020-06-30T{end}:00Z"));
        assert!(times.windows(2).all(|w| w[0] < w[1]), "in time order");
    }
    let name = tracks[0]
        .children()
        .find(|n| n.has_tag_name("name"))
        .and_then(|n| n.text());
    assert_eq!(name, Some("trip 1: berth-1 to berth-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relearn_shows_progress_and_a_summary() {
    let (fake, addr) = start().await;
    let output = trackctl(
        &addr,
        Some(KEY),
        &["relearn", "ferry-1", "ferry-2", "--from", "2020-06-30"],
    )
    .await;
    let summary = stdout(&output);
    let lines: Vec<&str> = summary.lines().collect();
    assert_eq!(lines.len(), 1 + 2 + 1, "{summary}");
    assert!(lines[0].starts_with("device "), "{summary}");
    assert!(
        lines[1].starts_with("ferry-1") && lines[1].contains("250") && lines[1].contains("2 → 3"),
        "{summary}"
    );
    assert_eq!(
        lines[3],
        "relearned 2 devices from 500 fixes: places 4 → 6, 10 stays"
    );
    // Not a terminal: a progress line per finished device.
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(
        progress.contains("relearn [############------------] 1/2 devices, 250 fixes"),
        "{progress}"
    );
    assert!(
        progress.contains("relearn [########################] 2/2 devices, 500 fixes"),
        "{progress}"
    );
    {
        let state = fake.0.lock().unwrap();
        let request = &state.relearns[0];
        assert_eq!(request.device_ids, ["ferry-1", "ferry-2"]);
        assert_eq!((request.all_devices, request.from_ms), (false, DAY));
    }

    let all = trackctl(&addr, Some(KEY), &["relearn", "--all", "--quiet"]).await;
    assert!(stdout(&all).ends_with("relearned 3 devices from 750 fixes: places 6 → 9, 15 stays\n"));
    assert!(
        !String::from_utf8_lossy(&all.stderr).contains("relearn ["),
        "--quiet: no progress"
    );
    {
        let state = fake.0.lock().unwrap();
        let request = &state.relearns[1];
        assert!(request.all_devices && request.device_ids.is_empty());
        assert_eq!(request.from_ms, 0);
    }

    // Broken off midway: what finished is summarised, the command fails and says so.
    let broken = trackctl(&addr, Some(KEY), &["relearn", "ferry-1", "broken"]).await;
    assert!(!broken.status.success());
    let stderr = String::from_utf8_lossy(&broken.stderr);
    assert!(
        stderr.contains("Relearn broke off after 1 of 2 devices: UNAVAILABLE: learning restarted"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&broken.stdout).contains("relearned 1 devices from 250 fixes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reseed_prints_its_counts() {
    let (fake, addr) = start().await;
    let output = stdout(
        &trackctl(
            &addr,
            Some(KEY),
            &["reseed", "ferry-1", "ferry-2", "busy-1", "empty-1"],
        )
        .await,
    );
    assert_eq!(
        output,
        "seeded         2  anchored on their last stored fix\n\
         kept           1  refinement had state, left alone\n\
         without_fixes  1  no stored fix\n"
    );
    let all = stdout(&trackctl(&addr, Some(KEY), &["reseed", "--all"]).await);
    assert!(all.starts_with("seeded         5  "), "{all}");
    let state = fake.0.lock().unwrap();
    assert_eq!(state.reseeds.len(), 2);
    assert_eq!(state.reseeds[0].device_ids.len(), 4);
    assert!(state.reseeds[1].all_devices && state.reseeds[1].device_ids.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relearn_and_reseed_need_devices_or_all() {
    let (fake, addr) = start().await;
    for command in ["relearn", "reseed"] {
        let neither = trackctl(&addr, Some(KEY), &[command]).await;
        assert!(!neither.status.success());
        let stderr = String::from_utf8_lossy(&neither.stderr);
        assert!(
            stderr.contains("required arguments were not provided")
                && stderr.contains("<DEVICES|--all>"),
            "{stderr}"
        );
        let both = trackctl(&addr, Some(KEY), &[command, "v1", "--all"]).await;
        assert!(!both.status.success());
        assert!(
            String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
            "{}",
            String::from_utf8_lossy(&both.stderr)
        );
    }
    let bad_time = trackctl(&addr, Some(KEY), &["relearn", "--all", "--from", "soon"]).await;
    assert!(!bad_time.status.success());
    assert!(String::from_utf8_lossy(&bad_time.stderr).contains("--from"));
    let bad_format = trackctl(&addr, Some(KEY), &["trips", "v1", "--format", "kml"]).await;
    assert!(!bad_format.status.success());
    assert!(String::from_utf8_lossy(&bad_format.stderr).contains("table, csv, geojson, gpx"));
    let state = fake.0.lock().unwrap();
    assert!(state.relearns.is_empty() && state.reseeds.is_empty());
}
