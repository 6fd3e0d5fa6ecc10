//! Kafka: the idempotent producer behind Store, topic creation, the dead-letter producer and
//! the consumer group (with its rebalance and statistics callbacks) that feeds ClickHouse.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI32, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use prost::Message as _;
use rdkafka::{
    ClientConfig, ClientContext, Statistics,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{Consumer as _, ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    message::{BorrowedHeaders, Header, Headers as _, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer as _},
    util::Timeout,
};
use trackmesh_shared::{
    domain::{DeviceKey, Invalid},
    fix_messages::{FixBatch, FixBatches},
    telemetry::{self, Extractor, Injector},
};

use crate::{config::StorageConfig, error::Error};

/// The `schema-version` header of a message whose value is one `FixBatch` (one device: delete
/// markers, dead letters, and every message of releases before version 2).
pub const SCHEMA_VERSION: &str = "1";

/// The `schema-version` header of a message whose value is a `FixBatches` (several devices of
/// one partition).
pub const SCHEMA_VERSION_BATCHES: &str = "2";

/// Header of a delete marker (see [`Kafka::produce_delete_marker`]).
pub const DELETE_HEADER: &str = "delete-device";

/// Bytes a record may need beyond its key, value and headers: librdkafka's largest per-record
/// overhead (36) plus the record batch header (61), with room to spare.
const RECORD_OVERHEAD: usize = 512;

/// Serialized size of one record header: the two length varints at their largest, and the bytes.
fn header_len(key: &str, value: &str) -> usize {
    key.len() + value.len() + 10
}

/// Splits a device's batch into consecutive batches whose encoded size is at most `limit`
/// bytes, keeping the fixes in order. An empty batch stays one (empty) message.
pub fn split_batch(batch: FixBatch, limit: usize) -> Result<Vec<FixBatch>, Error> {
    let FixBatch {
        tenant_id,
        device_id,
        fixes,
    } = batch;
    let empty = || FixBatch {
        tenant_id: tenant_id.clone(),
        device_id: device_id.clone(),
        fixes: Vec::new(),
    };
    let base = empty().encoded_len();
    let mut chunks = Vec::new();
    let mut current = empty();
    let mut size = base;
    for fix in fixes {
        // Field 3 of FixBatch: tag, length and the message itself.
        let len = prost::encoding::message::encoded_len(3, &fix);
        if base + len > limit {
            // Permanent: a retry cannot succeed, so it is the caller's error, not Kafka's.
            Err(Invalid::new(
                "fixes",
                format!(
                    "a fix of device {device_id} needs {} bytes in a kafka message, over the \
                     {limit} bytes that KAFKA_MESSAGE_MAX_BYTES leaves after key and headers",
                    base + len
                ),
            ))?;
        }
        if size + len > limit {
            chunks.push(std::mem::replace(&mut current, empty()));
            size = base;
        }
        current.fixes.push(fix);
        size += len;
    }
    chunks.push(current);
    Ok(chunks)
}

/// Bytes a `FixBatch` needs in a `FixBatches` beyond its own: a tag and a length varint.
const BATCH_FRAME: usize = 6;

/// Packs device batches into messages of at most `limit` encoded bytes, in order; a device's
/// batch over the limit is split over consecutive messages (see [`split_batch`]).
pub fn pack(batches: Vec<FixBatch>, limit: usize) -> Result<Vec<FixBatches>, Error> {
    let mut messages = Vec::new();
    let mut current = FixBatches::default();
    let mut size = 0;
    for batch in batches {
        for chunk in split_batch(batch, limit.saturating_sub(BATCH_FRAME))? {
            let len = prost::encoding::message::encoded_len(1, &chunk);
            if size + len > limit && !current.batches.is_empty() {
                messages.push(std::mem::take(&mut current));
                size = 0;
            }
            size += len;
            current.batches.push(chunk);
        }
    }
    if !current.batches.is_empty() {
        messages.push(current);
    }
    Ok(messages)
}

/// The partition of a device key: librdkafka's default partitioner (`consistent_random`, the
/// CRC-32 of the key), so that every message of a device, whatever its schema version or
/// producer, lands on one partition and stays in order.
pub fn partition_of(key: &str, partitions: i32) -> i32 {
    let mut crc = !0u32;
    for &byte in key.as_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    let partitions = u32::try_from(partitions.max(1)).unwrap_or(1);
    // The remainder is below `partitions`, an i32.
    i32::try_from(!crc % partitions).unwrap_or(0)
}

#[derive(Clone)]
pub struct Kafka {
    producer: Arc<FutureProducer>,
    brokers: String,
    topic: String,
    dlq_topic: String,
    events_topic: String,
    partitions: u32,
    /// The topic's partition count as the broker reports it, once known (0 before).
    topic_partitions: Arc<AtomicI32>,
    replication: i32,
    /// The producer's `message.max.bytes`: no record may be larger.
    message_max_bytes: usize,
}

impl Kafka {
    pub fn new(config: &StorageConfig) -> anyhow::Result<Self> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.kafka_brokers)
            .set("client.id", "trackmesh-storage")
            // Idempotence with acks=all: retries inside librdkafka never duplicate or reorder.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set(
                "linger.ms",
                config.kafka_linger.get().as_millis().to_string(),
            )
            .set(
                "message.max.bytes",
                config.kafka_message_max_bytes.to_string(),
            )
            .set(
                "message.timeout.ms",
                config.produce_timeout.get().as_millis().to_string(),
            )
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        Ok(Self {
            producer: Arc::new(producer),
            brokers: config.kafka_brokers.clone(),
            topic: config.kafka_topic.clone(),
            dlq_topic: config.kafka_dlq_topic.clone(),
            events_topic: config.kafka_events_topic.clone(),
            partitions: config.kafka_partitions,
            topic_partitions: Arc::new(AtomicI32::new(0)),
            replication: i32::try_from(config.kafka_replication_factor).unwrap_or(1),
            message_max_bytes: usize::try_from(config.kafka_message_max_bytes)
                .unwrap_or(usize::MAX),
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

    /// Creates the topic, its dead-letter topic and the events topic unless they exist.
    pub async fn ensure_topics(&self) -> Result<(), KafkaError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .create()?;
        let partitions = i32::try_from(self.partitions).unwrap_or(i32::MAX);
        let topics = [
            NewTopic::new(
                &self.topic,
                partitions,
                TopicReplication::Fixed(self.replication),
            ),
            NewTopic::new(
                &self.dlq_topic,
                1,
                TopicReplication::Fixed(self.replication),
            ),
            NewTopic::new(
                &self.events_topic,
                partitions,
                TopicReplication::Fixed(self.replication),
            ),
        ];
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(topic) => tracing::info!(%topic, "kafka topic created"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    tracing::warn!(%topic, error = %code, "kafka topic not created");
                    return Err(KafkaError::AdminOp(code));
                }
            }
        }
        Ok(())
    }

    /// The topic's partition count, asked of the broker once. A count raised later is not
    /// seen until restart, which keeps every device on its partition meanwhile.
    async fn topic_partitions(&self) -> Result<i32, Error> {
        let known = self.topic_partitions.load(Ordering::Relaxed);
        if known > 0 {
            return Ok(known);
        }
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let count = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .map(|metadata| {
                    metadata
                        .topics()
                        .first()
                        .map_or(0, |topic| topic.partitions().len())
                })
        })
        .await
        .map_err(|err| Error::Kafka(self.failed(format!("kafka metadata: {err}"))))?
        .map_err(|err| Error::Kafka(self.failed(format!("kafka metadata: {err}"))))?;
        let count = i32::try_from(count).unwrap_or(i32::MAX);
        if count == 0 {
            return Err(Error::Kafka(self.failed(format!(
                "kafka topic {} has no partitions yet",
                self.topic
            ))));
        }
        self.topic_partitions.store(count, Ordering::Relaxed);
        Ok(count)
    }

    /// Produces the device batches of one Store call: one message (or more, under
    /// `message.max.bytes`) per partition, each device on the partition of its key, and waits
    /// until every one is acknowledged by all in-sync replicas, or `timeout` passes.
    pub async fn produce(&self, batches: Vec<FixBatch>, timeout: Duration) -> Result<(), Error> {
        let start = Instant::now();
        let partitions = self.topic_partitions().await?;
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "schema-version",
            value: Some(SCHEMA_VERSION_BATCHES),
        });
        let mut headers_len = header_len("schema-version", SCHEMA_VERSION_BATCHES);
        let mut carrier = HeaderCarrier(Vec::new());
        telemetry::inject(&mut carrier);
        for (key, value) in &carrier.0 {
            headers_len += header_len(key, value);
            headers = headers.insert(Header {
                key: key.as_str(),
                value: Some(value.as_str()),
            });
        }
        let limit = self
            .message_max_bytes
            .saturating_sub(headers_len + RECORD_OVERHEAD);
        let mut by_partition: BTreeMap<i32, Vec<FixBatch>> = BTreeMap::new();
        for batch in batches {
            let key = DeviceKey::parse(&batch.tenant_id, &batch.device_id)?.to_string();
            let partition = partition_of(&key, partitions);
            by_partition.entry(partition).or_default().push(batch);
        }
        let mut deliveries = Vec::with_capacity(by_partition.len());
        for (partition, batches) in by_partition {
            // Messages of one partition are appended in the order they are queued, and the
            // idempotent producer keeps that order through retries: each device stays in order.
            for message in pack(batches, limit)? {
                let payload = message.encode_to_vec();
                let record = FutureRecord::<(), _>::to(&self.topic)
                    .partition(partition)
                    .payload(&payload)
                    .headers(headers.clone());
                match self.producer.send_result(record) {
                    Ok(delivery) => deliveries.push(delivery),
                    Err((err, _)) => {
                        return Err(Error::Kafka(self.failed(format!("kafka queue: {err}"))));
                    }
                }
            }
        }
        let acknowledged = tokio::time::timeout(timeout, join_all(deliveries)).await;
        metrics::histogram!("storage_produce_seconds").record(start.elapsed().as_secs_f64());
        let Ok(results) = acknowledged else {
            return Err(Error::Kafka(
                self.failed(format!("kafka did not acknowledge within {timeout:?}")),
            ));
        };
        for result in results {
            let failure = match result {
                Ok(Ok(_)) => continue,
                Ok(Err((err, _))) => format!("kafka: {err}"),
                Err(_) => "kafka producer went away".into(),
            };
            return Err(Error::Kafka(self.failed(failure)));
        }
        Ok(())
    }

    fn failed(&self, reason: String) -> String {
        metrics::counter!("storage_produce_failures_total").increment(1);
        reason
    }

    /// Produces a delete marker for a device: an empty FixBatch with the [`DELETE_HEADER`]
    /// header on the partition of the device's key, so it lands on the partition of its fixes,
    /// after those already produced. The consumer deletes the device when it reaches it, so
    /// fixes still in Kafka at DeleteDevice are deleted too.
    pub async fn produce_delete_marker(
        &self,
        device: DeviceKey<'_>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let partitions = self.topic_partitions().await?;
        let key = device.to_string();
        let payload = FixBatch {
            tenant_id: device.tenant.to_string(),
            device_id: device.device.to_string(),
            fixes: Vec::new(),
        }
        .encode_to_vec();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "schema-version",
                value: Some(SCHEMA_VERSION),
            })
            .insert(Header {
                key: DELETE_HEADER,
                value: Some("1"),
            });
        let record = FutureRecord::to(&self.topic)
            .partition(partition_of(&key, partitions))
            .key(&key)
            .payload(&payload)
            .headers(headers);
        match tokio::time::timeout(timeout, self.producer.send(record, Timeout::After(timeout)))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((err, _))) => Err(Error::Kafka(self.failed(format!("kafka: {err}")))),
            Err(_) => Err(Error::Kafka(
                self.failed(format!("kafka did not acknowledge within {timeout:?}")),
            )),
        }
    }

    /// Parks an undecodable message on the dead-letter topic with the reason in a header.
    pub async fn dead_letter(&self, message: &Owned, reason: &str) -> Result<(), KafkaError> {
        let partition = message.partition.to_string();
        let offset = message.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "dlq-reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "dlq-topic",
                value: Some(self.topic.as_str()),
            })
            .insert(Header {
                key: "dlq-partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "dlq-offset",
                value: Some(offset.as_str()),
            });
        let mut record = FutureRecord::to(&self.dlq_topic)
            .payload(message.payload.as_slice())
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key.as_slice());
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map(drop)
            .map_err(|(err, _)| err)
    }

    /// The consumer of the group, subscribed to the topic.
    pub fn consumer(
        &self,
        config: &StorageConfig,
    ) -> Result<(StreamConsumer<Context>, Arc<Context>), KafkaError> {
        group_consumer(config, &config.kafka_group_id, &config.kafka_topic, true)
    }
}

/// A consumer of `group` subscribed to `topic`, committing by hand. `gauges`: this consumer
/// reports `storage_consumer_lag` and `storage_assigned_partitions` (the fixes consumer only,
/// so that two consumers do not write over each other's gauges).
pub fn group_consumer(
    config: &StorageConfig,
    group: &str,
    topic: &str,
    gauges: bool,
) -> Result<(StreamConsumer<Context>, Arc<Context>), KafkaError> {
    let context = Context {
        topic: topic.to_owned(),
        gauges,
        ..Context::default()
    };
    let session_ms = config.kafka_session_timeout.get().as_millis();
    let consumer: StreamConsumer<Context> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", group)
        .set("client.id", "trackmesh-storage")
        // Offsets are committed by hand, only after ClickHouse has the rows.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (session_ms / 3).max(100).to_string(),
        )
        .set("statistics.interval.ms", if gauges { "5000" } else { "0" })
        // Bounds what librdkafka prefetches while we are paused or busy.
        .set("queued.max.messages.kbytes", "65536")
        .create_with_context(context)?;
    consumer.subscribe(&[topic])?;
    let context = consumer.context().clone();
    Ok((consumer, context))
}

/// Commits the next offsets (partition → offset) of `topic`. A failure is only logged: what
/// they cover is stored, and a redelivery collapses in ClickHouse.
pub fn commit<'a>(
    consumer: &StreamConsumer<Context>,
    topic: &str,
    next_offsets: impl IntoIterator<Item = (&'a i32, &'a i64)>,
    mode: rdkafka::consumer::CommitMode,
) {
    let mut offsets = rdkafka::TopicPartitionList::new();
    for (&partition, &next) in next_offsets {
        if let Err(error) =
            offsets.add_partition_offset(topic, partition, rdkafka::Offset::Offset(next))
        {
            tracing::warn!(%error, topic, partition, "cannot record offset");
        }
    }
    if offsets.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&offsets, mode) {
        tracing::warn!(%error, topic, "kafka offset commit failed");
    }
}

/// Pauses (or resumes) every assigned partition of `topic`'s consumer; true when it took
/// effect.
pub fn set_paused(consumer: &StreamConsumer<Context>, topic: &str, pause: bool) -> bool {
    let result = consumer.assignment().and_then(|assignment| {
        if pause {
            consumer.pause(&assignment)
        } else {
            consumer.resume(&assignment)
        }
    });
    match result {
        Ok(()) => {
            tracing::info!(topic, paused = pause, "kafka consumption");
            true
        }
        Err(error) => {
            tracing::warn!(%error, topic, pause, "cannot pause or resume kafka consumption");
            false
        }
    }
}

/// A message copied out of the consumer's buffer.
pub struct Owned {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub schema_version: Option<String>,
    /// `traceparent` / `tracestate` the producer wrote.
    pub trace: Vec<(String, String)>,
    /// A delete marker: the device's earlier fixes are to be deleted.
    pub delete_device: bool,
}

impl Owned {
    pub fn from_message(message: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        use rdkafka::Message as _;
        let mut schema_version = None;
        let mut trace = Vec::new();
        let mut delete_device = false;
        if let Some(headers) = message.headers() {
            for header in headers_iter(headers) {
                let value = header
                    .value
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                match header.key {
                    "schema-version" => schema_version = Some(value),
                    "traceparent" | "tracestate" => trace.push((header.key.to_owned(), value)),
                    DELETE_HEADER => delete_device = value == "1",
                    _ => {}
                }
            }
        }
        Self {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            schema_version,
            trace,
            delete_device,
        }
    }
}

fn headers_iter(headers: &BorrowedHeaders) -> impl Iterator<Item = Header<'_, &[u8]>> {
    (0..headers.count()).filter_map(|i| headers.try_get(i))
}

/// Trace context in Kafka headers.
pub struct HeaderCarrier(pub Vec<(String, String)>);

impl Injector for HeaderCarrier {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

impl Extractor for HeaderCarrier {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The consumer's callbacks: partitions revoked since the pipeline last looked, and lag.
#[derive(Default)]
pub struct Context {
    /// The topic subscribed to, for logs.
    topic: String,
    /// Whether this consumer reports the partition gauges (see [`group_consumer`]).
    gauges: bool,
    revoked: Mutex<BTreeSet<i32>>,
    joined: std::sync::atomic::AtomicBool,
}

impl Context {
    /// Whether the group has assigned partitions to this consumer at least once.
    pub fn joined(&self) -> bool {
        self.joined.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Partitions taken away since the last call.
    pub fn take_revoked(&self) -> BTreeSet<i32> {
        std::mem::take(
            &mut *self
                .revoked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        if !self.gauges {
            return;
        }
        for topic in statistics.topics.values() {
            for (partition, stats) in &topic.partitions {
                // -1 means unknown (not consumed yet); internal partition -1 is a summary.
                if *partition >= 0 && stats.consumer_lag >= 0 {
                    metrics::gauge!("storage_consumer_lag", "partition" => partition.to_string())
                        .set(stats.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.joined
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let assigned: Vec<i32> = partitions
                    .elements()
                    .iter()
                    .map(|p| p.partition())
                    .collect();
                tracing::info!(topic = %self.topic, ?assigned, "kafka partitions assigned");
                if self.gauges {
                    metrics::gauge!("storage_assigned_partitions").set(assigned.len() as f64);
                }
            }
            Rebalance::Revoke(partitions) => {
                let revoked: Vec<i32> = partitions
                    .elements()
                    .iter()
                    .map(|p| p.partition())
                    .collect();
                tracing::info!(topic = %self.topic, ?revoked, "kafka partitions revoked");
                if self.gauges {
                    metrics::gauge!("storage_assigned_partitions").set(0.0);
                }
                self.revoked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(revoked);
            }
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance failed"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _: &rdkafka::TopicPartitionList,
    ) {
        if let Err(error) = result {
            tracing::warn!(%error, "kafka offset commit failed");
        }
    }
}
