//! Rules for tenant and device ids, which end up in Redis keys, Kafka keys and ClickHouse rows.

/// Tenants come from configuration (API keys); no `/`, so `tenant/device` is unambiguous.
pub fn check_tenant(tenant: &str) -> Result<(), &'static str> {
    let ok = (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("required, 1 to 64 characters of A-Z a-z 0-9 _ . -")
    }
}

/// Devices name themselves: any text without control characters, 1 to 128 bytes.
pub fn check_device(device: &str) -> Result<(), &'static str> {
    if device.is_empty() {
        Err("required")
    } else if device.len() > 128 {
        Err("longer than 128 bytes")
    } else if device.chars().any(char::is_control) {
        Err("contains control characters")
    } else {
        Ok(())
    }
}

/// An id that breaks its rule: the request field and the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadId {
    pub field: &'static str,
    pub rule: &'static str,
}

impl From<BadId> for tonic::Status {
    fn from(bad: BadId) -> Self {
        crate::grpc::invalid_argument(bad.field, bad.rule)
    }
}

/// The `tenant_id` of an internal request.
pub fn tenant_field(tenant: &str) -> Result<(), BadId> {
    check_tenant(tenant).map_err(|rule| BadId {
        field: "tenant_id",
        rule,
    })
}

/// The `tenant_id` and `device_id` of an internal request about one device.
pub fn device_fields(tenant: &str, device: &str) -> Result<(), BadId> {
    tenant_field(tenant)?;
    check_device(device).map_err(|rule| BadId {
        field: "device_id",
        rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants() {
        assert!(check_tenant("demo").is_ok());
        assert!(check_tenant("a.b-c_9").is_ok());
        assert!(check_tenant("").is_err());
        assert!(check_tenant("a/b").is_err());
        assert!(check_tenant("{x}").is_err());
        assert!(check_tenant(&"x".repeat(65)).is_err());
    }

    #[test]
    fn fields_are_named() {
        assert_eq!(tenant_field("").unwrap_err().field, "tenant_id");
        assert_eq!(
            device_fields("demo", "").unwrap_err(),
            BadId {
                field: "device_id",
                rule: "required"
            }
        );
        assert!(device_fields("demo", "v").is_ok());
    }

    #[test]
    fn devices() {
        assert!(check_device("367000140").is_ok());
        assert!(check_device("truck/7 {north}").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("a\nb").is_err());
        assert!(check_device(&"x".repeat(129)).is_err());
    }
}
