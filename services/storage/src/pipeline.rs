//! The consumer pipeline: Kafka messages → a batch of rows → ClickHouse inserts → offsets
//! committed. At-least-once: offsets move only after the inserts succeeded, so a crash at any
//! point loses nothing; what comes twice collapses in ClickHouse (ReplacingMergeTree + FINAL).
//! Rows ClickHouse refuses for good go to the dead-letter topic, so one bad row cannot stall
//! the partition.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prost::Message as _;
use rdkafka::consumer::{CommitMode, StreamConsumer};
use tokio::{sync::watch, time::Instant};
use tracing::Instrument as _;
use trackmesh_shared::{
    breaker::{Breaker, Permit},
    domain::{DeviceKey, Fix, Refined, Verdict},
    fix_messages::{FixBatch, FixBatches},
    telemetry,
};

use crate::{
    clickhouse::{self as ch, DayPart, Db, Failure, FixRow},
    config::StorageConfig,
    kafka::{self, Context, HeaderCarrier, Kafka, Owned},
};

/// At most this many traces get a span for the insert their fixes went into.
const TRACED_PER_BATCH: usize = 64;

const DAY_MS: i64 = 86_400_000;

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
    /// What the pipeline may spend after shutdown was asked (joining, last insert, commit).
    shutdown_grace: Duration,
}

/// Rows waiting for their insert, and the offsets to commit after it.
#[derive(Default)]
struct Batch {
    rows: Vec<FixRow>,
    /// Per row: refinement had accepted this fix before (a client re-sent it).
    replay: Vec<bool>,
    bytes: usize,
    /// Per partition: the next offset to consume once this batch is stored.
    next_offsets: BTreeMap<i32, i64>,
    started: Option<Instant>,
    traces: Vec<Vec<(String, String)>>,
    /// Devices (tenant, device) whose delete marker is in this batch, with the marker's
    /// partition: deleted before the batch's rows are inserted, their earlier rows already
    /// dropped from it.
    deletes: BTreeMap<(String, String), i32>,
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
        self.replay.retain(|_| *flags.next().unwrap_or(&true));
    }

    /// A delete marker: the device's rows so far in the batch are not to be stored.
    fn delete_device(&mut self, tenant: &str, device: &str, partition: i32) {
        let keep: Vec<bool> = self
            .rows
            .iter()
            .map(|row| row.tenant_id != tenant || row.device_id != device)
            .collect();
        self.retain(&keep);
        self.deletes
            .insert((tenant.to_owned(), device.to_owned()), partition);
    }

    fn drop_partitions(&mut self, revoked: &BTreeSet<i32>) {
        if revoked.is_empty() {
            return;
        }
        let keep: Vec<bool> = self
            .rows
            .iter()
            .map(|row| !revoked.contains(&row.kafka_partition))
            .collect();
        self.retain(&keep);
        self.next_offsets.retain(|p, _| !revoked.contains(p));
        // A marker of a revoked partition comes again to the new owner.
        self.deletes.retain(|_, p| !revoked.contains(p));
        tracing::info!(
            ?revoked,
            "dropped uncommitted rows of revoked partitions; the new owner re-reads them"
        );
    }
}

impl Pipeline {
    pub fn new(
        config: &StorageConfig,
        shutdown_grace: Duration,
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
            shutdown_grace,
        })
    }

    /// Consumes until `shutdown` turns true, then stores and commits what it holds, within
    /// the shutdown grace period: what is not stored by then stays uncommitted in Kafka.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        self.health.set(true);
        let mut batch = Batch::default();
        // `flush` may have seen the change already: the flag, not the change, ends the loop.
        while !*shutdown.borrow() {
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
        }
        let until = Instant::now()
            + self
                .shutdown_grace
                .saturating_sub(Duration::from_millis(500));
        let last = async {
            self.finish_joining().await;
            batch.drop_partitions(&self.context.take_revoked());
            if batch.is_empty() {
                return;
            }
            tracing::info!(
                rows = batch.rows.len(),
                "storing the last batch before shutdown"
            );
            // One more attempt, unless the breaker refuses it; rows not stored stay
            // uncommitted in Kafka for the next consumer.
            let Some(permit) = self.breaker.acquire() else {
                tracing::info!(
                    "clickhouse breaker open, the last batch stays uncommitted in kafka"
                );
                return;
            };
            if self.store(&mut batch, permit).await {
                self.commit(&batch, CommitMode::Sync);
            }
        };
        if tokio::time::timeout_at(until, last).await.is_err() {
            tracing::warn!("shutdown grace period over, the last batch stays uncommitted in kafka");
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
        // Partitions revoked before this message was fetched: drop their rows first. After
        // `add` it would be too late: the message may belong to a partition revoked and
        // assigned again in the same poll, and its offset would not be read again.
        batch.drop_partitions(&self.context.take_revoked());
        match decode(&message) {
            Ok(devices) if message.delete_device => {
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                for (tenant, device, _) in devices {
                    tracing::info!(%tenant, partition = message.partition, offset = message.offset, "delete marker");
                    batch.delete_device(&tenant, &device, message.partition);
                }
            }
            Ok(devices) => {
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                batch.bytes += message.payload.len();
                for (row, replay) in devices.into_iter().flat_map(|(_, _, rows)| rows) {
                    batch.rows.push(row);
                    batch.replay.push(replay);
                }
                if !message.trace.is_empty() && batch.traces.len() < TRACED_PER_BATCH {
                    batch.traces.push(message.trace.clone());
                }
            }
            Err(reason) => {
                tracing::warn!(partition = message.partition, offset = message.offset, %reason, "undecodable message, to the dead-letter topic");
                self.dead_letter(&message, &reason).await;
            }
        }
        batch
            .next_offsets
            .insert(message.partition, message.offset + 1);
    }

    /// The partition must not block on a bad message, nor lose it: retries the dead-letter
    /// topic until it takes the message (a broker that is down is down for the topic too).
    async fn dead_letter(&self, message: &Owned, reason: &str) {
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = self.kafka.dead_letter(message, reason).await {
            tracing::warn!(%error, "dead-letter produce failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        metrics::counter!("storage_dlq_messages_total").increment(1);
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
            if let Some(permit) = self.breaker.acquire() {
                tokio::select! {
                    biased;
                    // Nothing is committed before the inserts succeeded: stopping here is safe
                    // (and the dropped permit hands a trial back).
                    _ = shutdown.changed() => return,
                    stored = self.store(batch, permit) => if stored { break },
                }
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

    /// One attempt to store the batch: de-duplication, the fixes (rows ClickHouse refuses
    /// for good to the dead-letter topic), then the daily parts. Updates breaker, health and
    /// metrics; true when everything is stored and the offsets may be committed.
    async fn store(&self, batch: &mut Batch, permit: Permit<'_>) -> bool {
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
            // Before the insert: a mutation leaves parts inserted after it alone, so the
            // device's fixes produced after the marker stay.
            for (tenant, device) in batch.deletes.keys() {
                self.db.delete_device(tenant, device).await?;
            }
            self.drop_stored_replays(batch).await?;
            let refused = self.insert_fixes(&batch.rows).await?;
            if !refused.is_empty() {
                self.dead_letter_rows(batch, &refused).await;
                let keep: Vec<bool> = (0..batch.rows.len())
                    .map(|i| !refused.contains_key(&i))
                    .collect();
                // Not stored, not counted; a retry of the daily parts does not send them again.
                batch.retain(&keep);
            }
            let parts = day_parts(&batch.rows);
            for group in ch::split_by_month(&parts, |part| i64::from(part.day)) {
                let group: Vec<&DayPart> = group.iter().map(|&i| &parts[i]).collect();
                self.db.insert("daily_parts", &group).await?;
            }
            Ok::<_, clickhouse::error::Error>(())
        }
        .instrument(span)
        .await;
        drop(spans);
        match result {
            Ok(()) => {
                permit.success();
                self.health.set(true);
                metrics::gauge!("storage_breaker_open").set(0.0);
                metrics::counter!("storage_rows_written_total").increment(batch.rows.len() as u64);
                metrics::histogram!("storage_batch_rows").record(batch.rows.len() as f64);
                metrics::histogram!("storage_batch_bytes").record(batch.bytes as f64);
                true
            }
            Err(error) => {
                permit.failure();
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

    /// Inserts the fixes, at most [`ch::MONTHS_PER_INSERT`] monthly partitions at a time.
    /// An insert ClickHouse refuses for the rows' sake is split in halves until the refused
    /// rows are alone; returns those (by index) with the reason. Transient errors end the
    /// attempt: the caller retries everything (rows inserted twice collapse).
    async fn insert_fixes(
        &self,
        rows: &[FixRow],
    ) -> clickhouse::error::Result<BTreeMap<usize, String>> {
        let mut refused = BTreeMap::new();
        for group in ch::split_by_month(rows, |row| row.time_ms.div_euclid(DAY_MS)) {
            let mut pending = vec![group];
            while let Some(part) = pending.pop() {
                let chunk: Vec<&FixRow> = part.iter().map(|&i| &rows[i]).collect();
                let Err(error) = self.db.insert("fixes", &chunk).await else {
                    continue;
                };
                match (ch::failure(&error), part.len()) {
                    (Failure::Rows | Failure::TooBig, 2..) => {
                        tracing::info!(rows = part.len(), %error, "insert refused, splitting it");
                        let (first, second) = part.split_at(part.len() / 2);
                        pending.push(second.to_vec());
                        pending.push(first.to_vec());
                    }
                    (Failure::Rows, _) => {
                        let index = part[0];
                        tracing::warn!(
                            partition = rows[index].kafka_partition,
                            offset = rows[index].kafka_offset,
                            %error,
                            "clickhouse refuses a row, to the dead-letter topic"
                        );
                        refused.insert(index, error.to_string());
                    }
                    // One row and too many parts: merges are behind, which passes.
                    (Failure::TooBig | Failure::Transient, _) => return Err(error),
                }
            }
        }
        Ok(refused)
    }

    /// Each refused row as a message of its own on the dead-letter topic: a FixBatch of the
    /// one fix, with ClickHouse's reason and the message it came from in the headers.
    async fn dead_letter_rows(&self, batch: &Batch, refused: &BTreeMap<usize, String>) {
        for (&index, reason) in refused {
            let row = &batch.rows[index];
            let replay = batch.replay.get(index).copied().unwrap_or(false);
            let message = Owned {
                partition: row.kafka_partition,
                offset: row.kafka_offset,
                key: DeviceKey::parse(&row.tenant_id, &row.device_id)
                    .ok()
                    .map(|key| key.to_string().into_bytes()),
                payload: FixBatch {
                    tenant_id: row.tenant_id.clone(),
                    device_id: row.device_id.clone(),
                    fixes: vec![refined_fix(row, replay)],
                }
                .encode_to_vec(),
                schema_version: Some(kafka::SCHEMA_VERSION.to_owned()),
                trace: Vec::new(),
                delete_device: false,
            };
            self.dead_letter(&message, &format!("clickhouse refused the fix: {reason}"))
                .await;
        }
    }

    /// Drops fixes stored twice in this batch, and re-sent fixes (replays) that ClickHouse
    /// already has from an earlier message, so that the daily parts count each fix once.
    /// Copies stored by the same message or a later one of its partition do not count: they
    /// are this very batch, inserted before a crash and now delivered again, and the
    /// decision must come out the same as the first time, or the message's daily parts would
    /// differ from the ones stored then.
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
        for ((row, replay), kept) in batch.rows.iter().zip(&batch.replay).zip(&keep) {
            if *kept && *replay {
                replays
                    .entry((&row.tenant_id, &row.device_id))
                    .or_default()
                    .push(row.time_ms);
            }
        }
        // Copies of a device being deleted are about to go (the mutation is asynchronous).
        for (tenant, device) in batch.deletes.keys() {
            replays.remove(&(tenant.as_str(), device.as_str()));
        }
        // (tenant, device, time) → the (partition, offset) of each copy ClickHouse has.
        type Copies<'a> = HashMap<(&'a str, &'a str, i64), Vec<(i32, i64)>>;
        let mut stored = Copies::new();
        for (&(tenant, device), times) in &replays {
            for copy in self.db.stored_copies(tenant, device, times).await? {
                stored
                    .entry((tenant, device, copy.time_ms))
                    .or_default()
                    .push((copy.kafka_partition, copy.kafka_offset));
            }
        }
        if !stored.is_empty() {
            for ((row, replay), kept) in batch.rows.iter().zip(&batch.replay).zip(keep.iter_mut()) {
                if !*kept || !*replay {
                    continue;
                }
                let key = (row.tenant_id.as_str(), row.device_id.as_str(), row.time_ms);
                let earlier = stored.get(&key).is_some_and(|copies| {
                    copies.iter().any(|&(partition, offset)| {
                        partition != row.kafka_partition || offset < row.kafka_offset
                    })
                });
                if earlier {
                    *kept = false;
                }
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
        kafka::commit(&self.consumer, &self.topic, &batch.next_offsets, mode);
    }

    /// Pauses (or resumes) every assigned partition; true when it took effect.
    fn pause(&self, pause: bool) -> bool {
        kafka::set_paused(&self.consumer, &self.topic, pause)
    }
}

/// The daily parts of the rows: one per device, UTC day and Kafka message.
fn day_parts(rows: &[FixRow]) -> Vec<DayPart> {
    let mut parts: BTreeMap<(&str, &str, i64, i32, i64), DayPart> = BTreeMap::new();
    for row in rows {
        let day = row.time_ms.div_euclid(DAY_MS);
        let part = parts
            .entry((
                &row.tenant_id,
                &row.device_id,
                day,
                row.kafka_partition,
                row.kafka_offset,
            ))
            .or_insert_with(|| DayPart {
                tenant_id: row.tenant_id.clone(),
                device_id: row.device_id.clone(),
                // Date holds 1970…2149; refinement's time bounds keep fixes inside it.
                day: u16::try_from(day).unwrap_or(if day < 0 { 0 } else { u16::MAX }),
                kafka_partition: row.kafka_partition,
                kafka_offset: row.kafka_offset,
                fix_count: 0,
                distance_sum_m: 0.0,
                speed_max_kmh: f64::MIN,
                time_min_ms: i64::MAX,
                time_max_ms: i64::MIN,
            });
        part.fix_count += 1;
        part.distance_sum_m += row.distance_m;
        part.speed_max_kmh = part.speed_max_kmh.max(row.speed_kmh);
        part.time_min_ms = part.time_min_ms.min(row.time_ms);
        part.time_max_ms = part.time_max_ms.max(row.time_ms);
    }
    parts.into_values().collect()
}

/// One device's part of a message: its tenant, device, and rows with their replay flags.
type Decoded = (String, String, Vec<(FixRow, bool)>);

/// The content of one message, device by device, or why it cannot be stored.
fn decode(message: &Owned) -> Result<Vec<Decoded>, String> {
    let payload = message.payload.as_slice();
    match message.schema_version.as_deref() {
        None | Some(kafka::SCHEMA_VERSION) => {
            let batch =
                FixBatch::decode(payload).map_err(|err| format!("not a FixBatch: {err}"))?;
            Ok(vec![decode_batch(batch, message)?])
        }
        Some(kafka::SCHEMA_VERSION_BATCHES) => FixBatches::decode(payload)
            .map_err(|err| format!("not a FixBatches: {err}"))?
            .batches
            .into_iter()
            .enumerate()
            .map(|(index, batch)| {
                decode_batch(batch, message).map_err(|why| format!("batches[{index}].{why}"))
            })
            .collect(),
        Some(version) => Err(format!("unknown schema-version {version}")),
    }
}

fn decode_batch(batch: FixBatch, message: &Owned) -> Result<Decoded, String> {
    DeviceKey::parse(&batch.tenant_id, &batch.device_id).map_err(|err| err.to_string())?;
    let rows = batch
        .fixes
        .iter()
        .enumerate()
        .map(|(index, refined)| {
            row(&batch, refined, message.partition, message.offset)
                .map(|row| (row, refined.replay))
                .map_err(|why| format!("fixes[{index}]: {why}"))
        })
        .collect::<Result<_, _>>()?;
    Ok((batch.tenant_id, batch.device_id, rows))
}

fn row(
    batch: &FixBatch,
    refined: &Refined,
    kafka_partition: i32,
    kafka_offset: i64,
) -> Result<FixRow, &'static str> {
    let fix = refined.fix.as_ref().ok_or("no fix")?;
    if refined.verdict() != Verdict::Accepted {
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
        kafka_partition,
        kafka_offset,
    })
}

/// The fix a row was made of, for the dead-letter topic.
fn refined_fix(row: &FixRow, replay: bool) -> Refined {
    Refined {
        fix: Some(Fix {
            device_id: row.device_id.clone(),
            time_ms: row.time_ms,
            lat: row.lat,
            lon: row.lon,
            accuracy_m: row.accuracy_m,
            speed_mps: row.speed_mps,
            heading_deg: row.heading_deg,
            altitude_m: row.altitude_m,
        }),
        verdict: Verdict::Accepted as i32,
        replay,
        segment: row.segment,
        distance_m: row.distance_m,
        dt_ms: row.dt_ms,
        speed_kmh: row.speed_kmh,
        detail: String::new(),
        reanchored: row.reanchored != 0,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
