//! gateway: the public trackmesh API (`proto/trackmesh/v1/gateway.proto`, README).
//!
//! Every call is authenticated by API key (the key decides the tenant) before its body is
//! read, held to per-method size limits and per-tenant concurrency limits, rate-limited per
//! tenant, and fanned out: Ingest requests of all callers are coalesced into shared batches
//! (`coalesce`); per tenant of a batch, Refine, then Store (required) and Observe (best effort)
//! concurrently with the accepted fixes; queries go to storage or learning.
#![forbid(unsafe_code)]

mod auth;
mod coalesce;
mod config;
mod downstream;
mod error;
mod export;
mod guard;
mod http;
mod kafka;
mod limits;
mod relearn;
mod service;
mod simplify;
mod watch;

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use trackmesh_proto::v1::gateway_server::{GatewayServer, SERVICE_NAME};
use trackmesh_shared::server::{self, MAX_MESSAGE_BYTES, ready_check};

pub use config::{Config, DEFAULT_PORT, GatewayConfig};

use crate::{
    downstream::Downstream,
    guard::Guard,
    limits::Limits,
    service::{Coalescing, Downstreams, StreamTimeouts},
};

/// Serves the Gateway API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::metrics::register(
        &["gateway_learning_failures_total"],
        &["gateway_batches_in_flight"],
    );
    let Config {
        common,
        gateway: settings,
        refinement,
        learning,
        storage,
        credentials: keys,
        tenant_requests,
    } = config;
    let settings = &settings;
    // Every replica derives the same secret from the same keys unless one is set.
    let stream_tokens = auth::StreamTokens::new(
        &settings.live_token_secret.as_ref().map_or_else(
            || keys.keys.fingerprint().to_vec(),
            |s| s.expose().as_bytes().to_vec(),
        ),
        settings.live_token_ttl.get(),
    );
    let downstreams = Downstreams {
        refinement: Downstream::start("refinement", "", refinement, &common, settings)?,
        learning: Downstream::start("learning", "", learning, &common, settings)?,
        // Ingest needs Store only, which works while ClickHouse is down (Kafka buffers).
        storage: Downstream::start(
            "storage",
            trackmesh_proto::STORE_HEALTH_NAME,
            storage,
            &common,
            settings,
        )?,
    };
    let (refinement, storage) = (downstreams.refinement.clone(), downstreams.storage.clone());
    let limits = Limits::new(
        settings.rate_limit_requests_per_sec,
        settings.rate_limit_fixes_per_sec,
        settings.max_batch,
    );
    let live = settings.kafka_brokers.as_deref().map(|brokers| {
        let topics = [
            settings.kafka_topic.clone(),
            settings.kafka_events_topic.clone(),
        ];
        watch::Hub::start(brokers, topics, settings.watch_buffer as usize)
    });
    let hub = live.as_ref().map(|(hub, _)| hub.clone());
    let service = service::GatewayService::new(
        limits,
        downstreams,
        settings.max_batch as usize,
        settings.downstream_timeout.get(),
        StreamTimeouts {
            idle: settings.stream_idle_timeout.get(),
            max: settings.stream_max_duration.get(),
        },
        Coalescing {
            max_fixes: settings.coalesce_max_fixes() as usize,
            max_in_flight: settings.coalesce_max_in_flight as usize,
        },
        hub.clone(),
    );
    let (tidy, http_service) = (service.clone(), service.clone());
    let tidier = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            tidy.limits().tidy();
        }
    });
    let ingest_message_bytes = guard::ingest_message_bytes(settings.max_batch);
    // The guard refuses oversize messages per method first; tonic's limit is the backstop.
    let gateway = GatewayServer::new(service)
        .max_decoding_message_size(ingest_message_bytes)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let guard = Guard::new(
        gateway,
        guard::Settings {
            keys,
            max_batch: settings.max_batch,
            tenant_requests,
            tenant_streams: settings.tenant_max_streams,
            ingest_message_bytes,
        },
    );
    let api = http::api::Api {
        service: http_service,
        admission: guard.admission(),
        ingest_body_bytes: http::api::ingest_body_bytes(settings.max_batch),
        stream_tokens,
    };
    let routes = Routes::from(
        Routes::new(guard)
            .into_axum_router()
            .merge(http::api::router(api))
            .merge(http::console::router(&settings.console_tile_url)),
    );
    // Streams are bounded per tenant and by their timeouts instead of holding a global permit.
    let options = server::Options {
        own_limits: guard::STREAM_METHODS
            .iter()
            .map(|method| format!("/{SERVICE_NAME}/{method}"))
            .collect(),
        ..server::Options::default()
    };
    // Learning is best effort: without it the gateway still ingests, so it is not required.
    let ready = ready_check(move || {
        let (refinement, storage) = (refinement.clone(), storage.clone());
        async move {
            for (name, downstream) in [("refinement", &refinement), ("storage", &storage)] {
                if downstream.healthy_endpoints() == 0 {
                    return Err(format!("{name}: no healthy endpoint"));
                }
            }
            Ok(())
        }
    });
    // Watch streams never end by themselves: close them when shutdown starts.
    let shutdown = async move {
        shutdown.await;
        if let Some(hub) = &hub {
            hub.close();
        }
    };
    let served = server::serve_with(
        &common,
        listener,
        server::Service {
            name: SERVICE_NAME,
            routes,
            ready,
        },
        options,
        shutdown,
    )
    .await;
    tidier.abort();
    if let Some((_, tail)) = live {
        tail.abort();
    }
    served
}
