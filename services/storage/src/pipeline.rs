//! The consumer pipeline: Kafka messages → a batch of rows → one ClickHouse insert → offsets
//! committed. At-least-once: offsets move only after the insert succeeded, so a crash at any
//! point loses nothing; what comes twice collapses in ClickHouse (ReplacingMergeTree + FINAL).

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prost::Message as _;
use rdkafka::{
    Offset, TopicPartitionList,
    consumer::{CommitMode, Consumer as _, StreamConsumer},
};
use tokio::{sync::watch, time::Instant};
use tracing::Instrument as _;
use trackmesh_proto::v1::{FixBatch, RefinedFix, Verdict};
use trackmesh_shared::{breaker::Breaker, ids, telemetry};

use crate::{
    clickhouse::{Db, FixRow},
    config::StorageConfig,
    kafka::{self, Context, HeaderCarrier, Kafka, Owned},
};

/// At most this many traces get a span for the insert their fixes went into.
const TRACED_PER_BATCH: usize = 64;

/// Whether the sink is healthy, for readiness.
#[derive(Clone, Default)]
pub struct SinkHealth(Arc<AtomicBool>);

impl SinkHealth {
    pub fn ok(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::Relaxed);
    }
}

pub struct Pipeline {
    consumer: StreamConsumer<Context>,
    context: Arc<Context>,
    db: Db,
    kafka: Kafka,
    topic: String,
    max_rows: usize,
    max_bytes: usize,
    max_wait: Duration,
    breaker: Breaker,
    health: SinkHealth,
    session_timeout: Duration,
}

/// Rows waiting for their insert, and the offsets to commit after it.
#[derive(Default)]
struct Batch {
    rows: Vec<FixRow>,
    bytes: usize,
    /// Per row: where it came from and whether it was re-sent.
    meta: Vec<RowMeta>,
    /// Per partition: the next offset to consume once this batch is stored.
    next_offsets: BTreeMap<i32, i64>,
    started: Option<Instant>,
    traces: Vec<Vec<(String, String)>>,
}

#[derive(Clone, Copy)]
struct RowMeta {
    partition: i32,
    /// Refinement had accepted this fix before: a client re-sent it.
    replay: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.next_offsets.is_empty()
    }

    /// Keeps the rows where `keep` is true.
    fn retain(&mut self, keep: &[bool]) {
        let mut flags = keep.iter();
        self.rows.retain(|_| *flags.next().unwrap_or(&true));
        let mut flags = keep.iter();
        self.meta.retain(|_| *flags.next().unwrap_or(&true));
    }

    fn drop_partitions(&mut self, revoked: &std::collections::BTreeSet<i32>) {
        if revoked.is_empty() {
            return;
        }
        let keep: Vec<bool> = self
            .meta
            .iter()
            .map(|m| !revoked.contains(&m.partition))
            .collect();
        self.retain(&keep);
        self.next_offsets.retain(|p, _| !revoked.contains(p));
        tracing::info!(
            ?revoked,
            "dropped uncommitted rows of revoked partitions; the new owner re-reads them"
        );
    }
}

impl Pipeline {
    pub fn new(
        config: &StorageConfig,
        db: Db,
        kafka: Kafka,
        health: SinkHealth,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let (consumer, context) = kafka.consumer(config)?;
        Ok(Self {
            consumer,
            context,
            db,
            kafka,
            topic: config.kafka_topic.clone(),
            max_rows: config.batch_max_rows as usize,
            max_bytes: usize::try_from(config.batch_max_bytes).unwrap_or(usize::MAX),
            max_wait: config.batch_max_wait.get(),
            breaker: Breaker::new(5, Duration::from_secs(30)),
            health,
            session_timeout: config.kafka_session_timeout.get(),
        })
    }

    /// Consumes until `shutdown` turns true, then stores and commits what it holds.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        self.health.set(true);
        let mut batch = Batch::default();
        loop {
            let deadline = batch.started.map(|started| started + self.max_wait);
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                () = sleep_until(deadline) => self.flush(&mut batch, &mut shutdown).await,
                message = self.consumer.recv() => match message {
                    Ok(message) => {
                        let owned = Owned::from_message(&message);
                        self.add(&mut batch, owned).await;
                        if batch.rows.len() >= self.max_rows || batch.bytes >= self.max_bytes {
                            self.flush(&mut batch, &mut shutdown).await;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "kafka consume error");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                },
            }
            batch.drop_partitions(&self.context.take_revoked());
        }
        self.finish_joining().await;
        if !batch.is_empty() {
            tracing::info!(
                rows = batch.rows.len(),
                "storing the last batch before shutdown"
            );
            // One more attempt; if ClickHouse is down the rows stay uncommitted in Kafka.
            if self.insert_once(&mut batch).await {
                self.commit(&batch, CommitMode::Sync);
            }
        }
        tracing::info!("consumer stopped");
    }

    /// Stopped while still joining the group: finish the join before leaving. tansu (the
    /// local broker) keeps a group waiting for a member that left mid-join, so the next
    /// consumer would never get partitions. Bounded by the session timeout.
    async fn finish_joining(&self) {
        let until = Instant::now() + self.session_timeout;
        while !self.context.joined() && Instant::now() < until {
            // Polling runs the join; a message that arrives is left uncommitted for later.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await;
        }
    }

    /// Adds one message's rows; undecodable messages go to the dead-letter topic.
    async fn add(&self, batch: &mut Batch, message: Owned) {
        match decode(&message) {
            Ok(rows) => {
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                batch.bytes += message.payload.len();
                for (row, replay) in rows {
                    batch.rows.push(row);
                    batch.meta.push(RowMeta {
                        partition: message.partition,
                        replay,
                    });
                }
                if !message.trace.is_empty() && batch.traces.len() < TRACED_PER_BATCH {
                    batch.traces.push(message.trace.clone());
                }
            }
            Err(reason) => {
                tracing::warn!(partition = message.partition, offset = message.offset, %reason, "undecodable message, to the dead-letter topic");
                // The partition must not block on a bad message, nor lose it: retry the DLQ
                // until it takes the message (a broker that is down is down for the topic too).
                let mut backoff = Duration::from_millis(100);
                while let Err(error) = self.kafka.dead_letter(&message, &reason).await {
                    tracing::warn!(%error, "dead-letter produce failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                metrics::counter!("storage_dlq_messages_total").increment(1);
            }
        }
        batch
            .next_offsets
            .insert(message.partition, message.offset + 1);
    }

    /// Stores the batch, retrying with backoff behind the circuit breaker; consumption is
    /// paused meanwhile so memory stays bounded. Returns when stored or shutting down.
    async fn flush(&self, batch: &mut Batch, shutdown: &mut watch::Receiver<bool>) {
        if batch.is_empty() {
            batch.started = None;
            return;
        }
        let mut paused = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            batch.drop_partitions(&self.context.take_revoked());
            if self.breaker.allow() && self.insert_once(batch).await {
                break;
            }
            if !paused {
                paused = self.pause(true);
            }
            let wait = backoff.max(self.breaker.retry_in());
            backoff = (backoff * 2).min(Duration::from_secs(5));
            // Keep polling while paused: it serves rebalances and keeps the group membership.
            let until = Instant::now() + wait;
            loop {
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep_until(until) => break,
                    message = self.consumer.recv() => if let Ok(message) = message {
                        // Fetched before the pause took effect: keep it with the batch.
                        let owned = Owned::from_message(&message);
                        self.add(batch, owned).await;
                    },
                }
            }
        }
        if paused {
            self.pause(false);
        }
        self.commit(batch, CommitMode::Async);
        *batch = Batch::default();
    }

    /// One insert attempt, with de-duplication first; updates breaker, health and metrics.
    async fn insert_once(&self, batch: &mut Batch) -> bool {
        let spans: Vec<tracing::Span> = batch
            .traces
            .iter()
            .map(|trace| {
                let span = tracing::info_span!(
                    "clickhouse insert",
                    otel.kind = "client",
                    rows = batch.rows.len()
                );
                telemetry::set_parent(&span, &HeaderCarrier(trace.clone()));
                span
            })
            .collect();
        let span = spans.first().cloned().unwrap_or_else(tracing::Span::none);
        let result = async {
            self.drop_stored_replays(batch).await?;
            self.db.insert(&batch.rows).await
        }
        .instrument(span)
        .await;
        drop(spans);
        match result {
            Ok(()) => {
                self.breaker.success();
                self.health.set(true);
                metrics::gauge!("storage_breaker_open").set(0.0);
                metrics::counter!("storage_rows_written_total").increment(batch.rows.len() as u64);
                metrics::histogram!("storage_batch_rows").record(batch.rows.len() as f64);
                metrics::histogram!("storage_batch_bytes").record(batch.bytes as f64);
                true
            }
            Err(error) => {
                self.breaker.failure();
                self.health.set(false);
                metrics::counter!("storage_insert_failures_total").increment(1);
                metrics::gauge!("storage_breaker_open").set(if self.breaker.is_open() {
                    1.0
                } else {
                    0.0
                });
                tracing::warn!(%error, rows = batch.rows.len(), "clickhouse insert failed, will retry");
                false
            }
        }
    }

    /// Drops fixes stored twice in this batch, and re-sent fixes (replays) that ClickHouse
    /// already has, so that the daily aggregates count each fix once.
    async fn drop_stored_replays(&self, batch: &mut Batch) -> clickhouse::error::Result<()> {
        let mut seen = HashSet::with_capacity(batch.rows.len());
        let mut keep: Vec<bool> = batch
            .rows
            .iter()
            .map(|row| seen.insert((row.tenant_id.as_str(), row.device_id.as_str(), row.time_ms)))
            .collect();
        drop(seen);
        // Replays carry a flag from refinement; only those can already be in ClickHouse.
        let mut replays: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
        for ((row, meta), kept) in batch.rows.iter().zip(&batch.meta).zip(&keep) {
            if *kept && meta.replay {
                replays
                    .entry((&row.tenant_id, &row.device_id))
                    .or_default()
                    .push(row.time_ms);
            }
        }
        let mut stored: HashSet<(String, String, i64)> = HashSet::new();
        for ((tenant, device), times) in &replays {
            for time in self.db.stored_times(tenant, device, times).await? {
                stored.insert(((*tenant).to_owned(), (*device).to_owned(), time));
            }
        }
        for (row, kept) in batch.rows.iter().zip(keep.iter_mut()) {
            if *kept
                && stored.contains(&(row.tenant_id.clone(), row.device_id.clone(), row.time_ms))
            {
                *kept = false;
            }
        }
        let dropped = keep.iter().filter(|k| !**k).count();
        if dropped > 0 {
            metrics::counter!("storage_duplicates_dropped_total").increment(dropped as u64);
            batch.retain(&keep);
        }
        Ok(())
    }

    fn commit(&self, batch: &Batch, mode: CommitMode) {
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in &batch.next_offsets {
            if let Err(error) =
                offsets.add_partition_offset(&self.topic, *partition, Offset::Offset(*next))
            {
                tracing::warn!(%error, partition, "cannot record offset");
            }
        }
        if offsets.count() == 0 {
            return;
        }
        if let Err(error) = self.consumer.commit(&offsets, mode) {
            // Not fatal: the rows are stored; a redelivery collapses in ClickHouse.
            tracing::warn!(%error, "kafka offset commit failed");
        }
    }

    /// Pauses (or resumes) every assigned partition; true when it took effect.
    fn pause(&self, pause: bool) -> bool {
        let result = self.consumer.assignment().and_then(|assignment| {
            if pause {
                self.consumer.pause(&assignment)
            } else {
                self.consumer.resume(&assignment)
            }
        });
        match result {
            Ok(()) => {
                tracing::info!(paused = pause, "kafka consumption");
                true
            }
            Err(error) => {
                tracing::warn!(%error, pause, "cannot pause or resume kafka consumption");
                false
            }
        }
    }
}

/// The rows of one message with their replay flags, or why it cannot be stored.
fn decode(message: &Owned) -> Result<Vec<(FixRow, bool)>, String> {
    if let Some(version) = &message.schema_version
        && version != kafka::SCHEMA_VERSION
    {
        return Err(format!("unknown schema-version {version}"));
    }
    let batch = FixBatch::decode(message.payload.as_slice())
        .map_err(|err| format!("not a FixBatch: {err}"))?;
    ids::check_tenant(&batch.tenant_id).map_err(|rule| format!("tenant_id: {rule}"))?;
    ids::check_device(&batch.device_id).map_err(|rule| format!("device_id: {rule}"))?;
    batch
        .fixes
        .iter()
        .enumerate()
        .map(|(index, refined)| {
            row(&batch, refined)
                .map(|row| (row, refined.replay))
                .map_err(|why| format!("fixes[{index}]: {why}"))
        })
        .collect()
}

pub fn row(batch: &FixBatch, refined: &RefinedFix) -> Result<FixRow, &'static str> {
    let fix = refined.fix.as_ref().ok_or("no fix")?;
    if refined.verdict != Verdict::Accepted as i32 {
        return Err("not an accepted fix");
    }
    if fix.device_id != batch.device_id {
        return Err("device_id differs from the batch's");
    }
    Ok(FixRow {
        tenant_id: batch.tenant_id.clone(),
        device_id: batch.device_id.clone(),
        time_ms: fix.time_ms,
        lat: fix.lat,
        lon: fix.lon,
        accuracy_m: fix.accuracy_m,
        speed_mps: fix.speed_mps,
        heading_deg: fix.heading_deg,
        altitude_m: fix.altitude_m,
        segment: refined.segment,
        distance_m: refined.distance_m,
        dt_ms: refined.dt_ms,
        speed_kmh: refined.speed_kmh,
        reanchored: u8::from(refined.reanchored),
    })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
