//! The Refinement gRPC service: a batch read of all its devices, decisions in Rust, one
//! compare-and-set write, and a retry for the devices another replica changed meanwhile.

use std::collections::BTreeMap;

use trackmesh_proto::v1::{
    GetDeviceStateRequest, GetDeviceStateResponse, RefineRequest, RefineResponse,
    ResetDeviceRequest, ResetDeviceResponse, SeedRequest, SeedResponse,
    refinement_server::Refinement,
};
use trackmesh_shared::{
    domain::{DeviceId, DeviceKey, Invalid, TenantId, now_ms},
    state::{Decided, Loaded, Save, StateError},
};

use crate::{
    error::Error,
    refine::{self, DeviceState, Fix, NeedHistory, Outcome, Record, Refined, Rules, Verdict},
    store::{self, Store},
};

/// A device's fixes that passed the checks without state: input index and fix.
type ByDevice<'a> = BTreeMap<DeviceId<'a>, Vec<(usize, &'a Fix)>>;

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
    fn check_call<'a>(&self, tenant: &'a str, fixes: usize) -> Result<TenantId<'a>, Invalid> {
        let tenant = TenantId::parse(tenant)?;
        if fixes > self.max_batch {
            return Err(Invalid::new(
                "fixes",
                format!("{fixes} fixes, more than MAX_BATCH={}", self.max_batch),
            ));
        }
        Ok(tenant)
    }

    #[tracing::instrument(name = "refine", skip_all, fields(tenant = %request.tenant_id, fixes = request.fixes.len()))]
    async fn refine(&self, request: RefineRequest) -> Result<RefineResponse, Error> {
        let tenant = self.check_call(&request.tenant_id, request.fixes.len())?;
        let fixes: Vec<Fix> = request.fixes.into_iter().map(Fix::from).collect();
        let devices = fixes
            .iter()
            .enumerate()
            .map(|(index, fix)| {
                DeviceId::parse(format_args!("fixes[{index}].device_id"), &fix.device_id)
            })
            .collect::<Result<Vec<_>, _>>()?;
        metrics::histogram!("refinement_batch_size").record(fixes.len() as f64);

        let now_ms = now_ms();
        let mut results: Vec<Option<Refined>> = vec![None; fixes.len()];
        let mut by_device = ByDevice::new();
        for (index, (fix, device)) in fixes.iter().zip(devices).enumerate() {
            match refine::check_fix(fix, now_ms, &self.rules) {
                Ok(()) => by_device.entry(device).or_default().push((index, fix)),
                Err((verdict, detail)) => {
                    results[index] = Some(refine::rejected(fix, verdict, detail))
                }
            }
        }

        let settled = self
            .store
            .update(tenant, by_device.keys().copied().collect(), |loaded| {
                self.decide(tenant, loaded, &by_device)
            })
            .await?;
        let mut recovered = Vec::new();
        for (_, outcome) in settled {
            for (index, result) in outcome.results {
                results[index] = Some(result);
            }
            recovered.extend(outcome.recovered);
        }
        // Every fix has its result by now.
        count(results.iter().flatten(), &recovered);
        Ok(RefineResponse {
            results: results
                .into_iter()
                .map(|result| result.unwrap_or_default().into())
                .collect(),
            recovered: recovered.into_iter().map(Into::into).collect(),
        })
    }

    /// Anchors each device without state on its given last stored fix, so that a late older
    /// fix is OUT_OF_ORDER again after the state was lost. Devices with state keep it: it is
    /// at least as recent as storage (refinement decides before storage writes).
    #[tracing::instrument(name = "seed", skip_all, fields(tenant = %request.tenant_id, fixes = request.fixes.len()))]
    async fn seed(&self, request: SeedRequest) -> Result<SeedResponse, Error> {
        let tenant = self.check_call(&request.tenant_id, request.fixes.len())?;
        let fixes: Vec<Refined> = request.fixes.into_iter().map(Refined::from).collect();
        // Everything is checked before anything is written: a bad request changes nothing.
        let mut first_of: BTreeMap<DeviceId<'_>, usize> = BTreeMap::new();
        let mut devices = Vec::with_capacity(fixes.len());
        for (index, seed) in fixes.iter().enumerate() {
            let field = |name: &str| format!("fixes[{index}].{name}");
            let Some(fix) = &seed.fix else {
                return Err(Invalid::new(field("fix"), "required").into());
            };
            let device =
                DeviceId::parse(format_args!("fixes[{index}].fix.device_id"), &fix.device_id)?;
            if seed.verdict() != Verdict::Accepted {
                return Err(Invalid::new(
                    field("verdict"),
                    "must be ACCEPTED, a device is anchored on an accepted fix only",
                )
                .into());
            }
            if let Err((Verdict::Invalid, detail)) = refine::check_fix(fix, i64::MAX, &self.rules) {
                let (name, rule) = detail.split_once(": ").unwrap_or(("", detail.as_str()));
                return Err(Invalid::new(field(&format!("fix.{name}")), rule).into());
            }
            if let Some(first) = first_of.insert(device, index) {
                return Err(Invalid::new(
                    field("fix.device_id"),
                    format!("at most one fix per device, fixes[{first}] has the same device"),
                )
                .into());
            }
            devices.push(device);
        }

        let loaded = self.store.load(tenant, &devices).await?;
        let states: Vec<(DeviceId<'_>, DeviceState, &Refined)> = devices
            .into_iter()
            .zip(&fixes)
            .zip(loaded)
            .filter(|(_, loaded)| loaded.version == 0)
            .map(|((device, seed), _)| {
                let state = DeviceState {
                    last: Some(seed.clone()),
                    ..DeviceState::default()
                };
                (device, state, seed)
            })
            .collect();
        let saves: Vec<Save<'_, DeviceState>> = states
            .iter()
            .map(|(device, state, seed)| Save {
                device: *device,
                // Only where there is no state: a device that got some meanwhile keeps it.
                expected: 0,
                state,
                // In the replay log too: the seeded fix re-sent later is a replay, not late.
                log: store::encode(&[Record::of(seed)]),
            })
            .collect();
        let applied = self.store.save(tenant, saves).await?;
        let seeded = applied.iter().filter(|applied| **applied).count();
        let kept = fixes.len() - seeded;
        metrics::counter!("refinement_seeded_total").increment(seeded as u64);
        tracing::info!(seeded, kept, "devices seeded");
        Ok(SeedResponse {
            seeded: u32::try_from(seeded).unwrap_or(u32::MAX),
            kept: u32::try_from(kept).unwrap_or(u32::MAX),
        })
    }

    async fn get_device_state(
        &self,
        request: GetDeviceStateRequest,
    ) -> Result<GetDeviceStateResponse, Error> {
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id)?;
        let loaded = self.store.load_one(key).await?;
        Ok(GetDeviceStateResponse {
            found: loaded.version > 0,
            last_accepted: loaded.state.last.map(Into::into),
            accepted_count: loaded.state.accepted_count,
            pending_speed_rejections: u32::try_from(loaded.state.pending.len()).unwrap_or(u32::MAX),
            version: loaded.version,
        })
    }

    async fn reset_device(
        &self,
        request: ResetDeviceRequest,
    ) -> Result<ResetDeviceResponse, Error> {
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id)?;
        let existed = self.store.delete(key).await?;
        tracing::info!(tenant = %key.tenant, existed, "device state reset");
        Ok(ResetDeviceResponse { existed })
    }

    /// Decides the devices' fixes against their state, loading replay logs only if needed.
    async fn decide<'d>(
        &self,
        tenant: TenantId<'_>,
        loaded: Vec<(DeviceId<'d>, Loaded<DeviceState>)>,
        by_device: &ByDevice<'_>,
    ) -> Result<Vec<Decided<'d, DeviceState, Outcome>>, Error> {
        let mut decided = Vec::with_capacity(loaded.len());
        let mut need_history = Vec::new();
        for (device, loaded) in loaded {
            match refine::refine_device(&loaded.state, None, &by_device[&device], &self.rules) {
                Ok(outcome) => decided.push(settle(device, loaded.version, outcome)),
                Err(NeedHistory) => need_history.push((device, loaded)),
            }
        }
        if need_history.is_empty() {
            return Ok(decided);
        }
        let ranges: Vec<(DeviceId<'_>, i64, i64)> = need_history
            .iter()
            .map(|(device, _)| {
                let times = by_device[device].iter().map(|(_, fix)| fix.time_ms);
                let from = times.clone().min().unwrap_or(0);
                (*device, from, times.max().unwrap_or(0))
            })
            .collect();
        let logs = store::history(&self.store, tenant, &ranges).await?;
        for ((device, loaded), log) in need_history.into_iter().zip(logs) {
            let outcome =
                refine::refine_device(&loaded.state, Some(&log), &by_device[&device], &self.rules)
                    .map_err(|NeedHistory| StateError::Corrupt {
                        device: device.to_string(),
                        reason: "replay log missing after loading".into(),
                    })?;
            decided.push(settle(device, loaded.version, outcome));
        }
        Ok(decided)
    }
}

/// The state to write (if it changed) and the log records to append with it.
fn settle(
    device: DeviceId<'_>,
    version: u64,
    mut outcome: Outcome,
) -> Decided<'_, DeviceState, Outcome> {
    Decided {
        device,
        version,
        // Unchanged state needs no write: the decision stands as of the read.
        state: outcome.changed.then(|| std::mem::take(&mut outcome.state)),
        log: store::encode(&outcome.appended),
        outcome,
    }
}

trackmesh_shared::unary_methods! {
    impl Refinement for RefinementService {
        refine(RefineRequest) -> RefineResponse;
        get_device_state(GetDeviceStateRequest) -> GetDeviceStateResponse;
        reset_device(ResetDeviceRequest) -> ResetDeviceResponse;
        seed(SeedRequest) -> SeedResponse;
    }
}

/// Verdict counters, one increment per verdict and batch rather than per fix.
fn count<'a>(results: impl Iterator<Item = &'a Refined>, recovered: &[Refined]) {
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
                .map_or("UNKNOWN", Verdict::name);
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
