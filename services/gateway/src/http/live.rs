//! Live fixes over Server-Sent Events: `GET /v1/live` streams the caller's Watch, one JSON
//! `WatchMessage` per event with its resume token as the event id (so a browser's
//! `EventSource` resumes by itself through `Last-Event-ID`). Browsers cannot set headers on an
//! `EventSource`: they get a short-lived read-only token from `POST /v1/live/token` (with the
//! API key) and pass it as `?token=`; an API key is never taken from a URL.

use std::{convert::Infallible, time::Duration};

use axum::{
    extract::State,
    http::{HeaderMap, Uri},
    response::{
        IntoResponse as _,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::StreamExt as _;
use serde_json::json;
use tonic::{Code, Status};
use trackmesh_proto::v1::{BoundingBox, WatchMessage, WatchRequest, watch_message::Item};
use trackmesh_shared::domain::now_ms;

use super::{
    api::{Answer, Api, Failure, code_name, json_response},
    geofences, osmand,
};
use crate::{auth::Scope, export::refined_json};

/// `POST /v1/live/token`: a read-only stream token for the caller's tenant.
pub async fn token(State(api): State<Api>, headers: HeaderMap) -> Answer {
    let (tenant, _slot) = api.admit(&headers, Scope::Full)?;
    let (token, expires_ms) = api.stream_tokens.issue(&tenant, now_ms());
    Ok(json_response(
        &json!({ "token": token, "expiresMs": expires_ms.to_string() }),
    ))
}

/// `GET /v1/live?device_id=&bbox=min_lon,min_lat,max_lon,max_lat&token=&resume_token=`.
pub async fn stream(State(api): State<Api>, headers: HeaderMap, uri: Uri) -> Answer {
    let params = osmand::decode_form(uri.query().unwrap_or_default().as_bytes())?;
    let param = |name: &str| {
        params
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    let tenant = match param("token") {
        Some(token) => api.stream_tokens.verify(token, now_ms())?,
        None => api.admission.credentials().tenant(&headers, Scope::Full)?,
    };
    let slot = api.admission.stream_slot(&tenant)?;
    let request = WatchRequest {
        device_ids: params
            .iter()
            .filter(|(key, _)| key == "device_id")
            .map(|(_, value)| value.clone())
            .collect(),
        bbox: param("bbox").map(bbox).transpose()?,
        // A browser's own reconnect carries the last event's id.
        resume_token: param("resume_token")
            .or_else(|| headers.get("last-event-id").and_then(|v| v.to_str().ok()))
            .unwrap_or_default()
            .to_owned(),
    };
    let watch = api.service.watch_as(tenant, request)?;
    // The stream holds the tenant's slot for its life. An error is its last event (the
    // gateway shuts down): the client reconnects, to another replica if need be.
    let events = watch.map(move |message| {
        let _held = &slot;
        Ok::<_, Infallible>(match message {
            Ok(message) => event(&message),
            Err(status) => error_event(&status),
        })
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// `min_lon,min_lat,max_lon,max_lat`, the order of GeoJSON and most map libraries.
fn bbox(text: &str) -> Result<BoundingBox, Failure> {
    let numbers: Vec<f64> = text
        .split(',')
        .map(|n| n.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()
        .filter(|n: &Vec<f64>| n.len() == 4)
        .ok_or_else(|| {
            Failure::new(
                Code::InvalidArgument,
                "bbox: four numbers min_lon,min_lat,max_lon,max_lat",
            )
        })?;
    Ok(BoundingBox {
        min_lon: numbers[0],
        min_lat: numbers[1],
        max_lon: numbers[2],
        max_lat: numbers[3],
    })
}

fn event(message: &WatchMessage) -> Event {
    let mut data = String::from("{");
    match &message.item {
        Some(Item::Fix(fix)) => {
            data.push_str("\"fix\":");
            refined_json(&mut data, fix);
            data.push(',');
        }
        Some(Item::Lag(lag)) => {
            data.push_str(&format!("\"lag\":{{\"dropped\":\"{}\"}},", lag.dropped));
        }
        Some(Item::Event(event)) => {
            data.push_str(&format!("\"event\":{},", geofences::event_json(event)));
        }
        None => {}
    }
    data.push_str(&format!(
        "\"resumeToken\":{}}}",
        json!(message.resume_token)
    ));
    Event::default().id(&message.resume_token).data(data)
}

fn error_event(status: &Status) -> Event {
    let body = json!({ "code": code_name(status.code()), "message": status.message() });
    Event::default().event("error").data(body.to_string())
}
