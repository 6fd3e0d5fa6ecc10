//! Throughput of Observe: 1 000-fix batches over 100 devices through a learning-api running
//! in-process against the Redis at `TEST_REDIS_ADDR` (as `scripts/test` starts it).
//!
//! `cargo bench -p learning --bench observe` prints fixes/s and batch latency, first with one
//! batch in flight, then with several clients, each with its own 100 devices.
#![allow(clippy::print_stdout, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use learning::{Config, run};
use testkit::Service;
use tonic::transport::Channel;
use trackmesh_proto::v1::{
    Fix, ObserveRequest, RefinedFix, Verdict, learning_client::LearningClient,
};
use trackmesh_shared::{config::Duration as ConfigDuration, redis::RedisConfig};

const DEVICES: usize = 100;
const BATCH: usize = 1_000;
const WARM_UP_BATCHES: usize = 20;
const BATCHES: usize = 300;
const CLIENTS: usize = 4;
/// Monday 2024-01-01 00:00 UTC.
const T0: i64 = 1_704_067_200_000;
/// Per device: 60 fixes staying at a site, then 20 fixes driving to the next one, every 30 s.
const CYCLE: usize = 80;
const SITES: [(f64, f64); 5] = [
    (0.0, 0.0),
    (0.03, 0.01),
    (0.01, 0.04),
    (-0.02, 0.03),
    (-0.03, -0.01),
];

/// Fix `i` of device `d`: stays of 30 minutes at one of five sites, 10 minutes of travel.
fn fix(prefix: &str, d: usize, i: usize) -> RefinedFix {
    let (cycle, step) = (i / CYCLE, i % CYCLE);
    let site = |c: usize| SITES[(d + c) % SITES.len()];
    let (from, to) = (site(cycle), site(cycle + 1));
    let base = (36.0 + d as f64 * 0.1, -76.0);
    let (dlat, dlon) = if step < 60 {
        // A few metres of deterministic jitter.
        let h = (d * 7919 + i * 104_729) % 1000;
        (
            from.0 + (h as f64 - 500.0) * 4e-7,
            from.1 + ((h * 37) % 1000) as f64 * 4e-7,
        )
    } else {
        let f = (step - 59) as f64 / 21.0;
        (from.0 + (to.0 - from.0) * f, from.1 + (to.1 - from.1) * f)
    };
    RefinedFix {
        fix: Some(Fix {
            device_id: format!("{prefix}-{d}"),
            time_ms: T0 + i as i64 * 30_000,
            lat: base.0 + dlat,
            lon: base.1 + dlon,
            ..Fix::default()
        }),
        verdict: Verdict::Accepted as i32,
        ..RefinedFix::default()
    }
}

/// Batch `b` of a client: the next 10 fixes of each of its 100 devices.
fn batch(prefix: &str, b: usize) -> Vec<RefinedFix> {
    let per_device = BATCH / DEVICES;
    (0..per_device)
        .flat_map(|k| (0..DEVICES).map(move |d| (d, b * per_device + k)))
        .map(|(d, i)| fix(prefix, d, i))
        .collect()
}

/// Sends `count` batches from `first` on; the latency of each.
async fn drive(
    mut client: LearningClient<Channel>,
    tenant: String,
    prefix: String,
    first: usize,
    count: usize,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(count);
    for b in first..first + count {
        let fixes = batch(&prefix, b);
        let started = Instant::now();
        let response = client
            .observe(ObserveRequest {
                tenant_id: tenant.clone(),
                fixes,
            })
            .await
            .unwrap()
            .into_inner();
        latencies.push(started.elapsed());
        assert_eq!(response.observed as usize, BATCH);
    }
    latencies
}

fn report(label: &str, clients: usize, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let fixes = latencies.len() * BATCH;
    println!(
        "observe {label}: {:.0} fixes/s ({fixes} fixes in {:.2} s, {clients} client(s)); \
         batch latency p50 {:.1} ms, p99 {:.1} ms",
        fixes as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        quantile(0.5).as_secs_f64() * 1e3,
        quantile(0.99).as_secs_f64() * 1e3,
    );
}

fn main() {
    let Ok(redis_addr) = std::env::var("TEST_REDIS_ADDR") else {
        println!("observe: TEST_REDIS_ADDR is not set; start Redis (scripts/test does) and set it");
        std::process::exit(2);
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let mut config = Config::for_redis(RedisConfig {
            redis_addr,
            ..RedisConfig::default()
        });
        // Benchmark models need not outlive the run by much.
        config.service.state_ttl = ConfigDuration::from_secs(600);
        let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
        let client = LearningClient::connect(service.url()).await.unwrap();
        let tenant = testkit::unique("bench");

        drive(
            client.clone(),
            tenant.clone(),
            "one".into(),
            0,
            WARM_UP_BATCHES,
        )
        .await;
        let started = Instant::now();
        let latencies = drive(
            client.clone(),
            tenant.clone(),
            "one".into(),
            WARM_UP_BATCHES,
            BATCHES,
        )
        .await;
        report("sequential", 1, started.elapsed(), latencies);

        let started = Instant::now();
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(drive(
                    client.clone(),
                    tenant.clone(),
                    format!("many-{c}"),
                    0,
                    BATCHES / CLIENTS,
                ))
            })
            .collect();
        let mut latencies = Vec::new();
        for task in tasks {
            latencies.extend(task.await.unwrap());
        }
        report("concurrent", CLIENTS, started.elapsed(), latencies);
        service.shutdown().await.unwrap();
    });
}
