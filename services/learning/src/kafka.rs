//! kafka: learning's topics. It observes storage's fixes topic as a consumer group (so fixes
//! whose Observe call failed, while learning was down, are learned anyway), keeps geofences in
//! a compacted topic and produces events.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer as _, StreamConsumer},
    message::Headers as _,
    producer::{FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
    util::Timeout,
};
use trackmesh_shared::{
    domain::DeviceKey,
    event_messages::{Geofence, TenantEvents, TenantGeofence},
    fix_messages,
    state::StateError,
};

use crate::{config::LearningConfig, error::Error, model::Outcome, service::LearningService};

/// A geofence's key in the geofences topic and in the book: `tenant/geofence_id`.
pub fn geofence_key(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

/// A fence as the geofences topic carries it.
pub fn geofence_value(tenant: &str, geofence: &Geofence) -> Vec<u8> {
    TenantGeofence {
        tenant_id: tenant.to_owned(),
        geofence: Some(geofence.clone()),
    }
    .encode_to_vec()
}

const PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Kafka {
    producer: FutureProducer,
    pub brokers: String,
    fixes_topic: String,
    group_id: String,
    events_topic: String,
    pub geofences_topic: String,
    partitions: i32,
    replication: i32,
}

impl Kafka {
    /// `None` without KAFKA_BROKERS.
    pub fn new(settings: &LearningConfig) -> Result<Option<Self>, Error> {
        let Some(brokers) = settings.kafka_brokers.clone() else {
            return Ok(None);
        };
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("client.id", "trackmesh-learning")
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "0")
            .create()
            .map_err(kafka)?;
        Ok(Some(Self {
            producer,
            brokers,
            fixes_topic: settings.kafka_topic.clone(),
            group_id: settings.kafka_group_id.clone(),
            events_topic: settings.kafka_events_topic.clone(),
            geofences_topic: settings.kafka_geofences_topic.clone(),
            partitions: i32::try_from(settings.kafka_partitions).unwrap_or(i32::MAX),
            replication: i32::try_from(settings.kafka_replication_factor).unwrap_or(1),
        }))
    }

    /// Creates the events topic and the (compacted, one partition) geofences topic unless
    /// they exist.
    pub async fn ensure_topics(&self) -> Result<(), Error> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()
            .map_err(kafka)?;
        let replication = || TopicReplication::Fixed(self.replication);
        let topics = [
            NewTopic::new(&self.events_topic, self.partitions, replication()),
            // Compacted: the latest value of each fence, kept for good.
            NewTopic::new(&self.geofences_topic, 1, replication()).set("cleanup.policy", "compact"),
        ];
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin
            .create_topics(&topics, &options)
            .await
            .map_err(kafka)?
        {
            match result {
                Ok(topic) => tracing::info!(%topic, "kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Error::Kafka(format!("creating {topic}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// One device's events, closed stays and trips of one observation (or of a rebuild's
    /// chunk), acknowledged by the brokers; nothing when there are none.
    pub async fn produce_outcome(
        &self,
        key: DeviceKey<'_>,
        outcome: &Outcome,
    ) -> Result<(), Error> {
        if outcome.events.is_empty() && outcome.stays.is_empty() && outcome.trips.is_empty() {
            return Ok(());
        }
        let value = TenantEvents {
            tenant_id: key.tenant.to_string(),
            events: outcome.events.clone(),
            stays: outcome
                .stays
                .iter()
                .map(|s| s.to_stay(&key.device))
                .collect(),
            trips: outcome
                .trips
                .iter()
                .map(|t| t.to_trip(&key.device))
                .collect(),
        }
        .encode_to_vec();
        self.send(&self.events_topic, &key.to_string(), Some(&value))
            .await
    }

    /// A fence, or its deletion (a tombstone).
    pub async fn produce_geofence(
        &self,
        tenant: &str,
        id: &str,
        geofence: Option<&Geofence>,
    ) -> Result<(), Error> {
        let value = geofence.map(|g| geofence_value(tenant, g));
        self.send(
            &self.geofences_topic,
            &geofence_key(tenant, id),
            value.as_deref(),
        )
        .await
    }

    async fn send(&self, topic: &str, key: &str, value: Option<&[u8]>) -> Result<(), Error> {
        let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.producer
            .send(record, Timeout::After(PRODUCE_TIMEOUT))
            .await
            .map(drop)
            .map_err(|(err, _)| kafka(err))
    }

    /// Observes the fixes topic until `stop` is set: each message's fixes go through the same
    /// `observe` as the Observe call (a watermark makes fixes seen before a no-op), and its
    /// offset is committed only after. A failure is retried; a delete marker forgets the
    /// device, in its place in the device's stream.
    pub async fn observe_fixes(self, service: Arc<LearningService>, stop: Arc<AtomicBool>) {
        let consumer: StreamConsumer = match ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("client.id", "trackmesh-learning")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            // Offsets are stored by hand after a message is observed; only those are committed.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Storage creates the topic: a learning started first sees it within seconds.
            .set("topic.metadata.refresh.interval.ms", "5000")
            // A replica that died gives its partitions up within this (tansu joins take
            // about half of it).
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "3000")
            .set("queued.max.messages.kbytes", "65536")
            .create()
        {
            Ok(consumer) => consumer,
            Err(err) => {
                tracing::error!(error = %err, "fixes consumer not created");
                return;
            }
        };
        if let Err(err) = consumer.subscribe(&[self.fixes_topic.as_str()]) {
            tracing::error!(error = %err, "fixes topic not subscribed");
            return;
        }
        while !stop.load(Ordering::Relaxed) {
            let message =
                match tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
                    Err(_) => continue,
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "fixes topic read failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                    Ok(Ok(message)) => message,
                };
            let (mut version, mut delete) = (None, false);
            if let Some(headers) = message.headers() {
                for header in headers.iter() {
                    match header.key {
                        fix_messages::VERSION_HEADER => version = header.value,
                        fix_messages::DELETE_HEADER => delete = header.value == Some(b"1"),
                        _ => {}
                    }
                }
            }
            let batches = match fix_messages::decode(version, message.payload().unwrap_or_default())
            {
                Ok(batches) => batches,
                Err(err) => {
                    // Storage sends such a value to its dead-letter topic: nothing to learn.
                    tracing::warn!(partition = message.partition(), offset = message.offset(), error = %err, "undecodable fixes message skipped");
                    let _ = consumer.store_offset_from_message(&message);
                    continue;
                }
            };
            let mut pause = Duration::from_millis(200);
            for batch in batches {
                loop {
                    let done = if delete {
                        service
                            .forget_device(&batch.tenant_id, &batch.device_id)
                            .await
                            .map(drop)
                    } else {
                        service
                            .observe_chunked(&batch.tenant_id, &batch.fixes)
                            .await
                    };
                    match done {
                        Ok(()) => break,
                        // Retrying cannot help these: skip rather than stall the partition.
                        Err(
                            err @ (Error::Invalid(_) | Error::State(StateError::Corrupt { .. })),
                        ) => {
                            tracing::warn!(error = %err, "fixes in the topic not observable, skipped");
                            break;
                        }
                        Err(err) if stop.load(Ordering::Relaxed) => {
                            tracing::info!(error = %err, "stopping with a message not observed");
                            return;
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, retry_in = ?pause, "observing the fixes topic failed");
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
            metrics::counter!("learning_stream_messages_total").increment(1);
            if let Err(err) = consumer.store_offset_from_message(&message) {
                tracing::warn!(error = %err, "offset not stored");
            }
        }
        // What was observed is committed before leaving the group.
        let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    }
}

fn kafka(err: impl std::fmt::Display) -> Error {
    Error::Kafka(err.to_string())
}
