//! Track exports (issue 12): streams a stored track as JSON, GeoJSON, GPX or CSV.
//!
//! The HTTP route reads a track from storage as a stream of `TrackChunk`s and feeds each
//! chunk's fixes to an [`Encoder`], sending every returned piece at once. The encoder keeps
//! O(1) state (the open segment's number, times, count and, for GeoJSON, the one point held
//! back until the segment has a second one), so memory stays bounded for any track length.
//!
//! All fixes of a track are accepted fixes of one device in time order; a new segment starts
//! wherever `segment` changes. A fix without its `fix` message, or (GeoJSON and GPX only)
//! without a position (a latitude or longitude that is not finite or out of range), cannot
//! come from storage; it is skipped rather than written as an invalid document.

use std::{fmt, fmt::Write as _, str::FromStr};

use trackmesh_proto::v1::{Fix, RefinedFix, Verdict};

/// An export format, the `format` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    GeoJson,
    Gpx,
    Csv,
}

/// The values `format` accepts, in the order error messages list them.
const FORMATS: &str = "json, geojson, gpx, csv";

/// A `format` value that names no export format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "format: unknown value {:?}, allowed {FORMATS}", self.0)
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for Format {
    type Err = UnknownFormat;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.to_ascii_lowercase().as_str() {
            "json" => Ok(Format::Json),
            "geojson" => Ok(Format::GeoJson),
            "gpx" => Ok(Format::Gpx),
            "csv" => Ok(Format::Csv),
            _ => Err(UnknownFormat(value.to_owned())),
        }
    }
}

impl Format {
    /// The `Content-Type` of the export.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            // RFC 7946, section 12.
            Format::GeoJson => "application/geo+json",
            Format::Gpx => "application/gpx+xml",
            // RFC 4180 (text/csv, section 3) with RFC 7111's `header` parameter.
            Format::Csv => "text/csv; charset=utf-8; header=present",
        }
    }

    /// A file name extension, for a `Content-Disposition` file name.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::GeoJson => "geojson",
            Format::Gpx => "gpx",
            Format::Csv => "csv",
        }
    }
}

/// The segment being written: what its closing (GeoJSON properties, GPX `</trkseg>`) needs.
#[derive(Debug, Clone, Copy)]
struct Segment {
    number: u32,
    start_ms: i64,
    end_ms: i64,
    /// Points written (or held) in this segment.
    points: u64,
    /// GeoJSON: the segment's first position (lon, lat), held back until a second one makes
    /// it a LineString; a segment that ends with it still held becomes a Point.
    held: Option<(f64, f64)>,
}

/// Encodes one device's track in one [`Format`], piece by piece.
///
/// Call [`begin`](Self::begin) once, [`chunk`](Self::chunk) for every chunk of fixes in
/// order, then [`finish`](Self::finish) once; the concatenated pieces are the document, the
/// same however the fixes were split into chunks.
///
/// - **JSON**: `{"deviceId": "…", "fixes": [ … ]}` where every fix is the proto3 JSON of a
///   `RefinedFix` as `GetTrack` returns it: lowerCamelCase names, int64 values (`timeMs`,
///   `dtMs`) as strings, the verdict by name, non-finite doubles as `"NaN"`/`"Infinity"`.
///   Fields without presence are always written (even when zero, as with protobuf's
///   "always print fields with no presence" option); `optional` ones only when set.
/// - **GeoJSON** (RFC 7946): a FeatureCollection with one Feature per segment, a LineString
///   of `[lon, lat]` (no altitude), or a Point for a segment of one fix, with properties
///   `deviceId`, `segment`, `startMs`, `endMs` and `fixes` (the number of points).
/// - **GPX 1.1**: one `<trk>` named after the device, one `<trkseg>` per segment, `<trkpt>`s
///   with `<ele>` (when the altitude is known) and `<time>` (UTC, milliseconds).
/// - **CSV** (RFC 4180, CRLF line ends): a header line, then one row per fix; an unknown
///   optional value is an empty cell.
///
/// Numbers are written in Rust's shortest round-trip form (never an exponent), so a parser
/// reads back exactly the stored `f64` (or `f32` for the optional measurements).
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    device_id: String,
    /// Something was written to the list (JSON: a fix; GeoJSON: a feature).
    written: bool,
    segment: Option<Segment>,
}

impl Encoder {
    pub fn new(format: Format, device_id: &str) -> Self {
        Self {
            format,
            device_id: device_id.to_owned(),
            written: false,
            segment: None,
        }
    }

    /// The document's opening.
    pub fn begin(&mut self) -> Vec<u8> {
        let mut out = String::new();
        match self.format {
            Format::Json => {
                out.push_str("{\"deviceId\":");
                json_string(&mut out, &self.device_id);
                out.push_str(",\"fixes\":[");
            }
            Format::GeoJson => out.push_str("{\"type\":\"FeatureCollection\",\"features\":["),
            Format::Gpx => {
                out.push_str(concat!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
                    "<gpx version=\"1.1\" creator=\"trackmesh\" ",
                    "xmlns=\"http://www.topografix.com/GPX/1/1\">\n",
                    "<trk><name>",
                ));
                xml_text(&mut out, &self.device_id);
                out.push_str("</name>\n");
            }
            Format::Csv => out.push_str(concat!(
                "device_id,time_ms,lat,lon,segment,accuracy_m,speed_mps,heading_deg,",
                "altitude_m,distance_m,speed_kmh\r\n",
            )),
        }
        out.into_bytes()
    }

    /// The encoding of the next fixes of the track (possibly empty: GeoJSON holds back the
    /// first point of a segment).
    pub fn chunk(&mut self, fixes: &[RefinedFix]) -> Vec<u8> {
        let mut out = String::new();
        for refined in fixes {
            match self.format {
                Format::Json => self.json_fix(&mut out, refined),
                Format::GeoJson => self.geojson_fix(&mut out, refined),
                Format::Gpx => self.gpx_fix(&mut out, refined),
                Format::Csv => self.csv_fix(&mut out, refined),
            }
        }
        out.into_bytes()
    }

    /// The document's closing (and, for GeoJSON and GPX, the open segment's).
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = String::new();
        match self.format {
            Format::Json => out.push_str(if self.written { "\n]}\n" } else { "]}\n" }),
            Format::GeoJson => {
                self.geojson_close(&mut out);
                out.push_str(if self.written { "\n]}\n" } else { "]}\n" });
            }
            Format::Gpx => {
                if self.segment.take().is_some() {
                    out.push_str("</trkseg>\n");
                }
                out.push_str("</trk>\n</gpx>\n");
            }
            Format::Csv => {}
        }
        out.into_bytes()
    }

    fn json_fix(&mut self, out: &mut String, refined: &RefinedFix) {
        out.push_str(if self.written { ",\n" } else { "\n" });
        self.written = true;
        refined_json(out, refined);
    }

    /// Starts a new segment if `refined` opens one; returns whether it did.
    fn enter_segment(&mut self, refined: &RefinedFix, fix: &Fix) -> bool {
        match &mut self.segment {
            Some(open) if open.number == refined.segment => {
                open.end_ms = fix.time_ms;
                open.points += 1;
                false
            }
            _ => true,
        }
    }

    fn geojson_fix(&mut self, out: &mut String, refined: &RefinedFix) {
        let Some(fix) = &refined.fix else { return };
        let Some((lat, lon)) = position(fix) else {
            return;
        };
        if self.enter_segment(refined, fix) {
            self.geojson_close(out);
            self.segment = Some(Segment {
                number: refined.segment,
                start_ms: fix.time_ms,
                end_ms: fix.time_ms,
                points: 1,
                held: Some((lon, lat)),
            });
            return;
        }
        let Some(open) = &mut self.segment else {
            return;
        };
        if let Some((first_lon, first_lat)) = open.held.take() {
            out.push_str(if self.written { ",\n" } else { "\n" });
            self.written = true;
            push(
                out,
                format_args!(
                    "{{\"type\":\"Feature\",\"geometry\":{{\"type\":\"LineString\",\
                     \"coordinates\":[[{first_lon},{first_lat}]"
                ),
            );
        }
        push(out, format_args!(",[{lon},{lat}]"));
    }

    /// Writes the open segment's feature (or its end), if a segment is open.
    fn geojson_close(&mut self, out: &mut String) {
        let Some(open) = self.segment.take() else {
            return;
        };
        match open.held {
            Some((lon, lat)) => {
                out.push_str(if self.written { ",\n" } else { "\n" });
                self.written = true;
                push(
                    out,
                    format_args!(
                        "{{\"type\":\"Feature\",\"geometry\":{{\"type\":\"Point\",\
                         \"coordinates\":[{lon},{lat}]}}"
                    ),
                );
            }
            None => out.push_str("]}"),
        }
        out.push_str(",\"properties\":{\"deviceId\":");
        json_string(out, &self.device_id);
        push(
            out,
            format_args!(
                ",\"segment\":{},\"startMs\":{},\"endMs\":{},\"fixes\":{}}}}}",
                open.number, open.start_ms, open.end_ms, open.points
            ),
        );
    }

    fn gpx_fix(&mut self, out: &mut String, refined: &RefinedFix) {
        let Some(fix) = &refined.fix else { return };
        let Some((lat, lon)) = position(fix) else {
            return;
        };
        if self.enter_segment(refined, fix) {
            if self.segment.is_some() {
                out.push_str("</trkseg>\n");
            }
            out.push_str("<trkseg>\n");
            self.segment = Some(Segment {
                number: refined.segment,
                start_ms: fix.time_ms,
                end_ms: fix.time_ms,
                points: 1,
                held: None,
            });
        }
        // GPX's longitude is -180 <= lon < 180: 180 is the same meridian as -180.
        let lon = if lon == 180.0 { -180.0 } else { lon };
        push(out, format_args!("<trkpt lat=\"{lat}\" lon=\"{lon}\">"));
        if let Some(ele) = fix.altitude_m.filter(|ele| ele.is_finite()) {
            push(out, format_args!("<ele>{ele}</ele>"));
        }
        out.push_str("<time>");
        utc_time(out, fix.time_ms);
        out.push_str("</time></trkpt>\n");
    }

    fn csv_fix(&mut self, out: &mut String, refined: &RefinedFix) {
        let Some(fix) = &refined.fix else { return };
        csv_cell(out, &self.device_id);
        push(
            out,
            format_args!(
                ",{},{},{},{},",
                fix.time_ms, fix.lat, fix.lon, refined.segment
            ),
        );
        for value in [
            fix.accuracy_m,
            fix.speed_mps,
            fix.heading_deg,
            fix.altitude_m,
        ] {
            if let Some(value) = value {
                push(out, format_args!("{value}"));
            }
            out.push(',');
        }
        push(
            out,
            format_args!("{},{}\r\n", refined.distance_m, refined.speed_kmh),
        );
    }
}

/// Appends formatted text; writing to a `String` cannot fail.
fn push(out: &mut String, args: fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

/// The fix's (lat, lon) when it is a position on Earth.
fn position(fix: &Fix) -> Option<(f64, f64)> {
    let valid = fix.lat.is_finite()
        && fix.lon.is_finite()
        && (-90.0..=90.0).contains(&fix.lat)
        && (-180.0..=180.0).contains(&fix.lon);
    valid.then_some((fix.lat, fix.lon))
}

/// A JSON string literal (RFC 8259: quote, backslash and control characters escaped).
fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => push(out, format_args!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A proto3 JSON double: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"`.
fn proto_double(out: &mut String, value: f64) {
    if value.is_finite() {
        push(out, format_args!("{value}"));
    } else if value.is_nan() {
        out.push_str("\"NaN\"");
    } else if value > 0.0 {
        out.push_str("\"Infinity\"");
    } else {
        out.push_str("\"-Infinity\"");
    }
}

/// XML character data or attribute text: the five special characters escaped, and the
/// characters XML 1.0 forbids even escaped (most C0 controls) replaced by U+FFFD.
fn xml_text(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if u32::from(c) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
}

/// An RFC 4180 field: quoted (with quotes doubled) when it holds a comma, quote or line end.
fn csv_cell(out: &mut String, value: &str) {
    if value.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

/// Unix milliseconds as an ISO 8601 / xsd:dateTime UTC time with milliseconds,
/// `YYYY-MM-DDTHH:MM:SS.sssZ`; years outside 0..=9999 get a sign or more digits as
/// xsd:dateTime allows. Any `i64` works (no overflow, no panic).
fn utc_time(out: &mut String, ms: i64) {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
    let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
    if year < 0 {
        push(out, format_args!("-{:04}", year.unsigned_abs()));
    } else {
        push(out, format_args!("{year:04}"));
    }
    push(
        out,
        format_args!("-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z"),
    );
}

/// The proleptic Gregorian (year, month, day) of a day count from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`). Valid for |days| well beyond what an i64 of milliseconds
/// reaches (about 1.1e11 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32; // [1, 31]
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32; // [1, 12]
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The proto3 JSON of one fix (also a Watch message's `fix`).
pub fn refined_json(out: &mut String, refined: &RefinedFix) {
    out.push('{');
    if let Some(fix) = &refined.fix {
        out.push_str("\"fix\":{\"deviceId\":");
        json_string(out, &fix.device_id);
        push(
            out,
            format_args!(",\"timeMs\":\"{}\",\"lat\":", fix.time_ms),
        );
        proto_double(out, fix.lat);
        out.push_str(",\"lon\":");
        proto_double(out, fix.lon);
        for (name, value) in [
            ("accuracyM", fix.accuracy_m),
            ("speedMps", fix.speed_mps),
            ("headingDeg", fix.heading_deg),
            ("altitudeM", fix.altitude_m),
        ] {
            if let Some(value) = value {
                push(out, format_args!(",\"{name}\":"));
                proto_double(out, f64::from(value));
            }
        }
        out.push_str("},");
    }
    out.push_str("\"verdict\":");
    match Verdict::try_from(refined.verdict) {
        Ok(verdict) => json_string(out, verdict.as_str_name()),
        // proto3 JSON writes an enum value without a name as its number.
        Err(_) => push(out, format_args!("{}", refined.verdict)),
    }
    push(
        out,
        format_args!(
            ",\"replay\":{},\"segment\":{},\"distanceM\":",
            refined.replay, refined.segment
        ),
    );
    proto_double(out, refined.distance_m);
    push(
        out,
        format_args!(",\"dtMs\":\"{}\",\"speedKmh\":", refined.dt_ms),
    );
    proto_double(out, refined.speed_kmh);
    out.push_str(",\"detail\":");
    json_string(out, &refined.detail);
    push(
        out,
        format_args!(",\"reanchored\":{}}}", refined.reanchored),
    );
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    const DEVICE: &str = "v1";

    fn refined(segment: u32, time_ms: i64, lat: f64, lon: f64) -> RefinedFix {
        RefinedFix {
            fix: Some(Fix {
                device_id: DEVICE.into(),
                time_ms,
                lat,
                lon,
                ..Fix::default()
            }),
            verdict: Verdict::Accepted.into(),
            segment,
            ..RefinedFix::default()
        }
    }

    /// The whole document, the fixes given in the chunks shown.
    fn encode(format: Format, device: &str, chunks: &[&[RefinedFix]]) -> String {
        let mut encoder = Encoder::new(format, device);
        let mut out = encoder.begin();
        for chunk in chunks {
            out.extend(encoder.chunk(chunk));
        }
        out.extend(encoder.finish());
        String::from_utf8(out).expect("utf-8")
    }

    fn parse(document: &str) -> Value {
        serde_json::from_str(document).expect("valid JSON")
    }

    /// A GeoJSON position as (lon, lat), read as f64 (`41` and `41.0` alike).
    fn lon_lat(position: &Value) -> (f64, f64) {
        let number = |i: usize| position[i].as_f64().expect("number");
        assert_eq!(position.as_array().map(Vec::len), Some(2), "{position}");
        (number(0), number(1))
    }

    fn lon_lats(fixes: &[RefinedFix]) -> Vec<(f64, f64)> {
        fixes
            .iter()
            .map(|f| {
                let fix = f.fix.as_ref().expect("fix");
                (fix.lon, fix.lat)
            })
            .collect()
    }

    /// Segment 0 with three fixes, segment 1 with one, segment 4 with two.
    fn three_segments() -> Vec<RefinedFix> {
        vec![
            refined(0, 1_000, 40.5, -74.25),
            refined(0, 2_000, 40.500001, -74.250001),
            refined(0, 3_000, 40.1234567890123, -74.9876543210987),
            refined(1, 900_000, 41.0, -73.0),
            refined(4, 2_000_000, -33.868820, 151.209296),
            refined(4, 2_001_000, -33.8688, 151.2093),
        ]
    }

    #[test]
    fn format_names_parse_and_others_are_refused_naming_the_field() {
        assert_eq!("json".parse(), Ok(Format::Json));
        assert_eq!("geojson".parse(), Ok(Format::GeoJson));
        assert_eq!("GPX".parse(), Ok(Format::Gpx));
        assert_eq!("csv".parse(), Ok(Format::Csv));
        let err = "kml".parse::<Format>().expect_err("kml is no format");
        assert_eq!(
            err.to_string(),
            "format: unknown value \"kml\", allowed json, geojson, gpx, csv"
        );
        assert_eq!(Format::GeoJson.content_type(), "application/geo+json");
        assert_eq!(Format::Gpx.content_type(), "application/gpx+xml");
        assert!(Format::Csv.content_type().starts_with("text/csv"));
        assert_eq!(Format::Json.content_type(), "application/json");
    }

    #[test]
    fn json_empty_track_is_a_document_without_fixes() {
        let doc = parse(&encode(Format::Json, DEVICE, &[]));
        assert_eq!(doc, serde_json::json!({"deviceId": "v1", "fixes": []}));
    }

    #[test]
    fn json_one_fix_is_proto3_json_of_the_refined_fix() {
        let mut fix = refined(3, 1_750_000_000_123, 40.64, -74.07);
        let inner = fix.fix.as_mut().expect("fix");
        inner.accuracy_m = Some(4.5);
        inner.altitude_m = Some(-0.25);
        fix.distance_m = 12.75;
        fix.dt_ms = 1_000;
        fix.speed_kmh = 45.9;
        fix.reanchored = true;
        let doc = parse(&encode(Format::Json, DEVICE, &[&[fix]]));
        assert_eq!(
            doc,
            serde_json::json!({"deviceId": "v1", "fixes": [{
                "fix": {
                    "deviceId": "v1", "timeMs": "1750000000123", "lat": 40.64, "lon": -74.07,
                    "accuracyM": 4.5, "altitudeM": -0.25,
                },
                "verdict": "ACCEPTED", "replay": false, "segment": 3, "distanceM": 12.75,
                "dtMs": "1000", "speedKmh": 45.9, "detail": "", "reanchored": true,
            }]})
        );
    }

    #[test]
    fn json_writes_non_finite_doubles_and_odd_strings_as_proto3_does() {
        let mut fix = refined(0, 1, 1.0, 2.0);
        fix.distance_m = f64::NAN;
        fix.speed_kmh = f64::INFINITY;
        fix.detail = "quote \" backslash \\ newline \n nul \u{0}".into();
        let doc = parse(&encode(Format::Json, "a\"b\\c", &[&[fix]]));
        assert_eq!(doc["deviceId"], "a\"b\\c");
        assert_eq!(doc["fixes"][0]["distanceM"], "NaN");
        assert_eq!(doc["fixes"][0]["speedKmh"], "Infinity");
        assert_eq!(
            doc["fixes"][0]["detail"],
            "quote \" backslash \\ newline \n nul \u{0}"
        );
    }

    #[test]
    fn json_several_segments_keep_every_fix_in_order() {
        let fixes = three_segments();
        let doc = parse(&encode(Format::Json, DEVICE, &[&fixes]));
        let written = doc["fixes"].as_array().expect("fixes");
        assert_eq!(written.len(), fixes.len());
        for (json, fix) in written.iter().zip(&fixes) {
            let inner = fix.fix.as_ref().expect("fix");
            assert_eq!(json["segment"], fix.segment);
            assert_eq!(json["fix"]["lat"].as_f64(), Some(inner.lat));
            assert_eq!(json["fix"]["lon"].as_f64(), Some(inner.lon));
            assert_eq!(json["fix"]["timeMs"], inner.time_ms.to_string());
        }
    }

    #[test]
    fn geojson_empty_track_is_an_empty_feature_collection() {
        let doc = parse(&encode(Format::GeoJson, DEVICE, &[]));
        assert_eq!(
            doc,
            serde_json::json!({"type": "FeatureCollection", "features": []})
        );
    }

    #[test]
    fn geojson_one_fix_is_a_point_feature() {
        let fix = refined(2, 5_000, 40.64, -74.07);
        let doc = parse(&encode(Format::GeoJson, DEVICE, &[&[fix]]));
        assert_eq!(
            doc,
            serde_json::json!({"type": "FeatureCollection", "features": [{
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [-74.07, 40.64]},
                "properties": {
                    "deviceId": "v1", "segment": 2, "startMs": 5000, "endMs": 5000, "fixes": 1,
                },
            }]})
        );
    }

    #[test]
    fn geojson_one_segment_is_one_linestring_of_lon_lat() {
        let fixes = &three_segments()[..3];
        let doc = parse(&encode(Format::GeoJson, DEVICE, &[fixes]));
        let features = doc["features"].as_array().expect("features");
        assert_eq!(features.len(), 1);
        assert_eq!(features[0]["geometry"]["type"], "LineString");
        let coordinates = features[0]["geometry"]["coordinates"]
            .as_array()
            .expect("coordinates");
        // Exact: the shortest round-trip form reads back as the same f64.
        let read: Vec<(f64, f64)> = coordinates.iter().map(lon_lat).collect();
        assert_eq!(read, lon_lats(fixes));
        assert_eq!(
            features[0]["properties"],
            serde_json::json!({
                "deviceId": "v1", "segment": 0, "startMs": 1000, "endMs": 3000, "fixes": 3,
            })
        );
    }

    #[test]
    fn geojson_segments_become_features_and_a_one_fix_segment_a_point() {
        let doc = parse(&encode(Format::GeoJson, DEVICE, &[&three_segments()]));
        let features = doc["features"].as_array().expect("features");
        let shapes: Vec<(&str, usize, u64)> = features
            .iter()
            .map(|f| {
                let geometry = &f["geometry"];
                let points = match geometry["type"].as_str() {
                    Some("Point") => 1,
                    _ => geometry["coordinates"].as_array().expect("line").len(),
                };
                let segment = f["properties"]["segment"].as_u64().expect("segment");
                (geometry["type"].as_str().expect("type"), points, segment)
            })
            .collect();
        assert_eq!(
            shapes,
            [("LineString", 3, 0), ("Point", 1, 1), ("LineString", 2, 4)]
        );
        assert_eq!(
            lon_lat(&features[1]["geometry"]["coordinates"]),
            (-73.0, 41.0)
        );
    }

    #[test]
    fn geojson_and_gpx_skip_fixes_without_a_position() {
        let mut fixes = vec![
            refined(0, 1, 1.0, 1.0),
            refined(0, 2, f64::NAN, 1.0),
            refined(0, 3, 91.0, 1.0),
            refined(0, 4, 2.0, f64::INFINITY),
        ];
        fixes.push(RefinedFix {
            fix: None,
            ..refined(0, 5, 0.0, 0.0)
        });
        let doc = parse(&encode(Format::GeoJson, DEVICE, &[&fixes]));
        assert_eq!(doc["features"][0]["geometry"]["type"], "Point");
        assert_eq!(doc["features"].as_array().map(Vec::len), Some(1));
        let gpx = encode(Format::Gpx, DEVICE, &[&fixes]);
        assert_eq!(gpx.matches("<trkpt ").count(), 1, "{gpx}");
    }

    #[test]
    fn gpx_empty_track_is_a_gpx_with_an_empty_track() {
        assert_eq!(
            encode(Format::Gpx, DEVICE, &[]),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <gpx version=\"1.1\" creator=\"trackmesh\" xmlns=\"http://www.topografix.com/GPX/1/1\">\n\
             <trk><name>v1</name>\n</trk>\n</gpx>\n"
        );
    }

    #[test]
    fn gpx_one_fix_is_one_trkpt_with_elevation_and_utc_time() {
        let mut fix = refined(0, 1_750_000_000_123, 40.64, -74.07);
        fix.fix.as_mut().expect("fix").altitude_m = Some(12.5);
        let gpx = encode(Format::Gpx, DEVICE, &[&[fix]]);
        assert!(
            gpx.ends_with(
                "<trk><name>v1</name>\n<trkseg>\n\
                 <trkpt lat=\"40.64\" lon=\"-74.07\"><ele>12.5</ele>\
                 <time>2025-06-15T15:06:40.123Z</time></trkpt>\n\
                 </trkseg>\n</trk>\n</gpx>\n"
            ),
            "{gpx}"
        );
    }

    #[test]
    fn gpx_has_one_trkseg_per_segment() {
        let gpx = encode(Format::Gpx, DEVICE, &[&three_segments()]);
        let segments: Vec<usize> = gpx
            .split("<trkseg>")
            .skip(1)
            .map(|segment| segment.matches("<trkpt ").count())
            .collect();
        assert_eq!(segments, [3, 1, 2], "{gpx}");
        assert_eq!(gpx.matches("</trkseg>").count(), 3);
        assert!(gpx.contains("<trkpt lat=\"-33.86882\" lon=\"151.209296\">"));
        assert!(!gpx.contains("<ele>"), "no altitude, no ele: {gpx}");
    }

    #[test]
    fn gpx_escapes_the_device_id_and_writes_lon_180_as_minus_180() {
        let gpx = encode(
            Format::Gpx,
            "a&b<c>d\"e'f\u{1}",
            &[&[refined(0, 0, 0.5, 180.0)]],
        );
        assert!(
            gpx.contains("<name>a&amp;b&lt;c&gt;d&quot;e&apos;f\u{fffd}</name>"),
            "{gpx}"
        );
        assert!(gpx.contains("<trkpt lat=\"0.5\" lon=\"-180\">"), "{gpx}");
        assert!(
            gpx.contains("<time>1970-01-01T00:00:00.000Z</time>"),
            "{gpx}"
        );
    }

    #[test]
    fn csv_empty_track_is_the_header_alone() {
        assert_eq!(
            encode(Format::Csv, DEVICE, &[]),
            "device_id,time_ms,lat,lon,segment,accuracy_m,speed_mps,heading_deg,altitude_m,\
             distance_m,speed_kmh\r\n"
        );
    }

    #[test]
    fn csv_rows_have_empty_cells_for_unknown_values() {
        let mut first = refined(0, 1_000, 40.64, -74.07);
        let mut second = refined(1, 2_000, 40.1234567890123, -74.5);
        let inner = second.fix.as_mut().expect("fix");
        inner.accuracy_m = Some(3.5);
        inner.speed_mps = Some(1.25);
        inner.heading_deg = Some(270.0);
        inner.altitude_m = Some(-2.0);
        second.distance_m = 1234.5;
        second.speed_kmh = 10.0;
        first.distance_m = 0.0;
        let csv = encode(Format::Csv, DEVICE, &[&[first, second]]);
        let rows: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            rows[1..],
            [
                "v1,1000,40.64,-74.07,0,,,,,0,0",
                "v1,2000,40.1234567890123,-74.5,1,3.5,1.25,270,-2,1234.5,10",
                "",
            ]
        );
    }

    #[test]
    fn csv_quotes_a_device_id_that_needs_it() {
        let fix = [refined(0, 1, 1.0, 2.0)];
        let row = |device: &str| {
            let csv = encode(Format::Csv, device, &[&fix]);
            let row = csv.split_once("\r\n").expect("header").1.to_owned();
            row.split_once(",1,").expect("time").0.to_owned()
        };
        assert_eq!(row("plain id"), "plain id");
        assert_eq!(row("a,b"), "\"a,b\"");
        assert_eq!(row("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(row("two\nlines"), "\"two\nlines\"");
        assert_eq!(row("a&<>'"), "a&<>'");
    }

    #[test]
    fn utc_time_matches_known_dates() {
        let time = |ms| {
            let mut out = String::new();
            utc_time(&mut out, ms);
            out
        };
        // Expected values from Python's datetime.
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_750_000_000_000), "2025-06-15T15:06:40.000Z");
        assert_eq!(time(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(time(1_709_164_800_000), "2024-02-29T00:00:00.000Z");
        assert_eq!(time(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(time(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
        assert_eq!(time(-62_167_219_200_001), "-0001-12-31T23:59:59.999Z");
        // The extremes do not panic or overflow.
        assert!(time(i64::MIN).starts_with("-292275055-05-16T16:47:04.192Z"));
        assert_eq!(time(i64::MAX), "292278994-08-17T07:12:55.807Z");
    }

    /// The inverse of `civil_from_days` (Hinnant's `days_from_civil`), to check it.
    fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
        let year = if month <= 2 { year - 1 } else { year };
        let era = year.div_euclid(400);
        let yoe = year.rem_euclid(400);
        let month = i64::from(month);
        let mp = if month > 2 { month - 3 } else { month + 9 };
        let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// A track of `segments` (fixes per segment, gap to the next segment number), with
    /// random positions and optional values.
    fn track() -> impl Strategy<Value = Vec<RefinedFix>> {
        let point = (
            -90.0..=90.0f64,
            -180.0..=180.0f64,
            proptest::option::of(0.0..100.0f32),
            proptest::option::of(-500.0..9000.0f32),
            0.0..1e6f64,
        );
        prop::collection::vec((prop::collection::vec(point, 1..5), 1..3u32), 0..7).prop_map(
            |segments| {
                let (mut fixes, mut number, mut time) = (Vec::new(), 0, 1_700_000_000_000);
                for (points, gap) in segments {
                    for (lat, lon, accuracy, altitude, distance) in points {
                        time += 1_001;
                        let mut fix = refined(number, time, lat, lon);
                        let inner = fix.fix.as_mut().expect("fix");
                        inner.accuracy_m = accuracy;
                        inner.altitude_m = altitude;
                        fix.distance_m = distance;
                        fixes.push(fix);
                    }
                    number += gap;
                }
                fixes
            },
        )
    }

    const ALL: [Format; 4] = [Format::Json, Format::GeoJson, Format::Gpx, Format::Csv];

    proptest! {
        #[test]
        fn days_round_trip_through_civil_dates(days in -200_000_000_000i64..200_000_000_000) {
            let (year, month, day) = civil_from_days(days);
            prop_assert!((1..=12).contains(&month) && (1..=31).contains(&day));
            prop_assert_eq!(days_from_civil(year, month, day), days);
        }

        #[test]
        fn chunk_boundaries_do_not_change_the_document(
            fixes in track(),
            cuts in prop::collection::vec(0..30usize, 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(fixes.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([fixes.len()]) {
                chunks.push(&fixes[from..cut]);
                from = cut;
            }
            let segments = fixes.windows(2).filter(|w| w[0].segment != w[1].segment).count()
                + usize::from(!fixes.is_empty());
            for format in ALL {
                let whole = encode(format, DEVICE, &[&fixes]);
                prop_assert_eq!(&encode(format, DEVICE, &chunks), &whole, "{:?}", format);
                match format {
                    Format::Json => {
                        let doc = parse(&whole);
                        prop_assert_eq!(doc["fixes"].as_array().map(Vec::len), Some(fixes.len()));
                    }
                    Format::GeoJson => {
                        let doc = parse(&whole);
                        let features = doc["features"].as_array().expect("features");
                        prop_assert_eq!(features.len(), segments);
                        let mut positions = Vec::new();
                        for feature in features {
                            let coordinates = &feature["geometry"]["coordinates"];
                            match feature["geometry"]["type"].as_str() {
                                Some("Point") => positions.push(lon_lat(coordinates)),
                                Some("LineString") => {
                                    let line = coordinates.as_array().expect("line");
                                    prop_assert!(line.len() >= 2);
                                    positions.extend(line.iter().map(lon_lat));
                                }
                                other => prop_assert!(false, "geometry {:?}", other),
                            }
                        }
                        prop_assert_eq!(positions, lon_lats(&fixes));
                    }
                    Format::Gpx => {
                        prop_assert_eq!(whole.matches("<trkseg>").count(), segments);
                        prop_assert_eq!(whole.matches("<trkpt ").count(), fixes.len());
                    }
                    Format::Csv => {
                        prop_assert_eq!(whole.matches("\r\n").count(), fixes.len() + 1);
                    }
                }
            }
        }
    }
}
