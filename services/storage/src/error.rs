//! storage-service errors and their one mapping to gRPC status codes.

use tonic::Status;
use trackmesh_shared::grpc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {rule}")]
    InvalidArgument { field: String, rule: String },
    /// Kafka did not take or acknowledge the fixes; the caller retries.
    #[error("{0}")]
    Kafka(String),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

impl Error {
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl From<trackmesh_shared::ids::BadId> for Error {
    fn from(bad: trackmesh_shared::ids::BadId) -> Self {
        Self::invalid(bad.field, bad.rule)
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match &error {
            Error::InvalidArgument { field, rule } => grpc::invalid_argument(field, rule),
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
