//! The Gateway gRPC service: limit, validate, then Refine → Store + Observe for ingest, and
//! scoped queries. The tenant always comes from the API key, checked by `guard` before the
//! request reached this service.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use tonic::{
    Request, Response, Status, Streaming, service::interceptor::InterceptedService,
    transport::Channel,
};
use trackmesh_proto::v1::{
    DailyStatsRequest, DailyStatsResponse, DeleteDeviceRequest, DeleteDeviceResponse,
    DeleteStoredDeviceRequest, DevicePlacesRequest, DevicePredictRequest, ForgetRequest,
    GetDailyStatsRequest, GetPlacesRequest, GetPlacesResponse, GetTrackRequest, IngestRequest,
    IngestResponse, ListDevicesRequest, ListDevicesResponse, ListStoredDevicesRequest,
    ObserveRequest, PredictNextRequest, PredictNextResponse, QueryTrackRequest, RefineRequest,
    RefinedFix, Rejection, ResetDeviceRequest, StoreRequest, TrackChunk, Verdict,
    gateway_server::Gateway, learning_client::LearningClient, refinement_client::RefinementClient,
    storage_client::StorageClient,
};
use trackmesh_shared::{grpc::Deadline, ids, server::MAX_MESSAGE_BYTES, telemetry};

use crate::{downstream::Downstream, error::Error, guard::Tenant, limits::Limits};

type Propagate = fn(Request<()>) -> Result<Request<()>, Status>;
/// A channel whose calls pass the current trace on.
type Traced = InterceptedService<Channel, Propagate>;

fn traced(channel: Channel) -> Traced {
    InterceptedService::new(channel, telemetry::propagate as Propagate)
}

fn refinement(channel: Channel) -> RefinementClient<Traced> {
    RefinementClient::new(traced(channel))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn learning(channel: Channel) -> LearningClient<Traced> {
    LearningClient::new(traced(channel)).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn storage(channel: Channel) -> StorageClient<Traced> {
    StorageClient::new(traced(channel)).max_encoding_message_size(MAX_MESSAGE_BYTES)
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// One unary call through `downstream` (retried as it decides): per attempt a client on its
/// balanced channel and a copy of `message` carrying the attempt's timeout.
async fn unary<C, Req, Resp, Fut>(
    downstream: &Downstream,
    deadline: Deadline,
    client: fn(Channel) -> C,
    message: &Req,
    call: impl Fn(C, Request<Req>) -> Fut,
) -> Result<Resp, Status>
where
    Req: Clone,
    Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
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
    refinement: Arc<Downstream>,
    learning: Arc<Downstream>,
    storage: Arc<Downstream>,
    max_batch: usize,
    timeout: Duration,
    streams: StreamTimeouts,
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

impl GatewayService {
    pub fn new(
        limits: Limits,
        downstreams: Downstreams,
        max_batch: usize,
        timeout: Duration,
        streams: StreamTimeouts,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits,
                refinement: downstreams.refinement,
                learning: downstreams.learning,
                storage: downstreams.storage,
                max_batch,
                timeout,
                streams,
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
    ids::check_device(device_id).map_err(|rule| Error::invalid("device_id", rule))
}

impl Inner {
    #[tracing::instrument(name = "ingest", skip_all, fields(tenant = %tenant, fixes = request.fixes.len()))]
    async fn ingest(
        &self,
        tenant: &str,
        request: IngestRequest,
        deadline: Deadline,
    ) -> Result<IngestResponse, Error> {
        if request.fixes.len() > self.max_batch {
            return Err(Error::invalid(
                "fixes",
                format!(
                    "{} fixes, more than MAX_BATCH={}",
                    request.fixes.len(),
                    self.max_batch
                ),
            ));
        }
        for (index, fix) in request.fixes.iter().enumerate() {
            ids::check_device(&fix.device_id)
                .map_err(|rule| Error::invalid(format!("fixes[{index}].device_id"), rule))?;
        }
        // Refinement commits what it accepts: refuse before it when storage cannot take the
        // result, or the client's retry would find those fixes already behind the track.
        self.storage.available()?;
        let refine = RefineRequest {
            tenant_id: tenant.to_owned(),
            fixes: request.fixes,
        };
        let refined = unary(
            &self.refinement,
            deadline,
            refinement,
            &refine,
            |mut c, r| async move { c.refine(r).await },
        )
        .await?;

        let mut response = IngestResponse {
            sequence: request.sequence,
            recovered: u32::try_from(refined.recovered.len()).unwrap_or(u32::MAX),
            ..IngestResponse::default()
        };
        let mut accepted: Vec<RefinedFix> =
            Vec::with_capacity(refined.results.len() + refined.recovered.len());
        for (index, result) in refined.results.into_iter().enumerate() {
            if result.verdict == Verdict::Accepted as i32 {
                response.accepted += 1;
                response.replayed += u32::from(result.replay);
                accepted.push(result);
            } else {
                response.rejected += 1;
                response.rejections.push(Rejection {
                    index: u32::try_from(index).unwrap_or(u32::MAX),
                    verdict: result.verdict,
                    detail: result.detail,
                });
            }
        }
        accepted.extend(refined.recovered);
        if accepted.is_empty() {
            response.stored = true;
            response.learning_ok = true;
            return Ok(response);
        }

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
        let observe = ObserveRequest {
            tenant_id: tenant.to_owned(),
            fixes: accepted.clone(),
        };
        let observe = unary(
            &self.learning,
            deadline,
            learning,
            &observe,
            |mut c, r| async move { c.observe(r).await },
        );
        let (stored, observed) = futures::join!(store, observe);
        // Storage is required: without it the client must retry (safe: replays, de-duplication).
        stored?;
        response.stored = true;
        response.learning_ok = match observed {
            Ok(_) => true,
            Err(status) => {
                metrics::counter!("gateway_learning_failures_total").increment(1);
                tracing::warn!(code = ?status.code(), message = status.message(), "learning failed, ingest goes on");
                false
            }
        };
        Ok(response)
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

#[tonic::async_trait]
impl Gateway for GatewayService {
    type IngestStreamStream = BoxStream<IngestResponse>;
    type GetTrackStream = BoxStream<TrackChunk>;

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
            .storage
            .call(deadline, |channel, _, _| {
                // No timeout on the stream itself: a long track takes as long as the client reads.
                let query = query.clone();
                async move { storage(channel).query_track(query).await }
            })
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_daily_stats(
        &self,
        request: Request<GetDailyStatsRequest>,
    ) -> Result<Response<DailyStatsResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        device(&request.device_id)?;
        let query = DailyStatsRequest {
            tenant_id: tenant,
            device_id: request.device_id,
            from_ms: request.from_ms,
            to_ms: request.to_ms,
        };
        let stats = unary(
            &self.inner.storage,
            deadline,
            storage,
            &query,
            |mut c, r| async move { c.daily_stats(r).await },
        );
        Ok(Response::new(stats.await?))
    }

    async fn list_devices(
        &self,
        request: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        let query = ListStoredDevicesRequest {
            tenant_id: tenant,
            sort: request.sort,
            page_size: request.page_size,
            page_token: request.page_token,
        };
        let devices = unary(
            &self.inner.storage,
            deadline,
            storage,
            &query,
            |mut c, r| async move { c.list_devices(r).await },
        );
        Ok(Response::new(devices.await?))
    }

    async fn get_places(
        &self,
        request: Request<DevicePlacesRequest>,
    ) -> Result<Response<GetPlacesResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        device(&request.device_id)?;
        let query = GetPlacesRequest {
            tenant_id: tenant,
            device_id: request.device_id,
            k: request.k,
        };
        let places = unary(
            &self.inner.learning,
            deadline,
            learning,
            &query,
            |mut c, r| async move { c.get_places(r).await },
        );
        Ok(Response::new(places.await?))
    }

    async fn predict_next(
        &self,
        request: Request<DevicePredictRequest>,
    ) -> Result<Response<PredictNextResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let request = request.into_inner();
        device(&request.device_id)?;
        let query = PredictNextRequest {
            tenant_id: tenant,
            device_id: request.device_id,
            k: request.k,
        };
        let predictions = unary(
            &self.inner.learning,
            deadline,
            learning,
            &query,
            |mut c, r| async move { c.predict_next(r).await },
        );
        Ok(Response::new(predictions.await?))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        let (tenant, deadline) = self.caller(&request)?;
        self.limit(&tenant, 0)?;
        let device_id = request.into_inner().device_id;
        device(&device_id)?;
        let inner = &self.inner;
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
