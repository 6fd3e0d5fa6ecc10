//! gateway errors and their one mapping to gRPC status codes.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use trackmesh_shared::grpc;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{field}: {rule}")]
    InvalidArgument { field: String, rule: String },
    #[error("rate limit of {kind} per second exceeded for this tenant; retry in {retry_after:?}")]
    RateLimited {
        kind: &'static str,
        retry_after: Duration,
    },
    #[error("live streaming is off: the gateway has no KAFKA_BROKERS")]
    LiveOff,
    #[error("live streaming is starting: the fixes topic is not readable yet; retry shortly")]
    LiveStarting,
    #[error("live stream ended: the gateway is shutting down; resume with the last resume_token")]
    LiveEnded,
    /// A downstream's answer, passed on (already carrying the right code).
    #[error("{0}")]
    Downstream(#[from] Status),
}

impl Error {
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument { field, rule } => grpc::invalid_argument(&field, rule),
            Error::RateLimited { kind, retry_after } => Status::with_error_details(
                Code::ResourceExhausted,
                Error::RateLimited { kind, retry_after }.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::LiveOff => Status::failed_precondition(error.to_string()),
            Error::LiveStarting | Error::LiveEnded => Status::unavailable(error.to_string()),
            Error::Downstream(status) => status,
        }
    }
}
