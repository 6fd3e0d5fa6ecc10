//! Rebuild: one device's model learned again from its stored fixes, streamed in by the
//! gateway's relearn, into a fresh model held in memory, which then replaces the stored one by
//! compare-and-set unless that has seen a fix the rebuild has not (see `RebuildRequest`).

use futures::Stream;
use tonic::{Status, Streaming};
use trackmesh_proto::v1::{RebuildReply, RebuildRequest};
use trackmesh_shared::{
    domain::{DeviceKey, Invalid, Refined},
    state::Decided,
};

use crate::{
    error::Error,
    kafka::Kafka,
    model::{self, Model, Rules},
    service::group,
    store::Store,
};

/// What a rebuild needs of the service.
pub struct Rebuilder {
    pub store: Store,
    pub rules: Rules,
    /// Where closed stays and trips go; `None` without KAFKA_BROKERS.
    pub kafka: Option<Kafka>,
}

struct Rebuild {
    with: Rebuilder,
    inbound: Streaming<RebuildRequest>,
    /// Tenant and device, from the first message.
    device: Option<(String, String)>,
    model: Model,
    /// Replaced or failed: the reply stream ends.
    finished: bool,
}

impl Rebuilder {
    /// The replies to `inbound`: progress after each chunk of fixes, and after `done` either
    /// `need_after_ms` or `replaced` (which ends the stream). A client that closes its side
    /// before a `replaced` leaves the stored model as it was.
    pub fn run(
        self,
        inbound: Streaming<RebuildRequest>,
    ) -> impl Stream<Item = Result<RebuildReply, Status>> + Send + 'static {
        let state = Rebuild {
            with: self,
            inbound,
            device: None,
            model: Model::default(),
            finished: false,
        };
        futures::stream::unfold(state, |mut state| async move {
            if state.finished {
                return None;
            }
            match state.next().await {
                Ok(Some(reply)) => Some((Ok(reply), state)),
                Ok(None) => None,
                Err(status) => {
                    state.finished = true;
                    Some((Err(status), state))
                }
            }
        })
    }
}

impl Rebuild {
    /// Reads messages until one calls for a reply; `None` when the client closed its side.
    async fn next(&mut self) -> Result<Option<RebuildReply>, Status> {
        while let Some(request) = self.inbound.message().await? {
            let (tenant, device) = match &self.device {
                Some(ids) => ids.clone(),
                None => {
                    DeviceKey::parse(&request.tenant_id, &request.device_id)
                        .map_err(Error::from)?;
                    let ids = (request.tenant_id.clone(), request.device_id.clone());
                    self.device = Some(ids.clone());
                    ids
                }
            };
            // Later messages may repeat the ids but not name another device.
            for (field, sent, first) in [
                ("tenant_id", &request.tenant_id, &tenant),
                ("device_id", &request.device_id, &device),
            ] {
                if !sent.is_empty() && sent != first {
                    let rule = format!("{sent:?} differs from the first message's {first:?}");
                    return Err(Error::from(Invalid::new(field, rule)).into());
                }
            }
            let key = DeviceKey::parse(&tenant, &device).map_err(Error::from)?;
            let learned = !request.fixes.is_empty();
            if learned {
                let fixes: Vec<Refined> = request.fixes.into_iter().map(Into::into).collect();
                self.learn(key, &fixes).await?;
            }
            if request.done {
                let reply = self.finish(key, request.force).await?;
                self.finished = reply.replaced;
                return Ok(Some(reply));
            }
            if learned {
                return Ok(Some(self.progress()));
            }
        }
        Ok(None)
    }

    /// Learns one chunk (no events) and sends the stays and trips it closed to the events
    /// topic before answering, so that a rebuild that replaced the model has sent them all.
    async fn learn(&mut self, key: DeviceKey<'_>, fixes: &[Refined]) -> Result<(), Error> {
        let (mut by_device, _) = group(fixes)?;
        if let Some(other) = by_device.keys().find(|d| **d != key.device) {
            let rule = format!(
                "a fix of device {other:?} in the rebuild of {:?}",
                key.device
            );
            return Err(Invalid::new("fixes", rule).into());
        }
        let Some((points, _)) = by_device.remove(&key.device) else {
            return Ok(());
        };
        let outcome = model::observe(&mut self.model, &points, &self.with.rules);
        if let Some(kafka) = &self.with.kafka {
            kafka.produce_outcome(key, &outcome).await?;
        }
        Ok(())
    }

    fn progress(&self) -> RebuildReply {
        RebuildReply {
            fixes: self.model.fixes_observed,
            stays: self.model.stays,
            ..RebuildReply::default()
        }
    }

    /// Replaces the stored model unless it has seen a newer fix (and not `force`d). What only
    /// live fixes with events set carries over: the fences the device is inside, and the
    /// ARRIVE sent for the stay in progress.
    async fn finish(&self, key: DeviceKey<'_>, force: bool) -> Result<RebuildReply, Error> {
        let settled = self
            .with
            .store
            .update(key.tenant, vec![key.device], |loaded| {
                let decided: Vec<_> = loaded
                    .into_iter()
                    .map(|(device, loaded)| {
                        let (state, reply) = self.replace(loaded.state, force);
                        Decided {
                            device,
                            version: loaded.version,
                            state,
                            log: Vec::new(),
                            outcome: reply,
                        }
                    })
                    .collect();
                std::future::ready(Ok::<_, Error>(decided))
            })
            .await?;
        let reply = settled.into_iter().map(|(_, reply)| reply).next();
        let reply = reply.unwrap_or_else(|| self.progress());
        if reply.replaced {
            tracing::info!(
                tenant = %key.tenant,
                fixes = reply.fixes,
                stays = reply.stays,
                places_before = reply.places_before,
                places_after = reply.places_after,
                forced = force,
                "model rebuilt"
            );
            metrics::counter!("learning_rebuilds_total").increment(1);
        }
        Ok(reply)
    }

    /// The model to write instead of `current` (none if that has seen a newer fix, unless
    /// `force`d), and the reply. What only live fixes with events set carries over: the fences
    /// the device is inside, and the ARRIVE sent for the stay in progress.
    fn replace(&self, current: Model, force: bool) -> (Option<Model>, RebuildReply) {
        if !force && current.fixes_observed > 0 && current.watermark_ms > self.model.watermark_ms {
            tracing::debug!(
                rebuilt_ms = self.model.watermark_ms,
                current_ms = current.watermark_ms,
                "rebuild behind the current model"
            );
            // 0 would mean "nothing needed": a rebuild that has learned nothing asks for
            // everything after 1 ms (the client starts at its own from_ms anyway).
            let reply = RebuildReply {
                need_after_ms: self.model.watermark_ms.max(1),
                ..self.progress()
            };
            return (None, reply);
        }
        let mut model = self.model.clone();
        model.fences = current.fences;
        // The stay in progress is the one the live model announced (ARRIVE) already: not
        // announced again, and its DEPART still follows.
        if let (Some(rebuilt), Some(live)) = (model.candidate.as_mut(), &current.candidate)
            && rebuilt.start_ms == live.start_ms
        {
            rebuilt.arrived_place = live.arrived_place;
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let reply = RebuildReply {
            replaced: true,
            places_before: count(current.places.len()),
            places_after: count(model.places.len()),
            ..self.progress()
        };
        (Some(model), reply)
    }
}
