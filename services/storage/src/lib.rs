//! storage-service: accepted fixes through Kafka into ClickHouse, and queries over them
//! (README, "How it behaves").
//!
//! Store produces a device's fixes as consecutive messages under the broker's size limit (key
//! `tenant/device`) and answers once Kafka has acknowledged all of them. A consumer group in
//! the same binary batches messages into ClickHouse and commits offsets only after the insert.
//! A second, separate group stores learning's geofence and place events (`events`).
#![forbid(unsafe_code)]

mod clickhouse;
mod config;
mod error;
mod events;
mod kafka;
mod pipeline;
mod schema;
mod service;

use std::{future::Future, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use trackmesh_proto::v1::storage_server::{SERVICE_NAME, StorageServer};
use trackmesh_shared::server::{self, ready_check};

pub use config::{Config, DEFAULT_PORT, StorageConfig};
pub use error::Error;
pub use kafka::{pack, partition_of, split_batch};

use crate::{clickhouse::Db, kafka::Kafka, pipeline::SinkHealth};

/// Serves the Storage API on `listener` and runs the consumer until `shutdown` completes;
/// then, within `SHUTDOWN_GRACE`, drains requests while the consumer stores and commits
/// what it holds (what it cannot store stays uncommitted in Kafka), and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::zero_metrics! {
        storage_dlq_messages_total storage_duplicates_dropped_total storage_events_inserted_total
        storage_events_insert_failures_total storage_events_invalid_total
        storage_events_undecodable_total storage_insert_failures_total
        storage_produce_failures_total storage_rows_written_total storage_stays_inserted_total
        storage_trips_inserted_total;
        storage_breaker_open storage_assigned_partitions
    }
    let db = Db::new(&config.storage);
    let kafka = Kafka::new(&config.storage)?;
    let health = SinkHealth::default();
    let grace = config.common.shutdown_grace.get();
    let (stop, stopped) = watch::channel(false);
    let mut consumer = tokio::spawn(set_up_then_consume(
        config.storage.clone(),
        grace,
        db.clone(),
        kafka.clone(),
        health.clone(),
        stopped,
    ));
    // The consumer stops with the server, not after its drain: both share the grace period.
    let stop_asked = std::sync::Arc::new(std::sync::OnceLock::new());
    let shutdown = {
        let stop_asked = stop_asked.clone();
        async move {
            shutdown.await;
            let _ = stop_asked.set(tokio::time::Instant::now());
            let _ = stop.send(true);
        }
    };

    let service = service::StorageService::new(&config.storage, db.clone(), kafka.clone());
    let routes = trackmesh_shared::routes!(StorageServer::new(service));
    let store_kafka = kafka.clone();
    let ready = ready_check(move || {
        let (db, kafka, health) = (db.clone(), kafka.clone(), health.clone());
        async move {
            db.ping().await?;
            kafka.ping().await?;
            if health.ok() {
                Ok(())
            } else {
                Err("consumer not running: schema, topics or clickhouse inserts failing".into())
            }
        }
    });
    // Store needs Kafka only: while ClickHouse is down the topic buffers, so ingest goes on.
    let store_ready = ready_check(move || {
        let kafka = store_kafka.clone();
        async move { kafka.ping().await }
    });
    let options = server::Options {
        health_parts: vec![(trackmesh_proto::STORE_HEALTH_NAME, store_ready)],
        ..server::Options::default()
    };
    let service = server::Service {
        name: SERVICE_NAME,
        routes,
        ready,
    };
    let served = server::serve_with(&config.common, listener, service, options, shutdown).await;
    // The server may also have ended on its own (an error): stop the consumer then too.
    let asked = stop_asked
        .get()
        .copied()
        .unwrap_or_else(tokio::time::Instant::now);
    // The pipeline keeps to the grace period itself; this is the backstop.
    match tokio::time::timeout_at(asked + grace + Duration::from_secs(1), &mut consumer).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "consumer task failed"),
        Err(_) => {
            tracing::warn!("consumer still busy after the grace period, stopped");
            consumer.abort();
        }
    }
    served
}

/// Every statement the service sends to ClickHouse, as for a current server (all
/// migrations), with sample values bound; each ends with a line holding only `;`.
pub fn statements_for_check() -> String {
    let config = StorageConfig {
        clickhouse_database: "trackmesh_check".into(),
        ..StorageConfig::default()
    };
    Db::new(&config)
        .statements_for_check(schema::ServerVersion(u32::MAX, 0))
        .iter()
        .map(|statement| format!("{statement}\n;\n"))
        .collect()
}

/// Applies the schema and creates the topics (retrying until the backends answer), then
/// runs the fixes pipeline and the events consumer side by side.
async fn set_up_then_consume(
    config: StorageConfig,
    shutdown_grace: Duration,
    db: Db,
    kafka: Kafka,
    health: SinkHealth,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let set_up = async {
            db.migrate(config.retention_days)
                .await
                .map_err(|err| format!("clickhouse: {err}"))?;
            kafka
                .ensure_topics()
                .await
                .map_err(|err| format!("kafka: {err}"))
        };
        match set_up.await {
            Ok(()) => break,
            Err(error) => tracing::warn!(%error, retry_in = ?backoff, "set-up failed"),
        }
        tokio::select! {
            _ = stopped.changed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    let events = events::run(&config, shutdown_grace, db.clone(), stopped.clone());
    let fixes = async {
        match pipeline::Pipeline::new(&config, shutdown_grace, db, kafka, health) {
            Ok(pipeline) => pipeline.run(stopped).await,
            Err(error) => tracing::error!(%error, "cannot create the kafka consumer"),
        }
    };
    tokio::join!(fixes, events);
}
