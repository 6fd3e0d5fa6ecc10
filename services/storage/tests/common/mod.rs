//! Helpers shared by storage's integration tests: a storage of its own (database, topic and
//! group no other test uses), run in-process on port 0 against the shared backends.

use std::time::Duration;

use storage::{Config, StorageConfig, run};
use testkit::Service;
use tonic::transport::Channel;
use trackmesh_proto::v1::storage_client::StorageClient;
use trackmesh_shared::config::{CommonConfig, Duration as ConfigDuration};

/// A storage config of its own: database, topic and group no other test uses.
pub fn config() -> Config {
    let name = testkit::unique("st");
    let mut common = CommonConfig::with_port(storage::DEFAULT_PORT);
    common.readiness_interval = ConfigDuration::from_millis(100);
    Config {
        common,
        storage: StorageConfig {
            clickhouse_url: testkit::clickhouse_url(),
            clickhouse_database: name.clone(),
            kafka_brokers: testkit::kafka_brokers(),
            kafka_topic: format!("{name}.fixes"),
            kafka_dlq_topic: format!("{name}.dlq"),
            kafka_events_topic: format!("{name}.events"),
            kafka_group_id: name,
            kafka_partitions: 4,
            kafka_session_timeout: ConfigDuration::from_secs(6),
            produce_timeout: ConfigDuration::from_secs(5),
            batch_max_wait: ConfigDuration::from_millis(200),
            ..StorageConfig::default()
        },
    }
}

/// The storage of `config`, ready, and a client of it.
pub async fn start(config: Config) -> (Service, StorageClient<Channel>) {
    let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
    service.wait_ready(200, Duration::from_secs(30)).await;
    // Room for the largest batches a test sends.
    let client = StorageClient::connect(service.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    (service, client)
}
