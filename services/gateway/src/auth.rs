//! API keys → tenant. Keys arrive as `authorization: Bearer <key>` or `x-api-key: <key>`,
//! are compared in constant time, and never logged. Checked on the HTTP headers, before any
//! of the request body is read (see `guard`).

use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use trackmesh_shared::{config::ConfigError, ids};

/// The configured keys, kept as SHA-256 digests: comparing digests in constant time does
/// not even reveal a key's length.
#[derive(Clone, Default)]
pub struct ApiKeys {
    keys: Vec<([u8; 32], String)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeys")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl ApiKeys {
    /// Parses `tenant:key` entries separated by commas or newlines; blank entries are skipped.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let Some((tenant, key)) = entry.split_once(':') else {
                return Err(ConfigError::new(
                    "API_KEYS",
                    "<redacted>",
                    "each entry is tenant:key",
                ));
            };
            if let Err(rule) = ids::check_tenant(tenant) {
                return Err(ConfigError::new(
                    "API_KEYS",
                    tenant,
                    format_args!("tenant: {rule}"),
                ));
            }
            if key.len() < 8 {
                return Err(ConfigError::new(
                    "API_KEYS",
                    format_args!("{tenant}:<redacted>"),
                    "keys must be at least 8 characters",
                ));
            }
            keys.push((digest(key), tenant.to_owned()));
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant whose key the call carries.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<String, Status> {
        let presented = presented_key(headers).ok_or_else(|| {
            Status::unauthenticated(
                "missing API key: send authorization: Bearer <key> or x-api-key",
            )
        })?;
        let presented = digest(presented);
        // Every key is compared, so the time taken does not tell which one matched.
        let mut tenant = None;
        for (key, owner) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                tenant = Some(owner);
            }
        }
        tenant
            .cloned()
            .ok_or_else(|| Status::unauthenticated("invalid API key"))
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let (scheme, key) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().unwrap());
        headers
    }

    fn keys() -> ApiKeys {
        ApiKeys::parse("demo:demo-key-1, other:other-key-2\nfleet:fleet-key-3").unwrap()
    }

    #[test]
    fn bearer_and_x_api_key() {
        let keys = keys();
        assert_eq!(
            keys.tenant(&metadata("authorization", "Bearer demo-key-1"))
                .unwrap(),
            "demo"
        );
        assert_eq!(
            keys.tenant(&metadata("authorization", "bearer other-key-2"))
                .unwrap(),
            "other"
        );
        assert_eq!(
            keys.tenant(&metadata("x-api-key", "fleet-key-3")).unwrap(),
            "fleet"
        );
    }

    #[test]
    fn missing_or_wrong_keys_are_unauthenticated() {
        let keys = keys();
        for metadata in [
            HeaderMap::new(),
            metadata("authorization", "Bearer nope-nope-nope"),
            metadata("authorization", "Basic demo-key-1"),
            metadata("x-api-key", "demo-key-"),
        ] {
            let err = keys.tenant(&metadata).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
            assert!(!err.message().contains("demo-key"), "no key in messages");
        }
    }

    #[test]
    fn bad_entries_are_refused_without_echoing_keys() {
        let err = ApiKeys::parse("demo").unwrap_err().to_string();
        assert!(err.contains("tenant:key"), "{err}");
        let err = ApiKeys::parse("a/b:longenough").unwrap_err().to_string();
        assert!(err.contains("tenant"), "{err}");
        let err = ApiKeys::parse("demo:short").unwrap_err().to_string();
        assert!(
            err.contains("at least 8") && !err.contains("short"),
            "{err}"
        );
    }
}
