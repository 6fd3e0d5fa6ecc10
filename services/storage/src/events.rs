//! Geofence and place events, from learning's events topic into the ClickHouse `events` table.
//!
//! A consumer group of its own (`{KAFKA_GROUP_ID}-events`), apart from the fixes pipeline:
//! batches of up to [`MAX_BATCH_EVENTS`] events or [`MAX_BATCH_WAIT`], offsets committed only
//! after the insert. At-least-once, and an event delivered twice (a redelivery, a producer's
//! retry, two evaluations racing) collapses: the table's sorting key is the event's identity
//! and reads use FINAL. A message that does not decode is counted and skipped.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message as _;
use rdkafka::{
    Message as _,
    consumer::{CommitMode, StreamConsumer},
};
use tokio::{sync::watch, time::Instant};
use trackmesh_proto::v1::{Event, EventType, Fix, TenantEvents};
use trackmesh_shared::{geo, ids};

use crate::{
    clickhouse::{self as ch, Db, EventRow},
    config::StorageConfig,
    kafka::{self, Context},
};

/// A batch is inserted at this many events…
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// …or when its first event has waited this long.
pub const MAX_BATCH_WAIT: Duration = Duration::from_secs(1);

const DAY_MS: i64 = 86_400_000;

/// Events waiting for their insert, and the offsets to commit after it.
#[derive(Default)]
struct Batch {
    /// Each event with the partition it came from.
    rows: Vec<(i32, EventRow)>,
    /// Per partition: the next offset to consume once this batch is stored.
    next_offsets: BTreeMap<i32, i64>,
    started: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.next_offsets.is_empty()
    }

    /// Partitions taken away: their events come again to the new owner, uncommitted here.
    fn drop_partitions(&mut self, context: &Context) {
        let revoked = context.take_revoked();
        if !revoked.is_empty() {
            self.rows.retain(|(p, _)| !revoked.contains(p));
            self.next_offsets.retain(|p, _| !revoked.contains(p));
        }
    }
}

struct Sink {
    consumer: StreamConsumer<Context>,
    context: Arc<Context>,
    db: Db,
    topic: String,
    session_timeout: Duration,
}

/// Consumes the events topic until `stopped` turns true, then stores and commits what it
/// holds within `shutdown_grace` (what it cannot store stays uncommitted in Kafka).
pub async fn run(
    config: &StorageConfig,
    shutdown_grace: Duration,
    db: Db,
    mut stopped: watch::Receiver<bool>,
) {
    let group = config.events_group_id();
    let (consumer, context) =
        match kafka::group_consumer(config, &group, &config.kafka_events_topic, false) {
            Ok(created) => created,
            Err(error) => {
                tracing::error!(%error, "cannot create the kafka events consumer");
                return;
            }
        };
    let sink = Sink {
        consumer,
        context,
        db,
        topic: config.kafka_events_topic.clone(),
        session_timeout: config.kafka_session_timeout.get(),
    };
    let mut batch = Batch::default();
    while !*stopped.borrow() {
        let deadline = batch.started.map(|started| started + MAX_BATCH_WAIT);
        tokio::select! {
            biased;
            _ = stopped.changed() => break,
            () = sleep_until(deadline) => sink.flush(&mut batch, &mut stopped).await,
            message = sink.consumer.recv() => match message {
                Ok(message) => {
                    sink.add(&mut batch, &message);
                    if batch.rows.len() >= MAX_BATCH_EVENTS {
                        sink.flush(&mut batch, &mut stopped).await;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "kafka events consume error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
        }
    }
    let until = Instant::now() + shutdown_grace.saturating_sub(Duration::from_millis(500));
    let last = async {
        sink.finish_joining().await;
        batch.drop_partitions(&sink.context);
        if !batch.is_empty() && sink.insert(&batch).await {
            sink.commit(&batch, CommitMode::Sync);
        }
    };
    if tokio::time::timeout_at(until, last).await.is_err() {
        tracing::warn!("shutdown grace period over, the last events stay uncommitted in kafka");
    }
    tracing::info!("events consumer stopped");
}

impl Sink {
    fn add(&self, batch: &mut Batch, message: &rdkafka::message::BorrowedMessage<'_>) {
        // Before the message: it may belong to a partition revoked and assigned again.
        batch.drop_partitions(&self.context);
        let (partition, offset) = (message.partition(), message.offset());
        match rows(message.payload().unwrap_or_default()) {
            Ok((rows, invalid)) => {
                for (index, reason) in invalid {
                    tracing::warn!(partition, offset, index, %reason, "invalid event skipped");
                    metrics::counter!("storage_events_invalid_total").increment(1);
                }
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                batch
                    .rows
                    .extend(rows.into_iter().map(|row| (partition, row)));
            }
            Err(reason) => {
                tracing::warn!(partition, offset, %reason, "undecodable events message skipped");
                metrics::counter!("storage_events_undecodable_total").increment(1);
                // Its offset is committed with the next batch.
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
            }
        }
        batch.next_offsets.insert(partition, offset + 1);
    }

    /// Stores the batch, retrying with backoff while ClickHouse refuses; consumption is paused
    /// meanwhile (and polled, which keeps the group membership). Returns when stored and
    /// committed, or when shutting down (nothing committed then).
    async fn flush(&self, batch: &mut Batch, stopped: &mut watch::Receiver<bool>) {
        let mut paused = false;
        let mut backoff = Duration::from_millis(100);
        loop {
            batch.drop_partitions(&self.context);
            if batch.is_empty() || self.insert(batch).await {
                break;
            }
            if !paused {
                paused = self.pause(true);
            }
            let until = Instant::now() + backoff;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            loop {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => return,
                    () = tokio::time::sleep_until(until) => break,
                    message = self.consumer.recv() => if let Ok(message) = message {
                        // Fetched before the pause took effect: keep it with the batch.
                        self.add(batch, &message);
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

    /// One attempt to insert the batch's events, at most [`ch::MONTHS_PER_INSERT`] monthly
    /// partitions at a time; true when all are stored. A retry inserts them all again, which
    /// collapses.
    async fn insert(&self, batch: &Batch) -> bool {
        let rows: Vec<&EventRow> = batch.rows.iter().map(|(_, row)| row).collect();
        for group in ch::split_by_month(&rows, |row| row.time_ms.div_euclid(DAY_MS)) {
            let group: Vec<&EventRow> = group.iter().map(|&i| rows[i]).collect();
            if let Err(error) = self.db.insert("events", &group).await {
                metrics::counter!("storage_events_insert_failures_total").increment(1);
                tracing::warn!(%error, events = rows.len(), "clickhouse events insert failed, will retry");
                return false;
            }
        }
        metrics::counter!("storage_events_inserted_total").increment(rows.len() as u64);
        true
    }

    fn commit(&self, batch: &Batch, mode: CommitMode) {
        kafka::commit(&self.consumer, &self.topic, &batch.next_offsets, mode);
    }

    /// Pauses (or resumes) every assigned partition; true when it took effect.
    fn pause(&self, pause: bool) -> bool {
        kafka::set_paused(&self.consumer, &self.topic, pause)
    }

    /// Stopped while still joining: finish the join before leaving, or tansu keeps the group
    /// waiting for this member (see the fixes pipeline). Bounded by the session timeout.
    async fn finish_joining(&self) {
        let until = Instant::now() + self.session_timeout;
        while !self.context.joined() && Instant::now() < until {
            // A message that arrives is left uncommitted for later.
            let _ = tokio::time::timeout(Duration::from_millis(100), self.consumer.recv()).await;
        }
    }
}

/// Events of a message that cannot be stored: (index, reason).
type Skipped = Vec<(usize, String)>;

/// The rows of one message, and the events skipped; `Err` when the message is not a
/// `TenantEvents` of a valid tenant.
fn rows(payload: &[u8]) -> Result<(Vec<EventRow>, Skipped), String> {
    let message =
        TenantEvents::decode(payload).map_err(|err| format!("not a TenantEvents: {err}"))?;
    ids::check_tenant(&message.tenant_id).map_err(|rule| format!("tenant_id: {rule}"))?;
    let mut rows = Vec::with_capacity(message.events.len());
    let mut invalid = Vec::new();
    for (index, event) in message.events.into_iter().enumerate() {
        match row(&message.tenant_id, event) {
            Ok(row) => rows.push(row),
            Err(reason) => invalid.push((index, reason)),
        }
    }
    Ok((rows, invalid))
}

/// An event as a row, if it can be one.
fn row(tenant: &str, event: Event) -> Result<EventRow, String> {
    ids::check_device(&event.device_id).map_err(|rule| format!("device_id: {rule}"))?;
    let event_type = match EventType::try_from(event.r#type) {
        Ok(EventType::Unspecified) | Err(_) => {
            return Err(format!("type: {} is not an event type", event.r#type));
        }
        // 1..=4.
        Ok(known) => u8::try_from(known as i32).unwrap_or_default(),
    };
    if !geo::valid_coordinates(event.lat, event.lon) {
        return Err("lat/lon out of range or not finite".into());
    }
    let has_fix = event.fix.is_some();
    let fix = event.fix.unwrap_or_default();
    Ok(EventRow {
        tenant_id: tenant.to_owned(),
        device_id: event.device_id,
        time_ms: event.time_ms,
        event_type,
        geofence_id: event.geofence_id,
        place_id: event.place_id,
        lat: event.lat,
        lon: event.lon,
        has_fix: u8::from(has_fix),
        fix_time_ms: fix.time_ms,
        fix_lat: fix.lat,
        fix_lon: fix.lon,
        fix_accuracy_m: fix.accuracy_m,
        fix_speed_mps: fix.speed_mps,
        fix_heading_deg: fix.heading_deg,
        fix_altitude_m: fix.altitude_m,
    })
}

/// A stored row as the event it was.
pub fn event(row: EventRow) -> Event {
    let fix = (row.has_fix != 0).then(|| Fix {
        device_id: row.device_id.clone(),
        time_ms: row.fix_time_ms,
        lat: row.fix_lat,
        lon: row.fix_lon,
        accuracy_m: row.fix_accuracy_m,
        speed_mps: row.fix_speed_mps,
        heading_deg: row.fix_heading_deg,
        altitude_m: row.fix_altitude_m,
    });
    Event {
        r#type: i32::from(row.event_type),
        device_id: row.device_id,
        geofence_id: row.geofence_id,
        place_id: row.place_id,
        time_ms: row.time_ms,
        lat: row.lat,
        lon: row.lon,
        fix,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: EventType) -> Event {
        Event {
            r#type: kind as i32,
            device_id: "d".into(),
            geofence_id: "g".into(),
            place_id: String::new(),
            time_ms: 1_750_000_000_000,
            lat: 40.6,
            lon: -74.0,
            fix: Some(Fix {
                device_id: "d".into(),
                time_ms: 1_750_000_000_000,
                lat: 40.6,
                lon: -74.0,
                accuracy_m: Some(12.0),
                ..Fix::default()
            }),
        }
    }

    #[test]
    fn events_round_trip_through_rows() {
        for kind in [EventType::Enter, EventType::Depart] {
            let stored = row("t", sample(kind)).unwrap();
            assert_eq!(stored.event_type, kind as u8);
            assert_eq!(event(stored), sample(kind));
        }
        let mut bare = sample(EventType::Exit);
        bare.fix = None;
        assert_eq!(event(row("t", bare.clone()).unwrap()), bare);
    }

    #[test]
    fn bad_events_are_skipped_and_bad_messages_refused() {
        let mut unknown = sample(EventType::Enter);
        unknown.r#type = 9;
        let mut unspecified = sample(EventType::Enter);
        unspecified.r#type = 0;
        let mut no_device = sample(EventType::Enter);
        no_device.device_id.clear();
        let message = TenantEvents {
            tenant_id: "t".into(),
            events: vec![unknown, sample(EventType::Arrive), unspecified, no_device],
        };
        let (rows, invalid) = rows(&message.encode_to_vec()).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            invalid,
            [
                (0, "type: 9 is not an event type".to_owned()),
                (2, "type: 0 is not an event type".to_owned()),
                (3, "device_id: required".to_owned()),
            ]
        );
        assert!(super::rows(b"\xff\xff\xff").is_err());
        let no_tenant = TenantEvents::default().encode_to_vec();
        assert!(
            super::rows(&no_tenant)
                .unwrap_err()
                .starts_with("tenant_id")
        );
    }
}
