//! The ClickHouse schema as versioned migrations. The base runs on Debian's 18.16; features
//! old servers lack (DateTime64, skip indexes, TTL) come as later migrations gated on
//! `SELECT version()`, applied once the server can take them.

/// A server version, `major.minor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion(pub u32, pub u32);

impl ServerVersion {
    /// Parses `SELECT version()` output such as `18.16.1` or `24.8.4.13`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self(major, minor))
    }
}

pub struct Migration {
    pub version: u32,
    pub description: &'static str,
    /// The oldest server that has what the statements use.
    pub requires: ServerVersion,
    /// Idempotent steps (`IF NOT EXISTS`), so two replicas starting together are safe.
    pub statements: Vec<Step>,
}

/// One migration step.
pub enum Step {
    Sql(String),
    /// `ALTER TABLE … ADD COLUMN`, run only when the column is missing: 18.16 has no
    /// `ADD COLUMN IF NOT EXISTS`.
    AddColumn {
        table: &'static str,
        column: &'static str,
        definition: &'static str,
    },
}

impl Step {
    /// The statement as sent to the server.
    pub fn sql(&self) -> String {
        match self {
            Self::Sql(sql) => sql.clone(),
            Self::AddColumn {
                table,
                column,
                definition,
            } => format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"),
        }
    }
}

impl From<&str> for Step {
    fn from(sql: &str) -> Self {
        Self::Sql(sql.to_owned())
    }
}

impl From<String> for Step {
    fn from(sql: String) -> Self {
        Self::Sql(sql)
    }
}

const BASE: ServerVersion = ServerVersion(18, 16);

/// The stays or trips table: one row per stay or trip of a device, identified by its start:
/// learning produces the same one again on a retry or a relearn, and the row with the highest
/// version (the Kafka message's timestamp) wins at read time (FINAL). The partition follows
/// the start, part of the key, so copies meet in a merge.
fn history_table(table: &str, columns: &str) -> Step {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            tenant_id String, device_id String, start_ms Int64, end_ms Int64,
            {columns},
            fixes UInt32, version UInt64
        ) ENGINE = ReplacingMergeTree(version)
        PARTITION BY toYYYYMM(toDateTime(intDiv(start_ms, 1000), 'UTC'))
        ORDER BY (tenant_id, device_id, start_ms)"
    )
    .into()
}

/// Every migration, in order. `retention_days` 0 keeps data forever.
pub fn migrations(retention_days: u32) -> Vec<Migration> {
    let mut all = vec![
        Migration {
            version: 1,
            description: "fixes, daily stats",
            requires: BASE,
            statements: vec![
                // Time stays an exact Int64 of milliseconds: DateTime64 is missing before 20.1.
                "CREATE TABLE IF NOT EXISTS fixes (
                    tenant_id String,
                    device_id String,
                    time_ms Int64,
                    lat Float64,
                    lon Float64,
                    accuracy_m Nullable(Float32),
                    speed_mps Nullable(Float32),
                    heading_deg Nullable(Float32),
                    altitude_m Nullable(Float32),
                    segment UInt32,
                    distance_m Float64,
                    dt_ms Int64,
                    speed_kmh Float64,
                    reanchored UInt8
                ) ENGINE = ReplacingMergeTree
                PARTITION BY toYYYYMM(toDateTime(intDiv(time_ms, 1000), 'UTC'))
                ORDER BY (tenant_id, device_id, time_ms)"
                    .into(),
                "CREATE TABLE IF NOT EXISTS daily_stats (
                    tenant_id String,
                    device_id String,
                    day Date,
                    fixes AggregateFunction(count),
                    distance_m AggregateFunction(sum, Float64),
                    max_speed_kmh AggregateFunction(max, Float64),
                    first_ms AggregateFunction(min, Int64),
                    last_ms AggregateFunction(max, Int64)
                ) ENGINE = AggregatingMergeTree
                PARTITION BY toYYYYMM(day)
                ORDER BY (tenant_id, device_id, day)"
                    .into(),
                "CREATE MATERIALIZED VIEW IF NOT EXISTS daily_stats_mv TO daily_stats AS
                SELECT tenant_id, device_id, toDate(toDateTime(intDiv(time_ms, 1000), 'UTC')) AS day,
                    countState() AS fixes, sumState(distance_m) AS distance_m,
                    maxState(speed_kmh) AS max_speed_kmh, minState(time_ms) AS first_ms,
                    maxState(time_ms) AS last_ms
                FROM fixes GROUP BY tenant_id, device_id, day"
                    .into(),
            ],
        },
        Migration {
            version: 2,
            description: "daily aggregates per kafka message, exact under redelivery",
            requires: BASE,
            statements: vec![
                // The message each row came from (-1: stored before this migration).
                Step::AddColumn {
                    table: "fixes",
                    column: "kafka_partition",
                    definition: "Int32 DEFAULT -1",
                },
                Step::AddColumn {
                    table: "fixes",
                    column: "kafka_offset",
                    definition: "Int64 DEFAULT -1",
                },
                // One row per Kafka message and day, computed by the consumer: a redelivered
                // message yields the same key and collapses, where a materialized view would
                // count it twice. Reads use FINAL and sum over the parts.
                "CREATE TABLE IF NOT EXISTS daily_parts (
                    tenant_id String,
                    device_id String,
                    day Date,
                    kafka_partition Int32,
                    kafka_offset Int64,
                    fix_count UInt64,
                    distance_sum_m Float64,
                    speed_max_kmh Float64,
                    time_min_ms Int64,
                    time_max_ms Int64
                ) ENGINE = ReplacingMergeTree
                PARTITION BY toYYYYMM(day)
                ORDER BY (tenant_id, device_id, day, kafka_partition, kafka_offset)"
                    .into(),
                // The view first, so nothing reaches daily_stats after its copy.
                "DROP TABLE IF EXISTS daily_stats_mv".into(),
                // Idempotent: a second copy has the same keys and collapses.
                "INSERT INTO daily_parts (tenant_id, device_id, day, kafka_partition, kafka_offset,
                    fix_count, distance_sum_m, speed_max_kmh, time_min_ms, time_max_ms)
                SELECT tenant_id, device_id, day, -1, -1, countMerge(fixes), sumMerge(distance_m),
                    maxMerge(max_speed_kmh), minMerge(first_ms), maxMerge(last_ms)
                FROM daily_stats GROUP BY tenant_id, device_id, day"
                    .into(),
            ],
        },
        Migration {
            version: 3,
            description: "drop daily_stats, copied into daily_parts",
            requires: BASE,
            statements: vec!["DROP TABLE IF EXISTS daily_stats".into()],
        },
        Migration {
            version: 4,
            description: "geofence and place events",
            requires: BASE,
            statements: vec![
                // One row per distinct event: the sorting key is the event's identity, so an
                // event produced twice collapses (reads use FINAL). The triggering fix is kept
                // as columns (has_fix 0: the event came without one).
                "CREATE TABLE IF NOT EXISTS events (
                    tenant_id String,
                    device_id String,
                    time_ms Int64,
                    event_type UInt8,
                    geofence_id String,
                    place_id String,
                    lat Float64,
                    lon Float64,
                    has_fix UInt8,
                    fix_time_ms Int64,
                    fix_lat Float64,
                    fix_lon Float64,
                    fix_accuracy_m Nullable(Float32),
                    fix_speed_mps Nullable(Float32),
                    fix_heading_deg Nullable(Float32),
                    fix_altitude_m Nullable(Float32)
                ) ENGINE = ReplacingMergeTree
                PARTITION BY toYYYYMM(toDateTime(intDiv(time_ms, 1000), 'UTC'))
                ORDER BY (tenant_id, device_id, time_ms, event_type, geofence_id, place_id)"
                    .into(),
            ],
        },
        Migration {
            version: 5,
            description: "stays and trips",
            requires: BASE,
            statements: vec![
                history_table("stays", "place_id String, lat Float64, lon Float64"),
                history_table(
                    "trips",
                    "from_place_id String, from_lat Float64, from_lon Float64,
                    to_place_id String, to_lat Float64, to_lon Float64,
                    distance_m Float64, max_speed_kmh Float64, mean_speed_kmh Float64",
                ),
            ],
        },
        Migration {
            version: 101,
            description: "fixes.time as DateTime64(3) for analytics",
            requires: ServerVersion(20, 5),
            statements: vec![
                "ALTER TABLE fixes ADD COLUMN IF NOT EXISTS time DateTime64(3, 'UTC')
                MATERIALIZED fromUnixTimestamp64Milli(time_ms)"
                    .into(),
            ],
        },
        Migration {
            version: 102,
            description: "skip index on speed",
            requires: ServerVersion(20, 1),
            statements: vec![
                "ALTER TABLE fixes ADD INDEX IF NOT EXISTS speed_kmh_minmax speed_kmh TYPE minmax GRANULARITY 4".into(),
            ],
        },
    ];
    if retention_days > 0 {
        // Versioned by the setting, so changing RETENTION_DAYS applies a new TTL.
        all.push(Migration {
            version: 1_000_000 + retention_days,
            description: "retention TTL",
            requires: ServerVersion(20, 1),
            statements: vec![format!(
                "ALTER TABLE fixes MODIFY TTL toDateTime(intDiv(time_ms, 1000)) + INTERVAL {retention_days} DAY"
            )
            .into()],
        });
        all.push(Migration {
            version: 2_000_000 + retention_days,
            description: "retention TTL of daily_parts",
            requires: ServerVersion(20, 1),
            statements: vec![
                format!("ALTER TABLE daily_parts MODIFY TTL day + INTERVAL {retention_days} DAY")
                    .into(),
            ],
        });
        all.push(Migration {
            version: 3_000_000 + retention_days,
            description: "retention TTL of events",
            requires: ServerVersion(20, 1),
            statements: vec![format!(
                "ALTER TABLE events MODIFY TTL toDateTime(intDiv(time_ms, 1000)) + INTERVAL {retention_days} DAY"
            )
            .into()],
        });
        for (base, table) in [(4_000_000, "stays"), (5_000_000, "trips")] {
            all.push(Migration {
                version: base + retention_days,
                description: "retention TTL of stays and trips",
                requires: ServerVersion(20, 1),
                statements: vec![format!(
                    "ALTER TABLE {table} MODIFY TTL toDateTime(intDiv(start_ms, 1000)) + INTERVAL {retention_days} DAY"
                )
                .into()],
            });
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(ServerVersion::parse("18.16.1"), Some(ServerVersion(18, 16)));
        assert_eq!(
            ServerVersion::parse("24.8.4.13\n"),
            Some(ServerVersion(24, 8))
        );
        assert_eq!(ServerVersion::parse("banana"), None);
        assert!(ServerVersion(18, 16) < ServerVersion(20, 1));
        assert!(ServerVersion(20, 10) > ServerVersion(20, 5));
    }

    #[test]
    fn old_servers_get_only_the_base() {
        let old: Vec<u32> = migrations(30)
            .iter()
            .filter(|m| m.requires <= ServerVersion(18, 16))
            .map(|m| m.version)
            .collect();
        assert_eq!(old, [1, 2, 3, 4, 5]);
        for statement in migrations(0)
            .iter()
            .filter(|m| m.requires <= ServerVersion(18, 16))
            .flat_map(|m| m.statements.iter().map(Step::sql))
        {
            for missing in [
                "DateTime64",
                "TTL",
                "INDEX",
                "CODEC",
                "LowCardinality",
                "SETTINGS",
            ] {
                assert!(!statement.contains(missing), "{missing} in {statement}");
            }
        }
    }

    #[test]
    fn modern_servers_get_datetime64_skip_index_and_ttl() {
        let modern: Vec<Migration> = migrations(30)
            .into_iter()
            .filter(|m| m.requires <= ServerVersion(24, 8))
            .collect();
        let text: Vec<String> = modern
            .iter()
            .flat_map(|m| m.statements.iter().map(Step::sql))
            .collect();
        let text = text.join("\n");
        assert!(text.contains("DateTime64(3, 'UTC')"));
        assert!(text.contains("TYPE minmax"));
        assert!(text.contains("MODIFY TTL toDateTime(intDiv(time_ms, 1000)) + INTERVAL 30 DAY"));
        assert!(
            migrations(0).iter().all(|m| !m.description.contains("TTL")),
            "no TTL when retention is off"
        );
    }

    #[test]
    fn versions_are_unique_and_ordered() {
        let versions: Vec<u32> = migrations(7).iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
    }
}
