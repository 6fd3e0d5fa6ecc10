//! Versioned device state in Redis, for refinement and learning: many devices read in one
//! round trip, decided in Rust, written back by compare-and-set, and the devices another
//! replica changed meanwhile read and decided again.

use std::{marker::PhantomData, time::Duration};

use crate::{
    domain::{DeviceId, DeviceKey, TenantId},
    redis::{Log, Redis, RedisError, Write, is_transient},
};

/// Rounds of read → decide → compare-and-set before giving up with `Contention`.
pub const MAX_ATTEMPTS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("device {device}: too many concurrent updates, retry")]
    Contention { device: String },
    #[error("device {device}: stored state is unreadable: {reason}")]
    Corrupt { device: String, reason: String },
}

impl StateError {
    /// UNAVAILABLE while Redis may come back, ABORTED for a retry later, INTERNAL otherwise.
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Redis(err) if is_transient(err) => tonic::Code::Unavailable,
            Self::Contention { .. } => tonic::Code::Aborted,
            Self::Redis(_) | Self::Corrupt { .. } => tonic::Code::Internal,
        }
    }
}

/// A device's state as read, with the version a write must expect (0: none stored).
pub struct Loaded<T> {
    pub version: u64,
    pub state: T,
}

/// A state to write if the device is still at version `expected`, with bytes for its log.
pub struct Save<'a, T> {
    pub device: DeviceId<'a>,
    pub expected: u64,
    pub state: &'a T,
    pub log: Vec<u8>,
}

/// What was decided for a device read at `version`: the state to write (`None`: unchanged, the
/// decision stands as of the read), bytes for its log, and the caller's outcome.
pub struct Decided<'d, T, O> {
    pub device: DeviceId<'d>,
    pub version: u64,
    pub state: Option<T>,
    pub log: Vec<u8>,
    pub outcome: O,
}

/// One hash per device under `{prefix}{tenant/device}` (the hash tag keeps a device's keys in
/// one Cluster slot), holding the version and the state's own protobuf encoding; optionally
/// an append-only log beside it.
pub struct StateStore<T> {
    redis: Redis,
    prefix: &'static str,
    log: Option<(&'static str, usize)>,
    ttl: Duration,
    conflicts_metric: &'static str,
    _state: PhantomData<fn() -> T>,
}

impl<T> Clone for StateStore<T> {
    fn clone(&self) -> Self {
        Self {
            redis: self.redis.clone(),
            _state: PhantomData,
            ..*self
        }
    }
}

impl<T: prost::Message + Default> StateStore<T> {
    /// `conflicts_metric` counts the devices decided again after losing a compare-and-set.
    pub fn new(
        redis: Redis,
        prefix: &'static str,
        ttl: Duration,
        conflicts_metric: &'static str,
    ) -> Self {
        Self {
            redis,
            prefix,
            log: None,
            ttl,
            conflicts_metric,
            _state: PhantomData,
        }
    }

    /// Keeps a log of at least `max_bytes` beside each state, appended to by the same write.
    pub fn with_log(mut self, prefix: &'static str, max_bytes: usize) -> Self {
        self.log = Some((prefix, max_bytes));
        self
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    pub fn key(&self, key: DeviceKey<'_>) -> String {
        hash_key(self.prefix, key)
    }

    pub fn log_key(&self, key: DeviceKey<'_>) -> Option<String> {
        self.log.map(|(prefix, _)| hash_key(prefix, key))
    }

    /// The states of `devices`, in order, in one round trip.
    pub async fn load(
        &self,
        tenant: TenantId<'_>,
        devices: &[DeviceId<'_>],
    ) -> Result<Vec<Loaded<T>>, StateError> {
        let keys: Vec<String> = devices
            .iter()
            .map(|device| self.key(DeviceKey::new(tenant, *device)))
            .collect();
        let values = self.redis.read(&keys).await?;
        devices
            .iter()
            .zip(values)
            .map(|(device, value)| {
                let state = match value.data {
                    Some(bytes) => {
                        T::decode(bytes.as_slice()).map_err(|err| corrupt(*device, err))?
                    }
                    None => T::default(),
                };
                Ok(Loaded {
                    version: value.version,
                    state,
                })
            })
            .collect()
    }

    pub async fn load_one(&self, key: DeviceKey<'_>) -> Result<Loaded<T>, StateError> {
        self.load(key.tenant, &[key.device])
            .await?
            .pop()
            .ok_or_else(|| corrupt(key.device, "no reply for the device"))
    }

    /// Compare-and-set of each device; `false` where another replica got there first. Each
    /// write renews the time to live.
    pub async fn save(
        &self,
        tenant: TenantId<'_>,
        saves: Vec<Save<'_, T>>,
    ) -> Result<Vec<bool>, StateError> {
        let writes: Vec<Write> = saves
            .into_iter()
            .map(|save| {
                let key = DeviceKey::new(tenant, save.device);
                Write {
                    key: self.key(key),
                    expected: save.expected,
                    data: save.state.encode_to_vec(),
                    ttl: self.ttl,
                    log: self.log.map(|(prefix, max_bytes)| Log {
                        key: hash_key(prefix, key),
                        append: save.log,
                        max_bytes,
                    }),
                }
            })
            .collect();
        Ok(self.redis.write(&writes).await?)
    }

    /// Deletes the device's state (and log); whether there was any.
    pub async fn delete(&self, key: DeviceKey<'_>) -> Result<bool, StateError> {
        let mut keys = vec![self.key(key)];
        keys.extend(self.log_key(key));
        Ok(self.redis.delete(&keys).await?)
    }

    /// Reads `devices`, lets `decide` decide them, writes the changed states by
    /// compare-and-set, and repeats for the devices that lost the race, at most
    /// `MAX_ATTEMPTS` times. The outcomes of the devices whose decision stands, in the order
    /// they were settled.
    pub async fn update<'d, O, E, F>(
        &self,
        tenant: TenantId<'_>,
        devices: Vec<DeviceId<'d>>,
        mut decide: impl FnMut(Vec<(DeviceId<'d>, Loaded<T>)>) -> F,
    ) -> Result<Vec<(DeviceId<'d>, O)>, E>
    where
        E: From<StateError>,
        F: Future<Output = Result<Vec<Decided<'d, T, O>>, E>>,
    {
        let mut settled = Vec::with_capacity(devices.len());
        let mut todo = devices;
        for _ in 0..MAX_ATTEMPTS {
            if todo.is_empty() {
                return Ok(settled);
            }
            let loaded = self.load(tenant, &todo).await?;
            let mut decided = decide(todo.into_iter().zip(loaded).collect()).await?;
            let saves: Vec<Save<'_, T>> = decided
                .iter_mut()
                .filter_map(|d| {
                    Some(Save {
                        device: d.device,
                        expected: d.version,
                        state: d.state.as_ref()?,
                        log: std::mem::take(&mut d.log),
                    })
                })
                .collect();
            let mut applied = self.save(tenant, saves).await?.into_iter();
            todo = Vec::new();
            for decided in decided {
                if decided.state.is_some() && !applied.next().unwrap_or(false) {
                    todo.push(decided.device);
                } else {
                    settled.push((decided.device, decided.outcome));
                }
            }
            if !todo.is_empty() {
                metrics::counter!(self.conflicts_metric).increment(todo.len() as u64);
                tracing::debug!(devices = todo.len(), "compare-and-set conflicts, retrying");
            }
        }
        match todo.first() {
            Some(device) => Err(StateError::Contention {
                device: device.to_string(),
            }
            .into()),
            None => Ok(settled),
        }
    }
}

/// `{prefix}{tenant/device}`, in one allocation: built for every device of every call.
fn hash_key(prefix: &str, key: DeviceKey<'_>) -> String {
    [prefix, "{", &key.tenant, "/", &key.device, "}"].concat()
}

fn corrupt(device: DeviceId<'_>, reason: impl ToString) -> StateError {
    StateError::Corrupt {
        device: device.to_string(),
        reason: reason.to_string(),
    }
}
