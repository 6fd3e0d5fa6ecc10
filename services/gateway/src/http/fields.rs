//! What the HTTP ingest protocols share: numbers, times and the checks that make a fix; a
//! value that cannot become one is an `Invalid` (field: a parameter name or a JSON path).

use trackmesh_shared::domain::{DeviceId, Invalid};

/// How much of a client's input an error message repeats.
const ECHO_CHARS: usize = 40;

/// `input` quoted for an error message: escaped (so the message stays one line) and cut to
/// 40 characters (so a megabyte of junk is not reflected back).
pub fn quoted(input: &str) -> String {
    let mut chars = input.chars();
    let head: String = chars.by_ref().take(ECHO_CHARS).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{head:?}{more}")
}

/// `value` for an error message: short even when huge (`1e300`, not 301 digits).
pub fn show(value: f64) -> String {
    if value.abs() < 1e15 {
        value.to_string()
    } else {
        format!("{value:e}")
    }
}

/// A decimal number as apps write it in parameters (`12`, `-3.5`, `1e3`), finite.
pub fn number(field: &str, text: &str) -> Result<f64, Invalid> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| Invalid::new(field, format!("not a number ({})", quoted(text))))?;
    finite(field, value)
}

/// Refuses NaN and infinities, which parameters (`lat=NaN`) can spell but no fix can hold.
pub fn finite(field: &str, value: f64) -> Result<f64, Invalid> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(Invalid::new(field, "not a finite number"))
    }
}

pub fn latitude(field: &str, value: f64) -> Result<f64, Invalid> {
    if (-90.0..=90.0).contains(&value) {
        Ok(value)
    } else {
        Err(Invalid::new(
            field,
            format!("{} out of range, allowed -90..=90", show(value)),
        ))
    }
}

pub fn longitude(field: &str, value: f64) -> Result<f64, Invalid> {
    if (-180.0..=180.0).contains(&value) {
        Ok(value)
    } else {
        Err(Invalid::new(
            field,
            format!("{} out of range, allowed -180..=180", show(value)),
        ))
    }
}

/// A finite value for one of the fix's `float` fields: it must not overflow to infinity.
pub fn to_f32(field: &str, value: f64) -> Result<f32, Invalid> {
    let narrow = value as f32;
    if narrow.is_finite() {
        Ok(narrow)
    } else {
        Err(Invalid::new(
            field,
            format!("{} out of range for a 32-bit float", show(value)),
        ))
    }
}

pub fn accuracy(field: &str, value: f64) -> Result<f32, Invalid> {
    if value < 0.0 {
        return Err(Invalid::new(field, format!("{} is negative", show(value))));
    }
    to_f32(field, value)
}

/// Knots (OsmAnd's `speed`) in metres per second: 1 kn = 1852 m/h exactly.
pub fn knots_to_mps(knots: f64) -> f64 {
    knots * 1852.0 / 3600.0
}

/// km/h (OwnTracks' `vel`) in metres per second.
pub fn kmh_to_mps(kmh: f64) -> f64 {
    kmh / 3.6
}

/// A device id by the shared rules (`DeviceId`), refused as `field`.
pub fn device(field: &str, id: &str) -> Result<String, Invalid> {
    DeviceId::check(id).map_err(|rule| {
        if id.is_empty() {
            Invalid::new(field, rule)
        } else {
            Invalid::new(field, format!("{rule} ({})", quoted(id)))
        }
    })?;
    Ok(id.to_owned())
}

/// 9999-12-31T23:59:59.999Z: the last instant the date forms can spell; fixes before 1970 are
/// refused too, so every time fits `time_ms` and none is a sentinel like `0001-01-01`.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// `ms` if it is a time from 1970 to 9999, else a refusal quoting `text`.
pub fn in_time_range(field: &str, text: &str, ms: i64) -> Result<i64, Invalid> {
    if (0..=MAX_TIME_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(Invalid::new(
            field,
            format!(
                "out of range, allowed 1970-01-01 to 9999-12-31 ({})",
                quoted(text)
            ),
        ))
    }
}

/// A fix time in any form the OsmAnd protocol allows: Unix seconds or milliseconds (decimal,
/// a magnitude below 10^11 is seconds, fractions allowed), ISO 8601 with a zone, or
/// `yyyy-MM-dd HH:mm:ss` in UTC. Sub-millisecond digits are dropped, as Java's `Date` does.
pub fn timestamp(field: &str, text: &str) -> Result<i64, Invalid> {
    let text = text.trim();
    match epoch_decimal(text) {
        Some(Ok(ms)) => in_time_range(field, text, ms),
        Some(Err(())) => in_time_range(field, text, -1),
        None => date_time(field, text),
    }
}

/// `-?digits(.digits)?`: the sign, the integer part (None when it overflows) and the fraction digits.
fn decimal(text: &str) -> Option<(bool, i64, &str)> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (rest.contains('.') && frac.is_empty()) {
        return None;
    }
    // An integer part past i64 is some nonsense time; saturating keeps it out of range.
    Some((negative, int.parse().unwrap_or(i64::MAX), frac))
}

/// The first three fraction digits as milliseconds; later ones are dropped.
fn frac_ms(frac: &str) -> i64 {
    frac.bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0, |ms, digit| ms * 10 + i64::from(digit - b'0'))
}

/// Some(ms) when `text` is a decimal Unix time, Some(Err) when it is one out of range, None
/// when it is not a number at all (then it may be a date).
fn epoch_decimal(text: &str) -> Option<Result<i64, ()>> {
    let (negative, int, frac) = decimal(text)?;
    let ms = if int < 100_000_000_000 {
        int * 1000 + frac_ms(frac)
    } else {
        int
    };
    Some(if negative { Err(()) } else { Ok(ms) })
}

/// Days from 1970-01-01 to the proleptic Gregorian date y-m-d (H. Hinnant's days_from_civil).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// ISO 8601 (`2021-01-01T00:00:00Z`, a fraction, `+02:00`, `+0200` or `+02`) or
/// `yyyy-MM-dd HH:mm:ss[.fff]` in UTC.
fn date_time(field: &str, text: &str) -> Result<i64, Invalid> {
    let not_a_time = || {
        Invalid::new(
            field,
            format!(
                "not a time: Unix s or ms, ISO 8601 or yyyy-MM-dd HH:mm:ss ({})",
                quoted(text)
            ),
        )
    };
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let at = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(at(4, b"-") && at(7, b"-") && at(10, b"Tt ") && at(13, b":") && at(16, b":")) {
        return Err(not_a_time());
    }
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return Err(not_a_time());
    };
    let year = i64::from(year);
    let mut pos = 19;
    let mut ms = 0;
    if at(pos, b".,") {
        let digits = b[pos + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(not_a_time());
        }
        ms = frac_ms(&text[pos + 1..pos + 1 + digits]);
        pos += 1 + digits;
    }
    let zone = &b[pos..];
    let offset_minutes: i64 = match zone {
        [] if b[10] == b' ' => 0,
        [] => {
            return Err(Invalid::new(
                field,
                format!(
                    "ISO 8601 time without a zone, add Z or an offset like +02:00 ({})",
                    quoted(text)
                ),
            ));
        }
        [b'Z' | b'z'] => 0,
        // A `+` in an unencoded query string arrives as a space.
        [sign @ (b'+' | b'-' | b' '), ..] => {
            let hours = num(pos + 1, 2);
            let minutes = match zone.len() {
                3 => Some(0),
                5 => num(pos + 3, 2),
                6 if zone[3] == b':' => num(pos + 4, 2),
                _ => None,
            };
            match (hours, minutes) {
                (Some(h), Some(m)) if h <= 18 && m <= 59 => {
                    let minutes = i64::from(h * 60 + m);
                    if *sign == b'-' { -minutes } else { minutes }
                }
                _ => return Err(not_a_time()),
            }
        }
        _ => return Err(not_a_time()),
    };
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(Invalid::new(
            field,
            format!("not a calendar date and time ({})", quoted(text)),
        ));
    }
    let seconds = days_from_civil(year, month, day) * 86_400
        + i64::from(hour * 3600 + minute * 60 + second)
        - offset_minutes * 60;
    in_time_range(field, text, seconds * 1000 + ms)
}

/// JSON helpers shared by the JSON protocols.
pub mod json {
    use serde_json::{Map, Value};

    use super::{Invalid, finite};

    pub fn parse(body: &[u8]) -> Result<Value, Invalid> {
        serde_json::from_slice(body).map_err(|e| Invalid::new("body", format!("not JSON: {e}")))
    }

    pub fn object<'a>(field: &str, value: &'a Value) -> Result<&'a Map<String, Value>, Invalid> {
        value
            .as_object()
            .ok_or_else(|| Invalid::new(field, "expected a JSON object"))
    }

    /// A member that may be absent; `null` counts as absent, as the tracking apps write it.
    pub fn member<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
        object.get(name).filter(|value| !value.is_null())
    }

    pub fn number(field: &str, value: &Value) -> Result<f64, Invalid> {
        match value.as_f64() {
            Some(number) if value.is_number() => finite(field, number),
            _ => Err(Invalid::new(field, "expected a number")),
        }
    }

    pub fn optional_number(
        object: &Map<String, Value>,
        name: &str,
        field: &str,
    ) -> Result<Option<f64>, Invalid> {
        member(object, name)
            .map(|value| number(field, value))
            .transpose()
    }

    pub fn required_number(
        object: &Map<String, Value>,
        name: &str,
        field: &str,
    ) -> Result<f64, Invalid> {
        let value = member(object, name).ok_or_else(|| Invalid::new(field, "required"))?;
        number(field, value)
    }

    pub fn string<'a>(field: &str, value: &'a Value) -> Result<&'a str, Invalid> {
        value
            .as_str()
            .ok_or_else(|| Invalid::new(field, "expected a string"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The date of a day number, the inverse of `days_from_civil` (H. Hinnant's civil_from_days),
    /// for rendering test times independently of the parser.
    pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (year, month, day)
    }

    /// `ms` as `yyyy-MM-ddTHH:mm:ss.fffZ`.
    pub(crate) fn iso(ms: i64) -> String {
        let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
        let (y, m, d) = civil_from_days(days);
        let s = rest / 1000;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            s / 3600,
            s / 60 % 60,
            s % 60,
            rest % 1000
        )
    }

    fn t(text: &str) -> Result<i64, String> {
        timestamp("timestamp", text).map_err(|e| e.to_string())
    }

    #[test]
    fn civil_days_agree_both_ways_and_with_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2021, 1, 1), 18_628);
        assert_eq!(days_from_civil(9999, 12, 31), 2_932_896);
        for days in (-800_000..3_000_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn every_timestamp_form() {
        let jan1 = Ok(1_609_459_200_000);
        assert_eq!(t("1609459200"), jan1);
        assert_eq!(t("1609459200000"), jan1);
        assert_eq!(t("1609459200.5"), Ok(1_609_459_200_500));
        assert_eq!(t("1609459200.1239"), Ok(1_609_459_200_123));
        assert_eq!(t("1609459200000.7"), jan1);
        // Just below 10^11 is seconds (year 5138), 10^11 itself is milliseconds (1973).
        assert_eq!(t("99999999999"), Ok(99_999_999_999_000));
        assert_eq!(t("100000000000"), Ok(100_000_000_000));
        assert_eq!(t("2021-01-01T00:00:00Z"), jan1);
        assert_eq!(t("2021-01-01t00:00:00z"), jan1);
        assert_eq!(t("2021-01-01T00:00:00.000Z"), jan1);
        assert_eq!(t("2025-06-15T13:45:12.862Z"), Ok(1_749_995_112_862));
        assert_eq!(t("2021-01-01T00:00:00.123456789Z"), Ok(1_609_459_200_123));
        assert_eq!(t("2021-01-01T02:00:00+02:00"), jan1);
        assert_eq!(t("2021-01-01T02:00:00+0200"), jan1);
        assert_eq!(t("2021-01-01T02:00:00+02"), jan1);
        assert_eq!(t("2020-12-31T22:30:00-01:30"), jan1);
        assert_eq!(
            t("2021-01-01T02:00:00 02:00"),
            jan1,
            "a + decoded to a space"
        );
        assert_eq!(t("2021-01-01 00:00:00"), jan1);
        assert_eq!(t("2021-01-01 00:00:00.25"), Ok(1_609_459_200_250));
        assert_eq!(t("2016-02-29 12:00:00"), Ok(1_456_747_200_000));
        assert_eq!(t(" 1609459200 "), jan1);
    }

    #[test]
    fn bad_timestamps_name_the_field_and_rule() {
        for bad in [
            "abc",
            "",
            "1.",
            ".5",
            "1e9",
            "2021-01-01",
            "2021-01-01T00:00",
            "2021-01-01T00:00:00+2",
            "2021-01-01T00:00:00+25:00",
            "2021-01-01T00:00:00.Z",
            "2021-01-01T00:00:00Zjunk",
            "2021-1-01 00:00:00",
        ] {
            let err = t(bad).unwrap_err();
            assert!(err.starts_with("timestamp: not a time"), "{bad}: {err}");
        }
        assert_eq!(
            t("2021-01-01T00:00:00").unwrap_err(),
            "timestamp: ISO 8601 time without a zone, add Z or an offset like +02:00 \
             (\"2021-01-01T00:00:00\")"
        );
        for bad in [
            "2021-02-29 00:00:00",
            "2021-13-01 00:00:00",
            "2021-01-01 24:00:00",
        ] {
            let err = t(bad).unwrap_err();
            assert!(err.starts_with("timestamp: not a calendar date"), "{err}");
        }
        for bad in ["-1", "1969-12-31T23:59:59Z", "99999999999999999999999"] {
            let err = t(bad).unwrap_err();
            assert!(err.starts_with("timestamp: out of range"), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_echo_at_most_forty_characters_on_one_line() {
        let err = number("lat", &format!("x\n{}", "y".repeat(1000))).unwrap_err();
        let text = err.to_string();
        assert_eq!(text.lines().count(), 1);
        assert!(text.len() < 80, "{text}");
        assert_eq!(
            number("lat", "abc").unwrap_err().to_string(),
            r#"lat: not a number ("abc")"#
        );
    }

    #[test]
    fn numbers_ranges_and_units() {
        assert_eq!(number("lat", "-3.5"), Ok(-3.5));
        assert!(number("lat", "NaN").is_err());
        assert!(number("lat", "inf").is_err());
        assert_eq!(latitude("lat", 90.0), Ok(90.0));
        assert!(latitude("lat", 90.000001).is_err());
        assert_eq!(longitude("lon", -180.0), Ok(-180.0));
        assert!(longitude("lon", 180.5).is_err());
        assert!(to_f32("altitude", 1e39).is_err());
        assert_eq!(accuracy("accuracy", 0.0), Ok(0.0));
        assert!(accuracy("accuracy", -1.0).is_err());
        assert_eq!(knots_to_mps(3600.0), 1852.0);
        assert_eq!(kmh_to_mps(36.0), 10.0);
    }
}
