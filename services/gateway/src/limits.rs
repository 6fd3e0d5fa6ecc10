//! Per-tenant rate limits (token buckets): requests per second and fixes per second.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

pub struct Limits {
    requests: Option<DefaultKeyedRateLimiter<String>>,
    fixes: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

/// Which limit a call ran into, and when to try again.
#[derive(Debug, PartialEq, Eq)]
pub struct Limited {
    pub kind: &'static str,
    pub retry_after: Duration,
}

impl Limits {
    /// Buckets hold one second of the rate; the fixes bucket at least one full batch.
    pub fn new(requests_per_sec: u32, fixes_per_sec: u32, max_batch: u32) -> Self {
        let limiter = |rate: u32, burst: u32| {
            NonZeroU32::new(rate).map(|rate| {
                let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
                RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
            })
        };
        Self {
            requests: limiter(requests_per_sec, requests_per_sec),
            fixes: limiter(fixes_per_sec, max_batch),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one request and `fixes` fixes from the tenant's buckets.
    pub fn check(&self, tenant: &str, fixes: usize) -> Result<(), Limited> {
        let tenant = tenant.to_owned();
        if let Some(requests) = &self.requests
            && let Err(not_until) = requests.check_key(&tenant)
        {
            return Err(self.limited("requests", not_until.wait_time_from(self.clock.now())));
        }
        let (Some(limiter), Some(n)) = (
            &self.fixes,
            NonZeroU32::new(u32::try_from(fixes).unwrap_or(u32::MAX)),
        ) else {
            return Ok(());
        };
        match limiter.check_key_n(&tenant, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(self.limited("fixes", not_until.wait_time_from(self.clock.now())))
            }
            // More than the bucket holds: validation caps batches, so only a tiny rate gets here.
            Err(_) => Err(self.limited("fixes", Duration::from_secs(1))),
        }
    }

    fn limited(&self, kind: &'static str, retry_after: Duration) -> Limited {
        Limited { kind, retry_after }
    }

    /// Forgets idle tenants' buckets; call now and then.
    pub fn tidy(&self) {
        for limiter in [&self.requests, &self.fixes].into_iter().flatten() {
            limiter.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_second() {
        let limits = Limits::new(2, 0, 10);
        assert!(limits.check("a", 1).is_ok());
        assert!(limits.check("a", 1).is_ok());
        let limited = limits.check("a", 1).unwrap_err();
        assert_eq!(limited.kind, "requests");
        assert!(
            limited.retry_after > Duration::ZERO && limited.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limits.check("b", 1).is_ok(),
            "tenants have their own buckets"
        );
    }

    #[test]
    fn fixes_per_second_with_a_batch_sized_bucket() {
        let limits = Limits::new(0, 100, 1000);
        assert!(limits.check("a", 1000).is_ok(), "one full batch fits");
        assert_eq!(limits.check("a", 10).unwrap_err().kind, "fixes");
    }

    #[test]
    fn zero_means_off() {
        let limits = Limits::new(0, 0, 10);
        for _ in 0..1000 {
            assert!(limits.check("a", 10_000).is_ok());
        }
    }
}
