//! Relearn and Reseed, orchestrated by the gateway from storage's stored fixes: Relearn
//! rebuilds each device's learned model (learning.Rebuild fed chunk by chunk from
//! storage.QueryTrack, after storage.DeleteHistory), Reseed anchors refinement on each device's
//! last stored fix (refinement.Seed).

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use tokio::{sync::mpsc, task::AbortHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::Instrument as _;
use trackmesh_proto::v1::{
    DeleteHistoryRequest, ListStoredDevicesRequest, QueryTrackRequest, RebuildReply,
    RebuildRequest, RefinedFix, RelearnProgress, ReseedResponse, SeedRequest, SortField,
};
use trackmesh_shared::{
    domain::{DeviceId, Invalid},
    grpc::Deadline,
};

use crate::{
    error::Error,
    service::{Downstreams, learning, refinement, storage, unary},
};

/// Devices rebuilt at the same time by one Relearn: enough to overlap the round trips,
/// few enough that one tenant's relearn leaves learning and ClickHouse to the live traffic.
pub const PARALLEL_DEVICES: usize = 4;
/// Wait before sending the fixes after learning's `need_after_ms`: the fixes the current
/// model saw are on their way into ClickHouse (storage writes in batches).
pub const NEED_AFTER_WAIT: Duration = Duration::from_millis(500);
/// Rounds of `need_after_ms` in a row without the rebuilt model's watermark advancing, after
/// which the model is replaced anyway: the newer fixes the current model saw were never stored.
pub const MAX_STALLED_ROUNDS: u32 = 20;
/// Devices per ListDevices page (storage's maximum).
const LIST_PAGE: u32 = 1000;
/// Last-fix look-ups of Reseed in flight at once.
const RESEED_PARALLEL: usize = 8;
/// Fixes per Seed call (also capped by MAX_BATCH).
const SEED_BATCH: usize = 500;

/// Which devices a Relearn or Reseed is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// Valid ids, each once, in the caller's order.
    Listed(Vec<String>),
    /// Every device storage knows for the tenant.
    All,
}

impl Devices {
    /// Exactly one of `device_ids` and `all_devices`; each id valid.
    pub fn new(device_ids: Vec<String>, all_devices: bool) -> Result<Self, Error> {
        match (device_ids.is_empty(), all_devices) {
            (true, false) => Err(Invalid::new(
                "device_ids",
                "give one or more device ids, or all_devices=true",
            )
            .into()),
            (false, true) => Err(Invalid::new(
                "all_devices",
                "not together with device_ids: give one or the other",
            )
            .into()),
            (true, true) => Ok(Self::All),
            (false, false) => {
                let mut seen = HashSet::new();
                let mut listed = Vec::with_capacity(device_ids.len());
                for (index, id) in device_ids.into_iter().enumerate() {
                    DeviceId::parse(format_args!("device_ids[{index}]"), &id)?;
                    if seen.insert(id.clone()) {
                        listed.push(id);
                    }
                }
                Ok(Self::Listed(listed))
            }
        }
    }
}

/// The downstream calls of Relearn and Reseed. Every unary call gets its own deadline of
/// the gateway's TIMEOUT: the whole operation may take much longer than one call.
#[derive(Clone)]
pub struct History {
    downstreams: Arc<Downstreams>,
    timeout: Duration,
    need_after_wait: Duration,
    max_stalled_rounds: u32,
}

type Progress = Result<RelearnProgress, Status>;
/// Fixes on their way to learning, then `done`.
type Feeding<'a> = Pin<Box<dyn Future<Output = Result<(), Status>> + Send + 'a>>;

/// The messages of one Relearn; dropping it (the client went away) stops the work.
pub struct RelearnStream {
    messages: ReceiverStream<Progress>,
    task: AbortHandle,
}

impl Stream for RelearnStream {
    type Item = Progress;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Progress>> {
        Pin::new(&mut self.messages).poll_next(cx)
    }
}

impl Drop for RelearnStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the devices of one Relearn report, counted over all of them.
struct Reporter {
    tx: mpsc::Sender<Progress>,
    total: u32,
    /// (devices done, fixes learned over all devices); locked across the send so that the
    /// counts only grow along the stream.
    counts: tokio::sync::Mutex<(u32, u64)>,
}

impl Reporter {
    async fn report(&self, mut message: RelearnProgress, new_fixes: u64) -> Result<(), Status> {
        let mut counts = self.counts.lock().await;
        counts.1 += new_fixes;
        if message.done {
            counts.0 += 1;
        }
        message.devices_done = counts.0;
        message.devices_total = self.total;
        message.fixes_total = counts.1;
        self.tx
            .send(Ok(message))
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }
}

impl History {
    pub fn new(downstreams: Arc<Downstreams>, timeout: Duration) -> Self {
        Self {
            downstreams,
            timeout,
            need_after_wait: NEED_AFTER_WAIT,
            max_stalled_rounds: MAX_STALLED_ROUNDS,
        }
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    /// Relearns `devices` of `tenant` from their fixes stored at or after `from_ms`, in the
    /// background; the stream ends after the last device's done message, or with the first
    /// error (naming its device).
    pub fn relearn(&self, tenant: String, devices: Devices, from_ms: i64) -> RelearnStream {
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        let span = tracing::info_span!("relearn", tenant = %tenant, from_ms);
        let task = tokio::spawn(
            async move {
                match this.relearn_all(&tenant, devices, from_ms, tx.clone()).await {
                    Ok(devices) => tracing::info!(devices, "relearn finished"),
                    Err(status) => {
                        tracing::warn!(code = ?status.code(), message = status.message(), "relearn failed");
                        // The client may be gone already: nothing more to do then.
                        let _ = tx.send(Err(status)).await;
                    }
                }
            }
            .instrument(span),
        );
        RelearnStream {
            messages: ReceiverStream::new(rx),
            task: task.abort_handle(),
        }
    }

    async fn relearn_all(
        &self,
        tenant: &str,
        devices: Devices,
        from_ms: i64,
        tx: mpsc::Sender<Progress>,
    ) -> Result<usize, Status> {
        let ids = self.device_ids(tenant, devices).await?;
        let reporter = Reporter {
            tx,
            total: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            counts: tokio::sync::Mutex::new((0, 0)),
        };
        let count = ids.len();
        futures::stream::iter(ids)
            .map(|device| {
                let reporter = &reporter;
                async move {
                    self.rebuild(tenant, &device, from_ms, reporter)
                        .await
                        .map_err(|status| {
                            Status::new(
                                status.code(),
                                format!("device {device:?}: {}", status.message()),
                            )
                        })
                }
            })
            .buffer_unordered(PARALLEL_DEVICES)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(count)
    }

    /// The ids of `devices`: as listed, or every stored device of the tenant, page by page.
    async fn device_ids(&self, tenant: &str, devices: Devices) -> Result<Vec<String>, Status> {
        if let Devices::Listed(ids) = devices {
            return Ok(ids);
        }
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = ListStoredDevicesRequest {
                tenant_id: tenant.to_owned(),
                sort: vec![SortField {
                    field: "device_id".into(),
                    descending: false,
                }],
                page_size: LIST_PAGE,
                page_token,
            };
            let page = unary(
                &self.downstreams.storage,
                self.deadline(),
                storage,
                &request,
                |mut c, r| async move { c.list_devices(r).await },
            )
            .await?;
            ids.extend(page.devices.into_iter().map(|device| device.device_id));
            if page.next_page_token.is_empty() {
                return Ok(ids);
            }
            page_token = page.next_page_token;
        }
    }

    /// One device: its stays and trips from `from_ms` on deleted, then its model rebuilt from
    /// its stored fixes and swapped in by learning.
    #[tracing::instrument(name = "relearn_device", skip_all, fields(device = %device))]
    async fn rebuild(
        &self,
        tenant: &str,
        device: &str,
        from_ms: i64,
        reporter: &Reporter,
    ) -> Result<(), Status> {
        let delete = DeleteHistoryRequest {
            tenant_id: tenant.to_owned(),
            device_id: device.to_owned(),
            from_ms,
        };
        unary(
            &self.downstreams.storage,
            self.deadline(),
            storage,
            &delete,
            |mut c, r| async move { c.delete_history(r).await },
        )
        .await?;
        let first = RebuildRequest {
            tenant_id: tenant.to_owned(),
            device_id: device.to_owned(),
            ..RebuildRequest::default()
        };
        // The first message waits in the channel before the call is made: learning may read
        // it before it answers the call.
        let (tx, mut replies) = self
            .downstreams
            .learning
            .call(self.deadline(), |channel, _, _| {
                let first = first.clone();
                async move {
                    let (tx, rx) = mpsc::channel(2);
                    tx.send(first)
                        .await
                        .map_err(|_| Status::internal("rebuild: request channel closed"))?;
                    let replies = learning(channel)
                        .rebuild(ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    Ok((tx, replies))
                }
            })
            .await?;
        // Fixes are sent while replies are read: learning answers as it goes, and neither
        // side may wait for the other.
        let mut feeding: Feeding<'_> = Box::pin(self.feed(tenant, device, from_ms, &tx, false));
        let mut fed = false;
        let mut learned = 0;
        let mut watermark = None;
        let mut stalled = 0;
        loop {
            tokio::select! {
                result = &mut feeding, if !fed => {
                    result?;
                    fed = true;
                }
                reply = replies.message() => {
                    let Some(reply) = reply? else {
                        return Err(Status::unavailable(
                            "learning ended the rebuild before replacing the model; relearn again",
                        ));
                    };
                    let new_fixes = reply.fixes.saturating_sub(learned);
                    learned = learned.max(reply.fixes);
                    if reply.replaced {
                        tracing::info!(fixes = reply.fixes, stays = reply.stays, places = reply.places_after, "model rebuilt");
                        return reporter.report(done(device, &reply), new_fixes).await;
                    }
                    if new_fixes > 0 {
                        let message = RelearnProgress {
                            device_id: device.to_owned(),
                            fixes: reply.fixes,
                            ..RelearnProgress::default()
                        };
                        reporter.report(message, new_fixes).await?;
                    }
                    if reply.need_after_ms != 0 {
                        // The current model saw newer fixes than the stored ones sent so far.
                        if watermark == Some(reply.need_after_ms) {
                            stalled += 1;
                        } else {
                            watermark = Some(reply.need_after_ms);
                            stalled = 0;
                        }
                        let force = stalled >= self.max_stalled_rounds;
                        if force {
                            tracing::warn!(need_after_ms = reply.need_after_ms, rounds = stalled, "newer fixes never stored: model replaced anyway");
                        }
                        // Never before from_ms (learning asks from 1 when it learned nothing).
                        let after = reply.need_after_ms.saturating_add(1).max(from_ms);
                        let tx = &tx;
                        feeding = Box::pin(async move {
                            tokio::time::sleep(self.need_after_wait).await;
                            self.feed(tenant, device, after, tx, force).await
                        });
                        fed = false;
                    }
                }
            }
        }
    }

    /// Sends the device's stored fixes from `from_ms` on, one storage chunk at a time, then
    /// `done`.
    async fn feed(
        &self,
        tenant: &str,
        device: &str,
        from_ms: i64,
        tx: &mpsc::Sender<RebuildRequest>,
        force: bool,
    ) -> Result<(), Status> {
        let query = QueryTrackRequest {
            tenant_id: tenant.to_owned(),
            device_id: device.to_owned(),
            from_ms,
            ..QueryTrackRequest::default()
        };
        let mut chunks = self
            .downstreams
            .storage
            .call(self.deadline(), |channel, _, _| {
                // No timeout on the stream itself: a long track takes as long as it takes.
                let query = query.clone();
                async move { storage(channel).query_track(query).await }
            })
            .await?
            .into_inner();
        let closed = || Status::unavailable("learning: the rebuild stream closed");
        while let Some(chunk) = chunks.message().await? {
            if chunk.fixes.is_empty() {
                continue;
            }
            let message = RebuildRequest {
                fixes: chunk.fixes,
                ..RebuildRequest::default()
            };
            tx.send(message).await.map_err(|_| closed())?;
        }
        let done = RebuildRequest {
            done: true,
            force,
            ..RebuildRequest::default()
        };
        tx.send(done).await.map_err(|_| closed())
    }

    /// Anchors refinement on the last stored fix of each of `devices` that has no state.
    pub async fn reseed(
        &self,
        tenant: &str,
        devices: Devices,
        max_batch: usize,
    ) -> Result<ReseedResponse, Status> {
        let ids = self.device_ids(tenant, devices).await?;
        let mut response = ReseedResponse::default();
        for group in ids.chunks(SEED_BATCH.min(max_batch).max(1)) {
            let lasts: Vec<Option<RefinedFix>> = futures::stream::iter(group.iter().cloned())
                .map(|device| async move { self.last_fix(tenant, &device).await })
                .buffered(RESEED_PARALLEL)
                .try_collect()
                .await?;
            let fixes: Vec<RefinedFix> = lasts.into_iter().flatten().collect();
            response.without_fixes += u32::try_from(group.len() - fixes.len()).unwrap_or(0);
            if fixes.is_empty() {
                continue;
            }
            let seed = SeedRequest {
                tenant_id: tenant.to_owned(),
                fixes,
            };
            let seeded = unary(
                &self.downstreams.refinement,
                self.deadline(),
                refinement,
                &seed,
                |mut c, r| async move { c.seed(r).await },
            )
            .await?;
            response.seeded += seeded.seeded;
            response.kept += seeded.kept;
        }
        tracing::info!(
            tenant = %tenant,
            seeded = response.seeded,
            kept = response.kept,
            without_fixes = response.without_fixes,
            "reseed finished"
        );
        Ok(response)
    }

    /// The device's newest stored fix.
    async fn last_fix(&self, tenant: &str, device: &str) -> Result<Option<RefinedFix>, Status> {
        let query = QueryTrackRequest {
            tenant_id: tenant.to_owned(),
            device_id: device.to_owned(),
            descending: true,
            limit: 1,
            ..QueryTrackRequest::default()
        };
        let deadline = self.deadline();
        let mut chunks = self
            .downstreams
            .storage
            .call(deadline, |channel, timeout, _| {
                let query = query.clone();
                async move {
                    let mut request = tonic::Request::new(query);
                    request.set_timeout(timeout);
                    storage(channel).query_track(request).await
                }
            })
            .await?
            .into_inner();
        let read = async {
            while let Some(chunk) = chunks.message().await? {
                if let Some(fix) = chunk.fixes.into_iter().next() {
                    return Ok(Some(fix));
                }
            }
            Ok(None)
        };
        tokio::time::timeout(deadline.remaining(), read)
            .await
            .map_err(|_| Status::deadline_exceeded("storage: no last fix within TIMEOUT"))?
    }
}

/// The done message of a device whose model learning replaced.
fn done(device: &str, reply: &RebuildReply) -> RelearnProgress {
    RelearnProgress {
        device_id: device.to_owned(),
        fixes: reply.fixes,
        done: true,
        places_before: reply.places_before,
        places_after: reply.places_after,
        stays: reply.stays,
        ..RelearnProgress::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic::{Request, Response, Streaming, transport::Server};
    use trackmesh_proto::v1::{
        DailyStatsRequest, DailyStatsResponse, DeleteHistoryResponse, DeleteStoredDeviceRequest,
        DeleteStoredDeviceResponse, DeleteTenantGeofenceRequest, DeleteTenantGeofenceResponse, Fix,
        ForgetRequest, ForgetResponse, Geofence, GetEventsResponse, GetPlacesRequest,
        GetPlacesResponse, GetProfileRequest, GetProfileResponse, GetStaysResponse,
        GetTripsResponse, ListDevicesResponse, ListTenantGeofencesResponse, ObserveRequest,
        ObserveResponse, PredictNextRequest, PredictNextResponse, StoreRequest, StoreResponse,
        StoredEventsRequest, StoredHistoryRequest, TenantGeofence, TenantGeofencesRequest,
        TrackChunk, Verdict,
        learning_server::{Learning, LearningServer},
        storage_server::{Storage, StorageServer},
    };
    use trackmesh_shared::config::CommonConfig;

    use super::*;
    use crate::{
        config::GatewayConfig,
        downstream::{Downstream, Target},
    };

    /// Storage and learning in one: `fixes` stored (times 1..=n), served in chunks of 3; a
    /// rebuild learns what it is sent and, on `done` without `force`, asks for the fixes after
    /// its watermark (the current model saw a newer fix that is never stored).
    #[derive(Clone)]
    struct Fake {
        stored: usize,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Fake {
        fn log(&self, entry: String) {
            self.log.lock().unwrap().push(entry);
        }
    }

    type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    fn no<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    #[tonic::async_trait]
    impl Storage for Fake {
        type QueryTrackStream = Boxed<TrackChunk>;

        async fn query_track(
            &self,
            request: Request<QueryTrackRequest>,
        ) -> Result<Response<Self::QueryTrackStream>, Status> {
            let request = request.into_inner();
            self.log(format!("query from {}", request.from_ms));
            let fixes: Vec<RefinedFix> = (1..=self.stored as i64)
                .filter(|t| *t >= request.from_ms)
                .map(|time_ms| RefinedFix {
                    fix: Some(Fix {
                        device_id: request.device_id.clone(),
                        time_ms,
                        ..Fix::default()
                    }),
                    verdict: Verdict::Accepted as i32,
                    ..RefinedFix::default()
                })
                .collect();
            let chunks: Vec<Result<TrackChunk, Status>> = fixes
                .chunks(3)
                .map(|fixes| {
                    Ok(TrackChunk {
                        fixes: fixes.to_vec(),
                        resume_token: String::new(),
                    })
                })
                .collect();
            Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
        }

        async fn delete_history(
            &self,
            request: Request<DeleteHistoryRequest>,
        ) -> Result<Response<DeleteHistoryResponse>, Status> {
            self.log(format!("delete from {}", request.get_ref().from_ms));
            Ok(Response::new(DeleteHistoryResponse {}))
        }

        async fn store(&self, _: Request<StoreRequest>) -> Result<Response<StoreResponse>, Status> {
            no()
        }
        async fn daily_stats(
            &self,
            _: Request<DailyStatsRequest>,
        ) -> Result<Response<DailyStatsResponse>, Status> {
            no()
        }
        async fn list_devices(
            &self,
            _: Request<ListStoredDevicesRequest>,
        ) -> Result<Response<ListDevicesResponse>, Status> {
            no()
        }
        async fn delete_device(
            &self,
            _: Request<DeleteStoredDeviceRequest>,
        ) -> Result<Response<DeleteStoredDeviceResponse>, Status> {
            no()
        }
        async fn get_events(
            &self,
            _: Request<StoredEventsRequest>,
        ) -> Result<Response<GetEventsResponse>, Status> {
            no()
        }
        async fn get_stays(
            &self,
            _: Request<StoredHistoryRequest>,
        ) -> Result<Response<GetStaysResponse>, Status> {
            no()
        }
        async fn get_trips(
            &self,
            _: Request<StoredHistoryRequest>,
        ) -> Result<Response<GetTripsResponse>, Status> {
            no()
        }
    }

    #[tonic::async_trait]
    impl Learning for Fake {
        type RebuildStream = Boxed<RebuildReply>;

        async fn rebuild(
            &self,
            request: Request<Streaming<RebuildRequest>>,
        ) -> Result<Response<Self::RebuildStream>, Status> {
            let mut requests = request.into_inner();
            let (tx, rx) = mpsc::channel(1);
            let this = self.clone();
            tokio::spawn(async move {
                let mut learned = 0u64;
                let mut watermark = 0;
                while let Some(Ok(request)) = requests.next().await {
                    if !request.device_id.is_empty() {
                        this.log(format!("rebuild {}", request.device_id));
                    }
                    if !request.fixes.is_empty() {
                        this.log(format!("fixes {}", request.fixes.len()));
                        learned += request.fixes.len() as u64;
                        watermark = request
                            .fixes
                            .iter()
                            .filter_map(|f| f.fix.as_ref())
                            .map(|f| f.time_ms)
                            .max()
                            .unwrap_or(watermark);
                        let reply = RebuildReply {
                            fixes: learned,
                            ..RebuildReply::default()
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                    if request.done {
                        this.log(format!("done force={}", request.force));
                        let reply = if request.force {
                            RebuildReply {
                                replaced: true,
                                places_before: 1,
                                places_after: 2,
                                fixes: learned,
                                stays: 3,
                                ..RebuildReply::default()
                            }
                        } else {
                            RebuildReply {
                                need_after_ms: watermark,
                                fixes: learned,
                                ..RebuildReply::default()
                            }
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn observe(
            &self,
            _: Request<ObserveRequest>,
        ) -> Result<Response<ObserveResponse>, Status> {
            no()
        }
        async fn get_places(
            &self,
            _: Request<GetPlacesRequest>,
        ) -> Result<Response<GetPlacesResponse>, Status> {
            no()
        }
        async fn predict_next(
            &self,
            _: Request<PredictNextRequest>,
        ) -> Result<Response<PredictNextResponse>, Status> {
            no()
        }
        async fn get_profile(
            &self,
            _: Request<GetProfileRequest>,
        ) -> Result<Response<GetProfileResponse>, Status> {
            no()
        }
        async fn forget(
            &self,
            _: Request<ForgetRequest>,
        ) -> Result<Response<ForgetResponse>, Status> {
            no()
        }
        async fn create_geofence(
            &self,
            _: Request<TenantGeofence>,
        ) -> Result<Response<Geofence>, Status> {
            no()
        }
        async fn list_geofences(
            &self,
            _: Request<TenantGeofencesRequest>,
        ) -> Result<Response<ListTenantGeofencesResponse>, Status> {
            no()
        }
        async fn delete_geofence(
            &self,
            _: Request<DeleteTenantGeofenceRequest>,
        ) -> Result<Response<DeleteTenantGeofenceResponse>, Status> {
            no()
        }
    }

    /// The fake on a local port, behind the three downstreams.
    async fn mesh(fake: Fake) -> Arc<Downstreams> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .add_service(health)
                .add_service(StorageServer::new(fake.clone()))
                .add_service(LearningServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut config = GatewayConfig::default();
        config.resolve_interval = trackmesh_shared::config::Duration::from_millis(20);
        let targets = Target::list("TEST_ADDR", &addr).unwrap();
        let start = |name| {
            Downstream::start(name, "", targets.clone(), &CommonConfig::default(), &config).unwrap()
        };
        let downstreams = Downstreams {
            refinement: start("refinement"),
            learning: start("learning"),
            storage: start("storage"),
        };
        for downstream in [&downstreams.learning, &downstreams.storage] {
            while downstream.healthy_endpoints() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Arc::new(downstreams)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_rebuild_streams_every_chunk_then_asks_again_until_forced() {
        let fake = Fake {
            stored: 7,
            log: Arc::default(),
        };
        let mut history = History::new(mesh(fake.clone()).await, Duration::from_secs(5));
        history.need_after_wait = Duration::from_millis(1);
        history.max_stalled_rounds = 3;
        let devices = Devices::Listed(vec!["d".into()]);
        let progress: Vec<RelearnProgress> = history
            .relearn("t".into(), devices, 2)
            .map(Result::unwrap)
            .collect()
            .await;

        // History deleted first; fixes from from_ms on, chunk by chunk; then done, and after
        // each need_after the fixes after the watermark and done again; the round after
        // MAX_STALLED_ROUNDS rounds without the watermark advancing is forced.
        let log = fake.log.lock().unwrap().clone();
        let mut expected = vec![
            "delete from 2",
            "rebuild d",
            "query from 2",
            "fixes 3",
            "fixes 3",
            "done force=false",
        ];
        for _ in 0..3 {
            expected.extend(["query from 8", "done force=false"]);
        }
        expected.extend(["query from 8", "done force=true"]);
        assert_eq!(log, expected);

        // Progress per chunk, then the device's done message with learning's counts.
        let summary: Vec<(u64, bool, u32, u64)> = progress
            .iter()
            .map(|p| (p.fixes, p.done, p.devices_done, p.fixes_total))
            .collect();
        assert_eq!(
            summary,
            [(3, false, 0, 3), (6, false, 0, 6), (6, true, 1, 6)]
        );
        let done = progress.last().unwrap();
        assert_eq!(
            (
                done.places_before,
                done.places_after,
                done.stays,
                done.devices_total
            ),
            (1, 2, 3, 1)
        );
    }

    #[test]
    fn exactly_one_of_device_ids_and_all_devices() {
        let neither = Devices::new(vec![], false).unwrap_err().to_string();
        assert!(neither.starts_with("device_ids: "), "{neither}");
        let both = Devices::new(vec!["a".into()], true)
            .unwrap_err()
            .to_string();
        assert!(both.starts_with("all_devices: "), "{both}");
        assert_eq!(Devices::new(vec![], true).unwrap(), Devices::All);
    }

    #[test]
    fn listed_devices_are_checked_and_each_taken_once() {
        let bad = Devices::new(vec!["a".into(), String::new()], false)
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("device_ids[1]: "), "{bad}");
        assert_eq!(
            Devices::new(vec!["b".into(), "a".into(), "b".into()], false).unwrap(),
            Devices::Listed(vec!["b".into(), "a".into()])
        );
    }
}
