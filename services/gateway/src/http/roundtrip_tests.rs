//! One fix, rendered as each HTTP protocol writes it, parses back to the same fix.

use proptest::prelude::*;
use serde_json::json;
use trackmesh_proto::v1::Fix;

use super::{fields::tests::iso, ingest_json, osmand, owntracks};

/// Every byte but letters and digits as %XX, as a careful client encodes a query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn fixes() -> impl Strategy<Value = Fix> {
    (
        "[^\\p{Cc}]{1,30}",
        // From 10^11 ms (1973): smaller numbers are seconds in the OsmAnd protocol.
        100_000_000_000..=4_102_444_800_000i64,
        -90.0..=90.0f64,
        -180.0..=180.0f64,
        proptest::option::of(0.0..10_000.0f32),
        proptest::option::of(0.0..150.0f32),
        proptest::option::of(0.0..360.0f32),
        proptest::option::of(-500.0..9_000.0f32),
    )
        .prop_map(
            |(device_id, time_ms, lat, lon, accuracy_m, speed_mps, heading_deg, altitude_m)| Fix {
                device_id,
                time_ms,
                lat,
                lon,
                accuracy_m,
                speed_mps,
                heading_deg,
                altitude_m,
            },
        )
}

/// Equal, except the speed, which went through knots or km/h in a decimal text and back:
/// within about one f32 step.
fn same_fix(got: &Fix, want: &Fix) -> Result<(), TestCaseError> {
    let (mut got, mut want) = (got.clone(), want.clone());
    match (got.speed_mps.take(), want.speed_mps.take()) {
        (Some(g), Some(w)) => prop_assert!(
            (g - w).abs() <= f32::EPSILON * w.max(1.0),
            "speed {g} != {w}"
        ),
        (g, w) => prop_assert_eq!(g, w),
    }
    prop_assert_eq!(got, want);
    Ok(())
}

proptest! {
    #[test]
    fn a_fix_survives_every_protocol(fix in fixes(), form in 0..3u8) {
        let exact = |v: Option<f32>| v.map(f64::from);

        // OsmAnd query: the time in one of its forms, the speed in knots.
        let time = match form {
            0 => fix.time_ms.to_string(),
            1 => format!("{}.{:03}", fix.time_ms / 1000, fix.time_ms % 1000),
            _ => iso(fix.time_ms),
        };
        let mut query = format!(
            "id={}&lat={}&lon={}&timestamp={}",
            encode(&fix.device_id), fix.lat, fix.lon, encode(&time)
        );
        let optional = [
            ("accuracy", exact(fix.accuracy_m)),
            ("speed", exact(fix.speed_mps).map(|mps| mps * 3600.0 / 1852.0)),
            ("bearing", exact(fix.heading_deg)),
            ("altitude", exact(fix.altitude_m)),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                query.push_str(&format!("&{name}={value}"));
            }
        }
        let pairs = osmand::decode_form(query.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = osmand::parse_params(pairs, 0).map_err(|e| TestCaseError::fail(e.to_string()))?;
        same_fix(&got, &fix)?;

        // OsmAnd JSON (Traccar Client 9+): m/s, ISO time.
        let body = json!({
            "device_id": fix.device_id,
            "location": {
                "timestamp": iso(fix.time_ms),
                "coords": {
                    "latitude": fix.lat, "longitude": fix.lon,
                    "accuracy": exact(fix.accuracy_m), "speed": exact(fix.speed_mps),
                    "heading": exact(fix.heading_deg), "altitude": exact(fix.altitude_m),
                },
                "battery": {"level": 0.5},
            },
        });
        let got = osmand::parse_json(body.to_string().as_bytes(), 0).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&got, &fix);

        // OwnTracks: km/h, Unix seconds with the milliseconds as a fraction.
        let tst: serde_json::Value = serde_json::from_str(&format!("{}.{:03}", fix.time_ms / 1000, fix.time_ms % 1000)).unwrap();
        let mut body = json!({
            "_type": "location", "tid": fix.device_id, "tst": tst, "lat": fix.lat, "lon": fix.lon,
            "batt": 80,
        });
        let optional = [
            ("acc", exact(fix.accuracy_m)),
            ("vel", exact(fix.speed_mps).map(|mps| mps * 3.6)),
            ("cog", exact(fix.heading_deg)),
            ("alt", exact(fix.altitude_m)),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                body[name] = json!(value);
            }
        }
        let got = owntracks::parse(body.to_string().as_bytes(), None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(got.is_some());
        same_fix(&got.unwrap_or_default(), &fix)?;

        // proto3 JSON of /v1/ingest: exact, the int64 as a string or a number.
        let time_ms = if form == 0 { json!(fix.time_ms.to_string()) } else { json!(fix.time_ms) };
        let body = json!({"fixes": [{
            "deviceId": fix.device_id, "timeMs": time_ms, "lat": fix.lat, "lon": fix.lon,
            "accuracyM": fix.accuracy_m, "speedMps": fix.speed_mps,
            "headingDeg": fix.heading_deg, "altitudeM": fix.altitude_m,
        }]});
        let got = ingest_json::parse_request(body.to_string().as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.fixes, vec![fix]);
    }
}
