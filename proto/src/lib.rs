//! The trackmesh gRPC contract: messages and clients/servers generated from `proto/trackmesh/v1`.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("trackmesh.v1");
}

/// Encoded file descriptors of every trackmesh proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("trackmesh_descriptor");

/// The gRPC health name storage-service reports for `Store` alone: SERVING while Kafka takes
/// messages, even when ClickHouse is down (the topic buffers; consumption catches up). The
/// gateway checks it before ingesting, so a ClickHouse outage does not stop ingest.
pub const STORE_HEALTH_NAME: &str = "trackmesh.v1.Storage/Store";
