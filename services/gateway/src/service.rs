//! The Gateway gRPC service: authenticate, limit, validate, then Refine → Store + Observe for
//! ingest, and scoped queries; the tenant always comes from the API key.

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

use crate::{auth::ApiKeys, downstream::Downstream, error::Error, limits::Limits};

type Propagate = fn(Request<()>) -> Result<Request<()>, Status>;
type Client<C> = fn(InterceptedService<Channel, Propagate>) -> C;

/// A client of a downstream's balanced channel that passes the trace on.
fn client<C>(channel: Channel, new: Client<C>) -> C {
    new(InterceptedService::new(
        channel,
        telemetry::propagate as Propagate,
    ))
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

#[derive(Clone)]
pub struct GatewayService {
    inner: Arc<Inner>,
}

struct Inner {
    keys: ApiKeys,
    limits: Limits,
    refinement: Arc<Downstream>,
    learning: Arc<Downstream>,
    storage: Arc<Downstream>,
    max_batch: usize,
    timeout: Duration,
}

pub struct Downstreams {
    pub refinement: Arc<Downstream>,
    pub learning: Arc<Downstream>,
    pub storage: Arc<Downstream>,
}

impl GatewayService {
    pub fn new(
        keys: ApiKeys,
        limits: Limits,
        downstreams: Downstreams,
        max_batch: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                keys,
                limits,
                refinement: downstreams.refinement,
                learning: downstreams.learning,
                storage: downstreams.storage,
                max_batch,
                timeout,
            }),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The caller's tenant and deadline.
    fn caller<T>(&self, request: &Request<T>) -> Result<(String, Deadline), Status> {
        let tenant = self.inner.keys.tenant(request.metadata())?;
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
        let refine = RefineRequest {
            tenant_id: tenant.to_owned(),
            fixes: request.fixes,
        };
        let refined = self
            .refinement
            .call(deadline, |channel, timeout, _| {
                let refine = refine.clone();
                async move {
                    let mut client = client(channel, RefinementClient::new)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES);
                    Ok(client
                        .refine(with_timeout(refine, timeout))
                        .await?
                        .into_inner())
                }
            })
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
            async move {
                let mut client = client(channel, StorageClient::new)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                Ok(client
                    .store(with_timeout(store, timeout))
                    .await?
                    .into_inner())
            }
        });
        let observe = self.learning.call(deadline, |channel, timeout, _| {
            let observe = ObserveRequest {
                tenant_id: tenant.to_owned(),
                fixes: accepted.clone(),
            };
            async move {
                let mut client = client(channel, LearningClient::new)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES);
                Ok(client
                    .observe(with_timeout(observe, timeout))
                    .await?
                    .into_inner())
            }
        });
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
        // One request at a time, in order: a device's fixes must reach refinement in order, and
        // a slow mesh slows the reader, which back-pressures the device over HTTP/2.
        let responses = request.into_inner().then(move |message| {
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
                async move {
                    Ok(client(channel, StorageClient::new)
                        .query_track(query)
                        .await?
                        .into_inner())
                }
            })
            .await?;
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
        let stats = self
            .inner
            .storage
            .call(deadline, |channel, timeout, _| {
                let query = query.clone();
                async move {
                    Ok(client(channel, StorageClient::new)
                        .daily_stats(with_timeout(query, timeout))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(stats))
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
        let devices = self
            .inner
            .storage
            .call(deadline, |channel, timeout, _| {
                let query = query.clone();
                async move {
                    Ok(client(channel, StorageClient::new)
                        .list_devices(with_timeout(query, timeout))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(devices))
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
        let places = self
            .inner
            .learning
            .call(deadline, |channel, timeout, _| {
                let query = query.clone();
                async move {
                    Ok(client(channel, LearningClient::new)
                        .get_places(with_timeout(query, timeout))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(places))
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
        let predictions = self
            .inner
            .learning
            .call(deadline, |channel, timeout, _| {
                let query = query.clone();
                async move {
                    Ok(client(channel, LearningClient::new)
                        .predict_next(with_timeout(query, timeout))
                        .await?
                        .into_inner())
                }
            })
            .await?;
        Ok(Response::new(predictions))
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
        let reset = inner.refinement.call(deadline, |channel, timeout, _| {
            let message = ResetDeviceRequest {
                tenant_id: tenant.clone(),
                device_id: device_id.clone(),
            };
            async move {
                client(channel, RefinementClient::new)
                    .reset_device(with_timeout(message, timeout))
                    .await?;
                Ok(())
            }
        });
        let forget = inner.learning.call(deadline, |channel, timeout, _| {
            let message = ForgetRequest {
                tenant_id: tenant.clone(),
                device_id: device_id.clone(),
            };
            async move {
                client(channel, LearningClient::new)
                    .forget(with_timeout(message, timeout))
                    .await?;
                Ok(())
            }
        });
        let delete = inner.storage.call(deadline, |channel, timeout, _| {
            let message = DeleteStoredDeviceRequest {
                tenant_id: tenant.clone(),
                device_id: device_id.clone(),
            };
            async move {
                client(channel, StorageClient::new)
                    .delete_device(with_timeout(message, timeout))
                    .await?;
                Ok(())
            }
        });
        // All three or an error: deleting is idempotent, so the client simply retries.
        let (reset, forget, delete) = futures::join!(reset, forget, delete);
        reset?;
        forget?;
        delete?;
        tracing::info!(tenant = %tenant, "device deleted everywhere");
        Ok(Response::new(DeleteDeviceResponse {}))
    }
}
