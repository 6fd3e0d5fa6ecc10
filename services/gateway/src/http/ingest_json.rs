//! `POST /v1/ingest`: the `IngestRequest` in proto3 JSON, and the `IngestResponse` back.
//!
//! The proto3 JSON mapping: field names in lowerCamelCase or as in the .proto, `null` for the
//! default value, 64-bit integers as numbers or decimal strings, floats as numbers or the
//! strings "NaN", "Infinity", "-Infinity" (or a decimal string), and unknown fields refused.
//! Only shape and type errors are refused here (400, naming the JSON path): values are judged
//! by refinement exactly as for gRPC (an out-of-range latitude is an INVALID verdict).
//! Written over `serde_json::Value` rather than derived, so every error names its path.

use serde_json::{Map, Value, json};
use trackmesh_proto::v1::{Fix, IngestRequest, IngestResponse, Verdict};
use trackmesh_shared::domain::Invalid;

use super::fields::{quoted, show};

/// The request of a `/v1/ingest` body.
pub fn parse_request(body: &[u8]) -> Result<IngestRequest, Invalid> {
    let root = super::fields::json::parse(body)?;
    let root = root
        .as_object()
        .ok_or_else(|| Invalid::new("body", "expected a JSON object"))?;
    let mut request = IngestRequest::default();
    for (name, value) in fields(root, "", &[("fixes", "fixes"), ("sequence", "sequence")])? {
        match name {
            "fixes" => match value {
                Value::Array(fixes) => {
                    request.fixes = fixes
                        .iter()
                        .enumerate()
                        .map(|(i, fix)| parse_fix(&format!("fixes[{i}]"), fix))
                        .collect::<Result<_, _>>()?;
                }
                _ => return Err(Invalid::new("fixes", "expected an array")),
            },
            _ => request.sequence = uint64("sequence", value)?,
        }
    }
    Ok(request)
}

/// The members of `object` by their canonical name, `null`s left out (the default value).
/// `names` pairs each JSON name (both spellings) with its canonical one; a field given under
/// both spellings, or a name not in `names`, is refused.
fn fields<'a>(
    object: &'a Map<String, Value>,
    path: &str,
    names: &[(&str, &'static str)],
) -> Result<Vec<(&'static str, &'a Value)>, Invalid> {
    let at = |name: &str| {
        if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    let mut found: Vec<(&'static str, &Value)> = Vec::with_capacity(object.len());
    for (name, value) in object {
        let Some(&(_, canonical)) = names.iter().find(|(json, _)| json == name) else {
            let field = if path.is_empty() { "body" } else { path };
            return Err(Invalid::new(
                field,
                format!("unknown field {}", quoted(name)),
            ));
        };
        if found.iter().any(|(seen, _)| *seen == canonical) {
            return Err(Invalid::new(
                at(name),
                "given twice (camelCase and snake_case)",
            ));
        }
        if !value.is_null() {
            found.push((canonical, value));
        }
    }
    Ok(found)
}

const FIX_FIELDS: &[(&str, &str)] = &[
    ("deviceId", "device_id"),
    ("device_id", "device_id"),
    ("timeMs", "time_ms"),
    ("time_ms", "time_ms"),
    ("lat", "lat"),
    ("lon", "lon"),
    ("accuracyM", "accuracy_m"),
    ("accuracy_m", "accuracy_m"),
    ("speedMps", "speed_mps"),
    ("speed_mps", "speed_mps"),
    ("headingDeg", "heading_deg"),
    ("heading_deg", "heading_deg"),
    ("altitudeM", "altitude_m"),
    ("altitude_m", "altitude_m"),
];

fn parse_fix(path: &str, value: &Value) -> Result<Fix, Invalid> {
    let object = value
        .as_object()
        .ok_or_else(|| Invalid::new(path, "expected a JSON object"))?;
    let mut fix = Fix::default();
    for (name, value) in fields(object, path, FIX_FIELDS)? {
        let field = format!("{path}.{name}");
        match name {
            "device_id" => {
                fix.device_id = value
                    .as_str()
                    .ok_or_else(|| Invalid::new(&field, "expected a string"))?
                    .to_owned();
            }
            "time_ms" => fix.time_ms = int64(&field, value)?,
            "lat" => fix.lat = double(&field, value)?,
            "lon" => fix.lon = double(&field, value)?,
            "accuracy_m" => fix.accuracy_m = Some(float(&field, value)?),
            "speed_mps" => fix.speed_mps = Some(float(&field, value)?),
            "heading_deg" => fix.heading_deg = Some(float(&field, value)?),
            _ => fix.altitude_m = Some(float(&field, value)?),
        }
    }
    Ok(fix)
}

const INTEGER: &str = "expected an integer (a number or a decimal string)";

/// An integral JSON number, or a decimal string, in `T`'s range.
fn integer<T: TryFrom<i128>>(field: &str, value: &Value) -> Result<T, Invalid> {
    let wide: i128 = match value {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i128::from(i),
            (_, Some(u), _) => i128::from(u),
            // 1.5e3 is an integer too; only below 2^53 is a double exact.
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => f as i128,
            _ => return Err(Invalid::new(field, INTEGER)),
        },
        Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Invalid::new(field, format!("{INTEGER} ({})", quoted(s))));
            }
            s.parse()
                .map_err(|_| Invalid::new(field, format!("out of range ({})", quoted(s))))?
        }
        _ => return Err(Invalid::new(field, INTEGER)),
    };
    T::try_from(wide).map_err(|_| Invalid::new(field, format!("{wide} out of range")))
}

fn int64(field: &str, value: &Value) -> Result<i64, Invalid> {
    integer(field, value)
}

fn uint64(field: &str, value: &Value) -> Result<u64, Invalid> {
    integer(field, value)
}

const NUMBER: &str = r#"expected a number (or "NaN", "Infinity", "-Infinity")"#;

/// A JSON number or its proto3 string forms. Non-finite values pass, as they do over gRPC,
/// where refinement answers them with INVALID.
fn double(field: &str, value: &Value) -> Result<f64, Invalid> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| Invalid::new(field, NUMBER)),
        Value::String(s) => match s.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            _ => match s.parse::<f64>() {
                Ok(number) if number.is_finite() => Ok(number),
                _ => Err(Invalid::new(field, format!("{NUMBER} ({})", quoted(s)))),
            },
        },
        _ => Err(Invalid::new(field, NUMBER)),
    }
}

/// A `float` field: a finite value beyond f32's range is an error, not an infinity.
fn float(field: &str, value: &Value) -> Result<f32, Invalid> {
    let wide = double(field, value)?;
    let narrow = wide as f32;
    if wide.is_finite() && !narrow.is_finite() {
        return Err(Invalid::new(
            field,
            format!("{} out of range for a 32-bit float", show(wide)),
        ));
    }
    Ok(narrow)
}

/// The response in proto3 JSON: lowerCamelCase names, 64-bit integers as strings, verdicts by
/// name. Every field is written, defaults too, so scripts can read `stored` without knowing
/// proto3's omission rule.
pub fn ingest_response_json(response: &IngestResponse) -> Value {
    let rejections: Vec<Value> = response
        .rejections
        .iter()
        .map(|rejection| {
            let verdict = match Verdict::try_from(rejection.verdict) {
                Ok(verdict) => json!(verdict.as_str_name()),
                // proto3 JSON writes an enum value this build does not know as its number.
                Err(_) => json!(rejection.verdict),
            };
            json!({"index": rejection.index, "verdict": verdict, "detail": rejection.detail})
        })
        .collect();
    json!({
        "accepted": response.accepted,
        "rejected": response.rejected,
        "rejections": rejections,
        "stored": response.stored,
        "learningOk": response.learning_ok,
        "replayed": response.replayed,
        "sequence": response.sequence.to_string(),
        "recovered": response.recovered,
    })
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::Rejection;

    use super::*;

    fn request(body: &str) -> Result<IngestRequest, String> {
        parse_request(body.as_bytes()).map_err(|e| e.to_string())
    }

    #[test]
    fn readme_example_and_both_name_forms() {
        // The grpcurl example of the README, and its lowerCamelCase twin.
        let want = IngestRequest {
            fixes: vec![Fix {
                device_id: "v1".into(),
                time_ms: 1_750_000_000_000,
                lat: 40.64,
                lon: -74.07,
                ..Fix::default()
            }],
            sequence: 0,
        };
        assert_eq!(
            request(
                r#"{"fixes":[{"device_id":"v1","time_ms":1750000000000,"lat":40.64,"lon":-74.07}]}"#
            ),
            Ok(want.clone())
        );
        assert_eq!(
            request(
                r#"{"fixes":[{"deviceId":"v1","timeMs":"1750000000000","lat":40.64,"lon":-74.07}]}"#
            ),
            Ok(want)
        );
    }

    #[test]
    fn every_field_and_proto3_forms() {
        let got = request(
            r#"{"sequence":"18446744073709551615","fixes":[
                {"deviceId":"a","timeMs":1.5e3,"lat":"1.25","lon":-2,"accuracyM":5,"speedMps":"NaN",
                 "headingDeg":"Infinity","altitudeM":"-Infinity"},
                {"device_id":"b","time_ms":"-7","lat":100,"lon":500,"accuracy_m":-1,"speed_mps":2.5,
                 "heading_deg":90,"altitude_m":null},
                {}
            ]}"#,
        )
        .unwrap();
        assert_eq!(got.sequence, u64::MAX);
        let a = &got.fixes[0];
        assert_eq!(
            (a.device_id.as_str(), a.time_ms, a.lat, a.lon),
            ("a", 1500, 1.25, -2.0)
        );
        assert_eq!(a.accuracy_m, Some(5.0));
        assert!(a.speed_mps.is_some_and(f32::is_nan));
        assert_eq!(a.heading_deg, Some(f32::INFINITY));
        assert_eq!(a.altitude_m, Some(f32::NEG_INFINITY));
        // Values refinement judges (INVALID) pass: JSON mirrors gRPC.
        assert_eq!(
            got.fixes[1],
            Fix {
                device_id: "b".into(),
                time_ms: -7,
                lat: 100.0,
                lon: 500.0,
                accuracy_m: Some(-1.0),
                speed_mps: Some(2.5),
                heading_deg: Some(90.0),
                altitude_m: None,
            }
        );
        assert_eq!(got.fixes[2], Fix::default());
        assert_eq!(request("{}"), Ok(IngestRequest::default()));
        assert_eq!(request(r#"{"fixes":null}"#), Ok(IngestRequest::default()));
    }

    #[test]
    fn errors_name_the_json_path() {
        for (body, err) in [
            ("[]", "body: expected a JSON object"),
            (
                "{",
                "body: not JSON: EOF while parsing an object at line 1 column 1",
            ),
            (r#"{"fixes":{}}"#, "fixes: expected an array"),
            (r#"{"fixes":[1]}"#, "fixes[0]: expected a JSON object"),
            (r#"{"fix":[]}"#, r#"body: unknown field "fix""#),
            (
                r#"{"fixes":[{},{"lat":1,"speed":3}]}"#,
                r#"fixes[1]: unknown field "speed""#,
            ),
            (
                r#"{"fixes":[{},{},{},{"lat":"abc"}]}"#,
                r#"fixes[3].lat: expected a number (or "NaN", "Infinity", "-Infinity") ("abc")"#,
            ),
            (
                r#"{"fixes":[{"lat":true}]}"#,
                r#"fixes[0].lat: expected a number (or "NaN", "Infinity", "-Infinity")"#,
            ),
            (
                r#"{"fixes":[{"lon":"inf"}]}"#,
                r#"fixes[0].lon: expected a number (or "NaN", "Infinity", "-Infinity") ("inf")"#,
            ),
            (
                r#"{"fixes":[{"deviceId":7}]}"#,
                "fixes[0].device_id: expected a string",
            ),
            (
                r#"{"fixes":[{"deviceId":"a","device_id":"b"}]}"#,
                "fixes[0].device_id: given twice (camelCase and snake_case)",
            ),
            (
                r#"{"fixes":[{"timeMs":1.5}]}"#,
                "fixes[0].time_ms: expected an integer (a number or a decimal string)",
            ),
            (
                r#"{"fixes":[{"timeMs":"1e3"}]}"#,
                r#"fixes[0].time_ms: expected an integer (a number or a decimal string) ("1e3")"#,
            ),
            (
                r#"{"fixes":[{"timeMs":"9223372036854775808"}]}"#,
                "fixes[0].time_ms: 9223372036854775808 out of range",
            ),
            (
                r#"{"fixes":[{"timeMs":18446744073709551615}]}"#,
                "fixes[0].time_ms: 18446744073709551615 out of range",
            ),
            (
                r#"{"fixes":[{"accuracyM":1e39}]}"#,
                "fixes[0].accuracy_m: 1e39 out of range for a 32-bit float",
            ),
            (r#"{"sequence":-1}"#, "sequence: -1 out of range"),
            (
                r#"{"sequence":"x"}"#,
                r#"sequence: expected an integer (a number or a decimal string) ("x")"#,
            ),
        ] {
            assert_eq!(request(body), Err(err.to_string()), "{body}");
        }
    }

    #[test]
    fn response_in_proto3_json() {
        let response = IngestResponse {
            accepted: 2,
            rejected: 2,
            rejections: vec![
                Rejection {
                    index: 1,
                    verdict: Verdict::Speed as i32,
                    detail: "412 km/h".into(),
                },
                Rejection {
                    index: 3,
                    verdict: 99,
                    detail: String::new(),
                },
            ],
            stored: true,
            learning_ok: false,
            replayed: 1,
            sequence: 9_007_199_254_740_993,
            recovered: 0,
        };
        assert_eq!(
            ingest_response_json(&response),
            json!({
                "accepted": 2, "rejected": 2,
                "rejections": [
                    {"index": 1, "verdict": "SPEED", "detail": "412 km/h"},
                    {"index": 3, "verdict": 99, "detail": ""}
                ],
                "stored": true, "learningOk": false, "replayed": 1,
                "sequence": "9007199254740993", "recovered": 0
            })
        );
    }
}
