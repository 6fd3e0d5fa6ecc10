//! OwnTracks HTTP mode (`POST /owntracks`): one JSON message per request; `_type: "location"`
//! carries a fix, every other `_type` is acknowledged and ignored.
//!
//! Fields (owntracks.org/booklet/tech/json): `lat`, `lon` (degrees), `tst` (Unix seconds of the
//! fix, required), `acc` and `alt` (m), `vel` (km/h), `cog` (degrees), `batt` (%), `tid` (the
//! tracker id, required in HTTP mode). The apps leave out `acc`, `alt`, `cog` and `vel` when
//! they are zero, so an absent one is unknown, not zero.

use serde_json::Value;
use trackmesh_proto::v1::Fix;
use trackmesh_shared::domain::Invalid;

use super::fields::{self, json};

/// The fix of an OwnTracks message, `None` for a message that is not a location.
/// `user_device` comes from the `X-Limit-U` and `X-Limit-D` headers: the device id is then
/// `<user>/<device>` (the shared id rules allow `/`), else the message's `tid`.
pub fn parse(body: &[u8], user_device: Option<(&str, &str)>) -> Result<Option<Fix>, Invalid> {
    let root = json::parse(body)?;
    let root = json::object("body", &root)?;
    let kind = json::member(root, "_type").ok_or_else(|| Invalid::new("_type", "required"))?;
    match json::string("_type", kind)? {
        "location" => {}
        // Acknowledging these would lose every location silently: the app counts any answer
        // as delivered, but at least shows this one in its log.
        "encrypted" => {
            return Err(Invalid::new(
                "_type",
                "encrypted payloads are not supported, turn off encryption in the app",
            ));
        }
        _ => return Ok(None),
    }
    let device_id = match user_device {
        Some((user, device)) => fields::device("X-Limit-U/X-Limit-D", &format!("{user}/{device}"))?,
        None => {
            let tid = json::member(root, "tid").ok_or_else(|| {
                Invalid::new("tid", "required without X-Limit-U and X-Limit-D headers")
            })?;
            fields::device("tid", json::string("tid", tid)?)?
        }
    };
    let lat = json::required_number(root, "lat", "lat")?;
    let lon = json::required_number(root, "lon", "lon")?;
    let tst = json::member(root, "tst").ok_or_else(|| Invalid::new("tst", "required"))?;
    let time_ms = match tst {
        Value::Number(seconds) => {
            // Whole seconds exactly; a fraction (not in the spec) to the nearest millisecond,
            // which a double still resolves at today's times.
            let ms = match (seconds.as_i64(), seconds.as_f64()) {
                (Some(whole), _) => whole.checked_mul(1000).unwrap_or(-1),
                (None, Some(s)) if s.abs() < 1e15 => (s * 1000.0).round() as i64,
                _ => -1,
            };
            fields::in_time_range("tst", &seconds.to_string(), ms)?
        }
        _ => return Err(Invalid::new("tst", "expected a number")),
    };
    let float = |name: &str, convert: fn(f64) -> f64| {
        json::optional_number(root, name, name)?
            .map(|value| fields::to_f32(name, convert(value)))
            .transpose()
    };
    let fix = Fix {
        device_id,
        time_ms,
        lat: fields::latitude("lat", lat)?,
        lon: fields::longitude("lon", lon)?,
        accuracy_m: json::optional_number(root, "acc", "acc")?
            .map(|m| fields::accuracy("acc", m))
            .transpose()?,
        speed_mps: float("vel", fields::kmh_to_mps)?,
        heading_deg: float("cog", |deg| deg)?,
        altitude_m: float("alt", |m| m)?,
    };
    // Checked, then dropped: the fix has no place for it.
    json::optional_number(root, "batt", "batt")?;
    Ok(Some(fix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(body: &str, user_device: Option<(&str, &str)>) -> Result<Option<Fix>, String> {
        parse(body.as_bytes(), user_device).map_err(|e| e.to_string())
    }

    #[test]
    fn documentation_example() {
        // The location message of the OwnTracks poster (its placeholders filled in): vel 54 km/h
        // is 15 m/s exactly.
        let body = r#"{"_type":"location","batt":87,"cog":270,"lat":48.858330,"lon":2.295130,
            "acc":75,"rad":200,"t":"u","tid":"YY","tst":1376715317,"alt":13,"vacc":10,"vel":54,
            "p":101.3}"#;
        let want = Fix {
            device_id: "YY".into(),
            time_ms: 1_376_715_317_000,
            lat: 48.85833,
            lon: 2.29513,
            accuracy_m: Some(75.0),
            speed_mps: Some(15.0),
            heading_deg: Some(270.0),
            altitude_m: Some(13.0),
        };
        assert_eq!(location(body, None), Ok(Some(want.clone())));
        assert_eq!(
            location(body, Some(("jane", "phone"))),
            Ok(Some(Fix {
                device_id: "jane/phone".into(),
                ..want
            }))
        );
        // The booklet's HTTP example: only what the PHP script reads.
        assert_eq!(
            location(
                r#"{"_type":"location","tid":"JJ","lat":48.860430,"lon":2.294010,"tst":1455959989}"#,
                None
            ),
            Ok(Some(Fix {
                device_id: "JJ".into(),
                time_ms: 1_455_959_989_000,
                lat: 48.86043,
                lon: 2.29401,
                ..Fix::default()
            }))
        );
    }

    #[test]
    fn kmh_are_converted_exactly() {
        for kmh in [1.0, 36.0, 54.0, 100.0, 11.844000000000001, 0.5] {
            let body =
                format!(r#"{{"_type":"location","tid":"a","lat":1,"lon":2,"tst":1,"vel":{kmh}}}"#);
            let got = location(&body, None).map(|f| f.and_then(|f| f.speed_mps));
            assert_eq!(got, Ok(Some((kmh / 3.6) as f32)), "{kmh}");
        }
    }

    #[test]
    fn other_types_are_ignored() {
        for body in [
            r#"{"_type":"lwt","tst":1}"#,
            r#"{"_type":"transition","lat":1,"lon":2,"tst":1,"acc":5,"event":"enter"}"#,
            r#"{"_type":"waypoint","desc":"home"}"#,
            r#"{"_type":"status"}"#,
            r#"{"_type":"card","name":"x"}"#,
        ] {
            assert_eq!(location(body, None), Ok(None), "{body}");
        }
    }

    #[test]
    fn refusals_name_the_field_and_rule() {
        let loc = |extra: &str| {
            format!(r#"{{"_type":"location","tid":"a","lat":1,"lon":2,"tst":1609459200{extra}}}"#)
        };
        for (body, err) in [
            ("[]".to_string(), "body: expected a JSON object"),
            (
                "nope".into(),
                "body: not JSON: expected ident at line 1 column 2",
            ),
            ("{}".into(), "_type: required"),
            (r#"{"_type":1}"#.into(), "_type: expected a string"),
            (
                r#"{"_type":"encrypted","data":"xyz"}"#.into(),
                "_type: encrypted payloads are not supported, turn off encryption in the app",
            ),
            (
                r#"{"_type":"location","lat":1,"lon":2,"tst":1}"#.into(),
                "tid: required without X-Limit-U and X-Limit-D headers",
            ),
            (
                r#"{"_type":"location","tid":7,"lat":1,"lon":2,"tst":1}"#.into(),
                "tid: expected a string",
            ),
            (
                r#"{"_type":"location","tid":"a","lon":2,"tst":1}"#.into(),
                "lat: required",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":1,"tst":1}"#.into(),
                "lon: required",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":1,"lon":2}"#.into(),
                "tst: required",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":1,"lon":2,"tst":"1"}"#.into(),
                "tst: expected a number",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":1,"lon":2,"tst":-5}"#.into(),
                r#"tst: out of range, allowed 1970-01-01 to 9999-12-31 ("-5")"#,
            ),
            (
                r#"{"_type":"location","tid":"a","lat":"1","lon":2,"tst":1}"#.into(),
                "lat: expected a number",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":91,"lon":2,"tst":1}"#.into(),
                "lat: 91 out of range, allowed -90..=90",
            ),
            (
                r#"{"_type":"location","tid":"a","lat":1,"lon":200,"tst":1}"#.into(),
                "lon: 200 out of range, allowed -180..=180",
            ),
            (loc(r#","acc":-5"#), "acc: -5 is negative"),
            (loc(r#","vel":"fast""#), "vel: expected a number"),
            (loc(r#","cog":true"#), "cog: expected a number"),
            (
                loc(r#","alt":1e300"#),
                "alt: 1e300 out of range for a 32-bit float",
            ),
            (loc(r#","batt":"full""#), "batt: expected a number"),
        ] {
            assert_eq!(location(&body, None), Err(err.to_string()), "{body}");
        }
        assert_eq!(
            location(&loc(""), Some(("jane", "ph\none"))),
            Err(r#"X-Limit-U/X-Limit-D: contains control characters ("jane/ph\none")"#.into())
        );
    }

    #[test]
    fn nulls_are_absent_and_fractional_tst_keeps_milliseconds() {
        assert_eq!(
            location(
                r#"{"_type":"location","tid":"a","lat":1,"lon":2,"tst":1609459200.25,"vel":null,"acc":null}"#,
                None
            )
            .map(|f| f.map(|f| (f.time_ms, f.speed_mps, f.accuracy_m))),
            Ok(Some((1_609_459_200_250, None, None)))
        );
    }
}
