//! The domain every service shares: checked tenant and device ids, the device key they make,
//! `Invalid` (the one shape of bad input, which each service maps to a status), and fixes as
//! they are persisted in Redis and Kafka, with an encoding of their own.

use std::{fmt, ops::Deref};

use trackmesh_proto::v1 as proto;

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

/// A fix as persisted (refinement's state, the fixes topic). Its protobuf tags are its own and
/// only ever added to: version 1 has the tags `common.proto`'s `Fix` had when the two were
/// split, so values written before decode (see the fixtures), and the public API may change
/// without changing stored data.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Fix {
    #[prost(string, tag = "1")]
    pub device_id: String,
    #[prost(int64, tag = "2")]
    pub time_ms: i64,
    #[prost(double, tag = "3")]
    pub lat: f64,
    #[prost(double, tag = "4")]
    pub lon: f64,
    #[prost(float, optional, tag = "5")]
    pub accuracy_m: Option<f32>,
    #[prost(float, optional, tag = "6")]
    pub speed_mps: Option<f32>,
    #[prost(float, optional, tag = "7")]
    pub heading_deg: Option<f32>,
    #[prost(float, optional, tag = "8")]
    pub altitude_m: Option<f32>,
}

/// What refinement decided about a fix; the numbers are part of the persisted encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Verdict {
    Unspecified = 0,
    Accepted = 1,
    Invalid = 2,
    NullIsland = 3,
    Future = 4,
    Inaccurate = 5,
    Duplicate = 6,
    OutOfOrder = 7,
    Speed = 8,
    Stationary = 9,
}

impl Verdict {
    /// The name in the public API (`ACCEPTED`, `NULL_ISLAND`, …), for metrics and logs.
    pub fn name(self) -> &'static str {
        proto::Verdict::try_from(self as i32).map_or("UNKNOWN", |v| v.as_str_name())
    }
}

/// A fix with its verdict and, when accepted, its annotations relative to the device's previous
/// accepted fix; persisted like [`Fix`], tags as `common.proto`'s `RefinedFix` had at the split.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refined {
    #[prost(message, optional, tag = "1")]
    pub fix: Option<Fix>,
    #[prost(enumeration = "Verdict", tag = "2")]
    pub verdict: i32,
    #[prost(bool, tag = "3")]
    pub replay: bool,
    #[prost(uint32, tag = "4")]
    pub segment: u32,
    #[prost(double, tag = "5")]
    pub distance_m: f64,
    #[prost(int64, tag = "6")]
    pub dt_ms: i64,
    #[prost(double, tag = "7")]
    pub speed_kmh: f64,
    #[prost(string, tag = "8")]
    pub detail: String,
    #[prost(bool, tag = "9")]
    pub reanchored: bool,
}

// Field by field, by value: the two sides may diverge, and nothing is copied on the way.
// `map` fields are optional messages, `each` fields repeated ones, converted in turn.
macro_rules! convert {
    ($($a:ty => $b:ty { $($field:ident),* } $(map $($m:ident),*)? $(each $($e:ident),*)?;)*) => {$(
        impl From<$a> for $b {
            fn from(from: $a) -> Self {
                Self {
                    $($field: from.$field,)*
                    $($($m: from.$m.map(Into::into),)*)?
                    $($($e: from.$e.into_iter().map(Into::into).collect(),)*)?
                }
            }
        }
    )*};
}
pub(crate) use convert;
convert! {
    proto::Fix => Fix { device_id, time_ms, lat, lon, accuracy_m, speed_mps, heading_deg, altitude_m };
    Fix => proto::Fix { device_id, time_ms, lat, lon, accuracy_m, speed_mps, heading_deg, altitude_m };
    proto::RefinedFix => Refined { verdict, replay, segment, distance_m, dt_ms, speed_kmh, detail, reanchored } map fix;
    Refined => proto::RefinedFix { verdict, replay, segment, distance_m, dt_ms, speed_kmh, detail, reanchored } map fix;
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

    /// Version 1 of the persisted encoding is the public messages' encoding at the split.
    #[test]
    fn fixes_convert_both_ways_and_encode_as_the_public_messages() {
        use prost::Message as _;
        let public = proto::RefinedFix {
            fix: Some(proto::Fix {
                device_id: "truck/7".into(),
                time_ms: 1_764_547_200_000,
                lat: 40.64,
                lon: -74.07,
                accuracy_m: Some(4.0),
                speed_mps: None,
                heading_deg: Some(180.0),
                altitude_m: Some(-2.5),
            }),
            verdict: proto::Verdict::Speed as i32,
            replay: true,
            segment: 3,
            distance_m: 11.1,
            dt_ms: 10_000,
            speed_kmh: 4.0,
            detail: "why".into(),
            reanchored: true,
        };
        let stored = Refined::from(public.clone());
        assert_eq!(stored.verdict(), Verdict::Speed);
        assert_eq!(stored.encode_to_vec(), public.encode_to_vec());
        assert_eq!(proto::RefinedFix::from(stored), public);
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
