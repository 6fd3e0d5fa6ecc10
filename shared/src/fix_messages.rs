//! The values of storage's fixes topic, for the readers besides storage (learning, the
//! gateway's Watch): schema version 1 is one device's `FixBatch` (delete markers too), version
//! 2 a `FixBatches` of several devices.

use prost::Message as _;
use trackmesh_proto::v1::{FixBatch, FixBatches};

pub const VERSION_HEADER: &str = "schema-version";
/// Header of a delete marker: the device's earlier fixes are to be deleted.
pub const DELETE_HEADER: &str = "delete-device";

/// The device batches of a value written with schema `version` (the header's value; absent: 1).
pub fn decode(version: Option<&[u8]>, payload: &[u8]) -> Result<Vec<FixBatch>, prost::DecodeError> {
    match version {
        Some(b"2") => Ok(FixBatches::decode(payload)?.batches),
        _ => Ok(vec![FixBatch::decode(payload)?]),
    }
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::RefinedFix;

    use super::*;

    #[test]
    fn both_versions_decode() {
        let one = FixBatch {
            tenant_id: "t".into(),
            device_id: "d".into(),
            fixes: vec![RefinedFix::default()],
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
}
