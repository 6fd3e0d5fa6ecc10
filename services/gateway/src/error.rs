//! gateway errors and their one mapping to gRPC status codes (`http::api` maps the status on
//! to HTTP).

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use trackmesh_shared::{domain::Invalid, grpc};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No credentials, or none this gateway knows; the message says which.
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("an ingest token can only send fixes; use an API key")]
    IngestOnly,
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

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::Invalid(bad) => grpc::invalid_argument(&bad.field, bad.rule),
            Error::Unauthenticated(message) => Status::unauthenticated(message),
            Error::IngestOnly => Status::permission_denied(error.to_string()),
            Error::RateLimited { retry_after, .. } => Status::with_error_details(
                Code::ResourceExhausted,
                error.to_string(),
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::LiveOff => Status::failed_precondition(error.to_string()),
            Error::LiveStarting | Error::LiveEnded => Status::unavailable(error.to_string()),
            Error::Downstream(status) => status,
        }
    }
}
