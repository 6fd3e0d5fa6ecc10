//! A downstream service: one balanced channel over every address its names resolve to,
//! re-resolved and health-checked periodically so failing endpoints are ejected; calls with a
//! deadline, retries with backoff and jitter for retryable codes only, and a circuit breaker.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::future::join_all;
use tokio::sync::mpsc::Sender;
use tonic::{
    Code, Status,
    transport::{Channel, ClientTlsConfig, Endpoint, channel::Change},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use trackmesh_shared::{
    breaker::{Breaker, Permit},
    config::{self, CommonConfig, ConfigError},
    grpc::Deadline,
    tls,
};

use crate::config::GatewayConfig;

/// How long an endpoint's health check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a call waiting for its answer looks whether every endpoint has been ejected.
const EJECTED_CHECK: Duration = Duration::from_millis(50);

pub struct Downstream {
    name: &'static str,
    channel: Channel,
    healthy: Arc<AtomicUsize>,
    breaker: Breaker,
    attempts: u32,
}

/// One `host:port` to resolve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

impl Target {
    /// The setting `var`: a comma list of `host:port` or URLs, each with its port.
    pub fn list(var: &str, value: &str) -> Result<Vec<Self>, ConfigError> {
        let target = |addr: &str| {
            let url = config::url(var, addr.trim(), "http")?;
            let port = url.port().ok_or_else(|| {
                ConfigError::new(var, value, "needs a port, e.g. refinement-api:50051")
            })?;
            let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
            Ok(Self {
                host: host.to_owned(),
                port,
            })
        };
        value.split(',').map(target).collect()
    }
}

impl Downstream {
    /// Starts watching `targets` in the background; an endpoint takes calls while it reports
    /// SERVING for the gRPC health name `health`.
    pub fn start(
        name: &'static str,
        health: &'static str,
        targets: Vec<Target>,
        common: &CommonConfig,
        config: &GatewayConfig,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = tls::client_tls(common)?;
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let healthy = Arc::new(AtomicUsize::new(0));
        tokio::spawn(watch(
            name,
            health,
            targets,
            tls,
            changes,
            healthy.clone(),
            config.resolve_interval.get(),
        ));
        Ok(Arc::new(Self {
            name,
            channel,
            healthy,
            breaker: Breaker::new(config.breaker_failures, config.breaker_cool_down.get()),
            attempts: config.retry_attempts,
        }))
    }

    /// Endpoints that passed their last health check.
    pub fn healthy_endpoints(&self) -> usize {
        self.healthy.load(Ordering::Relaxed)
    }

    /// UNAVAILABLE when a call would be refused now (no healthy endpoint, breaker open): for
    /// work that must not start unless this downstream can take its result.
    pub fn available(&self) -> Result<(), Status> {
        if self.healthy_endpoints() == 0 {
            return Err(Status::unavailable(format!(
                "{}: no healthy endpoint; nothing was processed, retry later",
                self.name
            )));
        }
        if !self.breaker.would_allow() {
            return Err(Status::unavailable(format!(
                "{}: circuit breaker open, retry in {:?}; nothing was processed",
                self.name,
                self.breaker.retry_in()
            )));
        }
        Ok(())
    }

    /// Runs `call(channel, timeout, attempt)`, retrying retryable failures while the deadline
    /// allows. The timeout given to each attempt leaves time for the answer to travel back.
    pub async fn call<T, F, Fut>(&self, deadline: Deadline, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel, Duration, u32) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let _in_flight = InFlight::start(self.name);
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 1;
        loop {
            if self.healthy_endpoints() == 0 {
                return Err(Status::unavailable(format!(
                    "{}: no healthy endpoint",
                    self.name
                )));
            }
            // Held across the call: if the caller goes away mid-call, dropping the permit
            // hands a half-open breaker's trial back instead of leaving it half-open forever.
            let Some(permit) = self.breaker.acquire() else {
                return Err(Status::unavailable(format!(
                    "{}: circuit breaker open, retry in {:?}",
                    self.name,
                    self.breaker.retry_in()
                )));
            };
            let budget = deadline.budget();
            let attempt_call = call(self.channel.clone(), budget, attempt);
            // A call sent just before its endpoint died can wait in the balancer, which has
            // no endpoint left, until the deadline: end it once the endpoint is ejected.
            let result = tokio::select! {
                result = tokio::time::timeout(budget, attempt_call) => match result {
                    Ok(result) => result,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "{}: no answer within {budget:?}",
                        self.name
                    ))),
                },
                () = self.ejected() => Err(Status::unavailable(format!(
                    "{}: every endpoint ejected while the call waited",
                    self.name
                ))),
            };
            let status = match result {
                Ok(value) => {
                    self.record(permit, true);
                    return Ok(value);
                }
                Err(status) => status,
            };
            // Only trouble reaching the service counts against it; a refused request does not.
            self.record(
                permit,
                !matches!(
                    status.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Cancelled
                        | Code::Unknown
                        | Code::Internal
                ),
            );
            // CANCELLED from below: the connection went away with the call on it (a replica
            // killed mid-call). Every call made here is safe to repeat (replays, watermarks,
            // de-duplication), so it is retried like UNAVAILABLE.
            let retryable = matches!(
                status.code(),
                Code::Unavailable | Code::Aborted | Code::Cancelled
            );
            let pause = backoff + backoff.mul_f64(fastrand::f64());
            if !retryable || attempt >= self.attempts || deadline.remaining() <= pause {
                return Err(match status.code() {
                    Code::Unavailable | Code::DeadlineExceeded => Status::new(
                        status.code(),
                        format!("{}: {}", self.name, status.message()),
                    ),
                    // Pass the rest through untouched: their details name the caller's fields.
                    _ => status,
                });
            }
            metrics::counter!("gateway_downstream_retries_total", "downstream" => self.name)
                .increment(1);
            tracing::debug!(downstream = self.name, attempt, code = ?status.code(), "retrying");
            tokio::time::sleep(pause).await;
            backoff *= 2;
            attempt += 1;
        }
    }

    /// Returns once no endpoint is healthy.
    async fn ejected(&self) {
        loop {
            tokio::time::sleep(EJECTED_CHECK).await;
            if self.healthy_endpoints() == 0 {
                return;
            }
        }
    }

    fn record(&self, permit: Permit<'_>, ok: bool) {
        if ok {
            permit.success();
        } else {
            permit.failure();
        }
        let open = if self.breaker.is_open() { 1.0 } else { 0.0 };
        metrics::gauge!("gateway_downstream_breaker_open", "downstream" => self.name).set(open);
    }
}

/// Counts a call in `gateway_downstream_in_flight` until it ends, however it ends (a caller
/// that leaves drops the call).
struct InFlight(&'static str);

impl InFlight {
    fn start(name: &'static str) -> Self {
        metrics::gauge!("gateway_downstream_in_flight", "downstream" => name).increment(1);
        Self(name)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("gateway_downstream_in_flight", "downstream" => self.0).decrement(1);
    }
}

/// Resolves the targets, health-checks every address, and keeps the balancer's endpoint set
/// equal to the healthy ones.
async fn watch(
    name: &'static str,
    health: &'static str,
    targets: Vec<Target>,
    tls: Option<ClientTlsConfig>,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    healthy: Arc<AtomicUsize>,
    interval: Duration,
) {
    let mut in_balancer: HashSet<SocketAddr> = HashSet::new();
    let mut probes: HashMap<SocketAddr, (Endpoint, Channel)> = HashMap::new();
    loop {
        let mut resolved: Vec<(SocketAddr, &Target)> = Vec::new();
        for target in &targets {
            match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
                Ok(addrs) => resolved.extend(addrs.map(|addr| (addr, target))),
                Err(error) => {
                    tracing::warn!(downstream = name, host = %target.host, %error, "cannot resolve")
                }
            }
        }
        probes.retain(|addr, _| resolved.iter().any(|(a, _)| a == addr));
        for (addr, target) in &resolved {
            if !probes.contains_key(addr) {
                match endpoint(*addr, target, tls.as_ref()) {
                    Ok(endpoint) => {
                        let channel = endpoint.connect_lazy();
                        probes.insert(*addr, (endpoint, channel));
                    }
                    Err(error) => tracing::warn!(downstream = name, %addr, %error, "bad endpoint"),
                }
            }
        }
        let checks = probes.iter().map(|(addr, (_, channel))| async move {
            (*addr, is_serving(channel.clone(), health).await)
        });
        let up: HashSet<SocketAddr> = join_all(checks)
            .await
            .into_iter()
            .filter_map(|(addr, serving)| serving.then_some(addr))
            .collect();
        for addr in up.difference(&in_balancer) {
            if let Some((endpoint, _)) = probes.get(addr) {
                tracing::info!(downstream = name, %addr, "endpoint healthy, added");
                let _ = changes.send(Change::Insert(*addr, endpoint.clone())).await;
            }
        }
        for addr in in_balancer.difference(&up) {
            tracing::warn!(downstream = name, %addr, "endpoint unhealthy or gone, ejected");
            let _ = changes.send(Change::Remove(*addr)).await;
        }
        in_balancer = up;
        healthy.store(in_balancer.len(), Ordering::Relaxed);
        metrics::gauge!("gateway_downstream_healthy_endpoints", "downstream" => name)
            .set(in_balancer.len() as f64);
        tokio::time::sleep(interval).await;
    }
}

fn endpoint(
    addr: SocketAddr,
    target: &Target,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        // Certificates name the service, not the pod address we connect to.
        endpoint = endpoint.tls_config(tls.clone().domain_name(target.host.clone()))?;
    }
    Ok(endpoint)
}

async fn is_serving(channel: Channel, health: &str) -> bool {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: health.to_owned(),
    });
    request.set_timeout(CHECK_TIMEOUT);
    let mut client = HealthClient::new(channel);
    matches!(
        tokio::time::timeout(CHECK_TIMEOUT, client.check(request)).await,
        Ok(Ok(response)) if response.get_ref().status == ServingStatus::Serving as i32
    )
}

#[cfg(test)]
mod tests {
    use tonic::transport::Server;

    use super::*;

    /// A downstream whose one endpoint answers health checks only: `call` gets its channel.
    async fn healthy() -> Arc<Downstream> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut config = GatewayConfig::default();
        config.resolve_interval = trackmesh_shared::config::Duration::from_millis(20);
        let targets = Target::list("TEST_ADDR", &addr.to_string()).unwrap();
        let downstream =
            Downstream::start("test", "", targets, &CommonConfig::default(), &config).unwrap();
        while downstream.healthy_endpoints() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        downstream
    }

    #[tokio::test]
    async fn a_call_cut_off_with_its_connection_is_retried() {
        let downstream = healthy().await;
        let answer = downstream
            .call(
                Deadline::after(Duration::from_secs(5)),
                |_, _, attempt| async move {
                    if attempt == 1 {
                        Err(Status::cancelled("operation was canceled"))
                    } else {
                        Ok(attempt)
                    }
                },
            )
            .await;
        assert_eq!(answer.unwrap(), 2);
        let refused = downstream
            .call(
                Deadline::after(Duration::from_secs(5)),
                |_, _, attempt| async move {
                    if attempt == 1 {
                        Err::<u32, _>(Status::invalid_argument("fixes[0].lat"))
                    } else {
                        Ok(attempt)
                    }
                },
            )
            .await;
        assert_eq!(
            refused.unwrap_err().code(),
            Code::InvalidArgument,
            "not retried"
        );
    }
}
