//! ClickHouse: schema migrations, batched inserts, and the queries behind the Storage API,
//! all with bound values (never SQL built from input).

use std::{collections::HashMap, time::Instant};

use clickhouse::{Client, Row, query::Query, query::RowCursor};
use serde::{Deserialize, Serialize};

use crate::{
    config::StorageConfig,
    schema::{self, ServerVersion, Step},
};

/// One stored fix: the `fixes` table's columns, in order.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct FixRow {
    pub tenant_id: String,
    pub device_id: String,
    pub time_ms: i64,
    pub lat: f64,
    pub lon: f64,
    pub accuracy_m: Option<f32>,
    pub speed_mps: Option<f32>,
    pub heading_deg: Option<f32>,
    pub altitude_m: Option<f32>,
    pub segment: u32,
    pub distance_m: f64,
    pub dt_ms: i64,
    pub speed_kmh: f64,
    pub reanchored: u8,
    /// The Kafka message the row came from: a redelivered message is recognised by it.
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// One Kafka message's share of a device's day (`daily_parts`): the consumer writes it after
/// the message's fixes; a redelivery writes the same key again, which collapses.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct DayPart {
    pub tenant_id: String,
    pub device_id: String,
    /// Days since the epoch (UTC), ClickHouse's `Date`.
    pub day: u16,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub fix_count: u64,
    pub distance_sum_m: f64,
    pub speed_max_kmh: f64,
    pub time_min_ms: i64,
    pub time_max_ms: i64,
}

/// One geofence or place event: the `events` table's columns, in order; also what an events
/// query returns (after `tenant_id`, see [`EVENT_COLUMNS`]).
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct EventRow {
    pub tenant_id: String,
    pub device_id: String,
    pub time_ms: i64,
    /// `EventType` (1..=4).
    pub event_type: u8,
    pub geofence_id: String,
    pub place_id: String,
    pub lat: f64,
    pub lon: f64,
    /// 1 when the event carried its triggering fix (the `fix_` columns).
    pub has_fix: u8,
    pub fix_time_ms: i64,
    pub fix_lat: f64,
    pub fix_lon: f64,
    pub fix_accuracy_m: Option<f32>,
    pub fix_speed_mps: Option<f32>,
    pub fix_heading_deg: Option<f32>,
    pub fix_altitude_m: Option<f32>,
}

/// Columns of an events query: every column of [`EventRow`], in its order.
const EVENT_COLUMNS: &str = "tenant_id, device_id, time_ms, event_type, geofence_id, place_id, \
    lat, lon, has_fix, fix_time_ms, fix_lat, fix_lon, fix_accuracy_m, fix_speed_mps, \
    fix_heading_deg, fix_altitude_m";

/// One stay of a device: the `stays` table's columns, in order; also what a stays query
/// returns.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct StayRow {
    pub tenant_id: String,
    pub device_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub place_id: String,
    pub lat: f64,
    pub lon: f64,
    pub fixes: u32,
    /// The Kafka message's timestamp (ms): the highest wins.
    pub version: u64,
}

/// One trip of a device: the `trips` table's columns, in order; also what a trips query
/// returns.
#[derive(Clone, Debug, PartialEq, Row, Serialize, Deserialize)]
pub struct TripRow {
    pub tenant_id: String,
    pub device_id: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub from_place_id: String,
    pub from_lat: f64,
    pub from_lon: f64,
    pub to_place_id: String,
    pub to_lat: f64,
    pub to_lon: f64,
    pub distance_m: f64,
    pub max_speed_kmh: f64,
    pub mean_speed_kmh: f64,
    pub fixes: u32,
    /// The Kafka message's timestamp (ms): the highest wins.
    pub version: u64,
}

/// The tables of a device's stays and trips, each with every column of its row type, in order.
pub const HISTORY_TABLES: [&str; 2] = ["stays", "trips"];

/// What a stays or trips query selects: the device's rows overlapping `[from_ms, to_ms]`.
#[derive(Clone, Copy)]
pub struct HistoryFilter<'a> {
    pub tenant: &'a str,
    pub device: &'a str,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: u64,
}

/// What an events query selects.
pub struct EventFilter<'a> {
    pub tenant: &'a str,
    /// None: every device of the tenant.
    pub device: Option<&'a str>,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Empty: every type.
    pub types: &'a [u8],
    pub limit: u64,
}

/// A stored copy of a fix: which message stored it.
#[derive(Clone, Debug, Row, Deserialize)]
pub struct StoredCopy {
    pub time_ms: i64,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

/// A fix as a track query returns it.
#[derive(Clone, Debug, Row, Deserialize)]
pub struct TrackRow {
    pub time_ms: i64,
    pub lat: f64,
    pub lon: f64,
    pub accuracy_m: Option<f32>,
    pub speed_mps: Option<f32>,
    pub heading_deg: Option<f32>,
    pub altitude_m: Option<f32>,
    pub segment: u32,
    pub distance_m: f64,
    pub dt_ms: i64,
    pub speed_kmh: f64,
    pub reanchored: u8,
}

const TRACK_COLUMNS: &str = "time_ms, lat, lon, accuracy_m, speed_mps, heading_deg, altitude_m, \
    segment, distance_m, dt_ms, speed_kmh, reanchored";

#[derive(Clone, Debug, Row, Deserialize)]
pub struct DayRow {
    pub device_id: String,
    pub day: String,
    pub fixes: u64,
    pub distance_m: f64,
    pub max_speed_kmh: f64,
    pub first_ms: i64,
    pub last_ms: i64,
}

#[derive(Clone, Debug, Row, Deserialize)]
pub struct DeviceRow {
    pub device_id: String,
    pub fixes: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    pub distance_m: f64,
    pub max_speed_kmh: f64,
    pub fixes_today: u64,
    pub distance_today_m: f64,
}

/// A device's position at a given time, as [`Db::last_positions`] reads it.
#[derive(Clone, Debug, Row, Deserialize)]
pub struct PositionRow {
    pub device_id: String,
    pub lat: f64,
    pub lon: f64,
}

/// Devices per last-position query: each is a `(device_id, time_ms)` pair inlined into the
/// SQL text (a 128-byte id at most), which `max_query_size` (256 KiB) bounds.
pub const DEVICES_PER_POSITION_QUERY: usize = 500;

/// The fields ListDevices may sort by: the only names that ever reach an ORDER BY.
pub const SORT_FIELDS: &[&str] = &[
    "device_id",
    "fixes",
    "first_ms",
    "last_ms",
    "distance_m",
    "max_speed_kmh",
    "fixes_today",
    "distance_today_m",
];

#[derive(Clone)]
pub struct Db {
    server: Client,
    client: Client,
    database: String,
}

impl Db {
    pub fn new(config: &StorageConfig) -> Self {
        let mut server = Client::default()
            .with_url(config.clickhouse_url())
            .with_user(&config.clickhouse_user)
            // The crate's schema validation needs servers newer than Debian's 18.16.
            .with_validation(false)
            .with_compression(config.clickhouse_compression);
        if let Some(password) = &config.clickhouse_password {
            server = server.with_password(password.expose());
        }
        let client = server.clone().with_database(&config.clickhouse_database);
        Self {
            server,
            client,
            database: config.clickhouse_database.clone(),
        }
    }

    /// For readiness: `Err` says what is wrong.
    pub async fn ping(&self) -> Result<(), String> {
        self.server
            .query("SELECT 1")
            .fetch_one::<u8>()
            .await
            .map(drop)
            .map_err(|err| format!("clickhouse: {err}"))
    }

    pub async fn server_version(&self) -> clickhouse::error::Result<Option<ServerVersion>> {
        let text: String = self.server.query("SELECT version()").fetch_one().await?;
        Ok(ServerVersion::parse(&text))
    }

    /// Applies the migrations this server supports and has not seen yet.
    pub async fn migrate(&self, retention_days: u32) -> clickhouse::error::Result<Vec<u32>> {
        // The database name is validated at start-up (letters, digits, _).
        self.server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {}", self.database))
            .execute()
            .await?;
        self.client.query(SCHEMA_MIGRATIONS).execute().await?;
        let version = self.server_version().await?.unwrap_or(ServerVersion(0, 0));
        let applied: Vec<u32> = self.client.query(APPLIED_MIGRATIONS).fetch_all().await?;
        let mut newly = Vec::new();
        for migration in schema::migrations(retention_days) {
            if applied.contains(&migration.version) {
                continue;
            }
            if migration.requires > version {
                tracing::info!(
                    migration = migration.version,
                    description = migration.description,
                    server = ?version,
                    "migration needs a newer clickhouse, skipped"
                );
                continue;
            }
            for step in &migration.statements {
                if let Step::AddColumn { table, column, .. } = step
                    && self.has_column(table, column).await?
                {
                    continue;
                }
                self.client.query(&step.sql()).execute().await?;
            }
            self.client
                .query(RECORD_MIGRATION)
                .bind(migration.version)
                .bind(migration.description)
                .execute()
                .await?;
            tracing::info!(
                migration = migration.version,
                description = migration.description,
                "migration applied"
            );
            newly.push(migration.version);
        }
        Ok(newly)
    }

    async fn has_column(&self, table: &str, column: &str) -> clickhouse::error::Result<bool> {
        let count: u64 = self
            .client
            .query(HAS_COLUMN)
            .bind(table)
            .bind(column)
            .fetch_one()
            .await?;
        Ok(count > 0)
    }

    /// Inserts `rows` into `table` as one RowBinary insert.
    pub async fn insert<T>(&self, table: &str, rows: &[&T]) -> clickhouse::error::Result<()>
    where
        T: clickhouse::RowWrite + for<'a> Row<Value<'a> = T>,
    {
        let start = Instant::now();
        let mut insert = self.client.insert::<T>(table).await?;
        for row in rows {
            insert.write(*row).await?;
        }
        insert.end().await?;
        metrics::histogram!("storage_insert_seconds").record(start.elapsed().as_secs_f64());
        Ok(())
    }

    /// The stored copies of a device's fixes at `times`, with the message that stored each
    /// (to drop re-sent fixes before insert). Queried [`TIMES_PER_QUERY`] times at a time:
    /// the times are inlined into the SQL text, which `max_query_size` (256 KiB) bounds.
    pub async fn stored_copies(
        &self,
        tenant: &str,
        device: &str,
        times: &[i64],
    ) -> clickhouse::error::Result<Vec<StoredCopy>> {
        let mut sorted = times.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut copies = Vec::new();
        for chunk in sorted.chunks(TIMES_PER_QUERY) {
            copies.extend(
                self.stored_copies_query(tenant, device, chunk)
                    .fetch_all::<StoredCopy>()
                    .await?,
            );
        }
        Ok(copies)
    }

    /// `times` sorted, not empty.
    fn stored_copies_query(&self, tenant: &str, device: &str, times: &[i64]) -> Query {
        let (min, max) = (
            times.first().copied().unwrap_or_default(),
            times.last().copied().unwrap_or_default(),
        );
        self.client
            .query(STORED_COPIES)
            .bind(tenant)
            .bind(device)
            .bind(min)
            .bind(max)
            .bind(times)
    }

    /// A device's fixes in `[from, to]`, de-duplicated, streamed in time order.
    pub fn track(
        &self,
        tenant: &str,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        descending: bool,
        limit: u64,
    ) -> clickhouse::error::Result<RowCursor<TrackRow>> {
        self.track_query(tenant, device, from_ms, to_ms, descending, limit)
            .fetch()
    }

    fn track_query(
        &self,
        tenant: &str,
        device: &str,
        from_ms: i64,
        to_ms: i64,
        descending: bool,
        limit: u64,
    ) -> Query {
        // FINAL collapses fixes stored twice (redelivery, retries) at read time.
        let order = if descending { "DESC" } else { "ASC" };
        let limit = if limit == 0 { u64::MAX } else { limit };
        self.client
            .query(&format!(
                "SELECT {TRACK_COLUMNS} FROM fixes FINAL
                WHERE tenant_id = ? AND device_id = ? AND time_ms >= ? AND time_ms <= ?
                ORDER BY time_ms {order} LIMIT ?"
            ))
            .bind(tenant)
            .bind(device)
            .bind(from_ms)
            .bind(to_ms)
            .bind(limit)
    }

    /// Daily aggregates of a device for days `from_day..=to_day` (days since the epoch, UTC).
    pub async fn daily(
        &self,
        tenant: &str,
        device: &str,
        from_day: i64,
        to_day: i64,
    ) -> clickhouse::error::Result<Vec<DayRow>> {
        self.daily_query(tenant, device, from_day, to_day)
            .fetch_all()
            .await
    }

    fn daily_query(&self, tenant: &str, device: &str, from_day: i64, to_day: i64) -> Query {
        self.client
            .query(DAILY)
            .bind(tenant)
            .bind(device)
            .bind(from_day)
            .bind(to_day)
    }

    /// One page of a tenant's devices. `sort` holds names from [`SORT_FIELDS`] only.
    pub async fn devices(
        &self,
        tenant: &str,
        sort: &[(&'static str, bool)],
        offset: u64,
        limit: u64,
    ) -> clickhouse::error::Result<Vec<DeviceRow>> {
        self.devices_query(tenant, sort, offset, limit)
            .fetch_all()
            .await
    }

    fn devices_query(
        &self,
        tenant: &str,
        sort: &[(&'static str, bool)],
        offset: u64,
        limit: u64,
    ) -> Query {
        // Today as the consumer files days: UTC.
        let today = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64 / 86_400);
        let mut order: Vec<String> = sort
            .iter()
            .map(|(field, descending)| {
                format!("{field} {}", if *descending { "DESC" } else { "ASC" })
            })
            .collect();
        if !sort.iter().any(|(field, _)| *field == "device_id") {
            // A total order, so that pages neither repeat nor skip devices.
            order.push("device_id ASC".into());
        }
        self.client
            .query(&format!(
                "{DEVICES} ORDER BY {} LIMIT ?, ?",
                order.join(", ")
            ))
            .bind(today)
            .bind(today)
            .bind(tenant)
            .bind(offset)
            .bind(limit)
    }

    /// Each device's position at its given time (its `last_ms` from [`Self::devices`]): point
    /// lookups on the primary key, so a page of devices costs a few granules per device
    /// whatever their history. A device whose fix is gone (deleted meanwhile) is absent.
    pub async fn last_positions(
        &self,
        tenant: &str,
        devices: &[(&str, i64)],
    ) -> clickhouse::error::Result<HashMap<String, (f64, f64)>> {
        let mut positions = HashMap::with_capacity(devices.len());
        for chunk in devices.chunks(DEVICES_PER_POSITION_QUERY) {
            let rows = self
                .last_positions_query(tenant, chunk)
                .fetch_all::<PositionRow>()
                .await?;
            // A fix not merged yet may come twice, with the same values.
            positions.extend(
                rows.into_iter()
                    .map(|row| (row.device_id, (row.lat, row.lon))),
            );
        }
        Ok(positions)
    }

    /// `devices` not empty.
    fn last_positions_query(&self, tenant: &str, devices: &[(&str, i64)]) -> Query {
        // A tuple IN uses the primary key (tenant_id, device_id, time_ms) on 18.16 already.
        let pairs = vec!["(?, ?)"; devices.len()].join(", ");
        let mut query = self
            .client
            .query(&format!("{LAST_POSITIONS} ({pairs})"))
            .bind(tenant);
        for (device, time_ms) in devices {
            query = query.bind(*device).bind(*time_ms);
        }
        query
    }

    /// A tenant's events, de-duplicated, in (time, device, type, geofence, place) order.
    pub async fn events(
        &self,
        filter: &EventFilter<'_>,
    ) -> clickhouse::error::Result<Vec<EventRow>> {
        self.events_query(filter).fetch_all().await
    }

    fn events_query(&self, filter: &EventFilter<'_>) -> Query {
        // FINAL collapses an event stored twice before the parts are merged. The optional
        // filters are left out of the text rather than bound empty: `has([], x)` has no
        // element type on 18.16.
        let device = if filter.device.is_some() {
            " AND device_id = ?"
        } else {
            ""
        };
        let types = if filter.types.is_empty() {
            ""
        } else {
            " AND has(?, event_type)"
        };
        let mut query = self
            .client
            .query(&format!(
                "SELECT {EVENT_COLUMNS} FROM events FINAL
                WHERE tenant_id = ?{device} AND time_ms >= ? AND time_ms <= ?{types}
                ORDER BY time_ms, device_id, event_type, geofence_id, place_id LIMIT ?"
            ))
            .bind(filter.tenant);
        if let Some(device) = filter.device {
            query = query.bind(device);
        }
        query = query.bind(filter.from_ms).bind(filter.to_ms);
        if !filter.types.is_empty() {
            query = query.bind(filter.types);
        }
        query.bind(filter.limit)
    }

    /// A device's stays overlapping the filter's range, de-duplicated, in start order.
    pub async fn stays(
        &self,
        filter: &HistoryFilter<'_>,
    ) -> clickhouse::error::Result<Vec<StayRow>> {
        self.history_query("stays", filter).fetch_all().await
    }

    /// A device's trips overlapping the filter's range, de-duplicated, in start order.
    pub async fn trips(
        &self,
        filter: &HistoryFilter<'_>,
    ) -> clickhouse::error::Result<Vec<TripRow>> {
        self.history_query("trips", filter).fetch_all().await
    }

    /// `table` is one of [`HISTORY_TABLES`].
    fn history_query(&self, table: &str, filter: &HistoryFilter<'_>) -> Query {
        let columns = if table == "stays" {
            StayRow::COLUMN_NAMES
        } else {
            TripRow::COLUMN_NAMES
        };
        // FINAL keeps the highest version of a stay or trip stored more than once; the WHERE
        // on end_ms applies after it (18.16 never moves it to PREWHERE under FINAL, current
        // servers only with optimize_move_to_prewhere_if_final), so an older copy cannot
        // match in place of the newest.
        self.client
            .query(&format!(
                "SELECT {} FROM {table} FINAL
                WHERE tenant_id = ? AND device_id = ? AND end_ms >= ? AND start_ms <= ?
                ORDER BY start_ms LIMIT ?",
                columns.join(", ")
            ))
            .bind(filter.tenant)
            .bind(filter.device)
            .bind(filter.from_ms)
            .bind(filter.to_ms)
            .bind(filter.limit)
    }

    /// Deletes a device's stays and trips that start at or after `from_ms`, and waits (at
    /// most `wait`) for the server to apply the mutations. Rows inserted after this call are
    /// never touched: a mutation applies to the parts that existed when it was submitted.
    /// `Ok(false)`: still being applied when `wait` ran out (they will be, later).
    pub async fn delete_history(
        &self,
        tenant: &str,
        device: &str,
        from_ms: i64,
        wait: std::time::Duration,
    ) -> clickhouse::error::Result<bool> {
        for query in self.delete_history_queries(tenant, device, from_ms) {
            query.execute().await?;
        }
        // 18.16 has no mutations_sync: poll. Any pending mutation of these tables counts,
        // concurrent deletes of other devices included; they are small and done together.
        let until = tokio::time::Instant::now() + wait;
        loop {
            let pending: u64 = self
                .client
                .query(PENDING_HISTORY_MUTATIONS)
                .fetch_one()
                .await?;
            if pending == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    fn delete_history_queries(&self, tenant: &str, device: &str, from_ms: i64) -> Vec<Query> {
        HISTORY_TABLES
            .iter()
            .map(|table| {
                self.client
                    .query(&format!(
                        "ALTER TABLE {table} DELETE
                        WHERE tenant_id = ? AND device_id = ? AND start_ms >= ?"
                    ))
                    .bind(tenant)
                    .bind(device)
                    .bind(from_ms)
            })
            .collect()
    }

    /// Deletes a device's fixes, aggregates, events, stays and trips (asynchronous mutations
    /// on the server).
    pub async fn delete_device(&self, tenant: &str, device: &str) -> clickhouse::error::Result<()> {
        for query in self.delete_queries(tenant, device) {
            query.execute().await?;
        }
        Ok(())
    }

    fn delete_queries(&self, tenant: &str, device: &str) -> Vec<Query> {
        DEVICE_TABLES
            .iter()
            .map(|table| {
                self.client
                    .query(&format!(
                        "ALTER TABLE {table} DELETE WHERE tenant_id = ? AND device_id = ?"
                    ))
                    .bind(tenant)
                    .bind(device)
            })
            .collect()
    }

    /// Every statement this code sends, for a server of `version`, with sample values bound:
    /// the migrations, then each query text as built by the methods above, then inserts of
    /// sample rows (as VALUES: the crate sends RowBinary) split as the consumer splits them.
    /// `storage-service print-sql` prints them; `scripts/chdb-check` runs them on a current
    /// engine.
    pub fn statements_for_check(&self, version: ServerVersion) -> Vec<String> {
        let mut out = vec![
            format!("CREATE DATABASE IF NOT EXISTS {}", self.database),
            format!("USE {}", self.database),
            SCHEMA_MIGRATIONS.to_owned(),
            self.client
                .query(RECORD_MIGRATION)
                .bind(1u32)
                .bind("sample")
                .sql_display()
                .to_string(),
            APPLIED_MIGRATIONS.to_owned(),
            self.client
                .query(HAS_COLUMN)
                .bind("fixes")
                .bind("time_ms")
                .sql_display()
                .to_string(),
        ];
        for migration in schema::migrations(30) {
            if migration.requires <= version {
                out.extend(migration.statements.iter().map(Step::sql));
            }
        }
        // Fixes over 150 months: one insert would touch more partitions than a current
        // server takes (max_partitions_per_insert_block = 100).
        let rows: Vec<FixRow> = (0..150i64)
            .map(|month| FixRow {
                tenant_id: "t".into(),
                device_id: "d".into(),
                time_ms: 1_500_000_000_000 + month * 31 * 86_400_000,
                lat: 1.0,
                lon: 2.0,
                accuracy_m: Some(3.0),
                speed_mps: None,
                heading_deg: None,
                altitude_m: None,
                segment: 1,
                distance_m: 5.0,
                dt_ms: 60_000,
                speed_kmh: 7.0,
                reanchored: 0,
                kafka_partition: 0,
                kafka_offset: month,
            })
            .collect();
        for chunk in split_by_month(&rows, |row| row.time_ms.div_euclid(DAY_MS)) {
            let rows: Vec<&FixRow> = chunk.iter().map(|&i| &rows[i]).collect();
            out.push(values_insert(&self.client, "fixes", &rows));
        }
        let part = DayPart {
            tenant_id: "t".into(),
            device_id: "d".into(),
            day: 20_000,
            kafka_partition: 0,
            kafka_offset: 1,
            fix_count: 2,
            distance_sum_m: 3.0,
            speed_max_kmh: 4.0,
            time_min_ms: 5,
            time_max_ms: 6,
        };
        out.push(values_insert(&self.client, "daily_parts", &[&part]));
        let events: Vec<EventRow> = (0..150i64)
            .map(|month| EventRow {
                tenant_id: "t".into(),
                device_id: "d".into(),
                time_ms: 1_500_000_000_000 + month * 31 * 86_400_000,
                event_type: 1,
                geofence_id: "g".into(),
                place_id: String::new(),
                lat: 1.0,
                lon: 2.0,
                has_fix: 1,
                fix_time_ms: 1_500_000_000_000 + month * 31 * 86_400_000,
                fix_lat: 1.0,
                fix_lon: 2.0,
                fix_accuracy_m: Some(3.0),
                fix_speed_mps: None,
                fix_heading_deg: None,
                fix_altitude_m: None,
            })
            .collect();
        for chunk in split_by_month(&events, |row| row.time_ms.div_euclid(DAY_MS)) {
            let rows: Vec<&EventRow> = chunk.iter().map(|&i| &events[i]).collect();
            out.push(values_insert(&self.client, "events", &rows));
        }
        let times: Vec<i64> = (0..TIMES_PER_QUERY as i64)
            .map(|i| 1_500_000_000_000 + i)
            .collect();
        let queries = [
            self.stored_copies_query("t", "d", &times),
            self.track_query("t", "d", 0, i64::MAX, false, 0),
            self.track_query("t", "d", 0, i64::MAX, true, 10),
            self.daily_query("t", "d", 0, 30_000),
            self.devices_query("t", &[], 0, 100),
            self.last_positions_query(
                "t",
                &vec![("d", 1_500_000_000_000); DEVICES_PER_POSITION_QUERY],
            ),
            self.devices_query(
                "t",
                &SORT_FIELDS.iter().map(|f| (*f, true)).collect::<Vec<_>>(),
                100,
                100,
            ),
        ];
        out.extend(queries.iter().map(|q| q.sql_display().to_string()));
        for (device, types) in [(None, &[][..]), (Some("d"), &[1u8, 2, 3, 4][..])] {
            let filter = EventFilter {
                tenant: "t",
                device,
                from_ms: 0,
                to_ms: i64::MAX,
                types,
                limit: 10_000,
            };
            out.push(self.events_query(&filter).sql_display().to_string());
        }
        let stay = StayRow {
            tenant_id: "t".into(),
            device_id: "d".into(),
            start_ms: 1_500_000_000_000,
            end_ms: 1_500_000_600_000,
            place_id: "p".into(),
            lat: 1.0,
            lon: 2.0,
            fixes: 3,
            version: 1_500_000_700_000,
        };
        out.push(values_insert(&self.client, "stays", &[&stay]));
        let trip = TripRow {
            tenant_id: "t".into(),
            device_id: "d".into(),
            start_ms: 1_500_000_600_000,
            end_ms: 1_500_001_200_000,
            from_place_id: "p".into(),
            from_lat: 1.0,
            from_lon: 2.0,
            to_place_id: "q".into(),
            to_lat: 1.1,
            to_lon: 2.1,
            distance_m: 14_000.0,
            max_speed_kmh: 90.0,
            mean_speed_kmh: 84.0,
            fixes: 11,
            version: 1_500_001_300_000,
        };
        out.push(values_insert(&self.client, "trips", &[&trip]));
        let history = HistoryFilter {
            tenant: "t",
            device: "d",
            from_ms: 0,
            to_ms: i64::MAX,
            limit: 10_000,
        };
        for table in HISTORY_TABLES {
            out.push(
                self.history_query(table, &history)
                    .sql_display()
                    .to_string(),
            );
        }
        out.extend(
            self.delete_history_queries("t", "d", 1_500_000_000_000)
                .iter()
                .map(|q| q.sql_display().to_string()),
        );
        out.push(PENDING_HISTORY_MUTATIONS.to_owned());
        out.extend(
            self.delete_queries("t", "d")
                .iter()
                .map(|q| q.sql_display().to_string()),
        );
        out
    }
}

/// `INSERT INTO table (columns) VALUES (…), …` with each row's values bound in column order.
fn values_insert<T: Row + Serialize>(client: &Client, table: &str, rows: &[&T]) -> String {
    let one = format!("({})", vec!["?"; T::COLUMN_NAMES.len()].join(", "));
    let mut query = client.query(&format!(
        "INSERT INTO {table} ({}) VALUES {}",
        T::COLUMN_NAMES.join(", "),
        vec![one.as_str(); rows.len()].join(", ")
    ));
    for row in rows {
        // The SQL binder takes no structs: the row's fields by name, through JSON.
        let fields = serde_json::to_value(row).unwrap_or_default();
        for column in T::COLUMN_NAMES {
            query = match &fields[column] {
                serde_json::Value::Null => query.bind(None::<u8>),
                value => query.bind(value),
            };
        }
    }
    query.sql_display().to_string()
}

const DAY_MS: i64 = 86_400_000;

/// At most this many replay times go into one lookup's SQL text (~20 KB).
pub const TIMES_PER_QUERY: usize = 1000;

/// At most this many monthly partitions in one insert: current servers refuse more than
/// `max_partitions_per_insert_block` (100) by default.
pub const MONTHS_PER_INSERT: usize = 100;

/// The tables holding rows of a device: DeleteDevice deletes from each.
const DEVICE_TABLES: [&str; 5] = ["fixes", "daily_parts", "events", "stays", "trips"];

/// Mutations of the stays and trips tables the server has not finished.
const PENDING_HISTORY_MUTATIONS: &str = "SELECT count() FROM system.mutations
    WHERE database = currentDatabase() AND table IN ('stays', 'trips') AND is_done = 0";

const SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version UInt32, description String, applied_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree ORDER BY version";

const RECORD_MIGRATION: &str = "INSERT INTO schema_migrations (version, description) VALUES (?, ?)";

const APPLIED_MIGRATIONS: &str = "SELECT version FROM schema_migrations FINAL";

const HAS_COLUMN: &str = "SELECT count() FROM system.columns
    WHERE database = currentDatabase() AND table = ? AND name = ?";

const STORED_COPIES: &str = "SELECT time_ms, kafka_partition, kafka_offset FROM fixes
    WHERE tenant_id = ? AND device_id = ? AND time_ms >= ? AND time_ms <= ? AND has(?, time_ms)";

// The parts of a day are summed; FINAL first collapses parts a redelivery wrote twice.
const DAILY: &str = "SELECT device_id, toString(day) AS day_text, sum(fix_count) AS fixes,
        sum(distance_sum_m) AS distance_m, max(speed_max_kmh) AS max_speed_kmh,
        min(time_min_ms) AS first_ms, max(time_max_ms) AS last_ms
    FROM daily_parts FINAL
    WHERE tenant_id = ? AND device_id = ? AND toInt64(toUInt16(day)) >= ? AND toInt64(toUInt16(day)) <= ?
    GROUP BY device_id, day ORDER BY day";

/// Followed by `ORDER BY … LIMIT ?, ?`; the output names are [`SORT_FIELDS`].
/// The first two `?` are today's UTC day number.
const DEVICES: &str = "SELECT device_id, sum(fix_count) AS fixes, min(time_min_ms) AS first_ms,
        max(time_max_ms) AS last_ms, sum(distance_sum_m) AS distance_m,
        max(speed_max_kmh) AS max_speed_kmh,
        sumIf(fix_count, toInt64(toUInt16(day)) = ?) AS fixes_today,
        sumIf(distance_sum_m, toInt64(toUInt16(day)) = ?) AS distance_today_m
    FROM daily_parts FINAL WHERE tenant_id = ?
    GROUP BY device_id";

/// Followed by the `(device_id, time_ms)` pairs.
const LAST_POSITIONS: &str = "SELECT device_id, lat, lon FROM fixes
    WHERE tenant_id = ? AND (device_id, time_ms) IN";

/// Groups row indices (in order within each group) so that no group holds more than
/// [`MONTHS_PER_INSERT`] UTC months, the `fixes` and `daily_parts` partitions.
pub fn split_by_month<T>(rows: &[T], day_of: impl Fn(&T) -> i64) -> Vec<Vec<usize>> {
    let mut by_month: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (index, row) in rows.iter().enumerate() {
        by_month.entry(month(day_of(row))).or_default().push(index);
    }
    let months: Vec<Vec<usize>> = by_month.into_values().collect();
    months
        .chunks(MONTHS_PER_INSERT)
        .map(|chunk| {
            let mut indices: Vec<usize> = chunk.concat();
            indices.sort_unstable();
            indices
        })
        .collect()
}

/// `year * 12 + month` of a day since the epoch (proleptic Gregorian, as ClickHouse's
/// toYYYYMM for the dates it represents).
fn month(day: i64) -> i64 {
    // Howard Hinnant's civil_from_days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    y * 12 + m
}

/// How an insert failure concerns the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The server, the network or the schema: retry the same rows later.
    Transient,
    /// A smaller insert may pass (ClickHouse's TOO_MANY_PARTS, code 252: too many
    /// partitions in one block; or too many parts, which is transient when one row fails).
    TooBig,
    /// ClickHouse refuses some of these rows and will refuse them again.
    Rows,
}

/// Server exception codes that a row's values cause (bad values, failed constraints or
/// expressions). Anything else, schema and access errors included, is retried, never
/// dead-lettered: a stall is visible and loses nothing.
const ROW_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    33,  // CANNOT_READ_ALL_DATA
    36,  // BAD_ARGUMENTS
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    469, // VIOLATED_CONSTRAINT
];

const TOO_MANY_PARTS: u32 = 252;

/// Classifies an insert error by the exception code in the server's answer.
pub fn failure(error: &clickhouse::error::Error) -> Failure {
    let clickhouse::error::Error::BadResponse(text) = error else {
        return Failure::Transient;
    };
    match exception_code(text) {
        Some(TOO_MANY_PARTS) => Failure::TooBig,
        Some(code) if ROW_CODES.contains(&code) => Failure::Rows,
        _ => Failure::Transient,
    }
}

/// `Code: 395. DB::Exception: …` → 395.
fn exception_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_match_clickhouse() {
        // toYYYYMM of these days: 1970-01, 2000-02, 2000-03, 2024-12, 2025-01.
        assert_eq!(month(0), 1970 * 12 + 1);
        assert_eq!(month(11_016), 2000 * 12 + 2); // 2000-02-29
        assert_eq!(month(11_017), 2000 * 12 + 3);
        assert_eq!(month(20_088), 2024 * 12 + 12); // 2024-12-31
        assert_eq!(month(20_089), 2025 * 12 + 1);
    }

    #[test]
    fn inserts_touch_at_most_100_months() {
        // 250 months, interleaved.
        let days: Vec<i64> = (0..1000).map(|i| (i % 250) * 31).collect();
        let groups = split_by_month(&days, |d| *d);
        assert_eq!(groups.len(), 3);
        let mut all: Vec<usize> = groups.concat();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "every row once");
        for group in &groups {
            let months: std::collections::BTreeSet<i64> =
                group.iter().map(|&i| month(days[i])).collect();
            assert!(months.len() <= MONTHS_PER_INSERT);
            assert!(group.windows(2).all(|w| w[0] < w[1]), "in order");
        }
        assert_eq!(split_by_month(&days[..10], |d| *d).len(), 1);
    }

    #[test]
    fn errors_are_classified_by_code() {
        let bad = |text: &str| clickhouse::error::Error::BadResponse(text.into());
        assert_eq!(
            failure(&bad(
                "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero"
            )),
            Failure::Rows
        );
        assert_eq!(
            failure(&bad(
                "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS) (version 26.9.1)"
            )),
            Failure::TooBig
        );
        assert_eq!(
            failure(&bad(
                "Code: 16. DB::Exception: No such column kafka_offset in table fixes"
            )),
            Failure::Transient
        );
        assert_eq!(
            failure(&clickhouse::error::Error::TimedOut),
            Failure::Transient
        );
        assert_eq!(failure(&bad("no code at all")), Failure::Transient);
    }
}
