//! GeoJSON (RFC 7946) output: tracks and places that open in any map tool.
//! Coordinates are `[lon, lat]`.

use std::io::Write;

use serde_json::{Value, json};
use trackmesh_proto::v1::{Place, PlaceLabel, RefinedFix};

use crate::time::{format_duration_ms, format_ms};

/// Writes a track as a FeatureCollection with one LineString Feature per
/// segment, as the fixes stream in: only the current segment is held in memory.
/// A segment of a single fix becomes a Point (a LineString needs two positions).
pub struct TrackWriter<W: Write> {
    out: W,
    device_id: String,
    segment: Option<Segment>,
    features: usize,
}

struct Segment {
    number: u32,
    coordinates: Vec<[f64; 2]>,
    first_ms: i64,
    last_ms: i64,
    distance_m: f64,
    max_speed_kmh: f64,
}

impl<W: Write> TrackWriter<W> {
    pub fn new(mut out: W, device_id: &str) -> std::io::Result<Self> {
        out.write_all(b"{\"type\":\"FeatureCollection\",\"features\":[")?;
        Ok(Self {
            out,
            device_id: device_id.to_owned(),
            segment: None,
            features: 0,
        })
    }

    pub fn push(&mut self, refined: &RefinedFix) -> std::io::Result<()> {
        let Some(fix) = &refined.fix else {
            return Ok(());
        };
        if self
            .segment
            .as_ref()
            .is_some_and(|s| s.number != refined.segment)
        {
            self.flush_segment()?;
        }
        let position = [fix.lon, fix.lat];
        match &mut self.segment {
            Some(segment) => {
                segment.coordinates.push(position);
                segment.last_ms = fix.time_ms;
                segment.distance_m += refined.distance_m;
                segment.max_speed_kmh = segment.max_speed_kmh.max(refined.speed_kmh);
            }
            None => {
                self.segment = Some(Segment {
                    number: refined.segment,
                    coordinates: vec![position],
                    first_ms: fix.time_ms,
                    last_ms: fix.time_ms,
                    // The first fix's distance leads to it from the previous segment.
                    distance_m: 0.0,
                    max_speed_kmh: 0.0,
                });
            }
        }
        Ok(())
    }

    fn flush_segment(&mut self) -> std::io::Result<()> {
        let Some(segment) = self.segment.take() else {
            return Ok(());
        };
        let geometry = if segment.coordinates.len() == 1 {
            json!({"type": "Point", "coordinates": segment.coordinates[0]})
        } else {
            json!({"type": "LineString", "coordinates": segment.coordinates})
        };
        let feature = json!({
            "type": "Feature",
            "geometry": geometry,
            "properties": {
                "device_id": self.device_id,
                "segment": segment.number,
                "first_time": format_ms(segment.first_ms),
                "last_time": format_ms(segment.last_ms),
                "first_ms": segment.first_ms,
                "last_ms": segment.last_ms,
                "fixes": segment.coordinates.len(),
                "distance_m": (segment.distance_m * 10.0).round() / 10.0,
                "max_speed_kmh": (segment.max_speed_kmh * 10.0).round() / 10.0,
            },
        });
        self.out
            .write_all(if self.features == 0 { b"\n" } else { b",\n" })?;
        serde_json::to_writer(&mut self.out, &feature)?;
        self.features += 1;
        Ok(())
    }

    /// Ends the collection; returns the writer and the number of features.
    pub fn finish(mut self) -> std::io::Result<(W, usize)> {
        self.flush_segment()?;
        self.out.write_all(b"\n]}\n")?;
        self.out.flush()?;
        Ok((self.out, self.features))
    }
}

/// `home`, `work` or null.
pub fn label_name(label: i32) -> Option<&'static str> {
    match PlaceLabel::try_from(label) {
        Ok(PlaceLabel::Home) => Some("home"),
        Ok(PlaceLabel::Work) => Some("work"),
        _ => None,
    }
}

/// A place as Point Feature properties (without geometry).
pub fn place_properties(device_id: &str, rank: usize, place: &Place) -> Value {
    json!({
        "device_id": device_id,
        "place_id": place.place_id,
        "rank": rank,
        "label": label_name(place.label),
        "visits": place.visits,
        "total_dwell_ms": place.total_dwell_ms,
        "total_dwell": format_duration_ms(place.total_dwell_ms),
        "first_visit": format_ms(place.first_visit_ms),
        "last_visit": format_ms(place.last_visit_ms),
    })
}

/// Places as a FeatureCollection of Points, most dwell first (as the gateway orders them).
pub fn places(device_id: &str, places: &[Place]) -> Value {
    let features: Vec<Value> = places
        .iter()
        .enumerate()
        .map(|(i, place)| {
            json!({
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [place.lon, place.lat]},
                "properties": place_properties(device_id, i + 1, place),
            })
        })
        .collect();
    json!({"type": "FeatureCollection", "features": features})
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::{Fix, Verdict};

    use super::*;

    fn refined(segment: u32, time_ms: i64, lon: f64, lat: f64, distance_m: f64) -> RefinedFix {
        RefinedFix {
            fix: Some(Fix {
                device_id: "v1".into(),
                time_ms,
                lat,
                lon,
                ..Default::default()
            }),
            verdict: Verdict::Accepted as i32,
            segment,
            distance_m,
            speed_kmh: distance_m / 1000.0 * 3600.0,
            ..Default::default()
        }
    }

    fn track(fixes: &[RefinedFix]) -> Value {
        let mut writer = TrackWriter::new(Vec::new(), "v1").unwrap();
        for fix in fixes {
            writer.push(fix).unwrap();
        }
        let (bytes, _) = writer.finish().unwrap();
        serde_json::from_slice(&bytes).expect("valid JSON")
    }

    #[test]
    fn one_linestring_feature_per_segment() {
        let collection = track(&[
            refined(0, 1_000, -74.0, 40.0, 0.0),
            refined(0, 2_000, -74.001, 40.001, 140.0),
            refined(0, 3_000, -74.002, 40.002, 140.0),
            refined(1, 90_000_000, -73.0, 41.0, 120_000.0),
            refined(1, 90_001_000, -73.001, 41.0, 84.0),
            refined(2, 200_000_000, -72.0, 42.0, 5.0),
        ]);
        assert_eq!(collection["type"], "FeatureCollection");
        let features = collection["features"].as_array().unwrap();
        assert_eq!(features.len(), 3);

        let first = &features[0];
        assert_eq!(first["type"], "Feature");
        assert_eq!(first["geometry"]["type"], "LineString");
        assert_eq!(
            first["geometry"]["coordinates"],
            json!([[-74.0, 40.0], [-74.001, 40.001], [-74.002, 40.002]]),
            "[lon, lat]"
        );
        let props = &first["properties"];
        assert_eq!(props["device_id"], "v1");
        assert_eq!(props["segment"], 0);
        assert_eq!(props["fixes"], 3);
        assert_eq!(props["first_time"], "1970-01-01T00:00:01Z");
        assert_eq!(props["last_time"], "1970-01-01T00:00:03Z");
        assert_eq!(props["distance_m"], 280.0);

        let second = &features[1]["properties"];
        assert_eq!(
            (second["segment"].as_u64(), second["fixes"].as_u64()),
            (Some(1), Some(2))
        );
        assert_eq!(
            second["distance_m"], 84.0,
            "the jump into a segment is not part of it"
        );

        assert_eq!(
            features[2]["geometry"]["type"], "Point",
            "a one-fix segment"
        );
        assert_eq!(features[2]["geometry"]["coordinates"], json!([-72.0, 42.0]));
    }

    #[test]
    fn empty_track_is_an_empty_collection() {
        let collection = track(&[]);
        assert_eq!(
            collection,
            json!({"type": "FeatureCollection", "features": []})
        );
    }

    #[test]
    fn places_are_points_with_properties() {
        let place = Place {
            place_id: "p1".into(),
            lat: 40.7,
            lon: -74.0,
            visits: 3,
            total_dwell_ms: 7_200_000,
            first_visit_ms: 1_593_475_200_000,
            last_visit_ms: 1_593_475_200_000,
            label: PlaceLabel::Home as i32,
            ..Default::default()
        };
        let collection = places("v1", &[place]);
        let feature = &collection["features"][0];
        assert_eq!(
            feature["geometry"],
            json!({"type": "Point", "coordinates": [-74.0, 40.7]})
        );
        let props = &feature["properties"];
        assert_eq!(props["place_id"], "p1");
        assert_eq!(props["label"], "home");
        assert_eq!(props["visits"], 3);
        assert_eq!(props["total_dwell"], "2h 00m");
        assert_eq!(props["rank"], 1);
        assert_eq!(props["first_visit"], "2020-06-30T00:00:00Z");
    }
}
