//! Local time for the learned model: hour-of-week dwell bins, night and work hours, and the
//! parsing of their settings (`NIGHT_HOURS=22-06`, `WORK_DAYS=mon-fri`, `UTC_OFFSET=+02:00`).

use std::{fmt, str::FromStr};

/// Hour-of-week bins, Monday 00:00 first.
pub const HOURS_PER_WEEK: usize = 168;
pub const HOUR_MS: i64 = 3_600_000;
const WEEK_MS: i64 = HOURS_PER_WEEK as i64 * HOUR_MS;
/// 1970-01-01 was a Thursday: hour 72 of a week that starts on Monday 00:00.
const EPOCH_HOUR_OF_WEEK: i64 = 72;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Hours of the day `start` (inclusive) to `end` (exclusive), wrapping past midnight when
/// `start > end`: `22-06` is 22:00 to 06:00.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HourRange {
    start: u8,
    end: u8,
}

impl FromStr for HourRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        const RULE: &str = "write hours as START-END, e.g. 22-06 or 09-17, each 0..=24";
        let (start, end) = text.trim().split_once('-').ok_or(RULE)?;
        let hour = |part: &str| part.trim().parse::<u8>().ok().filter(|h| *h <= 24);
        let (Some(start), Some(end)) = (hour(start), hour(end)) else {
            return Err(RULE.into());
        };
        if start == 24 || start == end {
            return Err("the range is empty; e.g. 0-24 for the whole day".into());
        }
        Ok(Self { start, end })
    }
}

impl HourRange {
    pub fn contains(self, hour: u8) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&hour)
        } else {
            hour >= self.start || hour < self.end
        }
    }
}

impl fmt::Display for HourRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}-{:02}", self.start, self.end)
    }
}

/// A set of weekdays, Monday = 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Days(u8);

/// `mon-fri`, `sat,sun`, `sun-thu` (wrapping), or a mix: `mon-wed,fri`.
impl FromStr for Days {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        const RULE: &str = "write days like mon-fri or sat,sun (mon tue wed thu fri sat sun)";
        let day = |name: &str| {
            let name = name.trim().to_ascii_lowercase();
            DAY_NAMES.iter().position(|d| *d == name).ok_or(RULE)
        };
        let mut mask = 0u8;
        for part in text.split(',') {
            let (first, last) = match part.split_once('-') {
                Some((first, last)) => (day(first)?, day(last)?),
                None => (day(part)?, day(part)?),
            };
            let mut d = first;
            loop {
                mask |= 1 << d;
                if d == last {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        Ok(Self(mask))
    }
}

impl Days {
    pub fn contains(self, day: usize) -> bool {
        day < 7 && self.0 & (1 << day) != 0
    }
}

/// The fixed offset of local time from UTC, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UtcOffset(pub i64);

/// `+02:00`, `-05:30`, `+2`, `Z` or `UTC`.
impl FromStr for UtcOffset {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        const RULE: &str = "write an offset like +02:00 or -05:30, within -12:00..=+14:00";
        let text = text.trim();
        if text.eq_ignore_ascii_case("z") || text.eq_ignore_ascii_case("utc") {
            return Ok(Self(0));
        }
        let (sign, rest) = match text.as_bytes().first() {
            Some(b'+') => (1, &text[1..]),
            Some(b'-') => (-1, &text[1..]),
            _ => return Err(RULE.into()),
        };
        let (hours, minutes) = rest.split_once(':').unwrap_or((rest, "0"));
        let (Ok(hours), Ok(minutes)) = (hours.parse::<u8>(), minutes.parse::<u8>()) else {
            return Err(RULE.into());
        };
        let offset = sign * (i64::from(hours) * 60 + i64::from(minutes));
        if minutes >= 60 || !(-12 * 60..=14 * 60).contains(&offset) {
            return Err(RULE.into());
        }
        Ok(Self(offset * 60_000))
    }
}

/// Local time as the labels see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Calendar {
    pub utc_offset_ms: i64,
    pub night: HourRange,
    pub work: HourRange,
    pub work_days: Days,
}

impl Default for Calendar {
    fn default() -> Self {
        Self {
            utc_offset_ms: 0,
            night: HourRange { start: 22, end: 6 },
            work: HourRange { start: 9, end: 17 },
            work_days: Days(0b001_1111),
        }
    }
}

impl Calendar {
    /// The hour-of-week bin of `time_ms` in local time.
    pub fn hour_of_week(&self, time_ms: i64) -> usize {
        let hour = (time_ms + self.utc_offset_ms).div_euclid(HOUR_MS);
        // rem_euclid of a positive modulus is in 0..168.
        (hour + EPOCH_HOUR_OF_WEEK).rem_euclid(HOURS_PER_WEEK as i64) as usize
    }

    /// Spreads the dwell from `start_ms` to `end_ms` over hour-of-week `bins`.
    pub fn add_dwell(&self, bins: &mut [u64], start_ms: i64, end_ms: i64) {
        debug_assert_eq!(bins.len(), HOURS_PER_WEEK);
        if end_ms <= start_ms {
            return;
        }
        // Whole weeks add the same to every bin; only the rest needs walking hour by hour.
        let weeks = (end_ms - start_ms) / WEEK_MS;
        if weeks > 0 {
            let whole = u64::try_from(weeks * HOUR_MS).unwrap_or(0);
            for bin in bins.iter_mut() {
                *bin = bin.saturating_add(whole);
            }
        }
        let mut at = start_ms + weeks * WEEK_MS;
        while at < end_ms {
            let local = at + self.utc_offset_ms;
            let next = (local.div_euclid(HOUR_MS) + 1) * HOUR_MS - self.utc_offset_ms;
            let until = next.min(end_ms);
            if let Some(bin) = bins.get_mut(self.hour_of_week(at)) {
                *bin = bin.saturating_add(u64::try_from(until - at).unwrap_or(0));
            }
            at = until;
        }
    }

    /// Dwell in night hours, any day.
    pub fn night_dwell(&self, bins: &[u64]) -> u64 {
        self.sum(bins, |_, hour| self.night.contains(hour))
    }

    /// Dwell in work hours on work days.
    pub fn work_dwell(&self, bins: &[u64]) -> u64 {
        self.sum(bins, |day, hour| {
            self.work_days.contains(day) && self.work.contains(hour)
        })
    }

    fn sum(&self, bins: &[u64], keep: impl Fn(usize, u8) -> bool) -> u64 {
        bins.iter()
            .enumerate()
            .filter(|(index, _)| keep(index / 24, (index % 24) as u8))
            .map(|(_, dwell)| *dwell)
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_utc_offset(text: &str) -> Result<i64, String> {
        text.parse().map(|UtcOffset(ms)| ms)
    }

    // Monday 2024-01-01 00:00 UTC.
    const MONDAY_MS: i64 = 1_704_067_200_000;

    #[test]
    fn weeks_start_on_monday_midnight() {
        let utc = Calendar::default();
        assert_eq!(utc.hour_of_week(MONDAY_MS), 0);
        assert_eq!(utc.hour_of_week(MONDAY_MS - 1), 167);
        assert_eq!(utc.hour_of_week(MONDAY_MS + 25 * HOUR_MS + 59_999), 25);
        assert_eq!(utc.hour_of_week(0), 72, "the epoch was a Thursday");
        assert_eq!(utc.hour_of_week(-1), 71, "before the epoch too");
        let plus_two = Calendar {
            utc_offset_ms: 2 * HOUR_MS,
            ..utc
        };
        assert_eq!(plus_two.hour_of_week(MONDAY_MS), 2);
        assert_eq!(plus_two.hour_of_week(MONDAY_MS - 3 * HOUR_MS), 167);
    }

    #[test]
    fn dwell_is_split_at_hour_boundaries() {
        let calendar = Calendar::default();
        let mut bins = vec![0; HOURS_PER_WEEK];
        calendar.add_dwell(
            &mut bins,
            MONDAY_MS + 30 * 60_000,
            MONDAY_MS + 2 * HOUR_MS + 15 * 60_000,
        );
        assert_eq!(&bins[..4], &[1_800_000, 3_600_000, 900_000, 0]);
        assert_eq!(bins.iter().sum::<u64>(), 6_300_000);
    }

    #[test]
    fn dwell_wraps_the_week_and_counts_whole_weeks_in_every_bin() {
        let calendar = Calendar::default();
        let mut bins = vec![0; HOURS_PER_WEEK];
        // Sunday 23:00 to Monday 01:00, two weeks later.
        let start = MONDAY_MS - HOUR_MS;
        calendar.add_dwell(&mut bins, start, start + 2 * WEEK_MS + 2 * HOUR_MS);
        assert_eq!(bins[167], 3 * 3_600_000);
        assert_eq!(bins[0], 3 * 3_600_000);
        assert_eq!(bins[1], 2 * 3_600_000);
        assert_eq!(
            bins.iter().sum::<u64>(),
            u64::try_from(2 * WEEK_MS + 2 * HOUR_MS).unwrap()
        );
    }

    #[test]
    fn night_and_work_hours() {
        let calendar = Calendar::default();
        let mut bins = vec![0; HOURS_PER_WEEK];
        for (day, hour) in [(0, 23), (1, 3), (1, 10), (5, 10), (4, 16), (4, 17)] {
            bins[day * 24 + hour] = 1;
        }
        assert_eq!(calendar.night_dwell(&bins), 2);
        // Saturday 10:00 is not a work day; Friday 17:00 is past work hours.
        assert_eq!(calendar.work_dwell(&bins), 2);
    }

    #[test]
    fn hour_ranges() {
        let night = "22-06".parse::<HourRange>().unwrap();
        assert!(night.contains(22) && night.contains(0) && night.contains(5));
        assert!(!night.contains(6) && !night.contains(21));
        let day = "9-17".parse::<HourRange>().unwrap();
        assert_eq!(day.to_string(), "09-17");
        assert!(day.contains(9) && day.contains(16) && !day.contains(17));
        let all = "0-24".parse::<HourRange>().unwrap();
        assert!((0..24).all(|h| all.contains(h)));
        for bad in ["", "22", "25-3", "3-3", "24-3", "a-b", "-1-3"] {
            assert!(bad.parse::<HourRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn day_sets() {
        let weekdays = "mon-fri".parse::<Days>().unwrap();
        assert!((0..5).all(|d| weekdays.contains(d)));
        assert!(!weekdays.contains(5) && !weekdays.contains(6));
        let wrapped = "Sun-Tue".parse::<Days>().unwrap();
        assert!(wrapped.contains(6) && wrapped.contains(0) && wrapped.contains(1));
        assert!(!wrapped.contains(2));
        assert_eq!("mon-wed,fri".parse::<Days>().unwrap(), Days(0b1_0111));
        for bad in ["", "monday", "mon-", "mon,,fri"] {
            assert!(bad.parse::<Days>().is_err(), "{bad}");
        }
    }

    #[test]
    fn utc_offsets() {
        assert_eq!(parse_utc_offset("+02:00"), Ok(2 * HOUR_MS));
        assert_eq!(parse_utc_offset("-05:30"), Ok(-(5 * HOUR_MS + 30 * 60_000)));
        assert_eq!(parse_utc_offset("+2"), Ok(2 * HOUR_MS));
        assert_eq!(parse_utc_offset("Z"), Ok(0));
        assert_eq!(parse_utc_offset("+14:00"), Ok(14 * HOUR_MS));
        for bad in ["2", "+15:00", "-12:30", "+01:60", "+a", ""] {
            assert!(parse_utc_offset(bad).is_err(), "{bad}");
        }
    }
}
