//! The Learning gRPC service: Observe reads all its devices' models in one round trip, learns
//! in Rust, writes back with one compare-and-set per device and retries the devices another
//! replica changed meanwhile; the queries read one model.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use prost::Message as _;
use tonic::{Request, Response, Status};
use trackmesh_proto::v1::{
    DeleteTenantGeofenceRequest, DeleteTenantGeofenceResponse, EventType, Fix, ForgetRequest,
    ForgetResponse, Geofence, GetPlacesRequest, GetPlacesResponse, GetProfileRequest,
    GetProfileResponse, ListTenantGeofencesResponse, ObserveRequest, ObserveResponse,
    PredictNextRequest, PredictNextResponse, Prediction, RebuildReply, RebuildRequest, RefinedFix,
    TenantGeofence, TenantGeofencesRequest, Verdict, learning_server::Learning,
};
use trackmesh_shared::ids;

use crate::{
    error::Error,
    fence::Fence,
    geofences::{Book, STALENESS, now_ms},
    kafka::Kafka,
    model::{self, Events, Model, Outcome, Point, Rules},
    rebuild::Rebuilder,
    store::{Save, Store},
};

/// Rounds of read → learn → compare-and-set before giving up with ABORTED.
pub(crate) const MAX_ATTEMPTS: usize = 10;
/// Predictions when the request asks for k = 0.
const DEFAULT_K: usize = 3;

pub struct LearningService {
    store: Store,
    rules: Rules,
    max_batch: usize,
    /// Geofences and events; `None` without KAFKA_BROKERS.
    events: Option<EventSettings>,
}

/// Where geofences are kept and events go, and their rules.
pub struct EventSettings {
    pub kafka: Kafka,
    pub book: Arc<Book>,
    pub min_dwell_ms: i64,
    pub max_geofences: u32,
}

impl LearningService {
    pub fn new(
        store: Store,
        rules: Rules,
        max_batch: usize,
        events: Option<EventSettings>,
    ) -> Self {
        Self {
            store,
            rules,
            max_batch,
            events,
        }
    }

    /// `observe` in calls of at most MAX_BATCH fixes (the fixes topic's messages may hold
    /// more).
    pub async fn observe_chunked(&self, tenant: &str, fixes: &[RefinedFix]) -> Result<(), Error> {
        for chunk in fixes.chunks(self.max_batch.max(1)) {
            self.observe(tenant, chunk).await?;
        }
        Ok(())
    }

    pub async fn forget(&self, tenant: &str, device: &str) -> Result<bool, Error> {
        ids::device_fields(tenant, device)?;
        let existed = self.store.forget(tenant, device).await?;
        tracing::info!(tenant = %tenant, existed, "device model forgotten");
        Ok(existed)
    }

    fn events(&self) -> Result<&EventSettings, Error> {
        self.events.as_ref().ok_or(Error::GeofencesOff)
    }

    async fn create_geofence(
        &self,
        tenant: &str,
        geofence: Option<Geofence>,
    ) -> Result<Geofence, Error> {
        ids::tenant_field(tenant)?;
        let events = self.events()?;
        let mut geofence = geofence.ok_or_else(|| Error::invalid("geofence", "required"))?;
        geofence.geofence_id = format!("gf-{:016x}", fastrand::u64(..));
        geofence.created_ms = now_ms();
        Fence::new(&geofence).map_err(|(field, rule)| Error::invalid(field, rule))?;
        events.book.fresh().await?;
        if events.book.count(tenant) >= events.max_geofences as usize {
            return Err(Error::TooManyGeofences(events.max_geofences));
        }
        events
            .kafka
            .produce_geofence(tenant, &geofence.geofence_id, Some(&geofence))
            .await?;
        // Here at once; the other replicas within STALENESS (see `geofences`).
        let key = format!("{tenant}/{}", geofence.geofence_id);
        let value = TenantGeofence {
            tenant_id: tenant.to_owned(),
            geofence: Some(geofence.clone()),
        }
        .encode_to_vec();
        events.book.apply(&key, Some(&value));
        tracing::info!(tenant = %tenant, geofence = %geofence.geofence_id, "geofence created");
        tokio::time::sleep(STALENESS).await;
        Ok(geofence)
    }

    async fn list_geofences(&self, tenant: &str) -> Result<Vec<Geofence>, Error> {
        ids::tenant_field(tenant)?;
        let events = self.events()?;
        events.book.fresh().await?;
        Ok(events.book.list(tenant))
    }

    async fn delete_geofence(&self, tenant: &str, id: &str) -> Result<bool, Error> {
        ids::tenant_field(tenant)?;
        let events = self.events()?;
        if id.is_empty() || id.len() > 64 {
            return Err(Error::invalid("geofence_id", "1 to 64 characters"));
        }
        events.book.fresh().await?;
        let existed = events.book.contains(tenant, id);
        if existed {
            events.kafka.produce_geofence(tenant, id, None).await?;
            events.book.apply(&format!("{tenant}/{id}"), None);
            tracing::info!(tenant = %tenant, geofence = %id, "geofence deleted");
            tokio::time::sleep(STALENESS).await;
        }
        Ok(existed)
    }

    #[tracing::instrument(name = "observe", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    pub async fn observe(
        &self,
        tenant: &str,
        fixes: &[RefinedFix],
    ) -> Result<ObserveResponse, Error> {
        let started = Instant::now();
        let result = self.observe_inner(tenant, fixes).await;
        metrics::histogram!("learning_observe_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        result
    }

    async fn observe_inner(
        &self,
        tenant: &str,
        fixes: &[RefinedFix],
    ) -> Result<ObserveResponse, Error> {
        ids::tenant_field(tenant)?;
        if fixes.len() > self.max_batch {
            return Err(Error::invalid(
                "fixes",
                format!(
                    "{} fixes, more than MAX_BATCH={}",
                    fixes.len(),
                    self.max_batch
                ),
            ));
        }
        metrics::histogram!("learning_batch_size").record(fixes.len() as f64);
        // Everything is checked before anything is learned: a bad fix rejects the whole call.
        let (by_device, not_accepted) = group(fixes)?;

        let mut response = ObserveResponse {
            ignored: not_accepted,
            ..ObserveResponse::default()
        };
        // A fence created before these fixes arrived applies to them.
        let fences = match &self.events {
            Some(events) => {
                events.book.fresh().await?;
                events.book.fences(tenant)
            }
            None => None,
        };
        let mut todo: Vec<&str> = by_device.keys().copied().collect();
        for _ in 0..MAX_ATTEMPTS {
            if todo.is_empty() {
                break;
            }
            let loaded = self.store.load(tenant, &todo).await?;
            let mut decided: Vec<(&str, u64, Model, Outcome)> = Vec::with_capacity(todo.len());
            for (device, loaded) in todo.iter().zip(loaded) {
                let mut model = loaded.model;
                let (points, fixes) = &by_device[device];
                let events = self.events.as_ref().map(|events| Events {
                    device,
                    fences: fences.as_deref(),
                    min_dwell_ms: events.min_dwell_ms,
                    fixes,
                });
                let outcome = model::observe_with(&mut model, points, &self.rules, events.as_ref());
                decided.push((device, loaded.version, model, outcome));
            }
            // Events, stays and trips leave before the models that record them are written:
            // a failure here writes nothing, and a retry makes the same ones again (storage
            // and Watch keep one of each).
            if let Some(events) = &self.events {
                let sent = decided
                    .iter()
                    .filter(|(_, _, _, outcome)| {
                        !(outcome.events.is_empty()
                            && outcome.stays.is_empty()
                            && outcome.trips.is_empty())
                    })
                    .map(|(device, _, _, outcome)| {
                        events.kafka.produce_events(
                            tenant,
                            device,
                            outcome.events.clone(),
                            outcome.stays.iter().map(|s| s.to_proto(device)).collect(),
                            outcome.trips.iter().map(|t| t.to_proto(device)).collect(),
                        )
                    });
                futures::future::try_join_all(sent).await?;
                for (_, _, _, outcome) in &decided {
                    for event in &outcome.events {
                        let kind = EventType::try_from(event.r#type).unwrap_or_default();
                        metrics::counter!("learning_events_total", "type" => kind.as_str_name())
                            .increment(1);
                    }
                }
            }
            let saves: Vec<Save<'_>> = decided
                .iter()
                .filter(|(_, _, _, outcome)| outcome.changed())
                .map(|(device, version, model, _)| Save {
                    device,
                    expected: *version,
                    model,
                })
                .collect();
            let mut applied = self.store.save(tenant, &saves).await?.into_iter();
            let mut conflicts = Vec::new();
            for (device, _, _, outcome) in decided {
                // Nothing new for the device: the answer stands as of the read.
                if outcome.changed() && !applied.next().unwrap_or(false) {
                    conflicts.push(device);
                    continue;
                }
                add(&mut response, device, outcome);
            }
            if !conflicts.is_empty() {
                metrics::counter!("learning_cas_conflicts_total").increment(conflicts.len() as u64);
                tracing::debug!(
                    devices = conflicts.len(),
                    "compare-and-set conflicts, retrying"
                );
            }
            todo = conflicts;
        }
        if let Some(device) = todo.first() {
            return Err(Error::Contention {
                device: (*device).to_owned(),
            });
        }
        count(&response, not_accepted);
        Ok(response)
    }

    async fn places(&self, tenant: &str, device: &str, k: u32) -> Result<GetPlacesResponse, Error> {
        ids::device_fields(tenant, device)?;
        let model = self.store.load_one(tenant, device).await?.model;
        let labels = model::labels(&model, &self.rules);
        let mut places: Vec<&model::PlaceState> = model.places.iter().collect();
        places.sort_by_key(|p| (std::cmp::Reverse(p.dwell_ms), p.id));
        let k = if k == 0 { places.len() } else { k as usize };
        Ok(GetPlacesResponse {
            places: places
                .into_iter()
                .take(k)
                .map(|p| p.to_proto(labels.of(p.id)))
                .collect(),
        })
    }

    async fn predict(
        &self,
        tenant: &str,
        device: &str,
        k: u32,
    ) -> Result<PredictNextResponse, Error> {
        ids::device_fields(tenant, device)?;
        let model = self.store.load_one(tenant, device).await?.model;
        let labels = model::labels(&model, &self.rules);
        let k = if k == 0 { DEFAULT_K } else { k as usize };
        let forecast = model::predict(&model, &self.rules, k);
        let place =
            |id| model::place_by_id(&model, id).map(|place| place.to_proto(labels.of(place.id)));
        let predictions: Vec<Prediction> = forecast
            .next
            .iter()
            .map(|(id, probability)| Prediction {
                place: place(*id),
                probability: *probability,
            })
            .collect();
        Ok(PredictNextResponse {
            no_history: predictions.is_empty(),
            from: forecast.from.and_then(place),
            predictions,
        })
    }

    async fn profile(&self, tenant: &str, device: &str) -> Result<GetProfileResponse, Error> {
        ids::device_fields(tenant, device)?;
        let loaded = self.store.load_one(tenant, device).await?;
        let model = &loaded.model;
        let labels = model::labels(model, &self.rules);
        let place = |id: Option<u32>| {
            id.and_then(|id| model::place_by_id(model, id))
                .map(|place| place.to_proto(labels.of(place.id)))
        };
        Ok(GetProfileResponse {
            found: loaded.version > 0,
            home: place(labels.home),
            work: place(labels.work),
            places: u32::try_from(model.places.len()).unwrap_or(u32::MAX),
            stays: model.stays,
            fixes_observed: model.fixes_observed,
            last_stay: model.last_stay.as_ref().map(|s| s.to_proto(device)),
            watermark_ms: model.watermark_ms,
            current_stay: model::current_stay(model, &self.rules).map(|s| s.to_proto(device)),
        })
    }
}

/// A device's accepted fixes, as points and as sent (events carry them).
type DeviceFixes<'a> = (Vec<Point>, Vec<&'a Fix>);

/// Accepted fixes per device, checked; and how many fixes were not accepted.
pub(crate) fn group(fixes: &[RefinedFix]) -> Result<(BTreeMap<&str, DeviceFixes<'_>>, u32), Error> {
    let mut by_device: BTreeMap<&str, DeviceFixes<'_>> = BTreeMap::new();
    let mut not_accepted = 0u32;
    for (index, refined) in fixes.iter().enumerate() {
        if refined.verdict != Verdict::Accepted as i32 {
            not_accepted += 1;
            continue;
        }
        let field = |name: &str| format!("fixes[{index}].fix{name}");
        let Some(fix) = &refined.fix else {
            return Err(Error::invalid(field(""), "required for an accepted fix"));
        };
        ids::check_device(&fix.device_id)
            .map_err(|rule| Error::invalid(field(".device_id"), rule))?;
        if fix.time_ms <= 0 {
            return Err(Error::invalid(
                field(".time_ms"),
                "required, Unix epoch milliseconds",
            ));
        }
        if !fix.lat.is_finite() || !(-90.0..=90.0).contains(&fix.lat) {
            return Err(Error::invalid(
                field(".lat"),
                format!("{} is outside -90..=90", fix.lat),
            ));
        }
        if !fix.lon.is_finite() || !(-180.0..=180.0).contains(&fix.lon) {
            return Err(Error::invalid(
                field(".lon"),
                format!("{} is outside -180..=180", fix.lon),
            ));
        }
        let (points, sent) = by_device.entry(fix.device_id.as_str()).or_default();
        points.push(Point {
            time_ms: fix.time_ms,
            lat: fix.lat,
            lon: fix.lon,
        });
        sent.push(fix);
    }
    Ok((by_device, not_accepted))
}

fn add(response: &mut ObserveResponse, device: &str, outcome: Outcome) {
    response.observed += outcome.observed;
    response.ignored += outcome.ignored;
    response.stays_closed += u32::try_from(outcome.stays.len()).unwrap_or(u32::MAX);
    response.places_created += outcome.places_created;
    response.places_evicted += outcome.places_evicted;
    response
        .stays
        .extend(outcome.stays.iter().map(|stay| stay.to_proto(device)));
    if !outcome.trips.is_empty() {
        metrics::counter!("learning_trips_total").increment(outcome.trips.len() as u64);
    }
}

/// Counters, one increment per kind and call rather than per fix.
fn count(response: &ObserveResponse, not_accepted: u32) {
    let seen = response.ignored - not_accepted;
    for (result, n) in [
        ("observed", response.observed),
        ("seen", seen),
        ("not_accepted", not_accepted),
    ] {
        if n > 0 {
            metrics::counter!("learning_fixes_total", "result" => result).increment(u64::from(n));
        }
    }
    for (name, n) in [
        ("learning_stays_detected_total", response.stays_closed),
        ("learning_places_created_total", response.places_created),
        ("learning_places_evicted_total", response.places_evicted),
    ] {
        if n > 0 {
            metrics::counter!(name).increment(u64::from(n));
        }
    }
}

#[tonic::async_trait]
impl Learning for LearningService {
    async fn observe(
        &self,
        request: Request<ObserveRequest>,
    ) -> Result<Response<ObserveResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.observe(&request.tenant_id, &request.fixes).await?,
        ))
    }

    async fn get_places(
        &self,
        request: Request<GetPlacesRequest>,
    ) -> Result<Response<GetPlacesResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.places(&request.tenant_id, &request.device_id, request.k)
                .await?,
        ))
    }

    async fn predict_next(
        &self,
        request: Request<PredictNextRequest>,
    ) -> Result<Response<PredictNextResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.predict(&request.tenant_id, &request.device_id, request.k)
                .await?,
        ))
    }

    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.profile(&request.tenant_id, &request.device_id).await?,
        ))
    }

    async fn forget(
        &self,
        request: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let request = request.into_inner();
        let existed = self.forget(&request.tenant_id, &request.device_id).await?;
        Ok(Response::new(ForgetResponse { existed }))
    }

    async fn create_geofence(
        &self,
        request: Request<TenantGeofence>,
    ) -> Result<Response<Geofence>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.create_geofence(&request.tenant_id, request.geofence)
                .await?,
        ))
    }

    async fn list_geofences(
        &self,
        request: Request<TenantGeofencesRequest>,
    ) -> Result<Response<ListTenantGeofencesResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(ListTenantGeofencesResponse {
            geofences: self.list_geofences(&request.tenant_id).await?,
        }))
    }

    async fn delete_geofence(
        &self,
        request: Request<DeleteTenantGeofenceRequest>,
    ) -> Result<Response<DeleteTenantGeofenceResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(DeleteTenantGeofenceResponse {
            existed: self
                .delete_geofence(&request.tenant_id, &request.geofence_id)
                .await?,
        }))
    }

    type RebuildStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<RebuildReply, Status>> + Send>>;

    async fn rebuild(
        &self,
        request: Request<tonic::Streaming<RebuildRequest>>,
    ) -> Result<Response<Self::RebuildStream>, Status> {
        let rebuilder = Rebuilder {
            store: self.store.clone(),
            rules: self.rules.clone(),
            kafka: self.events.as_ref().map(|events| events.kafka.clone()),
        };
        Ok(Response::new(Box::pin(rebuilder.run(request.into_inner()))))
    }
}
