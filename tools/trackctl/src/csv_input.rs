//! Reading fixes from the two CSV formats of `data/` (see `data/README.md`).
//!
//! - Raw AIS, as MarineCadastre publishes it: `BaseDateTime,LON,LAT,MMSI,SOG,COG,Heading,…`,
//!   times without a zone (UTC), SOG in knots, COG in degrees.
//! - Simple: `device_id,timestamp,lon,lat` with ISO-8601 UTC times (or epoch
//!   milliseconds), optionally followed by `accuracy_m`, `speed_mps`,
//!   `heading_deg`, `altitude_m`.
//!
//! The format is detected from the header; columns are found by name, in any order.

use std::io::Read;

use anyhow::{Context, bail};
use trackmesh_proto::v1::Fix;

use crate::time;

/// Metres per second in one knot (1852 m / 3600 s).
pub const MPS_PER_KNOT: f64 = 0.514_444;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// MarineCadastre AIS: `BaseDateTime,LON,LAT,MMSI,SOG,COG,…`
    RawAis,
    /// `device_id,timestamp,lon,lat[,accuracy_m,speed_mps,heading_deg,altitude_m]`
    Simple,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Self::RawAis => "raw AIS",
            Self::Simple => "simple",
        }
    }
}

/// Column indexes of the fields a fix is made of.
#[derive(Debug, Clone)]
struct Columns {
    device: usize,
    time: usize,
    lat: usize,
    lon: usize,
    /// AIS SOG (knots) or `speed_mps`.
    speed: Option<usize>,
    /// AIS COG or `heading_deg`.
    heading: Option<usize>,
    accuracy: Option<usize>,
    altitude: Option<usize>,
}

impl Columns {
    fn detect(header: &csv::StringRecord) -> anyhow::Result<(Format, Self)> {
        let find = |name: &str| {
            header
                .iter()
                .position(|h| h.trim().eq_ignore_ascii_case(name))
        };
        let need =
            |name: &str| find(name).with_context(|| format!("the header has no {name} column"));
        if find("BaseDateTime").is_some() && find("MMSI").is_some() {
            let columns = Self {
                device: need("MMSI")?,
                time: need("BaseDateTime")?,
                lat: need("LAT")?,
                lon: need("LON")?,
                speed: find("SOG"),
                heading: find("COG"),
                accuracy: None,
                altitude: None,
            };
            return Ok((Format::RawAis, columns));
        }
        if find("device_id").is_some() {
            let columns = Self {
                device: need("device_id")?,
                time: need("timestamp")?,
                lat: need("lat")?,
                lon: need("lon")?,
                speed: find("speed_mps"),
                heading: find("heading_deg"),
                accuracy: find("accuracy_m"),
                altitude: find("altitude_m"),
            };
            return Ok((Format::Simple, columns));
        }
        let header: Vec<&str> = header.iter().collect();
        bail!(
            "unknown CSV format (header: {}); expected the raw AIS header \
             (BaseDateTime,LON,LAT,MMSI,SOG,COG,…) or device_id,timestamp,lon,lat",
            header.join(",")
        )
    }
}

/// A row that could not be turned into a fix; the replay skips and counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    /// Line number in the file (the header is line 1).
    pub line: u64,
    pub reason: String,
}

/// Iterates over the fixes of a CSV file: `Ok(Ok(fix))`, `Ok(Err(bad row))`,
/// or `Err(_)` for an I/O error, after which the file cannot be read further.
pub struct FixReader<R> {
    reader: csv::Reader<R>,
    format: Format,
    columns: Columns,
    record: csv::StringRecord,
}

impl<R: Read> FixReader<R> {
    pub fn new(input: R) -> anyhow::Result<Self> {
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input);
        let header = reader.headers().context("reading the CSV header")?.clone();
        let (format, columns) = Columns::detect(&header)?;
        Ok(Self {
            reader,
            format,
            columns,
            record: csv::StringRecord::new(),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Bytes consumed so far (for progress).
    pub fn byte_position(&self) -> u64 {
        self.reader.position().byte()
    }

    fn line(&self) -> u64 {
        self.record.position().map_or(0, |p| p.line())
    }

    fn parse_record(&self) -> Result<Fix, String> {
        let c = &self.columns;
        let field = |i: usize| self.record.get(i).map(str::trim).unwrap_or("");
        let number = |i: usize, name: &str| -> Result<f64, String> {
            field(i)
                .parse::<f64>()
                .map_err(|_| format!("{name} {:?} is not a number", field(i)))
        };
        // Optional numeric columns: empty means absent.
        let optional = |i: Option<usize>, name: &str| -> Result<Option<f64>, String> {
            match i {
                Some(i) if !field(i).is_empty() => number(i, name).map(Some),
                _ => Ok(None),
            }
        };
        let device_id = field(c.device);
        if device_id.is_empty() {
            return Err("no device id".into());
        }
        let time_ms = time::parse_ms(field(c.time)).map_err(|e| format!("time: {e:#}"))?;
        let lat = number(c.lat, "latitude")?;
        let lon = number(c.lon, "longitude")?;
        let speed = optional(c.speed, "speed")?;
        let heading = optional(c.heading, "heading")?;
        let (speed_mps, heading_deg) = match self.format {
            Format::RawAis => (speed.and_then(sog_to_mps), heading.and_then(ais_cog)),
            Format::Simple => (speed, heading),
        };
        Ok(Fix {
            device_id: device_id.to_owned(),
            time_ms,
            lat,
            lon,
            accuracy_m: optional(c.accuracy, "accuracy_m")?.map(|v| v as f32),
            speed_mps: speed_mps.map(|v| v as f32),
            heading_deg: heading_deg.map(|v| v as f32),
            altitude_m: optional(c.altitude, "altitude_m")?.map(|v| v as f32),
        })
    }
}

impl<R: Read> Iterator for FixReader<R> {
    type Item = anyhow::Result<Result<Fix, BadRow>>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.reader.read_record(&mut self.record) {
            Ok(false) => None,
            Ok(true) => Some(Ok(self.parse_record().map_err(|reason| BadRow {
                line: self.line(),
                reason,
            }))),
            Err(err) if err.is_io_error() => Some(Err(err.into())),
            // Malformed CSV (e.g. invalid UTF-8) spoils one row only.
            Err(err) => Some(Ok(Err(BadRow {
                line: err.position().map_or(0, |p| p.line()),
                reason: err.to_string(),
            }))),
        }
    }
}

/// AIS speed over ground in knots → metres per second; 102.3 kn means "not available".
pub fn sog_to_mps(knots: f64) -> Option<f64> {
    (knots.is_finite() && (0.0..102.3).contains(&knots)).then_some(knots * MPS_PER_KNOT)
}

/// AIS course over ground → degrees in `[0, 360)`, or `None` when not available.
///
/// AIS sends COG in tenths of a degree as a 12-bit field; 3600 (360.0°) means
/// "not available" and higher values are invalid. MarineCadastre's 2020 files
/// store that field as a signed 12-bit number, so values from 204.8° up appear
/// as negative numbers (value − 409.6): `-49.6` is 360.0, i.e. not available.
pub fn ais_cog(cog: f64) -> Option<f64> {
    if !cog.is_finite() {
        return None;
    }
    let cog = if cog < 0.0 { cog + 409.6 } else { cog };
    // Decimal arithmetic: -60.6 + 409.6 = 349.00000000000006; keep tenths.
    let cog = (cog * 10.0).round() / 10.0;
    (0.0..360.0).contains(&cog).then_some(cog)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The first lines of data/ais-ny-harbor-2020-06-30-first-hour.raw.csv, plus
    // a row with empty SOG/COG, one with COG 360 (not available) and a broken one.
    const RAW_AIS: &str = "\
BaseDateTime,LON,LAT,MMSI,SOG,COG,Heading,VesselName,IMO,CallSign,VesselType,Status,Length,Width,Draft,Cargo,TranscieverClass,ETA
2020-06-30T00:00:00,-74.07157,40.64409,367000140,0.0,-60.6,246.0,SAMUEL I NEWHOUSE,IMO7702774,WYR3371,60.0,0.0,94.0,21.0,,69.0,B,2020-06-30T12:01:00
2020-06-30T00:00:00,-74.02433,40.54291,366999618,19.0,-61.8,349.0,CG SHRIKE,,NPBG,90.0,0.0,26.0,5.0,,,B,2020-06-30T19:40:00
2020-06-30T00:00:07,-74.02434,40.54295,366999618,,,511.0,CG SHRIKE,,NPBG,90.0,0.0,26.0,5.0,,,B,
2020-06-30T00:00:09,-74.02434,40.54295,366999618,1.0,360.0,511.0,CG SHRIKE,,NPBG,90.0,0.0,26.0,5.0,,,B,
2020-06-30T00:00:10,north,40.54295,366999618,1.0,12.0,511.0,CG SHRIKE,,NPBG,90.0,0.0,26.0,5.0,,,B,
";

    // The first lines of data/ais-virginia-beach-2020-06-04..06.csv.
    const SIMPLE: &str = "\
device_id,timestamp,lon,lat
369990276,2020-06-04T03:07:16Z,-76.35256,36.88478
369990276,2020-06-04T03:08:47Z,-76.35256,36.88477
";

    fn read(text: &str) -> (Format, Vec<Result<Fix, BadRow>>) {
        let reader = FixReader::new(text.as_bytes()).unwrap();
        let format = reader.format();
        (format, reader.map(Result::unwrap).collect())
    }

    #[test]
    fn raw_ais_rows_become_fixes() {
        let (format, rows) = read(RAW_AIS);
        assert_eq!(format, Format::RawAis);
        assert_eq!(rows.len(), 5);
        let first = rows[0].as_ref().unwrap();
        assert_eq!(first.device_id, "367000140");
        assert_eq!(first.time_ms, 1_593_475_200_000);
        assert_eq!((first.lat, first.lon), (40.64409, -74.07157));
        assert_eq!(first.speed_mps, Some(0.0));
        assert_eq!(
            first.heading_deg,
            Some(349.0),
            "-60.6 is 349.0 stored as signed 12 bits"
        );
        assert_eq!(first.accuracy_m, None);

        let second = rows[1].as_ref().unwrap();
        assert!((f64::from(second.speed_mps.unwrap()) - 19.0 * 0.514_444).abs() < 1e-4);
        assert_eq!(second.heading_deg, Some(347.8));

        let empty = rows[2].as_ref().unwrap();
        assert_eq!((empty.speed_mps, empty.heading_deg), (None, None));
        assert_eq!(empty.time_ms, 1_593_475_207_000);
        assert_eq!(
            rows[3].as_ref().unwrap().heading_deg,
            None,
            "COG 360 = not available"
        );

        let bad = rows[4].as_ref().unwrap_err();
        assert_eq!(bad.line, 6);
        assert!(bad.reason.contains("longitude"), "{}", bad.reason);
    }

    #[test]
    fn simple_rows_become_fixes() {
        let (format, rows) = read(SIMPLE);
        assert_eq!(format, Format::Simple);
        let fixes: Vec<Fix> = rows.into_iter().map(Result::unwrap).collect();
        assert_eq!(fixes.len(), 2);
        assert_eq!(fixes[0].device_id, "369990276");
        assert_eq!(fixes[0].time_ms, 1_591_240_036_000);
        assert_eq!((fixes[0].lat, fixes[0].lon), (36.88478, -76.35256));
        assert_eq!(fixes[1].time_ms - fixes[0].time_ms, 91_000);
        assert_eq!((fixes[0].speed_mps, fixes[0].heading_deg), (None, None));
    }

    #[test]
    fn simple_format_with_optional_columns_in_any_order() {
        let text = "lat,lon,timestamp,device_id,speed_mps,accuracy_m\n\
                    1.5,2.5,1000,truck-7,3.25,\n";
        let (_, rows) = read(text);
        let fix = rows[0].as_ref().unwrap();
        assert_eq!((fix.device_id.as_str(), fix.time_ms), ("truck-7", 1000));
        assert_eq!((fix.lat, fix.lon), (1.5, 2.5));
        assert_eq!((fix.speed_mps, fix.accuracy_m), (Some(3.25), None));
    }

    #[test]
    fn rows_without_device_or_time_are_bad_rows() {
        let text = "device_id,timestamp,lon,lat\n,2020-06-04T03:07:16Z,1,2\na,,1,2\n";
        let (_, rows) = read(text);
        assert_eq!(rows[0].as_ref().unwrap_err().reason, "no device id");
        assert_eq!(rows[1].as_ref().unwrap_err().line, 3);
    }

    #[test]
    fn unknown_header_is_an_error() {
        let err = FixReader::new("a,b,c\n1,2,3\n".as_bytes()).err().unwrap();
        assert!(err.to_string().contains("unknown CSV format"), "{err}");
        let err = FixReader::new("device_id,lon,lat\n".as_bytes())
            .err()
            .unwrap();
        assert!(err.to_string().contains("timestamp"), "{err}");
    }

    #[test]
    fn knots_to_metres_per_second() {
        assert_eq!(sog_to_mps(0.0), Some(0.0));
        assert!((sog_to_mps(10.0).unwrap() - 5.14444).abs() < 1e-9);
        assert!((sog_to_mps(1.0).unwrap() - 1852.0 / 3600.0).abs() < 1e-5);
        assert_eq!(sog_to_mps(102.3), None, "102.3 kn = not available");
        assert_eq!(sog_to_mps(-1.0), None);
        assert_eq!(sog_to_mps(f64::NAN), None);
    }

    #[test]
    fn ais_course_over_ground() {
        assert_eq!(ais_cog(0.0), Some(0.0));
        assert_eq!(ais_cog(204.7), Some(204.7));
        assert_eq!(ais_cog(-204.8), Some(204.8));
        assert_eq!(ais_cog(-49.7), Some(359.9));
        assert_eq!(ais_cog(-49.6), None, "360.0 = not available");
        assert_eq!(ais_cog(360.0), None);
        assert_eq!(ais_cog(511.0), None);
    }

    #[test]
    fn reads_the_shipped_sample_files() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/");
        for (name, format, rows) in [
            (
                "ais-ny-harbor-2020-06-30-first-hour.raw.csv",
                Format::RawAis,
                8689,
            ),
            (
                "ais-virginia-beach-2020-06-04..06.csv",
                Format::Simple,
                39_822,
            ),
        ] {
            let file = std::fs::File::open(format!("{root}{name}")).unwrap();
            let reader = FixReader::new(std::io::BufReader::new(file)).unwrap();
            assert_eq!(reader.format(), format, "{name}");
            let parsed: Vec<_> = reader.map(Result::unwrap).collect();
            assert_eq!(parsed.len(), rows, "{name}");
            assert!(parsed.iter().all(Result::is_ok), "{name}: every row parses");
        }
    }
}
