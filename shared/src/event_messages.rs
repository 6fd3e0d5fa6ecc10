//! The values of learning's events topic (read by storage and the gateway's live streams) and
//! geofences topic (read back by learning), in an encoding of their own: each message has the
//! tags its public counterpart had when the topics left the public API, so values written
//! before decode (see the fixtures), and the public API may change without changing them.

use trackmesh_proto::v1 as proto;

use crate::domain::{Fix, convert};

/// One device's events, closed stays and trips of one observation (or of a rebuild's chunk),
/// in time order; the key is `tenant/device`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TenantEvents {
    #[prost(string, tag = "1")]
    pub tenant_id: String,
    #[prost(message, repeated, tag = "2")]
    pub events: Vec<Event>,
    #[prost(message, repeated, tag = "3")]
    pub stays: Vec<Stay>,
    #[prost(message, repeated, tag = "4")]
    pub trips: Vec<Trip>,
}

/// The numbers are part of the encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum EventType {
    Unspecified = 0,
    Enter = 1,
    Exit = 2,
    Arrive = 3,
    Depart = 4,
}

impl EventType {
    /// The name in the public API (`ENTER`, `DEPART`, …), for metrics and logs.
    pub fn name(self) -> &'static str {
        proto::EventType::try_from(self as i32).map_or("UNKNOWN", |t| t.as_str_name())
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(enumeration = "EventType", tag = "1")]
    pub r#type: i32,
    #[prost(string, tag = "2")]
    pub device_id: String,
    #[prost(string, tag = "3")]
    pub geofence_id: String,
    #[prost(string, tag = "4")]
    pub place_id: String,
    #[prost(int64, tag = "5")]
    pub time_ms: i64,
    #[prost(double, tag = "6")]
    pub lat: f64,
    #[prost(double, tag = "7")]
    pub lon: f64,
    #[prost(message, optional, tag = "8")]
    pub fix: Option<Fix>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Stay {
    #[prost(string, tag = "1")]
    pub place_id: String,
    #[prost(double, tag = "2")]
    pub lat: f64,
    #[prost(double, tag = "3")]
    pub lon: f64,
    #[prost(int64, tag = "4")]
    pub start_ms: i64,
    #[prost(int64, tag = "5")]
    pub end_ms: i64,
    #[prost(uint32, tag = "6")]
    pub fixes: u32,
    #[prost(string, tag = "7")]
    pub device_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Trip {
    #[prost(message, optional, tag = "1")]
    pub from_place: Option<Place>,
    #[prost(message, optional, tag = "2")]
    pub to_place: Option<Place>,
    #[prost(int64, tag = "3")]
    pub start_ms: i64,
    #[prost(int64, tag = "4")]
    pub end_ms: i64,
    #[prost(double, tag = "5")]
    pub distance_m: f64,
    #[prost(double, tag = "6")]
    pub max_speed_kmh: f64,
    #[prost(double, tag = "7")]
    pub mean_speed_kmh: f64,
    #[prost(uint32, tag = "8")]
    pub fixes: u32,
    #[prost(string, tag = "9")]
    pub device_id: String,
}

/// The numbers are part of the encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum PlaceLabel {
    Unspecified = 0,
    Home = 1,
    Work = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Place {
    #[prost(string, tag = "1")]
    pub place_id: String,
    #[prost(double, tag = "2")]
    pub lat: f64,
    #[prost(double, tag = "3")]
    pub lon: f64,
    #[prost(uint32, tag = "4")]
    pub visits: u32,
    #[prost(int64, tag = "5")]
    pub total_dwell_ms: i64,
    #[prost(int64, tag = "6")]
    pub first_visit_ms: i64,
    #[prost(int64, tag = "7")]
    pub last_visit_ms: i64,
    #[prost(enumeration = "PlaceLabel", tag = "8")]
    pub label: i32,
    #[prost(int64, repeated, tag = "9")]
    pub dwell_by_hour_ms: Vec<i64>,
}

/// A fence of a tenant; the key is `tenant/id`, and a deleted fence leaves a tombstone.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TenantGeofence {
    #[prost(string, tag = "1")]
    pub tenant_id: String,
    #[prost(message, optional, tag = "2")]
    pub geofence: Option<Geofence>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Geofence {
    #[prost(string, tag = "1")]
    pub geofence_id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, optional, tag = "3")]
    pub circle: Option<Circle>,
    #[prost(string, tag = "4")]
    pub polygon_geojson: String,
    #[prost(string, repeated, tag = "5")]
    pub device_ids: Vec<String>,
    #[prost(int64, tag = "6")]
    pub created_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Circle {
    #[prost(double, tag = "1")]
    pub lat: f64,
    #[prost(double, tag = "2")]
    pub lon: f64,
    #[prost(double, tag = "3")]
    pub radius_m: f64,
}

// Enum numbers are equal on both sides while the public ones keep theirs: the fixture test
// decodes old values and compares them with public messages built from the public enums.
convert! {
    proto::Event => Event { r#type, device_id, geofence_id, place_id, time_ms, lat, lon } map fix;
    Event => proto::Event { r#type, device_id, geofence_id, place_id, time_ms, lat, lon } map fix;
    proto::Stay => Stay { place_id, lat, lon, start_ms, end_ms, fixes, device_id };
    Stay => proto::Stay { place_id, lat, lon, start_ms, end_ms, fixes, device_id };
    proto::Trip => Trip { start_ms, end_ms, distance_m, max_speed_kmh, mean_speed_kmh, fixes, device_id }
        map from_place, to_place;
    Trip => proto::Trip { start_ms, end_ms, distance_m, max_speed_kmh, mean_speed_kmh, fixes, device_id }
        map from_place, to_place;
    proto::Place => Place {
        place_id, lat, lon, visits, total_dwell_ms, first_visit_ms, last_visit_ms, label, dwell_by_hour_ms
    };
    Place => proto::Place {
        place_id, lat, lon, visits, total_dwell_ms, first_visit_ms, last_visit_ms, label, dwell_by_hour_ms
    };
    proto::TenantGeofence => TenantGeofence { tenant_id } map geofence;
    TenantGeofence => proto::TenantGeofence { tenant_id } map geofence;
    proto::Geofence => Geofence { geofence_id, name, polygon_geojson, device_ids, created_ms } map circle;
    Geofence => proto::Geofence { geofence_id, name, polygon_geojson, device_ids, created_ms } map circle;
    proto::Circle => Circle { lat, lon, radius_m };
    Circle => proto::Circle { lat, lon, radius_m };
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// An events value and two fence values as the release before this encoding wrote them,
    /// when they were the public API's `TenantEvents` and `TenantGeofence`.
    #[test]
    fn values_written_by_the_previous_release_decode() {
        let events =
            TenantEvents::decode(&include_bytes!("../tests/fixtures/tenant-events-v1.bin")[..])
                .unwrap();
        assert_eq!(events.tenant_id, "demo");
        let public: Vec<proto::Event> = events.events.into_iter().map(Into::into).collect();
        assert_eq!(public.len(), 2);
        assert_eq!(public[0].r#type(), proto::EventType::Enter);
        assert_eq!(public[0].geofence_id, "g-1");
        let fix = public[0].fix.as_ref().unwrap();
        assert_eq!(
            (fix.time_ms, fix.lat, fix.lon),
            (1_764_547_200_000, 40.64, -74.07)
        );
        assert_eq!(
            (fix.accuracy_m, fix.speed_mps, fix.heading_deg),
            (Some(4.0), Some(6.5), None)
        );
        assert_eq!(public[1].r#type(), proto::EventType::Depart);
        assert_eq!(
            (public[1].place_id.as_str(), public[1].fix.is_none()),
            ("p-2", true)
        );
        let stay = proto::Stay::from(events.stays[0].clone());
        assert_eq!((stay.place_id.as_str(), stay.fixes), ("p-2", 42));
        assert_eq!(
            (stay.start_ms, stay.end_ms),
            (1_764_540_000_000, 1_764_547_210_000)
        );
        let trip = proto::Trip::from(events.trips[0].clone());
        let (from, to) = (trip.from_place.unwrap(), trip.to_place.unwrap());
        assert_eq!(
            (from.label(), to.label()),
            (proto::PlaceLabel::Home, proto::PlaceLabel::Work)
        );
        assert_eq!(to.dwell_by_hour_ms, [0, 60_000, 3_600_000]);
        assert_eq!((trip.distance_m, trip.fixes), (5_550.5, 120));
        assert_eq!(trip.device_id, "366952790");

        let circle = proto::TenantGeofence::from(
            TenantGeofence::decode(
                &include_bytes!("../tests/fixtures/tenant-geofence-circle-v1.bin")[..],
            )
            .unwrap(),
        );
        let fence = circle.geofence.unwrap();
        assert_eq!(
            (circle.tenant_id.as_str(), fence.name.as_str()),
            ("demo", "Pier 7")
        );
        assert_eq!(fence.circle.unwrap().radius_m, 200.0);
        assert_eq!(fence.device_ids, ["366952790", "truck/7"]);
        let polygon = TenantGeofence::decode(
            &include_bytes!("../tests/fixtures/tenant-geofence-polygon-v1.bin")[..],
        )
        .unwrap();
        let fence = polygon.geofence.unwrap();
        assert!(fence.circle.is_none() && fence.device_ids.is_empty());
        assert!(fence.polygon_geojson.starts_with(r#"{"type":"Polygon""#));
    }

    /// Version 1 is the public messages' encoding at the split, both ways.
    #[test]
    fn convert_both_ways_and_encode_as_the_public_messages() {
        let place = proto::Place {
            place_id: "p-1".into(),
            lat: 1.5,
            label: proto::PlaceLabel::Work as i32,
            dwell_by_hour_ms: vec![1, 2],
            ..proto::Place::default()
        };
        let public = proto::Trip {
            from_place: Some(place.clone()),
            to_place: Some(place),
            distance_m: 3.0,
            device_id: "d".into(),
            ..proto::Trip::default()
        };
        let stored = Trip::from(public.clone());
        assert_eq!(stored.encode_to_vec(), public.encode_to_vec());
        assert_eq!(proto::Trip::from(stored), public);

        let public = proto::Event {
            r#type: proto::EventType::Arrive as i32,
            fix: Some(proto::Fix {
                device_id: "d".into(),
                speed_mps: Some(1.0),
                ..proto::Fix::default()
            }),
            ..proto::Event::default()
        };
        let stored = Event::from(public.clone());
        assert_eq!(stored.r#type(), EventType::Arrive);
        assert_eq!(stored.encode_to_vec(), public.encode_to_vec());
        assert_eq!(proto::Event::from(stored), public);
    }
}
