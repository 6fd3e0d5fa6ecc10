//! kafka: storage's fixes topic and learning's events topic, read without a consumer group
//! (nothing is committed) so that every gateway replica can stream what was acknowledged to
//! its own subscribers.

use std::{collections::HashMap, time::Duration};

use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
    error::KafkaError,
    message::{BorrowedMessage, Headers as _},
};
use trackmesh_proto::v1::{Event, RefinedFix};
use trackmesh_shared::{domain::DeviceKey, event_messages::TenantEvents, fix_messages};

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// The topics Watch reads, by index: storage's fixes (0) and learning's events.
pub const TOPICS: usize = 2;
pub const EVENTS: usize = 1;

/// A reader of the topics at positions it is given.
pub struct Reader {
    pub consumer: StreamConsumer,
    pub topics: [String; TOPICS],
}

/// A partition's oldest kept offset and the offset its next message will get.
#[derive(Clone, Copy, Debug)]
pub struct Watermarks {
    pub low: i64,
    pub high: i64,
}

impl Reader {
    pub fn new(brokers: &str, topics: &[String; TOPICS]) -> Result<Self, KafkaError> {
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
            topics: topics.clone(),
        })
    }

    /// Each topic's partitions' watermarks (blocking: run off the async threads).
    pub fn watermarks(&self) -> Result<[Vec<Watermarks>; TOPICS], KafkaError> {
        let mut all: [Vec<Watermarks>; TOPICS] = Default::default();
        for (topic, marks) in self.topics.iter().zip(&mut all) {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len())
                .unwrap_or_default();
            if partitions == 0 {
                return Err(KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                ));
            }
            for p in 0..partitions {
                let (low, high) =
                    self.consumer
                        .fetch_watermarks(topic, p as i32, METADATA_TIMEOUT)?;
                marks.push(Watermarks { low, high });
            }
        }
        Ok(all)
    }

    /// Reads each listed (topic, partition) from its offset.
    pub fn assign(&self, from: &[(usize, i32, i64)]) -> Result<(), KafkaError> {
        let mut list = TopicPartitionList::new();
        for &(topic, partition, offset) in from {
            list.add_partition_offset(&self.topics[topic], partition, Offset::Offset(offset))?;
        }
        self.consumer.assign(&list)
    }

    /// The fixes or events of a message, or `None` for a delete marker or a value that does
    /// not decode (storage sends those to its dead-letter topic; nothing to stream).
    pub fn decode(&self, message: &BorrowedMessage<'_>, seen: &mut Seen) -> Option<Batch> {
        let topic = self.topics.iter().position(|t| t == message.topic())?;
        let payload = message.payload().unwrap_or_default();
        let items = if topic == EVENTS {
            Items::Events(decode_events(payload, seen)?)
        } else {
            Items::Fixes(decode_fixes(message, payload, seen)?)
        };
        Some(Batch {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            items,
        })
    }
}

/// One message of a topic, decoded; its fixes or events numbered by their place in the
/// message (resume tokens count in these numbers).
pub struct Batch {
    pub topic: usize,
    pub partition: i32,
    pub offset: i64,
    pub items: Items,
}

pub enum Items {
    Fixes(Vec<DeviceFixes>),
    Events(TenantEventsBatch),
}

pub struct TenantEventsBatch {
    pub tenant: String,
    pub events: Vec<(u32, Event)>,
}

pub struct DeviceFixes {
    pub tenant: String,
    pub device: String,
    pub fixes: Vec<(u32, RefinedFix)>,
}

/// What a reader has streamed per device, to drop what a retry wrote twice: fixes of a
/// retried Store, events of a retried observation (storage keeps one of each, and so does
/// Watch). Bounded: past `MAX_DEVICES` it starts over (something may then be streamed twice).
#[derive(Default)]
pub struct Seen {
    fixes: HashMap<String, i64>,
    /// Per device: the latest event time and the events at that time.
    events: HashMap<String, (i64, Vec<EventKey>)>,
}

type EventKey = (i32, String, String);

impl Seen {
    const MAX_DEVICES: usize = 1_000_000;

    /// Whether `fix` of the device `key` is new, noting it if so.
    fn fresh_fix(&mut self, key: &str, fix: &RefinedFix) -> bool {
        let time = fix.fix.as_ref().map_or(0, |f| f.time_ms);
        if let Some(last) = self.fixes.get_mut(key) {
            if fix.replay && time <= *last {
                return false;
            }
            *last = (*last).max(time);
            return true;
        }
        if self.fixes.len() >= Self::MAX_DEVICES {
            self.fixes.clear();
        }
        self.fixes.insert(key.to_owned(), time);
        true
    }

    /// Whether `event` of the device `key` is new (a device's events come in time order; a
    /// repeat is at or before the latest), noting it if so.
    fn fresh_event(&mut self, key: &str, event: &Event) -> bool {
        let id = (
            event.r#type,
            event.geofence_id.clone(),
            event.place_id.clone(),
        );
        if let Some((last, at_last)) = self.events.get_mut(key) {
            if event.time_ms < *last || (event.time_ms == *last && at_last.contains(&id)) {
                return false;
            }
            if event.time_ms > *last {
                *last = event.time_ms;
                at_last.clear();
            }
            at_last.push(id);
            return true;
        }
        if self.events.len() >= Self::MAX_DEVICES {
            self.events.clear();
        }
        self.events
            .insert(key.to_owned(), (event.time_ms, vec![id]));
        true
    }
}

fn decode_fixes(
    message: &BorrowedMessage<'_>,
    payload: &[u8],
    seen: &mut Seen,
) -> Option<Vec<DeviceFixes>> {
    let mut version = None;
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            match header.key {
                fix_messages::DELETE_HEADER if header.value == Some(b"1".as_slice()) => {
                    return None;
                }
                fix_messages::VERSION_HEADER => version = header.value,
                _ => {}
            }
        }
    }
    let batches = fix_messages::decode(version, payload).ok()?;
    let mut index = 0u32;
    let devices = batches
        .into_iter()
        .filter_map(|batch| {
            // Storage writes checked ids only: a batch without them is none of ours.
            let key = DeviceKey::parse(&batch.tenant_id, &batch.device_id)
                .ok()?
                .to_string();
            let fixes = batch
                .fixes
                .into_iter()
                .map(RefinedFix::from)
                .filter_map(|fix| {
                    let i = index;
                    index += 1;
                    seen.fresh_fix(&key, &fix).then_some((i, fix))
                })
                .collect();
            Some(DeviceFixes {
                tenant: batch.tenant_id,
                device: batch.device_id,
                fixes,
            })
        })
        .collect();
    Some(devices)
}

/// The events of a `TenantEvents` value (one tenant's).
fn decode_events(payload: &[u8], seen: &mut Seen) -> Option<TenantEventsBatch> {
    let message = TenantEvents::decode(payload).ok()?;
    let tenant = message.tenant_id;
    let events = (0u32..)
        .zip(message.events.into_iter().map(Event::from))
        .filter(|(_, event)| {
            DeviceKey::parse(&tenant, &event.device_id)
                .is_ok_and(|key| seen.fresh_event(&key.to_string(), event))
        })
        .collect();
    Some(TenantEventsBatch { tenant, events })
}
