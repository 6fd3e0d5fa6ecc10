//! What is learned per device, no I/O: online stay-point detection, places, transitions,
//! home/work labels and next-place prediction over a device's model.
//!
//! Persisted as protobuf (prost), so fields are only ever added: a model written before the
//! time-of-day bins of `Transition` decodes with them empty, and its forecast backs off to
//! the plain counts until new moves fill them (no migration step).
//!
//! Stays follow the sliding method of Li et al. (2008) as trackintel implements it, so that the
//! online result matches the offline one: a candidate starts at a fix (the anchor) and grows
//! while fixes stay closer than `STAY_RADIUS_M` to the anchor; the first fix at or beyond the
//! radius closes it, and it is a stay if that fix came `STAY_MIN_DURATION` or more after the
//! anchor. Unlike trackintel, which drops a candidate at a gap, a gap over `MAX_TIME_DIFF` (or a
//! jump faster than `MAX_SPEED_KMH`) closes it as a stay when it lasted long enough up to its
//! last fix: the device was seen there that long.
//!
//! A trip is the movement between two consecutive closed stays A and B: the fixes with
//! A.end_ms <= time <= B.start_ms. It is accumulated online in `Model::trip`, which always
//! ends at the current candidate's anchor; a candidate that closes as no stay folds its own
//! path (kept in the candidate) into it.

use trackmesh_shared::{
    domain::Fix,
    event_messages::{Event, EventType, Place, PlaceLabel, Stay, Trip},
    geo,
};

use crate::{
    calendar::{Calendar, HOURS_PER_WEEK},
    fence::{self, FenceState, Fences},
};

/// The learning rules, in the units the decisions use.
#[derive(Clone, Debug)]
pub struct Rules {
    pub stay_radius_m: f64,
    pub stay_min_duration_ms: i64,
    pub place_radius_m: f64,
    pub max_places: usize,
    pub max_speed_kmh: f64,
    pub max_time_diff_ms: i64,
    /// Visits a place needs before it can be labelled home or work.
    pub min_label_visits: u32,
    pub calendar: Calendar,
}

/// A device's model as Redis keeps it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Model {
    /// Time of the newest fix observed; fixes at or before it are ignored.
    #[prost(int64, tag = "1")]
    pub watermark_ms: i64,
    #[prost(uint64, tag = "2")]
    pub fixes_observed: u64,
    /// The stay candidate in progress (it holds the newest fix).
    #[prost(message, optional, tag = "3")]
    pub candidate: Option<Candidate>,
    /// In creation order, so ids ascend.
    #[prost(message, repeated, tag = "4")]
    pub places: Vec<PlaceState>,
    #[prost(message, repeated, tag = "5")]
    pub transitions: Vec<Transition>,
    /// Place of the last closed stay; 0: none (or evicted).
    #[prost(uint32, tag = "6")]
    pub last_place_id: u32,
    /// The last place id handed out.
    #[prost(uint32, tag = "7")]
    pub next_place_id: u32,
    #[prost(uint64, tag = "8")]
    pub stays: u64,
    #[prost(message, optional, tag = "9")]
    pub last_stay: Option<StayState>,
    /// Geofences the device is inside or entering (see `fence::evaluate`).
    #[prost(message, repeated, tag = "10")]
    pub fences: Vec<FenceState>,
    /// The trip since the last closed stay's end, up to the candidate's anchor; none before
    /// the first stay (and in models written before trips, until their next stay).
    #[prost(message, optional, tag = "11")]
    pub trip: Option<TripState>,
}

/// A trip in progress: from `start_ms` (the last stay's end) along `fixes` fixes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TripState {
    #[prost(int64, tag = "1")]
    pub start_ms: i64,
    #[prost(double, tag = "2")]
    pub distance_m: f64,
    /// The fastest hop so far.
    #[prost(double, tag = "3")]
    pub max_kmh: f64,
    #[prost(uint32, tag = "4")]
    pub fixes: u32,
}

/// Fixes since the anchor, all closer than the stay radius to it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Candidate {
    #[prost(double, tag = "1")]
    pub anchor_lat: f64,
    #[prost(double, tag = "2")]
    pub anchor_lon: f64,
    #[prost(int64, tag = "3")]
    pub start_ms: i64,
    #[prost(double, tag = "4")]
    pub last_lat: f64,
    #[prost(double, tag = "5")]
    pub last_lon: f64,
    #[prost(int64, tag = "6")]
    pub last_ms: i64,
    /// Sums of the offsets from the anchor, for the centroid (offsets, so that a stay on the
    /// antimeridian does not average 179.9 and -179.9 to 0).
    #[prost(double, tag = "7")]
    pub sum_dlat: f64,
    #[prost(double, tag = "8")]
    pub sum_dlon: f64,
    #[prost(uint32, tag = "9")]
    pub fixes: u32,
    /// The known place an ARRIVE event was sent for; 0: none yet.
    #[prost(uint32, tag = "10")]
    pub arrived_place: u32,
    /// Along the candidate's fixes from the anchor, and its fastest hop: what a trip gains
    /// when the candidate turns out to be no stay.
    #[prost(double, tag = "11")]
    pub path_m: f64,
    #[prost(double, tag = "12")]
    pub max_kmh: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PlaceState {
    #[prost(uint32, tag = "1")]
    pub id: u32,
    /// Centroid: the mean of its stays' centroids weighted by their dwell.
    #[prost(double, tag = "2")]
    pub lat: f64,
    #[prost(double, tag = "3")]
    pub lon: f64,
    #[prost(uint32, tag = "4")]
    pub visits: u32,
    #[prost(int64, tag = "5")]
    pub dwell_ms: i64,
    #[prost(int64, tag = "6")]
    pub first_ms: i64,
    #[prost(int64, tag = "7")]
    pub last_ms: i64,
    /// 168 bins, Monday 00:00 local time first.
    #[prost(uint64, repeated, tag = "8")]
    pub dwell_by_hour_ms: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Transition {
    #[prost(uint32, tag = "1")]
    pub from: u32,
    #[prost(uint32, tag = "2")]
    pub to: u32,
    #[prost(uint32, tag = "3")]
    pub count: u32,
    /// The moves by local time of day of departure, `DAY_BINS` bins of 6 hours from
    /// midnight. Empty in models written before it existed (their moves count in `count`
    /// only, so the forecast backs off to it).
    #[prost(uint32, repeated, tag = "4")]
    pub by_time_of_day: Vec<u32>,
    /// Departure time of the latest move, for ties.
    #[prost(int64, tag = "5")]
    pub last_ms: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StayState {
    /// 0: at no known place (a current stay only).
    #[prost(uint32, tag = "1")]
    pub place_id: u32,
    #[prost(double, tag = "2")]
    pub lat: f64,
    #[prost(double, tag = "3")]
    pub lon: f64,
    #[prost(int64, tag = "4")]
    pub start_ms: i64,
    #[prost(int64, tag = "5")]
    pub end_ms: i64,
    #[prost(uint32, tag = "6")]
    pub fixes: u32,
}

/// A position at a time: what learning needs of an accepted fix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub time_ms: i64,
    pub lat: f64,
    pub lon: f64,
}

/// A closed trip: from the end of stay `from` to the start of stay `to` (both settled).
#[derive(Clone, Debug, PartialEq)]
pub struct ClosedTrip {
    pub from: StayState,
    pub to: StayState,
    /// `from.end_ms` and `to.start_ms`.
    pub start_ms: i64,
    pub end_ms: i64,
    pub distance_m: f64,
    pub max_speed_kmh: f64,
    pub fixes: u32,
}

/// What one call did to one device.
#[derive(Debug, Default, PartialEq)]
pub struct Outcome {
    pub observed: u32,
    /// At or before the watermark: seen already.
    pub ignored: u32,
    /// Closed stays, in time order.
    pub stays: Vec<StayState>,
    pub places_created: u32,
    pub places_evicted: u32,
    /// Transitions, in fix-time order (only with `Events`).
    pub events: Vec<Event>,
    /// Closed trips, in time order.
    pub trips: Vec<ClosedTrip>,
}

/// What events are evaluated for a device: its geofences, and ARRIVE/DEPART of its known
/// places. `fixes[i]` is the fix of `points[i]`, which events carry.
pub struct Events<'a> {
    pub device: &'a str,
    pub fences: Option<&'a Fences>,
    pub min_dwell_ms: i64,
    pub fixes: &'a [&'a Fix],
}

impl Outcome {
    /// Whether the model must be written back.
    pub fn changed(&self) -> bool {
        self.observed > 0
    }
}

/// Observes `points` of one device (any order) into `model`.
pub fn observe(model: &mut Model, points: &[Point], rules: &Rules) -> Outcome {
    observe_with(model, points, rules, None)
}

/// `observe`, evaluating `events` at each fix too, in fix-time order.
pub fn observe_with(
    model: &mut Model,
    points: &[Point],
    rules: &Rules,
    events: Option<&Events<'_>>,
) -> Outcome {
    let mut order: Vec<usize> = (0..points.len()).collect();
    // Stable: of two fixes at the same time the first sent wins, the other is seen already.
    order.sort_by_key(|&i| points[i].time_ms);
    let mut outcome = Outcome::default();
    for i in order {
        let point = points[i];
        if model.fixes_observed > 0 && point.time_ms <= model.watermark_ms {
            outcome.ignored += 1;
            continue;
        }
        model.watermark_ms = point.time_ms;
        model.fixes_observed += 1;
        outcome.observed += 1;
        let before = model
            .candidate
            .as_ref()
            .map(|c| (c.start_ms, c.arrived_place));
        step(model, point, rules, &mut outcome);
        if let Some(events) = events
            && let Some(fix) = events.fixes.get(i)
        {
            let fix: &Fix = fix;
            places_events(model, before, rules, events.device, fix, &mut outcome);
            if let Some(fences) = events.fences {
                let entered = fence::evaluate(
                    &mut model.fences,
                    fences,
                    events.device,
                    fix,
                    events.min_dwell_ms,
                );
                outcome.events.extend(entered);
            } else {
                // The tenant's last fence is gone: so is what the device was inside.
                model.fences.clear();
            }
        }
    }
    outcome
}

/// DEPART when the stay that had arrived closed at this fix; ARRIVE once the stay in
/// progress has lasted STAY_MIN_DURATION at a known place.
fn places_events(
    model: &mut Model,
    before: Option<(i64, u32)>,
    rules: &Rules,
    device: &str,
    fix: &Fix,
    outcome: &mut Outcome,
) {
    let event = |kind: EventType, place: u32, time_ms: i64| Event {
        r#type: kind as i32,
        device_id: device.to_owned(),
        place_id: place_name(place),
        time_ms,
        lat: fix.lat,
        lon: fix.lon,
        fix: Some(fix.clone()),
        ..Event::default()
    };
    let now = model.candidate.as_ref().map(|c| c.start_ms);
    if let Some((start_ms, arrived)) = before
        && arrived != 0
        && now != Some(start_ms)
    {
        let left_ms = outcome.stays.last().map_or(fix.time_ms, |s| s.end_ms);
        outcome
            .events
            .push(event(EventType::Depart, arrived, left_ms));
    }
    let Some(stay) = current_stay(model, rules) else {
        return;
    };
    if let Some(candidate) = model.candidate.as_mut()
        && candidate.arrived_place == 0
        && stay.place_id != 0
    {
        candidate.arrived_place = stay.place_id;
        outcome
            .events
            .push(event(EventType::Arrive, stay.place_id, fix.time_ms));
    }
}

fn step(model: &mut Model, point: Point, rules: &Rules, outcome: &mut Outcome) {
    let Some(candidate) = model.candidate.as_mut() else {
        model.candidate = Some(Candidate::start(point));
        return;
    };
    let dt_ms = point.time_ms - candidate.last_ms;
    let hop_m = geo::haversine_m(candidate.last_lat, candidate.last_lon, point.lat, point.lon);
    let hop_kmh = geo::speed_kmh(hop_m, dt_ms);
    let (closed, end_ms) = if dt_ms > rules.max_time_diff_ms || hop_kmh > rules.max_speed_kmh {
        // Where the device was meanwhile is unknown: the stay ends at its last fix.
        (true, candidate.last_ms)
    } else if geo::haversine_m(
        candidate.anchor_lat,
        candidate.anchor_lon,
        point.lat,
        point.lon,
    ) >= rules.stay_radius_m
    {
        (true, point.time_ms)
    } else {
        candidate.add(point, hop_m, hop_kmh);
        (false, 0)
    };
    if !closed {
        return;
    }
    let Some(done) = model.candidate.replace(Candidate::start(point)) else {
        return;
    };
    if end_ms - done.start_ms < rules.stay_min_duration_ms {
        // No stay: the trip goes on through the candidate's fixes and the hop to `point`,
        // the new anchor.
        if let Some(trip) = model.trip.as_mut() {
            trip.distance_m += done.path_m + hop_m;
            trip.max_kmh = trip.max_kmh.max(done.max_kmh).max(hop_kmh);
            trip.fixes = trip.fixes.saturating_add(done.fixes);
        }
        return;
    }
    let from = model.last_stay.clone();
    let stay = settle(model, done.stay(end_ms), rules, outcome);
    // The trip ended at the stay's anchor, its first fix.
    if let (Some(trip), Some(from)) = (model.trip.take(), from) {
        outcome.trips.push(ClosedTrip {
            start_ms: from.end_ms,
            end_ms: stay.start_ms,
            from,
            to: stay.clone(),
            distance_m: trip.distance_m,
            max_speed_kmh: trip.max_kmh,
            fixes: trip.fixes,
        });
    }
    // The next trip starts where the stay ended: at `point` when it left the radius, at the
    // stay's last fix when a gap or jump closed it (and then takes the hop to `point`).
    model.trip = Some(if end_ms == point.time_ms {
        TripState {
            start_ms: end_ms,
            distance_m: 0.0,
            max_kmh: 0.0,
            fixes: 1,
        }
    } else {
        TripState {
            start_ms: end_ms,
            distance_m: hop_m,
            max_kmh: hop_kmh,
            fixes: 2,
        }
    });
    outcome.stays.push(stay);
}

impl Candidate {
    fn start(point: Point) -> Self {
        Self {
            anchor_lat: point.lat,
            anchor_lon: point.lon,
            start_ms: point.time_ms,
            last_lat: point.lat,
            last_lon: point.lon,
            last_ms: point.time_ms,
            sum_dlat: 0.0,
            sum_dlon: 0.0,
            fixes: 1,
            arrived_place: 0,
            path_m: 0.0,
            max_kmh: 0.0,
        }
    }

    /// `point`, `hop_m` from the last fix at `hop_kmh`.
    fn add(&mut self, point: Point, hop_m: f64, hop_kmh: f64) {
        self.path_m += hop_m;
        self.max_kmh = self.max_kmh.max(hop_kmh);
        self.sum_dlat += point.lat - self.anchor_lat;
        self.sum_dlon += wrap_lon(point.lon - self.anchor_lon);
        self.last_lat = point.lat;
        self.last_lon = point.lon;
        self.last_ms = point.time_ms;
        self.fixes = self.fixes.saturating_add(1);
    }

    fn centroid(&self) -> (f64, f64) {
        let n = f64::from(self.fixes.max(1));
        (
            self.anchor_lat + self.sum_dlat / n,
            wrap_lon(self.anchor_lon + self.sum_dlon / n),
        )
    }

    fn stay(&self, end_ms: i64) -> StayState {
        let (lat, lon) = self.centroid();
        StayState {
            place_id: 0,
            lat,
            lon,
            start_ms: self.start_ms,
            end_ms,
            fixes: self.fixes,
        }
    }
}

/// Joins `stay` to the nearest place within the place radius or founds one, evicting the
/// place with the least dwell when full, and counts the transition from the previous place.
fn settle(
    model: &mut Model,
    mut stay: StayState,
    rules: &Rules,
    outcome: &mut Outcome,
) -> StayState {
    let dwell_ms = stay.end_ms - stay.start_ms;
    let place_id = match nearest_place(&model.places, stay.lat, stay.lon, rules.place_radius_m) {
        Some(index) => {
            let place = &mut model.places[index];
            // Dwell is at least STAY_MIN_DURATION, so the weights are positive.
            let weight = dwell_ms as f64 / (place.dwell_ms + dwell_ms) as f64;
            place.lat += (stay.lat - place.lat) * weight;
            place.lon = wrap_lon(place.lon + wrap_lon(stay.lon - place.lon) * weight);
            place.visits = place.visits.saturating_add(1);
            place.dwell_ms += dwell_ms;
            place.first_ms = place.first_ms.min(stay.start_ms);
            place.last_ms = place.last_ms.max(stay.end_ms);
            rules
                .calendar
                .add_dwell(&mut place.dwell_by_hour_ms, stay.start_ms, stay.end_ms);
            place.id
        }
        None => {
            if model.places.len() >= rules.max_places {
                evict_least_dwell(model);
                outcome.places_evicted += 1;
            }
            model.next_place_id += 1;
            let mut place = PlaceState {
                id: model.next_place_id,
                lat: stay.lat,
                lon: stay.lon,
                visits: 1,
                dwell_ms,
                first_ms: stay.start_ms,
                last_ms: stay.end_ms,
                dwell_by_hour_ms: vec![0; HOURS_PER_WEEK],
            };
            rules
                .calendar
                .add_dwell(&mut place.dwell_by_hour_ms, stay.start_ms, stay.end_ms);
            model.places.push(place);
            outcome.places_created += 1;
            model.next_place_id
        }
    };
    // Two stays in a row at one place: the device has not moved on.
    let from = model.last_place_id;
    if from != 0 && from != place_id {
        // The device left the previous stay at its end.
        let left_ms = model.last_stay.as_ref().map_or(stay.start_ms, |s| s.end_ms);
        let bin = rules.calendar.hour_of_week(left_ms) % 24 / (24 / DAY_BINS);
        let index = match model
            .transitions
            .iter()
            .position(|t| t.from == from && t.to == place_id)
        {
            Some(index) => index,
            None => {
                model.transitions.push(Transition {
                    from,
                    to: place_id,
                    ..Transition::default()
                });
                model.transitions.len() - 1
            }
        };
        let transition = &mut model.transitions[index];
        transition.count = transition.count.saturating_add(1);
        transition.by_time_of_day.resize(DAY_BINS, 0);
        transition.by_time_of_day[bin] = transition.by_time_of_day[bin].saturating_add(1);
        transition.last_ms = transition.last_ms.max(left_ms);
    }
    model.last_place_id = place_id;
    model.stays += 1;
    stay.place_id = place_id;
    model.last_stay = Some(stay.clone());
    stay
}

fn nearest_place(places: &[PlaceState], lat: f64, lon: f64, radius_m: f64) -> Option<usize> {
    places
        .iter()
        .enumerate()
        .map(|(index, place)| (index, geo::haversine_m(place.lat, place.lon, lat, lon)))
        .filter(|(_, distance)| *distance <= radius_m)
        // Places are in id order, so the first of equally near ones is the oldest.
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index)
}

fn evict_least_dwell(model: &mut Model) {
    let Some(index) = model
        .places
        .iter()
        .enumerate()
        .min_by_key(|(_, p)| (p.dwell_ms, p.last_ms, p.id))
        .map(|(index, _)| index)
    else {
        return;
    };
    let gone = model.places.remove(index).id;
    model.transitions.retain(|t| t.from != gone && t.to != gone);
    if model.last_place_id == gone {
        model.last_place_id = 0;
    }
}

fn wrap_lon(lon: f64) -> f64 {
    if (-180.0..=180.0).contains(&lon) {
        lon
    } else {
        (lon + 180.0).rem_euclid(360.0) - 180.0
    }
}

// ---- reading the model

/// The labelled places: home has the most night dwell, work the most work-hour dwell on work
/// days among the others; each needs `min_label_visits` visits and some dwell in those hours.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub home: Option<u32>,
    pub work: Option<u32>,
}

impl Labels {
    pub fn of(&self, place_id: u32) -> PlaceLabel {
        if self.home == Some(place_id) {
            PlaceLabel::Home
        } else if self.work == Some(place_id) {
            PlaceLabel::Work
        } else {
            PlaceLabel::Unspecified
        }
    }
}

pub fn labels(model: &Model, rules: &Rules) -> Labels {
    let calendar = &rules.calendar;
    let best = |score: &dyn Fn(&PlaceState) -> u64, except: Option<u32>| {
        model
            .places
            .iter()
            .filter(|p| p.visits >= rules.min_label_visits && Some(p.id) != except)
            .map(|p| (score(p), p))
            .filter(|(score, _)| *score > 0)
            // Most dwell in those hours, then most dwell, then the oldest place.
            .max_by_key(|(score, p)| (*score, p.dwell_ms, std::cmp::Reverse(p.id)))
            .map(|(_, p)| p.id)
    };
    let home = best(&|p| calendar.night_dwell(&p.dwell_by_hour_ms), None);
    let work = best(&|p| calendar.work_dwell(&p.dwell_by_hour_ms), home);
    Labels { home, work }
}

/// The stay in progress once it has lasted the minimum duration, at the known place it is
/// at, if any.
pub fn current_stay(model: &Model, rules: &Rules) -> Option<StayState> {
    let candidate = model.candidate.as_ref()?;
    if candidate.last_ms - candidate.start_ms < rules.stay_min_duration_ms {
        return None;
    }
    let mut stay = candidate.stay(candidate.last_ms);
    stay.place_id = nearest_place(&model.places, stay.lat, stay.lon, rules.place_radius_m)
        .map_or(0, |index| model.places[index].id);
    Some(stay)
}

/// Next places from the current or last place (see `predict`).
#[derive(Debug, Default, PartialEq)]
pub struct Forecast {
    pub from: Option<u32>,
    /// Place id and probability, most likely first.
    pub next: Vec<(u32, f64)>,
}

/// Bins of the local time of day that transitions are counted in (6 hours each).
pub const DAY_BINS: usize = 4;
/// Pseudo-counts with which each level of the forecast leans on the level below it: the
/// moves from here at this time of day on all moves from here, those on the places' visits.
const TIME_OF_DAY_PRIOR: f64 = 1.0;
const VISITS_PRIOR: f64 = 1.0;
/// Weight of a place that lies behind a device already on its way (more than 90° off its
/// heading from the place it left).
const BEHIND: f64 = 0.25;
/// The visits of a place count `1 / (1 + d / NEAR_M)` at distance `d` from `from`: of two
/// equally visited places the nearer one is the likelier next (a gravity model).
const NEAR_M: f64 = 1_000.0;

/// The next place, as probabilities over the known places other than the one the device is
/// at or last left (`from`): a hierarchy of counts, each smoothed towards the level below
/// (Dirichlet prior with `*_PRIOR` pseudo-counts), so that sparse evidence backs off:
/// 1. moves from `from` whose departure fell in the current 6-hour bin of the day,
/// 2. all moves from `from`,
/// 3. visits of each place, the nearer to `from` the more (what a device with no way out of
///    `from` yet does next).
///
/// When the device is on its way (no stay in progress, farther than `STAY_RADIUS_M` from
/// `from`), places more than 90° off its heading weigh `BEHIND` as much. Ties go to the
/// latest move, then the most recently visited place, then the oldest. The known places
/// share `1 - novelty`, novelty being the device's rate of founding a place per stay
/// (Laplace-smoothed): the chance that the next place is one it has never been to.
pub fn predict(model: &Model, rules: &Rules, k: usize) -> Forecast {
    let stay = current_stay(model, rules);
    let from = match &stay {
        Some(stay) => stay.place_id,
        None => model.last_place_id,
    };
    let from = (from != 0).then_some(from);
    let candidates: Vec<&PlaceState> = model.places.iter().filter(|p| Some(p.id) != from).collect();
    let origin = from.and_then(|id| place_by_id(model, id));
    let pull = |place: &PlaceState| {
        let near = origin.map_or(1.0, |o| {
            1.0 / (1.0 + geo::haversine_m(o.lat, o.lon, place.lat, place.lon) / NEAR_M)
        });
        f64::from(place.visits) * near
    };
    let visits: f64 = candidates.iter().map(|p| pull(p)).sum();
    if candidates.is_empty() || visits <= 0.0 {
        return Forecast {
            from,
            next: Vec::new(),
        };
    }
    let bin = rules.calendar.hour_of_week(model.watermark_ms) % 24 / (24 / DAY_BINS);
    let moves: Vec<&Transition> = model
        .transitions
        .iter()
        .filter(|t| Some(t.from) == from)
        .collect();
    let all: f64 = moves.iter().map(|t| f64::from(t.count)).sum();
    let in_bin = |t: &Transition| f64::from(t.by_time_of_day.get(bin).copied().unwrap_or(0));
    let all_in_bin: f64 = moves.iter().map(|t| in_bin(t)).sum();
    let heading = stay
        .is_none()
        .then(|| heading(model, rules, from))
        .flatten();
    let mut next: Vec<(u32, f64, i64, i64)> = candidates
        .iter()
        .map(|place| {
            let moved = moves.iter().find(|t| t.to == place.id);
            let prior = pull(place) / visits;
            let plain = (moved.map_or(0.0, |t| f64::from(t.count)) + VISITS_PRIOR * prior)
                / (all + VISITS_PRIOR);
            let mut p = (moved.map_or(0.0, |t| in_bin(t)) + TIME_OF_DAY_PRIOR * plain)
                / (all_in_bin + TIME_OF_DAY_PRIOR);
            if let Some((origin, bearing)) = heading
                && is_behind(origin, bearing, place)
            {
                p *= BEHIND;
            }
            (
                place.id,
                p,
                moved.map_or(i64::MIN, |t| t.last_ms),
                place.last_ms,
            )
        })
        .collect();
    // Some of the mass goes to a place not known yet, at the device's own rate of founding
    // places: what keeps the probabilities calibrated where devices roam.
    let known = 1.0 - novelty(model);
    let total: f64 = next.iter().map(|n| n.1).sum();
    next.sort_by(|a, b| {
        b.1.total_cmp(&a.1)
            .then(b.2.cmp(&a.2))
            .then(b.3.cmp(&a.3))
            .then(a.0.cmp(&b.0))
    });
    Forecast {
        from,
        next: next
            .into_iter()
            .take(k)
            .map(|(id, p, _, _)| (id, p / total * known))
            .collect(),
    }
}

/// The chance that the next place is one the device has never been to: its rate of founding
/// a place per stay, Laplace-smoothed. Every place was founded by a stay, so it is below 1.
pub fn novelty(model: &Model) -> f64 {
    ((f64::from(model.next_place_id) + 1.0) / (model.stays as f64 + 2.0)).clamp(0.0, 1.0)
}

/// Where a device on its way started from and its bearing since (radians), once it is
/// farther than the stay radius from the place it left.
fn heading(model: &Model, rules: &Rules, from: Option<u32>) -> Option<((f64, f64), f64)> {
    let origin = place_by_id(model, from?)?;
    let now = model.candidate.as_ref()?;
    if geo::haversine_m(origin.lat, origin.lon, now.last_lat, now.last_lon) < rules.stay_radius_m {
        return None;
    }
    Some((
        (origin.lat, origin.lon),
        bearing(origin.lat, origin.lon, now.last_lat, now.last_lon),
    ))
}

fn is_behind(origin: (f64, f64), heading: f64, place: &PlaceState) -> bool {
    let to = bearing(origin.0, origin.1, place.lat, place.lon);
    (to - heading).cos() < 0.0
}

/// Initial great-circle bearing from one point to another, radians.
fn bearing(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dl = wrap_lon(lon2 - lon1).to_radians();
    let y = dl.sin() * p2.cos();
    let x = p1.cos() * p2.sin() - p1.sin() * p2.cos() * dl.cos();
    y.atan2(x)
}

pub fn place_by_id(model: &Model, id: u32) -> Option<&PlaceState> {
    model.places.iter().find(|p| p.id == id)
}

pub fn place_name(id: u32) -> String {
    format!("p{id}")
}

impl PlaceState {
    pub fn to_place(&self, label: PlaceLabel) -> Place {
        Place {
            place_id: place_name(self.id),
            lat: self.lat,
            lon: self.lon,
            visits: self.visits,
            total_dwell_ms: self.dwell_ms,
            first_visit_ms: self.first_ms,
            last_visit_ms: self.last_ms,
            label: label as i32,
            dwell_by_hour_ms: self
                .dwell_by_hour_ms
                .iter()
                .map(|ms| i64::try_from(*ms).unwrap_or(i64::MAX))
                .collect(),
        }
    }
}

impl ClosedTrip {
    pub fn to_trip(&self, device: &str) -> Trip {
        let place = |stay: &StayState| Place {
            place_id: place_name(stay.place_id),
            lat: stay.lat,
            lon: stay.lon,
            ..Place::default()
        };
        let duration_ms = self.end_ms - self.start_ms;
        Trip {
            from_place: Some(place(&self.from)),
            to_place: Some(place(&self.to)),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            distance_m: self.distance_m,
            max_speed_kmh: self.max_speed_kmh,
            // A trip of one fix (left a stay straight into the next) has no speed.
            mean_speed_kmh: if duration_ms > 0 {
                geo::speed_kmh(self.distance_m, duration_ms)
            } else {
                0.0
            },
            fixes: self.fixes,
            device_id: device.to_owned(),
        }
    }
}

impl StayState {
    pub fn to_stay(&self, device: &str) -> Stay {
        Stay {
            place_id: if self.place_id == 0 {
                String::new()
            } else {
                place_name(self.place_id)
            },
            lat: self.lat,
            lon: self.lon,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            fixes: self.fixes,
            device_id: device.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests;
