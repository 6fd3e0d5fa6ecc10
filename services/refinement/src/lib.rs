//! refinement-api: cleans each device's stream of fixes (README, "How it behaves").
//!
//! Each fix gets a verdict, in this order: INVALID, NULL_ISLAND, FUTURE, INACCURATE (no state
//! needed), then against the device's last accepted fix DUPLICATE / OUT_OF_ORDER (unless it is
//! a replay of an accepted fix), a gap over MAX_TIME_DIFF (accepted, new segment), SPEED,
//! STATIONARY, else ACCEPTED. State lives in Redis and is updated with compare-and-set.
#![forbid(unsafe_code)]

mod config;
mod error;
pub mod refine;
mod service;
mod store;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::Routes;
use trackmesh_proto::v1::refinement_server::{RefinementServer, SERVICE_NAME};
use trackmesh_shared::{
    redis::Redis,
    server::{self, ready_check},
};

pub use config::{Config, DEFAULT_PORT, RefinementConfig};
pub use error::Error;

/// Serves the Refinement API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::metrics::register(
        &[
            "refinement_cas_conflicts_total",
            "refinement_replays_total",
            "refinement_recovered_total",
            "refinement_seeded_total",
        ],
        &[],
    );
    let redis = Redis::connect(&config.redis.target(), config.redis.redis_timeout.get())?;
    let settings = &config.service;
    let store = store::open(
        redis.clone(),
        settings.state_ttl.get(),
        settings.replay_history as usize,
    );
    let service =
        service::RefinementService::new(store, settings.rules(), settings.max_batch as usize);
    let routes = Routes::new(
        RefinementServer::new(service)
            .max_decoding_message_size(server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(server::MAX_MESSAGE_BYTES),
    );
    let ready = ready_check(move || {
        let redis = redis.clone();
        async move { redis.ping().await }
    });
    let service = server::Service {
        name: SERVICE_NAME,
        routes,
        ready,
    };
    server::serve(&config.common, listener, service, shutdown).await
}
