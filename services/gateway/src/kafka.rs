//! kafka: storage's fixes topic, read without a consumer group (nothing is committed) so
//! that every gateway replica can stream what storage acknowledged to its own subscribers.

use std::{collections::HashMap, time::Duration};

use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, Headers as _},
};
use trackmesh_proto::v1::{FixBatch, FixBatches, RefinedFix};

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// A reader of the topic at positions it is given.
pub struct Reader {
    pub consumer: StreamConsumer,
    pub topic: String,
}

/// A partition's oldest kept offset and the offset its next message will get.
#[derive(Clone, Copy, Debug)]
pub struct Watermarks {
    pub low: i64,
    pub high: i64,
}

impl Reader {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, KafkaError> {
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "trackmesh-gateway-watch")
            .set("client.id", "trackmesh-gateway")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Bounds what librdkafka prefetches for a subscriber that reads slowly.
            .set("queued.max.messages.kbytes", "16384")
            .create()?;
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
        })
    }

    /// Each partition's watermarks (blocking: run off the async threads).
    pub fn watermarks(&self) -> Result<Vec<Watermarks>, KafkaError> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(&self.topic), METADATA_TIMEOUT)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == self.topic && t.error().is_none())
            .map(|t| t.partitions().len())
            .unwrap_or_default();
        if partitions == 0 {
            return Err(KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            ));
        }
        (0..partitions)
            .map(|p| {
                let (low, high) =
                    self.consumer
                        .fetch_watermarks(&self.topic, p as i32, METADATA_TIMEOUT)?;
                Ok(Watermarks { low, high })
            })
            .collect()
    }

    /// Reads each listed partition from its offset.
    pub fn assign(&self, from: &[(i32, i64)]) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        for &(partition, offset) in from {
            list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        }
        self.consumer.assign(&list)
    }
}

/// One message of the topic, decoded: the fixes of its devices, each numbered by its place
/// in the message (resume tokens count in these numbers).
pub struct Batch {
    pub partition: i32,
    pub offset: i64,
    pub devices: Vec<DeviceFixes>,
}

pub struct DeviceFixes {
    pub tenant: String,
    pub device: String,
    pub fixes: Vec<(u32, RefinedFix)>,
}

/// What a reader has streamed per device, to drop fixes written again by a retried Store:
/// storage keeps such a replay once, and so does Watch. Bounded: past `MAX_DEVICES` it
/// starts over (a replay may then be streamed twice).
#[derive(Default)]
pub struct Seen(HashMap<String, i64>);

impl Seen {
    const MAX_DEVICES: usize = 1_000_000;

    /// Whether `fix` of the device `key` is new, noting it if so.
    fn fresh(&mut self, key: &str, fix: &RefinedFix) -> bool {
        let time = fix.fix.as_ref().map_or(0, |f| f.time_ms);
        if let Some(last) = self.0.get_mut(key) {
            if fix.replay && time <= *last {
                return false;
            }
            *last = (*last).max(time);
            return true;
        }
        if self.0.len() >= Self::MAX_DEVICES {
            self.0.clear();
        }
        self.0.insert(key.to_owned(), time);
        true
    }
}

/// The fixes of a message, or `None` for a delete marker or a value that does not decode
/// (storage sends those to its dead-letter topic; there is nothing to stream).
pub fn decode(message: &BorrowedMessage<'_>, seen: &mut Seen) -> Option<Batch> {
    let mut version = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            match header.key {
                "delete-device" if header.value == Some(b"1".as_slice()) => return None,
                "schema-version" => version = header.value,
                _ => {}
            }
        }
    }
    let payload = message.payload().unwrap_or_default();
    let batches = match version {
        Some(b"2") => FixBatches::decode(payload).ok()?.batches,
        _ => vec![FixBatch::decode(payload).ok()?],
    };
    let mut index = 0u32;
    let devices = batches
        .into_iter()
        .map(|batch| {
            let key = format!("{}/{}", batch.tenant_id, batch.device_id);
            let fixes = batch
                .fixes
                .into_iter()
                .filter_map(|fix| {
                    let i = index;
                    index += 1;
                    seen.fresh(&key, &fix).then_some((i, fix))
                })
                .collect();
            DeviceFixes {
                tenant: batch.tenant_id,
                device: batch.device_id,
                fixes,
            }
        })
        .collect();
    Some(Batch {
        partition: message.partition(),
        offset: message.offset(),
        devices,
    })
}
