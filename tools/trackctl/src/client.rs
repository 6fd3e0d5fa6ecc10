//! The gateway connection: address, API key (as a tonic interceptor), TLS and retries.

use std::{future::Future, path::PathBuf, time::Duration};

use anyhow::{Context, bail};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tonic_types::StatusExt;
use trackmesh_proto::v1::gateway_client::GatewayClient;

/// A connection to the gateway that carries the API key.
pub type Authed = InterceptedService<Channel, ApiKey>;
pub type Client = GatewayClient<Authed>;

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct ApiKey(MetadataValue<Ascii>);

impl ApiKey {
    pub fn new(key: &str) -> anyhow::Result<Self> {
        let key = key.trim();
        if key.is_empty() {
            bail!("the API key is empty");
        }
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the API key must be printable ASCII"))?;
        Ok(Self(value))
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Where and how to reach the gateway (the global flags).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: String,
    pub api_key: Option<String>,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
}

impl Target {
    /// Connects now, so that a wrong address fails at once and clearly.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        Ok(GatewayClient::new(self.connect_authed().await?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// A connection for any service on the gateway's port (e.g. gRPC health).
    pub async fn connect_authed(&self) -> anyhow::Result<Authed> {
        let Some(key) = self.api_key.as_deref() else {
            bail!(
                "no API key: pass --api-key KEY or set TRACKMESH_API_KEY \
                 (the local stack's development keys are demo-key and other-key)"
            );
        };
        let key = ApiKey::new(key)?;
        let url = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("http://{}", self.addr)
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid gateway address {:?}", self.addr))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.timeout)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint.tls_config(tls)?;
        } else if self.ca.is_some() {
            bail!("--ca needs an https:// gateway address");
        }
        let channel = endpoint.connect().await.map_err(|err| {
            // The transport error's own text is vague; its causes say what happened.
            let mut cause = String::new();
            let mut source = std::error::Error::source(&err);
            while let Some(err) = source {
                cause = format!("{cause}: {err}");
                source = err.source();
            }
            anyhow::anyhow!(
                "cannot reach the gateway at {url}{cause} (is the stack up? scripts/stack up)"
            )
        })?;
        Ok(InterceptedService::new(channel, key))
    }
}

/// How often and how patiently retryable failures are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    pub attempts: u32,
    pub base: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 10,
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// UNAVAILABLE (a downstream or the gateway is down: retrying is safe, the mesh
/// de-duplicates) and RESOURCE_EXHAUSTED (rate limit or load shedding).
pub fn retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::ResourceExhausted)
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` after `attempt` (1-based) failed
    /// with `status`; `None` when the status is final or the attempts are used up.
    pub fn delay(&self, attempt: u32, status: &Status) -> Option<Duration> {
        if !retryable(status.code()) || attempt >= self.attempts {
            return None;
        }
        // The gateway's rate limiter says when a token will be there.
        if let Some(hint) = status
            .get_details_retry_info()
            .and_then(|info| info.retry_delay)
        {
            let jitter = hint.mul_f64(fastrand::f64() * 0.2);
            return Some((hint + jitter).min(self.max.max(hint)));
        }
        // Exponential backoff with "equal jitter": half fixed, half random.
        let exp = self
            .base
            .saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max);
        Some(capped / 2 + capped.mul_f64(fastrand::f64() / 2.0))
    }

    /// Runs `call` until it succeeds, fails finally, or the attempts are used up.
    /// `on_retry` hears about every failure that is retried and the wait before the retry.
    pub async fn run<T, F, Fut>(
        &self,
        mut call: F,
        mut on_retry: impl FnMut(&Status, Duration),
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(status) => match self.delay(attempt, &status) {
                    Some(wait) => {
                        on_retry(&status, wait);
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    None => return Err(status),
                },
            }
        }
    }
}

/// The canonical name of a gRPC status code (`UNAVAILABLE`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A failed call as an error for humans: code and message, plus a hint for the usual causes.
pub fn status_error(what: &str, status: &Status) -> anyhow::Error {
    let hint = match status.code() {
        Code::Unauthenticated => " (check --api-key / TRACKMESH_API_KEY)",
        Code::Unavailable => " (is the stack up? scripts/stack status)",
        _ => "",
    };
    anyhow::anyhow!(
        "{what}: {}: {}{hint}",
        code_name(status.code()),
        status.message()
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tonic_types::ErrorDetails;

    use super::*;

    fn quick() -> RetryPolicy {
        RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(1),
            max: Duration::from_millis(4),
        }
    }

    #[test]
    fn only_unavailable_and_resource_exhausted_are_retried() {
        let policy = quick();
        assert!(policy.delay(1, &Status::unavailable("down")).is_some());
        assert!(
            policy
                .delay(1, &Status::resource_exhausted("slow down"))
                .is_some()
        );
        assert!(policy.delay(1, &Status::invalid_argument("bad")).is_none());
        assert!(policy.delay(1, &Status::unauthenticated("who")).is_none());
        assert!(
            policy.delay(4, &Status::unavailable("down")).is_none(),
            "attempts used up"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            attempts: 100,
            base: Duration::from_millis(100),
            max: Duration::from_secs(5),
        };
        let down = Status::unavailable("down");
        for _ in 0..50 {
            let first = policy.delay(1, &down).unwrap();
            assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&first));
            let third = policy.delay(3, &down).unwrap();
            assert!((Duration::from_millis(200)..=Duration::from_millis(400)).contains(&third));
            assert!(policy.delay(40, &down).unwrap() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn the_servers_retry_hint_wins() {
        let status = Status::with_error_details(
            Code::ResourceExhausted,
            "rate limit",
            ErrorDetails::with_retry_info(Some(Duration::from_millis(700))),
        );
        let wait = quick().delay(1, &status).unwrap();
        assert!(
            (Duration::from_millis(700)..=Duration::from_millis(840)).contains(&wait),
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn run_retries_until_success() {
        let calls = AtomicU32::new(0);
        let mut retries = 0;
        let result = quick()
            .run(
                || async {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 | 1 => Err(Status::unavailable("down")),
                        n => Ok(n),
                    }
                },
                |_, _| retries += 1,
            )
            .await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(retries, 2);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = quick()
            .run(
                || async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(Status::invalid_argument("bad"))
                },
                |_, _| {},
            )
            .await;
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "INVALID_ARGUMENT is not retried"
        );
    }

    #[test]
    fn api_key_goes_into_the_authorization_header() {
        let mut key = ApiKey::new(" demo-key ").unwrap();
        let request = key.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer demo-key"
        );
        assert!(ApiKey::new("").is_err());
        assert!(ApiKey::new("bad\nkey").is_err());
    }
}
