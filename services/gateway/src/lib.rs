//! gateway: the public trackmesh API (DESIGN.md, "gateway").
//!
//! Every call is authenticated by API key (the key decides the tenant), rate-limited per
//! tenant, and fanned out: Ingest runs Refine, then Store (required) and Observe (best effort)
//! concurrently with the accepted fixes; queries go to storage or learning.
#![forbid(unsafe_code)]

mod auth;
mod config;
mod downstream;
mod error;
mod limits;
mod service;

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use trackmesh_proto::v1::gateway_server::{GatewayServer, SERVICE_NAME};
use trackmesh_shared::server::{self, MAX_MESSAGE_BYTES, ready_check};

pub use config::{Config, DEFAULT_PORT, GatewayConfig};

use crate::{downstream::Downstream, limits::Limits, service::Downstreams};

/// Serves the Gateway API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    trackmesh_shared::metrics::register(&["gateway_learning_failures_total"], &[]);
    let settings = &config.gateway;
    let keys = settings.api_keys()?;
    let downstreams = Downstreams {
        refinement: Downstream::start(
            "refinement",
            &settings.refinement_addr,
            &config.common,
            settings,
        )?,
        learning: Downstream::start(
            "learning",
            &settings.learning_addr,
            &config.common,
            settings,
        )?,
        storage: Downstream::start("storage", &settings.storage_addr, &config.common, settings)?,
    };
    let (refinement, storage) = (downstreams.refinement.clone(), downstreams.storage.clone());
    let limits = Limits::new(
        settings.rate_limit_requests_per_sec,
        settings.rate_limit_fixes_per_sec,
        settings.max_batch,
    );
    let service = service::GatewayService::new(
        keys,
        limits,
        downstreams,
        settings.max_batch as usize,
        settings.downstream_timeout.get(),
    );
    let tidy = service.clone();
    let tidier = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            tidy.limits().tidy();
        }
    });
    let routes = Routes::new(
        GatewayServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
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
    tidier.abort();
    served
}
