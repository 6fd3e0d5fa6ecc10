//! ClickHouse: schema migrations, batched inserts, and the queries behind the Storage API,
//! all with bound values (never SQL built from input).

use std::time::Instant;

use clickhouse::{Client, Row, query::RowCursor};
use serde::{Deserialize, Serialize};

use crate::{
    config::StorageConfig,
    schema::{self, ServerVersion},
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
}

/// The fields ListDevices may sort by: the only names that ever reach an ORDER BY.
pub const SORT_FIELDS: &[&str] = &[
    "device_id",
    "fixes",
    "first_ms",
    "last_ms",
    "distance_m",
    "max_speed_kmh",
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
            .with_compression(match config.clickhouse_compression.as_str() {
                "lz4" => clickhouse::Compression::Lz4,
                _ => clickhouse::Compression::None,
            });
        if let Some(password) = &config.clickhouse_password {
            server = server.with_password(password);
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
        self.client
            .query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                    version UInt32, description String, applied_at DateTime DEFAULT now()
                ) ENGINE = ReplacingMergeTree ORDER BY version",
            )
            .execute()
            .await?;
        let version = self.server_version().await?.unwrap_or(ServerVersion(0, 0));
        let applied: Vec<u32> = self
            .client
            .query("SELECT version FROM schema_migrations FINAL")
            .fetch_all()
            .await?;
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
            for statement in &migration.statements {
                self.client.query(statement).execute().await?;
            }
            self.client
                .query("INSERT INTO schema_migrations (version, description) VALUES (?, ?)")
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

    /// Inserts `rows` as one RowBinary insert.
    pub async fn insert(&self, rows: &[FixRow]) -> clickhouse::error::Result<()> {
        let start = Instant::now();
        let mut insert = self.client.insert::<FixRow>("fixes").await?;
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        metrics::histogram!("storage_insert_seconds").record(start.elapsed().as_secs_f64());
        Ok(())
    }

    /// Which of `times` a device already has stored (to drop re-sent fixes before insert).
    pub async fn stored_times(
        &self,
        tenant: &str,
        device: &str,
        times: &[i64],
    ) -> clickhouse::error::Result<Vec<i64>> {
        let (Some(min), Some(max)) = (times.iter().min(), times.iter().max()) else {
            return Ok(Vec::new());
        };
        self.client
            .query(
                "SELECT DISTINCT time_ms FROM fixes
                WHERE tenant_id = ? AND device_id = ? AND time_ms >= ? AND time_ms <= ? AND has(?, time_ms)",
            )
            .bind(tenant)
            .bind(device)
            .bind(min)
            .bind(max)
            .bind(times)
            .fetch_all()
            .await
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
            .fetch()
    }

    /// Daily aggregates of a device for days `from_day..=to_day` (days since the epoch, UTC).
    pub async fn daily(
        &self,
        tenant: &str,
        device: &str,
        from_day: i64,
        to_day: i64,
    ) -> clickhouse::error::Result<Vec<DayRow>> {
        self.client
            .query(
                "SELECT device_id, toString(day) AS day_text, countMerge(fixes) AS fixes,
                    sumMerge(distance_m) AS distance_m, maxMerge(max_speed_kmh) AS max_speed_kmh,
                    minMerge(first_ms) AS first_ms, maxMerge(last_ms) AS last_ms
                FROM daily_stats
                WHERE tenant_id = ? AND device_id = ? AND toInt64(toUInt16(day)) >= ? AND toInt64(toUInt16(day)) <= ?
                GROUP BY device_id, day ORDER BY day",
            )
            .bind(tenant)
            .bind(device)
            .bind(from_day)
            .bind(to_day)
            .fetch_all()
            .await
    }

    /// One page of a tenant's devices. `sort` holds names from [`SORT_FIELDS`] only.
    pub async fn devices(
        &self,
        tenant: &str,
        sort: &[(&'static str, bool)],
        offset: u64,
        limit: u64,
    ) -> clickhouse::error::Result<Vec<DeviceRow>> {
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
                "SELECT device_id, countMerge(fixes) AS fixes, minMerge(first_ms) AS first_ms,
                    maxMerge(last_ms) AS last_ms, sumMerge(distance_m) AS distance_m,
                    maxMerge(max_speed_kmh) AS max_speed_kmh
                FROM daily_stats WHERE tenant_id = ?
                GROUP BY device_id ORDER BY {} LIMIT ?, ?",
                order.join(", ")
            ))
            .bind(tenant)
            .bind(offset)
            .bind(limit)
            .fetch_all()
            .await
    }

    /// Deletes a device's fixes and aggregates (an asynchronous mutation on the server).
    pub async fn delete_device(&self, tenant: &str, device: &str) -> clickhouse::error::Result<()> {
        for table in ["fixes", "daily_stats"] {
            self.client
                .query(&format!(
                    "ALTER TABLE {table} DELETE WHERE tenant_id = ? AND device_id = ?"
                ))
                .bind(tenant)
                .bind(device)
                .execute()
                .await?;
        }
        Ok(())
    }
}
