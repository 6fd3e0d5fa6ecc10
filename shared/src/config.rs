//! Configuration from environment variables: envy into typed structs, validated once at start-up.

use std::{fmt, ops::RangeInclusive, time::Duration as StdDuration};

use serde::{
    Deserialize, Deserializer,
    de::{self, DeserializeOwned, Visitor},
};

/// Exit code for a bad configuration (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;

/// One line naming the variable, its value and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(var: &str, value: impl fmt::Display, rule: impl fmt::Display) -> Self {
        Self(format!("{var}={value}: {rule}"))
    }
}

/// Checks that go beyond parsing: ranges and combinations.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from the process environment.
pub fn from_env<T: DeserializeOwned + Validate>() -> Result<T, ConfigError> {
    from_vars(std::env::vars())
}

/// Loads `T` from the given variables; an empty value counts as unset.
pub fn from_vars<T, I>(vars: I) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Validate,
    I: IntoIterator<Item = (String, String)>,
{
    let fields = field_names::<T>();
    // A later value for the same variable wins (defaults first, then the environment).
    let vars: std::collections::BTreeMap<String, String> = vars
        .into_iter()
        .filter(|(key, value)| !value.is_empty() && fields.contains(&key.to_lowercase().as_str()))
        .collect();
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let config: T = envy::from_iter(vars.iter().cloned()).map_err(|err| explain(err, &vars))?;
    config.validate()?;
    Ok(config)
}

/// `value` must lie in `range`; the error names the variable and the range.
pub fn check_range<T>(var: &str, value: T, range: RangeInclusive<T>) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::new(
            var,
            &value,
            format_args!("out of range, allowed {}..={}", range.start(), range.end()),
        ))
    }
}

/// Kafka topic and group names: 1 to 249 characters of A-Z a-z 0-9 . _ -.
pub fn kafka_names(names: &[(&str, &str)]) -> Result<(), ConfigError> {
    for (var, value) in names {
        let ok = (1..=249).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !ok {
            return Err(ConfigError::new(
                var,
                value,
                "1 to 249 characters of A-Z a-z 0-9 . _ -",
            ));
        }
    }
    Ok(())
}

/// A comma list of Kafka brokers, each `host:port` or a URL.
pub fn kafka_brokers(var: &str, brokers: &str) -> Result<(), ConfigError> {
    for broker in brokers.split(',') {
        url(var, broker.trim(), "kafka")?;
    }
    Ok(())
}

/// Normalizes an address given as `host:port` or as a URL into a URL with `default_scheme`.
pub fn url(var: &str, value: &str, default_scheme: &str) -> Result<url::Url, ConfigError> {
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("{default_scheme}://{value}")
    };
    let url = url::Url::parse(&with_scheme).map_err(|err| {
        ConfigError::new(
            var,
            value,
            format_args!("not an address ({err}); write host:port or a URL"),
        )
    })?;
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(
            var,
            value,
            "no host; write host:port or a URL",
        ));
    }
    Ok(url)
}

/// A secret from the environment (a password, an API key): `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A duration written like `500ms`, `30s`, `12h` or `7d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(StdDuration::from_secs(secs))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Self(StdDuration::from_millis(millis))
    }

    pub const fn get(self) -> StdDuration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|_| bad_value(&text, "not a duration; write it like 500ms, 30s or 12h"))
    }
}

/// Log output: JSON lines (default) or human-readable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.to_lowercase().as_str() {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            _ => Err(bad_value(&text, "allowed json or pretty")),
        }
    }
}

/// Settings every service has: serving, shutdown, TLS and telemetry.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct CommonConfig {
    /// Address to listen on; `0.0.0.0` for all interfaces.
    pub server_host: String,
    /// One port for gRPC and HTTP/1.1 (`/health`, `/ready`, `/metrics`).
    pub server_port: u32,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Upper bound of any request; a shorter client deadline wins.
    pub request_timeout: Duration,
    /// Requests served at once; more are refused with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: u32,
    /// How often dependencies are probed for readiness.
    pub readiness_interval: Duration,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub tls_ca: Option<String>,
    pub log_format: LogFormat,
    pub otel_exporter_otlp_endpoint: Option<String>,
}

impl CommonConfig {
    /// Defaults with the service's own port.
    pub fn with_port(port: u16) -> Self {
        Self {
            server_port: u32::from(port),
            ..Self::default()
        }
    }

    /// Loads from the environment, `default_port` when `SERVER_PORT` is unset.
    pub fn from_env(default_port: u16) -> Result<Self, ConfigError> {
        Self::from_vars(default_port, std::env::vars())
    }

    pub fn from_vars(
        default_port: u16,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let port = ("SERVER_PORT".to_owned(), default_port.to_string());
        from_vars(std::iter::once(port).chain(vars))
    }

    /// The validated listen address.
    pub fn bind_addr(&self) -> std::net::SocketAddr {
        let host = self
            .server_host
            .parse()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        std::net::SocketAddr::new(host, u16::try_from(self.server_port).unwrap_or_default())
    }
}

impl Default for CommonConfig {
    fn default() -> Self {
        Self {
            server_host: "0.0.0.0".into(),
            server_port: 0,
            shutdown_grace: Duration::from_secs(20),
            request_timeout: Duration::from_secs(30),
            max_concurrent_requests: 1024,
            readiness_interval: Duration::from_secs(2),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            log_format: LogFormat::Json,
            otel_exporter_otlp_endpoint: None,
        }
    }
}

impl Validate for CommonConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        // Port 0 (any free port) is for tests that call `run` directly, not for the environment.
        check_range("SERVER_PORT", self.server_port, 1..=65535)?;
        if self.server_host.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::new(
                "SERVER_HOST",
                &self.server_host,
                "not an IP address, e.g. 0.0.0.0 or 127.0.0.1",
            ));
        }
        check_range(
            "SHUTDOWN_GRACE",
            self.shutdown_grace,
            Duration::from_secs(0)..=Duration::from_secs(600),
        )?;
        check_range(
            "REQUEST_TIMEOUT",
            self.request_timeout,
            Duration::from_millis(10)..=Duration::from_secs(3600),
        )?;
        check_range(
            "MAX_CONCURRENT_REQUESTS",
            self.max_concurrent_requests,
            1..=1_000_000,
        )?;
        check_range(
            "READINESS_INTERVAL",
            self.readiness_interval,
            Duration::from_millis(50)..=Duration::from_secs(300),
        )?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => Err(ConfigError::new(
                "TLS_KEY",
                "",
                "required when TLS_CERT is set",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                "TLS_CERT",
                "",
                "required when TLS_KEY is set",
            )),
            _ => Ok(()),
        }
    }
}

// Our own types cannot see the variable's name (envy does not pass it on), so their
// errors carry the value between markers and `explain` finds the variable by value.
const MARK: char = '\u{1f}';

fn bad_value<E: de::Error>(value: &str, rule: &str) -> E {
    E::custom(format_args!("{MARK}{value}{MARK}{rule}"))
}

fn explain(err: envy::Error, vars: &[(String, String)]) -> ConfigError {
    match err {
        envy::Error::MissingValue(field) => {
            ConfigError(format!("{} is required", field.to_uppercase()))
        }
        envy::Error::Custom(msg) => {
            // envy's own message for numbers and booleans names the variable.
            if let Some((why, rest)) = msg.split_once(" while parsing value '")
                && let Some((value, var)) = rest.rsplit_once("' provided by ")
            {
                return ConfigError::new(var, value, format_args!("not a valid value ({why})"));
            }
            let mut parts = msg.split(MARK);
            if let (Some(_), Some(value), Some(rule)) = (parts.next(), parts.next(), parts.next()) {
                let var = vars
                    .iter()
                    .find(|(_, v)| v == value)
                    .map_or("?", |(k, _)| k.as_str());
                return ConfigError::new(var, value, rule);
            }
            ConfigError(msg)
        }
    }
}

/// The field names of a struct, read from its `Deserialize` impl.
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("probe"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probe"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _probe_always_fails = T::deserialize(Probe(&mut fields));
    fields
}

/// For `#[serde(deserialize_with = "config::from_text")]`: a value parsed once by `FromStr`,
/// whose error names the variable, the value and the rule.
pub fn from_text<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr<Err: fmt::Display>,
{
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|rule: T::Err| bad_value(&text, &rule.to_string()))
}

/// A Redis-backed service's configuration: common settings, Redis and the service's own `S`,
/// with `SERVER_PORT` defaulting to `PORT`.
#[derive(Debug, Clone)]
pub struct ServiceConfig<S, const PORT: u16> {
    pub common: CommonConfig,
    pub redis: crate::redis::RedisConfig,
    pub service: S,
}

impl<S: DeserializeOwned + Validate + Default, const PORT: u16> ServiceConfig<S, PORT> {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(PORT)?,
            redis: from_env()?,
            service: from_env()?,
        })
    }

    /// Defaults with a Redis address: what tests start from.
    pub fn for_redis(redis: crate::redis::RedisConfig) -> Self {
        Self {
            common: CommonConfig::with_port(PORT),
            redis,
            service: S::default(),
        }
    }
}

impl<S, const PORT: u16> AsRef<CommonConfig> for ServiceConfig<S, PORT> {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[derive(Debug, Deserialize)]
    struct Sample {
        max_speed_kmh: f64,
        max_time_diff: Duration,
        #[serde(default)]
        label: Option<String>,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), ConfigError> {
            check_range("MAX_SPEED_KMH", self.max_speed_kmh, 1.0..=2000.0)
        }
    }

    #[test]
    fn parses_numbers_and_durations() {
        let s: Sample = from_vars(vars(&[
            ("MAX_SPEED_KMH", "150"),
            ("MAX_TIME_DIFF", "12h"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(s.max_speed_kmh, 150.0);
        assert_eq!(s.max_time_diff.get(), StdDuration::from_secs(12 * 3600));
        assert_eq!(s.label, None);
    }

    #[test]
    fn out_of_range_names_variable_value_and_range() {
        let err = from_vars::<Sample, _>(vars(&[("MAX_SPEED_KMH", "-1"), ("MAX_TIME_DIFF", "1h")]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: MAX_SPEED_KMH=-1: out of range, allowed 1..=2000"
        );
    }

    #[test]
    fn bad_duration_names_variable() {
        let err =
            from_vars::<Sample, _>(vars(&[("MAX_SPEED_KMH", "1"), ("MAX_TIME_DIFF", "banana")]))
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: MAX_TIME_DIFF=banana: not a duration; write it like 500ms, 30s or 12h"
        );
    }

    #[test]
    fn bad_number_names_variable() {
        let err =
            from_vars::<Sample, _>(vars(&[("MAX_SPEED_KMH", "fast"), ("MAX_TIME_DIFF", "1h")]))
                .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid configuration: MAX_SPEED_KMH=fast: not a valid value"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_variable_is_named() {
        let err = from_vars::<Sample, _>(vars(&[("MAX_SPEED_KMH", "1")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: MAX_TIME_DIFF is required"
        );
    }

    #[test]
    fn empty_value_counts_as_unset() {
        let s: Sample = from_vars(vars(&[
            ("MAX_SPEED_KMH", "1"),
            ("MAX_TIME_DIFF", "1s"),
            ("LABEL", ""),
        ]))
        .unwrap();
        assert_eq!(s.label, None);
    }

    #[test]
    fn common_config_port_range() {
        let err = CommonConfig::from_vars(50051, vars(&[("SERVER_PORT", "70000")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: SERVER_PORT=70000: out of range, allowed 1..=65535"
        );
        let ok = CommonConfig::from_vars(50051, vars(&[])).unwrap();
        assert_eq!(ok.bind_addr().port(), 50051);
        assert_eq!(ok.shutdown_grace.get(), StdDuration::from_secs(20));
    }

    #[test]
    fn log_format_rejects_unknown() {
        let err = CommonConfig::from_vars(1, vars(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: LOG_FORMAT=xml: allowed json or pretty"
        );
    }

    #[test]
    fn urls_accept_host_port_and_urls() {
        assert_eq!(
            url("A", "redis:6379", "redis").unwrap().as_str(),
            "redis://redis:6379"
        );
        assert_eq!(
            url("A", "http://x:1", "redis").unwrap().as_str(),
            "http://x:1/"
        );
        assert!(url("A", "://", "http").is_err());
    }
}
