//! `trackctl stays` and `trackctl trips`: a device's stays and trips as learning found them,
//! as a table, CSV, GeoJSON or GPX. A trip's line is its stored fixes, fetched with GetTrack
//! one trip at a time and written as they arrive.

use std::{io::Write, path::PathBuf};

use serde_json::{Value, json};
use trackmesh_proto::v1::{GetStaysRequest, GetTrackRequest, GetTripsRequest, Place, Stay, Trip};

use crate::{
    client::{Client, RetryPolicy},
    gpx::{GpxWriter, Waypoint},
    query::{each_fix, output, round, unary},
    table,
    time::{format_duration_ms, format_ms},
    totals::thousands,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HistoryFormat {
    Table,
    Csv,
    Geojson,
    Gpx,
}

/// A device's stays or trips overlapping a time range, and where and how to print them.
#[derive(Debug, clap::Args)]
pub struct Query {
    pub device: String,
    /// Start of the time range; default: the beginning
    #[arg(long, value_parser = crate::parse_time)]
    pub from: Option<i64>,
    /// End of the time range; default: no end
    #[arg(long, value_parser = crate::parse_time)]
    pub to: Option<i64>,
    /// gpx: stays as waypoints, trips as one track each; geojson and gpx draw trips along
    /// their stored fixes (one GetTrack per trip)
    #[arg(long, value_enum, default_value = "table")]
    pub format: HistoryFormat,
    /// Write to this file instead of stdout
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

pub async fn stays(client: &Client, retry: RetryPolicy, query: Query) -> anyhow::Result<()> {
    let request = GetStaysRequest {
        device_id: query.device.clone(),
        from_ms: query.from.unwrap_or(0),
        to_ms: query.to.unwrap_or(0),
    };
    let stays = unary(
        client,
        retry,
        request,
        "GetStays failed",
        |mut c, r| async move { c.get_stays(r).await },
    )
    .await?
    .stays;
    let device = query.device.as_str();
    let mut out = output(query.out.as_deref())?;
    match query.format {
        HistoryFormat::Table => {
            if stays.is_empty() {
                writeln!(out, "no stays of device {device} in that time range")?;
            } else {
                let rows: Vec<Vec<String>> = stays.iter().map(|s| stay_row(s, false)).collect();
                let header = [
                    "place_id", "lat", "lon", "start", "end", "duration", "fixes",
                ];
                write!(out, "{}", table::render(&header, &strip(rows)))?;
                let dwell: i64 = stays.iter().map(|s| s.end_ms - s.start_ms).sum();
                writeln!(
                    out,
                    "{} stays, {} in all",
                    stays.len(),
                    format_duration_ms(dwell)
                )?;
            }
        }
        HistoryFormat::Csv => {
            let mut csv = csv::Writer::from_writer(&mut out);
            csv.write_record(STAY_HEADER)?;
            for stay in &stays {
                csv.write_record(stay_row(stay, true))?;
            }
            csv.flush()?;
        }
        HistoryFormat::Geojson => {
            let features: Vec<Value> = stays
                .iter()
                .map(|stay| {
                    json!({
                        "type": "Feature",
                        "geometry": {"type": "Point", "coordinates": [stay.lon, stay.lat]},
                        "properties": stay_properties(device, stay),
                    })
                })
                .collect();
            let collection = json!({"type": "FeatureCollection", "features": features});
            serde_json::to_writer_pretty(&mut out, &collection)?;
            writeln!(out)?;
        }
        HistoryFormat::Gpx => {
            let mut gpx = GpxWriter::new(&mut out, &format!("stays of {device}"))?;
            for stay in &stays {
                gpx.waypoint(&Waypoint {
                    lat: stay.lat,
                    lon: stay.lon,
                    time_ms: Some(stay.start_ms),
                    name: &stay.place_id,
                    desc: &describe_stay(stay),
                    kind: "stay",
                })?;
            }
            gpx.finish()?;
        }
    }
    out.flush()?;
    if let Some(path) = &query.out {
        eprintln!("wrote {} stays to {}", stays.len(), path.display());
    }
    Ok(())
}

const STAY_HEADER: [&str; 11] = [
    "device_id",
    "place_id",
    "lat",
    "lon",
    "start",
    "start_ms",
    "end",
    "end_ms",
    "duration",
    "duration_ms",
    "fixes",
];

/// A stay as a row of [`STAY_HEADER`]; for humans (`machine` false) the device and the
/// millisecond columns are empty and [`strip`] removes them.
fn stay_row(stay: &Stay, machine: bool) -> Vec<String> {
    let duration = stay.end_ms - stay.start_ms;
    vec![
        if machine {
            stay.device_id.clone()
        } else {
            String::new()
        },
        stay.place_id.clone(),
        format!("{:.5}", stay.lat),
        format!("{:.5}", stay.lon),
        format_ms(stay.start_ms),
        stay.start_ms.to_string(),
        format_ms(stay.end_ms),
        stay.end_ms.to_string(),
        format_duration_ms(duration),
        duration.to_string(),
        stay.fixes.to_string(),
    ]
}

/// The human columns of a stay row: place, position, start, end, duration, fixes.
fn strip(rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|row| {
            row.into_iter()
                .enumerate()
                .filter(|(i, _)| ![0, 5, 7, 9].contains(i))
                .map(|(_, cell)| cell)
                .collect()
        })
        .collect()
}

fn stay_properties(device: &str, stay: &Stay) -> Value {
    json!({
        "device_id": device,
        "place_id": stay.place_id,
        "start": format_ms(stay.start_ms),
        "end": format_ms(stay.end_ms),
        "start_ms": stay.start_ms,
        "end_ms": stay.end_ms,
        "duration_ms": stay.end_ms - stay.start_ms,
        "duration": format_duration_ms(stay.end_ms - stay.start_ms),
        "fixes": stay.fixes,
    })
}

fn describe_stay(stay: &Stay) -> String {
    format!(
        "stay from {} to {} ({}), {} fixes",
        format_ms(stay.start_ms),
        format_ms(stay.end_ms),
        format_duration_ms(stay.end_ms - stay.start_ms),
        stay.fixes
    )
}

pub async fn trips(client: &Client, retry: RetryPolicy, query: Query) -> anyhow::Result<()> {
    let request = GetTripsRequest {
        device_id: query.device.clone(),
        from_ms: query.from.unwrap_or(0),
        to_ms: query.to.unwrap_or(0),
    };
    let trips = unary(
        client,
        retry,
        request,
        "GetTrips failed",
        |mut c, r| async move { c.get_trips(r).await },
    )
    .await?
    .trips;
    let device = query.device.as_str();
    let mut out = output(query.out.as_deref())?;
    let mut track_fixes = 0u64;
    match query.format {
        HistoryFormat::Table => {
            if trips.is_empty() {
                writeln!(out, "no trips of device {device} in that time range")?;
            } else {
                let rows: Vec<Vec<String>> = trips.iter().map(trip_table_row).collect();
                let header = [
                    "start",
                    "end",
                    "duration",
                    "from",
                    "to",
                    "distance_km",
                    "mean_kmh",
                    "max_kmh",
                    "fixes",
                ];
                write!(out, "{}", table::render(&header, &rows))?;
                let distance: f64 = trips.iter().map(|t| t.distance_m).sum();
                let moving: i64 = trips.iter().map(|t| t.end_ms - t.start_ms).sum();
                writeln!(
                    out,
                    "{} trips, {:.2} km in {}",
                    trips.len(),
                    distance / 1000.0,
                    format_duration_ms(moving)
                )?;
            }
        }
        HistoryFormat::Csv => {
            let mut csv = csv::Writer::from_writer(&mut out);
            csv.write_record(TRIP_HEADER)?;
            for trip in &trips {
                csv.write_record(trip_csv_row(trip))?;
            }
            csv.flush()?;
        }
        HistoryFormat::Geojson => {
            out.write_all(b"{\"type\":\"FeatureCollection\",\"features\":[")?;
            for (i, trip) in trips.iter().enumerate() {
                out.write_all(if i == 0 { b"\n" } else { b",\n" })?;
                let mut line = LineWriter::new(&mut out);
                if let Some(from) = &trip.from_place {
                    line.position([from.lon, from.lat])?;
                }
                let request = trip_track(device, trip);
                let fixes = each_fix(client, retry, request, "trips", |refined| {
                    if let Some(fix) = &refined.fix {
                        line.position([fix.lon, fix.lat])?;
                    }
                    Ok(())
                })
                .await?;
                if let Some(to) = &trip.to_place {
                    line.position([to.lon, to.lat])?;
                }
                let mut properties = trip_properties(device, i + 1, trip);
                properties["track_fixes"] = json!(fixes);
                line.finish(&properties)?;
                track_fixes += fixes;
            }
            out.write_all(b"\n]}\n")?;
        }
        HistoryFormat::Gpx => {
            let mut gpx = GpxWriter::new(&mut out, &format!("trips of {device}"))?;
            // The places the trips join, once each, as waypoints (they precede tracks in GPX).
            let mut places: Vec<&Place> = Vec::new();
            for place in trips
                .iter()
                .flat_map(|t| [t.from_place.as_ref(), t.to_place.as_ref()])
                .flatten()
            {
                if !places.iter().any(|p| p.place_id == place.place_id) {
                    places.push(place);
                }
            }
            for place in places {
                gpx.waypoint(&Waypoint {
                    lat: place.lat,
                    lon: place.lon,
                    time_ms: None,
                    name: &place.place_id,
                    desc: "",
                    kind: "place",
                })?;
            }
            for (i, trip) in trips.iter().enumerate() {
                gpx.start_track(
                    &format!(
                        "trip {}: {} to {}",
                        i + 1,
                        place_name(trip.from_place.as_ref()),
                        place_name(trip.to_place.as_ref())
                    ),
                    &describe_trip(trip),
                    "trip",
                )?;
                let fixes = each_fix(client, retry, trip_track(device, trip), "trips", |fix| {
                    Ok(gpx.point(fix)?)
                })
                .await?;
                track_fixes += fixes;
            }
            gpx.finish()?;
        }
    }
    out.flush()?;
    if let Some(path) = &query.out {
        let fixes = if matches!(query.format, HistoryFormat::Geojson | HistoryFormat::Gpx) {
            format!(" with {} stored fixes", thousands(track_fixes))
        } else {
            String::new()
        };
        eprintln!("wrote {} trips{fixes} to {}", trips.len(), path.display());
    }
    Ok(())
}

/// The stored fixes of a trip: from the first stay's end to the next one's start, both included.
fn trip_track(device: &str, trip: &Trip) -> GetTrackRequest {
    GetTrackRequest {
        device_id: device.to_owned(),
        from_ms: trip.start_ms,
        to_ms: trip.end_ms,
        ..GetTrackRequest::default()
    }
}

fn place_name(place: Option<&Place>) -> &str {
    place.map_or("?", |p| p.place_id.as_str())
}

const TRIP_HEADER: [&str; 17] = [
    "device_id",
    "from_place",
    "from_lat",
    "from_lon",
    "to_place",
    "to_lat",
    "to_lon",
    "start",
    "start_ms",
    "end",
    "end_ms",
    "duration",
    "duration_ms",
    "distance_m",
    "mean_speed_kmh",
    "max_speed_kmh",
    "fixes",
];

fn trip_csv_row(trip: &Trip) -> Vec<String> {
    let place = |p: Option<&Place>| match p {
        Some(p) => [
            p.place_id.clone(),
            format!("{:.6}", p.lat),
            format!("{:.6}", p.lon),
        ],
        None => Default::default(),
    };
    let mut row = vec![trip.device_id.clone()];
    row.extend(place(trip.from_place.as_ref()));
    row.extend(place(trip.to_place.as_ref()));
    row.extend([
        format_ms(trip.start_ms),
        trip.start_ms.to_string(),
        format_ms(trip.end_ms),
        trip.end_ms.to_string(),
        format_duration_ms(trip.end_ms - trip.start_ms),
        (trip.end_ms - trip.start_ms).to_string(),
        round(trip.distance_m, 1).to_string(),
        round(trip.mean_speed_kmh, 2).to_string(),
        round(trip.max_speed_kmh, 2).to_string(),
        trip.fixes.to_string(),
    ]);
    row
}

fn trip_table_row(trip: &Trip) -> Vec<String> {
    vec![
        format_ms(trip.start_ms),
        format_ms(trip.end_ms),
        format_duration_ms(trip.end_ms - trip.start_ms),
        place_name(trip.from_place.as_ref()).to_owned(),
        place_name(trip.to_place.as_ref()).to_owned(),
        format!("{:.2}", trip.distance_m / 1000.0),
        format!("{:.1}", trip.mean_speed_kmh),
        format!("{:.1}", trip.max_speed_kmh),
        trip.fixes.to_string(),
    ]
}

fn trip_properties(device: &str, number: usize, trip: &Trip) -> Value {
    json!({
        "device_id": device,
        "trip": number,
        "from_place": trip.from_place.as_ref().map(|p| &p.place_id),
        "to_place": trip.to_place.as_ref().map(|p| &p.place_id),
        "start": format_ms(trip.start_ms),
        "end": format_ms(trip.end_ms),
        "start_ms": trip.start_ms,
        "end_ms": trip.end_ms,
        "duration": format_duration_ms(trip.end_ms - trip.start_ms),
        "distance_m": round(trip.distance_m, 1),
        "mean_speed_kmh": round(trip.mean_speed_kmh, 2),
        "max_speed_kmh": round(trip.max_speed_kmh, 2),
        "fixes": trip.fixes,
    })
}

fn describe_trip(trip: &Trip) -> String {
    format!(
        "{} to {} ({}), {:.2} km, mean {:.1} km/h, max {:.1} km/h, {} fixes",
        format_ms(trip.start_ms),
        format_ms(trip.end_ms),
        format_duration_ms(trip.end_ms - trip.start_ms),
        trip.distance_m / 1000.0,
        trip.mean_speed_kmh,
        trip.max_speed_kmh,
        trip.fixes
    )
}

/// One LineString Feature written as its positions arrive: the geometry opens at the first
/// position, and a line of one position repeats it (a LineString needs two).
struct LineWriter<W: Write> {
    out: W,
    first: Option<[f64; 2]>,
    positions: usize,
}

impl<W: Write> LineWriter<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            first: None,
            positions: 0,
        }
    }

    fn position(&mut self, position: [f64; 2]) -> std::io::Result<()> {
        if self.positions == 0 {
            self.out.write_all(
                b"{\"type\":\"Feature\",\"geometry\":{\"type\":\"LineString\",\"coordinates\":[",
            )?;
            self.first = Some(position);
        } else {
            self.out.write_all(b",")?;
        }
        serde_json::to_writer(&mut self.out, &position)?;
        self.positions += 1;
        Ok(())
    }

    fn finish(mut self, properties: &Value) -> std::io::Result<()> {
        match (self.positions, self.first) {
            (0, _) | (_, None) => self
                .out
                .write_all(b"{\"type\":\"Feature\",\"geometry\":null")?,
            (1, Some(first)) => {
                self.out.write_all(b",")?;
                serde_json::to_writer(&mut self.out, &first)?;
                self.out.write_all(b"]}")?;
            }
            _ => self.out.write_all(b"]}")?,
        }
        self.out.write_all(b",\"properties\":")?;
        serde_json::to_writer(&mut self.out, properties)?;
        self.out.write_all(b"}")
    }
}

/// Trips and stays turned into rows and properties, checked without a gateway.
#[cfg(test)]
mod tests {
    use super::*;

    fn line(positions: &[[f64; 2]]) -> Value {
        let mut bytes = Vec::new();
        let mut writer = LineWriter::new(&mut bytes);
        for p in positions {
            writer.position(*p).unwrap();
        }
        writer.finish(&json!({"n": positions.len()})).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn line_features_are_valid_for_any_count() {
        assert_eq!(line(&[])["geometry"], Value::Null);
        assert_eq!(
            line(&[[1.0, 2.0]])["geometry"]["coordinates"],
            json!([[1.0, 2.0], [1.0, 2.0]])
        );
        let three = line(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        assert_eq!(three["geometry"]["type"], "LineString");
        assert_eq!(three["geometry"]["coordinates"][2], json!([5.0, 6.0]));
        assert_eq!(three["properties"]["n"], 3);
    }

    #[test]
    fn stay_rows_for_humans_and_programs() {
        let stay = Stay {
            place_id: "p3".into(),
            lat: 36.9,
            lon: -76.3,
            start_ms: 1_593_475_200_000,
            end_ms: 1_593_480_600_000,
            fixes: 90,
            device_id: "v1".into(),
        };
        let human = strip(vec![stay_row(&stay, false)]);
        assert_eq!(
            human[0],
            [
                "p3",
                "36.90000",
                "-76.30000",
                "2020-06-30T00:00:00Z",
                "2020-06-30T01:30:00Z",
                "1h 30m",
                "90"
            ]
        );
        assert_eq!(human[0].len(), STAY_HEADER.len() - 4);
        let machine = stay_row(&stay, true);
        assert_eq!(machine.len(), STAY_HEADER.len());
        assert_eq!(
            (machine[0].as_str(), machine[9].as_str()),
            ("v1", "5400000")
        );
    }
}
