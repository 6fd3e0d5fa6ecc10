//! Device state in Redis: one hash per device (version + encoded state) and beside it, in the
//! same hash slot, the log of recently accepted fixes that recognises replays.

use std::time::Duration;

use prost::Message as _;
use trackmesh_shared::redis::{Log, LogRange, Redis, Write};

use crate::{
    error::Error,
    refine::{DeviceState, Record},
};

/// A device's state as read, with the version a write must expect.
pub struct Loaded {
    pub version: u64,
    pub state: DeviceState,
}

/// A decided device to write back.
pub struct Save<'a> {
    pub device: &'a str,
    pub expected: u64,
    pub state: &'a DeviceState,
    pub appended: &'a [Record],
}

#[derive(Clone)]
pub struct Store {
    redis: Redis,
    ttl: Duration,
    log_bytes: usize,
}

impl Store {
    pub fn new(redis: Redis, ttl: Duration, replay_history: usize) -> Self {
        Self {
            redis,
            ttl,
            log_bytes: replay_history * Record::SIZE,
        }
    }

    pub async fn load(&self, tenant: &str, devices: &[&str]) -> Result<Vec<Loaded>, Error> {
        let keys: Vec<String> = devices.iter().map(|d| state_key(tenant, d)).collect();
        let values = self.redis.read(&keys).await?;
        devices
            .iter()
            .zip(values)
            .map(|(device, value)| {
                let state = match value.data {
                    Some(bytes) => {
                        DeviceState::decode(bytes.as_slice()).map_err(|err| Error::Corrupt {
                            device: (*device).to_owned(),
                            reason: err.to_string(),
                        })?
                    }
                    None => DeviceState::default(),
                };
                Ok(Loaded {
                    version: value.version,
                    state,
                })
            })
            .collect()
    }

    /// Per device, the records of its replay log in the time range `from..=to`: only what a
    /// batch can match is read, so a retry storm costs what it re-sends, not whole logs.
    pub async fn history(
        &self,
        tenant: &str,
        ranges: &[(&str, i64, i64)],
    ) -> Result<Vec<Vec<Record>>, Error> {
        let ranges: Vec<LogRange> = ranges
            .iter()
            .map(|(device, from, to)| LogRange {
                key: log_key(tenant, device),
                record_size: Record::SIZE,
                from: *from,
                to: *to,
            })
            .collect();
        let logs = self.redis.log_ranges(&ranges).await?;
        Ok(logs.iter().map(|bytes| Record::decode_all(bytes)).collect())
    }

    /// Compare-and-set of each device; `false` where another replica got there first.
    pub async fn save(&self, tenant: &str, saves: &[Save<'_>]) -> Result<Vec<bool>, Error> {
        let writes: Vec<Write> = saves
            .iter()
            .map(|save| {
                let mut append = Vec::with_capacity(save.appended.len() * Record::SIZE);
                for record in save.appended {
                    record.encode(&mut append);
                }
                Write {
                    key: state_key(tenant, save.device),
                    expected: save.expected,
                    data: save.state.encode_to_vec(),
                    ttl: self.ttl,
                    log: Some(Log {
                        key: log_key(tenant, save.device),
                        append,
                        max_bytes: self.log_bytes,
                    }),
                }
            })
            .collect();
        Ok(self.redis.write(&writes).await?)
    }

    pub async fn reset(&self, tenant: &str, device: &str) -> Result<bool, Error> {
        Ok(self
            .redis
            .delete(&[state_key(tenant, device), log_key(tenant, device)])
            .await?)
    }
}

// The hash tag `{tenant/device}` keeps both keys of a device in one Redis Cluster slot.
fn state_key(tenant: &str, device: &str) -> String {
    format!("tm:refine:{{{tenant}/{device}}}")
}

fn log_key(tenant: &str, device: &str) -> String {
    format!("tm:refine-log:{{{tenant}/{device}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        assert_eq!(state_key("demo", "v1"), "tm:refine:{demo/v1}");
        assert_eq!(log_key("demo", "v1"), "tm:refine-log:{demo/v1}");
    }
}
