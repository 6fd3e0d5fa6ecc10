//! refinement-api errors and their one mapping to gRPC status codes.

use tonic::{Code, Status};
use trackmesh_shared::{domain::Invalid, grpc, state::StateError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    State(#[from] StateError),
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::Invalid(bad) => return grpc::invalid_argument(&bad.field, &bad.rule),
            Error::State(state) => state.code(),
        };
        if code == Code::Internal {
            tracing::error!(%error, "internal error");
        }
        Status::new(code, error.to_string())
    }
}
