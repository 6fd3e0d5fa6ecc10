//! gateway settings, from the environment: checked and parsed once into the typed values the
//! rest of the gateway uses (addresses, credentials, limits).

use serde::Deserialize;
use trackmesh_shared::config::{
    self, CommonConfig, ConfigError, Duration, Secret, Validate, check_range,
};

use crate::{
    auth::{ApiKeys, Credentials},
    downstream::Target,
};

pub const DEFAULT_PORT: u16 = 50050;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub gateway: GatewayConfig,
    /// REFINEMENT_ADDR, LEARNING_ADDR and STORAGE_ADDR.
    pub refinement: Vec<Target>,
    pub learning: Vec<Target>,
    pub storage: Vec<Target>,
    /// API_KEYS(_FILE) and INGEST_TOKENS(_FILE).
    pub credentials: Credentials,
    /// TENANT_MAX_CONCURRENT_REQUESTS, or its default (0: off).
    pub tenant_requests: u32,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars().collect())
    }

    fn from_vars(vars: Vec<(String, String)>) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_vars(DEFAULT_PORT, vars.clone())?;
        let gateway: GatewayConfig = config::from_vars(vars)?;
        let credentials = Credentials {
            keys: keys("API_KEYS", &gateway.api_keys, &gateway.api_keys_file)?,
            ingest: keys(
                "INGEST_TOKENS",
                &gateway.ingest_tokens,
                &gateway.ingest_tokens_file,
            )?,
        };
        if credentials.keys.is_empty() {
            return Err(ConfigError::new(
                "API_KEYS",
                "",
                "no API keys: set API_KEYS=tenant:key,… or API_KEYS_FILE",
            ));
        }
        Ok(Self {
            refinement: Target::list("REFINEMENT_ADDR", &gateway.refinement_addr)?,
            learning: Target::list("LEARNING_ADDR", &gateway.learning_addr)?,
            storage: Target::list("STORAGE_ADDR", &gateway.storage_addr)?,
            credentials,
            tenant_requests: gateway.tenant_requests(&common)?,
            common,
            gateway,
        })
    }
}

impl AsRef<CommonConfig> for Config {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

/// Downstreams, API keys, limits and resilience settings (README, "Configuration"); the
/// private ones are read once, into `Config`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    /// Each: `host:port`, a URL, or a comma list; a name resolving to several addresses
    /// (a headless Service) is balanced per request.
    refinement_addr: String,
    learning_addr: String,
    storage_addr: String,
    /// `tenant:key,tenant:key`.
    api_keys: Option<Secret>,
    /// A file of `tenant:key` entries (lines or commas), e.g. a mounted Secret.
    api_keys_file: Option<String>,
    /// Write-only tokens for devices, `tenant:token` like API keys: they can send fixes
    /// (`Ingest`, `IngestStream`, `/osmand/<token>`, `/owntracks`, `/v1/ingest`) and nothing else.
    ingest_tokens: Option<Secret>,
    ingest_tokens_file: Option<String>,
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
    tenant_max_concurrent_requests: Option<u32>,
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
    pub live_token_secret: Option<Secret>,
    /// Basemap tiles of the web console (`{z}/{x}/{y}` URL template), loaded by the browser.
    pub console_tile_url: String,
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
    /// The size that makes a coalesced batch depart: COALESCE_MAX_FIXES, or MAX_BATCH.
    pub fn coalesce_max_fixes(&self) -> u32 {
        self.coalesce_max_fixes.unwrap_or(self.max_batch)
    }

    /// The per-tenant limit of calls in flight (0: off). It must stay below the server's
    /// MAX_CONCURRENT_REQUESTS, or one tenant could hold every slot and lock the others out.
    fn tenant_requests(&self, common: &CommonConfig) -> Result<u32, ConfigError> {
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
fn keys(var: &str, text: &Option<Secret>, file: &Option<String>) -> Result<ApiKeys, ConfigError> {
    let mut text = text.as_ref().map_or("", Secret::expose).to_owned();
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
        // Tables: one setting a line.
        #[rustfmt::skip]
        let counts = [
            ("MAX_BATCH", self.max_batch, 1..=1_000_000),
            ("COALESCE_MAX_IN_FLIGHT", self.coalesce_max_in_flight, 1..=1024),
            ("RATE_LIMIT_FIXES_PER_SEC", self.rate_limit_fixes_per_sec, 0..=100_000_000),
            ("RATE_LIMIT_REQUESTS_PER_SEC", self.rate_limit_requests_per_sec, 0..=10_000_000),
            ("RETRY_ATTEMPTS", self.retry_attempts, 1..=10),
            ("BREAKER_FAILURES", self.breaker_failures, 1..=1000),
            ("TENANT_MAX_CONCURRENT_REQUESTS", self.tenant_max_concurrent_requests.unwrap_or(0), 0..=1_000_000),
            ("TENANT_MAX_STREAMS", self.tenant_max_streams, 0..=1_000_000),
            ("WATCH_BUFFER", self.watch_buffer, 16..=1_000_000),
        ];
        for (var, value, range) in counts {
            check_range(var, value, range)?;
        }
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
        let (ms, s, day) = (Duration::from_millis, Duration::from_secs, 24 * 3600);
        #[rustfmt::skip]
        let durations = [
            ("DOWNSTREAM_TIMEOUT", self.downstream_timeout, ms(10)..=s(600)),
            ("RESOLVE_INTERVAL", self.resolve_interval, ms(50)..=s(600)),
            ("BREAKER_COOL_DOWN", self.breaker_cool_down, ms(10)..=s(3600)),
            ("STREAM_IDLE_TIMEOUT", self.stream_idle_timeout, ms(100)..=s(day)),
            ("STREAM_MAX_DURATION", self.stream_max_duration, s(1)..=s(7 * day)),
            ("LIVE_TOKEN_TTL", self.live_token_ttl, s(10)..=s(7 * day)),
        ];
        for (var, value, range) in durations {
            check_range(var, value, range)?;
        }
        if let Some(brokers) = &self.kafka_brokers {
            config::kafka_brokers("KAFKA_BROKERS", brokers)?;
        }
        config::kafka_names(&[
            ("KAFKA_TOPIC", &self.kafka_topic),
            ("KAFKA_EVENTS_TOPIC", &self.kafka_events_topic),
        ])?;
        if let Some(secret) = &self.live_token_secret
            && secret.expose().len() < 16
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

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        Config::from_vars(vars.collect())
    }

    #[test]
    fn keys_are_required_and_never_printed() {
        let err = load(&[]).unwrap_err().to_string();
        assert!(err.contains("API_KEYS"), "{err}");
        let config = load(&[
            ("API_KEYS", "demo:s3cret-key"),
            ("INGEST_TOKENS", "demo:s3cret-token"),
            ("LIVE_TOKEN_SECRET", "s3cret-s3cret-s3cret"),
        ])
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
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
        assert_eq!(config.credentials.keys.len(), 3);
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
        let config = load(&[
            ("API_KEYS", "a:a-long-key"),
            ("REFINEMENT_ADDR", "a:1,b:2,http://c:3"),
        ])
        .unwrap();
        assert_eq!(config.refinement, Target::list("X", "a:1,b:2,c:3").unwrap());
    }

    #[test]
    fn tenant_limit_stays_below_the_global_one() {
        let load = |more: &[(&str, &str)]| {
            let mut pairs = vec![("API_KEYS", "a:a-long-key")];
            pairs.extend_from_slice(more);
            load(&pairs)
        };
        let limit = |global, tenant: &[(&str, &str)]| {
            let mut pairs = vec![("MAX_CONCURRENT_REQUESTS", global)];
            pairs.extend_from_slice(tenant);
            load(&pairs).map(|config| config.tenant_requests)
        };
        assert_eq!(limit("1024", &[]), Ok(512));
        assert_eq!(limit("100", &[]), Ok(50));
        let err = limit("1024", &[("TENANT_MAX_CONCURRENT_REQUESTS", "1024")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "TENANT_MAX_CONCURRENT_REQUESTS=1024: must be below MAX_CONCURRENT_REQUESTS=1024"
            ),
            "{err}"
        );
        assert_eq!(
            limit("10", &[("TENANT_MAX_CONCURRENT_REQUESTS", "0")]),
            Ok(0)
        );
        let err = load(&[("COALESCE_MAX_FIXES", "20000")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("COALESCE_MAX_FIXES=20000: must be 1..=MAX_BATCH=10000"),
            "{err}"
        );
        let config = load(&[("MAX_BATCH", "500")]).unwrap();
        assert_eq!(config.gateway.coalesce_max_fixes(), 500);
        let err = load(&[("STREAM_IDLE_TIMEOUT", "1ms")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("STREAM_IDLE_TIMEOUT=1ms: out of range"),
            "{err}"
        );
    }
}
