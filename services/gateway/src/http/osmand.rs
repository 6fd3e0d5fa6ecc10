//! The OsmAnd / Traccar Client protocol (`/osmand/<token>`): one fix as query or form
//! parameters, or as the JSON body that Traccar Client sends since version 9.
//!
//! Protocol facts (Traccar's `OsmAndProtocolDecoder`): in parameters `speed` is in knots, in
//! JSON it is m/s, and there a negative `speed`, `heading` or battery `level` means "unknown";
//! without a `timestamp` the fix is taken as of now (the server's clock). Traccar picks JSON
//! when the Content-Type starts with `application/json`, else parameters (query, then form).
//!
//! Choices: unknown parameters are ignored, but a recognised one with a malformed value is
//! refused (even `batt` and `hdop`, which the fix does not keep), because a 400 naming it is
//! more useful to whoever configures the app than a silently stored half-truth. An empty value
//! counts as absent: apps fill URL templates with nothing for values they lack. A parameter
//! given twice (query and form body, or repeated) keeps its last value, as in Traccar.

use trackmesh_proto::v1::Fix;
use trackmesh_shared::domain::Invalid;

use super::fields::{self, json};

/// A query string or `application/x-www-form-urlencoded` body, decoded strictly: `+` is a
/// space, `%XX` a byte, and every name and value must be UTF-8 (a lossy decoding would store
/// U+FFFD in a device id), else a refusal naming the parameter.
pub fn decode_form(bytes: &[u8]) -> Result<Vec<(String, String)>, Invalid> {
    let mut pairs = Vec::new();
    for pair in bytes.split(|&b| b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &[][..]),
        };
        let name = String::from_utf8(percent_decode(name)).map_err(|bad| {
            let lossy = String::from_utf8_lossy(bad.as_bytes()).into_owned();
            Invalid::new(
                "parameter name",
                format!("not valid UTF-8 ({})", fields::quoted(&lossy)),
            )
        })?;
        let value = String::from_utf8(percent_decode(value))
            .map_err(|_| Invalid::new(field_name(&name), "not valid UTF-8"))?;
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// A parameter name as an error's field, cut short when a client sends a long one.
fn field_name(name: &str) -> String {
    if name.chars().count() <= 40 {
        name.to_owned()
    } else {
        fields::quoted(name)
    }
}

/// `+` as a space and `%XX` as its byte; a `%` without two hex digits stays as it is (as
/// browsers' URL parsers do).
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |at: usize| input.get(at).and_then(|&b| hex(b));
                match (digit(i + 1), digit(i + 2)) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// One parameter's text and the name it came under (`location` feeds both lat and lon).
struct Raw {
    field: &'static str,
    text: String,
}

/// The fix of a request's parameters (query and form body pairs, in order: later wins).
pub fn parse_params<I, K, V>(pairs: I, now_ms: i64) -> Result<Fix, Invalid>
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<str>,
    V: AsRef<str>,
{
    let (mut id, mut lat, mut lon, mut timestamp) = (None, None, None, None);
    let (mut speed, mut heading, mut altitude, mut accuracy) = (None, None, None, None);
    let (mut hdop, mut batt) = (None, None);
    for (name, value) in pairs {
        let text = value.as_ref();
        if text.is_empty() {
            continue;
        }
        let raw = |field| {
            Some(Raw {
                field,
                text: text.to_owned(),
            })
        };
        match name.as_ref() {
            "id" => id = raw("id"),
            "deviceid" => id = raw("deviceid"),
            "lat" => lat = raw("lat"),
            "lon" => lon = raw("lon"),
            "location" => {
                let (la, lo) = text.split_once(',').ok_or_else(|| {
                    Invalid::new(
                        "location",
                        format!("expected lat,lon ({})", fields::quoted(text)),
                    )
                })?;
                lat = Some(Raw {
                    field: "location",
                    text: la.to_owned(),
                });
                lon = Some(Raw {
                    field: "location",
                    text: lo.to_owned(),
                });
            }
            "timestamp" => timestamp = raw("timestamp"),
            "speed" => speed = raw("speed"),
            "bearing" => heading = raw("bearing"),
            "heading" => heading = raw("heading"),
            "altitude" => altitude = raw("altitude"),
            "accuracy" => accuracy = raw("accuracy"),
            "hdop" => hdop = raw("hdop"),
            "batt" => batt = raw("batt"),
            _ => {}
        }
    }

    let id = id.ok_or_else(|| Invalid::new("id", "required"))?;
    let device_id = fields::device(id.field, &id.text)?;
    let (Some(lat), Some(lon)) = (lat, lon) else {
        return Err(Invalid::new(
            "lat",
            "required, lat and lon (or location=lat,lon)",
        ));
    };
    let number = |raw: &Raw| fields::number(raw.field, &raw.text);
    let lat = fields::latitude(lat.field, number(&lat)?)?;
    let lon = fields::longitude(lon.field, number(&lon)?)?;
    let time_ms = match timestamp {
        Some(raw) => fields::timestamp(raw.field, &raw.text)?,
        None => now_ms,
    };
    let float = |raw: Option<Raw>, convert: fn(f64) -> f64| {
        raw.map(|raw| fields::to_f32(raw.field, convert(number(&raw)?)))
            .transpose()
    };
    let fix = Fix {
        device_id,
        time_ms,
        lat,
        lon,
        accuracy_m: accuracy
            .map(|raw| fields::accuracy(raw.field, number(&raw)?))
            .transpose()?,
        speed_mps: float(speed, fields::knots_to_mps)?,
        heading_deg: float(heading, |deg| deg)?,
        altitude_m: float(altitude, |m| m)?,
    };
    // Checked, then dropped: the fix has no place for them.
    for raw in [hdop, batt].iter().flatten() {
        number(raw)?;
    }
    Ok(fix)
}

/// The fix of Traccar Client's JSON body:
/// `{"device_id", "location": {"timestamp", "coords": {…}, "battery": {"level"}}}`.
pub fn parse_json(body: &[u8], now_ms: i64) -> Result<Fix, Invalid> {
    let root = json::parse(body)?;
    let root = json::object("body", &root)?;
    let id =
        json::member(root, "device_id").ok_or_else(|| Invalid::new("device_id", "required"))?;
    let device_id = fields::device("device_id", json::string("device_id", id)?)?;
    let location =
        json::member(root, "location").ok_or_else(|| Invalid::new("location", "required"))?;
    let location = json::object("location", location)?;
    let time_ms = match json::member(location, "timestamp") {
        Some(time) => fields::timestamp(
            "location.timestamp",
            json::string("location.timestamp", time)?,
        )?,
        None => now_ms,
    };
    let coords = json::member(location, "coords")
        .ok_or_else(|| Invalid::new("location.coords", "required"))?;
    let coords = json::object("location.coords", coords)?;
    let lat = json::required_number(coords, "latitude", "location.coords.latitude")?;
    let lon = json::required_number(coords, "longitude", "location.coords.longitude")?;
    // The SDK writes -1 for a speed or heading it does not know.
    let known = |name: &str, field: &str| -> Result<Option<f32>, Invalid> {
        match json::optional_number(coords, name, field)? {
            Some(value) if value >= 0.0 => fields::to_f32(field, value).map(Some),
            _ => Ok(None),
        }
    };
    let fix = Fix {
        device_id,
        time_ms,
        lat: fields::latitude("location.coords.latitude", lat)?,
        lon: fields::longitude("location.coords.longitude", lon)?,
        accuracy_m: json::optional_number(coords, "accuracy", "location.coords.accuracy")?
            .map(|m| fields::accuracy("location.coords.accuracy", m))
            .transpose()?,
        speed_mps: known("speed", "location.coords.speed")?,
        heading_deg: known("heading", "location.coords.heading")?,
        altitude_m: json::optional_number(coords, "altitude", "location.coords.altitude")?
            .map(|m| fields::to_f32("location.coords.altitude", m))
            .transpose()?,
    };
    // Checked, then dropped (0..1, or -1 for unknown): the fix has no place for it.
    if let Some(battery) = json::member(location, "battery") {
        let battery = json::object("location.battery", battery)?;
        json::optional_number(battery, "level", "location.battery.level")?;
    }
    Ok(fix)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn query(q: &str) -> Result<Fix, String> {
        let pairs = decode_form(q.as_bytes()).map_err(|e| e.to_string())?;
        parse_params(pairs, NOW).map_err(|e| e.to_string())
    }

    fn fix(device: &str, time_ms: i64, lat: f64, lon: f64) -> Fix {
        Fix {
            device_id: device.into(),
            time_ms,
            lat,
            lon,
            ..Fix::default()
        }
    }

    fn kn(knots: f64) -> Option<f32> {
        Some((knots * 1852.0 / 3600.0) as f32)
    }

    #[test]
    fn traccar_decoder_examples() {
        // The query examples of Traccar's OsmAndProtocolDecoderTest that carry a position.
        assert_eq!(
            query(
                "id=902064&lat=42.06288&lon=-88.23412&timestamp=2016-01-27T18%3A55%3A47Z&hdop=6.0&altitude=224.0&speed=0.0"
            ),
            Ok(Fix {
                altitude_m: Some(224.0),
                speed_mps: Some(0.0),
                ..fix("902064", 1_453_920_947_000, 42.06288, -88.23412)
            })
        );
        assert_eq!(
            query("id=902064&lat=42.06288&lon=-88.23412&timestamp=1442068686579&hdop=6.0&altitude=224.0&speed=0.0")
                .map(|f| f.time_ms),
            Ok(1_442_068_686_579)
        );
        assert_eq!(
            query(
                "lat=49.60688&lon=6.15788&timestamp=2014-06-04+09%3A10%3A11&altitude=384.7&speed=0.0&id=353861053849681"
            ),
            Ok(Fix {
                altitude_m: Some(384.7),
                speed_mps: Some(0.0),
                ..fix("353861053849681", 1_401_873_011_000, 49.60688, 6.15788)
            })
        );
        assert_eq!(
            query(
                "id=123456&timestamp=1377177267&lat=60.0&lon=30.0&speed=0.0&bearing=0.0&altitude=0&hdop=0.0"
            ),
            Ok(Fix {
                speed_mps: Some(0.0),
                heading_deg: Some(0.0),
                altitude_m: Some(0.0),
                ..fix("123456", 1_377_177_267_000, 60.0, 30.0)
            })
        );
        assert_eq!(
            query("id=123456&timestamp=1377177267&lat=60.0&lon=30.0"),
            Ok(fix("123456", 1_377_177_267_000, 60.0, 30.0))
        );
        assert_eq!(
            query(
                "lat=60.0&lon=30.0&speed=0.0&heading=0.0&vacc=0&hacc=0&altitude=0&deviceid=123456"
            ),
            Ok(Fix {
                speed_mps: Some(0.0),
                heading_deg: Some(0.0),
                altitude_m: Some(0.0),
                ..fix("123456", NOW, 60.0, 30.0)
            })
        );
        assert_eq!(
            query(
                "id=861001000719969&lat=41.666667&lon=-0.883333&altitude=350.059479&speed=0.000000&batt=87"
            ),
            Ok(Fix {
                altitude_m: Some(350.059_479_f64 as f32),
                speed_mps: Some(0.0),
                ..fix("861001000719969", NOW, 41.666667, -0.883333)
            })
        );
        assert_eq!(
            query("id=123456&timestamp=1377177267&location=60.0,30.0"),
            Ok(fix("123456", 1_377_177_267_000, 60.0, 30.0))
        );
        assert_eq!(
            query(
                "id=123456789012345&timestamp=1504763810&lat=40.7232948571&lon=-74.0061408571&bearing=7.19889788244&speed=40&ignition=true&rpm=933&fuel=24"
            ),
            Ok(Fix {
                heading_deg: Some(7.198_898),
                speed_mps: kn(40.0),
                ..fix(
                    "123456789012345",
                    1_504_763_810_000,
                    40.7232948571,
                    -74.0061408571
                )
            })
        );
        // Traccar keeps these without a position (cell towers, wifi) or answers 400 (no id);
        // a fix needs both.
        assert_eq!(
            query("id=123456&timestamp=1377177267&cell=257,02,16,2224&wifi=00-14-22-01-23-45,-80"),
            Err("lat: required, lat and lon (or location=lat,lon)".into())
        );
        assert_eq!(
            query("timestamp=1377177267&lat=60.0&lon=30.0"),
            Err("id: required".into())
        );
    }

    #[test]
    fn osmand_app_url_template() {
        // OsmAnd's online tracking URL as Traccar documents it, with its placeholders filled:
        // ?id=123456&lat={0}&lon={1}&timestamp={2}&hdop={3}&altitude={4}&speed={5}
        assert_eq!(
            query(
                "id=123456&lat=52.3676&lon=4.9041&timestamp=1609459200000&hdop=4.5&altitude=-2.5&speed=12.5"
            ),
            Ok(Fix {
                altitude_m: Some(-2.5),
                speed_mps: kn(12.5),
                ..fix("123456", 1_609_459_200_000, 52.3676, 4.9041)
            })
        );
    }

    #[test]
    fn every_timestamp_form_in_a_query() {
        for (text, ms) in [
            ("1609459200", 1_609_459_200_000),
            ("1609459200000", 1_609_459_200_000),
            ("1609459200.5", 1_609_459_200_500),
            ("2021-01-01T00%3A00%3A00Z", 1_609_459_200_000),
            ("2021-01-01T00:00:00.250Z", 1_609_459_200_250),
            ("2021-01-01T02:00:00%2B02:00", 1_609_459_200_000),
            ("2021-01-01T02:00:00%2B0200", 1_609_459_200_000),
            ("2021-01-01T02:00:00+02:00", 1_609_459_200_000),
            ("2021-01-01+00:00:00", 1_609_459_200_000),
            ("2021-01-01%2000:00:00", 1_609_459_200_000),
        ] {
            let got = query(&format!("id=a&lat=1&lon=2&timestamp={text}"));
            assert_eq!(got.map(|f| f.time_ms), Ok(ms), "{text}");
        }
        assert_eq!(query("id=a&lat=1&lon=2").map(|f| f.time_ms), Ok(NOW));
        assert_eq!(
            query("id=a&lat=1&lon=2&timestamp=").map(|f| f.time_ms),
            Ok(NOW)
        );
    }

    #[test]
    fn knots_are_converted_exactly() {
        for knots in [1.0, 10.0, 40.0, 0.5, 3600.0 / 1852.0, 1e6] {
            let got = query(&format!("id=a&lat=1&lon=2&speed={knots}")).map(|f| f.speed_mps);
            assert_eq!(got, Ok(Some((knots * 1852.0 / 3600.0) as f32)), "{knots}");
        }
        assert_eq!(
            query("id=a&lat=1&lon=2&speed=3600").map(|f| f.speed_mps),
            Ok(Some(1852.0))
        );
    }

    #[test]
    fn all_fields_and_later_wins() {
        assert_eq!(
            query(
                "deviceid=truck+7&lat=1&lon=2&lat=-33.5&bearing=90&heading=270.5&altitude=12&accuracy=4.5&hdop=1.2&batt=55.5&valid=true&unknown=%25"
            ),
            Ok(Fix {
                heading_deg: Some(270.5),
                altitude_m: Some(12.0),
                accuracy_m: Some(4.5),
                ..fix("truck 7", NOW, -33.5, 2.0)
            })
        );
        // location= and lat/lon feed the same position: the later one wins.
        assert_eq!(
            query("id=a&location=1,2&lat=3").map(|f| (f.lat, f.lon)),
            Ok((3.0, 2.0))
        );
        // The lead chains query and body pairs: the body's id wins.
        let pairs = decode_form(b"id=q&lat=1&lon=2")
            .unwrap()
            .into_iter()
            .chain(decode_form(b"id=body").unwrap());
        assert_eq!(parse_params(pairs, NOW).unwrap().device_id, "body");
        // What form_urlencoded::parse yields works as well.
        let cows = [("id", "c"), ("lat", "1"), ("lon", "2")]
            .map(|(k, v)| (std::borrow::Cow::Borrowed(k), std::borrow::Cow::Borrowed(v)));
        assert_eq!(parse_params(cows, NOW), Ok(fix("c", NOW, 1.0, 2.0)));
    }

    #[test]
    fn refusals_name_the_field_and_rule() {
        for (q, err) in [
            ("lat=1&lon=2", "id: required"),
            ("id=&lat=1&lon=2", "id: required"),
            (
                "id=a%0Ab&lat=1&lon=2",
                r#"id: contains control characters ("a\nb")"#,
            ),
            (
                "id=a&lon=2",
                "lat: required, lat and lon (or location=lat,lon)",
            ),
            (
                "id=a&lat=1",
                "lat: required, lat and lon (or location=lat,lon)",
            ),
            ("id=a&lat=abc&lon=2", r#"lat: not a number ("abc")"#),
            (
                "id=a&lat=91&lon=2",
                "lat: 91 out of range, allowed -90..=90",
            ),
            (
                "id=a&lat=-90.5&lon=2",
                "lat: -90.5 out of range, allowed -90..=90",
            ),
            (
                "id=a&lat=1&lon=181",
                "lon: 181 out of range, allowed -180..=180",
            ),
            ("id=a&lat=NaN&lon=2", "lat: not a finite number"),
            ("id=a&lat=1&lon=inf", "lon: not a finite number"),
            ("id=a&location=1", r#"location: expected lat,lon ("1")"#),
            ("id=a&location=1,x", r#"location: not a number ("x")"#),
            (
                "id=a&location=95,1",
                "location: 95 out of range, allowed -90..=90",
            ),
            ("id=a&lat=1&lon=2&accuracy=-1", "accuracy: -1 is negative"),
            (
                "id=a&lat=1&lon=2&speed=fast",
                r#"speed: not a number ("fast")"#,
            ),
            (
                "id=a&lat=1&lon=2&bearing=x",
                r#"bearing: not a number ("x")"#,
            ),
            (
                "id=a&lat=1&lon=2&altitude=1e40",
                "altitude: 1e40 out of range for a 32-bit float",
            ),
            ("id=a&lat=1&lon=2&hdop=x", r#"hdop: not a number ("x")"#),
            ("id=a&lat=1&lon=2&batt=abc", r#"batt: not a number ("abc")"#),
            ("id=a&lat=1&lon=2&id=%FF", "id: not valid UTF-8"),
            (
                "id=a&lat=1&lon=2&x%C3=1",
                r#"parameter name: not valid UTF-8 ("x�")"#,
            ),
        ] {
            assert_eq!(query(q), Err(err.to_string()), "{q}");
        }
        let err = query("id=a&lat=1&lon=2&timestamp=yesterday").unwrap_err();
        assert!(err.starts_with("timestamp: not a time"), "{err}");
        let err = query(&format!("id={}&lat=1&lon=2", "x".repeat(129))).unwrap_err();
        assert!(err.starts_with("id: longer than 128 bytes (\"xxx"), "{err}");
        assert!(err.len() < 100, "{err}");
    }

    #[test]
    fn form_decoding() {
        assert_eq!(
            decode_form(b"a=1+2&&b=%41%zz%4&c&=d").unwrap(),
            vec![
                ("a".into(), "1 2".into()),
                ("b".into(), "A%zz%4".into()),
                ("c".into(), String::new()),
                (String::new(), "d".into()),
            ]
        );
        assert_eq!(
            decode_form("id=J%C3%BCrgen&x=ü".as_bytes()).unwrap()[0].1,
            "Jürgen"
        );
    }

    fn json_fix(body: &str) -> Result<Fix, String> {
        parse_json(body.as_bytes(), NOW).map_err(|e| e.to_string())
    }

    #[test]
    fn traccar_client_json_examples() {
        // The JSON examples of Traccar's OsmAndProtocolDecoderTest (its documentation example
        // has the same shape).
        assert_eq!(
            json_fix(
                r#"{"location":{"timestamp":"2025-06-15T13:45:12.862Z","coords":{"latitude":37.4219983,"longitude":-122.084,"accuracy":5,"speed":0,"heading":-1,"altitude":5},"is_moving":false,"odometer":0,"event":"motionchange","battery":{"level":1,"is_charging":false},"activity":{"type":"still"},"extras":{},"_":"&id=48241179&lat=37.4219983&lon=-122.084&timestamp=2025-06-15T13:45:12.862Z&"},"device_id":"48241179"}"#
            ),
            Ok(Fix {
                accuracy_m: Some(5.0),
                speed_mps: Some(0.0),
                altitude_m: Some(5.0),
                ..fix("48241179", 1_749_995_112_862, 37.4219983, -122.084)
            })
        );
        assert_eq!(
            json_fix(
                r#"{"location":{"extras":{},"mock":true,"coords":{"speed_accuracy":-1,"speed":-1,"longitude":-122.406417,"ellipsoidal_altitude":0,"floor":null,"heading_accuracy":-1,"latitude":37.785834000000001,"accuracy":5,"altitude_accuracy":-1,"altitude":0,"heading":-1},"is_moving":false,"age":188,"odometer":0,"uuid":"2FB04C65-99CF-42AB-8DD3-EBCB4B108BF8","event":"motionchange","battery":{"level":-1,"is_charging":false},"activity":{"type":"unknown","confidence":100},"timestamp":"2025-05-09T04:11:30.579Z"},"device_id":"658765"}"#
            ),
            Ok(Fix {
                accuracy_m: Some(5.0),
                altitude_m: Some(0.0),
                ..fix("658765", 1_746_763_890_579, 37.785834, -122.406417)
            })
        );
        assert_eq!(
            json_fix(
                r#"{"location":{"event":"motionchange","is_moving":false,"uuid":"0e9a2473-a9a7-4c00-997b-fb97d2154e75","timestamp":"2021-07-21T08:06:34.444Z","odometer":0,"coords":{"latitude":-6.1148096,"longitude":106.6837015,"accuracy":3.8,"speed":18.67,"speed_accuracy":0.26,"heading":63,"heading_accuracy":0.28,"altitude":35.7,"altitude_accuracy":3.8},"activity":{"type":"still","confidence":100},"battery":{"is_charging":false,"level":0.79},"extras":{}},"device_id":"8737767034"}"#
            ),
            Ok(Fix {
                accuracy_m: Some(3.8),
                speed_mps: Some(18.67),
                heading_deg: Some(63.0),
                altitude_m: Some(35.7),
                ..fix("8737767034", 1_626_854_794_444, -6.1148096, 106.6837015)
            })
        );
        // Without a timestamp: now.
        assert_eq!(
            json_fix(r#"{"device_id":"d","location":{"coords":{"latitude":1,"longitude":2}}}"#),
            Ok(fix("d", NOW, 1.0, 2.0))
        );
    }

    #[test]
    fn json_refusals_name_the_field_and_rule() {
        let coords = |c: &str| {
            format!(
                r#"{{"device_id":"d","location":{{"timestamp":"2021-01-01T00:00:00Z","coords":{c}}}}}"#
            )
        };
        for (body, err) in [
            ("[]".to_string(), "body: expected a JSON object"),
            (r#"{"device_id":"d""#.into(), "body: not JSON: EOF while parsing an object at line 1 column 16"),
            (r#"{"location":{}}"#.into(), "device_id: required"),
            (r#"{"device_id":42,"location":{}}"#.into(), "device_id: expected a string"),
            (r#"{"device_id":""}"#.into(), "device_id: required"),
            (r#"{"device_id":"d"}"#.into(), "location: required"),
            (r#"{"device_id":"d","location":[]}"#.into(), "location: expected a JSON object"),
            (r#"{"device_id":"d","location":{"timestamp":5}}"#.into(), "location.timestamp: expected a string"),
            (r#"{"device_id":"d","location":{}}"#.into(), "location.coords: required"),
            (coords(r#"{"longitude":2}"#), "location.coords.latitude: required"),
            (coords(r#"{"latitude":1}"#), "location.coords.longitude: required"),
            (coords(r#"{"latitude":"1","longitude":2}"#), "location.coords.latitude: expected a number"),
            (coords(r#"{"latitude":91,"longitude":2}"#), "location.coords.latitude: 91 out of range, allowed -90..=90"),
            (coords(r#"{"latitude":1,"longitude":-181}"#), "location.coords.longitude: -181 out of range, allowed -180..=180"),
            (coords(r#"{"latitude":1,"longitude":2,"accuracy":-1}"#), "location.coords.accuracy: -1 is negative"),
            (coords(r#"{"latitude":1,"longitude":2,"speed":"x"}"#), "location.coords.speed: expected a number"),
            (r#"{"device_id":"d","location":{"coords":{"latitude":1,"longitude":2},"battery":{"level":"full"}}}"#.into(), "location.battery.level: expected a number"),
        ] {
            assert_eq!(json_fix(&body), Err(err.to_string()), "{body}");
        }
        assert_eq!(
            parse_json(b"{\"device_id\":\"\xff\"}", NOW)
                .unwrap_err()
                .field,
            "body"
        );
    }
}
