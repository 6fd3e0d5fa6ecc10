//! learning-api: stays, places and next-place prediction per device (DESIGN.md, "learning-api").
//!
//! Per device and online, from the accepted fixes: stay-point detection, places with their
//! dwell by hour of week, place → place transitions (by time of day of departure), home and
//! work labels, and a forecast of the next place (`model::predict`). A device's model lives in Redis and is updated with
//! compare-and-set, so replicas may observe the same device at the same time; a watermark
//! makes observing the same fixes twice change nothing.
#![forbid(unsafe_code)]

pub mod calendar;
mod config;
mod error;
pub mod model;
mod service;
mod store;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::service::Routes;
use trackmesh_proto::v1::learning_server::{LearningServer, SERVICE_NAME};
use trackmesh_shared::{
    redis::Redis,
    server::{self, ready_check},
};

pub use config::{Config, DEFAULT_PORT, LearningConfig};
pub use error::Error;

/// Serves the Learning API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::metrics::register(
        &[
            "learning_stays_detected_total",
            "learning_places_created_total",
            "learning_places_evicted_total",
            "learning_cas_conflicts_total",
        ],
        &[],
    );
    let settings = &config.learning;
    let rules = settings.rules()?;
    let redis = Redis::connect(&config.redis.target(), config.redis.redis_timeout.get())?;
    let store = store::Store::new(redis.clone(), settings.state_ttl.get());
    let service = service::LearningService::new(store, rules, settings.max_batch as usize);
    let routes = Routes::new(
        LearningServer::new(service)
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
