//! learning-api: stays, trips, places, next-place prediction and geofence events per device
//! (README, "How it behaves").
//!
//! Per device and online, from the accepted fixes: stay-point detection, places with their
//! dwell by hour of week, place → place transitions (by time of day of departure), home and
//! work labels, and a forecast of the next place (`model::predict`). A device's model lives in Redis and is updated with
//! compare-and-set, so replicas may observe the same device at the same time; a watermark
//! makes observing the same fixes twice change nothing.
//!
//! With Kafka (`kafka`), fixes come two ways: the gateway's Observe call, and the fixes topic
//! read as a consumer group, so what an Observe call missed is learned anyway. Geofences are
//! kept in a compacted topic (`geofences`); each observed fix is evaluated against its
//! tenant's fences and the device's known places (`fence`, `model`), and the transitions are
//! produced to the events topic before the model that records them is written, with the
//! closed stays and the trips between them. Rebuild (`rebuild`) learns a device's stored
//! fixes into a fresh model that replaces the stored one (the gateway's relearn).
#![forbid(unsafe_code)]

pub mod calendar;
mod config;
mod error;
pub mod fence;
mod geofences;
mod kafka;
pub mod model;
mod rebuild;
mod service;
mod store;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::net::TcpListener;
use trackmesh_proto::v1::learning_server::{LearningServer, SERVICE_NAME};
use trackmesh_shared::{redis::Redis, server};

pub use config::{Config, DEFAULT_PORT, LearningConfig};
pub use error::Error;

/// Serves the Learning API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::zero_metrics! {
        learning_stays_detected_total learning_trips_total learning_rebuilds_total
        learning_places_created_total learning_places_evicted_total learning_cas_conflicts_total
        learning_stream_messages_total
    }
    let settings = &config.service;
    let rules = settings.rules();
    let redis = Redis::connect(&config.redis.target(), config.redis.redis_timeout.get())?;
    let store = store::open(redis.clone(), settings.state_ttl.get());
    let kafka = kafka::Kafka::new(settings)?;
    let events = match &kafka {
        Some(kafka) => {
            kafka.ensure_topics().await?;
            let book = geofences::Book::start(&kafka.brokers, &kafka.geofences_topic)?;
            Some(service::EventSettings {
                kafka: kafka.clone(),
                book,
                min_dwell_ms: i64::try_from(settings.geofence_min_dwell.get().as_millis())
                    .unwrap_or(i64::MAX),
                max_geofences: settings.max_geofences_per_tenant,
            })
        }
        None => None,
    };
    let service = Arc::new(service::LearningService::new(
        store,
        rules,
        settings.max_batch as usize,
        events,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer =
        kafka.map(|kafka| tokio::spawn(kafka.observe_fixes(service.clone(), stop.clone())));
    let service = server::Service {
        name: SERVICE_NAME,
        routes: trackmesh_shared::routes!(LearningServer::from_arc(service)),
        ready: redis.ready_check(),
    };
    let shutdown = async move {
        shutdown.await;
        stop.store(true, Ordering::Relaxed);
    };
    let served = server::serve(&config.common, listener, service, shutdown).await;
    if let Some(consumer) = consumer {
        // It stops within half a second of the flag, after its current message.
        let _ = tokio::time::timeout(config.common.shutdown_grace.get(), consumer).await;
    }
    served
}
