//! The verdict chain: pure decisions on one device's fixes given its state, no I/O.

pub use trackmesh_shared::domain::{Fix, Refined, Verdict};
use trackmesh_shared::geo;

/// The cleaning rules, in the units the decisions use.
#[derive(Clone, Debug)]
pub struct Rules {
    pub max_speed_kmh: f64,
    pub max_time_diff_ms: i64,
    pub max_future_skew_ms: i64,
    pub max_accuracy_m: Option<f64>,
    pub min_distance_m: Option<f64>,
    /// 0: never re-anchor.
    pub reanchor_after: usize,
}

/// What Redis keeps per device between calls, in the domain's own encoding.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceState {
    /// The last accepted fix with its annotations.
    #[prost(message, optional, tag = "1")]
    pub last: Option<Refined>,
    #[prost(uint64, tag = "2")]
    pub accepted_count: u64,
    /// Consecutive, mutually consistent SPEED rejections since the last accepted fix.
    #[prost(message, repeated, tag = "3")]
    pub pending: Vec<Fix>,
    /// The latest re-anchor run as accepted, the fix that completed it last: a retry of that
    /// fix answers the others as recovered again, or they would never reach storage.
    #[prost(message, repeated, tag = "4")]
    pub reanchor_run: Vec<Refined>,
}

/// Verdicts 1–4, which need no device state. `Err` holds the verdict and why.
pub fn check_fix(fix: &Fix, now_ms: i64, rules: &Rules) -> Result<(), (Verdict, String)> {
    let invalid = |why: String| Err((Verdict::Invalid, why));
    if fix.time_ms <= 0 {
        return invalid("time_ms: required, Unix epoch milliseconds".into());
    }
    if let Err((field, rule)) = geo::check_coordinates(fix.lat, fix.lon) {
        return invalid(format!("{field}: {rule}"));
    }
    for (field, value) in [
        ("accuracy_m", fix.accuracy_m),
        ("speed_mps", fix.speed_mps),
        ("heading_deg", fix.heading_deg),
        ("altitude_m", fix.altitude_m),
    ] {
        if value.is_some_and(|v| !v.is_finite()) {
            return invalid(format!("{field}: not a finite number"));
        }
    }
    if fix.accuracy_m.is_some_and(|a| a < 0.0) {
        return invalid("accuracy_m: negative".into());
    }
    if fix.lat == 0.0 && fix.lon == 0.0 {
        return Err((Verdict::NullIsland, "exactly 0,0".into()));
    }
    if fix.time_ms > now_ms.saturating_add(rules.max_future_skew_ms) {
        return Err((
            Verdict::Future,
            format!("{} ms ahead of the server clock", fix.time_ms - now_ms),
        ));
    }
    if let (Some(max), Some(accuracy)) = (rules.max_accuracy_m, fix.accuracy_m)
        && f64::from(accuracy) > max
    {
        return Err((
            Verdict::Inaccurate,
            format!("accuracy {accuracy} m is worse than {max} m"),
        ));
    }
    Ok(())
}

pub fn rejected(fix: &Fix, verdict: Verdict, detail: String) -> Refined {
    Refined {
        fix: Some(fix.clone()),
        verdict: verdict as i32,
        detail,
        ..Refined::default()
    }
}

/// An accepted fix as remembered for replays: fixed-size so the Redis log trims cleanly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Record {
    pub time_ms: i64,
    pub lat: f64,
    pub lon: f64,
    pub segment: u32,
    pub dt_ms: i64,
    pub distance_m: f64,
    pub reanchored: bool,
}

impl Record {
    pub const SIZE: usize = 45;

    pub fn of(accepted: &Refined) -> Self {
        let fix = accepted
            .fix
            .as_ref()
            .map_or((0, 0.0, 0.0), |f| (f.time_ms, f.lat, f.lon));
        Self {
            time_ms: fix.0,
            lat: fix.1,
            lon: fix.2,
            segment: accepted.segment,
            dt_ms: accepted.dt_ms,
            distance_m: accepted.distance_m,
            reanchored: accepted.reanchored,
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        out.extend_from_slice(&self.lat.to_le_bytes());
        out.extend_from_slice(&self.lon.to_le_bytes());
        out.extend_from_slice(&self.segment.to_le_bytes());
        out.extend_from_slice(&self.dt_ms.to_le_bytes());
        out.extend_from_slice(&self.distance_m.to_le_bytes());
        out.push(u8::from(self.reanchored));
    }

    /// Decodes a log of records; a torn tail (never written by us) is ignored.
    pub fn decode_all(bytes: &[u8]) -> Vec<Self> {
        bytes
            .chunks_exact(Self::SIZE)
            .map(|r| {
                let i64_at =
                    |at: usize| i64::from_le_bytes(r[at..at + 8].try_into().unwrap_or_default());
                let f64_at =
                    |at: usize| f64::from_le_bytes(r[at..at + 8].try_into().unwrap_or_default());
                Self {
                    time_ms: i64_at(0),
                    lat: f64_at(8),
                    lon: f64_at(16),
                    segment: u32::from_le_bytes(r[24..28].try_into().unwrap_or_default()),
                    dt_ms: i64_at(28),
                    distance_m: f64_at(36),
                    reanchored: r[44] != 0,
                }
            })
            .collect()
    }

    fn same_fix(&self, fix: &Fix) -> bool {
        self.time_ms == fix.time_ms && same_position(self.lat, self.lon, fix)
    }

    fn replay(&self, fix: &Fix) -> Refined {
        Refined {
            fix: Some(fix.clone()),
            verdict: Verdict::Accepted as i32,
            replay: true,
            segment: self.segment,
            distance_m: self.distance_m,
            dt_ms: self.dt_ms,
            speed_kmh: geo::speed_kmh(self.distance_m, self.dt_ms),
            detail: String::new(),
            reanchored: self.reanchored,
        }
    }
}

fn same_position(lat: f64, lon: f64, fix: &Fix) -> bool {
    lat.to_bits() == fix.lat.to_bits() && lon.to_bits() == fix.lon.to_bits()
}

/// The replay history is needed to decide and was not loaded: load it and decide again.
#[derive(Debug, PartialEq, Eq)]
pub struct NeedHistory;

/// The decisions for one device's fixes in one call.
#[derive(Debug)]
pub struct Outcome {
    /// Input index and result, per fix.
    pub results: Vec<(usize, Refined)>,
    /// Earlier SPEED rejections accepted by a re-anchor.
    pub recovered: Vec<Refined>,
    pub state: DeviceState,
    /// Records to append to the device's replay log.
    pub appended: Vec<Record>,
    /// Whether the state must be written back.
    pub changed: bool,
}

/// Decides `fixes` (already past [`check_fix`], any order) of one device against its state.
/// `history` is the replay log, `None` if not loaded yet.
pub fn refine_device(
    state: &DeviceState,
    history: Option<&[Record]>,
    fixes: &[(usize, &Fix)],
    rules: &Rules,
) -> Result<Outcome, NeedHistory> {
    let mut order: Vec<&(usize, &Fix)> = fixes.iter().collect();
    // Time order; the caller's order breaks ties, so identical input decides identically.
    order.sort_by_key(|(index, fix)| (fix.time_ms, *index));
    let mut device = Device {
        rules,
        history,
        outcome: Outcome {
            results: Vec::with_capacity(fixes.len()),
            recovered: Vec::new(),
            state: state.clone(),
            appended: Vec::new(),
            changed: false,
        },
    };
    for (index, fix) in &order {
        let result = device.step(fix)?;
        device.outcome.results.push((*index, result));
    }
    // A re-sent run member in this very call is answered in `results` already.
    device.outcome.recovered.retain(|recovered| {
        let time = recovered.fix.as_ref().map_or(0, |f| f.time_ms);
        !recovered.replay
            || order
                .binary_search_by_key(&time, |(_, fix)| fix.time_ms)
                .is_err()
    });
    Ok(device.outcome)
}

struct Device<'a> {
    rules: &'a Rules,
    history: Option<&'a [Record]>,
    outcome: Outcome,
}

impl Device<'_> {
    fn step(&mut self, fix: &Fix) -> Result<Refined, NeedHistory> {
        let Some(last) = self.outcome.state.last.clone() else {
            return Ok(self.accept(fix, 1, 0.0, 0, false));
        };
        let last_fix = last.fix.clone().unwrap_or_default();
        if fix.time_ms <= last_fix.time_ms {
            if let Some(replay) = self.find_accepted(fix, &last)? {
                self.recover_again(fix);
                return Ok(replay);
            }
            return Ok(if fix.time_ms == last_fix.time_ms {
                rejected(
                    fix,
                    Verdict::Duplicate,
                    "same time as the last accepted fix, other position".into(),
                )
            } else {
                rejected(
                    fix,
                    Verdict::OutOfOrder,
                    format!(
                        "earlier than the last accepted fix at {} ms",
                        last_fix.time_ms
                    ),
                )
            });
        }
        let dt_ms = fix.time_ms - last_fix.time_ms;
        let distance_m = distance(&last_fix, fix);
        if dt_ms > self.rules.max_time_diff_ms {
            return Ok(self.accept(fix, last.segment + 1, distance_m, dt_ms, false));
        }
        let speed = geo::speed_kmh(distance_m, dt_ms);
        if speed > self.rules.max_speed_kmh {
            return Ok(self.speed_outlier(fix, &last, distance_m, dt_ms, speed));
        }
        if let Some(min) = self.rules.min_distance_m
            && distance_m < min
        {
            return Ok(rejected(
                fix,
                Verdict::Stationary,
                format!("{distance_m:.1} m from the last accepted fix, closer than {min} m"),
            ));
        }
        Ok(self.accept(fix, last.segment, distance_m, dt_ms, false))
    }

    /// An earlier accepted fix identical to `fix`, answered again as a replay.
    fn find_accepted(&self, fix: &Fix, last: &Refined) -> Result<Option<Refined>, NeedHistory> {
        let last_fix = last.fix.as_ref();
        if last_fix.is_some_and(|l| l.time_ms == fix.time_ms && same_position(l.lat, l.lon, fix)) {
            let mut replay = last.clone();
            replay.fix = Some(fix.clone());
            replay.replay = true;
            return Ok(Some(replay));
        }
        // Records appended by this call are newer than anything in the loaded log.
        if let Some(record) = find(&self.outcome.appended, fix) {
            return Ok(Some(record.replay(fix)));
        }
        let history = self.history.ok_or(NeedHistory)?;
        Ok(find(history, fix).map(|record| record.replay(fix)))
    }

    /// `fix` is re-sent: if it completed the latest re-anchor, the rest of its run goes to
    /// storage again too (the first answer may have been lost with them).
    fn recover_again(&mut self, fix: &Fix) {
        let run = &self.outcome.state.reanchor_run;
        let Some((completing, earlier)) = run.split_last() else {
            return;
        };
        if completing
            .fix
            .as_ref()
            .is_some_and(|c| c.time_ms == fix.time_ms && same_position(c.lat, c.lon, fix))
        {
            let again = earlier.iter().map(|accepted| Refined {
                replay: true,
                ..accepted.clone()
            });
            self.outcome.recovered.extend(again);
        }
    }

    fn speed_outlier(
        &mut self,
        fix: &Fix,
        last: &Refined,
        distance_m: f64,
        dt_ms: i64,
        speed: f64,
    ) -> Refined {
        let mut outlier = rejected(
            fix,
            Verdict::Speed,
            format!(
                "{speed:.0} km/h from the last accepted fix, above {} km/h",
                self.rules.max_speed_kmh
            ),
        );
        outlier.distance_m = distance_m;
        outlier.dt_ms = dt_ms;
        outlier.speed_kmh = speed;
        if self.rules.reanchor_after == 0 {
            return outlier;
        }
        let pending = &mut self.outcome.state.pending;
        match pending.last() {
            // A re-sent or older outlier: the run stays as it is, so replays change nothing.
            Some(previous) if fix.time_ms <= previous.time_ms => return outlier,
            Some(previous) if self.rules.consistent(previous, fix) => pending.push(fix.clone()),
            _ => *pending = vec![fix.clone()],
        }
        self.outcome.changed = true;
        if pending.len() < self.rules.reanchor_after {
            return outlier;
        }
        // Re-anchor: the whole run is accepted, its first fix starting a new segment.
        let run = std::mem::take(pending);
        let segment = last.segment + 1;
        let mut previous = last.fix.clone().unwrap_or_default();
        let mut accepted_run = Vec::with_capacity(run.len());
        for run_fix in &run {
            let distance_m = distance(&previous, run_fix);
            let dt_ms = run_fix.time_ms - previous.time_ms;
            accepted_run.push(self.accept(run_fix, segment, distance_m, dt_ms, true));
            previous = run_fix.clone();
        }
        // The run ends with `fix` (it is the latest in time), which is answered directly.
        let current = accepted_run.last().cloned().unwrap_or(outlier);
        self.outcome.recovered.extend(
            accepted_run[..accepted_run.len().saturating_sub(1)]
                .iter()
                .cloned(),
        );
        self.outcome.state.reanchor_run = accepted_run;
        current
    }

    fn accept(
        &mut self,
        fix: &Fix,
        segment: u32,
        distance_m: f64,
        dt_ms: i64,
        reanchored: bool,
    ) -> Refined {
        let accepted = Refined {
            fix: Some(fix.clone()),
            verdict: Verdict::Accepted as i32,
            replay: false,
            segment,
            distance_m,
            dt_ms,
            speed_kmh: geo::speed_kmh(distance_m, dt_ms),
            detail: String::new(),
            reanchored,
        };
        let state = &mut self.outcome.state;
        state.last = Some(accepted.clone());
        state.accepted_count += 1;
        state.pending.clear();
        self.outcome.appended.push(Record::of(&accepted));
        self.outcome.changed = true;
        accepted
    }
}

impl Rules {
    /// Two outliers agree with each other: plausible as consecutive fixes of one track.
    fn consistent(&self, earlier: &Fix, later: &Fix) -> bool {
        let dt_ms = later.time_ms - earlier.time_ms;
        dt_ms > 0
            && dt_ms <= self.max_time_diff_ms
            && geo::speed_kmh(distance(earlier, later), dt_ms) <= self.max_speed_kmh
    }
}

/// The record of `fix` in a log; accepted fixes strictly increase in time, so logs are sorted.
fn find<'a>(records: &'a [Record], fix: &Fix) -> Option<&'a Record> {
    let at = records
        .binary_search_by_key(&fix.time_ms, |r| r.time_ms)
        .ok()?;
    Some(&records[at]).filter(|record| record.same_fix(fix))
}

fn distance(a: &Fix, b: &Fix) -> f64 {
    geo::haversine_m(a.lat, a.lon, b.lat, b.lon)
}

#[cfg(test)]
mod tests;
