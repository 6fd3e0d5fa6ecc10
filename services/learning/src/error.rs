//! learning-api errors and their one mapping to gRPC status codes.

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
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("geofences are off: learning has no KAFKA_BROKERS")]
    GeofencesOff,
    #[error("geofences: the tenant has MAX_GEOFENCES_PER_TENANT={0} already; delete one first")]
    TooManyGeofences(u32),
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
            Error::Kafka(_) => Status::unavailable(error.to_string()),
            Error::GeofencesOff => Status::failed_precondition(error.to_string()),
            Error::TooManyGeofences(_) => Status::resource_exhausted(error.to_string()),
            Error::Redis(_) | Error::Corrupt { .. } => {
                tracing::error!(%error, "internal error");
                Status::internal(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let status = Status::from(Error::invalid("fixes[3].fix.lat", "91 is outside -90..=90"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "fixes[3].fix.lat: 91 is outside -90..=90");
        let down = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from(Error::Redis(down.into()));
        assert_eq!(status.code(), Code::Unavailable, "retryable");
        let status = Status::from(Error::Contention { device: "d".into() });
        assert_eq!(status.code(), Code::Aborted);
        let status = Status::from(Error::Corrupt {
            device: "d".into(),
            reason: "bad".into(),
        });
        assert_eq!(status.code(), Code::Internal);
    }
}
