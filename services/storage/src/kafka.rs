//! Kafka: the idempotent producer behind Store and the consumer group feeding ClickHouse.

use std::{sync::Arc, time::Duration};

use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, Producer as _},
};

use crate::config::StorageConfig;

#[derive(Clone)]
pub struct Kafka {
    producer: Arc<FutureProducer>,
}

impl Kafka {
    pub fn new(config: &StorageConfig) -> anyhow::Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .create()?;
        Ok(Self {
            producer: Arc::new(producer),
        })
    }

    /// For readiness: a metadata request must succeed.
    pub async fn ping(&self) -> Result<(), String> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(drop)
                .map_err(|err| format!("kafka: {err}"))
        })
        .await
        .map_err(|err| format!("kafka: {err}"))?
    }
}
