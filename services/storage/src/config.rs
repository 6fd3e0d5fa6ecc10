//! storage-service settings, from the environment.

use clickhouse::Compression;
use serde::{Deserialize, Deserializer, de};
use trackmesh_shared::config::{
    self, CommonConfig, ConfigError, Duration, Secret, Validate, check_range,
};

pub const DEFAULT_PORT: u16 = 50053;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub storage: StorageConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(DEFAULT_PORT)?,
            storage: config::from_env()?,
        })
    }
}

impl AsRef<CommonConfig> for Config {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

/// Kafka, ClickHouse, batching and query limits (README, "Configuration").
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct StorageConfig {
    /// ClickHouse HTTP interface: `host:port` or URL.
    pub clickhouse_url: String,
    pub clickhouse_user: String,
    pub clickhouse_password: Option<Secret>,
    pub clickhouse_database: String,
    /// `none` or `lz4` for inserts and reads; lz4 trades CPU on both ends for bandwidth.
    #[serde(deserialize_with = "compression")]
    pub clickhouse_compression: Compression,
    /// Comma-separated `host:port` bootstrap brokers.
    pub kafka_brokers: String,
    pub kafka_topic: String,
    pub kafka_dlq_topic: String,
    /// Geofence and place events from learning; consumed by the group `{KAFKA_GROUP_ID}-events`.
    pub kafka_events_topic: String,
    pub kafka_group_id: String,
    /// Partitions of the topic when the service creates it.
    pub kafka_partitions: u32,
    /// Replicas of each partition when the service creates the topics (3 in production).
    pub kafka_replication_factor: u32,
    /// Consumer group session timeout; a join takes about half of it on tansu.
    pub kafka_session_timeout: Duration,
    /// How long a Store may wait for Kafka's acknowledgements.
    pub produce_timeout: Duration,
    /// Largest Kafka message the producer sends, the broker's `message.max.bytes`: Store splits
    /// a device's fixes into several messages under it.
    pub kafka_message_max_bytes: u32,
    /// How long the producer waits to fill a batch before sending it.
    pub kafka_linger: Duration,
    /// A ClickHouse insert happens at this many rows…
    pub batch_max_rows: u32,
    /// …or this much encoded data…
    pub batch_max_bytes: u64,
    /// …or when the oldest row has waited this long.
    pub batch_max_wait: Duration,
    /// Fixes per streamed track chunk.
    pub streaming_chunk_size: u32,
    /// Sort keys a ListDevices call may give.
    pub max_sort_fields: u32,
    /// Stored fixes are dropped after this many days when the server supports TTL; 0: keep.
    pub retention_days: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            clickhouse_url: "http://127.0.0.1:8123".into(),
            clickhouse_user: "default".into(),
            clickhouse_password: None,
            clickhouse_database: "trackmesh".into(),
            clickhouse_compression: Compression::None,
            kafka_brokers: "127.0.0.1:9092".into(),
            kafka_topic: "trackmesh.fixes".into(),
            kafka_dlq_topic: "trackmesh.fixes.dlq".into(),
            kafka_events_topic: "trackmesh.events".into(),
            kafka_group_id: "trackmesh-storage".into(),
            kafka_partitions: 12,
            kafka_replication_factor: 1,
            kafka_session_timeout: Duration::from_secs(10),
            produce_timeout: Duration::from_secs(10),
            // Kafka's default `message.max.bytes`.
            kafka_message_max_bytes: 1_000_000,
            // The gateway coalesces requests into batches: waiting here only adds latency.
            kafka_linger: Duration::from_millis(0),
            batch_max_rows: 50_000,
            batch_max_bytes: 64 * 1024 * 1024,
            batch_max_wait: Duration::from_secs(1),
            streaming_chunk_size: 1000,
            max_sort_fields: 5,
            retention_days: 0,
        }
    }
}

impl StorageConfig {
    /// The consumer group of the events topic: its own, so that its offsets and rebalances
    /// are independent of the fixes'.
    pub fn events_group_id(&self) -> String {
        format!("{}-events", self.kafka_group_id)
    }

    /// The ClickHouse URL with a scheme.
    pub fn clickhouse_url(&self) -> String {
        config::url("CLICKHOUSE_URL", &self.clickhouse_url, "http")
            .map(|url| url.as_str().trim_end_matches('/').to_owned())
            .unwrap_or_else(|_| self.clickhouse_url.clone())
    }
}

impl Validate for StorageConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = config::url("CLICKHOUSE_URL", &self.clickhouse_url, "http")?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::new(
                "CLICKHOUSE_URL",
                &self.clickhouse_url,
                "the HTTP interface is needed: http://host:8123 or https://…",
            ));
        }
        let database = &self.clickhouse_database;
        if database.is_empty()
            || !database
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            let rule = "letters, digits and _ only";
            return Err(ConfigError::new("CLICKHOUSE_DATABASE", database, rule));
        }
        config::kafka_brokers("KAFKA_BROKERS", &self.kafka_brokers)?;
        config::kafka_names(&[
            ("KAFKA_TOPIC", &self.kafka_topic),
            ("KAFKA_DLQ_TOPIC", &self.kafka_dlq_topic),
            ("KAFKA_EVENTS_TOPIC", &self.kafka_events_topic),
            ("KAFKA_GROUP_ID", &self.kafka_group_id),
        ])?;
        #[rustfmt::skip]
        let counts = [
            ("KAFKA_PARTITIONS", self.kafka_partitions, 1..=10_000),
            ("KAFKA_REPLICATION_FACTOR", self.kafka_replication_factor, 1..=16),
            // Room for a few fixes after key, headers and record overhead; librdkafka's bound.
            ("KAFKA_MESSAGE_MAX_BYTES", self.kafka_message_max_bytes, 16_384..=1_000_000_000),
            ("BATCH_MAX_ROWS", self.batch_max_rows, 1..=10_000_000),
            ("STREAMING_CHUNK_SIZE", self.streaming_chunk_size, 1..=100_000),
            ("MAX_SORT_FIELDS", self.max_sort_fields, 1..=6),
            ("RETENTION_DAYS", self.retention_days, 0..=36_500),
        ];
        let (secs, millis) = (Duration::from_secs, Duration::from_millis);
        #[rustfmt::skip]
        let durations = [
            ("KAFKA_SESSION_TIMEOUT", self.kafka_session_timeout, secs(1)..=secs(300)),
            ("PRODUCE_TIMEOUT", self.produce_timeout, millis(100)..=secs(300)),
            ("KAFKA_LINGER", self.kafka_linger, millis(0)..=secs(5)),
            ("BATCH_MAX_WAIT", self.batch_max_wait, millis(1)..=secs(600)),
        ];
        for (var, value, range) in counts {
            check_range(var, value, range)?;
        }
        for (var, value, range) in durations {
            check_range(var, value, range)?;
        }
        check_range("BATCH_MAX_BYTES", self.batch_max_bytes, 1024..=4 << 30)
    }
}

/// `CLICKHOUSE_COMPRESSION`: `none` or `lz4`, read once into the client's setting.
fn compression<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Compression, D::Error> {
    match String::deserialize(deserializer)?.as_str() {
        "none" => Ok(Compression::None),
        "lz4" => Ok(Compression::Lz4),
        // The message names the variable: serde does not know it.
        other => Err(de::Error::custom(format_args!(
            "CLICKHOUSE_COMPRESSION={other}: allowed none or lz4"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(vars: &[(&str, &str)]) -> Result<StorageConfig, ConfigError> {
        config::from_vars(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
    }

    #[test]
    fn the_password_stays_out_of_debug() {
        let config = load(&[("CLICKHOUSE_PASSWORD", "hunter2")]).unwrap();
        assert_eq!(
            config.clickhouse_password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn compression_is_parsed_once() {
        assert_eq!(load(&[]).unwrap().clickhouse_compression, Compression::None);
        let lz4 = load(&[("CLICKHOUSE_COMPRESSION", "lz4")]).unwrap();
        assert_eq!(lz4.clickhouse_compression, Compression::Lz4);
        assert_eq!(
            load(&[("CLICKHOUSE_COMPRESSION", "zstd")])
                .unwrap_err()
                .to_string(),
            "invalid configuration: CLICKHOUSE_COMPRESSION=zstd: allowed none or lz4"
        );
    }
}
