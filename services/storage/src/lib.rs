//! storage-service: accepted fixes through Kafka into ClickHouse, and queries over them
//! (DESIGN.md, "storage-service").
//!
//! Store produces one message per device (key `tenant/device`) and answers once Kafka has
//! acknowledged all of them. A consumer group in the same binary batches messages into
//! ClickHouse and commits offsets only after the insert.
#![forbid(unsafe_code)]

mod clickhouse;
mod config;
mod error;
mod kafka;
mod pipeline;
mod schema;
mod service;

use std::{future::Future, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tonic::service::Routes;
use trackmesh_proto::v1::storage_server::{SERVICE_NAME, StorageServer};
use trackmesh_shared::server::{self, ready_check};

pub use config::{Config, DEFAULT_PORT, StorageConfig};
pub use error::Error;

use crate::{clickhouse::Db, kafka::Kafka, pipeline::SinkHealth};

/// Serves the Storage API on `listener` and runs the consumer until `shutdown` completes;
/// then drains requests, stores and commits what the consumer holds, and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::metrics::register(
        &[
            "storage_dlq_messages_total",
            "storage_duplicates_dropped_total",
            "storage_insert_failures_total",
            "storage_produce_failures_total",
            "storage_rows_written_total",
        ],
        &["storage_breaker_open", "storage_assigned_partitions"],
    );
    let db = Db::new(&config.storage);
    let kafka = Kafka::new(&config.storage)?;
    let health = SinkHealth::default();
    let (stop, stopped) = watch::channel(false);
    let consumer = tokio::spawn(set_up_then_consume(
        config.storage.clone(),
        db.clone(),
        kafka.clone(),
        health.clone(),
        stopped,
    ));

    let service = service::StorageService::new(&config.storage, db.clone(), kafka.clone());
    let routes = Routes::new(
        StorageServer::new(service)
            .max_decoding_message_size(server::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(server::MAX_MESSAGE_BYTES),
    );
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
    let served = server::serve(
        &config.common,
        listener,
        server::Service {
            name: SERVICE_NAME,
            routes,
            ready,
        },
        shutdown,
    )
    .await;
    let _ = stop.send(true);
    if let Err(error) = consumer.await {
        tracing::error!(%error, "consumer task failed");
    }
    served
}

/// Applies the schema and creates the topics (retrying until the backends answer), then
/// runs the consumer pipeline.
async fn set_up_then_consume(
    config: StorageConfig,
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
    match pipeline::Pipeline::new(&config, db, kafka, health) {
        Ok(pipeline) => pipeline.run(stopped).await,
        Err(error) => tracing::error!(%error, "cannot create the kafka consumer"),
    }
}
