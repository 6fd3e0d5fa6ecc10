//! gateway settings, from the environment.

use serde::Deserialize;
use trackmesh_shared::config::{self, CommonConfig, ConfigError, Duration, Validate, check_range};

use crate::auth::{ApiKeys, Credentials};

pub const DEFAULT_PORT: u16 = 50050;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub gateway: GatewayConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        let config = Self {
            common: CommonConfig::from_env(DEFAULT_PORT)?,
            gateway: config::from_env()?,
        };
        config
            .gateway
            .tenant_max_concurrent_requests(&config.common)?;
        Ok(config)
    }
}

impl AsRef<CommonConfig> for Config {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

/// Downstreams, API keys, limits and resilience settings (README, "Configuration").
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Each: `host:port`, a URL, or a comma list; a name resolving to several addresses
    /// (a headless Service) is balanced per request.
    pub refinement_addr: String,
    pub learning_addr: String,
    pub storage_addr: String,
    /// `tenant:key,tenant:key`. Never logged.
    pub api_keys: Option<String>,
    /// A file of `tenant:key` entries (lines or commas), e.g. a mounted Secret.
    pub api_keys_file: Option<String>,
    /// Write-only tokens for devices, `tenant:token` like API keys: they can send fixes
    /// (`Ingest`, `IngestStream`, `/osmand/<token>`, `/owntracks`, `/v1/ingest`) and nothing else.
    pub ingest_tokens: Option<String>,
    pub ingest_tokens_file: Option<String>,
    /// Most fixes per Ingest request.
    pub max_batch: u32,
    /// Per tenant; 0 turns the limit off. The requests default fits a fleet of 20 000 devices
    /// sending one fix a second each, with room for bursts.
    pub rate_limit_fixes_per_sec: u32,
    pub rate_limit_requests_per_sec: u32,
    /// A coalesced batch departs once it holds this many fixes; unset: MAX_BATCH.
    pub coalesce_max_fixes: Option<u32>,
    /// Coalesced batches in flight at once; beyond that requests queue and batches grow.
    pub coalesce_max_in_flight: u32,
    /// Deadline of a downstream call when the client sets none.
    pub downstream_timeout: Duration,
    /// How often downstream names are resolved again and their endpoints health-checked.
    pub resolve_interval: Duration,
    /// Attempts of a call that fails with a retryable code (UNAVAILABLE), first included.
    pub retry_attempts: u32,
    /// Consecutive failures that open a downstream's circuit breaker, and how long it stays open.
    pub breaker_failures: u32,
    pub breaker_cool_down: Duration,
    /// Unary calls (and GetTrack streams) in flight per tenant; 0 turns the limit off. Unset:
    /// 512, or half of MAX_CONCURRENT_REQUESTS if that is less, so that one tenant never holds
    /// every slot.
    pub tenant_max_concurrent_requests: Option<u32>,
    /// IngestStream calls open per tenant; 0 turns the limit off. Streams hold no
    /// MAX_CONCURRENT_REQUESTS permit: they are bounded by this and by the two timeouts below.
    pub tenant_max_streams: u32,
    /// An IngestStream with no message from the client for this long is closed.
    pub stream_idle_timeout: Duration,
    /// An IngestStream is closed after this long, however busy; the client opens a new one.
    pub stream_max_duration: Duration,
    /// Kafka brokers: Watch and `/v1/live` read storage's fixes topic from them. Unset: live
    /// streaming is off.
    pub kafka_brokers: Option<String>,
    /// The fixes topic: storage's KAFKA_TOPIC.
    pub kafka_topic: String,
    /// The events topic: learning's KAFKA_EVENTS_TOPIC.
    pub kafka_events_topic: String,
    /// Messages of the fixes topic kept for subscribers that read slowly; one that falls
    /// further behind skips ahead and is told how many messages it missed.
    pub watch_buffer: u32,
    /// Lifetime of a read-only stream token from `POST /v1/live/token`.
    pub live_token_ttl: Duration,
    /// Signs stream tokens; every replica needs the same. Unset: derived from the API keys.
    pub live_token_secret: Option<String>,
    /// Basemap tiles of the web console (`{z}/{x}/{y}` URL template), loaded by the browser.
    pub console_tile_url: String,
}

impl std::fmt::Debug for GatewayConfig {
    // By hand, so that API keys never reach a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("refinement_addr", &self.refinement_addr)
            .field("learning_addr", &self.learning_addr)
            .field("storage_addr", &self.storage_addr)
            .field("api_keys", &self.api_keys.as_ref().map(|_| "<redacted>"))
            .field("api_keys_file", &self.api_keys_file)
            .field(
                "ingest_tokens",
                &self.ingest_tokens.as_ref().map(|_| "<redacted>"),
            )
            .field("ingest_tokens_file", &self.ingest_tokens_file)
            .field("max_batch", &self.max_batch)
            .field("coalesce_max_fixes", &self.coalesce_max_fixes())
            .field("coalesce_max_in_flight", &self.coalesce_max_in_flight)
            .field(
                "tenant_max_concurrent_requests",
                &self.tenant_max_concurrent_requests,
            )
            .field("tenant_max_streams", &self.tenant_max_streams)
            .field("stream_idle_timeout", &self.stream_idle_timeout)
            .field("stream_max_duration", &self.stream_max_duration)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_topic", &self.kafka_topic)
            .field("kafka_events_topic", &self.kafka_events_topic)
            .field("watch_buffer", &self.watch_buffer)
            .field("live_token_ttl", &self.live_token_ttl)
            .finish_non_exhaustive()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            refinement_addr: "127.0.0.1:50051".into(),
            learning_addr: "127.0.0.1:50052".into(),
            storage_addr: "127.0.0.1:50053".into(),
            api_keys: None,
            api_keys_file: None,
            ingest_tokens: None,
            ingest_tokens_file: None,
            max_batch: 10_000,
            rate_limit_fixes_per_sec: 200_000,
            rate_limit_requests_per_sec: 50_000,
            coalesce_max_fixes: None,
            coalesce_max_in_flight: 4,
            downstream_timeout: Duration::from_secs(10),
            resolve_interval: Duration::from_secs(5),
            retry_attempts: 3,
            breaker_failures: 5,
            breaker_cool_down: Duration::from_secs(30),
            tenant_max_concurrent_requests: None,
            tenant_max_streams: 256,
            stream_idle_timeout: Duration::from_secs(60),
            stream_max_duration: Duration::from_secs(3600),
            kafka_brokers: None,
            kafka_topic: "trackmesh.fixes".into(),
            kafka_events_topic: "trackmesh.events".into(),
            watch_buffer: 1024,
            live_token_ttl: Duration::from_secs(900),
            live_token_secret: None,
            console_tile_url: "https://tile.openstreetmap.org/{z}/{x}/{y}.png".into(),
        }
    }
}

impl GatewayConfig {
    /// The API keys from `API_KEYS` and `API_KEYS_FILE` together.
    pub fn api_keys(&self) -> Result<ApiKeys, ConfigError> {
        keys(
            "API_KEYS",
            self.api_keys.as_deref(),
            self.api_keys_file.as_deref(),
        )
    }

    /// The ingest tokens from `INGEST_TOKENS` and `INGEST_TOKENS_FILE` together.
    pub fn ingest_tokens(&self) -> Result<ApiKeys, ConfigError> {
        keys(
            "INGEST_TOKENS",
            self.ingest_tokens.as_deref(),
            self.ingest_tokens_file.as_deref(),
        )
    }

    pub fn credentials(&self) -> Result<Credentials, ConfigError> {
        Ok(Credentials {
            keys: self.api_keys()?,
            ingest: self.ingest_tokens()?,
        })
    }

    /// The size that makes a coalesced batch depart: COALESCE_MAX_FIXES, or MAX_BATCH.
    pub fn coalesce_max_fixes(&self) -> u32 {
        self.coalesce_max_fixes.unwrap_or(self.max_batch)
    }

    /// The per-tenant limit of calls in flight (0: off). It must stay below the server's
    /// MAX_CONCURRENT_REQUESTS, or one tenant could hold every slot and lock the others out.
    pub fn tenant_max_concurrent_requests(
        &self,
        common: &CommonConfig,
    ) -> Result<u32, ConfigError> {
        let global = common.max_concurrent_requests;
        match self.tenant_max_concurrent_requests {
            None => Ok(512.min(global / 2).max(1)),
            Some(limit) if limit == 0 || limit < global => Ok(limit),
            Some(limit) => Err(ConfigError::new(
                "TENANT_MAX_CONCURRENT_REQUESTS",
                limit,
                format_args!(
                    "must be below MAX_CONCURRENT_REQUESTS={global}, or one tenant could lock the others out; 0 turns it off"
                ),
            )),
        }
    }
}

/// `tenant:key` entries from the setting `var` and the file of `{var}_FILE`.
fn keys(var: &'static str, text: Option<&str>, file: Option<&str>) -> Result<ApiKeys, ConfigError> {
    let mut text = text.unwrap_or_default().to_owned();
    if let Some(path) = file {
        let file = std::fs::read_to_string(path).map_err(|err| {
            ConfigError::new(
                &format!("{var}_FILE"),
                path,
                format_args!("cannot read: {err}"),
            )
        })?;
        text.push(',');
        text.push_str(&file);
    }
    ApiKeys::parse(var, &text)
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (var, value) in [
            ("REFINEMENT_ADDR", &self.refinement_addr),
            ("LEARNING_ADDR", &self.learning_addr),
            ("STORAGE_ADDR", &self.storage_addr),
        ] {
            for addr in value.split(',') {
                let url = config::url(var, addr.trim(), "http")?;
                if url.port().is_none() {
                    return Err(ConfigError::new(
                        var,
                        value,
                        "needs a port, e.g. refinement-api:50051",
                    ));
                }
            }
        }
        self.ingest_tokens()?;
        if self.api_keys()?.is_empty() {
            return Err(ConfigError::new(
                "API_KEYS",
                "",
                "no API keys: set API_KEYS=tenant:key,… or API_KEYS_FILE",
            ));
        }
        check_range("MAX_BATCH", self.max_batch, 1..=1_000_000)?;
        if let Some(fixes) = self.coalesce_max_fixes {
            // Refinement refuses a Refine of more than its MAX_BATCH, which MAX_BATCH mirrors.
            if !(1..=self.max_batch).contains(&fixes) {
                return Err(ConfigError::new(
                    "COALESCE_MAX_FIXES",
                    fixes,
                    format_args!("must be 1..=MAX_BATCH={}", self.max_batch),
                ));
            }
        }
        check_range(
            "COALESCE_MAX_IN_FLIGHT",
            self.coalesce_max_in_flight,
            1..=1024,
        )?;
        check_range(
            "RATE_LIMIT_FIXES_PER_SEC",
            self.rate_limit_fixes_per_sec,
            0..=100_000_000,
        )?;
        check_range(
            "RATE_LIMIT_REQUESTS_PER_SEC",
            self.rate_limit_requests_per_sec,
            0..=10_000_000,
        )?;
        check_range(
            "DOWNSTREAM_TIMEOUT",
            self.downstream_timeout,
            Duration::from_millis(10)..=Duration::from_secs(600),
        )?;
        check_range(
            "RESOLVE_INTERVAL",
            self.resolve_interval,
            Duration::from_millis(50)..=Duration::from_secs(600),
        )?;
        check_range("RETRY_ATTEMPTS", self.retry_attempts, 1..=10)?;
        check_range("BREAKER_FAILURES", self.breaker_failures, 1..=1000)?;
        check_range(
            "BREAKER_COOL_DOWN",
            self.breaker_cool_down,
            Duration::from_millis(10)..=Duration::from_secs(3600),
        )?;
        if let Some(limit) = self.tenant_max_concurrent_requests {
            check_range("TENANT_MAX_CONCURRENT_REQUESTS", limit, 0..=1_000_000)?;
        }
        check_range("TENANT_MAX_STREAMS", self.tenant_max_streams, 0..=1_000_000)?;
        check_range(
            "STREAM_IDLE_TIMEOUT",
            self.stream_idle_timeout,
            Duration::from_millis(100)..=Duration::from_secs(24 * 3600),
        )?;
        check_range(
            "STREAM_MAX_DURATION",
            self.stream_max_duration,
            Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600),
        )?;
        if let Some(brokers) = &self.kafka_brokers {
            config::kafka_brokers("KAFKA_BROKERS", brokers)?;
        }
        config::kafka_names(&[
            ("KAFKA_TOPIC", &self.kafka_topic),
            ("KAFKA_EVENTS_TOPIC", &self.kafka_events_topic),
        ])?;
        check_range("WATCH_BUFFER", self.watch_buffer, 16..=1_000_000)?;
        check_range(
            "LIVE_TOKEN_TTL",
            self.live_token_ttl,
            Duration::from_secs(10)..=Duration::from_secs(7 * 24 * 3600),
        )?;
        if let Some(secret) = &self.live_token_secret
            && secret.len() < 16
        {
            return Err(ConfigError::new(
                "LIVE_TOKEN_SECRET",
                "<redacted>",
                "must be at least 16 characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<GatewayConfig, ConfigError> {
        config::from_vars(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn keys_are_required_and_never_printed() {
        let err = load(&[]).unwrap_err().to_string();
        assert!(err.contains("API_KEYS"), "{err}");
        let config = load(&[("API_KEYS", "demo:s3cret-key")]).unwrap();
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn keys_from_a_file_too() {
        let path = std::env::temp_dir().join(format!("keys-{}", std::process::id()));
        std::fs::write(&path, "fleet:fleet-key-1\nother:other-key-2\n").unwrap();
        let config = load(&[
            ("API_KEYS_FILE", path.to_str().unwrap()),
            ("API_KEYS", "demo:demo-key-0"),
        ])
        .unwrap();
        assert_eq!(config.api_keys().unwrap().len(), 3);
        std::fs::remove_file(&path).unwrap();
        let err = load(&[("API_KEYS_FILE", "/nonexistent/keys")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("API_KEYS_FILE=/nonexistent/keys: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn addresses_need_ports() {
        let err = load(&[("API_KEYS", "a:a-long-key"), ("STORAGE_ADDR", "storage")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STORAGE_ADDR=storage: needs a port"), "{err}");
        assert!(
            load(&[
                ("API_KEYS", "a:a-long-key"),
                ("REFINEMENT_ADDR", "a:1,b:2,http://c:3")
            ])
            .is_ok()
        );
    }

    #[test]
    fn tenant_limit_stays_below_the_global_one() {
        let common = |global: &str| {
            CommonConfig::from_vars(
                DEFAULT_PORT,
                [("MAX_CONCURRENT_REQUESTS".into(), global.into())],
            )
            .unwrap()
        };
        let base = ("API_KEYS", "a:a-long-key");
        let unset = load(&[base]).unwrap();
        assert_eq!(
            unset.tenant_max_concurrent_requests(&common("1024")),
            Ok(512)
        );
        assert_eq!(unset.tenant_max_concurrent_requests(&common("100")), Ok(50));
        let set = load(&[base, ("TENANT_MAX_CONCURRENT_REQUESTS", "1024")]).unwrap();
        let err = set
            .tenant_max_concurrent_requests(&common("1024"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "TENANT_MAX_CONCURRENT_REQUESTS=1024: must be below MAX_CONCURRENT_REQUESTS=1024"
            ),
            "{err}"
        );
        let off = load(&[base, ("TENANT_MAX_CONCURRENT_REQUESTS", "0")]).unwrap();
        assert_eq!(off.tenant_max_concurrent_requests(&common("10")), Ok(0));
        let err = load(&[base, ("COALESCE_MAX_FIXES", "20000")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("COALESCE_MAX_FIXES=20000: must be 1..=MAX_BATCH=10000"),
            "{err}"
        );
        assert_eq!(
            load(&[base, ("MAX_BATCH", "500")])
                .unwrap()
                .coalesce_max_fixes(),
            500
        );
        let err = load(&[base, ("STREAM_IDLE_TIMEOUT", "1ms")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STREAM_IDLE_TIMEOUT=1ms: out of range"),
            "{err}"
        );
    }
}
