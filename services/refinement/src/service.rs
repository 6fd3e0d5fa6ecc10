//! The Refinement gRPC service: a batch read of all its devices, decisions in Rust, one
//! compare-and-set write, and a retry for the devices another replica changed meanwhile.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use trackmesh_proto::v1::{
    Fix, GetDeviceStateRequest, GetDeviceStateResponse, RefineRequest, RefineResponse, RefinedFix,
    ResetDeviceRequest, ResetDeviceResponse, Verdict, refinement_server::Refinement,
};
use trackmesh_shared::ids;

use crate::{
    error::Error,
    refine::{self, NeedHistory, Outcome, Rules},
    store::{Save, Store},
};

/// Rounds of read → decide → compare-and-set before giving up with ABORTED.
const MAX_ATTEMPTS: usize = 10;

pub struct RefinementService {
    store: Store,
    rules: Rules,
    max_batch: usize,
}

impl RefinementService {
    pub fn new(store: Store, rules: Rules, max_batch: usize) -> Self {
        Self {
            store,
            rules,
            max_batch,
        }
    }

    #[tracing::instrument(name = "refine", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    pub async fn refine(&self, tenant: &str, fixes: &[Fix]) -> Result<RefineResponse, Error> {
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
        for (index, fix) in fixes.iter().enumerate() {
            ids::check_device(&fix.device_id)
                .map_err(|rule| Error::invalid(format!("fixes[{index}].device_id"), rule))?;
        }
        metrics::histogram!("refinement_batch_size").record(fixes.len() as f64);

        let now_ms = now_ms();
        let mut results: Vec<Option<RefinedFix>> = vec![None; fixes.len()];
        let mut by_device: BTreeMap<&str, Vec<(usize, &Fix)>> = BTreeMap::new();
        for (index, fix) in fixes.iter().enumerate() {
            match refine::check_fix(fix, now_ms, &self.rules) {
                Ok(()) => by_device
                    .entry(fix.device_id.as_str())
                    .or_default()
                    .push((index, fix)),
                Err((verdict, detail)) => {
                    results[index] = Some(refine::rejected(fix, verdict, detail))
                }
            }
        }

        let mut recovered = Vec::new();
        let mut todo: Vec<&str> = by_device.keys().copied().collect();
        for _ in 0..MAX_ATTEMPTS {
            if todo.is_empty() {
                break;
            }
            let decided = self.decide(tenant, &todo, &by_device).await?;
            let saves: Vec<Save<'_>> = decided
                .iter()
                .filter(|(_, _, outcome)| outcome.changed)
                .map(|(device, version, outcome)| Save {
                    device,
                    expected: *version,
                    state: &outcome.state,
                    appended: &outcome.appended,
                })
                .collect();
            let mut applied = self.store.save(tenant, &saves).await?.into_iter();
            let mut conflicts = Vec::new();
            for (device, _, outcome) in decided {
                // Unchanged state needs no write: the decision stands as of the read.
                if outcome.changed && !applied.next().unwrap_or(false) {
                    conflicts.push(device);
                    continue;
                }
                for (index, result) in outcome.results {
                    results[index] = Some(result);
                }
                recovered.extend(outcome.recovered);
            }
            if !conflicts.is_empty() {
                metrics::counter!("refinement_cas_conflicts_total")
                    .increment(conflicts.len() as u64);
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

        let results: Vec<RefinedFix> = results.into_iter().map(Option::unwrap_or_default).collect();
        count(&results, &recovered);
        Ok(RefineResponse { results, recovered })
    }

    /// Reads the devices' state and decides their fixes, loading replay logs only if needed.
    async fn decide<'a>(
        &self,
        tenant: &str,
        devices: &[&'a str],
        by_device: &BTreeMap<&str, Vec<(usize, &Fix)>>,
    ) -> Result<Vec<(&'a str, u64, Outcome)>, Error> {
        let loaded = self.store.load(tenant, devices).await?;
        let mut decided = Vec::with_capacity(devices.len());
        let mut need_history = Vec::new();
        for (device, loaded) in devices.iter().zip(loaded) {
            match refine::refine_device(&loaded.state, None, &by_device[device], &self.rules) {
                Ok(outcome) => decided.push((*device, loaded.version, outcome)),
                Err(NeedHistory) => need_history.push((*device, loaded)),
            }
        }
        if need_history.is_empty() {
            return Ok(decided);
        }
        let ranges: Vec<(&str, i64, i64)> = need_history
            .iter()
            .map(|(device, _)| {
                let times = by_device[device].iter().map(|(_, fix)| fix.time_ms);
                let from = times.clone().min().unwrap_or(0);
                (*device, from, times.max().unwrap_or(0))
            })
            .collect();
        let logs = self.store.history(tenant, &ranges).await?;
        for ((device, loaded), log) in need_history.into_iter().zip(logs) {
            let outcome =
                refine::refine_device(&loaded.state, Some(&log), &by_device[device], &self.rules)
                    .map_err(|NeedHistory| Error::Corrupt {
                    device: device.to_owned(),
                    reason: "replay log missing after loading".into(),
                })?;
            decided.push((device, loaded.version, outcome));
        }
        Ok(decided)
    }
}

#[tonic::async_trait]
impl Refinement for RefinementService {
    async fn refine(
        &self,
        request: Request<RefineRequest>,
    ) -> Result<Response<RefineResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.refine(&request.tenant_id, &request.fixes).await?,
        ))
    }

    async fn get_device_state(
        &self,
        request: Request<GetDeviceStateRequest>,
    ) -> Result<Response<GetDeviceStateResponse>, Status> {
        let request = request.into_inner();
        ids::device_fields(&request.tenant_id, &request.device_id)?;
        let loaded = self
            .store
            .load(&request.tenant_id, &[request.device_id.as_str()])
            .await?;
        let Some(loaded) = loaded.into_iter().next() else {
            return Err(Status::internal("no state read for the device"));
        };
        Ok(Response::new(GetDeviceStateResponse {
            found: loaded.version > 0,
            last_accepted: loaded.state.last,
            accepted_count: loaded.state.accepted_count,
            pending_speed_rejections: u32::try_from(loaded.state.pending.len()).unwrap_or(u32::MAX),
            version: loaded.version,
        }))
    }

    async fn reset_device(
        &self,
        request: Request<ResetDeviceRequest>,
    ) -> Result<Response<ResetDeviceResponse>, Status> {
        let request = request.into_inner();
        ids::device_fields(&request.tenant_id, &request.device_id)?;
        let existed = self
            .store
            .reset(&request.tenant_id, &request.device_id)
            .await?;
        tracing::info!(tenant = %request.tenant_id, existed, "device state reset");
        Ok(Response::new(ResetDeviceResponse { existed }))
    }

    // PLACEHOLDER (issue 15, being built)
    async fn seed(
        &self,
        _r: Request<trackmesh_proto::v1::SeedRequest>,
    ) -> Result<Response<trackmesh_proto::v1::SeedResponse>, Status> {
        Err(Status::unimplemented("in progress"))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Verdict counters, one increment per verdict and batch rather than per fix.
fn count(results: &[RefinedFix], recovered: &[RefinedFix]) {
    let mut counts = [0u64; 10];
    let mut replays = 0u64;
    for result in results {
        if let Some(slot) = usize::try_from(result.verdict)
            .ok()
            .and_then(|v| counts.get_mut(v))
        {
            *slot += 1;
        }
        replays += u64::from(result.replay);
    }
    for (verdict, n) in counts.into_iter().enumerate() {
        if n > 0 {
            let name = i32::try_from(verdict)
                .ok()
                .and_then(|v| Verdict::try_from(v).ok())
                .map_or("UNKNOWN", |v| v.as_str_name());
            metrics::counter!("refinement_verdicts_total", "verdict" => name).increment(n);
        }
    }
    if replays > 0 {
        metrics::counter!("refinement_replays_total").increment(replays);
    }
    if !recovered.is_empty() {
        metrics::counter!("refinement_recovered_total").increment(recovered.len() as u64);
    }
}
