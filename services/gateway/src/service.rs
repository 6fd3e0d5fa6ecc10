//! The Gateway gRPC service: limit, validate, then coalesce for ingest (per tenant of a batch:
//! Refine → Store + Observe), and scoped queries. The tenant always comes from the API key,
//! checked by `guard` before the request reached this service.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use tonic::{
    Request, Response, Status, Streaming, service::interceptor::InterceptedService,
    transport::Channel,
};
use trackmesh_proto::v1::{
    DailyStatsRequest, DailyStatsResponse, DeleteDeviceRequest, DeleteDeviceResponse,
    DeleteGeofenceRequest, DeleteGeofenceResponse, DeleteStoredDeviceRequest,
    DeleteTenantGeofenceRequest, DevicePlacesRequest, DevicePredictRequest, Fix, ForgetRequest,
    Geofence, GetDailyStatsRequest, GetEventsRequest, GetEventsResponse, GetPlacesRequest,
    GetPlacesResponse, GetStaysRequest, GetStaysResponse, GetTrackRequest, GetTripsRequest,
    GetTripsResponse, IngestRequest, IngestResponse, ListDevicesRequest, ListDevicesResponse,
    ListGeofencesRequest, ListGeofencesResponse, ListStoredDevicesRequest, ObserveRequest,
    PredictNextRequest, PredictNextResponse, QueryTrackRequest, RefineRequest, RelearnRequest,
    ReseedRequest, ReseedResponse, ResetDeviceRequest, StoreRequest, StoredEventsRequest,
    StoredHistoryRequest, TenantGeofence, TenantGeofencesRequest, TrackChunk, WatchRequest,
    gateway_server::Gateway, learning_client::LearningClient, refinement_client::RefinementClient,
    storage_client::StorageClient,
};
use trackmesh_shared::{
    domain::{DeviceId, Invalid},
    grpc::Deadline,
    server::MAX_MESSAGE_BYTES,
    telemetry,
};

use crate::{
    coalesce::{self, Coalescer, Entry},
    downstream::Downstream,
    error::Error,
    guard::Tenant,
    limits::Limits,
    relearn::{Devices, History, RelearnStream},
    simplify,
    watch::{Filter, Hub, Position, WatchStream},
};

type Propagate = fn(Request<()>) -> Result<Request<()>, Status>;
/// A channel whose calls pass the current trace on.
type Traced = InterceptedService<Channel, Propagate>;

fn traced(channel: Channel) -> Traced {
    InterceptedService::new(channel, telemetry::propagate as Propagate)
}

pub(crate) fn refinement(channel: Channel) -> RefinementClient<Traced> {
    RefinementClient::new(traced(channel))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn learning(channel: Channel) -> LearningClient<Traced> {
    LearningClient::new(traced(channel)).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub(crate) fn storage(channel: Channel) -> StorageClient<Traced> {
    StorageClient::new(traced(channel)).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// One unary call through `downstream` (retried as it decides): per attempt a client on its
/// balanced channel and a copy of `message` carrying the attempt's timeout.
pub(crate) async fn unary<C, Req, Resp, Fut>(
    downstream: &Downstream,
    deadline: Deadline,
    client: fn(Channel) -> C,
    message: &Req,
    call: impl Fn(C, Request<Req>) -> Fut,
) -> Result<Resp, Status>
where
    Req: Clone,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    downstream
        .call(deadline, |channel, timeout, _| {
            call(client(channel), with_timeout(message.clone(), timeout))
        })
        .await
        .map(Response::into_inner)
}

#[derive(Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    downstreams: Arc<Downstreams>,
    coalescer: Coalescer,
    max_batch: usize,
    timeout: Duration,
    streams: StreamTimeouts,
    /// Live fixes; `None` without KAFKA_BROKERS.
    hub: Option<Hub>,
}

/// How long an IngestStream may stay idle, and open at all.
#[derive(Clone, Copy, Debug)]
pub struct StreamTimeouts {
    pub idle: Duration,
    pub max: Duration,
}

pub struct Downstreams {
    pub refinement: Arc<Downstream>,
    pub learning: Arc<Downstream>,
    pub storage: Arc<Downstream>,
}

/// How requests are coalesced (see `coalesce`).
#[derive(Clone, Copy, Debug)]
pub struct Coalescing {
    pub max_fixes: usize,
    pub max_in_flight: usize,
}

impl GatewayService {
    pub fn new(
        limits: Limits,
        downstreams: Downstreams,
        max_batch: usize,
        timeout: Duration,
        streams: StreamTimeouts,
        coalescing: Coalescing,
        hub: Option<Hub>,
    ) -> Self {
        let downstreams = Arc::new(downstreams);
        let mesh = downstreams.clone();
        let dispatch: coalesce::Dispatch = Arc::new(move |entries, deadline| {
            let mesh = mesh.clone();
            Box::pin(async move { mesh.ingest_batch(entries, deadline).await })
        });
        let coalescer = Coalescer::new(
            coalesce::Settings {
                max_fixes: coalescing.max_fixes,
                max_in_flight: coalescing.max_in_flight,
                timeout,
            },
            dispatch,
        );
        Self {
            inner: Arc::new(Inner {
                limits,
                downstreams,
                coalescer,
                max_batch,
                timeout,
                streams,
                hub,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The caller's tenant and deadline.
    fn caller<T>(&self, request: &Request<T>) -> Result<(String, Deadline), Status> {
        // Put there by the guard; without it (a wiring mistake) every call fails closed.
        let Tenant(tenant) = request
            .extensions()
            .get::<Tenant>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no authenticated tenant"))?;
        Ok((
            tenant,
            Deadline::from_metadata(request.metadata(), self.inner.timeout),
        ))
    }

    /// A query of the caller's tenant: rate-limited, made by `query` from the request (which
    /// checks its input), and sent to one downstream method.
    async fn forward<T, Q: Clone, C, R, Fut>(
        &self,
        request: Request<T>,
        query: impl FnOnce(String, T) -> Result<Q, Error>,
        downstream: &Downstream,
        client: fn(Channel) -> C,
        call: impl Fn(C, Request<Q>) -> Fut,
    ) -> Result<R, Status>
    where
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let query = query(tenant, request.into_inner())?;
        unary(downstream, deadline, client, &query, call).await
    }

    fn limit(&self, tenant: &str, fixes: usize) -> Result<(), Error> {
        self.inner.limits.check(tenant, fixes).map_err(|limited| {
            metrics::counter!("gateway_rate_limited_total", "tenant" => tenant.to_owned(), "kind" => limited.kind)
                .increment(1);
            Error::RateLimited {
                kind: limited.kind,
                retry_after: limited.retry_after,
            }
        })
    }
}

fn device(device_id: &str) -> Result<(), Error> {
    DeviceId::parse("device_id", device_id)?;
    Ok(())
}

impl Inner {
    /// Validates one caller's request (so that its bad input never reaches a shared batch),
    /// then has it coalesced with the others'.
    #[tracing::instrument(name = "ingest", skip_all, fields(tenant = %tenant, fixes = request.fixes.len()))]
    async fn ingest(
        &self,
        tenant: &str,
        request: IngestRequest,
        deadline: Deadline,
    ) -> Result<IngestResponse, Error> {
        if request.fixes.len() > self.max_batch {
            return Err(Invalid::new(
                "fixes",
                format!(
                    "{} fixes, more than MAX_BATCH={}",
                    request.fixes.len(),
                    self.max_batch
                ),
            )
            .into());
        }
        for (index, fix) in request.fixes.iter().enumerate() {
            DeviceId::parse(format_args!("fixes[{index}].device_id"), &fix.device_id)?;
        }
        if request.fixes.is_empty() {
            return Ok(IngestResponse {
                sequence: request.sequence,
                stored: true,
                learning_ok: true,
                ..IngestResponse::default()
            });
        }
        let entry = Entry {
            tenant: tenant.to_owned(),
            fixes: request.fixes,
        };
        let mut response = self.coalescer.submit(entry, deadline).await?;
        response.sequence = request.sequence;
        Ok(response)
    }
}

impl Downstreams {
    /// A coalesced batch: its tenants concurrently, one answer per entry.
    async fn ingest_batch(&self, entries: Vec<Entry>, deadline: Deadline) -> Vec<coalesce::Answer> {
        let count = entries.len();
        let groups = coalesce::by_tenant(entries).into_iter().map(
            |(tenant, indexes, requests)| async move {
                let answers = self.ingest(&tenant, requests, deadline).await;
                (indexes, answers)
            },
        );
        let mut answers: Vec<coalesce::Answer> = (0..count)
            .map(|_| Err(Status::internal("no answer for this request")))
            .collect();
        for (indexes, group) in futures::future::join_all(groups).await {
            match group {
                Ok(responses) => {
                    for (index, response) in indexes.into_iter().zip(responses) {
                        answers[index] = Ok(response);
                    }
                }
                // Only this tenant's callers fail; each may retry (replays, de-duplication).
                Err(status) => {
                    for index in indexes {
                        answers[index] = Err(status.clone());
                    }
                }
            }
        }
        answers
    }

    /// One tenant's requests of a batch: one Refine of them all, then Store (required) and
    /// Observe (best effort) concurrently with the accepted and recovered fixes. One response
    /// per request; an error fails them all.
    #[tracing::instrument(name = "ingest_tenant", skip_all, fields(tenant = %tenant, requests = requests.len()))]
    async fn ingest(
        &self,
        tenant: &str,
        requests: Vec<Vec<Fix>>,
        deadline: Deadline,
    ) -> Result<Vec<IngestResponse>, Status> {
        // Refinement commits what it accepts: refuse before it when storage cannot take the
        // result, or the client's retry would find those fixes already behind the track.
        self.storage.available()?;
        let sizes: Vec<usize> = requests.iter().map(Vec::len).collect();
        let refine = RefineRequest {
            tenant_id: tenant.to_owned(),
            fixes: requests.into_iter().flatten().collect(),
        };
        let refined = unary(
            &self.refinement,
            deadline,
            refinement,
            &refine,
            |mut c, r| async move { c.refine(r).await },
        )
        .await?;
        let (mut responses, accepted) = coalesce::split(&sizes, refined)?;
        let (stored, learning_ok) = if accepted.is_empty() {
            (true, true)
        } else {
            self.store_and_observe(tenant, accepted, deadline).await?
        };
        for response in &mut responses {
            response.stored = stored;
            response.learning_ok = learning_ok;
        }
        Ok(responses)
    }

    /// Store (required) and Observe (best effort) `accepted` concurrently: (stored, observed).
    async fn store_and_observe(
        &self,
        tenant: &str,
        accepted: Vec<trackmesh_proto::v1::RefinedFix>,
        deadline: Deadline,
    ) -> Result<(bool, bool), Status> {
        let store = self.storage.call(deadline, |channel, timeout, attempt| {
            let mut fixes = accepted.clone();
            if attempt > 1 {
                // The first attempt may have reached Kafka: mark the fixes as re-sent so that
                // storage drops the copies it already has.
                fixes.iter_mut().for_each(|fix| fix.replay = true);
            }
            let store = StoreRequest {
                tenant_id: tenant.to_owned(),
                fixes,
            };
            async move { storage(channel).store(with_timeout(store, timeout)).await }
        });
        // Each attempt copies the fixes once, straight from `accepted`.
        let observe = self.learning.call(deadline, |channel, timeout, _| {
            let observe = ObserveRequest {
                tenant_id: tenant.to_owned(),
                fixes: accepted.clone(),
            };
            async move {
                learning(channel)
                    .observe(with_timeout(observe, timeout))
                    .await
            }
        });
        let (stored, observed) = futures::join!(store, observe);
        // Storage is required: without it the client must retry (safe: replays, de-duplication).
        stored?;
        let learning_ok = match observed {
            Ok(_) => true,
            Err(status) => {
                metrics::counter!("gateway_learning_failures_total").increment(1);
                tracing::warn!(code = ?status.code(), message = status.message(), "learning failed, ingest goes on");
                false
            }
        };
        Ok((true, learning_ok))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The client's messages, ended with DEADLINE_EXCEEDED when none arrives within
/// `timeouts.idle` (waiting time only: the clock starts when the previous message has been
/// answered) or when the stream has been open for `timeouts.max`. Either way the stream's
/// slot is given back and the client opens a new stream when it has something to send.
fn bounded<S>(
    messages: S,
    timeouts: StreamTimeouts,
) -> impl Stream<Item = Result<IngestRequest, Status>>
where
    S: Stream<Item = Result<IngestRequest, Status>> + Unpin,
{
    let end = tokio::time::Instant::now() + timeouts.max;
    futures::stream::unfold(Some(messages), move |messages| async move {
        let mut messages = messages?;
        let now = tokio::time::Instant::now();
        let idle_until = now + timeouts.idle;
        // A client that always has a message ready must not outlive the limit either.
        let next = if now >= end {
            None
        } else {
            tokio::time::timeout_at(idle_until.min(end), messages.next())
                .await
                .ok()
        };
        match next {
            Some(Some(message)) => Some((message, Some(messages))),
            Some(None) => None,
            None => {
                let status = if idle_until < end {
                    tracing::info!(idle = ?timeouts.idle, "idle ingest stream closed");
                    Status::deadline_exceeded(format!(
                        "no message for {:?} (STREAM_IDLE_TIMEOUT): stream closed, open a new one to send more",
                        timeouts.idle
                    ))
                } else {
                    tracing::info!(open = ?timeouts.max, "ingest stream closed after its longest duration");
                    Status::deadline_exceeded(format!(
                        "stream open for {:?} (STREAM_MAX_DURATION): stream closed, open a new one to send more",
                        timeouts.max
                    ))
                };
                Some((Err(status), None))
            }
        }
    })
}

/// The Gateway methods that only pass a query on: the listed fields of the caller's request
/// (`@`: the device it is about, checked first) and the caller's tenant become the message of
/// one downstream method, whose answer is the caller's. Written out the way `async_trait`
/// writes the methods of `impl Gateway`, inside which this expands.
macro_rules! forward {
    ($($method:ident($from:ident { $(@$device:ident,)? $($field:ident),* })
        => $downstream:ident.$call:ident($to:ident) -> $response:ident;)*) => {$(
        fn $method<'life0, 'async_trait>(
            &'life0 self,
            request: Request<$from>,
        ) -> Pin<Box<dyn Future<Output = Result<Response<$response>, Status>> + Send + 'async_trait>>
        where
            'life0: 'async_trait,
            Self: 'async_trait,
        {
            let query = |tenant_id, request: $from| -> Result<$to, Error> {
                $(device(&request.$device)?;)?
                Ok($to { tenant_id, $($device: request.$device,)? $($field: request.$field),* })
            };
            let downstream = &self.inner.downstreams.$downstream;
            Box::pin(async move {
                let answer = self.forward(request, query, downstream, $downstream, |mut c, r| {
                    async move { c.$call(r).await }
                });
                Ok(Response::new(answer.await?))
            })
        }
    )*};
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    type IngestStreamStream = BoxStream<IngestResponse>;
    type GetTrackStream = BoxStream<TrackChunk>;
    type WatchStream = WatchStream;
    type RelearnStream = RelearnStream;

    forward! {
        get_daily_stats(GetDailyStatsRequest { @device_id, from_ms, to_ms })
            => storage.daily_stats(DailyStatsRequest) -> DailyStatsResponse;
        list_devices(ListDevicesRequest { sort, page_size, page_token })
            => storage.list_devices(ListStoredDevicesRequest) -> ListDevicesResponse;
        get_places(DevicePlacesRequest { @device_id, k })
            => learning.get_places(GetPlacesRequest) -> GetPlacesResponse;
        predict_next(DevicePredictRequest { @device_id, k })
            => learning.predict_next(PredictNextRequest) -> PredictNextResponse;
        get_stays(GetStaysRequest { @device_id, from_ms, to_ms })
            => storage.get_stays(StoredHistoryRequest) -> GetStaysResponse;
        get_trips(GetTripsRequest { @device_id, from_ms, to_ms })
            => storage.get_trips(StoredHistoryRequest) -> GetTripsResponse;
    }

    async fn ingest(
        &self,
        request: Request<IngestRequest>,
    ) -> Result<Response<IngestResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        let request = request.into_inner();
        self.limit(&tenant, request.fixes.len())?;
        Ok(Response::new(
            self.inner.ingest(&tenant, request, deadline).await?,
        ))
    }

    async fn ingest_stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        let (tenant, _) = self.caller(&request)?;
        let this = self.clone();
        let messages = bounded(request.into_inner(), self.inner.streams);
        // One request at a time, in order: a device's fixes must reach refinement in order, and
        // a slow mesh slows the reader, which back-pressures the device over HTTP/2.
        let responses = messages.then(move |message| {
            let (this, tenant) = (this.clone(), tenant.clone());
            async move {
                let message = message?;
                this.limit(&tenant, message.fixes.len())?;
                let deadline = Deadline::after(this.inner.timeout);
                Ok(this.inner.ingest(&tenant, message, deadline).await?)
            }
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn get_track(
        &self,
        request: Request<GetTrackRequest>,
    ) -> Result<Response<Self::GetTrackStream>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        device(&request.device_id)?;
        let simplify_m =
            simplify::tolerance("simplify_m", request.simplify_m).map_err(Error::from)?;
        let query = QueryTrackRequest {
            tenant_id: tenant,
            device_id: request.device_id,
            from_ms: request.from_ms,
            to_ms: request.to_ms,
            descending: request.descending,
            limit: request.limit,
            resume_token: request.resume_token,
        };
        let stream = self
            .inner
            .downstreams
            .storage
            .call(deadline, |channel, _, _| {
                // No timeout on the stream itself: a long track takes as long as the client reads.
                let query = query.clone();
                async move { storage(channel).query_track(query).await }
            })
            .await?
            .into_inner();
        if simplify_m > 0.0 {
            return Ok(Response::new(Box::pin(simplify::simplified(
                stream, simplify_m,
            ))));
        }
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_events(
        &self,
        request: Request<GetEventsRequest>,
    ) -> Result<Response<GetEventsResponse>, Status> {
        // The tenant's events, or one device's.
        let query = |tenant_id, request: GetEventsRequest| {
            if !request.device_id.is_empty() {
                device(&request.device_id)?;
            }
            Ok(StoredEventsRequest {
                tenant_id,
                device_id: request.device_id,
                from_ms: request.from_ms,
                to_ms: request.to_ms,
                types: request.types,
            })
        };
        let to = &self.inner.downstreams.storage;
        let events = self.forward(request, query, to, storage, |mut c, r| async move {
            c.get_events(r).await
        });
        Ok(Response::new(events.await?))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let device_id = request.into_inner().device_id;
        device(&device_id)?;
        let inner = &self.inner.downstreams;
        let reset = ResetDeviceRequest {
            tenant_id: tenant.clone(),
            device_id: device_id.clone(),
        };
        let forget = ForgetRequest {
            tenant_id: tenant.clone(),
            device_id: device_id.clone(),
        };
        let delete = DeleteStoredDeviceRequest {
            tenant_id: tenant.clone(),
            device_id,
        };
        // All three or an error: deleting is idempotent, so the client simply retries.
        let (reset, forget, delete) = futures::join!(
            unary(
                &inner.refinement,
                deadline,
                refinement,
                &reset,
                |mut c, r| async move { c.reset_device(r).await }
            ),
            unary(
                &inner.learning,
                deadline,
                learning,
                &forget,
                |mut c, r| async move { c.forget(r).await }
            ),
            unary(
                &inner.storage,
                deadline,
                storage,
                &delete,
                |mut c, r| async move { c.delete_device(r).await }
            ),
        );
        reset?;
        forget?;
        delete?;
        tracing::info!(tenant = %tenant, "device deleted everywhere");
        Ok(Response::new(DeleteDeviceResponse {}))
    }

    async fn create_geofence(
        &self,
        request: Request<Geofence>,
    ) -> Result<Response<Geofence>, Status> {
        // Learning assigns the id and the creation time.
        let query = |tenant_id, geofence| {
            Ok(TenantGeofence {
                tenant_id,
                geofence: Some(geofence),
            })
        };
        let to = &self.inner.downstreams.learning;
        let created = self.forward(request, query, to, learning, |mut c, r| async move {
            c.create_geofence(r).await
        });
        Ok(Response::new(created.await?))
    }

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (tenant, _) = self.caller(&request)?;
        let stream = self.watch_as(tenant, request.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn list_geofences(
        &self,
        request: Request<ListGeofencesRequest>,
    ) -> Result<Response<ListGeofencesResponse>, Status> {
        let query = |tenant_id, _| Ok(TenantGeofencesRequest { tenant_id });
        let to = &self.inner.downstreams.learning;
        let listed = self.forward(request, query, to, learning, |mut c, r| async move {
            c.list_geofences(r).await
        });
        let geofences = listed.await?.geofences;
        Ok(Response::new(ListGeofencesResponse { geofences }))
    }

    async fn relearn(
        &self,
        request: Request<RelearnRequest>,
    ) -> Result<Response<Self::RelearnStream>, Status> {
        let (tenant, _) = self.caller(&request)?;
        Ok(Response::new(
            self.relearn_as(tenant, request.into_inner())?,
        ))
    }

    async fn delete_geofence(
        &self,
        request: Request<DeleteGeofenceRequest>,
    ) -> Result<Response<DeleteGeofenceResponse>, Status> {
        let query = |tenant_id, request: DeleteGeofenceRequest| {
            let geofence_id = request.geofence_id;
            Ok(DeleteTenantGeofenceRequest {
                tenant_id,
                geofence_id,
            })
        };
        let to = &self.inner.downstreams.learning;
        let deleted = self.forward(request, query, to, learning, |mut c, r| async move {
            c.delete_geofence(r).await
        });
        let existed = deleted.await?.existed;
        Ok(Response::new(DeleteGeofenceResponse { existed }))
    }

    async fn reseed(
        &self,
        request: Request<ReseedRequest>,
    ) -> Result<Response<ReseedResponse>, Status> {
        let (tenant, _) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        let devices = Devices::new(request.device_ids, request.all_devices)?;
        // One deadline per downstream call: a whole tenant takes longer than one TIMEOUT.
        let response = self
            .history()
            .reseed(&tenant, devices, self.inner.max_batch)
            .await?;
        Ok(Response::new(response))
    }
}

impl GatewayService {
    fn history(&self) -> History {
        History::new(self.inner.downstreams.clone(), self.inner.timeout)
    }

    /// The Relearn stream of `tenant` (gRPC and NDJSON): validated here, run in the
    /// background while the caller reads; no deadline but each downstream call's own.
    pub fn relearn_as(
        &self,
        tenant: String,
        request: RelearnRequest,
    ) -> Result<RelearnStream, Error> {
        self.limit(&tenant, 0)?;
        let devices = Devices::new(request.device_ids, request.all_devices)?;
        if request.from_ms < 0 {
            return Err(Invalid::new(
                "from_ms",
                format!(
                    "{} is negative: Unix ms >= 0 (0: every stored fix)",
                    request.from_ms
                ),
            )
            .into());
        }
        Ok(self.history().relearn(tenant, devices, request.from_ms))
    }
}

impl GatewayService {
    /// The Watch stream of `tenant` (gRPC and SSE); it ends after STREAM_MAX_DURATION, and
    /// the client resumes with its last token.
    pub fn watch_as(&self, tenant: String, request: WatchRequest) -> Result<WatchStream, Error> {
        self.limit(&tenant, 0)?;
        let hub = self.inner.hub.as_ref().ok_or(Error::LiveOff)?;
        let filter = Filter::new(tenant, request.device_ids, request.bbox)?;
        let resume = match request.resume_token.as_str() {
            "" => None,
            token => Some(Position::parse(token)?),
        };
        let stream = hub.subscribe(filter, resume)?;
        let end = tokio::time::sleep(self.inner.streams.max);
        Ok(Box::pin(stream.take_until(end)))
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    const TIMEOUTS: StreamTimeouts = StreamTimeouts {
        idle: Duration::from_secs(10),
        max: Duration::from_secs(60),
    };

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_ends_after_the_idle_timeout() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut messages = std::pin::pin!(bounded(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            TIMEOUTS
        ));
        for _ in 0..3 {
            // Messages 9 s apart keep it open.
            tokio::time::sleep(Duration::from_secs(9)).await;
            tx.send(Ok(IngestRequest::default())).await.unwrap();
            assert!(messages.next().await.unwrap().is_ok());
        }
        let start = Instant::now();
        let status = messages.next().await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), TIMEOUTS.idle);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("STREAM_IDLE_TIMEOUT"),
            "{status:?}"
        );
        assert!(messages.next().await.is_none(), "and then it ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_stream_ends_after_its_longest_duration() {
        let start = Instant::now();
        let busy = futures::stream::repeat_with(|| Ok(IngestRequest::default()));
        let mut messages = std::pin::pin!(bounded(busy, TIMEOUTS));
        let status = loop {
            match messages.next().await.unwrap() {
                Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(status) => break status,
            }
        };
        assert_eq!(start.elapsed(), TIMEOUTS.max);
        assert!(
            status.message().contains("STREAM_MAX_DURATION"),
            "{status:?}"
        );
        assert!(messages.next().await.is_none());
    }
}
