//! Refinement's device state in Redis: the shared versioned store of `DeviceState`, with the
//! log of recently accepted fixes beside it (same hash slot) that recognises replays.

use std::time::Duration;

use trackmesh_shared::{
    domain::{DeviceId, DeviceKey, TenantId},
    redis::{LogRange, Redis},
    state::{StateError, StateStore},
};

use crate::refine::{DeviceState, Record};

pub type Store = StateStore<DeviceState>;

pub fn open(redis: Redis, ttl: Duration, replay_history: usize) -> Store {
    StateStore::new(redis, "tm:refine:", ttl, "refinement_cas_conflicts_total")
        .with_log("tm:refine-log:", replay_history * Record::SIZE)
}

/// Per device, the records of its replay log in the time range `from..=to`: only what a
/// batch can match is read, so a retry storm costs what it re-sends, not whole logs.
pub async fn history(
    store: &Store,
    tenant: TenantId<'_>,
    ranges: &[(DeviceId<'_>, i64, i64)],
) -> Result<Vec<Vec<Record>>, StateError> {
    let ranges: Vec<LogRange> = ranges
        .iter()
        .map(|(device, from, to)| LogRange {
            key: store
                .log_key(DeviceKey::new(tenant, *device))
                .unwrap_or_default(),
            record_size: Record::SIZE,
            from: *from,
            to: *to,
        })
        .collect();
    let logs = store.redis().log_ranges(&ranges).await?;
    Ok(logs.iter().map(|bytes| Record::decode_all(bytes)).collect())
}

pub fn encode(records: &[Record]) -> Vec<u8> {
    let mut log = Vec::with_capacity(records.len() * Record::SIZE);
    for record in records {
        record.encode(&mut log);
    }
    log
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use trackmesh_shared::redis::Target;

    use super::*;
    use crate::refine::Verdict;

    #[tokio::test]
    async fn keys_share_the_hash_tag() {
        let redis = Redis::connect(
            &Target::Single("redis://127.0.0.1:1".into()),
            Duration::from_secs(1),
        )
        .unwrap();
        let store = open(redis, Duration::from_secs(60), 10);
        let key = DeviceKey::parse("demo", "v1").unwrap();
        assert_eq!(store.key(key), "tm:refine:{demo/v1}");
        assert_eq!(store.log_key(key).unwrap(), "tm:refine-log:{demo/v1}");
    }

    /// A state and a replay log as the release before the shared store wrote them.
    #[test]
    fn values_written_by_the_previous_release_decode() {
        let state =
            DeviceState::decode(&include_bytes!("../tests/fixtures/device-state.bin")[..]).unwrap();
        assert_eq!(state.accepted_count, 6);
        let last = state.last.as_ref().unwrap();
        assert_eq!(last.verdict(), Verdict::Accepted);
        assert_eq!((last.segment, last.dt_ms), (1, 60_000));
        assert!((last.distance_m - 111.195).abs() < 1e-3);
        let fix = last.fix.as_ref().unwrap();
        assert_eq!(
            (fix.device_id.as_str(), fix.time_ms),
            ("d", 1_779_996_700_000)
        );
        assert_eq!((fix.lat, fix.lon), (36.855_000_000_000_004, -76.3));
        assert_eq!(fix.accuracy_m, Some(5.0));
        assert_eq!(fix.altitude_m, Some(12.0));
        assert_eq!(state.pending.len(), 1);
        assert_eq!(
            (state.pending[0].lat, state.pending[0].accuracy_m),
            (40.0, None)
        );

        let log = Record::decode_all(include_bytes!("../tests/fixtures/replay-log.bin"));
        assert_eq!(log.len(), 6);
        assert_eq!(log[0].time_ms, 1_779_996_400_000);
        assert_eq!(log[5], Record::of(last));
        assert_eq!(
            encode(&log),
            include_bytes!("../tests/fixtures/replay-log.bin")
        );
    }
}
