//! API keys and ingest tokens → tenant. They arrive as `authorization: Bearer <key>` or
//! `x-api-key: <key>` (device protocols: in the URL or as a Basic password), are compared in
//! constant time, and never logged. Checked on the HTTP headers, before any of the request
//! body is read (see `guard`). An ingest token can send fixes and do nothing else, so a key
//! on a phone cannot read or delete the tenant's data.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit as _, Mac as _};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use trackmesh_shared::{config::ConfigError, domain::TenantId};

use crate::error::Error;

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
    /// Parses `tenant:key` entries separated by commas or newlines (blank entries skipped);
    /// errors name the setting `var`.
    pub fn parse(var: &str, text: &str) -> Result<Self, ConfigError> {
        let mut keys = Vec::new();
        for entry in text
            .split([',', '\n'])
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let Some((tenant, key)) = entry.split_once(':') else {
                return Err(ConfigError::new(
                    var,
                    "<redacted>",
                    "each entry is tenant:key",
                ));
            };
            if let Err(rule) = TenantId::check(tenant) {
                return Err(ConfigError::new(
                    var,
                    tenant,
                    format_args!("tenant: {rule}"),
                ));
            }
            if key.len() < 8 {
                return Err(ConfigError::new(
                    var,
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

    /// A digest of the whole key set: the same on every replica configured alike.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut keys: Vec<_> = self.keys.iter().collect();
        keys.sort();
        let mut hasher = Sha256::new();
        for (key, tenant) in keys {
            hasher.update(key);
            hasher.update(tenant.as_bytes());
            hasher.update([0]);
        }
        hasher.finalize().into()
    }

    /// The tenant of `presented`, if it is one of these keys.
    pub fn lookup(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        // Every key is compared, so the time taken does not tell which one matched.
        let mut tenant = None;
        for (key, owner) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                tenant = Some(owner.as_str());
            }
        }
        tenant
    }
}

/// What a call may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Send fixes: an API key or an ingest token.
    Ingest,
    /// Anything else: an API key only.
    Full,
}

/// API keys and ingest tokens.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub keys: ApiKeys,
    pub ingest: ApiKeys,
}

impl Credentials {
    /// The tenant of the key or token `presented`, for a call of `scope`.
    pub fn tenant_of(&self, presented: &str, scope: Scope) -> Result<String, Error> {
        if let Some(tenant) = self.keys.lookup(presented) {
            return Ok(tenant.to_owned());
        }
        match self.ingest.lookup(presented) {
            Some(tenant) if scope == Scope::Ingest => Ok(tenant.to_owned()),
            Some(_) => Err(Error::IngestOnly),
            None => Err(Error::Unauthenticated("invalid API key or ingest token")),
        }
    }

    /// The tenant whose key (or, for `Scope::Ingest`, token) the call's headers carry.
    pub fn tenant(&self, headers: &HeaderMap, scope: Scope) -> Result<String, Error> {
        let presented = presented_key(headers).ok_or(Error::Unauthenticated(
            "missing API key: send authorization: Bearer <key> or x-api-key",
        ))?;
        self.tenant_of(presented, scope)
    }
}

/// Short-lived read-only tokens for `/v1/live`: browsers cannot set headers on an
/// `EventSource`, and an API key in a URL ends up in logs and histories. A token is
/// `base64(tenant.expiry_ms).base64(HMAC-SHA256)`, so any replica with the same secret
/// verifies it without shared state.
#[derive(Clone)]
pub struct StreamTokens {
    secret: Vec<u8>,
    ttl: std::time::Duration,
}

impl StreamTokens {
    pub fn new(secret: &[u8], ttl: std::time::Duration) -> Self {
        Self {
            secret: secret.to_vec(),
            ttl,
        }
    }

    /// A token for `tenant` and the Unix time in milliseconds it expires at.
    pub fn issue(&self, tenant: &str, now_ms: i64) -> (String, i64) {
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_ms = now_ms.saturating_add(ttl_ms);
        let payload = format!("{tenant}.{expires_ms}");
        let tag = self.mac(payload.as_bytes()).finalize().into_bytes();
        let token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(tag)
        );
        (token, expires_ms)
    }

    /// The tenant of a token this secret signed that has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<String, Error> {
        let invalid =
            || Error::Unauthenticated("invalid stream token: get one with POST /v1/live/token");
        let (payload, tag) = token.split_once('.').ok_or_else(invalid)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| invalid())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        self.mac(&payload)
            .verify_slice(&tag)
            .map_err(|_| invalid())?;
        let payload = String::from_utf8(payload).map_err(|_| invalid())?;
        let (tenant, expires_ms) = payload.rsplit_once('.').ok_or_else(invalid)?;
        let expires_ms: i64 = expires_ms.parse().map_err(|_| invalid())?;
        if expires_ms <= now_ms {
            return Err(Error::Unauthenticated(
                "stream token expired: get a new one with POST /v1/live/token",
            ));
        }
        Ok(tenant.to_owned())
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(payload);
        mac
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
    use tonic::{Code, Status};

    use super::*;

    fn metadata(name: &'static str, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.parse().unwrap());
        headers
    }

    fn keys() -> Credentials {
        Credentials {
            keys: ApiKeys::parse(
                "API_KEYS",
                "demo:demo-key-1, other:other-key-2\nfleet:fleet-key-3",
            )
            .unwrap(),
            ingest: ApiKeys::parse("INGEST_TOKENS", "demo:demo-ingest").unwrap(),
        }
    }

    #[test]
    fn bearer_and_x_api_key() {
        let keys = keys();
        assert_eq!(
            keys.tenant(&metadata("authorization", "Bearer demo-key-1"), Scope::Full)
                .unwrap(),
            "demo"
        );
        assert_eq!(
            keys.tenant(
                &metadata("authorization", "bearer other-key-2"),
                Scope::Full
            )
            .unwrap(),
            "other"
        );
        assert_eq!(
            keys.tenant(&metadata("x-api-key", "fleet-key-3"), Scope::Ingest)
                .unwrap(),
            "fleet"
        );
    }

    #[test]
    fn stream_tokens_carry_their_tenant_until_they_expire() {
        let tokens = StreamTokens::new(b"secret-secret-secret", std::time::Duration::from_secs(60));
        let (token, expires_ms) = tokens.issue("demo", 1_000);
        assert_eq!(expires_ms, 61_000);
        assert_eq!(tokens.verify(&token, 60_999).unwrap(), "demo");
        let expired = Status::from(tokens.verify(&token, 61_000).unwrap_err());
        assert!(expired.message().contains("expired"), "{expired:?}");
        // Another secret, a changed tenant or a cut tag: refused.
        let other = StreamTokens::new(b"another-secret-!!", std::time::Duration::from_secs(60));
        assert!(other.verify(&token, 2_000).is_err());
        let (payload, tag) = token.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(format!("other.{expires_ms}"));
        for bad in [
            format!("{forged}.{tag}"),
            format!("{payload}.{}", &tag[..tag.len() - 2]),
            payload.to_owned(),
            String::new(),
        ] {
            let err = Status::from(tokens.verify(&bad, 2_000).unwrap_err());
            assert_eq!(err.code(), Code::Unauthenticated, "{bad}");
        }
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
            let err = Status::from(keys.tenant(&metadata, Scope::Ingest).unwrap_err());
            assert_eq!(err.code(), Code::Unauthenticated);
            assert!(!err.message().contains("demo-key"), "no key in messages");
        }
    }

    #[test]
    fn bad_entries_are_refused_without_echoing_keys() {
        let err = ApiKeys::parse("API_KEYS", "demo").unwrap_err().to_string();
        assert!(err.contains("tenant:key"), "{err}");
        let err = ApiKeys::parse("API_KEYS", "a/b:longenough")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenant"), "{err}");
        let err = ApiKeys::parse("INGEST_TOKENS", "demo:short")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("INGEST_TOKENS=") && err.contains("at least 8") && !err.contains("short"),
            "{err}"
        );
    }

    #[test]
    fn ingest_tokens_send_fixes_and_nothing_else() {
        let keys = keys();
        let token = metadata("x-api-key", "demo-ingest");
        assert_eq!(keys.tenant(&token, Scope::Ingest).unwrap(), "demo");
        let err = Status::from(keys.tenant(&token, Scope::Full).unwrap_err());
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(keys.tenant_of("demo-key-1", Scope::Ingest).unwrap(), "demo");
    }
}
