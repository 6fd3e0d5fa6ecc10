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
        match &error {
            Error::Invalid(bad) => grpc::invalid_argument(&bad.field, &bad.rule),
            Error::State(state) => {
                if state.code() == Code::Internal {
                    tracing::error!(%error, "internal error");
                }
                Status::new(state.code(), error.to_string())
            }
        }
    }
}
