//! learning-api errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};
use trackmesh_shared::{domain::Invalid, grpc, state::StateError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("geofences are off: learning has no KAFKA_BROKERS")]
    GeofencesOff,
    #[error("geofences: the tenant has MAX_GEOFENCES_PER_TENANT={0} already; delete one first")]
    TooManyGeofences(u32),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Invalid(bad) => return grpc::invalid_argument(&bad.field, &bad.rule),
            Error::State(state) => state.code(),
            Error::Kafka(_) => Code::Unavailable,
            Error::GeofencesOff => Code::FailedPrecondition,
            Error::TooManyGeofences(_) => Code::ResourceExhausted,
        };
        if code == Code::Internal {
            tracing::error!(%error, "internal error");
        }
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let status = Status::from(Error::from(Invalid::new(
            "fixes[3].fix.lat",
            "91 is outside -90..=90",
        )));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "fixes[3].fix.lat: 91 is outside -90..=90");
        let down = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from(Error::State(StateError::Redis(down.into())));
        assert_eq!(status.code(), Code::Unavailable, "retryable");
        let status = Status::from(Error::State(StateError::Contention { device: "d".into() }));
        assert_eq!(status.code(), Code::Aborted);
        let status = Status::from(Error::State(StateError::Corrupt {
            device: "d".into(),
            reason: "bad".into(),
        }));
        assert_eq!(status.code(), Code::Internal);
    }
}
