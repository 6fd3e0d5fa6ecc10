//! The whole mesh: the four binaries as processes against the real Redis, ClickHouse and
//! tansu that scripts/test started, driven through the gateway with a gRPC client.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt as _;
use trackmesh_proto::v1::{
    DeleteDeviceRequest, DevicePlacesRequest, DevicePredictRequest, Fix, GetDailyStatsRequest,
    IngestRequest, IngestResponse, ListDevicesRequest, RefinedFix, Verdict,
};

mod common;

use common::*;

/// The device's fixes in its daily stats, once they count at least `expected` (or after 30 s):
/// a batch's daily parts are inserted right after its fixes, so they may lag a moment.
async fn daily_total(client: &mut Client, device: &str, expected: u64) -> u64 {
    let mut total = 0;
    for _ in 0..300 {
        let days = client
            .get_daily_stats(GetDailyStatsRequest {
                device_id: device.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .days;
        total = days.iter().map(|d| d.fixes).sum();
        if total >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    total
}

/// The Virginia Beach AIS sample in time order, as a device would stream it.
fn ais_sample() -> Vec<Fix> {
    ais("ais-virginia-beach-2020-06-04..06.csv", &[])
}

/// Whether the fixes stay within `radius_m` of one of them for at least `min_ms`, reporting
/// at least every 30 minutes, and then leave: a stay that any detector must close.
fn sat_still(fixes: &[&Fix], radius_m: f64, min_ms: i64) -> bool {
    let near = |a: &Fix, b: &Fix| {
        trackmesh_shared::geo::haversine_m(a.lat, a.lon, b.lat, b.lon) < radius_m
    };
    (0..fixes.len()).any(|i| {
        let window = fixes[i..]
            .windows(2)
            .take_while(|w| near(fixes[i], w[1]) && w[1].time_ms - w[0].time_ms <= 1_800_000)
            .count();
        let (start, end) = (fixes[i], fixes[i + window]);
        let far = |f: &&&Fix| {
            trackmesh_shared::geo::haversine_m(start.lat, start.lon, f.lat, f.lon) > 3.0 * radius_m
        };
        let left = fixes[i + window + 1..].iter().any(|f| far(&f));
        end.time_ms - start.time_ms >= min_ms && left
    })
}

#[tokio::test]
async fn ais_replay_end_to_end() {
    let mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let fixes = ais_sample();
    // What refinement decided, per device: the accepted fixes' times.
    let mut accepted: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let (mut rejected, mut recovered) = (0, 0);
    for batch in fixes.chunks(1000) {
        let response = ingest(&mut client, batch.to_vec()).await.unwrap();
        assert!(response.stored && response.learning_ok, "{response:?}");
        let refused: std::collections::HashSet<u32> =
            response.rejections.iter().map(|r| r.index).collect();
        for (index, fix) in batch.iter().enumerate() {
            if !refused.contains(&(index as u32)) {
                accepted
                    .entry(fix.device_id.clone())
                    .or_default()
                    .push(fix.time_ms);
            }
        }
        rejected += response.rejected;
        recovered += response.recovered;
    }
    let total: usize = accepted.values().map(Vec::len).sum();
    assert_eq!(total + rejected as usize, fixes.len());
    assert!(rejected > 0, "real data has duplicates and jumps");

    // Every accepted fix is stored exactly once, and GetTrack returns them in time order.
    // (Fixes recovered by a re-anchor are stored too, so a track may hold a few more.)
    let mut stored_total = 0;
    for (device, times_accepted) in &accepted {
        let track = stored(&mut client, device, times_accepted.len()).await;
        let stored_times = times(&track);
        assert!(
            stored_times.windows(2).all(|w| w[0] < w[1]),
            "{device}: in order, no duplicates"
        );
        for time in times_accepted {
            assert!(
                stored_times.binary_search(time).is_ok(),
                "{device}: accepted fix at {time} is stored"
            );
        }
        stored_total += stored_times.len();
        let daily = daily_total(&mut client, device, stored_times.len() as u64).await;
        assert_eq!(daily as usize, stored_times.len(), "{device}: daily agrees");
    }
    assert_eq!(stored_total, total + recovered as usize);

    // Vessels that sat still for an hour or more have places.
    let mut moored = 0;
    for device in accepted.keys() {
        let device_fixes: Vec<&Fix> = fixes.iter().filter(|f| &f.device_id == device).collect();
        if sat_still(&device_fixes, 100.0, 3_600_000) {
            let places = client
                .get_places(DevicePlacesRequest {
                    device_id: device.clone(),
                    k: 0,
                })
                .await
                .unwrap()
                .into_inner()
                .places;
            assert!(
                !places.is_empty(),
                "{device} sat still for an hour but has no place"
            );
            moored += 1;
        }
    }
    assert!(moored > 0, "the sample has moored vessels");
    let listed = client
        .list_devices(ListDevicesRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.devices.len(), accepted.len());
}

#[tokio::test]
async fn tenants_are_isolated_and_calls_authenticated() {
    let mesh = Mesh::start(Options::default()).await;
    let (mut a, mut b) = (mesh.client(0).await, mesh.client(1).await);
    ingest(&mut a, moving("same-name", 30)).await.unwrap();
    assert_eq!(stored(&mut a, "same-name", 30).await.len(), 30);
    // B asks for a device of the same name: it sees only its own (none) and cannot delete A's.
    assert!(track(&mut b, "same-name").await.is_empty());
    assert!(
        b.get_places(DevicePlacesRequest {
            device_id: "same-name".into(),
            k: 0
        })
        .await
        .unwrap()
        .into_inner()
        .places
        .is_empty()
    );
    assert!(
        b.predict_next(DevicePredictRequest {
            device_id: "same-name".into(),
            k: 3
        })
        .await
        .unwrap()
        .into_inner()
        .predictions
        .is_empty()
    );
    b.delete_device(DeleteDeviceRequest {
        device_id: "same-name".into(),
    })
    .await
    .unwrap();
    assert!(
        b.list_devices(ListDevicesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .devices
            .is_empty()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        track(&mut a, "same-name").await.len(),
        30,
        "A's data survives B's delete"
    );

    for key in [
        None,
        Some("wrong-key-000"),
        Some(mesh.tenants[0].1.as_str()).map(|k| &k[..k.len() - 1]),
    ] {
        let mut anonymous = mesh.client_with(key).await;
        let err = ingest(&mut anonymous, moving("x", 1)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}");
        let err = anonymous
            .list_devices(ListDevicesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    // A's delete reaches refinement, learning and storage.
    a.delete_device(DeleteDeviceRequest {
        device_id: "same-name".into(),
    })
    .await
    .unwrap();
    testkit::wait_until(
        Duration::from_secs(30),
        "stored fixes not deleted",
        async || track(&mut a, "same-name").await.is_empty(),
    )
    .await;
    // Refinement forgot it too: the same fixes are new again, not replays.
    let again = ingest(&mut a, moving("same-name", 5)).await.unwrap();
    assert_eq!((again.accepted, again.replayed), (5, 0));
}

#[tokio::test]
async fn bad_requests_and_rate_limits() {
    let mesh = Mesh::start(Options {
        gateway_env: vec![
            ("MAX_BATCH", "100".into()),
            ("RATE_LIMIT_REQUESTS_PER_SEC", "5".into()),
        ],
        ..Options::default()
    })
    .await;
    let mut client = mesh.client(0).await;
    let err = ingest(&mut client, moving("v", 101)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .starts_with("fixes: 101 fixes, more than MAX_BATCH=100"),
        "{}",
        err.message()
    );
    let mut malformed = moving("v", 3);
    malformed[1].device_id = "x".repeat(200);
    let err = ingest(&mut client, malformed).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "fixes[1].device_id: longer than 128 bytes"
        )
    );
    // Values a device got wrong are verdicts, not errors.
    let mut odd = moving("v", 2);
    odd[1].lat = 123.0;
    let response = ingest(&mut client, odd).await.unwrap();
    assert_eq!(response.rejections[0].index, 1);
    assert_eq!(response.rejections[0].verdict(), Verdict::Invalid);

    // Requests per second: the bucket empties, the answer says when to come back.
    let mut limited = None;
    for _ in 0..20 {
        if let Err(status) = client.list_devices(ListDevicesRequest::default()).await {
            limited = Some(status);
            break;
        }
    }
    let status = limited.expect("rate limited within 20 quick calls");
    assert_eq!(status.code(), Code::ResourceExhausted);
    let retry = status.get_details_retry_info().expect("retry info");
    assert!(
        retry
            .retry_delay
            .is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(1))
    );
}

#[tokio::test]
async fn learning_down_ingest_still_succeeds() {
    let mut mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    mesh.learning.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let response = ingest(&mut client, moving("v", 10)).await.unwrap();
    assert!(response.stored);
    assert!(!response.learning_ok);
    assert_eq!(response.accepted, 10);
    assert_eq!(stored(&mut client, "v", 10).await.len(), 10);
}

#[tokio::test]
async fn storage_down_then_retry_loses_nothing_and_doubles_nothing() {
    let mut mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let fixes = moving("v", 60);
    ingest(&mut client, fixes[..20].to_vec()).await.unwrap();
    mesh.storage.kill().await;
    let err = ingest(&mut client, fixes[20..40].to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    mesh.storage.restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The client retries the failed batch: refinement answers with replays, storage keeps one copy.
    let retry = ingest(&mut client, fixes[20..40].to_vec()).await.unwrap();
    assert_eq!(
        (retry.accepted, retry.replayed, retry.stored),
        (20, 20, true)
    );
    ingest(&mut client, fixes[40..].to_vec()).await.unwrap();
    let track = stored(&mut client, "v", 60).await;
    assert_eq!(
        times(&track),
        fixes.iter().map(|f| f.time_ms).collect::<Vec<_>>()
    );
    assert_eq!(daily_total(&mut client, "v", 60).await, 60);
}

#[tokio::test]
async fn refinement_replica_killed_traffic_goes_on() {
    let mut mesh = Mesh::start(Options {
        refinement_replicas: 2,
        ..Options::default()
    })
    .await;
    let mut client = mesh.client(0).await;
    let fixes = moving("v", 100);
    for batch in fixes[..50].chunks(10) {
        ingest(&mut client, batch.to_vec()).await.unwrap();
    }
    mesh.refinement[0].kill().await;
    for batch in fixes[50..].chunks(10) {
        let response = ingest(&mut client, batch.to_vec())
            .await
            .expect("the other replica answers");
        assert_eq!(response.accepted, 10);
    }
    assert_eq!(stored(&mut client, "v", 100).await.len(), 100);
}

#[tokio::test]
async fn ingest_stream_answers_each_request_in_order() {
    let mesh = Mesh::start(Options::default()).await;
    let mut client = mesh.client(0).await;
    let fixes = moving("v", 50);
    let requests: Vec<IngestRequest> = fixes
        .chunks(5)
        .enumerate()
        .map(|(i, chunk)| IngestRequest {
            fixes: chunk.to_vec(),
            sequence: i as u64 + 1,
        })
        .collect();
    let responses: Vec<IngestResponse> = client
        .ingest_stream(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(
        responses.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<u64>>()
    );
    assert!(responses.iter().all(|r| r.accepted == 5 && r.stored));
    assert_eq!(stored(&mut client, "v", 50).await.len(), 50);
}

mod traces {
    //! One ingest is one trace, from the client through every service to the ClickHouse insert.

    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::{
        collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
        common::v1::any_value::Value,
    };
    use tonic::Response;

    use super::*;

    /// service.name, trace id and name of an exported span.
    type Span = (String, Vec<u8>, String);

    /// An OTLP receiver that keeps every span exported to it.
    #[derive(Clone, Default)]
    struct Collector(Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let mut spans = self.0.lock().unwrap();
            for resource_spans in request.into_inner().resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for scope in resource_spans.scope_spans {
                    for span in scope.spans {
                        spans.push((service.clone(), span.trace_id, span.name));
                    }
                }
            }
            Ok(Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    #[tokio::test]
    async fn one_ingest_is_one_trace_through_every_service() {
        let collector = Collector::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        let mesh = Mesh::start(Options {
            env: vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ],
            ..Options::default()
        })
        .await;
        let mut client = mesh.client(0).await;

        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut request = Request::new(IngestRequest {
            fixes: moving("traced", 5),
            sequence: 1,
        });
        request.metadata_mut().insert(
            "traceparent",
            format!("00-{trace_id}-00f067aa0ba902b7-01")
                .parse()
                .unwrap(),
        );
        client.ingest(request).await.unwrap();

        let expected = [
            ("gateway", "trackmesh.v1.Gateway/Ingest"),
            ("refinement-api", "trackmesh.v1.Refinement/Refine"),
            ("learning-api", "trackmesh.v1.Learning/Observe"),
            ("storage-service", "trackmesh.v1.Storage/Store"),
            ("storage-service", "clickhouse insert"),
        ];
        let wanted: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let start = std::time::Instant::now();
        loop {
            let seen: Vec<(String, String)> = collector
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, trace, _)| *trace == wanted)
                .map(|(service, _, name)| (service.clone(), name.clone()))
                .collect();
            let missing: Vec<_> = expected
                .iter()
                .filter(|(service, name)| !seen.iter().any(|(s, n)| s == service && n == name))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "spans of the trace missing: {missing:?}; seen {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[test]
fn bad_configuration_exits_64_with_one_line() {
    testkit::assert_bad_config_exits_64(
        &testkit::binary("gateway"),
        &[("API_KEYS", "demo:demo-key")],
        &[
            ("API_KEYS", "", "API_KEYS=: no API keys"),
            (
                "API_KEYS",
                "demo:short",
                "keys must be at least 8 characters",
            ),
            (
                "STORAGE_ADDR",
                "storage",
                "STORAGE_ADDR=storage: needs a port",
            ),
            (
                "RETRY_ATTEMPTS",
                "0",
                "RETRY_ATTEMPTS=0: out of range, allowed 1..=10",
            ),
        ],
    );
}

/// Coalescing (issue 11): concurrent single-fix callers share downstream batches, and each
/// gets exactly the answer it would have got alone.
mod coalescing {
    use futures::future::join_all;

    use super::*;

    /// The gateway's `name` histogram: (sum, count).
    async fn histogram(mesh: &Mesh, name: &str) -> (f64, f64) {
        let (_, body) = testkit::http_get(mesh.gateway.addr(), "/metrics")
            .await
            .unwrap();
        let value = |suffix: &str| {
            body.lines()
                .find_map(|line| line.strip_prefix(&format!("{name}{suffix} ")))
                .map_or(0.0, |v| v.parse().unwrap())
        };
        (value("_sum"), value("_count"))
    }

    /// Per device `i`: a seed fix, then one of four next fixes, by `i % 4`: a normal move, a
    /// jump at an impossible speed, a latitude out of range, the seed again (a replay).
    fn seed(device: &str) -> Fix {
        // One time for every run, so that the same fixes are the same.
        static START: std::sync::LazyLock<i64> = std::sync::LazyLock::new(|| now_ms() - 600_000);
        Fix {
            device_id: device.into(),
            time_ms: *START,
            lat: 36.9,
            lon: -76.3,
            ..Fix::default()
        }
    }

    fn next(device: &str, i: usize) -> Fix {
        let seed = seed(device);
        match i % 4 {
            0 => Fix {
                time_ms: seed.time_ms + 60_000,
                lat: seed.lat + 0.002,
                ..seed
            },
            1 => Fix {
                time_ms: seed.time_ms + 60_000,
                lat: seed.lat + 5.0,
                ..seed
            },
            2 => Fix {
                time_ms: seed.time_ms + 60_000,
                lat: 95.0,
                ..seed
            },
            _ => seed,
        }
    }

    /// What a caller can compare: counts and each rejection's (index, verdict).
    fn verdicts(response: &IngestResponse) -> (u32, u32, u32, bool, Vec<(u32, i32)>) {
        (
            response.accepted,
            response.rejected,
            response.replayed,
            response.stored,
            response
                .rejections
                .iter()
                .map(|r| (r.index, r.verdict))
                .collect(),
        )
    }

    fn rows(fixes: &[RefinedFix]) -> Vec<(i64, u32, i64, i64)> {
        fixes
            .iter()
            .map(|f| {
                let fix = f.fix.as_ref().unwrap();
                // Distances rounded: only the device id differs between the two runs.
                (
                    fix.time_ms,
                    f.segment,
                    f.dt_ms,
                    (f.distance_m * 1000.0).round() as i64,
                )
            })
            .collect()
    }

    const DEVICES: usize = 100;

    #[tokio::test]
    async fn concurrent_single_fixes_answer_and_store_as_one_by_one() {
        let mesh = Mesh::start(Options::default()).await;
        let clients = [mesh.client(0).await, mesh.client(1).await];
        // 200 callers: devices 0..100 of each tenant. "one-*" devices get the same fixes
        // one request at a time, "all-*" devices all at once.
        let callers: Vec<(usize, usize)> = (0..2)
            .flat_map(|tenant| (0..DEVICES).map(move |i| (tenant, i)))
            .collect();
        let device = |run: &str, i: usize| format!("{run}-{i}");
        for run in ["one", "all"] {
            for &(tenant, i) in &callers {
                let mut client = clients[tenant].clone();
                let response = ingest(&mut client, vec![seed(&device(run, i))])
                    .await
                    .unwrap();
                assert_eq!(response.accepted, 1);
            }
        }
        let (_, batches_before) = histogram(&mesh, "gateway_coalesced_batch_size").await;

        let mut one_by_one = Vec::new();
        for &(tenant, i) in &callers {
            let mut client = clients[tenant].clone();
            one_by_one.push(
                ingest(&mut client, vec![next(&device("one", i), i)])
                    .await
                    .unwrap(),
            );
        }
        let (sum_before, batches_between) = histogram(&mesh, "gateway_coalesced_batch_size").await;
        let at_once = join_all(callers.iter().map(|&(tenant, i)| {
            let mut client = clients[tenant].clone();
            async move {
                ingest(&mut client, vec![next(&device("all", i), i)])
                    .await
                    .unwrap()
            }
        }))
        .await;
        let (sum_after, batches_after) = histogram(&mesh, "gateway_coalesced_batch_size").await;

        assert_eq!(
            batches_between - batches_before,
            callers.len() as f64,
            "one by one, every request is a batch of its own"
        );
        assert_eq!(sum_after - sum_before, callers.len() as f64);
        assert!(
            batches_after - batches_between < callers.len() as f64,
            "concurrent requests share batches: {} batches for {} requests",
            batches_after - batches_between,
            callers.len()
        );
        for (k, (one, all)) in one_by_one.iter().zip(&at_once).enumerate() {
            assert_eq!(verdicts(one), verdicts(all), "caller {k}");
        }
        // Each kind of verdict is there, so the comparison covers them all.
        let kinds: std::collections::BTreeSet<_> = at_once
            .iter()
            .map(|r| {
                (
                    r.accepted,
                    r.replayed,
                    r.rejections.first().map(|x| x.verdict),
                )
            })
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");

        for &(tenant, i) in &callers {
            let mut client = clients[tenant].clone();
            let n = if i % 4 == 0 { 2 } else { 1 };
            let one = stored(&mut client, &device("one", i), n).await;
            let all = stored(&mut client, &device("all", i), n).await;
            assert_eq!(one.len(), n, "tenant {tenant} device {i}");
            assert_eq!(rows(&one), rows(&all), "tenant {tenant} device {i}");
        }
    }

    #[tokio::test]
    async fn a_bad_fix_fails_only_its_caller() {
        let mesh = Mesh::start(Options::default()).await;
        let client = mesh.client(0).await;
        let answers = join_all((0..50).map(|i| {
            let mut client = client.clone();
            let device = if i == 25 {
                String::new()
            } else {
                format!("d{i}")
            };
            async move { ingest(&mut client, vec![seed(&device)]).await }
        }))
        .await;
        for (i, answer) in answers.iter().enumerate() {
            if i == 25 {
                let err = answer.as_ref().unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
                assert!(err.message().contains("fixes[0].device_id"), "{err:?}");
            } else {
                let response = answer.as_ref().unwrap();
                assert_eq!((response.accepted, response.stored), (1, true), "{i}");
            }
        }
    }

    #[tokio::test]
    async fn storage_down_fails_the_batch_and_retries_store_each_fix_once() {
        // The failed batches may open the storage breaker: keep its cool-down short.
        let mut mesh = Mesh::start(Options {
            gateway_env: vec![("BREAKER_COOL_DOWN", "1s".into())],
            ..Options::default()
        })
        .await;
        let client = mesh.client(0).await;
        let devices: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        let send = |fixes: Vec<Fix>| {
            join_all(fixes.into_iter().map(|fix| {
                let mut client = client.clone();
                async move { ingest(&mut client, vec![fix]).await }
            }))
        };
        let firsts: Vec<Fix> = devices.iter().map(|d| seed(d)).collect();
        for answer in send(firsts).await {
            assert!(answer.unwrap().stored);
        }
        mesh.storage.kill().await;
        let seconds: Vec<Fix> = devices.iter().map(|d| next(d, 0)).collect();
        for answer in send(seconds.clone()).await {
            let err = answer.unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        }
        mesh.storage.restart().await;
        // Each caller retries while the answer is UNAVAILABLE, as a client should.
        let retries = seconds.into_iter().map(|fix| {
            let mut client = client.clone();
            async move {
                for _ in 0..100 {
                    match ingest(&mut client, vec![fix.clone()]).await {
                        Err(status) if status.code() == Code::Unavailable => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        answer => return answer,
                    }
                }
                panic!("{}: still unavailable after 20 s", fix.device_id);
            }
        });
        for answer in join_all(retries).await {
            let response = answer.unwrap();
            assert_eq!((response.accepted, response.stored), (1, true));
        }
        let mut client = client.clone();
        for device in &devices {
            let track = stored(&mut client, device, 2).await;
            assert_eq!(track.len(), 2, "{device}");
        }
        // Once more after the consumer had time to write any copy it would write.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for device in &devices {
            assert_eq!(daily_total(&mut client, device, 2).await, 2, "{device}");
            assert_eq!(track(&mut client, device).await.len(), 2, "{device}");
        }
    }
}
