//! Times on the command line and in CSV files: RFC 3339 / ISO-8601 or Unix epoch milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// Parses a time into Unix epoch milliseconds (UTC).
///
/// Accepted: epoch milliseconds (`1593475200000`), RFC 3339 with `Z` or an
/// offset (`2020-06-30T00:00:00Z`, `2020-06-30T02:00:00+02:00`), the same
/// without a zone (taken as UTC, as in the raw AIS CSV), fractional seconds,
/// a space instead of `T`, and a plain date (`2020-06-30`, midnight UTC).
pub fn parse_ms(text: &str) -> anyhow::Result<i64> {
    let text = text.trim();
    if text.is_empty() {
        bail!("empty time");
    }
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let (local, offset_ms) = split_offset(text)?;
    let local = if local.len() == 10 {
        format!("{local}T00:00:00")
    } else {
        local.to_owned()
    };
    let time = humantime::parse_rfc3339_weak(&local)
        .with_context(|| format!("{text:?} is neither RFC 3339 nor epoch milliseconds"))?;
    Ok(system_time_ms(time) - offset_ms)
}

/// Splits a trailing `Z`, `+HH:MM` or `-HH:MM` off; returns the offset in milliseconds.
fn split_offset(text: &str) -> anyhow::Result<(&str, i64)> {
    if let Some(local) = text.strip_suffix(['Z', 'z']) {
        return Ok((local, 0));
    }
    // A zone offset only ever follows the time of day, i.e. after "YYYY-MM-DDTHH:MM".
    if text.len() > 16 && text.is_char_boundary(text.len() - 6) {
        let (local, zone) = text.split_at(text.len() - 6);
        let bytes = zone.as_bytes();
        if matches!(bytes[0], b'+' | b'-') && bytes[3] == b':' {
            let hours: i64 = zone[1..3].parse().context("zone offset hours")?;
            let minutes: i64 = zone[4..6].parse().context("zone offset minutes")?;
            let sign = if bytes[0] == b'-' { -1 } else { 1 };
            return Ok((local, sign * (hours * 3_600_000 + minutes * 60_000)));
        }
    }
    Ok((text, 0))
}

fn system_time_ms(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Now, in Unix epoch milliseconds.
pub fn now_ms() -> i64 {
    system_time_ms(SystemTime::now())
}

/// Formats epoch milliseconds as RFC 3339 UTC (`2020-06-30T00:00:00Z`, with
/// milliseconds only when there are any).
pub fn format_ms(ms: i64) -> String {
    // humantime formats years 1970 to 9999 only.
    const YEAR_10000_MS: i64 = 253_402_300_800_000;
    if !(0..YEAR_10000_MS).contains(&ms) {
        return ms.to_string();
    }
    let time = UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs());
    if ms % 1000 == 0 {
        humantime::format_rfc3339_seconds(time).to_string()
    } else {
        humantime::format_rfc3339_millis(time).to_string()
    }
}

/// A duration for humans: `3h 12m`, `45s`, `850ms`.
pub fn format_duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else if s > 0 {
        format!("{s}s")
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JUNE_30: i64 = 1_593_475_200_000; // 2020-06-30T00:00:00Z

    #[test]
    fn parses_the_forms_users_and_files_write() {
        assert_eq!(parse_ms("1593475200000").unwrap(), JUNE_30);
        assert_eq!(parse_ms("2020-06-30T00:00:00Z").unwrap(), JUNE_30);
        assert_eq!(
            parse_ms("2020-06-30T00:00:00").unwrap(),
            JUNE_30,
            "raw AIS: no zone = UTC"
        );
        assert_eq!(parse_ms("2020-06-30 00:00:00").unwrap(), JUNE_30);
        assert_eq!(parse_ms("2020-06-30").unwrap(), JUNE_30);
        assert_eq!(
            parse_ms("2020-06-30T00:00:01.250Z").unwrap(),
            JUNE_30 + 1250
        );
        assert_eq!(parse_ms("2020-06-30T02:00:00+02:00").unwrap(), JUNE_30);
        assert_eq!(parse_ms("2020-06-29T20:30:00-03:30").unwrap(), JUNE_30);
        assert_eq!(parse_ms(" 2020-06-30T00:00:00Z ").unwrap(), JUNE_30);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "yesterday",
            "2020-13-01T00:00:00Z",
            "2020-06-30T25:00:00Z",
        ] {
            assert!(parse_ms(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_ms(JUNE_30), "2020-06-30T00:00:00Z");
        assert_eq!(format_ms(JUNE_30 + 5), "2020-06-30T00:00:00.005Z");
        assert_eq!(parse_ms(&format_ms(JUNE_30 + 5)).unwrap(), JUNE_30 + 5);
        assert_eq!(format_ms(-1000), "-1000", "outside what humantime formats");
    }

    #[test]
    fn durations_for_humans() {
        assert_eq!(format_duration_ms(850), "850ms");
        assert_eq!(format_duration_ms(45_000), "45s");
        assert_eq!(format_duration_ms(125_000), "2m 05s");
        assert_eq!(format_duration_ms(3 * 3_600_000 + 12 * 60_000), "3h 12m");
    }
}
