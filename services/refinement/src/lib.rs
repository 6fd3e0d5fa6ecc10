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
use trackmesh_proto::v1::refinement_server::{RefinementServer, SERVICE_NAME};
use trackmesh_shared::{redis::Redis, server};

pub use config::{Config, DEFAULT_PORT, RefinementConfig};
pub use error::Error;

/// Serves the Refinement API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::zero_metrics! {
        refinement_cas_conflicts_total refinement_replays_total refinement_recovered_total
        refinement_seeded_total
    }
    let redis = Redis::connect(&config.redis.target(), config.redis.redis_timeout.get())?;
    let settings = &config.service;
    let store = store::open(
        redis.clone(),
        settings.state_ttl.get(),
        settings.replay_history as usize,
    );
    let service =
        service::RefinementService::new(store, settings.rules(), settings.max_batch as usize);
    let service = server::Service {
        name: SERVICE_NAME,
        routes: trackmesh_shared::routes!(RefinementServer::new(service)),
        ready: redis.ready_check(),
    };
    server::serve(&config.common, listener, service, shutdown).await
}
