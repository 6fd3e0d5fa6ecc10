//! `trackctl load`: a load generator of synthetic moving devices.
//!
//! Each worker owns a disjoint set of devices and sends their fixes in
//! batches, one batch at a time, so every device's times increase from batch
//! to batch. Workers run concurrently; with `--rate` each one paces its
//! batches to its share of the rate, otherwise it sends as fast as the gateway
//! answers. Batch latencies go into an HDR histogram. `--sent` and `--acked`
//! log every fix sent and every fix the gateway acknowledged as stored, for
//! checks against what storage holds (scripts/chaos). `--noop` sends
//! `grpc.health.v1.Health/Check` instead, the same way: the gateway's ceiling for
//! this client, against which single-fix ingest is compared (scripts/bench ingest).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufWriter, Write as _},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::{sync::mpsc, time::MissedTickBehavior};
use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use trackmesh_proto::v1::{Fix, IngestRequest, IngestResponse};

use crate::{
    client::{Authed, Client, RetryPolicy, code_name, status_error},
    query,
    time::now_ms,
    totals::{IngestTotals, thousands},
};

#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub duration: Duration,
    /// Fixes per second in all; `None` = as fast as the gateway answers.
    pub rate: Option<f64>,
    pub prefix: String,
    /// Use the bidirectional IngestStream instead of unary Ingest.
    pub stream: bool,
    /// Delete the generated devices at the end.
    pub cleanup: bool,
    /// Write `device,time_ms` of every fix sent (answered or not) to this file.
    pub sent: Option<PathBuf>,
    /// Write `device,time_ms` of every fix acknowledged as stored to this file: accepted in a
    /// call answered with `stored = true`.
    pub acked: Option<PathBuf>,
}

/// A CSV log of fixes shared by the workers.
#[derive(Clone)]
struct FixLog(Arc<Mutex<BufWriter<File>>>);

impl FixLog {
    fn create(path: &Option<PathBuf>) -> anyhow::Result<Option<Self>> {
        let Some(path) = path else { return Ok(None) };
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut writer = BufWriter::new(file);
        writeln!(writer, "device,time_ms")?;
        Ok(Some(Self(Arc::new(Mutex::new(writer)))))
    }

    /// Appends the fixes of `batch` whose index `keep` accepts.
    fn write(&self, batch: &[(String, i64)], keep: impl Fn(usize) -> bool) -> anyhow::Result<()> {
        let mut writer = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("a fix log writer panicked"))?;
        for (index, (device, time_ms)) in batch.iter().enumerate() {
            if keep(index) {
                writeln!(writer, "{device},{time_ms}")?;
            }
        }
        Ok(())
    }

    fn finish(&self) -> anyhow::Result<()> {
        let mut writer = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("a fix log writer panicked"))?;
        writer.flush().context("writing a fix log")
    }
}

/// Where the workers log what they sent and what was acknowledged.
#[derive(Clone, Default)]
struct Logs {
    sent: Option<FixLog>,
    acked: Option<FixLog>,
}

/// How far behind now the devices' clocks start: room for more than one fix
/// per millisecond per device before times would run ahead of now.
const CLOCK_HEADROOM_MS: i64 = 10 * 60 * 1000;
/// Fastest synthetic device: 30 m/s = 108 km/h, under refinement's 150 km/h.
const MAX_SPEED_MPS: f64 = 30.0;
const METRES_PER_DEGREE: f64 = 111_320.0;

/// A synthetic device moving at a steady speed, turning a little at each fix.
#[derive(Debug, Clone)]
pub struct Device {
    id: String,
    lat: f64,
    lon: f64,
    speed_mps: f64,
    heading_deg: f64,
    last_ms: Option<i64>,
    rng: fastrand::Rng,
}

impl Device {
    pub fn new(id: String, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        Self {
            id,
            // Somewhere in North America, far from 0,0 and the poles.
            lat: 30.0 + rng.f64() * 15.0,
            lon: -120.0 + rng.f64() * 45.0,
            speed_mps: 2.0 + rng.f64() * (MAX_SPEED_MPS - 2.0),
            heading_deg: rng.f64() * 360.0,
            last_ms: None,
            rng,
        }
    }

    /// The next fix at (about) `now_ms`: strictly later than the previous one,
    /// moved by speed × elapsed time.
    pub fn next_fix(&mut self, now_ms: i64) -> Fix {
        let time_ms = match self.last_ms {
            Some(last) => (last + 1).max(now_ms - CLOCK_HEADROOM_MS),
            None => now_ms - CLOCK_HEADROOM_MS,
        };
        if let Some(last) = self.last_ms {
            let metres = self.speed_mps * (time_ms - last) as f64 / 1000.0;
            let heading = self.heading_deg.to_radians();
            self.lat += metres * heading.cos() / METRES_PER_DEGREE;
            self.lon += metres * heading.sin() / (METRES_PER_DEGREE * self.lat.to_radians().cos());
            self.heading_deg = (self.heading_deg + self.rng.f64() * 10.0 - 5.0).rem_euclid(360.0);
            // Turn back before leaving the region (or reaching the poles).
            if !(20.0..55.0).contains(&self.lat) {
                self.heading_deg = (self.heading_deg + 180.0).rem_euclid(360.0);
            }
        }
        self.last_ms = Some(time_ms);
        Fix {
            device_id: self.id.clone(),
            time_ms,
            lat: self.lat,
            lon: self.lon,
            accuracy_m: Some(5.0),
            speed_mps: Some(self.speed_mps as f32),
            heading_deg: Some(self.heading_deg as f32),
            altitude_m: None,
        }
    }

    /// How far the device's clock is ahead of now.
    fn ahead_ms(&self, now_ms: i64) -> i64 {
        self.last_ms.map_or(0, |last| last - now_ms)
    }
}

#[derive(Debug, Serialize)]
pub struct LatencyMs {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyMs {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            mean: histogram.mean() / 1000.0,
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub devices: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub stream: bool,
    /// No-op calls (gRPC health checks) instead of Ingest.
    pub noop: bool,
    pub elapsed_s: f64,
    /// Answered calls per second (for `--batch 1`, equal to fixes/s).
    pub calls_per_s: f64,
    /// Fixes in answered batches per second.
    pub fixes_per_s: f64,
    pub accepted_per_s: f64,
    #[serde(flatten)]
    pub totals: IngestTotals,
    /// Failed calls by gRPC code (not retried: a load test measures them).
    pub errors: BTreeMap<String, u64>,
    /// Failed calls by `CODE: message` (the first few distinct ones), to tell failures apart.
    pub error_messages: BTreeMap<String, u64>,
    /// Latency of answered batches, milliseconds.
    pub latency_ms: LatencyMs,
    /// Largest lead of a device's clock over now at the end (should be ≤ 0).
    pub max_clock_lead_ms: i64,
}

struct WorkerResult {
    totals: IngestTotals,
    errors: BTreeMap<String, u64>,
    error_messages: BTreeMap<String, u64>,
    histogram: Histogram<u64>,
    max_clock_lead_ms: i64,
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load; with `noop`, calls go to this health client instead of Ingest.
pub async fn run(
    client: Client,
    noop: Option<HealthClient<Authed>>,
    options: Options,
) -> anyhow::Result<Report> {
    let workers = options.concurrency.clamp(1, options.devices.max(1));
    let mut tasks = Vec::new();
    let started = Instant::now();
    let deadline = started + options.duration;
    let base_seed = fastrand::u64(..);
    let logs = Logs {
        sent: FixLog::create(&options.sent)?,
        acked: FixLog::create(&options.acked)?,
    };
    for w in 0..workers {
        let devices: Vec<Device> = (w..options.devices)
            .step_by(workers)
            .map(|i| {
                Device::new(
                    format!("{}-{i:05}", options.prefix),
                    base_seed.wrapping_add(i as u64),
                )
            })
            .collect();
        // Each worker's share of the rate, as a period between its batches.
        let period = options.rate.map(|rate| {
            Duration::from_secs_f64(options.batch as f64 * workers as f64 / rate.max(1e-6))
        });
        tasks.push(tokio::spawn(worker(
            client.clone(),
            noop.clone(),
            devices,
            options.clone(),
            period,
            deadline,
            logs.clone(),
        )));
    }
    let mut totals = IngestTotals::default();
    let mut errors = BTreeMap::new();
    let mut error_messages = BTreeMap::new();
    let mut histogram = new_histogram();
    let mut max_clock_lead_ms = i64::MIN;
    for task in tasks {
        let result = task.await.context("a load worker panicked")??;
        merge_totals(&mut totals, &result.totals);
        for (code, n) in result.errors {
            *errors.entry(code).or_default() += n;
        }
        for (message, n) in result.error_messages {
            add_error_message(&mut error_messages, message, n);
        }
        histogram
            .add(&result.histogram)
            .context("merging histograms")?;
        max_clock_lead_ms = max_clock_lead_ms.max(result.max_clock_lead_ms);
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    for log in [&logs.sent, &logs.acked].into_iter().flatten() {
        log.finish()?;
    }
    if options.cleanup {
        let ids: Vec<String> = (0..options.devices)
            .map(|i| format!("{}-{i:05}", options.prefix))
            .collect();
        query::delete_quietly(&client, RetryPolicy::default(), &ids).await?;
        eprintln!("deleted the {} generated devices", ids.len());
    }
    Ok(Report {
        devices: options.devices,
        batch: options.batch,
        concurrency: workers,
        rate: options.rate,
        stream: options.stream,
        noop: noop.is_some(),
        elapsed_s,
        calls_per_s: totals.batches as f64 / elapsed_s.max(1e-9),
        fixes_per_s: totals.fixes_sent as f64 / elapsed_s.max(1e-9),
        accepted_per_s: totals.accepted as f64 / elapsed_s.max(1e-9),
        totals,
        errors,
        error_messages,
        latency_ms: LatencyMs::from_histogram(&histogram),
        max_clock_lead_ms,
    })
}

/// Distinct failure messages kept per run: messages can carry details that vary.
const MAX_ERROR_MESSAGES: usize = 20;

/// A message with its numbers (retry delays, addresses) as `N`, so alike failures group.
fn without_numbers(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_number = false;
    for c in message.chars() {
        let digit = c.is_ascii_digit() || (in_number && c == '.');
        if digit && !in_number {
            out.push('N');
        } else if !digit {
            out.push(c);
        }
        in_number = digit;
    }
    out
}

fn add_error_message(messages: &mut BTreeMap<String, u64>, message: String, n: u64) {
    if messages.len() < MAX_ERROR_MESSAGES || messages.contains_key(&message) {
        *messages.entry(message).or_default() += n;
    }
}

fn merge_totals(into: &mut IngestTotals, from: &IngestTotals) {
    into.fixes_sent += from.fixes_sent;
    into.batches += from.batches;
    into.accepted += from.accepted;
    into.rejected += from.rejected;
    for (verdict, n) in &from.rejected_by_verdict {
        *into.rejected_by_verdict.entry(verdict.clone()).or_default() += n;
    }
    into.replayed += from.replayed;
    into.recovered += from.recovered;
    into.batches_stored += from.batches_stored;
    into.fixes_stored += from.fixes_stored;
    into.learning_failures += from.learning_failures;
}

/// Sends batches over unary Ingest, or over one IngestStream reopened after an error.
struct Sender {
    client: Client,
    noop: Option<HealthClient<Authed>>,
    stream: Option<(
        mpsc::Sender<IngestRequest>,
        tonic::Streaming<IngestResponse>,
    )>,
    use_stream: bool,
}

impl Sender {
    async fn send(&mut self, request: IngestRequest) -> Result<IngestResponse, Status> {
        if let Some(health) = &mut self.noop {
            // Counted as a stored batch of nothing: only the calls and latencies matter.
            health.check(HealthCheckRequest::default()).await?;
            return Ok(IngestResponse {
                stored: true,
                learning_ok: true,
                ..IngestResponse::default()
            });
        }
        if !self.use_stream {
            return self
                .client
                .ingest(request)
                .await
                .map(tonic::Response::into_inner);
        }
        if self.stream.is_none() {
            let (tx, rx) = mpsc::channel(1);
            let responses = self
                .client
                .ingest_stream(tokio_stream_from(rx))
                .await?
                .into_inner();
            self.stream = Some((tx, responses));
        }
        let Some((tx, responses)) = &mut self.stream else {
            return Err(Status::internal("no stream"));
        };
        let result = match tx.send(request).await {
            Err(_) => Err(Status::unavailable("the ingest stream closed")),
            Ok(()) => match responses.message().await {
                Ok(Some(response)) => Ok(response),
                Ok(None) => Err(Status::unavailable("the ingest stream ended")),
                Err(status) => Err(status),
            },
        };
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

/// A receiver as the request stream of a client-streaming call.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<IngestRequest>,
) -> impl futures::Stream<Item = IngestRequest> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn worker(
    client: Client,
    noop: Option<HealthClient<Authed>>,
    mut devices: Vec<Device>,
    options: Options,
    period: Option<Duration>,
    deadline: Instant,
    logs: Logs,
) -> anyhow::Result<WorkerResult> {
    let mut result = WorkerResult {
        totals: IngestTotals::default(),
        errors: BTreeMap::new(),
        error_messages: BTreeMap::new(),
        histogram: new_histogram(),
        max_clock_lead_ms: i64::MIN,
    };
    let mut pacing = period.map(|period| {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
        interval
    });
    let mut sender = Sender {
        client,
        noop,
        stream: None,
        use_stream: options.stream,
    };
    let mut next_device = 0;
    let mut sequence = 0;
    while Instant::now() < deadline {
        if let Some(pacing) = &mut pacing {
            tokio::select! {
                _ = pacing.tick() => {}
                () = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        let now = now_ms();
        let batch = if sender.noop.is_some() {
            0
        } else {
            options.batch
        };
        let fixes: Vec<Fix> = (0..batch)
            .map(|_| {
                let fix = devices[next_device].next_fix(now);
                next_device = (next_device + 1) % devices.len();
                fix
            })
            .collect();
        sequence += 1;
        let count = fixes.len();
        let keys: Vec<(String, i64)> = if logs.sent.is_some() || logs.acked.is_some() {
            fixes
                .iter()
                .map(|f| (f.device_id.clone(), f.time_ms))
                .collect()
        } else {
            Vec::new()
        };
        // Logged before the call: a fix may be stored even if its call fails.
        if let Some(log) = &logs.sent {
            log.write(&keys, |_| true)?;
        }
        let sent = Instant::now();
        match sender.send(IngestRequest { fixes, sequence }).await {
            Ok(response) => {
                let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                result.histogram.saturating_record(micros.max(1));
                result.totals.add(count, &response);
                if let (Some(log), true) = (&logs.acked, response.stored) {
                    let rejected: BTreeSet<usize> = response
                        .rejections
                        .iter()
                        .map(|r| r.index as usize)
                        .collect();
                    log.write(&keys, |index| !rejected.contains(&index))?;
                }
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument
                ) =>
            {
                return Err(status_error("ingest failed", &status));
            }
            Err(status) => {
                *result
                    .errors
                    .entry(code_name(status.code()).to_owned())
                    .or_default() += 1;
                let message = format!(
                    "{}: {}",
                    code_name(status.code()),
                    without_numbers(status.message())
                );
                add_error_message(&mut result.error_messages, message, 1);
                // Do not spin on a gateway that is down.
                if status.code() == Code::Unavailable {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    let now = now_ms();
    result.max_clock_lead_ms = devices
        .iter()
        .map(|d| d.ahead_ms(now))
        .max()
        .unwrap_or(i64::MIN);
    Ok(result)
}

pub fn print_report(report: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let t = &report.totals;
    let mode = match report.rate {
        Some(rate) => format!("target {} fixes/s", thousands(rate as u64)),
        None => "max throughput".to_owned(),
    };
    if report.noop {
        writeln!(
            out,
            "load: no-op calls (grpc.health.v1.Health/Check), concurrency {}, {mode}",
            report.concurrency
        )?;
        writeln!(
            out,
            "{} calls in {:.1}s: {} calls/s",
            thousands(t.batches),
            report.elapsed_s,
            thousands(report.calls_per_s as u64)
        )?;
    } else {
        writeln!(
            out,
            "load: {} devices, batches of {}, concurrency {}, {mode}{}",
            report.devices,
            report.batch,
            report.concurrency,
            if report.stream { ", IngestStream" } else { "" }
        )?;
    }
    if !report.noop {
        writeln!(
            out,
            "sent {} fixes in {} batches in {:.1}s: {} fixes/s ({} accepted/s)",
            thousands(t.fixes_sent),
            thousands(t.batches),
            report.elapsed_s,
            thousands(report.fixes_per_s as u64),
            thousands(report.accepted_per_s as u64)
        )?;
        for line in t.verdict_lines() {
            writeln!(out, "{line}")?;
        }
    }
    if !report.errors.is_empty() {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        writeln!(out, "  failed calls: {}", errors.join(", "))?;
        for (message, n) in &report.error_messages {
            writeln!(out, "    {n:>8}  {message}")?;
        }
    }
    let l = &report.latency_ms;
    writeln!(
        out,
        "batch latency (ms): p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  mean {:.2}  (n = {})",
        l.p50,
        l.p90,
        l.p99,
        l.max,
        l.mean,
        thousands(l.count)
    )?;
    if report.max_clock_lead_ms > 4 * 60 * 1000 {
        writeln!(
            out,
            "warning: device clocks ran {}s ahead of now (more than 1000 fixes/s per device); use more --devices",
            report.max_clock_lead_ms / 1000
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Haversine distance in metres, as refinement computes it.
    fn haversine_m(a: &Fix, b: &Fix) -> f64 {
        let (la1, la2) = (a.lat.to_radians(), b.lat.to_radians());
        let (dlat, dlon) = (la2 - la1, (b.lon - a.lon).to_radians());
        let h = (dlat / 2.0).sin().powi(2) + la1.cos() * la2.cos() * (dlon / 2.0).sin().powi(2);
        2.0 * 6_371_008.8 * h.sqrt().asin()
    }

    #[test]
    fn synthetic_fixes_are_plausible() {
        let now = now_ms();
        for seed in 0..20 {
            let mut device = Device::new(format!("d{seed}"), seed);
            let mut previous: Option<Fix> = None;
            // Many fixes in the same millisecond, then some seconds apart.
            for step in 0..2000 {
                let at = if step < 1000 {
                    now
                } else {
                    now + (step - 1000) * 1500
                };
                let fix = device.next_fix(at);
                assert!(
                    fix.lat.abs() < 90.0
                        && fix.lon.abs() < 180.0
                        && (fix.lat, fix.lon) != (0.0, 0.0)
                );
                assert!(
                    fix.time_ms <= at + 1000,
                    "times stay near now, never in the future"
                );
                if let Some(prev) = &previous {
                    assert!(fix.time_ms > prev.time_ms, "times increase");
                    let hours = (fix.time_ms - prev.time_ms) as f64 / 3_600_000.0;
                    let kmh = haversine_m(prev, &fix) / 1000.0 / hours;
                    assert!(kmh < 120.0, "{kmh} km/h");
                }
                previous = Some(fix);
            }
        }
    }

    #[test]
    fn failure_messages_group_without_their_numbers() {
        assert_eq!(
            without_numbers("storage: breaker open, retry in 22.43s; 127.0.0.1:50053"),
            "storage: breaker open, retry in Ns; N:N"
        );
        let mut messages = BTreeMap::new();
        for i in 0..30 {
            add_error_message(&mut messages, format!("m{}", i % 25), 1);
        }
        assert_eq!(messages.len(), MAX_ERROR_MESSAGES);
        assert_eq!(messages["m0"], 2);
    }

    #[test]
    fn latency_percentiles_in_milliseconds() {
        let mut histogram = new_histogram();
        for us in 1..=1000u64 {
            histogram.record(us * 1000).unwrap();
        }
        let latency = LatencyMs::from_histogram(&histogram);
        assert_eq!(latency.count, 1000);
        assert!((latency.p50 - 500.0).abs() < 1.0, "{}", latency.p50);
        assert!((latency.p99 - 990.0).abs() < 1.0, "{}", latency.p99);
        assert!((latency.max - 1000.0).abs() < 1.0, "{}", latency.max);
    }
}
