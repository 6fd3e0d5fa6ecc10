//! Geofence and place events, closed stays and trips, from learning's events topic into the
//! ClickHouse `events`, `stays` and `trips` tables.
//!
//! A consumer group of its own (`{KAFKA_GROUP_ID}-events`), apart from the fixes pipeline:
//! batches of up to [`MAX_BATCH_EVENTS`] rows or [`MAX_BATCH_WAIT`], offsets committed only
//! after every insert of the batch. At-least-once, and an event delivered twice (a
//! redelivery, a producer's retry, two evaluations racing) collapses: the table's sorting key
//! is the event's identity and reads use FINAL. A stay or trip is identified by its device
//! and start; its row's version is the Kafka message's timestamp, so the latest produced
//! (a relearn's) wins. A message that does not decode is counted and skipped.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message as _;
use rdkafka::{
    Message as _,
    consumer::{CommitMode, StreamConsumer},
};
use tokio::{sync::watch, time::Instant};
use trackmesh_proto::v1::{Event, Fix, Place, Stay, Trip};
use trackmesh_shared::{
    domain::{self, DeviceId, TenantId},
    event_messages::{self as topic, EventType, TenantEvents},
    geo,
};

use crate::{
    clickhouse::{self as ch, Db, EventRow, StayRow, TripRow},
    config::StorageConfig,
    kafka::{self, Context},
};

/// A batch is inserted at this many rows (events, stays and trips)…
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// …or when its first event has waited this long.
pub const MAX_BATCH_WAIT: Duration = Duration::from_secs(1);

const DAY_MS: i64 = 86_400_000;

/// Rows waiting for their insert, and the offsets to commit after it.
#[derive(Default)]
struct Batch {
    /// Each row with the partition it came from.
    rows: Vec<(i32, EventRow)>,
    stays: Vec<(i32, StayRow)>,
    trips: Vec<(i32, TripRow)>,
    /// Per partition: the next offset to consume once this batch is stored.
    next_offsets: BTreeMap<i32, i64>,
    started: Option<Instant>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.len() == 0 && self.next_offsets.is_empty()
    }

    fn len(&self) -> usize {
        self.rows.len() + self.stays.len() + self.trips.len()
    }

    /// Partitions taken away: their rows come again to the new owner, uncommitted here.
    fn drop_partitions(&mut self, context: &Context) {
        let revoked = context.take_revoked();
        if !revoked.is_empty() {
            self.rows.retain(|(p, _)| !revoked.contains(p));
            self.stays.retain(|(p, _)| !revoked.contains(p));
            self.trips.retain(|(p, _)| !revoked.contains(p));
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
                    if batch.len() >= MAX_BATCH_EVENTS {
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
        let version = version(message.timestamp().to_millis());
        match rows(message.payload().unwrap_or_default(), version) {
            Ok((rows, invalid)) => {
                for (item, reason) in invalid {
                    tracing::warn!(partition, offset, %item, %reason, "invalid event, stay or trip skipped");
                    metrics::counter!("storage_events_invalid_total").increment(1);
                }
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                batch
                    .rows
                    .extend(rows.events.into_iter().map(|row| (partition, row)));
                batch
                    .stays
                    .extend(rows.stays.into_iter().map(|row| (partition, row)));
                batch
                    .trips
                    .extend(rows.trips.into_iter().map(|row| (partition, row)));
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

    /// One attempt to insert the batch's events, stays and trips, at most
    /// [`ch::MONTHS_PER_INSERT`] monthly partitions at a time; true when all are stored. A
    /// retry inserts them all again, which collapses (same key, same version).
    async fn insert(&self, batch: &Batch) -> bool {
        let events: Vec<&EventRow> = batch.rows.iter().map(|(_, row)| row).collect();
        let stays: Vec<&StayRow> = batch.stays.iter().map(|(_, row)| row).collect();
        let trips: Vec<&TripRow> = batch.trips.iter().map(|(_, row)| row).collect();
        let stored = self
            .insert_table("events", &events, |row| row.time_ms)
            .await
            && self.insert_table("stays", &stays, |row| row.start_ms).await
            && self.insert_table("trips", &trips, |row| row.start_ms).await;
        if stored {
            metrics::counter!("storage_events_inserted_total").increment(events.len() as u64);
            metrics::counter!("storage_stays_inserted_total").increment(stays.len() as u64);
            metrics::counter!("storage_trips_inserted_total").increment(trips.len() as u64);
        }
        stored
    }

    /// Inserts `rows` into `table`, split by the month of `time_ms` (the partition); true
    /// when all are stored.
    async fn insert_table<T>(&self, table: &str, rows: &[&T], time_ms: impl Fn(&T) -> i64) -> bool
    where
        T: clickhouse::RowWrite + for<'a> clickhouse::Row<Value<'a> = T>,
    {
        for group in ch::split_by_month(rows, |row| time_ms(row).div_euclid(DAY_MS)) {
            let group: Vec<&T> = group.iter().map(|&i| rows[i]).collect();
            if let Err(error) = self.db.insert(table, &group).await {
                metrics::counter!("storage_events_insert_failures_total").increment(1);
                tracing::warn!(%error, table, rows = rows.len(), "clickhouse events insert failed, will retry");
                return false;
            }
        }
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

/// Items of a message that cannot be stored: (`events[i]`, `stays[i]` or `trips[i]`, reason).
type Skipped = Vec<(String, String)>;

/// The rows of one message.
#[derive(Debug, Default)]
struct Rows {
    events: Vec<EventRow>,
    stays: Vec<StayRow>,
    trips: Vec<TripRow>,
}

/// A stay or trip row's version: the message's timestamp in ms, or now when it has none.
fn version(timestamp_ms: Option<i64>) -> u64 {
    let ms = timestamp_ms
        .filter(|&ms| ms > 0)
        .unwrap_or_else(domain::now_ms);
    u64::try_from(ms).unwrap_or(0)
}

/// The rows of one message, and the items skipped; `Err` when the message is not a
/// `TenantEvents` of a valid tenant.
fn rows(payload: &[u8], version: u64) -> Result<(Rows, Skipped), String> {
    let message =
        TenantEvents::decode(payload).map_err(|err| format!("not a TenantEvents: {err}"))?;
    TenantId::parse(&message.tenant_id).map_err(|err| err.to_string())?;
    let tenant = message.tenant_id.as_str();
    let mut rows = Rows::default();
    let mut invalid = Vec::new();
    for (index, event) in message.events.into_iter().enumerate() {
        match row(tenant, event) {
            Ok(row) => rows.events.push(row),
            Err(reason) => invalid.push((format!("events[{index}]"), reason)),
        }
    }
    for (index, stay) in message.stays.into_iter().enumerate() {
        match stay_row(tenant, stay, version) {
            Ok(row) => rows.stays.push(row),
            Err(reason) => invalid.push((format!("stays[{index}]"), reason)),
        }
    }
    for (index, trip) in message.trips.into_iter().enumerate() {
        match trip_row(tenant, trip, version) {
            Ok(row) => rows.trips.push(row),
            Err(reason) => invalid.push((format!("trips[{index}]"), reason)),
        }
    }
    Ok((rows, invalid))
}

/// `start_ms` not after `end_ms`.
fn check_times(start_ms: i64, end_ms: i64) -> Result<(), String> {
    if start_ms > end_ms {
        return Err(format!("start_ms: {start_ms} is after end_ms {end_ms}"));
    }
    Ok(())
}

/// A stay as a row, if it can be one.
fn stay_row(tenant: &str, stay: topic::Stay, version: u64) -> Result<StayRow, String> {
    DeviceId::parse("device_id", &stay.device_id).map_err(|err| err.to_string())?;
    check_times(stay.start_ms, stay.end_ms)?;
    if !geo::valid_coordinates(stay.lat, stay.lon) {
        return Err("lat/lon out of range or not finite".into());
    }
    Ok(StayRow {
        tenant_id: tenant.to_owned(),
        device_id: stay.device_id,
        start_ms: stay.start_ms,
        end_ms: stay.end_ms,
        place_id: stay.place_id,
        lat: stay.lat,
        lon: stay.lon,
        fixes: stay.fixes,
        version,
    })
}

/// A trip as a row, if it can be one.
fn trip_row(tenant: &str, trip: topic::Trip, version: u64) -> Result<TripRow, String> {
    DeviceId::parse("device_id", &trip.device_id).map_err(|err| err.to_string())?;
    check_times(trip.start_ms, trip.end_ms)?;
    let place = |name: &str, place: Option<topic::Place>| {
        let place = place.ok_or_else(|| format!("{name}: required"))?;
        if geo::valid_coordinates(place.lat, place.lon) {
            Ok(place)
        } else {
            Err(format!("{name}.lat/lon out of range or not finite"))
        }
    };
    let from = place("from_place", trip.from_place)?;
    let to = place("to_place", trip.to_place)?;
    // A NaN or infinity would not survive JSON on the way out.
    for (name, value) in [
        ("distance_m", trip.distance_m),
        ("max_speed_kmh", trip.max_speed_kmh),
        ("mean_speed_kmh", trip.mean_speed_kmh),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(format!("{name}: {value} is not a finite number >= 0"));
        }
    }
    Ok(TripRow {
        tenant_id: tenant.to_owned(),
        device_id: trip.device_id,
        start_ms: trip.start_ms,
        end_ms: trip.end_ms,
        from_place_id: from.place_id,
        from_lat: from.lat,
        from_lon: from.lon,
        to_place_id: to.place_id,
        to_lat: to.lat,
        to_lon: to.lon,
        distance_m: trip.distance_m,
        max_speed_kmh: trip.max_speed_kmh,
        mean_speed_kmh: trip.mean_speed_kmh,
        fixes: trip.fixes,
        version,
    })
}

/// A stored row as the stay it was.
pub fn stay(row: StayRow) -> Stay {
    Stay {
        place_id: row.place_id,
        lat: row.lat,
        lon: row.lon,
        start_ms: row.start_ms,
        end_ms: row.end_ms,
        fixes: row.fixes,
        device_id: row.device_id,
    }
}

/// A stored row as the trip it was; its places carry their id and position only.
pub fn trip(row: TripRow) -> Trip {
    Trip {
        from_place: Some(Place {
            place_id: row.from_place_id,
            lat: row.from_lat,
            lon: row.from_lon,
            ..Place::default()
        }),
        to_place: Some(Place {
            place_id: row.to_place_id,
            lat: row.to_lat,
            lon: row.to_lon,
            ..Place::default()
        }),
        start_ms: row.start_ms,
        end_ms: row.end_ms,
        distance_m: row.distance_m,
        max_speed_kmh: row.max_speed_kmh,
        mean_speed_kmh: row.mean_speed_kmh,
        fixes: row.fixes,
        device_id: row.device_id,
    }
}

/// An event as a row, if it can be one.
fn row(tenant: &str, event: topic::Event) -> Result<EventRow, String> {
    DeviceId::parse("device_id", &event.device_id).map_err(|err| err.to_string())?;
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
            let stored = row("t", sample(kind).into()).unwrap();
            assert_eq!(stored.event_type, kind as u8);
            assert_eq!(event(stored), sample(kind));
        }
        let mut bare = sample(EventType::Exit);
        bare.fix = None;
        assert_eq!(event(row("t", bare.clone().into()).unwrap()), bare);
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
            events: [unknown, sample(EventType::Arrive), unspecified, no_device]
                .map(topic::Event::from)
                .to_vec(),
            ..TenantEvents::default()
        };
        let (rows, invalid) = rows(&message.encode_to_vec(), 1).unwrap();
        assert_eq!(rows.events.len(), 1);
        assert_eq!(
            invalid,
            [
                (
                    "events[0]".to_owned(),
                    "type: 9 is not an event type".to_owned()
                ),
                (
                    "events[2]".to_owned(),
                    "type: 0 is not an event type".to_owned()
                ),
                ("events[3]".to_owned(), "device_id: required".to_owned()),
            ]
        );
        assert!(super::rows(b"\xff\xff\xff", 1).is_err());
        let no_tenant = TenantEvents::default().encode_to_vec();
        assert!(
            super::rows(&no_tenant, 1)
                .unwrap_err()
                .starts_with("tenant_id")
        );
    }

    fn sample_stay() -> Stay {
        Stay {
            place_id: "p1".into(),
            lat: 40.6,
            lon: -74.0,
            start_ms: 1_750_000_000_000,
            end_ms: 1_750_000_900_000,
            fixes: 12,
            device_id: "d".into(),
        }
    }

    fn sample_trip() -> Trip {
        let place = |id: &str, lat: f64| Place {
            place_id: id.into(),
            lat,
            lon: -74.0,
            ..Place::default()
        };
        Trip {
            from_place: Some(place("p1", 40.6)),
            to_place: Some(place("p2", 40.7)),
            start_ms: 1_750_000_900_000,
            end_ms: 1_750_001_500_000,
            distance_m: 11_200.5,
            max_speed_kmh: 88.0,
            mean_speed_kmh: 67.2,
            fixes: 21,
            device_id: "d".into(),
        }
    }

    #[test]
    fn stays_and_trips_round_trip_through_rows() {
        let row = stay_row("t", sample_stay().into(), 7).unwrap();
        assert_eq!((row.tenant_id.as_str(), row.version), ("t", 7));
        assert_eq!(stay(row), sample_stay());
        let row = trip_row("t", sample_trip().into(), 8).unwrap();
        assert_eq!((row.from_place_id.as_str(), row.version), ("p1", 8));
        assert_eq!(trip(row), sample_trip());
    }

    #[test]
    fn bad_stays_and_trips_are_skipped() {
        let mut backwards = sample_stay();
        backwards.end_ms = backwards.start_ms - 1;
        let mut nowhere = sample_stay();
        nowhere.lat = f64::NAN;
        let mut no_device = sample_trip();
        no_device.device_id = "x".repeat(129);
        let mut no_place = sample_trip();
        no_place.to_place = None;
        let mut nan_speed = sample_trip();
        nan_speed.mean_speed_kmh = f64::NAN;
        let message = TenantEvents {
            tenant_id: "t".into(),
            events: vec![],
            stays: [backwards, sample_stay(), nowhere]
                .map(topic::Stay::from)
                .to_vec(),
            trips: [no_device, no_place, sample_trip(), nan_speed]
                .map(topic::Trip::from)
                .to_vec(),
        };
        let (rows, invalid) = rows(&message.encode_to_vec(), 5).unwrap();
        assert_eq!((rows.stays.len(), rows.trips.len()), (1, 1));
        assert_eq!(rows.stays[0].version, 5);
        let reasons: Vec<(&str, &str)> = invalid
            .iter()
            .map(|(item, reason)| (item.as_str(), reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (
                    "stays[0]",
                    "start_ms: 1750000000000 is after end_ms 1749999999999"
                ),
                ("stays[2]", "lat/lon out of range or not finite"),
                ("trips[0]", "device_id: longer than 128 bytes"),
                ("trips[1]", "to_place: required"),
                (
                    "trips[3]",
                    "mean_speed_kmh: NaN is not a finite number >= 0"
                ),
            ]
        );
    }

    #[test]
    fn versions_are_the_message_time_or_now() {
        assert_eq!(version(Some(1_750_000_000_123)), 1_750_000_000_123);
        let now = version(None);
        assert!(now > 1_700_000_000_000, "{now}");
        assert!(version(Some(-1)) >= now);
    }
}
