//! The Learning gRPC service: Observe reads all its devices' models in one round trip, learns
//! in Rust, writes back with one compare-and-set per device and retries the devices another
//! replica changed meanwhile; the queries read one model.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tonic::{Request, Response, Status};
use trackmesh_proto::v1::{
    self as proto, DeleteTenantGeofenceRequest, DeleteTenantGeofenceResponse, ForgetRequest,
    ForgetResponse, GetPlacesRequest, GetPlacesResponse, GetProfileRequest, GetProfileResponse,
    ListTenantGeofencesResponse, ObserveRequest, ObserveResponse, PredictNextRequest,
    PredictNextResponse, Prediction, RebuildReply, RebuildRequest, TenantGeofence,
    TenantGeofencesRequest, learning_server::Learning,
};
use trackmesh_shared::{
    domain::{DeviceId, DeviceKey, Fix, Invalid, Refined, TenantId, Verdict, now_ms},
    event_messages::Geofence,
    geo,
    state::{Decided, Loaded},
};

use crate::{
    error::Error,
    fence::{Fence, Fences},
    geofences::{Book, STALENESS},
    kafka::{self, Kafka, geofence_key},
    model::{self, Events, Model, Outcome, Point, Rules},
    rebuild::Rebuilder,
    store::Store,
};

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
    pub async fn observe_chunked(&self, tenant: &str, fixes: &[Refined]) -> Result<(), Error> {
        for chunk in fixes.chunks(self.max_batch.max(1)) {
            self.observe_fixes(tenant, chunk).await?;
        }
        Ok(())
    }

    pub async fn forget_device(&self, tenant: &str, device: &str) -> Result<bool, Error> {
        let existed = self.store.delete(DeviceKey::parse(tenant, device)?).await?;
        tracing::info!(tenant = %tenant, existed, "device model forgotten");
        Ok(existed)
    }

    fn events(&self) -> Result<&EventSettings, Error> {
        self.events.as_ref().ok_or(Error::GeofencesOff)
    }

    async fn forget(&self, request: ForgetRequest) -> Result<ForgetResponse, Error> {
        let existed = self
            .forget_device(&request.tenant_id, &request.device_id)
            .await?;
        Ok(ForgetResponse { existed })
    }

    async fn create_geofence(&self, request: TenantGeofence) -> Result<proto::Geofence, Error> {
        let tenant = &*TenantId::parse(&request.tenant_id)?;
        let events = self.events()?;
        let mut geofence = Geofence::from(
            request
                .geofence
                .ok_or_else(|| Invalid::new("geofence", "required"))?,
        );
        geofence.geofence_id = format!("gf-{:016x}", fastrand::u64(..));
        geofence.created_ms = now_ms();
        Fence::new(&geofence)?;
        events.book.fresh().await?;
        if events.book.count(tenant) >= events.max_geofences as usize {
            return Err(Error::TooManyGeofences(events.max_geofences));
        }
        events
            .kafka
            .produce_geofence(tenant, &geofence.geofence_id, Some(&geofence))
            .await?;
        // Here at once; the other replicas within STALENESS (see `geofences`).
        let key = geofence_key(tenant, &geofence.geofence_id);
        events
            .book
            .apply(&key, Some(&kafka::geofence_value(tenant, &geofence)));
        tracing::info!(tenant = %tenant, geofence = %geofence.geofence_id, "geofence created");
        tokio::time::sleep(STALENESS).await;
        Ok(geofence.into())
    }

    async fn list_geofences(
        &self,
        request: TenantGeofencesRequest,
    ) -> Result<ListTenantGeofencesResponse, Error> {
        let tenant = TenantId::parse(&request.tenant_id)?;
        let events = self.events()?;
        events.book.fresh().await?;
        Ok(ListTenantGeofencesResponse {
            geofences: events
                .book
                .list(&tenant)
                .into_iter()
                .map(Into::into)
                .collect(),
        })
    }

    async fn delete_geofence(
        &self,
        request: DeleteTenantGeofenceRequest,
    ) -> Result<DeleteTenantGeofenceResponse, Error> {
        let tenant = &*TenantId::parse(&request.tenant_id)?;
        let id = request.geofence_id.as_str();
        let events = self.events()?;
        if id.is_empty() || id.len() > 64 {
            return Err(Invalid::new("geofence_id", "1 to 64 characters").into());
        }
        events.book.fresh().await?;
        let existed = events.book.contains(tenant, id);
        if existed {
            events.kafka.produce_geofence(tenant, id, None).await?;
            events.book.apply(&geofence_key(tenant, id), None);
            tracing::info!(tenant = %tenant, geofence = %id, "geofence deleted");
            tokio::time::sleep(STALENESS).await;
        }
        Ok(DeleteTenantGeofenceResponse { existed })
    }

    #[tracing::instrument(name = "observe", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    pub async fn observe_fixes(
        &self,
        tenant: &str,
        fixes: &[Refined],
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
        fixes: &[Refined],
    ) -> Result<ObserveResponse, Error> {
        let tenant = TenantId::parse(tenant)?;
        if fixes.len() > self.max_batch {
            let rule = format!(
                "{} fixes, more than MAX_BATCH={}",
                fixes.len(),
                self.max_batch
            );
            return Err(Invalid::new("fixes", rule).into());
        }
        metrics::histogram!("learning_batch_size").record(fixes.len() as f64);
        // Everything is checked before anything is learned: a bad fix rejects the whole call.
        let (by_device, not_accepted) = group(fixes)?;
        // A fence created before these fixes arrived applies to them.
        let fences = match &self.events {
            Some(events) => {
                events.book.fresh().await?;
                events.book.fences(&tenant)
            }
            None => None,
        };
        let settled = self
            .store
            .update(tenant, by_device.keys().copied().collect(), |loaded| {
                self.learn(tenant, loaded, &by_device, fences.as_deref())
            })
            .await?;
        let mut response = ObserveResponse {
            ignored: not_accepted,
            ..ObserveResponse::default()
        };
        for (device, outcome) in settled {
            add(&mut response, &device, outcome);
        }
        count(&response, not_accepted);
        Ok(response)
    }

    /// Learns the devices' fixes into their models. Events, stays and trips leave before the
    /// models that record them are written: a failure here writes nothing, and a retry makes
    /// the same ones again (storage and Watch keep one of each).
    async fn learn<'d>(
        &self,
        tenant: TenantId<'_>,
        loaded: Vec<(DeviceId<'d>, Loaded<Model>)>,
        by_device: &BTreeMap<DeviceId<'_>, DeviceFixes<'_>>,
        fences: Option<&Fences>,
    ) -> Result<Vec<Decided<'d, Model, Outcome>>, Error> {
        let mut decided = Vec::with_capacity(loaded.len());
        for (device, loaded) in loaded {
            let mut model = loaded.state;
            let (points, fixes) = &by_device[&device];
            let events = self.events.as_ref().map(|events| Events {
                device: &device,
                fences,
                min_dwell_ms: events.min_dwell_ms,
                fixes,
            });
            let outcome = model::observe_with(&mut model, points, &self.rules, events.as_ref());
            decided.push(Decided {
                device,
                version: loaded.version,
                // Nothing new for the device: the answer stands as of the read.
                state: outcome.changed().then_some(model),
                log: Vec::new(),
                outcome,
            });
        }
        if let Some(events) = &self.events {
            let sent = decided.iter().map(|d| {
                events
                    .kafka
                    .produce_outcome(DeviceKey::new(tenant, d.device), &d.outcome)
            });
            futures::future::try_join_all(sent).await?;
            for event in decided.iter().flat_map(|d| &d.outcome.events) {
                metrics::counter!("learning_events_total", "type" => event.r#type().name())
                    .increment(1);
            }
        }
        Ok(decided)
    }

    async fn observe(&self, request: ObserveRequest) -> Result<ObserveResponse, Error> {
        let fixes: Vec<Refined> = request.fixes.into_iter().map(Into::into).collect();
        self.observe_fixes(&request.tenant_id, &fixes).await
    }

    async fn get_places(&self, request: GetPlacesRequest) -> Result<GetPlacesResponse, Error> {
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id)?;
        let model = self.store.load_one(key).await?.state;
        let labels = model::labels(&model, &self.rules);
        let mut places: Vec<&model::PlaceState> = model.places.iter().collect();
        places.sort_by_key(|p| (std::cmp::Reverse(p.dwell_ms), p.id));
        let k = if request.k == 0 {
            places.len()
        } else {
            request.k as usize
        };
        Ok(GetPlacesResponse {
            places: places
                .into_iter()
                .take(k)
                .map(|p| p.to_place(labels.of(p.id)).into())
                .collect(),
        })
    }

    async fn predict_next(
        &self,
        request: PredictNextRequest,
    ) -> Result<PredictNextResponse, Error> {
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id)?;
        let model = self.store.load_one(key).await?.state;
        let labels = model::labels(&model, &self.rules);
        let k = if request.k == 0 {
            DEFAULT_K
        } else {
            request.k as usize
        };
        let forecast = model::predict(&model, &self.rules, k);
        let place = |id| model::place_by_id(&model, id).map(|p| p.to_place(labels.of(p.id)).into());
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

    async fn get_profile(&self, request: GetProfileRequest) -> Result<GetProfileResponse, Error> {
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id)?;
        let device = &*key.device;
        let loaded = self.store.load_one(key).await?;
        let model = &loaded.state;
        let labels = model::labels(model, &self.rules);
        let place = |id: Option<u32>| {
            id.and_then(|id| model::place_by_id(model, id))
                .map(|place| place.to_place(labels.of(place.id)).into())
        };
        Ok(GetProfileResponse {
            found: loaded.version > 0,
            home: place(labels.home),
            work: place(labels.work),
            places: u32::try_from(model.places.len()).unwrap_or(u32::MAX),
            stays: model.stays,
            fixes_observed: model.fixes_observed,
            last_stay: model.last_stay.as_ref().map(|s| s.to_stay(device).into()),
            watermark_ms: model.watermark_ms,
            current_stay: model::current_stay(model, &self.rules).map(|s| s.to_stay(device).into()),
        })
    }
}

/// A device's accepted fixes, as points and as sent (events carry them).
type DeviceFixes<'a> = (Vec<Point>, Vec<&'a Fix>);

/// Accepted fixes per device, checked; and how many fixes were not accepted.
pub(crate) fn group(
    fixes: &[Refined],
) -> Result<(BTreeMap<DeviceId<'_>, DeviceFixes<'_>>, u32), Invalid> {
    let mut by_device: BTreeMap<DeviceId<'_>, DeviceFixes<'_>> = BTreeMap::new();
    let mut not_accepted = 0u32;
    for (index, refined) in fixes.iter().enumerate() {
        if refined.verdict() != Verdict::Accepted {
            not_accepted += 1;
            continue;
        }
        let field = |name: &str| format!("fixes[{index}].fix{name}");
        let Some(fix) = &refined.fix else {
            return Err(Invalid::new(field(""), "required for an accepted fix"));
        };
        let device = DeviceId::parse(format_args!("fixes[{index}].fix.device_id"), &fix.device_id)?;
        if fix.time_ms <= 0 {
            return Err(Invalid::new(
                field(".time_ms"),
                "required, Unix epoch milliseconds",
            ));
        }
        geo::check_coordinates(fix.lat, fix.lon)
            .map_err(|(name, rule)| Invalid::new(field(&format!(".{name}")), rule))?;
        let (points, sent) = by_device.entry(device).or_default();
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
        .extend(outcome.stays.iter().map(|stay| stay.to_stay(device).into()));
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

trackmesh_shared::unary_methods! {
    impl Learning for LearningService {
        observe(ObserveRequest) -> ObserveResponse;
        get_places(GetPlacesRequest) -> GetPlacesResponse;
        predict_next(PredictNextRequest) -> PredictNextResponse;
        get_profile(GetProfileRequest) -> GetProfileResponse;
        forget(ForgetRequest) -> ForgetResponse;
        create_geofence(TenantGeofence) -> proto::Geofence;
        list_geofences(TenantGeofencesRequest) -> ListTenantGeofencesResponse;
        delete_geofence(DeleteTenantGeofenceRequest) -> DeleteTenantGeofenceResponse;
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
