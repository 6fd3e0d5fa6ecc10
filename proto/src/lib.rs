//! The trackmesh gRPC contract: messages and clients/servers generated from `proto/trackmesh/v1`.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("trackmesh.v1");
}

/// Encoded file descriptors of every trackmesh proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("trackmesh_descriptor");
