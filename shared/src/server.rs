//! The server every service runs: its gRPC services plus gRPC health and reflection, and
//! `GET /health`, `/ready`, `/metrics` over HTTP/1.1, all on one port, with graceful shutdown.

use std::{future::Future, io::Write as _, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{http::StatusCode, response::IntoResponse, routing::get};
use futures::{StreamExt as _, future::BoxFuture};
use tokio::{net::TcpListener, sync::watch};
use tonic::{service::Routes, transport::Server};
use tonic_health::pb::health_check_response::ServingStatus as CheckedStatus;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::{CommonConfig, ConfigError, EXIT_USAGE},
    conn::Conn,
    grpc::GrpcLayer,
    shutdown, telemetry, tls,
};

/// Largest gRPC message a service accepts or sends: a full batch of fixes with headroom.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Probes a service's dependencies; `Err` says which one is down and why.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Wraps an async closure as a [`ReadyCheck`].
pub fn ready_check<F, Fut>(check: F) -> ReadyCheck
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(check()))
}

/// The routes of a generated tonic server, with the message size limits every service uses.
#[macro_export]
macro_rules! routes {
    ($server:expr) => {
        tonic::service::Routes::new(
            $server
                .max_decoding_message_size($crate::server::MAX_MESSAGE_BYTES)
                .max_encoding_message_size($crate::server::MAX_MESSAGE_BYTES),
        )
    };
}

/// What a service hands to [`serve`].
pub struct Service {
    /// Full gRPC name reported by the health service, e.g. `trackmesh.v1.Refinement`.
    pub name: &'static str,
    /// The service's own gRPC services.
    pub routes: Routes,
    pub ready: ReadyCheck,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Readiness {
    Ready,
    NotReady(String),
    ShuttingDown,
}

/// What few services need to change in [`serve_with`].
#[derive(Clone, Default)]
pub struct Options {
    /// Parts of the service that can serve while the whole is not ready, each a gRPC health
    /// name with its own check (storage's Store needs Kafka, not ClickHouse). NOT_SERVING
    /// while its check fails and while shutting down, like the whole.
    pub health_parts: Vec<(&'static str, ReadyCheck)>,
    /// Paths (`/package.Service/Method`) of long-lived streaming calls that the service bounds
    /// itself (per caller, with idle and total timeouts); they hold no MAX_CONCURRENT_REQUESTS
    /// permit, so that idle streams cannot lock every other call out.
    pub own_limits: Vec<String>,
}

/// Serves until `shutdown` completes, then reports NOT_SERVING, refuses new requests and
/// lets in-flight ones finish within `shutdown_grace`.
pub async fn serve(
    config: &CommonConfig,
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve_with(config, listener, service, Options::default(), shutdown).await
}

/// [`serve`] with [`Options`].
pub async fn serve_with(
    config: &CommonConfig,
    listener: TcpListener,
    service: Service,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let local_addr = listener.local_addr()?;
    // Installed before anything records, or early measurements would go nowhere.
    crate::metrics::handle();
    let (reporter, health) = tonic_health::server::health_reporter();
    let (readiness, readiness_rx) = watch::channel(Readiness::NotReady("starting".into()));
    let part_probers: Vec<_> = options
        .health_parts
        .iter()
        .map(|(name, check)| {
            tokio::spawn(probe_part(
                check.clone(),
                config.readiness_interval.get(),
                reporter.clone(),
                name,
            ))
        })
        .collect();
    let prober = tokio::spawn(probe(
        service.ready.clone(),
        config.readiness_interval.get(),
        readiness.clone(),
        reporter.clone(),
        service.name,
    ));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trackmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // grpcurl from PyPI only speaks v1alpha.
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(trackmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let router = service
        .routes
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .into_axum_router()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(move || ready_handler(readiness_rx.clone())))
        .route("/metrics", get(metrics_handler))
        .fallback(not_found);

    let mut builder = Server::builder()
        .accept_http1(true)
        .timeout(config.request_timeout.get())
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)));
    if let Some(tls) = tls::server_config(config)? {
        builder = builder.tls_config(tls)?;
    }
    let max_concurrent = usize::try_from(config.max_concurrent_requests).unwrap_or(usize::MAX);
    let (closing, mut closed) = tokio::sync::mpsc::channel::<()>(1);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener)
        .map(move |accepted| accepted.map(|stream| Conn::new(stream, closing.clone())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .layer(GrpcLayer::new(max_concurrent).with_own_limits(&options.own_limits))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
    tokio::pin!(server);
    tracing::info!(service = service.name, address = %local_addr, "serving");

    tokio::select! {
        result = &mut server => {
            prober.abort();
            part_probers.iter().for_each(tokio::task::JoinHandle::abort);
            return result.context("server failed");
        }
        () = shutdown => {}
    }

    prober.abort();
    readiness.send_replace(Readiness::ShuttingDown);
    set_status(&reporter, service.name, ServingStatus::NotServing).await;
    for (part, (name, _)) in part_probers.iter().zip(&options.health_parts) {
        part.abort();
        reporter
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    tracing::info!(grace = ?config.shutdown_grace.get(), "draining in-flight requests");
    let _ = stop.send(());
    match tokio::time::timeout(config.shutdown_grace.get(), &mut server).await {
        Ok(result) => result.context("server failed while draining")?,
        Err(_) => tracing::warn!("shutdown grace period over, dropping remaining requests"),
    }
    // Connections close gently in the background (see `conn`); let them finish.
    let _ = tokio::time::timeout(Duration::from_secs(2), closed.recv()).await;
    tracing::info!("server stopped");
    Ok(())
}

/// Runs a service binary: config (exit 64 when bad), telemetry, listener, `run`, exit code.
pub fn main<C, F, Fut>(
    name: &'static str,
    load: impl FnOnce() -> Result<C, ConfigError>,
    run: F,
) -> ExitCode
where
    C: AsRef<CommonConfig>,
    F: FnOnce(C, TcpListener, BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let config = match load() {
        Ok(config) => config,
        Err(error) => {
            // Logging is not set up yet, and an operator wants exactly one plain line here.
            let _ = writeln!(std::io::stderr(), "{name}: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            let _ = writeln!(
                std::io::stderr(),
                "{name}: cannot start the async runtime: {error}"
            );
            return ExitCode::FAILURE;
        }
    };
    // `<binary> healthcheck`: for container HEALTHCHECKs, which have no grpcurl or curl.
    if std::env::args().nth(1).as_deref() == Some("healthcheck") {
        return runtime.block_on(healthcheck(config.as_ref()));
    }
    runtime.block_on(async move {
        let common = config.as_ref();
        let _telemetry = match telemetry::init(name, common) {
            Ok(telemetry) => telemetry,
            Err(error) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{name}: cannot set up telemetry: {error:#}"
                );
                return ExitCode::FAILURE;
            }
        };
        let address = common.bind_addr();
        let listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%address, %error, "cannot listen");
                return ExitCode::FAILURE;
            }
        };
        match run(config, listener, Box::pin(shutdown::signal())).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "service failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Asks the service on this machine's port for its gRPC health: exit 0 when SERVING.
async fn healthcheck(config: &CommonConfig) -> ExitCode {
    let port = config.bind_addr().port();
    let status = async {
        let channel = tls::client_endpoint(&format!("127.0.0.1:{port}"), config)?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await?;
        let response = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await?;
        anyhow::Ok(response.into_inner().status())
    };
    match status.await {
        Ok(CheckedStatus::Serving) => ExitCode::SUCCESS,
        Ok(status) => {
            let _ = writeln!(std::io::stderr(), "{}", status.as_str_name());
            ExitCode::FAILURE
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "health check failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn probe(
    check: ReadyCheck,
    interval: Duration,
    readiness: watch::Sender<Readiness>,
    reporter: HealthReporter,
    name: &'static str,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // A probe that hangs counts as a failure; the next tick tries again.
        let timeout = interval.max(Duration::from_secs(1));
        let state = match tokio::time::timeout(timeout, check()).await {
            Ok(Ok(())) => Readiness::Ready,
            Ok(Err(reason)) => Readiness::NotReady(reason),
            Err(_) => Readiness::NotReady(format!("readiness check timed out after {timeout:?}")),
        };
        let changed = readiness.send_if_modified(|current| {
            let changed = *current != state;
            *current = state.clone();
            changed
        });
        if changed {
            match &state {
                Readiness::Ready => {
                    tracing::info!("ready");
                    set_status(&reporter, name, ServingStatus::Serving).await;
                }
                Readiness::NotReady(reason) => {
                    tracing::warn!(%reason, "not ready");
                    set_status(&reporter, name, ServingStatus::NotServing).await;
                }
                Readiness::ShuttingDown => {}
            }
        }
    }
}

/// Keeps the health of one part (see [`Options::health_parts`]) up to date.
async fn probe_part(
    check: ReadyCheck,
    interval: Duration,
    reporter: HealthReporter,
    name: &'static str,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        ticker.tick().await;
        let timeout = interval.max(Duration::from_secs(1));
        let result = tokio::time::timeout(timeout, check())
            .await
            .unwrap_or_else(|_| Err(format!("check timed out after {timeout:?}")));
        let serving = result.is_ok();
        if last != Some(serving) {
            match &result {
                Ok(()) => tracing::info!(part = name, "part ready"),
                Err(reason) => tracing::warn!(part = name, %reason, "part not ready"),
            }
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status(name, status).await;
            last = Some(serving);
        }
    }
}

async fn set_status(reporter: &HealthReporter, name: &str, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(name, status).await;
}

async fn ready_handler(readiness: watch::Receiver<Readiness>) -> impl IntoResponse {
    match &*readiness.borrow() {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_owned()),
        Readiness::NotReady(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
        Readiness::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_owned(),
        ),
    }
}

/// An unknown path: gRPC's UNIMPLEMENTED for a gRPC call, a plain 404 for anything else
/// (tonic's own fallback answers every HTTP/1.1 path 200 with a gRPC trailer).
async fn not_found(request: axum::extract::Request) -> axum::response::Response {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("no such method: {}", request.uri().path()))
            .into_http::<axum::body::Body>();
    }
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
}
