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
    fn devices() {
        assert!(check_device("367000140").is_ok());
        assert!(check_device("truck/7 {north}").is_ok());
        assert!(check_device("").is_err());
        assert!(check_device("a\nb").is_err());
        assert!(check_device(&"x".repeat(129)).is_err());
    }
}
