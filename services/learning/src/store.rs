//! Device models in Redis: one hash per device (version + prost-encoded model) under a key
//! with the hash tag `{tenant/device}`, written by versioned compare-and-set.

use std::time::Duration;

use prost::Message as _;
use trackmesh_shared::redis::{Redis, Write};

use crate::{error::Error, model::Model};

/// A device's model as read, with the version a write must expect (0: none stored).
pub struct Loaded {
    pub version: u64,
    pub model: Model,
}

/// A changed model to write back.
pub struct Save<'a> {
    pub device: &'a str,
    pub expected: u64,
    pub model: &'a Model,
}

#[derive(Clone)]
pub struct Store {
    redis: Redis,
    ttl: Duration,
}

impl Store {
    pub fn new(redis: Redis, ttl: Duration) -> Self {
        Self { redis, ttl }
    }

    /// The models of `devices`, in order, in one round trip.
    pub async fn load(&self, tenant: &str, devices: &[&str]) -> Result<Vec<Loaded>, Error> {
        let keys: Vec<String> = devices.iter().map(|d| key(tenant, d)).collect();
        let values = self.redis.read(&keys).await?;
        devices
            .iter()
            .zip(values)
            .map(|(device, value)| {
                let model = match value.data {
                    Some(bytes) => {
                        Model::decode(bytes.as_slice()).map_err(|err| Error::Corrupt {
                            device: (*device).to_owned(),
                            reason: err.to_string(),
                        })?
                    }
                    None => Model::default(),
                };
                Ok(Loaded {
                    version: value.version,
                    model,
                })
            })
            .collect()
    }

    pub async fn load_one(&self, tenant: &str, device: &str) -> Result<Loaded, Error> {
        self.load(tenant, &[device])
            .await?
            .pop()
            .ok_or_else(|| Error::Corrupt {
                device: device.to_owned(),
                reason: "no reply for the device".into(),
            })
    }

    /// Compare-and-set of each model; `false` where another replica got there first.
    /// Each write renews the model's time to live.
    pub async fn save(&self, tenant: &str, saves: &[Save<'_>]) -> Result<Vec<bool>, Error> {
        let writes: Vec<Write> = saves
            .iter()
            .map(|save| Write {
                key: key(tenant, save.device),
                expected: save.expected,
                data: save.model.encode_to_vec(),
                ttl: self.ttl,
                log: None,
            })
            .collect();
        Ok(self.redis.write(&writes).await?)
    }

    pub async fn forget(&self, tenant: &str, device: &str) -> Result<bool, Error> {
        Ok(self.redis.delete(&[key(tenant, device)]).await?)
    }
}

// The hash tag keeps a device's key in one Redis Cluster slot, like refinement's keys.
fn key(tenant: &str, device: &str) -> String {
    format!("tm:learn:{{{tenant}/{device}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_carries_the_hash_tag() {
        assert_eq!(key("demo", "v1"), "tm:learn:{demo/v1}");
    }
}
