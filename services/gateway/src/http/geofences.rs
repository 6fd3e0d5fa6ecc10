//! Geofences and events over JSON: `/v1/geofences` (create, list, get, delete) and
//! `/v1/events`, calling the same gateway methods as gRPC, in proto3 JSON.

use axum::extract::{Path, Request, State};
use serde_json::{Map, Value, json};
use tonic::Code;
use trackmesh_proto::v1::{
    Circle, DeleteGeofenceRequest, Event, EventType, Geofence, GetEventsRequest,
    ListGeofencesRequest, gateway_server::Gateway as _,
};
use trackmesh_shared::domain::Invalid;

use super::{
    api::{Answer, Api, Caller, Failure, body, json_list, json_response},
    fields::json,
};
use crate::auth::Scope;

/// A fence's JSON: polygons of 1 000 vertices with long numbers fit with room.
const GEOFENCE_BODY_BYTES: usize = 256 * 1024;

/// `POST /v1/geofences` with a `Geofence` (the id is assigned).
pub(super) async fn create(State(api): State<Api>, request: Request) -> Answer {
    let (tenant, _slot) = api.admit(request.headers(), Scope::Full)?;
    let body = body(request, GEOFENCE_BODY_BYTES).await?;
    let geofence = parse_geofence(&body)?;
    let created = api
        .service
        .create_geofence(super::api::request(tenant, geofence))
        .await?
        .into_inner();
    Ok(json_response(&geofence_json(&created)))
}

/// `GET /v1/geofences`: the tenant's fences, oldest first.
pub(super) async fn list(caller: Caller) -> Answer {
    Ok(json_list(
        "geofences",
        &fences(&caller).await?,
        geofence_json,
    ))
}

/// The caller's fences.
async fn fences(caller: &Caller) -> Result<Vec<Geofence>, Failure> {
    let listed = caller.ask(ListGeofencesRequest {}, async |s, r| {
        s.list_geofences(r).await
    });
    Ok(listed.await?.geofences)
}

/// `GET /v1/geofences/{id}`.
pub(super) async fn get(Path(id): Path<String>, caller: Caller) -> Answer {
    let fences = fences(&caller).await?;
    let fence = fences
        .iter()
        .find(|g| g.geofence_id == id)
        .ok_or_else(|| Failure::new(Code::NotFound, format!("geofence_id: no fence {id:?}")))?;
    Ok(json_response(&geofence_json(fence)))
}

/// `DELETE /v1/geofences/{id}` (idempotent).
pub(super) async fn delete(Path(id): Path<String>, caller: Caller) -> Answer {
    let message = DeleteGeofenceRequest { geofence_id: id };
    let deleted = caller.ask(message, async |s, r| s.delete_geofence(r).await);
    Ok(json_response(&json!({ "existed": deleted.await?.existed })))
}

/// `GET /v1/events?device_id=&from_ms=&to_ms=&types=ENTER,EXIT`.
pub(super) async fn events(caller: Caller) -> Answer {
    let types = caller
        .param("types")
        .unwrap_or_default()
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|name| {
            EventType::from_str_name(name.trim())
                .filter(|t| *t != EventType::Unspecified)
                .map(|t| t as i32)
                .ok_or_else(|| {
                    let rule = format!("{name:?} is not one of ENTER, EXIT, ARRIVE, DEPART");
                    Invalid::new("types", rule)
                })
        })
        .collect::<Result<Vec<i32>, Invalid>>()?;
    let query = GetEventsRequest {
        device_id: caller.param("device_id").unwrap_or_default().to_owned(),
        from_ms: caller.number("from_ms")?,
        to_ms: caller.number("to_ms")?,
        types,
    };
    let events = caller.ask(query, async |s, r| s.get_events(r).await);
    Ok(json_list("events", &events.await?.events, event_json))
}

/// A `Geofence` in proto3 JSON (lowerCamelCase or the proto names). `polygonGeojson` may be
/// the GeoJSON text or the geometry object itself.
fn parse_geofence(body: &[u8]) -> Result<Geofence, Invalid> {
    let Value::Object(fields) = json::parse(body)? else {
        return Err(Invalid::new("body", "a JSON object (a Geofence)"));
    };
    let mut geofence = Geofence::default();
    for (name, value) in &fields {
        match name.as_str() {
            "name" => geofence.name = string(name, value)?,
            "circle" => geofence.circle = Some(circle(value)?),
            "polygonGeojson" | "polygon_geojson" => {
                geofence.polygon_geojson = match value {
                    Value::String(text) => text.clone(),
                    Value::Object(_) => value.to_string(),
                    _ => return Err(Invalid::new(name, "GeoJSON text or a Polygon object")),
                }
            }
            "deviceIds" | "device_ids" => {
                let Value::Array(ids) = value else {
                    return Err(Invalid::new(name, "an array of device ids"));
                };
                geofence.device_ids = ids
                    .iter()
                    .map(|id| string(name, id))
                    .collect::<Result<_, _>>()?;
            }
            // Assigned by the service; accepted so that a listed fence can be sent back.
            "geofenceId" | "geofence_id" | "createdMs" | "created_ms" => {}
            _ => return Err(Invalid::new(name, "not a field of Geofence")),
        }
    }
    Ok(geofence)
}

fn string(name: &str, value: &Value) -> Result<String, Invalid> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Invalid::new(name, "a string"))
}

fn circle(value: &Value) -> Result<Circle, Invalid> {
    let Value::Object(fields) = value else {
        return Err(Invalid::new("circle", "an object {lat, lon, radiusM}"));
    };
    let number = |names: &[&str]| -> Result<f64, Invalid> {
        names
            .iter()
            .find_map(|n| fields.get(*n))
            .and_then(Value::as_f64)
            .ok_or_else(|| Invalid::new(format!("circle.{}", names[0]), "a number"))
    };
    if let Some(name) = fields
        .keys()
        .find(|k| !["lat", "lon", "radiusM", "radius_m"].contains(&k.as_str()))
    {
        return Err(Invalid::new(
            format!("circle.{name}"),
            "not a field of Circle",
        ));
    }
    Ok(Circle {
        lat: number(&["lat"])?,
        lon: number(&["lon"])?,
        radius_m: number(&["radiusM", "radius_m"])?,
    })
}

fn geofence_json(geofence: &Geofence) -> Value {
    let mut out = Map::new();
    out.insert("geofenceId".into(), json!(geofence.geofence_id));
    out.insert("name".into(), json!(geofence.name));
    if let Some(c) = &geofence.circle {
        out.insert(
            "circle".into(),
            json!({ "lat": c.lat, "lon": c.lon, "radiusM": c.radius_m }),
        );
    }
    if !geofence.polygon_geojson.is_empty() {
        out.insert("polygonGeojson".into(), json!(geofence.polygon_geojson));
    }
    out.insert("deviceIds".into(), json!(geofence.device_ids));
    out.insert("createdMs".into(), json!(geofence.created_ms.to_string()));
    Value::Object(out)
}

/// An `Event` in proto3 JSON (also a Watch message's `event`).
pub fn event_json(event: &Event) -> Value {
    let kind = EventType::try_from(event.r#type).unwrap_or_default();
    let mut out = json!({
        "type": kind.as_str_name(),
        "deviceId": event.device_id,
        "timeMs": event.time_ms.to_string(),
        "lat": event.lat,
        "lon": event.lon,
    });
    if !event.geofence_id.is_empty() {
        out["geofenceId"] = json!(event.geofence_id);
    }
    if !event.place_id.is_empty() {
        out["placeId"] = json!(event.place_id);
    }
    if let Some(fix) = &event.fix {
        let mut value = json!({
            "deviceId": fix.device_id,
            "timeMs": fix.time_ms.to_string(),
            "lat": fix.lat,
            "lon": fix.lon,
        });
        for (name, field) in [
            ("accuracyM", fix.accuracy_m),
            ("speedMps", fix.speed_mps),
            ("headingDeg", fix.heading_deg),
            ("altitudeM", fix.altitude_m),
        ] {
            if let Some(field) = field {
                value[name] = json!(field);
            }
        }
        out["fix"] = value;
    }
    out
}
