//! `trackctl replay FILE…`: sends the fixes of CSV files through the gateway.
//!
//! A reader thread parses the files and routes each fix to a lane chosen by a
//! hash of its device id; each lane cuts its fixes into batches and sends them
//! one after the other, while the lanes run concurrently. So a device's fixes
//! reach the gateway in file order (all of them travel in the same lane), and
//! different devices go in parallel.

use std::{
    collections::{BTreeMap, HashSet},
    fs::File,
    io::{BufReader, IsTerminal},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use trackmesh_proto::v1::{Fix, IngestRequest};

use crate::{
    client::{Client, RetryPolicy, status_error},
    csv_input::{FixReader, Format},
    totals::{IngestTotals, thousands},
};

#[derive(Debug, Clone)]
pub struct Options {
    pub files: Vec<PathBuf>,
    pub batch: usize,
    pub concurrency: usize,
    pub quiet: bool,
    pub dry_run: bool,
}

/// Routes fixes to `count` lanes by device and cuts each lane into batches.
#[derive(Debug)]
pub struct Lanes {
    pending: Vec<Vec<Fix>>,
    batch: usize,
}

impl Lanes {
    pub fn new(count: usize, batch: usize) -> Self {
        Self {
            pending: vec![Vec::new(); count.max(1)],
            batch: batch.max(1),
        }
    }

    /// The lane of a device: FNV-1a of its id, stable across runs and platforms.
    pub fn lane_of(&self, device_id: &str) -> usize {
        let hash = device_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        (hash % self.pending.len() as u64) as usize
    }

    /// Adds a fix; returns its lane's batch when that is full.
    pub fn push(&mut self, fix: Fix) -> Option<(usize, Vec<Fix>)> {
        let lane = self.lane_of(&fix.device_id);
        let pending = &mut self.pending[lane];
        pending.push(fix);
        (pending.len() >= self.batch).then(|| (lane, std::mem::take(pending)))
    }

    /// The partial batches left at the end.
    pub fn drain(&mut self) -> Vec<(usize, Vec<Fix>)> {
        self.pending
            .iter_mut()
            .enumerate()
            .filter(|(_, fixes)| !fixes.is_empty())
            .map(|(lane, fixes)| (lane, std::mem::take(fixes)))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileSummary {
    pub path: String,
    pub format: Format,
    /// Rows that became fixes.
    pub fixes: u64,
    /// Rows that could not be parsed (skipped, reported on stderr).
    pub bad_rows: u64,
    pub devices: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub files: Vec<FileSummary>,
    #[serde(flatten)]
    pub totals: IngestTotals,
    /// Calls retried after UNAVAILABLE or RESOURCE_EXHAUSTED.
    pub retries: u64,
    /// Batches refused with INVALID_ARGUMENT (not retried).
    pub failed_batches: u64,
    pub failed_fixes: u64,
    pub elapsed_s: f64,
    pub fixes_per_s: f64,
}

/// State shared by the reader, the lanes and the progress line.
#[derive(Debug, Default)]
struct Shared {
    summary: Summary,
    /// Bytes of the files read so far, for the progress line.
    bytes_read: u64,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the replay through `client`; without one (a dry run) only reads the files.
pub async fn run(
    options: Options,
    client: Option<Client>,
    retry: RetryPolicy,
) -> anyhow::Result<Summary> {
    let total_bytes: u64 = options
        .files
        .iter()
        .map(|path| {
            std::fs::metadata(path)
                .map(|m| m.len())
                .with_context(|| format!("{}", path.display()))
        })
        .sum::<anyhow::Result<u64>>()?;
    let shared = SharedState::default();
    let started = Instant::now();

    let mut senders = Vec::new();
    let mut lanes = Vec::new();
    if let Some(client) = &client {
        for _ in 0..options.concurrency.max(1) {
            let (tx, rx) = mpsc::channel::<Vec<Fix>>(2);
            senders.push(tx);
            lanes.push(tokio::spawn(lane(
                client.clone(),
                rx,
                retry,
                shared.clone(),
            )));
        }
    }
    let progress =
        (!options.quiet).then(|| tokio::spawn(progress(shared.clone(), total_bytes, started)));

    let reader = {
        let (options, shared) = (options.clone(), shared.clone());
        tokio::task::spawn_blocking(move || read_files(&options, &senders, &shared))
    };
    let read_result = reader.await.context("the CSV reader panicked")?;
    // The lanes finish their queues once the reader dropped the senders.
    let mut lane_error = None;
    for lane in lanes {
        if let Err(err) = lane.await.context("a replay lane panicked")? {
            lane_error.get_or_insert(err);
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[K");
        }
    }
    // A lane's failure is the cause; the reader then only saw closed lanes.
    if let Some(err) = lane_error {
        return Err(err);
    }
    read_result?;

    let mut summary = std::mem::take(&mut lock(&shared).summary);
    summary.elapsed_s = started.elapsed().as_secs_f64();
    let sent = if options.dry_run {
        summary.files.iter().map(|f| f.fixes).sum()
    } else {
        summary.totals.fixes_sent
    };
    summary.fixes_per_s = sent as f64 / summary.elapsed_s.max(1e-9);
    Ok(summary)
}

/// Parses the files and hands full batches to the lanes (nothing is sent in a dry run).
fn read_files(
    options: &Options,
    senders: &[mpsc::Sender<Vec<Fix>>],
    shared: &SharedState,
) -> anyhow::Result<()> {
    const BAD_ROWS_SHOWN: u64 = 5;
    let mut lanes = Lanes::new(options.concurrency, options.batch);
    let mut bytes_before = 0;
    let send = |(lane, batch): (usize, Vec<Fix>)| -> anyhow::Result<()> {
        match senders.get(lane) {
            // A closed lane stopped on an error, which the caller reports.
            Some(sender) => sender
                .blocking_send(batch)
                .map_err(|_| anyhow::anyhow!("replay stopped")),
            None => Ok(()),
        }
    };
    for path in &options.files {
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("opening {name}"))?;
        let mut reader = FixReader::new(BufReader::with_capacity(1 << 20, file))
            .with_context(|| name.clone())?;
        let mut file_summary = FileSummary {
            path: name.clone(),
            format: reader.format(),
            fixes: 0,
            bad_rows: 0,
            devices: 0,
        };
        let mut devices = HashSet::new();
        while let Some(row) = reader.next() {
            match row.with_context(|| format!("reading {name}"))? {
                Ok(fix) => {
                    file_summary.fixes += 1;
                    if !devices.contains(&fix.device_id) {
                        devices.insert(fix.device_id.clone());
                    }
                    if let Some(full) = lanes.push(fix) {
                        lock(shared).bytes_read = bytes_before + reader.byte_position();
                        send(full)?;
                    }
                }
                Err(bad) => {
                    file_summary.bad_rows += 1;
                    if file_summary.bad_rows <= BAD_ROWS_SHOWN {
                        eprintln!("{name}:{}: skipped: {}", bad.line, bad.reason);
                    }
                }
            }
        }
        if file_summary.bad_rows > BAD_ROWS_SHOWN {
            eprintln!(
                "{name}: skipped {} unreadable rows in all",
                file_summary.bad_rows
            );
        }
        file_summary.devices = devices.len();
        bytes_before += reader.byte_position();
        let mut shared = lock(shared);
        shared.bytes_read = bytes_before;
        shared.summary.files.push(file_summary);
    }
    for partial in lanes.drain() {
        send(partial)?;
    }
    Ok(())
}

/// One lane: sends its batches in order, each retried until it is answered.
async fn lane(
    client: Client,
    mut batches: mpsc::Receiver<Vec<Fix>>,
    retry: RetryPolicy,
    shared: SharedState,
) -> anyhow::Result<()> {
    let mut sequence = 0;
    while let Some(fixes) = batches.recv().await {
        sequence += 1;
        let count = fixes.len();
        let result = retry
            .run(
                || {
                    let request = IngestRequest {
                        fixes: fixes.clone(),
                        sequence,
                    };
                    let mut client = client.clone();
                    async move {
                        client
                            .ingest(request)
                            .await
                            .map(tonic::Response::into_inner)
                    }
                },
                |_: &Status, _| lock(&shared).summary.retries += 1,
            )
            .await;
        match result {
            Ok(response) => lock(&shared).summary.totals.add(count, &response),
            // Bad input is final for this batch only: report it and go on.
            Err(status) if status.code() == Code::InvalidArgument => {
                eprintln!(
                    "a batch of {count} fixes (first device {}) was refused: {}",
                    fixes.first().map_or("-", |f| f.device_id.as_str()),
                    status.message()
                );
                let mut shared = lock(&shared);
                shared.summary.failed_batches += 1;
                shared.summary.failed_fixes += count as u64;
            }
            Err(status) => return Err(status_error("ingest failed", &status)),
        }
    }
    Ok(())
}

/// The progress line on stderr: rewritten in place on a terminal, every 5 s otherwise.
async fn progress(shared: SharedState, total_bytes: u64, started: Instant) {
    let terminal = std::io::stderr().is_terminal();
    let period = if terminal {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(5)
    };
    let mut ticks = tokio::time::interval(period);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let line = {
            let shared = lock(&shared);
            let s = &shared.summary;
            let percent = (shared.bytes_read as f64 / total_bytes.max(1) as f64 * 100.0).min(100.0);
            let rate = s.totals.fixes_sent as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let mut line = format!(
                "replay: {percent:3.0}% read, {} fixes sent: {} accepted, {} rejected, {} fixes/s",
                thousands(s.totals.fixes_sent),
                thousands(s.totals.accepted),
                thousands(s.totals.rejected),
                thousands(rate as u64)
            );
            if s.retries > 0 {
                line.push_str(&format!(", {} retries", thousands(s.retries)));
            }
            line
        };
        if terminal {
            eprint!("\r\x1b[K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// The summary for humans.
pub fn print_summary(
    summary: &Summary,
    dry_run: bool,
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    for file in &summary.files {
        writeln!(
            out,
            "{}: {} format, {} fixes of {} devices{}",
            file.path,
            file.format.name(),
            thousands(file.fixes),
            thousands(file.devices as u64),
            if file.bad_rows > 0 {
                format!(", {} unreadable rows skipped", thousands(file.bad_rows))
            } else {
                String::new()
            }
        )?;
    }
    if dry_run {
        return writeln!(out, "dry run: nothing sent ({:.1}s)", summary.elapsed_s);
    }
    let t = &summary.totals;
    writeln!(
        out,
        "sent {} fixes in {} batches in {:.1}s: {} fixes/s",
        thousands(t.fixes_sent),
        thousands(t.batches),
        summary.elapsed_s,
        thousands(summary.fixes_per_s as u64)
    )?;
    for line in t.verdict_lines() {
        writeln!(out, "{line}")?;
    }
    let mut extra = BTreeMap::new();
    if summary.retries > 0 {
        extra.insert("retries", summary.retries);
    }
    if summary.failed_batches > 0 {
        extra.insert("batches refused (INVALID_ARGUMENT)", summary.failed_batches);
        extra.insert("fixes in refused batches", summary.failed_fixes);
    }
    for (what, n) in extra {
        writeln!(out, "  {what}: {}", thousands(n))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn fix(device: &str, time_ms: i64) -> Fix {
        Fix {
            device_id: device.into(),
            time_ms,
            lat: 1.0,
            lon: 2.0,
            ..Default::default()
        }
    }

    /// Feeds interleaved fixes of many devices through lanes and replays what
    /// each lane would send, lane by lane: every device's fixes come out in the
    /// order they went in, all in one lane, in batches no larger than asked.
    #[test]
    fn lanes_keep_each_devices_order() {
        let mut lanes = Lanes::new(4, 7);
        let mut sent: Vec<(usize, Vec<Fix>)> = Vec::new();
        for t in 0..100 {
            for d in 0..23 {
                if let Some(full) = lanes.push(fix(&format!("dev-{d}"), t)) {
                    sent.push(full);
                }
            }
        }
        sent.extend(lanes.drain());
        assert_eq!(sent.iter().map(|(_, b)| b.len()).sum::<usize>(), 2300);
        assert!(sent.iter().all(|(_, b)| !b.is_empty() && b.len() <= 7));

        let mut lane_of_device: HashMap<String, usize> = HashMap::new();
        let mut last_time: HashMap<String, i64> = HashMap::new();
        let mut seen_per_device: HashMap<String, usize> = HashMap::new();
        // Batches of one lane are sent in the order they were cut.
        for lane in 0..4 {
            for fix in sent.iter().filter(|(l, _)| *l == lane).flat_map(|(_, b)| b) {
                let known = *lane_of_device.entry(fix.device_id.clone()).or_insert(lane);
                assert_eq!(known, lane, "{} in two lanes", fix.device_id);
                let last = last_time.insert(fix.device_id.clone(), fix.time_ms);
                assert!(
                    last.is_none_or(|last| last < fix.time_ms),
                    "{} reordered",
                    fix.device_id
                );
                *seen_per_device.entry(fix.device_id.clone()).or_default() += 1;
            }
        }
        assert_eq!(seen_per_device.len(), 23);
        assert!(seen_per_device.values().all(|&n| n == 100));
        let used: HashSet<usize> = lane_of_device.values().copied().collect();
        assert!(used.len() > 1, "devices are spread over lanes");
    }

    #[test]
    fn lane_choice_is_stable() {
        let lanes = Lanes::new(4, 10);
        assert_eq!(lanes.lane_of("367000140"), lanes.lane_of("367000140"));
        assert_eq!(Lanes::new(1, 10).lane_of("anything"), 0);
        // FNV-1a of the empty string is the offset basis.
        assert_eq!(lanes.lane_of(""), (0xcbf2_9ce4_8422_2325_u64 % 4) as usize);
    }

    #[test]
    fn one_lane_one_device_batches_in_order() {
        let mut lanes = Lanes::new(1, 3);
        let mut batches = Vec::new();
        for t in 0..8 {
            batches.extend(lanes.push(fix("a", t)));
        }
        batches.extend(lanes.drain());
        let times: Vec<Vec<i64>> = batches
            .into_iter()
            .map(|(_, b)| b.into_iter().map(|f| f.time_ms).collect())
            .collect();
        assert_eq!(times, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7]]);
    }

    #[tokio::test]
    async fn dry_run_reads_the_sample_files() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/");
        let options = Options {
            files: vec![
                format!("{root}ais-ny-harbor-2020-06-30-first-hour.raw.csv").into(),
                format!("{root}ais-virginia-beach-2020-06-04..06.csv").into(),
            ],
            batch: 1000,
            concurrency: 4,
            quiet: true,
            dry_run: true,
        };
        let summary = run(options, None, RetryPolicy::default()).await.unwrap();
        let counts: Vec<(u64, usize)> =
            summary.files.iter().map(|f| (f.fixes, f.devices)).collect();
        assert_eq!(counts, vec![(8689, 295), (39_822, 84)]);
        assert_eq!(summary.totals.fixes_sent, 0);
        let mut text = Vec::new();
        print_summary(&summary, true, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("raw AIS format, 8,689 fixes of 295 devices"),
            "{text}"
        );
    }
}
