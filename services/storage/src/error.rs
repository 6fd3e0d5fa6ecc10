//! storage-service errors and their one mapping to gRPC status codes.

use tonic::Status;
use trackmesh_shared::{domain::Invalid, grpc};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// Kafka did not take or acknowledge the fixes; the caller retries.
    #[error("{0}")]
    Kafka(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::Invalid(invalid) => grpc::invalid_argument(&invalid.field, &invalid.rule),
            // Retryable: the broker or the database is down or slow.
            Error::Kafka(_)
            | Error::ClickHouse(
                clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut,
            ) => {
                tracing::warn!(%error, "dependency unavailable");
                Status::unavailable(error.to_string())
            }
            Error::ClickHouse(_) => {
                tracing::error!(%error, "clickhouse query failed");
                Status::internal(error.to_string())
            }
        }
    }
}
