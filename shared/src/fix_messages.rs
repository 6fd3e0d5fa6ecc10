//! The values of storage's fixes topic, read by storage, learning and the gateway's Watch, in
//! an encoding of their own (not the public API's): schema version 1 is one device's
//! `FixBatch` (delete markers and dead letters too), version 2 a `FixBatches` of several.

use prost::Message as _;

use crate::domain::Refined;

pub const VERSION_HEADER: &str = "schema-version";
/// Header of a delete marker: the device's earlier fixes are to be deleted.
pub const DELETE_HEADER: &str = "delete-device";

/// Accepted fixes of one device from one Store call. The tags are those `storage.proto` had
/// when the topic's messages left the public API, so messages written before still decode.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FixBatch {
    #[prost(string, tag = "1")]
    pub tenant_id: String,
    #[prost(string, tag = "2")]
    pub device_id: String,
    #[prost(message, repeated, tag = "3")]
    pub fixes: Vec<Refined>,
}

/// The fixes of one Store call's devices whose keys share a partition, one batch per device.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FixBatches {
    #[prost(message, repeated, tag = "1")]
    pub batches: Vec<FixBatch>,
}

/// The device batches of a value written with schema `version` (the header's value; absent: 1).
pub fn decode(version: Option<&[u8]>, payload: &[u8]) -> Result<Vec<FixBatch>, prost::DecodeError> {
    match version {
        Some(b"2") => Ok(FixBatches::decode(payload)?.batches),
        _ => Ok(vec![FixBatch::decode(payload)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Verdict;

    #[test]
    fn both_versions_decode() {
        let one = FixBatch {
            tenant_id: "t".into(),
            device_id: "d".into(),
            fixes: vec![Refined::default()],
        };
        let two = FixBatches {
            batches: vec![one.clone(), one.clone()],
        };
        assert_eq!(
            decode(None, &one.encode_to_vec()).unwrap(),
            vec![one.clone()]
        );
        assert_eq!(
            decode(Some(b"1"), &one.encode_to_vec()).unwrap(),
            vec![one.clone()]
        );
        assert_eq!(decode(Some(b"2"), &two.encode_to_vec()).unwrap().len(), 2);
        assert!(decode(Some(b"2"), b"\xff\xff").is_err());
    }

    /// Values of both schema versions as the release before this encoding wrote them, when
    /// they were the public API's `FixBatch` and `FixBatches`.
    #[test]
    fn values_written_by_the_previous_release_decode() {
        let one = decode(None, include_bytes!("../tests/fixtures/fix-batch-v1.bin")).unwrap();
        let two = decode(
            Some(b"2"),
            include_bytes!("../tests/fixtures/fix-batches-v2.bin"),
        )
        .unwrap();
        assert_eq!(two.len(), 2);
        assert_eq!(one[0], two[0]);
        assert_eq!(
            (two[1].tenant_id.as_str(), two[1].device_id.as_str()),
            ("demo", "truck/7")
        );
        let batch = &one[0];
        assert_eq!(batch.device_id, "366952790");
        assert_eq!(batch.fixes.len(), 3);
        for (i, refined) in batch.fixes.iter().enumerate() {
            assert_eq!(refined.verdict(), Verdict::Accepted);
            assert_eq!((refined.segment, refined.dt_ms), (2, 10_000));
            assert_eq!(refined.reanchored, i == 1);
            let fix = refined.fix.as_ref().unwrap();
            assert_eq!(fix.device_id, "366952790");
            assert_eq!(fix.time_ms, 1_764_547_200_000 + 10_000 * i as i64);
            assert_eq!(fix.lon, -74.07);
            assert_eq!(fix.speed_mps, (i % 2 == 0).then_some(6.5));
            assert_eq!((fix.accuracy_m, fix.altitude_m), (Some(4.0), None));
        }
    }
}
