//! The tenants' geofences. The compacted geofences topic is the durable copy (Redis is not:
//! a fence must outlive a Redis loss); every replica reads it from the beginning and keeps each
//! tenant's fences compiled with their spatial index (`fence::Fences`).
//!
//! A fence applies to every fix ingested after CreateGeofence answered, on every replica,
//! without a broker round trip per fix: each replica reads the topic up to its end every
//! `STALENESS / 4` in the background, and evaluates fixes only while its last such read
//! started less than `STALENESS` ago (else it reads first); CreateGeofence and DeleteGeofence
//! answer `STALENESS` after the change was acknowledged. A fix ingested after the answer is
//! evaluated after a read that started after the change, whichever replica evaluates it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _, Offset, TopicPartitionList,
    consumer::{Consumer as _, StreamConsumer},
};
use tokio::sync::{Mutex, watch};
use trackmesh_shared::{
    domain::Invalid,
    event_messages::{Geofence, TenantGeofence},
};

use crate::{
    error::Error,
    fence::{Fence, Fences},
};

const SYNC_TIMEOUT: Duration = Duration::from_secs(5);
/// How old a replica's view of the topic may be when it evaluates fixes. A read up to the
/// end takes one watermark query: about a millisecond on Kafka, 0.4 s on tansu.
pub const STALENESS: Duration = Duration::from_secs(2);

struct Tenant {
    geofences: BTreeMap<String, Geofence>,
    compiled: Arc<Fences>,
}

pub struct Book {
    tenants: RwLock<HashMap<String, Tenant>>,
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// Next offset read, per partition.
    read: watch::Receiver<Vec<i64>>,
    /// When the last read up to the topic's end started (read without waiting for a read
    /// in progress).
    synced: std::sync::Mutex<Option<Instant>>,
    /// One read up to the end at a time.
    syncing: Mutex<()>,
}

impl Book {
    /// Starts reading the topic (which must exist) from its beginning.
    pub fn start(brokers: &str, topic: &str) -> Result<Arc<Self>, Error> {
        let kafka = |err: rdkafka::error::KafkaError| Error::Kafka(err.to_string());
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "trackmesh-learning-geofences")
            .set("client.id", "trackmesh-learning")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .create()
            .map_err(kafka)?;
        let metadata = consumer
            .fetch_metadata(Some(topic), SYNC_TIMEOUT)
            .map_err(kafka)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(Error::Kafka(format!("topic {topic} has no partitions")));
        }
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition_offset(topic, p as i32, Offset::Beginning)
                .map_err(kafka)?;
        }
        consumer.assign(&list).map_err(kafka)?;
        let (sender, read) = watch::channel(vec![0; partitions]);
        let book = Arc::new(Self {
            tenants: RwLock::default(),
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            read,
            synced: std::sync::Mutex::new(None),
            syncing: Mutex::new(()),
        });
        tokio::spawn(Arc::clone(&book).read_topic(sender));
        tokio::spawn(Arc::clone(&book).keep_fresh());
        Ok(book)
    }

    async fn read_topic(self: Arc<Self>, read: watch::Sender<Vec<i64>>) {
        loop {
            match self.consumer.recv().await {
                Ok(message) => {
                    let key = message
                        .key()
                        .map(|k| String::from_utf8_lossy(k).into_owned())
                        .unwrap_or_default();
                    self.apply(&key, message.payload());
                    let (partition, offset) = (message.partition(), message.offset());
                    read.send_modify(|read| {
                        if let Some(next) = usize::try_from(partition)
                            .ok()
                            .and_then(|p| read.get_mut(p))
                        {
                            *next = offset + 1;
                        }
                    });
                }
                Err(err) => {
                    tracing::warn!(error = %err, "geofences topic read failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// A fence message: `tenant/id` and a `TenantGeofence`, or no value for a deleted fence.
    pub fn apply(&self, key: &str, value: Option<&[u8]>) {
        let Some((tenant, id)) = key.split_once('/') else {
            tracing::warn!(key, "geofence message without a tenant/id key skipped");
            return;
        };
        let geofence = match value.map(TenantGeofence::decode) {
            None => None,
            Some(Ok(message)) => message.geofence,
            Some(Err(err)) => {
                tracing::warn!(key, error = %err, "undecodable geofence skipped");
                return;
            }
        };
        let mut tenants = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = tenants.entry(tenant.to_owned()).or_insert_with(|| Tenant {
            geofences: BTreeMap::new(),
            compiled: Arc::new(Fences::new(Vec::new())),
        });
        match geofence {
            Some(geofence) => entry.geofences.insert(id.to_owned(), geofence),
            None => entry.geofences.remove(id),
        };
        let compiled: Vec<Fence> = entry
            .geofences
            .values()
            .filter_map(|geofence| match Fence::new(geofence) {
                Ok(fence) => Some(fence),
                Err(Invalid { field, rule }) => {
                    // Checked at creation; a rule made stricter later skips old fences.
                    tracing::warn!(key, %field, %rule, "stored geofence no longer valid, skipped");
                    None
                }
            })
            .collect();
        entry.compiled = Arc::new(Fences::new(compiled));
    }

    async fn keep_fresh(self: Arc<Self>) {
        loop {
            if let Err(err) = self.sync().await {
                tracing::warn!(error = %err, "geofences topic not read to its end");
            }
            tokio::time::sleep(STALENESS / 4).await;
        }
    }

    fn synced_within(&self, age: Duration) -> bool {
        self.synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < age)
    }

    /// Makes sure the last read up to the topic's end started less than `STALENESS` ago.
    pub async fn fresh(&self) -> Result<(), Error> {
        if self.synced_within(STALENESS) {
            return Ok(());
        }
        self.sync().await
    }

    /// Reads up to the topic's end as of now.
    async fn sync(&self) -> Result<(), Error> {
        let _one = self.syncing.lock().await;
        if self.synced_within(STALENESS / 4) {
            // Another caller just did it.
            return Ok(());
        }
        let started = Instant::now();
        let (consumer, topic) = (Arc::clone(&self.consumer), self.topic.clone());
        let partitions = self.read.borrow().len();
        let ends = tokio::task::spawn_blocking(move || {
            (0..partitions)
                .map(|p| {
                    consumer
                        .fetch_watermarks(&topic, p as i32, SYNC_TIMEOUT)
                        .map(|(_, high)| high)
                })
                .collect::<Result<Vec<i64>, _>>()
        })
        .await
        .map_err(|err| Error::Kafka(err.to_string()))?
        .map_err(|err| Error::Kafka(format!("geofences topic: {err}")))?;
        let mut read = self.read.clone();
        tokio::time::timeout(
            SYNC_TIMEOUT,
            read.wait_for(|read| read.iter().zip(&ends).all(|(r, end)| r >= end)),
        )
        .await
        .map_err(|_| Error::Kafka("geofences topic: not read to its end in time".into()))?
        .map_err(|_| Error::Kafka("geofences topic reader stopped".into()))?;
        metrics::histogram!("learning_geofences_sync_seconds")
            .record(started.elapsed().as_secs_f64());
        *self
            .synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started);
        Ok(())
    }

    fn read_tenants(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Tenant>> {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The tenant's compiled fences; `None` when it has none.
    pub fn fences(&self, tenant: &str) -> Option<Arc<Fences>> {
        let tenants = self.read_tenants();
        tenants
            .get(tenant)
            .filter(|t| !t.geofences.is_empty())
            .map(|t| Arc::clone(&t.compiled))
    }

    /// The tenant's fences, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<Geofence> {
        let tenants = self.read_tenants();
        let mut list: Vec<Geofence> = tenants
            .get(tenant)
            .map(|t| t.geofences.values().cloned().collect())
            .unwrap_or_default();
        list.sort_by(|a, b| (a.created_ms, &a.geofence_id).cmp(&(b.created_ms, &b.geofence_id)));
        list
    }

    pub fn contains(&self, tenant: &str, id: &str) -> bool {
        let tenants = self.read_tenants();
        tenants
            .get(tenant)
            .is_some_and(|t| t.geofences.contains_key(id))
    }

    pub fn count(&self, tenant: &str) -> usize {
        let tenants = self.read_tenants();
        tenants.get(tenant).map_or(0, |t| t.geofences.len())
    }
}
