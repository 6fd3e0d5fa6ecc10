//! Helpers shared by storage's integration tests: a storage of its own (database, topics and
//! group no other test uses), run in-process on port 0 against the shared backends, and a
//! producer writing to its topics as learning or an earlier release would.

// Each test binary uses some of these.
#![allow(dead_code)]

use std::time::Duration;

use prost::Message as _;
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use storage::{Config, StorageConfig, run};
use testkit::Service;
use tonic::transport::Channel;
use trackmesh_proto::v1::storage_client::StorageClient;
use trackmesh_shared::config::{CommonConfig, Duration as ConfigDuration};
use trackmesh_shared::event_messages::TenantEvents;

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

/// A storage of its own, a client of it, and its events topic.
pub async fn start_with_events() -> (Service, StorageClient<Channel>, Topic) {
    let config = config();
    let events = Topic::new(&config.storage.kafka_events_topic);
    let (service, client) = start(config).await;
    (service, client, events)
}

/// A topic a test writes to as another service would.
pub struct Topic {
    pub name: String,
    producer: FutureProducer,
}

impl Topic {
    pub fn new(name: &str) -> Self {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", testkit::kafka_brokers())
            .create()
            .unwrap();
        Self {
            name: name.to_owned(),
            producer,
        }
    }

    /// Sends one message, with the Kafka timestamp `ts` and the `schema-version` header when
    /// given; returns its partition.
    pub async fn send(
        &self,
        key: &str,
        payload: &[u8],
        ts: Option<i64>,
        schema: Option<&str>,
    ) -> i32 {
        let headers = schema.map(|version| {
            OwnedHeaders::new().insert(Header {
                key: "schema-version",
                value: Some(version),
            })
        });
        let record = FutureRecord {
            timestamp: ts,
            headers,
            ..FutureRecord::to(&self.name).key(key).payload(payload)
        };
        let delivery = self.producer.send(record, Duration::from_secs(10)).await;
        delivery.unwrap().partition
    }

    /// Sends `message` as learning does: key `tenant/device`, with the Kafka timestamp `ts`
    /// when given.
    pub async fn send_events(&self, device: &str, message: TenantEvents, ts: Option<i64>) {
        let key = format!("{}/{device}", message.tenant_id);
        self.send(&key, &message.encode_to_vec(), ts, None).await;
    }
}
