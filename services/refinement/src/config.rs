//! refinement-api settings, from the environment.

use serde::Deserialize;
use trackmesh_shared::config::{self, ConfigError, Duration, Validate, check_range};

use crate::refine::Rules;

pub const DEFAULT_PORT: u16 = 50051;

/// Common, Redis and refinement settings.
pub type Config = config::ServiceConfig<RefinementConfig, DEFAULT_PORT>;

/// The cleaning rules and limits (README, "Configuration").
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RefinementConfig {
    /// Implied speed above this, from the last accepted fix, is a SPEED outlier.
    pub max_speed_kmh: f64,
    /// A longer gap starts a new segment without a speed check.
    pub max_time_diff: Duration,
    /// Fixes later than now plus this are FUTURE.
    pub max_future_skew: Duration,
    /// Fixes reporting a worse accuracy are INACCURATE; unset: off.
    pub max_accuracy_m: Option<f64>,
    /// Fixes closer than this to the last accepted one are STATIONARY; unset: off.
    pub min_distance_m: Option<f64>,
    /// Consistent SPEED rejections in a row after which the track re-anchors on them; 0: never.
    pub reanchor_after: u32,
    /// Device state expires after this long without an accepted fix.
    pub state_ttl: Duration,
    /// Accepted fixes per device remembered to recognise a re-sent fix as a replay; the
    /// device's latest batch is always remembered whole, however large.
    pub replay_history: u32,
    /// Most fixes in one Refine call.
    pub max_batch: u32,
}

impl Default for RefinementConfig {
    fn default() -> Self {
        Self {
            max_speed_kmh: 150.0,
            max_time_diff: Duration::from_secs(12 * 3600),
            max_future_skew: Duration::from_secs(300),
            max_accuracy_m: None,
            min_distance_m: None,
            reanchor_after: 3,
            state_ttl: Duration::from_secs(30 * 24 * 3600),
            replay_history: 1000,
            max_batch: 10_000,
        }
    }
}

impl RefinementConfig {
    pub fn rules(&self) -> Rules {
        Rules {
            max_speed_kmh: self.max_speed_kmh,
            max_time_diff_ms: millis(self.max_time_diff),
            max_future_skew_ms: millis(self.max_future_skew),
            max_accuracy_m: self.max_accuracy_m,
            min_distance_m: self.min_distance_m,
            reanchor_after: self.reanchor_after as usize,
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.get().as_millis()).unwrap_or(i64::MAX)
}

impl Validate for RefinementConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        check_range("MAX_SPEED_KMH", self.max_speed_kmh, 1.0..=100_000.0)?;
        check_range(
            "MAX_TIME_DIFF",
            self.max_time_diff,
            Duration::from_secs(1)..=Duration::from_secs(365 * 24 * 3600),
        )?;
        check_range(
            "MAX_FUTURE_SKEW",
            self.max_future_skew,
            Duration::from_secs(0)..=Duration::from_secs(7 * 24 * 3600),
        )?;
        if let Some(accuracy) = self.max_accuracy_m {
            check_range("MAX_ACCURACY_M", accuracy, 0.1..=100_000.0)?;
        }
        if let Some(distance) = self.min_distance_m {
            check_range("MIN_DISTANCE_M", distance, 0.0..=100_000.0)?;
        }
        if self.reanchor_after == 1 {
            return Err(ConfigError::new(
                "REANCHOR_AFTER",
                1,
                "allowed 0 (never) or 2..=100",
            ));
        }
        check_range("REANCHOR_AFTER", self.reanchor_after, 0..=100)?;
        check_range(
            "STATE_TTL",
            self.state_ttl,
            Duration::from_secs(1)..=Duration::from_secs(10 * 365 * 24 * 3600),
        )?;
        check_range("REPLAY_HISTORY", self.replay_history, 1..=1_000_000)?;
        check_range("MAX_BATCH", self.max_batch, 1..=1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pairs: &[(&str, &str)]) -> Result<RefinementConfig, ConfigError> {
        config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_design() {
        let config = load(&[]).unwrap();
        assert_eq!(config.max_speed_kmh, 150.0);
        assert_eq!(config.max_time_diff.get().as_secs(), 12 * 3600);
        assert_eq!(config.max_future_skew.get().as_secs(), 300);
        assert_eq!(config.state_ttl.get().as_secs(), 30 * 24 * 3600);
        assert_eq!(config.max_accuracy_m, None);
    }

    #[test]
    fn bad_values_are_named() {
        assert_eq!(
            load(&[("MAX_SPEED_KMH", "-1")]).unwrap_err().to_string(),
            "invalid configuration: MAX_SPEED_KMH=-1: out of range, allowed 1..=100000"
        );
        assert!(
            load(&[("MAX_TIME_DIFF", "banana")])
                .unwrap_err()
                .to_string()
                .contains("MAX_TIME_DIFF=banana")
        );
        assert!(
            load(&[("REANCHOR_AFTER", "1")])
                .unwrap_err()
                .to_string()
                .contains("REANCHOR_AFTER=1")
        );
        assert!(
            load(&[("MAX_ACCURACY_M", "0")])
                .unwrap_err()
                .to_string()
                .contains("MAX_ACCURACY_M=0")
        );
    }
}
