//! storage-service against the real tansu broker and ClickHouse started by scripts/test.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

mod common;

use common::{Topic, config, start};
use futures::StreamExt as _;
use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _,
    consumer::{Consumer as _, StreamConsumer},
    message::Headers as _,
};
use storage::Config;
use testkit::{Backend, Kind, Service};
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use trackmesh_proto::v1::{
    DailyStatsRequest, DeleteStoredDeviceRequest, DeviceSummary, Fix, ListStoredDevicesRequest,
    QueryTrackRequest, RefinedFix, SortField, StoreRequest, Verdict, storage_client::StorageClient,
};
use trackmesh_shared::{config::Duration as ConfigDuration, fix_messages::FixBatch};

const T0: i64 = 1_750_000_000_000;
const DAY_MS: i64 = 86_400_000;

/// Accepted fixes of a vessel, one a minute.
fn track(device: &str, n: usize, start_ms: i64) -> Vec<RefinedFix> {
    (0..n)
        .map(|i| RefinedFix {
            fix: Some(Fix {
                device_id: device.into(),
                time_ms: start_ms + i as i64 * 60_000,
                lat: 36.8 + i as f64 * 0.001,
                lon: -76.3,
                speed_mps: Some(3.5),
                ..Fix::default()
            }),
            verdict: Verdict::Accepted as i32,
            segment: 1,
            distance_m: if i == 0 { 0.0 } else { 111.2 },
            dt_ms: if i == 0 { 0 } else { 60_000 },
            speed_kmh: 6.67,
            ..RefinedFix::default()
        })
        .collect()
}

async fn store(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    fixes: &[RefinedFix],
) -> Result<u32, tonic::Status> {
    client
        .store(StoreRequest {
            tenant_id: tenant.into(),
            fixes: fixes.to_vec(),
        })
        .await
        .map(|r| r.into_inner().stored)
}

/// Every fix of a device, in order, through the streaming query.
async fn read_track(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    device: &str,
) -> Vec<RefinedFix> {
    let query = QueryTrackRequest {
        tenant_id: tenant.into(),
        device_id: device.into(),
        ..QueryTrackRequest::default()
    };
    query_fixes(client, query).await
}

/// The fixes of all chunks a track query streams.
async fn query_fixes(
    client: &mut StorageClient<Channel>,
    query: QueryTrackRequest,
) -> Vec<RefinedFix> {
    let mut stream = client.query_track(query).await.unwrap().into_inner();
    let mut fixes = Vec::new();
    while let Some(chunk) = stream.next().await {
        fixes.extend(chunk.unwrap().fixes);
    }
    fixes
}

/// Waits until the device has `n` fixes readable, then returns them.
async fn wait_for_track(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    device: &str,
    n: usize,
) -> Vec<RefinedFix> {
    let start = Instant::now();
    loop {
        let fixes = read_track(client, tenant, device).await;
        if fixes.len() >= n || start.elapsed() > Duration::from_secs(60) {
            return fixes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn track_len(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    device: &str,
    n: usize,
) -> usize {
    wait_for_track(client, tenant, device, n).await.len()
}

fn times(fixes: &[RefinedFix]) -> Vec<i64> {
    fixes
        .iter()
        .map(|f| f.fix.as_ref().unwrap().time_ms)
        .collect()
}

async fn daily_total(client: &mut StorageClient<Channel>, tenant: &str, device: &str) -> u64 {
    let days = client
        .daily_stats(DailyStatsRequest {
            tenant_id: tenant.into(),
            device_id: device.into(),
            ..DailyStatsRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    days.iter().map(|d| d.fixes).sum()
}

#[tokio::test]
async fn stored_fixes_are_readable_once_and_the_daily_table_agrees() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    // 3 devices, 2 000 fixes each: ~33 hours, so several UTC days.
    let devices = ["alpha", "bravo", "charlie"];
    let all: Vec<Vec<RefinedFix>> = devices.iter().map(|d| track(d, 2000, T0)).collect();
    for start in (0..2000).step_by(500) {
        let batch: Vec<RefinedFix> = all
            .iter()
            .flat_map(|f| f[start..start + 500].to_vec())
            .collect();
        assert_eq!(store(&mut client, &tenant, &batch).await.unwrap(), 1500);
    }
    for (device, fixes) in devices.iter().zip(&all) {
        let read = wait_for_track(&mut client, &tenant, device, 2000).await;
        assert_eq!(
            times(&read),
            times(fixes),
            "{device}: every fix once, in order"
        );
        assert_eq!(read[5].fix, fixes[5].fix, "optional fields survive");
        assert_eq!(daily_total(&mut client, &tenant, device).await, 2000);
    }
    let days = client
        .daily_stats(DailyStatsRequest {
            tenant_id: tenant.clone(),
            device_id: "alpha".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    let mut expected_days: Vec<i64> = times(&all[0])
        .iter()
        .map(|t| t.div_euclid(DAY_MS))
        .collect();
    expected_days.dedup();
    assert_eq!(days.len(), expected_days.len());
    assert_eq!(days[0].first_ms, T0);
    assert_eq!(days.iter().map(|d| d.fixes).sum::<u64>(), 2000);
    assert!((days.iter().map(|d| d.distance_m).sum::<f64>() - 1999.0 * 111.2).abs() < 1e-6);

    let listed = client
        .list_devices(ListStoredDevicesRequest {
            tenant_id: tenant.clone(),
            sort: vec![SortField {
                field: "device_id".into(),
                descending: true,
            }],
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(names, ["charlie", "bravo"]);
    assert!(listed.devices.iter().all(|d| d.fixes == 2000));
    let rest = client
        .list_devices(ListStoredDevicesRequest {
            tenant_id: tenant.clone(),
            sort: vec![SortField {
                field: "device_id".into(),
                descending: true,
            }],
            page_size: 2,
            page_token: listed.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.devices.len(), 1);
    assert_eq!(rest.devices[0].device_id, "alpha");
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn the_same_batch_stored_twice_is_read_once() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    let fixes = track("v", 300, T0);
    store(&mut client, &tenant, &fixes).await.unwrap();
    wait_for_track(&mut client, &tenant, "v", 300).await;
    // The client's answer was lost and it retried; refinement marked the fixes as replays.
    let mut replayed = fixes.clone();
    for fix in &mut replayed {
        fix.replay = true;
    }
    store(&mut client, &tenant, &replayed).await.unwrap();
    // And the same again in one batch with fresh fixes, so the batch certainly gets consumed.
    let mut mixed = replayed[..100].to_vec();
    mixed.extend(track("v", 310, T0)[300..].to_vec());
    store(&mut client, &tenant, &mixed).await.unwrap();
    let read = wait_for_track(&mut client, &tenant, "v", 310).await;
    assert_eq!(times(&read), times(&track("v", 310, T0)));
    assert_eq!(
        daily_total(&mut client, &tenant, "v").await,
        310,
        "replays are not counted twice"
    );
}

#[tokio::test]
async fn query_track_streams_chunks_in_both_orders_and_resumes() {
    let mut config = config();
    config.storage.streaming_chunk_size = 100;
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let fixes = track("v", 1000, T0);
    store(&mut client, &tenant, &fixes).await.unwrap();
    wait_for_track(&mut client, &tenant, "v", 1000).await;

    let query = |descending, limit, resume_token: String| QueryTrackRequest {
        tenant_id: tenant.clone(),
        device_id: "v".into(),
        from_ms: T0 + 60_000 * 100,
        to_ms: T0 + 60_000 * 899,
        descending,
        limit,
        resume_token,
    };
    let chunks: Vec<_> = client
        .query_track(query(false, 0, String::new()))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(chunks.len(), 8);
    assert!(
        chunks
            .iter()
            .all(|c| c.as_ref().unwrap().fixes.len() == 100)
    );
    let first = chunks[0].as_ref().unwrap();
    assert_eq!(
        first.fixes[0].fix.as_ref().unwrap().time_ms,
        T0 + 60_000 * 100
    );
    // Resume after the third chunk: the rest, nothing repeated.
    let token = chunks[2].as_ref().unwrap().resume_token.clone();
    let rest = query_fixes(&mut client, query(false, 0, token)).await;
    assert_eq!(rest.len(), 500);
    assert_eq!(rest[0].fix.as_ref().unwrap().time_ms, T0 + 60_000 * 400);
    // Newest first, limited.
    let desc = query_fixes(&mut client, query(true, 150, String::new())).await;
    assert_eq!(desc.len(), 150);
    assert_eq!(desc[0].fix.as_ref().unwrap().time_ms, T0 + 60_000 * 899);
    assert!(
        desc.windows(2)
            .all(|w| w[0].fix.as_ref().unwrap().time_ms > w[1].fix.as_ref().unwrap().time_ms)
    );
}

#[tokio::test]
async fn delete_device_removes_its_fixes_and_aggregates() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    store(&mut client, &tenant, &track("gone", 50, T0))
        .await
        .unwrap();
    store(&mut client, &tenant, &track("kept", 50, T0))
        .await
        .unwrap();
    wait_for_track(&mut client, &tenant, "gone", 50).await;
    wait_for_track(&mut client, &tenant, "kept", 50).await;
    client
        .delete_device(DeleteStoredDeviceRequest {
            tenant_id: tenant.clone(),
            device_id: "gone".into(),
        })
        .await
        .unwrap();
    // ALTER … DELETE is a mutation: applied in the background, soon.
    testkit::wait_until(Duration::from_secs(30), "delete not applied", async || {
        read_track(&mut client, &tenant, "gone").await.is_empty()
            && daily_total(&mut client, &tenant, "gone").await == 0
    })
    .await;
    assert_eq!(read_track(&mut client, &tenant, "kept").await.len(), 50);
}

#[tokio::test]
async fn injection_attempts_are_rejected_or_stored_verbatim() {
    // Also the one test of lz4-compressed inserts and reads.
    let mut config = config();
    config.storage.clickhouse_compression = clickhouse::Compression::Lz4;
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let nasty = [
        "x'; DROP TABLE fixes; --",
        "a\\' OR 1=1 --",
        "robert'); DELETE FROM daily_stats; --",
        "{?}",
    ];
    for device in nasty {
        store(&mut client, &tenant, &track(device, 3, T0))
            .await
            .unwrap();
    }
    for device in nasty {
        let read = wait_for_track(&mut client, &tenant, device, 3).await;
        assert_eq!(read.len(), 3, "{device}");
        assert_eq!(read[0].fix.as_ref().unwrap().device_id, device);
    }
    // Another tenant's name smuggled into a device id reads nothing of theirs.
    assert!(
        read_track(&mut client, &tenant, "' OR tenant_id != '")
            .await
            .is_empty()
    );
    let err = client
        .list_devices(ListStoredDevicesRequest {
            tenant_id: tenant.clone(),
            sort: vec![SortField {
                field: "fixes DESC; DROP TABLE fixes".into(),
                descending: false,
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("sort[0].field: unknown field"),
        "{}",
        err.message()
    );
    let err = client
        .query_track(QueryTrackRequest {
            tenant_id: "a'b".into(),
            device_id: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Everything still there.
    assert_eq!(device_page(&mut client, &tenant).await.len(), nasty.len());
}

#[tokio::test]
async fn list_devices_shows_each_devices_last_position() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    // Odd names: the position lookup binds each device id into its SQL.
    let devices = ["north", "x'; DROP TABLE fixes; --", "{?}"];
    let mut expected = Vec::new();
    for (i, device) in devices.iter().enumerate() {
        // 30 hours (two UTC days), each device on its own meridian.
        let mut fixes = track(device, 1800, T0);
        for fix in &mut fixes {
            fix.fix.as_mut().unwrap().lon = -76.3 + i as f64;
        }
        let last = fixes.last().unwrap().fix.clone().unwrap();
        expected.push((device.to_string(), 1800, last.lat, last.lon));
        // The latest fixes first: the last position is the latest fix, not the last stored.
        store(&mut client, &tenant, &fixes[1000..]).await.unwrap();
        store(&mut client, &tenant, &fixes[..1000]).await.unwrap();
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let start = Instant::now();
    let listed = loop {
        let listed = device_page(&mut client, &tenant).await;
        let complete = listed.len() == devices.len() && listed.iter().all(|d| d.fixes == 1800);
        if complete || start.elapsed() > Duration::from_secs(60) {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let got: Vec<(String, u64, f64, f64)> = listed
        .into_iter()
        .map(|d| (d.device_id, d.fixes, d.last_lat, d.last_lon))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn list_devices_counts_todays_fixes_and_distance() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    let now_ms = trackmesh_shared::domain::now_ms();
    let today_ms = now_ms - now_ms.rem_euclid(86_400_000);
    // 10 fixes a minute apart yesterday, then 5 fixes today (a millisecond apart, so that
    // they are in the past whenever the test runs).
    let mut fixes = track("ferry", 15, today_ms - 3_600_000);
    for (i, fix) in fixes[10..].iter_mut().enumerate() {
        fix.fix.as_mut().unwrap().time_ms = today_ms + i as i64;
    }
    store(&mut client, &tenant, &fixes).await.unwrap();
    let start = Instant::now();
    let device = loop {
        let listed = device_page(&mut client, &tenant).await;
        if let Some(device) = listed.into_iter().find(|d| d.fixes == 15) {
            break device;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not stored in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(device.fixes_today, 5);
    assert!(
        (device.distance_today_m - 5.0 * 111.2).abs() < 1e-6,
        "{device:?}"
    );
    assert!(
        (device.distance_m - 14.0 * 111.2).abs() < 1e-6,
        "{device:?}"
    );
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let (_service, mut client) = start(config()).await;
    let tenant = testkit::unique("t");
    let track_query = |from_ms, to_ms, limit, resume_token: &str| QueryTrackRequest {
        tenant_id: tenant.clone(),
        device_id: "v".into(),
        from_ms,
        to_ms,
        limit,
        resume_token: resume_token.into(),
        ..Default::default()
    };
    for (request, field) in [
        (track_query(10, 5, 0, ""), "from_ms"),
        (track_query(0, 0, u64::MAX, ""), "limit"),
        (track_query(0, 0, 0, "yesterday"), "resume_token"),
    ] {
        let err = client.query_track(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let list = |page_size, page_token: &str, sort: Vec<SortField>| ListStoredDevicesRequest {
        tenant_id: tenant.clone(),
        sort,
        page_size,
        page_token: page_token.into(),
    };
    let six: Vec<SortField> = [
        "device_id",
        "fixes",
        "first_ms",
        "last_ms",
        "distance_m",
        "max_speed_kmh",
    ]
    .iter()
    .map(|f| SortField {
        field: (*f).into(),
        descending: false,
    })
    .collect();
    for (request, field) in [
        (list(100_000, "", vec![]), "page_size"),
        (list(10, "-3", vec![]), "page_token"),
        (list(10, "", six), "sort"),
    ] {
        let err = client.list_devices(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let mut rejected = track("v", 2, T0);
    rejected[1].verdict = Verdict::Speed as i32;
    let err = store(&mut client, &tenant, &rejected).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::InvalidArgument,
            "fixes[1].verdict: only ACCEPTED fixes are stored"
        )
    );
    let err = store(&mut client, "", &track("v", 1, T0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// The first `n` messages of the dead-letter topic: payload and `dlq-reason`.
async fn dead_letters(dlq: &str, n: usize) -> Vec<(Vec<u8>, String)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", testkit::kafka_brokers())
        .set("group.id", testkit::unique("dlq-reader"))
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    consumer.subscribe(&[dlq]).unwrap();
    let mut messages = Vec::new();
    while messages.len() < n {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("no message on the dead-letter topic")
            .unwrap();
        let reason = message
            .headers()
            .unwrap()
            .iter()
            .find(|h| h.key == "dlq-reason")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        messages.push((message.payload().unwrap_or_default().to_vec(), reason));
    }
    messages
}

/// A client of the test's own database, for what the service does not do (test-only DDL).
fn clickhouse(config: &Config) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&config.storage.clickhouse_url)
        .with_database(&config.storage.clickhouse_database)
        .with_validation(false)
}

/// The first page of the tenant's devices, in the default order.
async fn device_page(client: &mut StorageClient<Channel>, tenant: &str) -> Vec<DeviceSummary> {
    let request = ListStoredDevicesRequest {
        tenant_id: tenant.into(),
        ..Default::default()
    };
    client
        .list_devices(request)
        .await
        .unwrap()
        .into_inner()
        .devices
}

async fn list_totals(client: &mut StorageClient<Channel>, tenant: &str) -> Vec<(String, u64)> {
    let devices = device_page(client, tenant).await;
    devices
        .into_iter()
        .map(|d| (d.device_id, d.fixes))
        .collect()
}

#[tokio::test]
async fn poison_message_goes_to_the_dead_letter_topic() {
    let config = config();
    let topic = Topic::new(&config.storage.kafka_topic);
    let dlq = config.storage.kafka_dlq_topic.clone();
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    store(&mut client, &tenant, &track("before", 10, T0))
        .await
        .unwrap();
    let poison = b"\xff\xfe not protobuf";
    topic.send("poison/key", poison, None, None).await;
    store(&mut client, &tenant, &track("after", 10, T0))
        .await
        .unwrap();
    assert_eq!(track_len(&mut client, &tenant, "before", 10).await, 10);
    assert_eq!(track_len(&mut client, &tenant, "after", 10).await, 10);

    let (payload, reason) = dead_letters(&dlq, 1).await.remove(0);
    assert_eq!(payload, b"\xff\xfe not protobuf");
    assert!(reason.starts_with("not a FixBatch"), "{reason}");
}

async fn health(service: &Service, name: &str) -> ServingStatus {
    let channel = Channel::from_shared(service.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: name.into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

#[tokio::test]
async fn clickhouse_outage_pauses_and_resumes_without_loss() {
    let mut clickhouse = Backend::start(Kind::ClickHouse);
    let mut config = config();
    config.storage.clickhouse_url = clickhouse.addr();
    let (service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let fixes = track("v", 600, T0);
    store(&mut client, &tenant, &fixes[..200]).await.unwrap();
    wait_for_track(&mut client, &tenant, "v", 200).await;

    clickhouse.stop();
    service.wait_ready(503, Duration::from_secs(10)).await;
    // Kafka is up: Store still works, the fixes wait in the topic, and its health part says
    // so (the gateway checks it before ingesting) while the whole service is NOT_SERVING.
    assert_eq!(health(&service, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&service, trackmesh_proto::STORE_HEALTH_NAME).await,
        ServingStatus::Serving
    );
    store(&mut client, &tenant, &fixes[200..400]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    store(&mut client, &tenant, &fixes[400..]).await.unwrap();

    clickhouse.restart();
    service.wait_ready(200, Duration::from_secs(60)).await;
    let read = wait_for_track(&mut client, &tenant, "v", 600).await;
    assert_eq!(
        times(&read),
        times(&fixes),
        "every acknowledged fix, exactly once"
    );
}

#[tokio::test]
async fn shutdown_with_clickhouse_down_ends_within_the_grace_and_loses_nothing() {
    let mut clickhouse = Backend::start(Kind::ClickHouse);
    let mut config = config();
    config.storage.clickhouse_url = clickhouse.addr();
    let grace = Duration::from_secs(3);
    config.common.shutdown_grace = ConfigDuration::from_secs(3);
    let (service, mut client) = start(config.clone()).await;
    let tenant = testkit::unique("t");
    let fixes = track("v", 60, T0);
    store(&mut client, &tenant, &fixes[..10]).await.unwrap();
    wait_for_track(&mut client, &tenant, "v", 10).await;

    clickhouse.stop();
    service.wait_ready(503, Duration::from_secs(10)).await;
    store(&mut client, &tenant, &fixes[10..]).await.unwrap();
    // The consumer holds the 50 fixes and retries their insert.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let asked = Instant::now();
    tokio::time::timeout(grace + Duration::from_secs(10), service.shutdown())
        .await
        .expect("run() still running 10 s after the grace period")
        .unwrap();
    // The server's drain is up to the grace, plus up to 2 s for connections to close.
    assert!(
        asked.elapsed() < grace + Duration::from_secs(3),
        "run() returned {:?} after shutdown was asked (grace {grace:?})",
        asked.elapsed()
    );

    // Nothing was committed that was not inserted: the next consumer stores it.
    clickhouse.restart();
    let (_service, mut client) = start(config).await;
    let read = wait_for_track(&mut client, &tenant, "v", 60).await;
    assert_eq!(times(&read), times(&fixes), "every acknowledged fix, once");
    assert_eq!(daily_total(&mut client, &tenant, "v").await, 60);
}

#[tokio::test]
async fn rows_clickhouse_refuses_go_to_the_dead_letter_topic_and_the_rest_is_stored() {
    let config = config();
    let dlq = config.storage.kafka_dlq_topic.clone();
    let (_service, mut client) = start(config.clone()).await;
    // A row ClickHouse refuses for good, whatever the batch: a column whose expression
    // fails for one latitude (as a CHECK constraint would on a current server; 18.16 has
    // none).
    clickhouse(&config)
        .query("ALTER TABLE fixes ADD COLUMN refused UInt8 MATERIALIZED throwIf(lat = 66.6)")
        .execute()
        .await
        .unwrap();
    let tenant = testkit::unique("t");
    let mut mixed = track("mixed", 50, T0);
    mixed[17].fix.as_mut().unwrap().lat = 66.6;
    let clean = track("clean", 50, T0);
    // One request, so one batch: the clean device's fixes share the refused insert.
    let both: Vec<RefinedFix> = mixed.iter().chain(&clean).cloned().collect();
    store(&mut client, &tenant, &both).await.unwrap();
    store(&mut client, &tenant, &track("after", 20, T0))
        .await
        .unwrap();

    assert_eq!(track_len(&mut client, &tenant, "clean", 50).await, 50);
    let after = track_len(&mut client, &tenant, "after", 20).await;
    assert_eq!(after, 20, "consumption goes on");
    let read = wait_for_track(&mut client, &tenant, "mixed", 49).await;
    let mut expected = times(&mixed);
    expected.remove(17);
    assert_eq!(times(&read), expected, "all but the refused fix");
    assert_eq!(daily_total(&mut client, &tenant, "mixed").await, 49);
    assert_eq!(daily_total(&mut client, &tenant, "clean").await, 50);

    let (payload, reason) = dead_letters(&dlq, 1).await.remove(0);
    let parked = FixBatch::decode(payload.as_slice()).unwrap();
    assert_eq!(
        (parked.tenant_id.as_str(), parked.device_id.as_str()),
        (tenant.as_str(), "mixed")
    );
    assert_eq!(
        parked.fixes,
        vec![mixed[17].clone().into()],
        "the refused fix, whole"
    );
    assert!(
        reason.starts_with("clickhouse refused the fix") && reason.contains("395"),
        "{reason}"
    );
}

#[tokio::test]
async fn a_batch_of_100_000_replays_is_stored() {
    // The lookup of stored copies once put every replay time into one SQL text, over
    // ClickHouse's max_query_size (256 KiB) from ~20 000 times on.
    let mut config = config();
    config.storage.batch_max_rows = 1_000_000;
    config.storage.batch_max_wait = ConfigDuration::from_secs(5);
    config.storage.kafka_partitions = 1;
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let mut fixes = track("v", 100_000, T0);
    for (i, fix) in fixes.iter_mut().enumerate() {
        fix.replay = true;
        // Within latitude's range over 100 000 fixes.
        fix.fix.as_mut().unwrap().lat = 36.8 + (i % 10_000) as f64 * 0.001;
    }
    for chunk in fixes.chunks(10_000) {
        store(&mut client, &tenant, chunk).await.unwrap();
    }
    testkit::wait_until(
        Duration::from_secs(90),
        "the 100 000 replays never got stored",
        async || daily_total(&mut client, &tenant, "v").await == 100_000,
    )
    .await;
    assert_eq!(
        times(&read_track(&mut client, &tenant, "v").await),
        times(&fixes)
    );
}

#[tokio::test]
async fn a_batch_delivered_again_after_a_crash_counts_once() {
    // One partition, so that a sentinel fix read back means everything before it was
    // consumed.
    let mut config = config();
    config.storage.kafka_partitions = 1;
    let (service, mut client) = start(config.clone()).await;
    let tenant = testkit::unique("t");
    let v = track("v", 320, T0);
    store(&mut client, &tenant, &v[..300]).await.unwrap();
    store(&mut client, &tenant, &track("w", 50, T0))
        .await
        .unwrap();
    wait_for_track(&mut client, &tenant, "v", 300).await;
    wait_for_track(&mut client, &tenant, "w", 50).await;

    // The crash: the fixes get inserted, then the daily parts fail, so nothing is
    // committed; the service stops before they succeed.
    let db = clickhouse(&config);
    db.query("ALTER TABLE daily_parts ADD COLUMN crash UInt8 MATERIALIZED throwIf(fix_count > 0)")
        .execute()
        .await
        .unwrap();
    // Re-sent fixes whose originals are stored (dropped), fresh ones, and re-sent fixes
    // whose originals never were (stored: counted by this message, whatever happens).
    let mut again: Vec<RefinedFix> = v[..100].to_vec();
    again.extend_from_slice(&v[300..310]);
    let mut lost = v[310..].to_vec();
    for fix in again[..100].iter_mut().chain(&mut lost) {
        fix.replay = true;
    }
    store(&mut client, &tenant, &again).await.unwrap();
    store(&mut client, &tenant, &lost).await.unwrap();
    wait_for_track(&mut client, &tenant, "v", 320).await;
    service.shutdown().await.unwrap();
    db.query("ALTER TABLE daily_parts DROP COLUMN crash")
        .execute()
        .await
        .unwrap();

    // A consumer that never saw a commit reads every message again, as after a crash
    // between insert and commit.
    config.storage.kafka_group_id = testkit::unique("again");
    let (_service, mut client) = start(config).await;
    store(&mut client, &tenant, &track("sentinel", 1, T0))
        .await
        .unwrap();
    wait_for_track(&mut client, &tenant, "sentinel", 1).await;

    assert_eq!(
        times(&read_track(&mut client, &tenant, "v").await),
        times(&v)
    );
    assert_eq!(daily_total(&mut client, &tenant, "v").await, 320);
    assert_eq!(daily_total(&mut client, &tenant, "w").await, 50);
    let days = client
        .daily_stats(DailyStatsRequest {
            tenant_id: tenant.clone(),
            device_id: "v".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .days;
    assert!((days.iter().map(|d| d.distance_m).sum::<f64>() - 319.0 * 111.2).abs() < 1e-6);
    assert_eq!(days[0].first_ms, T0);
    assert_eq!(days.last().unwrap().last_ms, T0 + 319 * 60_000);
    assert_eq!(
        list_totals(&mut client, &tenant).await,
        [
            ("sentinel".to_owned(), 1),
            ("v".to_owned(), 320),
            ("w".to_owned(), 50)
        ]
    );
}

#[tokio::test]
async fn fixes_still_in_kafka_at_delete_device_are_deleted_too() {
    let mut config = config();
    // One partition, so that a sentinel read back means everything before it was consumed.
    config.storage.kafka_partitions = 1;
    let topic = Topic::new(&config.storage.kafka_topic);
    // Creates the topic and the schema, then stops: nothing consumes while the fixes wait.
    let (service, _) = start(config.clone()).await;
    service.shutdown().await.unwrap();
    let tenant = testkit::unique("t");
    for device in ["gone", "kept"] {
        let batch = FixBatch {
            tenant_id: tenant.clone(),
            device_id: device.into(),
            fixes: track(device, 30, T0).into_iter().map(Into::into).collect(),
        };
        let key = format!("{tenant}/{device}");
        topic
            .send(&key, &batch.encode_to_vec(), None, Some("1"))
            .await;
    }
    // A consumer starts, holding what it reads for 5 s, and the device is deleted before
    // its fixes are stored.
    config.storage.batch_max_wait = ConfigDuration::from_secs(5);
    let (_service, mut client) = start(config).await;
    client
        .delete_device(DeleteStoredDeviceRequest {
            tenant_id: tenant.clone(),
            device_id: "gone".into(),
        })
        .await
        .unwrap();
    // What the device sends after the delete stays.
    let after = track("gone", 5, T0 + DAY_MS);
    store(&mut client, &tenant, &after).await.unwrap();
    store(&mut client, &tenant, &track("sentinel", 1, T0))
        .await
        .unwrap();
    wait_for_track(&mut client, &tenant, "sentinel", 1).await;
    assert_eq!(track_len(&mut client, &tenant, "kept", 30).await, 30);
    testkit::wait_until(
        Duration::from_secs(30),
        "fixes in kafka at the delete were stored after it",
        async || {
            times(&read_track(&mut client, &tenant, "gone").await) == times(&after)
                && daily_total(&mut client, &tenant, "gone").await == 5
        },
    )
    .await;
}

#[tokio::test]
async fn partitions_moving_between_consumers_lose_nothing() {
    // A second consumer joins and leaves the group three times while fixes flow: each time
    // every partition is revoked and assigned again, mostly while the batches are empty.
    let config = config();
    let (_one, mut client) = start(config.clone()).await;
    let tenant = testkit::unique("t");
    let mut devices = Vec::new();
    let mut send = async |client: &mut StorageClient<Channel>, prefix: String| {
        for d in 0..8 {
            let device = format!("{prefix}-{d}");
            store(client, &tenant, &track(&device, 20, T0))
                .await
                .unwrap();
            devices.push(device);
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    for round in 0..3 {
        let (two, _) = start(config.clone()).await;
        send(&mut client, format!("r{round}-joining")).await;
        two.shutdown().await.unwrap();
        send(&mut client, format!("r{round}-left")).await;
    }
    for device in &devices {
        let read = wait_for_track(&mut client, &tenant, device, 20).await;
        assert_eq!(read.len(), 20, "{device}: every fix once");
        assert_eq!(
            daily_total(&mut client, &tenant, device).await,
            20,
            "{device}"
        );
    }
}

#[tokio::test]
async fn broker_down_means_unavailable_within_the_deadline() {
    let mut tansu = Backend::start(Kind::Tansu);
    let mut config = config();
    config.storage.kafka_brokers = tansu.addr();
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    store(&mut client, &tenant, &track("v", 5, T0))
        .await
        .unwrap();
    tansu.stop();
    let started = Instant::now();
    let mut request = tonic::Request::new(StoreRequest {
        tenant_id: tenant.clone(),
        fixes: track("v", 5, T0 + DAY_MS),
    });
    request.set_timeout(Duration::from_secs(2));
    let err = client.store(request).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered within the deadline: {:?}",
        started.elapsed()
    );
}

mod process {
    //! The `storage-service` binary: crashes, replicas, exit codes.

    use super::*;

    struct Process {
        child: tokio::process::Child,
        port: u16,
    }

    impl Process {
        async fn start(config: &Config) -> Self {
            let port = testkit::free_port();
            let s = &config.storage;
            let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_storage-service"))
                .env("SERVER_HOST", "127.0.0.1")
                .env("SERVER_PORT", port.to_string())
                .env("READINESS_INTERVAL", "100ms")
                .env("CLICKHOUSE_URL", &s.clickhouse_url)
                .env("CLICKHOUSE_DATABASE", &s.clickhouse_database)
                .env("KAFKA_BROKERS", &s.kafka_brokers)
                .env("KAFKA_TOPIC", &s.kafka_topic)
                .env("KAFKA_DLQ_TOPIC", &s.kafka_dlq_topic)
                .env("KAFKA_EVENTS_TOPIC", &s.kafka_events_topic)
                .env("KAFKA_GROUP_ID", &s.kafka_group_id)
                .env("KAFKA_PARTITIONS", s.kafka_partitions.to_string())
                .env("KAFKA_SESSION_TIMEOUT", "6s")
                .env("BATCH_MAX_WAIT", "200ms")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let process = Self { child, port };
            testkit::wait_http_status(process.addr(), "/ready", 200, Duration::from_secs(30)).await;
            process
        }

        fn addr(&self) -> std::net::SocketAddr {
            std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
        }

        async fn client(&self) -> StorageClient<Channel> {
            StorageClient::connect(format!("http://{}", self.addr()))
                .await
                .unwrap()
        }

        async fn metric(&self, name: &str) -> f64 {
            let (_, body) = testkit::http_get(self.addr(), "/metrics").await.unwrap();
            body.lines()
                .filter(|line| line.starts_with(name))
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        }
    }

    #[tokio::test]
    async fn sigkill_mid_stream_loses_nothing_acknowledged() {
        let config = config();
        let tenant = testkit::unique("t");
        let fixes = track("v", 4000, T0);
        let mut process = Process::start(&config).await;
        let mut client = process.client().await;
        let mut acknowledged = Vec::new();
        for (n, batch) in fixes.chunks(100).enumerate() {
            if n == 15 {
                // Mid-stream: whatever the consumer held uncommitted must come again.
                process.child.start_kill().unwrap();
                process.child.wait().await.unwrap();
                assert!(
                    store(&mut client, &tenant, batch).await.is_err(),
                    "nobody answers"
                );
                process = Process::start(&config).await;
                client = process.client().await;
            }
            if store(&mut client, &tenant, batch).await.is_ok() {
                acknowledged.extend(times(batch));
            }
        }
        let read = wait_for_track(&mut client, &tenant, "v", acknowledged.len()).await;
        assert_eq!(
            times(&read),
            acknowledged,
            "every acknowledged fix exactly once"
        );
    }

    #[tokio::test]
    async fn sigterm_with_clickhouse_down_exits_within_the_grace() {
        // As reported: ClickHouse stopped, 50 fixes stored, SIGTERM; SHUTDOWN_GRACE is 20 s.
        let mut clickhouse = Backend::start(Kind::ClickHouse);
        let mut config = config();
        config.storage.clickhouse_url = clickhouse.addr();
        let mut process = Process::start(&config).await;
        let mut client = process.client().await;
        let tenant = testkit::unique("t");
        let fixes = track("v", 60, T0);
        // First a batch stored, so the consumer has joined the group and holds the next.
        store(&mut client, &tenant, &fixes[..10]).await.unwrap();
        wait_for_track(&mut client, &tenant, "v", 10).await;
        clickhouse.stop();
        store(&mut client, &tenant, &fixes[10..]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pid = process.child.id().unwrap().to_string();
        let asked = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), process.child.wait())
            .await
            .expect("still running 30 s after SIGTERM")
            .unwrap();
        let took = asked.elapsed();
        eprintln!("storage-service exited {took:?} after SIGTERM with clickhouse down");
        assert!(status.success(), "{status:?}");
        assert!(took < Duration::from_secs(20), "exited after {took:?}");

        clickhouse.restart();
        let process = Process::start(&config).await;
        let mut client = process.client().await;
        let read = wait_for_track(&mut client, &tenant, "v", 60).await;
        assert_eq!(times(&read), times(&fixes), "nothing lost");
    }

    #[tokio::test]
    async fn two_replicas_share_the_partitions() {
        let config = config();
        let one = Process::start(&config).await;
        let two = Process::start(&config).await;
        let tenant = testkit::unique("t");
        let devices: Vec<String> = (0..40).map(|d| format!("v{d}")).collect();
        // Wait until the group has settled with both in it, then spread devices over the partitions.
        testkit::wait_until(
            Duration::from_secs(60),
            "the two replicas never shared the partitions",
            async || {
                one.metric("storage_assigned_partitions").await > 0.0
                    && two.metric("storage_assigned_partitions").await > 0.0
            },
        )
        .await;
        let mut client = one.client().await;
        for device in &devices {
            store(&mut client, &tenant, &track(device, 50, T0))
                .await
                .unwrap();
        }
        for device in &devices {
            let read = wait_for_track(&mut client, &tenant, device, 50).await;
            assert_eq!(read.len(), 50, "{device}: exactly once");
        }
        let (a, b) = (
            one.metric("storage_rows_written_total").await,
            two.metric("storage_rows_written_total").await,
        );
        assert_eq!(a + b, 2000.0, "rows written by the two replicas");
        assert!(a > 0.0 && b > 0.0, "both replicas consumed: {a} + {b}");
    }

    #[tokio::test]
    async fn stopped_while_joining_the_group_leaves_it_usable() {
        let config = config();
        // Ready comes before the group join completes (~half the session timeout on tansu):
        // stop right away, mid-join.
        let mut first = Process::start(&config).await;
        let pid = first.child.id().unwrap().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), first.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{status:?}");
        let second = Process::start(&config).await;
        testkit::wait_until(
            Duration::from_secs(30),
            "the group never assigned partitions again",
            async || second.metric("storage_assigned_partitions").await > 0.0,
        )
        .await;
    }

    #[test]
    fn bad_configuration_exits_64() {
        testkit::assert_bad_config_exits_64(
            std::path::Path::new(env!("CARGO_BIN_EXE_storage-service")),
            &[],
            &[
                (
                    "CLICKHOUSE_URL",
                    "ftp://x:1",
                    "CLICKHOUSE_URL=ftp://x:1: the HTTP interface is needed",
                ),
                ("BATCH_MAX_ROWS", "0", "BATCH_MAX_ROWS=0: out of range"),
                (
                    "KAFKA_TOPIC",
                    "a topic",
                    "KAFKA_TOPIC=a topic: 1 to 249 characters",
                ),
                (
                    "KAFKA_EVENTS_TOPIC",
                    "events/all",
                    "KAFKA_EVENTS_TOPIC=events/all: 1 to 249 characters",
                ),
                (
                    "BATCH_MAX_WAIT",
                    "soon",
                    "BATCH_MAX_WAIT=soon: not a duration",
                ),
                (
                    "CLICKHOUSE_COMPRESSION",
                    "zstd",
                    "CLICKHOUSE_COMPRESSION=zstd: allowed none or lz4",
                ),
            ],
        );
    }
}
