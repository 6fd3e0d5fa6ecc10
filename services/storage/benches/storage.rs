//! Benchmark (not a test), against the real tansu and ClickHouse (`scripts/bench storage`):
//!
//! 1. rows/s from the topic into ClickHouse: 1M fixes wait in the topic (100 devices, 10
//!    fixes per message, as Store writes them), then the storage-service binary starts and
//!    drains them; timed from its first insert to the last row;
//! 2. `clickhouse-client` inserting the same 1M rows as TSV into the same table, same run;
//! 3. QueryTrack of one device with 1M fixes: time, and the server's peak RSS.
#![allow(clippy::print_stdout)]

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::{StreamExt as _, future::join_all};
use prost::Message as _;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use trackmesh_proto::v1::{
    Fix, QueryTrackRequest, RefinedFix, Verdict, storage_client::StorageClient,
};
use trackmesh_shared::fix_messages::FixBatch;

const ROWS: usize = 1_000_000;
const DEVICES: usize = 100;
const PER_MESSAGE: usize = 10;
const T0: i64 = 1_750_000_000_000;

struct Env {
    name: String,
    tenant: String,
    port: u16,
    clickhouse: String,
    clickhouse_tcp: String,
    brokers: String,
}

#[tokio::main]
async fn main() {
    let name = testkit::unique("bench");
    let env = Env {
        tenant: "bench".into(),
        port: testkit::free_port(),
        clickhouse: testkit::clickhouse_url(),
        clickhouse_tcp: testkit::env("TEST_CLICKHOUSE_TCP_PORT"),
        brokers: testkit::kafka_brokers(),
        name,
    };

    // Schema and topic come from the service itself.
    println!("setting up schema and topic");
    let mut service = start(&env).await;
    stop(&mut service);
    println!("producing {ROWS} fixes");

    let fixes = fixes_of_devices();
    let produced = Instant::now();
    produce(&env, &fixes).await;
    let produce_secs = produced.elapsed().as_secs_f64();

    println!("consuming");
    let mut service = start(&env).await;
    let (first_at, first_rows) = wait_rows(&env, 1).await;
    let (done_at, _) = wait_rows(&env, ROWS as u64).await;
    let service_rate = (ROWS as u64 - first_rows) as f64 / (done_at - first_at).as_secs_f64();
    stop(&mut service);

    let rows_tsv = tsv(
        &env.tenant,
        fixes.iter().map(|(device, fix)| (device.as_str(), fix)),
    );
    let client_secs = clickhouse_client_insert(&env, &rows_tsv);
    drop(rows_tsv);
    let client_rate = ROWS as f64 / client_secs;

    // One device with a million fixes, read back through QueryTrack by a fresh process.
    let big: Vec<(String, RefinedFix)> = (0..ROWS)
        .map(|i| ("big".to_owned(), refined("big", i)))
        .collect();
    clickhouse_client_insert(
        &env,
        &tsv(&env.tenant, big.iter().map(|(d, f)| (d.as_str(), f))),
    );
    drop(big);
    let mut service = start(&env).await;
    let rss_before = rss_kib(&service, "VmRSS");
    let mut client = StorageClient::connect(format!("http://127.0.0.1:{}", env.port))
        .await
        .expect("connect");
    let started = Instant::now();
    let mut stream = client
        .query_track(QueryTrackRequest {
            tenant_id: env.tenant.clone(),
            device_id: "big".into(),
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    let mut read = 0;
    while let Some(chunk) = stream.next().await {
        read += chunk.expect("chunk").fixes.len();
    }
    let query_secs = started.elapsed().as_secs_f64();
    let rss_peak = rss_kib(&service, "VmHWM");
    stop(&mut service);
    assert_eq!(read, ROWS, "the whole track came back");

    println!(
        "storage benchmark: {ROWS} fixes, {DEVICES} devices, {PER_MESSAGE} fixes per Kafka message"
    );
    println!(
        "  produce to tansu (test setup)   {:>10.0} fixes/s",
        ROWS as f64 / produce_secs
    );
    println!("  topic → clickhouse (service)    {service_rate:>10.0} rows/s");
    println!("  clickhouse-client TSV insert    {client_rate:>10.0} rows/s");
    println!(
        "  ratio service / client          {:>10.2}",
        service_rate / client_rate
    );
    println!(
        "  QueryTrack of 1M fixes          {query_secs:>10.2} s ({:.0} fixes/s)",
        ROWS as f64 / query_secs
    );
    println!(
        "  server RSS before / peak        {:>6.1} MiB / {:.1} MiB",
        rss_before as f64 / 1024.0,
        rss_peak as f64 / 1024.0
    );
}

fn refined(device: &str, i: usize) -> RefinedFix {
    RefinedFix {
        fix: Some(Fix {
            device_id: device.into(),
            time_ms: T0 + i as i64 * 1000,
            lat: 36.8 + (i % 1000) as f64 * 0.0001,
            lon: -76.3 - (i / 1000) as f64 * 0.0001,
            speed_mps: Some(5.0),
            heading_deg: Some(90.0),
            ..Fix::default()
        }),
        verdict: Verdict::Accepted as i32,
        segment: 1,
        distance_m: 11.1,
        dt_ms: 1000,
        speed_kmh: 40.0,
        ..RefinedFix::default()
    }
}

/// 10 000 fixes for each of 100 devices.
fn fixes_of_devices() -> Vec<(String, RefinedFix)> {
    (0..ROWS)
        .map(|n| {
            let device = format!("vessel-{}", n % DEVICES);
            let fix = refined(&device, n / DEVICES);
            (device, fix)
        })
        .collect()
}

async fn produce(env: &Env, fixes: &[(String, RefinedFix)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let topic = format!("{}.fixes", env.name);
    // Messages as Store makes them: one per device and call, 10 fixes each.
    let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
    let mut by_device: std::collections::BTreeMap<&str, Vec<RefinedFix>> = Default::default();
    for (device, fix) in fixes {
        let pending = by_device.entry(device).or_default();
        pending.push(fix.clone());
        if pending.len() == PER_MESSAGE {
            let batch = FixBatch {
                tenant_id: env.tenant.clone(),
                device_id: device.clone(),
                fixes: std::mem::take(pending)
                    .into_iter()
                    .map(Into::into)
                    .collect(),
            };
            messages.push((format!("{}/{device}", env.tenant), batch.encode_to_vec()));
        }
    }
    let headers = OwnedHeaders::new().insert(Header {
        key: "schema-version",
        value: Some("1"),
    });
    for chunk in messages.chunks(10_000) {
        let deliveries = chunk.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(&topic)
                    .key(key)
                    .payload(payload)
                    .headers(headers.clone()),
                Duration::from_secs(60),
            )
        });
        for delivery in join_all(deliveries).await {
            delivery.expect("delivered");
        }
    }
}

async fn start(env: &Env) -> tokio::process::Child {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_storage-service"))
        .env("SERVER_HOST", "127.0.0.1")
        .env("SERVER_PORT", env.port.to_string())
        .env("CLICKHOUSE_URL", &env.clickhouse)
        .env("CLICKHOUSE_DATABASE", &env.name)
        .env("KAFKA_BROKERS", &env.brokers)
        .env("KAFKA_TOPIC", format!("{}.fixes", env.name))
        .env("KAFKA_DLQ_TOPIC", format!("{}.dlq", env.name))
        .env("KAFKA_EVENTS_TOPIC", format!("{}.events", env.name))
        .env("KAFKA_GROUP_ID", &env.name)
        .env("KAFKA_PARTITIONS", "4")
        .env("KAFKA_SESSION_TIMEOUT", "6s")
        .env("READINESS_INTERVAL", "100ms")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("storage-service");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], env.port));
    testkit::wait_http_status(addr, "/ready", 200, Duration::from_secs(60)).await;
    child
}

fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    // Drained and committed before the next step reads anything.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls until the table has at least `n` rows: when, and how many then.
async fn wait_rows(env: &Env, n: u64) -> (Instant, u64) {
    let client = clickhouse::Client::default()
        .with_url(&env.clickhouse)
        .with_validation(false);
    loop {
        let rows: u64 = client
            .query(&format!("SELECT count() FROM {}.fixes", env.name))
            .fetch_one()
            .await
            .expect("count");
        if rows >= n {
            return (Instant::now(), rows);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tsv<'a>(tenant: &str, rows: impl Iterator<Item = (&'a str, &'a RefinedFix)>) -> Vec<u8> {
    let mut out = String::with_capacity(ROWS * 130);
    let opt = |v: Option<f32>| v.map_or("\\N".to_owned(), |v| v.to_string());
    // The service also writes each row's Kafka partition and offset: so does the baseline.
    for (offset, (device, refined)) in rows.enumerate() {
        let fix = refined.fix.as_ref().expect("fix");
        let _ = writeln!(
            out,
            "{tenant}\t{device}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t0\t{offset}",
            fix.time_ms,
            fix.lat,
            fix.lon,
            opt(fix.accuracy_m),
            opt(fix.speed_mps),
            opt(fix.heading_deg),
            opt(fix.altitude_m),
            refined.segment,
            refined.distance_m,
            refined.dt_ms,
            refined.speed_kmh,
            u8::from(refined.reanchored),
        );
    }
    out.into_bytes()
}

/// Seconds `clickhouse-client` takes to insert `tsv` into the fixes table.
fn clickhouse_client_insert(env: &Env, tsv: &[u8]) -> f64 {
    let started = Instant::now();
    let mut child = Command::new("clickhouse-client")
        .args(["--host", "127.0.0.1", "--port", &env.clickhouse_tcp])
        .args([
            "--query",
            &format!("INSERT INTO {}.fixes FORMAT TabSeparated", env.name),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("clickhouse-client");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(tsv)
        .expect("write");
    let status = child.wait().expect("clickhouse-client");
    assert!(status.success(), "clickhouse-client failed");
    started.elapsed().as_secs_f64()
}

/// A field of /proc/<pid>/status, KiB.
fn rss_kib(child: &tokio::process::Child, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id().expect("running")))
        .expect("status");
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("field")
}
