//! The domain every service shares: checked tenant and device ids, the device key they make,
//! and `Invalid`, the one shape of bad input (field and rule) each service maps to a status.

use std::{fmt, ops::Deref};

/// The server clock in Unix epoch milliseconds, the unit of every fix's time.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Input that breaks a rule: the request field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct Invalid {
    pub field: String,
    pub rule: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

/// A tenant id: from configuration (API keys); no `/`, so `tenant/device` is unambiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId<'a>(&'a str);

/// A device id: devices name themselves, any text without control characters, 1 to 128 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId<'a>(&'a str);

impl<'a> TenantId<'a> {
    pub fn check(tenant: &'a str) -> Result<Self, &'static str> {
        let ok = (1..=64).contains(&tenant.len())
            && tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if ok {
            Ok(Self(tenant))
        } else {
            Err("required, 1 to 64 characters of A-Z a-z 0-9 _ . -")
        }
    }

    /// The `tenant_id` field of a request.
    pub fn parse(tenant: &'a str) -> Result<Self, Invalid> {
        Self::check(tenant).map_err(|rule| Invalid::new("tenant_id", rule))
    }
}

impl<'a> DeviceId<'a> {
    pub fn check(device: &'a str) -> Result<Self, &'static str> {
        if device.is_empty() {
            Err("required")
        } else if device.len() > 128 {
            Err("longer than 128 bytes")
        } else if device.chars().any(char::is_control) {
            Err("contains control characters")
        } else {
            Ok(Self(device))
        }
    }

    /// A device id in the request field `field`.
    pub fn parse(field: impl fmt::Display, device: &'a str) -> Result<Self, Invalid> {
        Self::check(device).map_err(|rule| Invalid::new(field.to_string(), rule))
    }
}

/// A tenant's device: `tenant/device` in Redis hash tags, Kafka keys and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey<'a> {
    pub tenant: TenantId<'a>,
    pub device: DeviceId<'a>,
}

impl<'a> DeviceKey<'a> {
    pub fn new(tenant: TenantId<'a>, device: DeviceId<'a>) -> Self {
        Self { tenant, device }
    }

    /// The `tenant_id` and `device_id` fields of a request about one device.
    pub fn parse(tenant: &'a str, device: &'a str) -> Result<Self, Invalid> {
        Ok(Self::new(
            TenantId::parse(tenant)?,
            DeviceId::parse("device_id", device)?,
        ))
    }
}

macro_rules! as_str {
    ($($id:ident),*) => {$(
        impl Deref for $id<'_> {
            type Target = str;
            fn deref(&self) -> &str {
                self.0
            }
        }

        impl fmt::Display for $id<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.0)
            }
        }
    )*};
}
as_str!(TenantId, DeviceId);

impl fmt::Display for DeviceKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants() {
        assert!(TenantId::check("demo").is_ok());
        assert!(TenantId::check("a.b-c_9").is_ok());
        assert!(TenantId::check("").is_err());
        assert!(TenantId::check("a/b").is_err());
        assert!(TenantId::check("{x}").is_err());
        assert!(TenantId::check(&"x".repeat(65)).is_err());
    }

    #[test]
    fn fields_are_named() {
        assert_eq!(TenantId::parse("").unwrap_err().field, "tenant_id");
        assert_eq!(
            DeviceKey::parse("demo", "").unwrap_err(),
            Invalid::new("device_id", "required")
        );
        assert_eq!(
            DeviceId::parse(format_args!("fixes[{}].device_id", 3), "a\nb")
                .unwrap_err()
                .to_string(),
            "fixes[3].device_id: contains control characters"
        );
        let key = DeviceKey::parse("demo", "truck/7").unwrap();
        assert_eq!(key.to_string(), "demo/truck/7");
        assert_eq!(&*key.device, "truck/7");
    }

    #[test]
    fn devices() {
        assert!(DeviceId::check("367000140").is_ok());
        assert!(DeviceId::check("truck/7 {north}").is_ok());
        assert!(DeviceId::check("").is_err());
        assert!(DeviceId::check("a\nb").is_err());
        assert!(DeviceId::check(&"x".repeat(129)).is_err());
    }
}
