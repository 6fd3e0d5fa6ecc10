//! Stays, trips, relearn and reseed over JSON: `GET /v1/devices/{id}/stays|trips`,
//! `POST /v1/relearn` (NDJSON progress, streamed) and `POST /v1/reseed`, calling the same
//! gateway methods as gRPC, in proto3 JSON.

use axum::{
    body::{Body, Bytes},
    extract::{Path, Request, State},
    http::{HeaderValue, header},
    response::Response,
};
use futures::StreamExt as _;
use serde_json::{Map, Value, json};
use tonic::Status;
use trackmesh_proto::v1::{
    GetStaysRequest, GetTripsRequest, RelearnProgress, RelearnRequest, ReseedRequest, Stay, Trip,
    gateway_server::Gateway as _,
};
use trackmesh_shared::domain::Invalid;

use super::{
    api::{Answer, Api, Caller, body, code_name, json_list, json_response, place_json},
    fields::json,
};
use crate::{auth::Scope, guard::QUERY_MESSAGE_BYTES};

/// `GET /v1/devices/{id}/stays?from=&to=` (Unix ms; `to` 0 or absent: no bound): the closed
/// stays that overlap the range, in time order.
pub(super) async fn stays(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let (from_ms, to_ms) = caller.range()?;
    let message = GetStaysRequest {
        device_id,
        from_ms,
        to_ms,
    };
    let answer = caller.ask(message, async |s, r| s.get_stays(r).await);
    Ok(json_list("stays", &answer.await?.stays, stay_json))
}

/// `GET /v1/devices/{id}/trips?from=&to=`: the trips between consecutive stays that overlap
/// the range, in time order.
pub(super) async fn trips(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let (from_ms, to_ms) = caller.range()?;
    let message = GetTripsRequest {
        device_id,
        from_ms,
        to_ms,
    };
    let answer = caller.ask(message, async |s, r| s.get_trips(r).await);
    Ok(json_list("trips", &answer.await?.trips, trip_json))
}

/// `POST /v1/relearn` with `{"device_ids":[..]}` or `{"all_devices":true}`, and optionally
/// `"from_ms"`: one `RelearnProgress` per line (`application/x-ndjson`), streamed as the
/// devices progress. The call holds one of the tenant's TENANT_MAX_STREAMS slots, like gRPC
/// `Relearn`. An error before the first message is an HTTP error; after it, the last line is
/// `{"error":{"code":..,"message":..}}`.
pub(super) async fn relearn(State(api): State<Api>, request: Request) -> Answer {
    let tenant = api
        .admission
        .credentials()
        .tenant(request.headers(), Scope::Full)?;
    let slot = api.admission.stream_slot(&tenant)?;
    let body = body(request, QUERY_MESSAGE_BYTES).await?;
    let fields = parse_devices(&body, "RelearnRequest", &["from_ms", "fromMs"])?;
    let message = RelearnRequest {
        device_ids: fields.device_ids,
        all_devices: fields.all_devices,
        from_ms: fields.from_ms,
    };
    let mut progress = api.service.relearn_as(tenant, message)?;
    // The first message decides the status: a downstream that is down is a 503, not a 200
    // with an error line.
    let first = match progress.next().await {
        Some(Err(status)) => return Err(status.into()),
        first => first,
    };
    let lines = futures::stream::iter(first)
        .chain(progress)
        .map(move |message| {
            // The stream holds the tenant's slot for its life.
            let _held = &slot;
            Ok::<_, std::convert::Infallible>(Bytes::from(match message {
                Ok(message) => format!("{}\n", progress_json(&message)),
                Err(status) => format!("{}\n", error_json(&status)),
            }))
        });
    let mut response = Response::new(Body::from_stream(lines));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// `POST /v1/reseed` with `{"device_ids":[..]}` or `{"all_devices":true}`: the
/// `ReseedResponse`.
pub(super) async fn reseed(State(api): State<Api>, request: Request) -> Answer {
    let (tenant, _slot) = api.admit(request.headers(), Scope::Full)?;
    let body = body(request, QUERY_MESSAGE_BYTES).await?;
    let fields = parse_devices(&body, "ReseedRequest", &[])?;
    let message = ReseedRequest {
        device_ids: fields.device_ids,
        all_devices: fields.all_devices,
    };
    let response = api
        .service
        .reseed(super::api::request(tenant, message))
        .await?
        .into_inner();
    Ok(json_response(&json!({
        "seeded": response.seeded,
        "kept": response.kept,
        "withoutFixes": response.without_fixes,
    })))
}

/// The fields of a RelearnRequest or ReseedRequest body.
#[derive(Debug, Default, PartialEq)]
struct DeviceFields {
    device_ids: Vec<String>,
    all_devices: bool,
    from_ms: i64,
}

/// A RelearnRequest or ReseedRequest (`message`) in proto3 JSON: lowerCamelCase or the proto
/// names; `from_ms` (when in `extra`) a whole number or its decimal string. An empty body is
/// an empty message.
fn parse_devices(body: &[u8], message: &str, extra: &[&str]) -> Result<DeviceFields, Invalid> {
    let mut fields = DeviceFields::default();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(fields);
    }
    let Value::Object(members) = json::parse(body)? else {
        return Err(Invalid::new("body", format!("a JSON object (a {message})")));
    };
    for (name, value) in &members {
        if value.is_null() {
            continue;
        }
        match name.as_str() {
            "device_ids" | "deviceIds" => {
                let Value::Array(ids) = value else {
                    return Err(Invalid::new(name, "an array of device ids"));
                };
                fields.device_ids = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        id.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| Invalid::new(format!("{name}[{i}]"), "a string"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "all_devices" | "allDevices" => {
                fields.all_devices = value
                    .as_bool()
                    .ok_or_else(|| Invalid::new(name, "true or false"))?;
            }
            other if extra.contains(&other) => fields.from_ms = whole_number(name, value)?,
            _ => return Err(Invalid::new(name, format!("not a field of {message}"))),
        }
    }
    Ok(fields)
}

/// An int64 of proto3 JSON: a number or a decimal string, whole.
fn whole_number(name: &str, value: &Value) -> Result<i64, Invalid> {
    let parsed = match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    };
    let quoted = || super::fields::quoted(&value.to_string());
    parsed.ok_or_else(|| Invalid::new(name, format!("a whole number of Unix ms ({})", quoted())))
}

// proto3 JSON of the answers: lowerCamelCase names, 64-bit integers as strings.

fn stay_json(stay: &Stay) -> Value {
    json!({
        "deviceId": stay.device_id,
        "placeId": stay.place_id,
        "lat": stay.lat,
        "lon": stay.lon,
        "startMs": stay.start_ms.to_string(),
        "endMs": stay.end_ms.to_string(),
        "fixes": stay.fixes,
    })
}

fn trip_json(trip: &Trip) -> Value {
    let mut out = Map::new();
    out.insert("deviceId".into(), json!(trip.device_id));
    if let Some(place) = &trip.from_place {
        out.insert("fromPlace".into(), place_json(place));
    }
    if let Some(place) = &trip.to_place {
        out.insert("toPlace".into(), place_json(place));
    }
    out.insert("startMs".into(), json!(trip.start_ms.to_string()));
    out.insert("endMs".into(), json!(trip.end_ms.to_string()));
    out.insert("distanceM".into(), json!(trip.distance_m));
    out.insert("maxSpeedKmh".into(), json!(trip.max_speed_kmh));
    out.insert("meanSpeedKmh".into(), json!(trip.mean_speed_kmh));
    out.insert("fixes".into(), json!(trip.fixes));
    Value::Object(out)
}

fn progress_json(progress: &RelearnProgress) -> Value {
    json!({
        "deviceId": progress.device_id,
        "fixes": progress.fixes.to_string(),
        "done": progress.done,
        "placesBefore": progress.places_before,
        "placesAfter": progress.places_after,
        "stays": progress.stays.to_string(),
        "devicesDone": progress.devices_done,
        "devicesTotal": progress.devices_total,
        "fixesTotal": progress.fixes_total.to_string(),
    })
}

fn error_json(status: &Status) -> Value {
    json!({ "error": { "code": code_name(status.code()), "message": status.message() } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_in_either_spelling() {
        let fields = parse_devices(
            br#"{"deviceIds":["a","b"],"fromMs":"1700000000000"}"#,
            "RelearnRequest",
            &["from_ms", "fromMs"],
        )
        .unwrap();
        assert_eq!(fields.device_ids, ["a", "b"]);
        assert_eq!(fields.from_ms, 1_700_000_000_000);
        let fields = parse_devices(
            br#"{"all_devices":true,"from_ms":5}"#,
            "RelearnRequest",
            &["from_ms", "fromMs"],
        )
        .unwrap();
        assert!(fields.all_devices && fields.from_ms == 5);
        assert_eq!(
            parse_devices(b" ", "ReseedRequest", &[]).unwrap(),
            DeviceFields::default()
        );
    }

    #[test]
    fn bad_bodies_name_the_field() {
        for (body, extra, field) in [
            (&br#"{"device_ids":"a"}"#[..], &[][..], "device_ids: "),
            (br#"{"deviceIds":["a",1]}"#, &[], "deviceIds[1]: "),
            (br#"{"all_devices":"yes"}"#, &[], "all_devices: "),
            (br#"{"from_ms":1}"#, &[], "from_ms: not a field of"),
            (
                br#"{"from_ms":1.5}"#,
                &["from_ms"],
                "from_ms: a whole number",
            ),
            (br#"[1]"#, &[], "body: "),
            (br#"{"#, &[], "body: not JSON"),
        ] {
            let err = parse_devices(body, "ReseedRequest", extra)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }
}
