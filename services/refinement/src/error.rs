//! refinement-api errors and their one mapping to gRPC status codes.

use tonic::Status;
use trackmesh_shared::grpc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {rule}")]
    InvalidArgument { field: String, rule: String },
    #[error("redis: {0}")]
    Redis(#[from] trackmesh_shared::redis::RedisError),
    #[error("device {device}: too many concurrent updates, retry")]
    Contention { device: String },
    #[error("device {device}: stored state is unreadable: {reason}")]
    Corrupt { device: String, reason: String },
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
            Error::Redis(err) if trackmesh_shared::redis::is_transient(err) => {
                Status::unavailable(error.to_string())
            }
            Error::Contention { .. } => Status::aborted(error.to_string()),
            Error::Redis(_) | Error::Corrupt { .. } => {
                tracing::error!(%error, "internal error");
                Status::internal(error.to_string())
            }
        }
    }
}
