//! learning-api settings, from the environment.

use serde::Deserialize;
use trackmesh_shared::config::{self, ConfigError, Duration, Validate, check_range};

use crate::{
    calendar::{Calendar, Days, HourRange, UtcOffset},
    model::Rules,
};

pub const DEFAULT_PORT: u16 = 50052;

/// Common, Redis and learning settings.
pub type Config = config::ServiceConfig<LearningConfig, DEFAULT_PORT>;

/// What counts as a stay, a place, home and work (README, "Configuration").
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LearningConfig {
    /// A stay: fixes closer than this to its first fix…
    pub stay_radius_m: f64,
    /// …for at least this long.
    pub stay_min_duration: Duration,
    /// A stay joins the nearest place whose centroid is at most this far.
    pub place_radius_m: f64,
    /// Places kept per device; a new one evicts the place with the least dwell.
    pub max_places_per_device: u32,
    /// A faster hop between consecutive fixes closes the stay candidate (defence in depth).
    pub max_speed_kmh: f64,
    /// A longer gap between consecutive fixes closes the stay candidate.
    pub max_time_diff: Duration,
    /// Local hours counted as night for home, e.g. `22-06`.
    #[serde(deserialize_with = "config::from_text")]
    pub night_hours: HourRange,
    /// Local hours counted as work, e.g. `09-17`.
    #[serde(deserialize_with = "config::from_text")]
    pub work_hours: HourRange,
    /// Days counted for work, e.g. `mon-fri`.
    #[serde(deserialize_with = "config::from_text")]
    pub work_days: Days,
    /// Local time for hour-of-week dwell and labels, a fixed offset like `+02:00`.
    #[serde(deserialize_with = "config::from_text")]
    pub utc_offset: UtcOffset,
    /// Visits a place needs before it can be labelled home or work.
    pub min_label_visits: u32,
    /// A device's model expires after this long without a new fix.
    pub state_ttl: Duration,
    /// Most fixes in one Observe call.
    pub max_batch: u32,
    /// Kafka brokers. Set: learning also observes storage's fixes topic (as a consumer group,
    /// so fixes whose Observe call failed are learned anyway), keeps geofences in a compacted
    /// topic and produces events. Unset: none of that (geofence calls: FAILED_PRECONDITION).
    pub kafka_brokers: Option<String>,
    /// Storage's fixes topic (its KAFKA_TOPIC).
    pub kafka_topic: String,
    pub kafka_group_id: String,
    pub kafka_events_topic: String,
    pub kafka_geofences_topic: String,
    /// For the events topic when learning creates it (storage creates it alike).
    pub kafka_partitions: u32,
    pub kafka_replication_factor: u32,
    pub max_geofences_per_tenant: u32,
    /// A device is inside a geofence once it has been inside this long (0: at the first fix).
    pub geofence_min_dwell: Duration,
}

impl Default for LearningConfig {
    fn default() -> Self {
        let calendar = Calendar::default();
        Self {
            stay_radius_m: 200.0,
            stay_min_duration: Duration::from_secs(20 * 60),
            place_radius_m: 200.0,
            max_places_per_device: 50,
            max_speed_kmh: 150.0,
            max_time_diff: Duration::from_secs(12 * 3600),
            night_hours: calendar.night,
            work_hours: calendar.work,
            work_days: calendar.work_days,
            utc_offset: UtcOffset(calendar.utc_offset_ms),
            min_label_visits: 3,
            state_ttl: Duration::from_secs(30 * 24 * 3600),
            max_batch: 10_000,
            kafka_brokers: None,
            kafka_topic: "trackmesh.fixes".into(),
            kafka_group_id: "trackmesh-learning".into(),
            kafka_events_topic: "trackmesh.events".into(),
            kafka_geofences_topic: "trackmesh.geofences".into(),
            kafka_partitions: 12,
            kafka_replication_factor: 1,
            max_geofences_per_tenant: 1_000,
            geofence_min_dwell: Duration::from_secs(0),
        }
    }
}

impl LearningConfig {
    /// The rules in the units the model decides in.
    pub fn rules(&self) -> Rules {
        Rules {
            stay_radius_m: self.stay_radius_m,
            stay_min_duration_ms: millis(self.stay_min_duration),
            place_radius_m: self.place_radius_m,
            max_places: self.max_places_per_device as usize,
            max_speed_kmh: self.max_speed_kmh,
            max_time_diff_ms: millis(self.max_time_diff),
            min_label_visits: self.min_label_visits,
            calendar: Calendar {
                utc_offset_ms: self.utc_offset.0,
                night: self.night_hours,
                work: self.work_hours,
                work_days: self.work_days,
            },
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.get().as_millis()).unwrap_or(i64::MAX)
}

impl Validate for LearningConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        const DAY: u64 = 24 * 3600;
        let secs = Duration::from_secs;
        for (var, value, range) in [
            ("STAY_RADIUS_M", self.stay_radius_m, 1.0..=100_000.0),
            ("PLACE_RADIUS_M", self.place_radius_m, 1.0..=100_000.0),
            ("MAX_SPEED_KMH", self.max_speed_kmh, 1.0..=100_000.0),
        ] {
            check_range(var, value, range)?;
        }
        for (var, value, range) in [
            (
                "STAY_MIN_DURATION",
                self.stay_min_duration,
                secs(1)..=secs(7 * DAY),
            ),
            (
                "MAX_TIME_DIFF",
                self.max_time_diff,
                secs(1)..=secs(365 * DAY),
            ),
            ("STATE_TTL", self.state_ttl, secs(1)..=secs(10 * 365 * DAY)),
            (
                "GEOFENCE_MIN_DWELL",
                self.geofence_min_dwell,
                secs(0)..=secs(7 * DAY),
            ),
        ] {
            check_range(var, value, range)?;
        }
        for (var, value, range) in [
            (
                "MAX_PLACES_PER_DEVICE",
                self.max_places_per_device,
                1..=1_000,
            ),
            ("MIN_LABEL_VISITS", self.min_label_visits, 1..=1_000_000),
            ("MAX_BATCH", self.max_batch, 1..=1_000_000),
            ("KAFKA_PARTITIONS", self.kafka_partitions, 1..=10_000),
            (
                "KAFKA_REPLICATION_FACTOR",
                self.kafka_replication_factor,
                1..=10,
            ),
            (
                "MAX_GEOFENCES_PER_TENANT",
                self.max_geofences_per_tenant,
                0..=100_000,
            ),
        ] {
            check_range(var, value, range)?;
        }
        if let Some(brokers) = &self.kafka_brokers {
            config::kafka_brokers("KAFKA_BROKERS", brokers)?;
        }
        config::kafka_names(&[
            ("KAFKA_TOPIC", &self.kafka_topic),
            ("KAFKA_GROUP_ID", &self.kafka_group_id),
            ("KAFKA_EVENTS_TOPIC", &self.kafka_events_topic),
            ("KAFKA_GEOFENCES_TOPIC", &self.kafka_geofences_topic),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calendar::HOUR_MS;

    fn load(pairs: &[(&str, &str)]) -> Result<LearningConfig, ConfigError> {
        config::from_vars(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_match_the_design() {
        let config = load(&[]).unwrap();
        let rules = config.rules();
        assert_eq!(rules.stay_radius_m, 200.0);
        assert_eq!(rules.stay_min_duration_ms, 20 * 60_000);
        assert_eq!(rules.max_speed_kmh, 150.0);
        assert_eq!(rules.max_time_diff_ms, 12 * HOUR_MS);
        assert_eq!(rules.min_label_visits, 3);
        assert_eq!(rules.calendar, Calendar::default());
        assert_eq!(config.state_ttl.get().as_secs(), 30 * 24 * 3600);
    }

    #[test]
    fn hours_days_and_offset_are_read() {
        let config = load(&[
            ("NIGHT_HOURS", "23-7"),
            ("WORK_HOURS", "8-16"),
            ("WORK_DAYS", "sun-thu"),
            ("UTC_OFFSET", "-05:00"),
        ])
        .unwrap();
        let calendar = config.rules().calendar;
        assert_eq!(calendar.night.to_string(), "23-07");
        assert_eq!(calendar.work.to_string(), "08-16");
        assert!(calendar.work_days.contains(6) && !calendar.work_days.contains(4));
        assert_eq!(calendar.utc_offset_ms, -5 * HOUR_MS);
    }

    #[test]
    fn bad_values_are_named() {
        for (var, value, expected) in [
            (
                "STAY_RADIUS_M",
                "0",
                "STAY_RADIUS_M=0: out of range, allowed 1..=100000",
            ),
            (
                "STAY_MIN_DURATION",
                "soon",
                "STAY_MIN_DURATION=soon: not a duration",
            ),
            (
                "MAX_PLACES_PER_DEVICE",
                "0",
                "MAX_PLACES_PER_DEVICE=0: out of range, allowed 1..=1000",
            ),
            (
                "NIGHT_HOURS",
                "25-3",
                "NIGHT_HOURS=25-3: write hours as START-END",
            ),
            ("WORK_HOURS", "9-9", "WORK_HOURS=9-9: the range is empty"),
            (
                "WORK_DAYS",
                "weekdays",
                "WORK_DAYS=weekdays: write days like mon-fri",
            ),
            (
                "UTC_OFFSET",
                "+15:00",
                "UTC_OFFSET=+15:00: write an offset like +02:00",
            ),
            ("MIN_LABEL_VISITS", "0", "MIN_LABEL_VISITS=0: out of range"),
        ] {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(expected), "{var}={value}: {err}");
        }
    }
}
