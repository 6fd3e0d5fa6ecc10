//! The Refinement gRPC service: a batch read of all its devices, decisions in Rust, one
//! compare-and-set write, and a retry for the devices another replica changed meanwhile.

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use trackmesh_proto::v1::{
    Fix, GetDeviceStateRequest, GetDeviceStateResponse, RefineRequest, RefineResponse, RefinedFix,
    ResetDeviceRequest, ResetDeviceResponse, SeedRequest, SeedResponse, Verdict,
    refinement_server::Refinement,
};
use trackmesh_shared::ids;

use crate::{
    error::Error,
    refine::{self, DeviceState, NeedHistory, Outcome, Record, Rules},
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

    /// The tenant, and at most MAX_BATCH fixes in one call.
    fn check_call(&self, tenant: &str, fixes: usize) -> Result<(), Error> {
        ids::tenant_field(tenant)?;
        if fixes > self.max_batch {
            return Err(Error::invalid(
                "fixes",
                format!("{fixes} fixes, more than MAX_BATCH={}", self.max_batch),
            ));
        }
        Ok(())
    }

    #[tracing::instrument(name = "refine", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    pub async fn refine(&self, tenant: &str, fixes: &[Fix]) -> Result<RefineResponse, Error> {
        self.check_call(tenant, fixes.len())?;
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

    /// Anchors each device without state on its given last stored fix, so that a late older
    /// fix is OUT_OF_ORDER again after the state was lost. Devices with state keep it: it is
    /// at least as recent as storage (refinement decides before storage writes).
    #[tracing::instrument(name = "seed", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    pub async fn seed(&self, tenant: &str, fixes: &[RefinedFix]) -> Result<SeedResponse, Error> {
        self.check_call(tenant, fixes.len())?;
        // Everything is checked before anything is written: a bad request changes nothing.
        let mut first_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut devices = Vec::with_capacity(fixes.len());
        for (index, seed) in fixes.iter().enumerate() {
            let Some(fix) = &seed.fix else {
                return Err(Error::invalid(format!("fixes[{index}].fix"), "required"));
            };
            ids::check_device(&fix.device_id)
                .map_err(|rule| Error::invalid(format!("fixes[{index}].fix.device_id"), rule))?;
            if seed.verdict != Verdict::Accepted as i32 {
                return Err(Error::invalid(
                    format!("fixes[{index}].verdict"),
                    "must be ACCEPTED, a device is anchored on an accepted fix only",
                ));
            }
            if let Err((Verdict::Invalid, detail)) = refine::check_fix(fix, i64::MAX, &self.rules) {
                let (field, rule) = detail.split_once(": ").unwrap_or(("", detail.as_str()));
                return Err(Error::invalid(format!("fixes[{index}].fix.{field}"), rule));
            }
            if let Some(first) = first_of.insert(&fix.device_id, index) {
                return Err(Error::invalid(
                    format!("fixes[{index}].fix.device_id"),
                    format!("at most one fix per device, fixes[{first}] has the same device"),
                ));
            }
            devices.push(fix.device_id.as_str());
        }

        let loaded = self.store.load(tenant, &devices).await?;
        let mut targets = Vec::new();
        for ((device, seed), loaded) in devices.iter().zip(fixes).zip(loaded) {
            if loaded.version == 0 {
                let state = DeviceState {
                    last: Some(seed.clone()),
                    ..DeviceState::default()
                };
                // In the replay log too: the seeded fix re-sent later is a replay, not late.
                targets.push((*device, state, [Record::of(seed)]));
            }
        }
        let saves: Vec<Save<'_>> = targets
            .iter()
            .map(|(device, state, appended)| Save {
                device,
                // Only where there is no state: a device that got some meanwhile keeps it.
                expected: 0,
                state,
                appended,
            })
            .collect();
        let applied = self.store.save(tenant, &saves).await?;
        let seeded = applied.iter().filter(|applied| **applied).count();
        let kept = devices.len() - seeded;
        metrics::counter!("refinement_seeded_total").increment(seeded as u64);
        tracing::info!(seeded, kept, "devices seeded");
        Ok(SeedResponse {
            seeded: u32::try_from(seeded).unwrap_or(u32::MAX),
            kept: u32::try_from(kept).unwrap_or(u32::MAX),
        })
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

    async fn seed(&self, request: Request<SeedRequest>) -> Result<Response<SeedResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(
            self.seed(&request.tenant_id, &request.fixes).await?,
        ))
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
