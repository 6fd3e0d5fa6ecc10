//! The HTTP routes: device protocols (OsmAnd / Traccar Client, OwnTracks) and the JSON API,
//! served on the gateway's port beside gRPC. Each route authenticates from the headers (or the
//! URL token) and takes its tenant's slot before reading a byte of the body, reads the body
//! under a size limit, then calls the very `Gateway` method gRPC calls, so limits, coalescing
//! and error meanings are the same; this module only converts.

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{FromRequestParts, Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use futures::StreamExt as _;
use serde_json::{Value, json};
use tonic::{Code, Status};
use tonic_types::StatusExt as _;
use trackmesh_proto::v1::{
    DailyStat, DeleteDeviceRequest, DevicePlacesRequest, DevicePredictRequest, DeviceSummary, Fix,
    GetDailyStatsRequest, GetTrackRequest, IngestRequest, IngestResponse, ListDevicesRequest,
    Place, PlaceLabel, Prediction, SortField, gateway_server::Gateway as _,
};
use trackmesh_shared::domain::{Invalid, now_ms};

use super::{geofences, history, ingest_json, live, osmand, owntracks};
use crate::{
    auth::{Scope, StreamTokens},
    export::{Encoder, Format},
    guard::{Admission, Slot, Tenant},
    service::GatewayService,
};

/// Body limit of the device protocols: one fix, with room for the parameters apps add.
pub const DEVICE_BODY_BYTES: usize = 16 * 1024;

/// Body limit of `POST /v1/ingest`: `max_batch` fixes of up to 512 bytes of JSON each (every
/// field, long names, a 128-byte device id), plus room.
pub fn ingest_body_bytes(max_batch: u32) -> usize {
    usize::try_from(max_batch).unwrap_or(usize::MAX / 1024) * 512 + 64 * 1024
}

/// What the routes share.
#[derive(Clone)]
pub struct Api {
    pub service: GatewayService,
    pub admission: Admission,
    /// Body limit of `POST /v1/ingest`: MAX_BATCH fixes of generous JSON.
    pub ingest_body_bytes: usize,
    pub stream_tokens: StreamTokens,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/osmand/{token}", get(osmand_fix).post(osmand_fix))
        .route("/owntracks", post(owntracks_fix))
        .route("/v1/ingest", post(ingest))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", axum::routing::delete(delete_device))
        .route("/v1/devices/{id}/track", get(track))
        .route("/v1/devices/{id}/stats", get(stats))
        .route("/v1/devices/{id}/places", get(places))
        .route("/v1/devices/{id}/predict", get(predict))
        .route("/v1/devices/{id}/stays", get(history::stays))
        .route("/v1/devices/{id}/trips", get(history::trips))
        .route("/v1/relearn", post(history::relearn))
        .route("/v1/reseed", post(history::reseed))
        .route("/v1/live", get(live::stream))
        .route("/v1/live/token", post(live::token))
        .route(
            "/v1/geofences",
            get(geofences::list).post(geofences::create),
        )
        .route(
            "/v1/geofences/{id}",
            get(geofences::get).delete(geofences::delete),
        )
        .route("/v1/events", get(geofences::events))
        .with_state(api)
}

/// An HTTP error: the gRPC code's HTTP status, and a one-line JSON body.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    code: Code,
    message: String,
    retry_after_s: Option<u64>,
}

impl Failure {
    pub(super) fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: http_status(code),
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..Self::new(
                Code::ResourceExhausted,
                format!("body: over the limit of {limit} bytes"),
            )
        }
    }
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let retry_after_s = match status.code() {
            Code::ResourceExhausted | Code::Unavailable => Some(
                status
                    .get_details_retry_info()
                    .and_then(|info| info.retry_delay)
                    .map_or(1, |delay| delay.as_secs_f64().ceil().max(1.0) as u64),
            ),
            _ => None,
        };
        Self {
            status: http_status(status.code()),
            code: status.code(),
            message: status.message().to_owned(),
            retry_after_s,
        }
    }
}

impl From<Invalid> for Failure {
    fn from(bad: Invalid) -> Self {
        Self::new(Code::InvalidArgument, bad.to_string())
    }
}

impl From<crate::error::Error> for Failure {
    fn from(error: crate::error::Error) -> Self {
        Status::from(error).into()
    }
}

/// The HTTP status of a gRPC code.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = self.status;
        let body = json!({ "code": code_name(self.code), "message": self.message });
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            format!("{body}\n"),
        )
            .into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub(super) fn code_name(code: Code) -> String {
    // `Code`'s Debug is CamelCase; the JSON error uses gRPC's canonical names.
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

pub(super) type Answer = Result<Response, Failure>;

impl Api {
    /// The caller's tenant and slot, from the headers alone.
    pub(super) fn admit(
        &self,
        headers: &HeaderMap,
        scope: Scope,
    ) -> Result<(String, Slot), Failure> {
        let tenant = self.admission.credentials().tenant(headers, scope)?;
        let slot = self.admission.slot(&tenant)?;
        Ok((tenant, slot))
    }

    /// Sends `message` through the same path as gRPC `Ingest`.
    async fn ingest(
        &self,
        tenant: String,
        message: IngestRequest,
        protocol: &'static str,
    ) -> Result<IngestResponse, Failure> {
        let response = self
            .service
            .ingest(request(tenant, message))
            .await?
            .into_inner();
        for rejection in &response.rejections {
            let verdict = rejection.verdict();
            metrics::counter!("gateway_http_rejected_total", "protocol" => protocol, "verdict" => verdict.as_str_name())
                .increment(1);
        }
        Ok(response)
    }
}

fn one(fix: Fix) -> IngestRequest {
    IngestRequest {
        fixes: vec![fix],
        sequence: 0,
    }
}

/// A gRPC request as the guard hands it on: the tenant in its extensions.
pub(super) fn request<T>(tenant: String, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.extensions_mut().insert(Tenant(tenant));
    request
}

/// The body, refused with 413 beyond `limit` bytes (by its declared length before reading).
pub(super) async fn body(request: Request, limit: usize) -> Result<Bytes, Failure> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(Failure::too_large(limit));
    }
    axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| Failure::too_large(limit))
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// `GET|POST /osmand/<token>`: OsmAnd and Traccar Client. 200 once the fix is stored (or
/// refused by refinement, which a resend cannot change).
async fn osmand_fix(
    State(api): State<Api>,
    Path(token): Path<String>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Answer {
    let tenant = api
        .admission
        .credentials()
        .tenant_of(&token, Scope::Ingest)?;
    let _slot = api.admission.slot(&tenant)?;
    let json = is_json(request.headers());
    let form = request.method() == Method::POST && !json;
    let body = body(request, DEVICE_BODY_BYTES).await?;
    let fix = if json {
        osmand::parse_json(&body, now_ms())?
    } else {
        let mut pairs = osmand::decode_form(query.as_deref().unwrap_or_default().as_bytes())?;
        if form {
            pairs.extend(osmand::decode_form(&body)?);
        }
        osmand::parse_params(pairs, now_ms())?
    };
    api.ingest(tenant, one(fix), "osmand").await?;
    Ok(StatusCode::OK.into_response())
}

/// `POST /owntracks`: OwnTracks HTTP mode, Basic auth `tenant:ingest-token`. Answers `[]`
/// only once the fix is durable: OwnTracks takes any answer as delivered.
async fn owntracks_fix(State(api): State<Api>, request: Request) -> Answer {
    let (user, password) = basic_auth(request.headers()).ok_or_else(|| {
        Failure::new(
            Code::Unauthenticated,
            "missing Basic authorization: user = tenant, password = ingest token",
        )
    })?;
    let tenant = api
        .admission
        .credentials()
        .tenant_of(&password, Scope::Ingest)?;
    if tenant != user {
        return Err(Failure::new(
            Code::Unauthenticated,
            "invalid API key or ingest token",
        ));
    }
    let _slot = api.admission.slot(&tenant)?;
    let (limit_user, limit_device) = (
        header_text(request.headers(), "x-limit-u"),
        header_text(request.headers(), "x-limit-d"),
    );
    let body = body(request, DEVICE_BODY_BYTES).await?;
    let user_device = limit_user.as_deref().zip(limit_device.as_deref());
    if let Some(fix) = owntracks::parse(&body, user_device)? {
        api.ingest(tenant, one(fix), "owntracks").await?;
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], "[]").into_response())
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(str::to_owned)
}

/// `user:password` of a Basic `authorization` header.
fn basic_auth(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `POST /v1/ingest`: an `IngestRequest` in proto3 JSON; the `IngestResponse` likewise.
async fn ingest(State(api): State<Api>, request: Request) -> Answer {
    let (tenant, _slot) = api.admit(request.headers(), Scope::Ingest)?;
    let body = body(request, api.ingest_body_bytes).await?;
    let message = ingest_json::parse_request(&body)?;
    let response = api.ingest(tenant, message, "json").await?;
    Ok(json_response(&ingest_json::ingest_response_json(&response)))
}

pub(super) fn json_response(value: &Value) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!("{value}\n"),
    )
        .into_response()
}

/// A query route's caller: its tenant (API keys only), its slot, and the query parameters
/// (strictly decoded: a bad one is a 400 naming it); with the service it asks.
pub(super) struct Caller {
    pub(super) tenant: String,
    params: Vec<(String, String)>,
    _slot: Slot,
    pub(super) service: GatewayService,
}

/// Extracted first, so that a caller without an API key is refused before anything else.
impl FromRequestParts<Api> for Caller {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, Failure> {
        let (tenant, slot) = api.admit(&parts.headers, Scope::Full)?;
        Ok(Caller {
            tenant,
            params: osmand::decode_form(parts.uri.query().unwrap_or_default().as_bytes())?,
            _slot: slot,
            service: api.service.clone(),
        })
    }
}

impl Caller {
    /// The last value of parameter `name`.
    pub(super) fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A whole-number parameter; absent: 0 (the gRPC default).
    pub(super) fn number<T: std::str::FromStr + Default>(&self, name: &str) -> Result<T, Failure> {
        self.param(name).map_or(Ok(T::default()), |text| {
            let rule = || format!("not a whole number ({})", super::fields::quoted(text));
            text.parse().map_err(|_| Invalid::new(name, rule()).into())
        })
    }

    /// `from` and `to`: a time range in Unix ms.
    pub(super) fn range(&self) -> Result<(i64, i64), Failure> {
        Ok((self.number("from")?, self.number("to")?))
    }

    pub(super) fn request<T>(&self, message: T) -> tonic::Request<T> {
        request(self.tenant.clone(), message)
    }

    /// The answer of a gateway method (`call`) to the caller's `message`.
    pub(super) async fn ask<T, R>(
        &self,
        message: T,
        call: impl AsyncFnOnce(&GatewayService, tonic::Request<T>) -> Result<tonic::Response<R>, Status>,
    ) -> Result<R, Failure> {
        Ok(call(&self.service, self.request(message))
            .await?
            .into_inner())
    }
}

/// `{"<name>": [each item as JSON]}`.
pub(super) fn json_list<T>(name: &str, items: &[T], json: fn(&T) -> Value) -> Response {
    json_response(&json!({ name: items.iter().map(json).collect::<Vec<_>>() }))
}

/// `GET /v1/devices?page_size=&page_token=&sort=-last_ms,device_id` (`-`: descending).
async fn list_devices(caller: Caller) -> Answer {
    let sort = caller
        .param("sort")
        .unwrap_or_default()
        .split(',')
        .filter(|field| !field.is_empty())
        .map(|field| SortField {
            field: field.trim_start_matches('-').to_owned(),
            descending: field.starts_with('-'),
        })
        .collect();
    let message = ListDevicesRequest {
        sort,
        page_size: caller.number("page_size")?,
        page_token: caller.param("page_token").unwrap_or_default().to_owned(),
    };
    let response = caller.ask(message, async |s, r| s.list_devices(r).await);
    let response = response.await?;
    Ok(json_response(&json!({
        "devices": response.devices.iter().map(device_json).collect::<Vec<_>>(),
        "nextPageToken": response.next_page_token,
    })))
}

/// `GET /v1/devices/{id}/track?from=&to=&format=json|geojson|gpx|csv&simplify=<metres>`:
/// streamed, one chunk from storage at a time. An error after the first byte can only cut the
/// body short. `simplify` (0 or absent: every fix) is gRPC's `simplify_m`: Douglas–Peucker
/// per segment, first and last fix kept (crate::simplify).
async fn track(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let format: Format = caller.param("format").unwrap_or("json").parse().map_err(
        |err: crate::export::UnknownFormat| Failure::new(Code::InvalidArgument, err.to_string()),
    )?;
    let simplify_m = match caller.param("simplify") {
        None => 0.0,
        Some(text) => text
            .parse::<f64>()
            .ok()
            .and_then(|metres| crate::simplify::tolerance("simplify", metres).ok())
            .ok_or_else(|| {
                let rule = "not a finite number of metres >= 0";
                Invalid::new(
                    "simplify",
                    format!("{rule} ({})", super::fields::quoted(text)),
                )
            })?,
    };
    let (from_ms, to_ms) = caller.range()?;
    let message = GetTrackRequest {
        device_id: device_id.clone(),
        from_ms,
        to_ms,
        simplify_m,
        ..GetTrackRequest::default()
    };
    let chunks = caller.ask(message, async |s, r| s.get_track(r).await);
    let chunks = chunks.await?;
    let encoder = Encoder::new(format, &device_id);
    // State: the chunks, the encoder (None once done), the caller (its slot held as long as
    // the body lives), whether the document has begun.
    let body = futures::stream::unfold(
        (chunks, Some(encoder), caller, false),
        |(mut chunks, encoder, caller, begun)| async move {
            let mut encoder = encoder?;
            if !begun {
                let bytes = Bytes::from(encoder.begin());
                return Some((Ok(bytes), (chunks, Some(encoder), caller, true)));
            }
            match chunks.next().await {
                Some(Ok(chunk)) => {
                    let bytes = Bytes::from(encoder.chunk(&chunk.fixes));
                    Some((Ok(bytes), (chunks, Some(encoder), caller, true)))
                }
                Some(Err(status)) => {
                    tracing::warn!(code = ?status.code(), message = status.message(), "track export cut short");
                    Some((Err(status), (chunks, None, caller, true)))
                }
                None => Some((
                    Ok(Bytes::from(encoder.finish())),
                    (chunks, None, caller, true),
                )),
            }
        },
    );
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(disposition) = HeaderValue::from_str(&format!(
        "inline; filename=\"track.{}\"",
        format.extension()
    )) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    Ok(response)
}

/// `GET /v1/devices/{id}/stats?from=&to=`: daily stats (UTC days).
async fn stats(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let (from_ms, to_ms) = caller.range()?;
    let message = GetDailyStatsRequest {
        device_id,
        from_ms,
        to_ms,
    };
    let answer = caller.ask(message, async |s, r| s.get_daily_stats(r).await);
    Ok(json_list("days", &answer.await?.days, day_json))
}

/// `GET /v1/devices/{id}/places?k=`: learned places, most dwell first.
async fn places(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let k = caller.number("k")?;
    let message = DevicePlacesRequest { device_id, k };
    let answer = caller.ask(message, async |s, r| s.get_places(r).await);
    Ok(json_list("places", &answer.await?.places, place_json))
}

/// `GET /v1/devices/{id}/predict?k=`: the next places, most likely first.
async fn predict(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let k = caller.number("k")?;
    let message = DevicePredictRequest { device_id, k };
    let answer = caller.ask(message, async |s, r| s.predict_next(r).await);
    Ok(json_list(
        "predictions",
        &answer.await?.predictions,
        prediction_json,
    ))
}

/// `DELETE /v1/devices/{id}`: the device's fixes, stats and learned state.
async fn delete_device(caller: Caller, Path(device_id): Path<String>) -> Answer {
    let message = DeleteDeviceRequest { device_id };
    caller
        .ask(message, async |s, r| s.delete_device(r).await)
        .await?;
    Ok(json_response(&json!({})))
}

// proto3 JSON of the query answers: lowerCamelCase names, 64-bit integers as strings.

fn device_json(device: &DeviceSummary) -> Value {
    json!({
        "deviceId": device.device_id,
        "fixes": device.fixes.to_string(),
        "firstMs": device.first_ms.to_string(),
        "lastMs": device.last_ms.to_string(),
        "distanceM": device.distance_m,
        "maxSpeedKmh": device.max_speed_kmh,
        // NaN (unknown) becomes null.
        "lastLat": device.last_lat,
        "lastLon": device.last_lon,
        "fixesToday": device.fixes_today.to_string(),
        "distanceTodayM": device.distance_today_m,
    })
}

fn day_json(day: &DailyStat) -> Value {
    json!({
        "deviceId": day.device_id,
        "day": day.day,
        "fixes": day.fixes.to_string(),
        "distanceM": day.distance_m,
        "maxSpeedKmh": day.max_speed_kmh,
        "firstMs": day.first_ms.to_string(),
        "lastMs": day.last_ms.to_string(),
    })
}

fn prediction_json(prediction: &Prediction) -> Value {
    let place = prediction.place.as_ref().map(place_json);
    json!({ "place": place, "probability": prediction.probability })
}

pub(super) fn place_json(place: &Place) -> Value {
    let label = PlaceLabel::try_from(place.label).unwrap_or_default();
    json!({
        "placeId": place.place_id,
        "lat": place.lat,
        "lon": place.lon,
        "visits": place.visits,
        "totalDwellMs": place.total_dwell_ms.to_string(),
        "firstVisitMs": place.first_visit_ms.to_string(),
        "lastVisitMs": place.last_visit_ms.to_string(),
        "label": label.as_str_name(),
        "dwellByHourMs": place.dwell_by_hour_ms.iter().map(i64::to_string).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses_and_canonical_names() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::ResourceExhausted),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn retry_after_comes_from_retry_info() {
        let status = Status::from(crate::error::Error::RateLimited {
            kind: "requests",
            retry_after: std::time::Duration::from_millis(2500),
        });
        let response = Failure::from(status).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn basic_auth_is_decoded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Basic ZGVtbzpkZW1vLWluZ2VzdA==".parse().unwrap(),
        );
        assert_eq!(
            basic_auth(&headers),
            Some(("demo".into(), "demo-ingest".into()))
        );
        headers.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert_eq!(basic_auth(&headers), None);
    }
}
