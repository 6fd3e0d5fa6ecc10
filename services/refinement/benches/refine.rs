//! Benchmark (not a test): fixes/s through one refinement instance with 1 000-fix batches
//! over 100 devices, next to the raw Redis ceiling measured in the same run: the same two
//! pipelined round trips per batch (read 100 states, compare-and-set 100 states with their
//! replay logs) issued directly, without gRPC or decisions.
//!
//! Run with `scripts/bench refinement` (it starts Redis); `BENCH_SECONDS` sets the length.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use refinement::{Config, run};
use trackmesh_proto::v1::{Fix, RefineRequest, refinement_client::RefinementClient};
use trackmesh_shared::redis::{Log, Redis, RedisConfig, Write};

const DEVICES: usize = 100;
const PER_DEVICE: usize = 10;
/// Clients with a batch in flight at once, each with its own 100 devices.
const CLIENTS: usize = 4;

#[tokio::main]
async fn main() {
    let redis_addr = testkit::redis_addr();
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let duration = Duration::from_secs(seconds);
    let redis = RedisConfig {
        redis_addr: redis_addr.clone(),
        ..RedisConfig::default()
    };

    let service = testkit::Service::spawn(|listener, shutdown| {
        run(Config::for_redis(redis.clone()), listener, shutdown)
    })
    .await;
    let tenant = testkit::unique("bench");
    let mut workers = Vec::new();
    for client_no in 0..CLIENTS {
        let mut client = RefinementClient::connect(service.url())
            .await
            .expect("connect");
        let tenant = tenant.clone();
        workers.push(tokio::spawn(async move {
            let (mut fixes, mut batches, mut latencies) = (0usize, 0u64, Vec::new());
            let start = Instant::now();
            while start.elapsed() < duration {
                let batch = batch(client_no, batches);
                let sent = Instant::now();
                let response = client
                    .refine(RefineRequest {
                        tenant_id: tenant.clone(),
                        fixes: batch,
                    })
                    .await
                    .expect("refine");
                latencies.push(sent.elapsed());
                fixes += response.get_ref().results.len();
                batches += 1;
            }
            (fixes, start.elapsed(), latencies)
        }));
    }
    let (service_rate, p50, p99) = summarize(workers).await;

    // The ceiling: the same round trips and payload sizes straight to Redis.
    let direct = Redis::connect(&redis.target(), Duration::from_secs(2)).expect("redis");
    let state = vec![7u8; 200];
    let log = vec![1u8; PER_DEVICE * 45];
    let mut workers = Vec::new();
    for client_no in 0..CLIENTS {
        let (direct, state, log) = (direct.clone(), state.clone(), log.clone());
        let tenant = testkit::unique("ceiling");
        workers.push(tokio::spawn(async move {
            let keys: Vec<String> = (0..DEVICES)
                .map(|d| format!("bench:{{{tenant}/{client_no}-{d}}}"))
                .collect();
            let (mut fixes, mut latencies) = (0usize, Vec::new());
            let start = Instant::now();
            while start.elapsed() < duration {
                let sent = Instant::now();
                let versions = direct.read(&keys).await.expect("read");
                let writes: Vec<Write> = keys
                    .iter()
                    .zip(&versions)
                    .map(|(key, current)| Write {
                        key: key.clone(),
                        expected: current.version,
                        data: state.clone(),
                        ttl: Duration::from_secs(600),
                        log: Some(Log {
                            key: format!("{key}:log"),
                            append: log.clone(),
                            max_bytes: 45_000,
                        }),
                    })
                    .collect();
                direct.write(&writes).await.expect("write");
                latencies.push(sent.elapsed());
                fixes += DEVICES * PER_DEVICE;
            }
            (fixes, start.elapsed(), latencies)
        }));
    }
    let (ceiling_rate, ceiling_p50, ceiling_p99) = summarize(workers).await;

    println!(
        "refinement benchmark: {CLIENTS} clients, batches of {} fixes over {DEVICES} devices, {seconds}s each",
        DEVICES * PER_DEVICE
    );
    println!("  refinement-api       {service_rate:>10.0} fixes/s   batch p50 {p50:?} p99 {p99:?}");
    println!(
        "  redis ceiling        {ceiling_rate:>10.0} fixes/s   batch p50 {ceiling_p50:?} p99 {ceiling_p99:?}"
    );
    println!(
        "  ratio                {:>10.2}",
        service_rate / ceiling_rate
    );

    retry_storm(&service, &tenant).await;
}

/// A retry storm: 10 000 devices with full replay logs (1 000 accepted fixes each) re-send
/// one old fix each in one batch. Reports the process's peak memory during the retry; whole
/// logs would be 10 000 × 45 kB read at once.
async fn retry_storm(service: &testkit::Service, tenant: &str) {
    const STORM_DEVICES: usize = 10_000;
    const LOGGED: usize = 1_000;
    let mut client = RefinementClient::connect(service.url())
        .await
        .expect("connect")
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let start = now_ms() - 20 * 86_400_000;
    let fix = |device: usize, i: usize| Fix {
        device_id: format!("storm-{device}"),
        time_ms: start + i as i64 * 10_000,
        lat: 40.0 + device as f64 * 0.000_01 + i as f64 * 0.000_1,
        lon: -74.0,
        ..Fix::default()
    };
    let filled = Instant::now();
    for chunk in (0..STORM_DEVICES).collect::<Vec<_>>().chunks(10) {
        let fixes: Vec<Fix> = chunk
            .iter()
            .flat_map(|&device| (0..LOGGED).map(move |i| fix(device, i)))
            .collect();
        client
            .refine(RefineRequest {
                tenant_id: tenant.to_owned(),
                fixes,
            })
            .await
            .expect("fill");
    }
    let filled = filled.elapsed();
    // Reset the peak (VmHWM) so that it measures the retry alone.
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
    let before = peak_rss_kib();
    let retry: Vec<Fix> = (0..STORM_DEVICES).map(|device| fix(device, 10)).collect();
    let sent = Instant::now();
    let response = client
        .refine(RefineRequest {
            tenant_id: tenant.to_owned(),
            fixes: retry,
        })
        .await
        .expect("retry")
        .into_inner();
    let took = sent.elapsed();
    let replays = response.results.iter().filter(|r| r.replay).count();
    println!(
        "retry storm: {STORM_DEVICES} devices x {LOGGED} logged fixes (filled in {filled:?}); one old fix each re-sent in one batch: {replays} replays in {took:?}, peak RSS +{} MiB",
        (peak_rss_kib().saturating_sub(before)) / 1024
    );
}

/// This process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Batch `n` of a client: 10 fixes for each of its 100 devices, moving plausibly, times
/// counting up from ten days ago so nothing is FUTURE.
fn batch(client_no: usize, n: u64) -> Vec<Fix> {
    let start = now_ms() - 10 * 86_400_000;
    let mut fixes = Vec::with_capacity(DEVICES * PER_DEVICE);
    for d in 0..DEVICES {
        for i in 0..PER_DEVICE {
            let step = n as usize * PER_DEVICE + i;
            fixes.push(Fix {
                device_id: format!("{client_no}-{d}"),
                time_ms: start + step as i64 * 10_000,
                lat: 40.0 + d as f64 * 0.01 + step as f64 * 0.000_1,
                lon: -74.0,
                ..Fix::default()
            });
        }
    }
    fixes
}

type Run = (usize, Duration, Vec<Duration>);

async fn summarize(workers: Vec<tokio::task::JoinHandle<Run>>) -> (f64, Duration, Duration) {
    let mut rate = 0.0;
    let mut latencies = Vec::new();
    for worker in workers {
        let (fixes, elapsed, mut l) = worker.await.expect("worker");
        rate += fixes as f64 / elapsed.as_secs_f64();
        latencies.append(&mut l);
    }
    latencies.sort();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    (rate, at(0.5), at(0.99))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
