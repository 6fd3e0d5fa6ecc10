//! Learning's device models in Redis: the shared versioned store of `Model`, under keys with
//! the hash tag `{tenant/device}` like refinement's.

use std::time::Duration;

use trackmesh_shared::{redis::Redis, state::StateStore};

use crate::model::Model;

pub type Store = StateStore<Model>;

pub fn open(redis: Redis, ttl: Duration) -> Store {
    StateStore::new(redis, "tm:learn:", ttl, "learning_cas_conflicts_total")
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use trackmesh_shared::{domain::DeviceKey, redis::Target};

    use super::*;
    use crate::model;

    #[tokio::test]
    async fn key_carries_the_hash_tag() {
        let target = Target::Single("redis://127.0.0.1:1".into());
        let store = open(
            Redis::connect(&target, Duration::from_secs(1)).unwrap(),
            Duration::ZERO,
        );
        assert_eq!(
            store.key(DeviceKey::parse("demo", "v1").unwrap()),
            "tm:learn:{demo/v1}"
        );
        assert_eq!(store.log_key(DeviceKey::parse("demo", "v1").unwrap()), None);
    }

    /// A model as the release before the shared store wrote it: three days between two
    /// places, in the first place again at the end.
    #[test]
    fn a_model_written_by_the_previous_release_decodes() {
        let model = Model::decode(&include_bytes!("../tests/fixtures/model.bin")[..]).unwrap();
        assert_eq!((model.fixes_observed, model.stays), (595, 6));
        assert_eq!(model.watermark_ms, 1_704_330_000_000);
        assert_eq!(model.places.len(), 2);
        assert_eq!((model.places[0].id, model.places[0].visits), (1, 3));
        assert_eq!(model.places[1].dwell_ms, 162_000_000);
        let transitions: Vec<(u32, u32, u32)> = model
            .transitions
            .iter()
            .map(|t| (t.from, t.to, t.count))
            .collect();
        assert_eq!(transitions, [(1, 2, 3), (2, 1, 2)]);
        assert_eq!(model.last_stay.as_ref().map(|s| s.place_id), Some(2));
        assert_eq!(model.candidate.as_ref().map(|c| c.fixes), Some(13));
        assert_eq!(
            model.trip.as_ref().map(|t| t.start_ms),
            Some(1_704_326_400_000)
        );
        assert_eq!(model::novelty(&model), 3.0 / 8.0);
    }
}
