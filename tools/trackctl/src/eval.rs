//! `trackctl eval FILE`: how good is `PredictNext`, measured on held-out real days.
//!
//! Protocol (issue 17). The fixes of FILE are split in time: training fixes before `--cut`,
//! test fixes from `--cut` to `--until`. Offline, on the file itself:
//! - **stays**, per device, by the sliding method of Li et al. (2008) that trackintel's
//!   `generate_staypoints` and learning-api implement: a candidate starts at a fix (the
//!   anchor) and grows while fixes stay closer than `--stay-radius` (200 m) to the anchor; the
//!   first fix at or beyond it closes the candidate, which is a stay if that fix came
//!   `--stay-min` (20 min) or more after the anchor; a gap over `--max-gap` (12 h) closes it
//!   at its last fix. That closing fix is the moment the device *leaves* the stay. A
//!   candidate still open at `--until` that lasted long enough is a stay too (the end of a
//!   transition, never its start).
//! - **places**: the stays of a device in time order, each joining the nearest place whose
//!   centroid is within `--place-radius` (200 m) or founding one; the centroid is the
//!   dwell-weighted mean of its stays (learning-api's rule). Computed causally: at a
//!   prediction only the stays closed by then exist.
//! - **transitions**: consecutive stays of a device; a transition is a test case when the
//!   device leaves the first stay in the test window and the second stay lies farther than
//!   `--place-radius` from the place of the first (else the device did not go anywhere).
//!   It goes to a *known* place when a place existing at the prediction lies within
//!   `--place-radius` of the next stay.
//!
//! Online: all training fixes go through the gateway (`Ingest`), then for each test case, in
//! time order per device, the device's test fixes up to and including the leaving fix are
//! ingested and `PredictNext` (k = 3) asked. The baselines are computed here from the same
//! offline stays, seeing only stays closed by the leaving fix:
//! - most visited other place (by number of stays),
//! - first-order Markov over place → place transitions,
//! - the same with the 6-hour bin of day (UTC) of departure, backing off to plain Markov
//!   counts when the bin has no transition from the current place.
//!
//! Ties go to the most recent, then the oldest place.
//!
//! Scoring is the same for all: a predicted place is right when its centroid lies within
//! `--place-radius` of the next stay's centroid. top-1 / top-3: the first / any of the first
//! three is right. Brier score over the listed places plus the actual next place (probability
//! 0 when unlisted): sum of (p - o)^2, 0 is perfect, saying nothing scores 1.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::BufReader,
    path::PathBuf,
};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use trackmesh_proto::v1::{DevicePredictRequest, Fix, IngestRequest, PredictNextResponse};

use crate::{
    client::{Client, RetryPolicy, status_error},
    csv_input::FixReader,
    table, time,
};

const HOUR_MS: i64 = 3_600_000;
/// Predictions asked for and scored.
const K: usize = 3;
/// Fixes per Ingest call.
const BATCH: usize = 1000;

/// Thresholds of the offline stays and places, and the matching radius.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub stay_radius_m: f64,
    pub stay_min_ms: i64,
    pub max_gap_ms: i64,
    pub place_radius_m: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            stay_radius_m: 200.0,
            stay_min_ms: 20 * 60_000,
            max_gap_ms: 12 * HOUR_MS,
            place_radius_m: 200.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub file: PathBuf,
    /// Training fixes from here (inclusive); default: all before the cut.
    pub train_from_ms: Option<i64>,
    pub cut_ms: i64,
    pub until_ms: i64,
    /// Prepended to every device id, so that runs on one stack do not share models.
    pub prefix: String,
    pub concurrency: usize,
    pub rules: Rules,
}

/// A position at a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub time_ms: i64,
    pub lat: f64,
    pub lon: f64,
}

/// An offline stay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stay {
    pub start_ms: i64,
    pub end_ms: i64,
    /// Time of the fix that closed the stay: the device has left.
    pub leave_ms: i64,
    pub lat: f64,
    pub lon: f64,
}

/// Offline stays of one device's fixes, sorted by time without repeated times.
pub fn stays(points: &[Point], rules: &Rules) -> Vec<Stay> {
    let mut out = Vec::new();
    let Some(first) = points.first() else {
        return out;
    };
    let mut anchor = *first;
    let (mut sum_lat, mut sum_lon, mut n) = (first.lat, first.lon, 1.0);
    let mut last = *first;
    for &p in &points[1..] {
        let gap = p.time_ms - last.time_ms > rules.max_gap_ms;
        let outside = haversine_m(anchor.lat, anchor.lon, p.lat, p.lon) >= rules.stay_radius_m;
        if gap || outside {
            let end_ms = if gap { last.time_ms } else { p.time_ms };
            if end_ms - anchor.time_ms >= rules.stay_min_ms {
                out.push(Stay {
                    start_ms: anchor.time_ms,
                    end_ms,
                    leave_ms: p.time_ms,
                    lat: sum_lat / n,
                    lon: sum_lon / n,
                });
            }
            anchor = p;
            (sum_lat, sum_lon, n) = (p.lat, p.lon, 1.0);
        } else {
            sum_lat += p.lat;
            sum_lon += p.lon;
            n += 1.0;
        }
        last = p;
    }
    // A stay still open when the data ends is the truth of the transition into it; no
    // transition leaves it.
    if last.time_ms - anchor.time_ms >= rules.stay_min_ms {
        out.push(Stay {
            start_ms: anchor.time_ms,
            end_ms: last.time_ms,
            leave_ms: i64::MAX,
            lat: sum_lat / n,
            lon: sum_lon / n,
        });
    }
    out
}

/// A place of the baselines' online clustering.
#[derive(Debug, Clone)]
struct Place {
    lat: f64,
    lon: f64,
    dwell_ms: i64,
    visits: u32,
    last_ms: i64,
}

/// A transition between places, with its departure time.
#[derive(Debug, Clone, Copy)]
struct Move {
    from: usize,
    to: usize,
    leave_ms: i64,
}

/// What the baselines know of a device: places and transitions of the stays so far.
#[derive(Debug, Default)]
struct History {
    places: Vec<Place>,
    moves: Vec<Move>,
    /// Place of the last stay.
    current: Option<usize>,
    /// When the device left the last stay.
    left_ms: i64,
}

impl History {
    fn nearest(&self, lat: f64, lon: f64, radius_m: f64) -> Option<usize> {
        self.places
            .iter()
            .enumerate()
            .map(|(i, p)| (i, haversine_m(p.lat, p.lon, lat, lon)))
            .filter(|(_, d)| *d <= radius_m)
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    }

    fn add(&mut self, stay: &Stay, radius_m: f64) {
        let dwell = (stay.end_ms - stay.start_ms).max(1);
        let index = match self.nearest(stay.lat, stay.lon, radius_m) {
            Some(i) => {
                let p = &mut self.places[i];
                let w = dwell as f64 / (p.dwell_ms + dwell) as f64;
                p.lat += (stay.lat - p.lat) * w;
                p.lon += (stay.lon - p.lon) * w;
                p.dwell_ms += dwell;
                p.visits += 1;
                p.last_ms = stay.end_ms;
                i
            }
            None => {
                self.places.push(Place {
                    lat: stay.lat,
                    lon: stay.lon,
                    dwell_ms: dwell,
                    visits: 1,
                    last_ms: stay.end_ms,
                });
                self.places.len() - 1
            }
        };
        if let Some(from) = self.current
            && from != index
        {
            self.moves.push(Move {
                from,
                to: index,
                leave_ms: self.left_ms,
            });
        }
        self.current = Some(index);
        self.left_ms = stay.leave_ms;
    }

    fn ranked(&self, scores: HashMap<usize, (f64, i64)>) -> Vec<Guess> {
        let total: f64 = scores.values().map(|(s, _)| s).sum();
        let mut ranked: Vec<(usize, (f64, i64))> = scores.into_iter().collect();
        // Most evidence, then the most recent, then the oldest place.
        ranked.sort_by(|a, b| {
            b.1.0
                .total_cmp(&a.1.0)
                .then(b.1.1.cmp(&a.1.1))
                .then(a.0.cmp(&b.0))
        });
        ranked
            .into_iter()
            .take(K)
            .map(|(i, (score, _))| Guess {
                lat: self.places[i].lat,
                lon: self.places[i].lon,
                probability: score / total,
            })
            .collect()
    }

    fn most_visited_other(&self) -> Vec<Guess> {
        let scores = self
            .places
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.current)
            .map(|(i, p)| (i, (f64::from(p.visits), p.last_ms)))
            .collect();
        self.ranked(scores)
    }

    /// Transition counts from the current place, of the moves that `keep`.
    fn markov(&self, keep: impl Fn(&Move) -> bool) -> Vec<Guess> {
        let Some(from) = self.current else {
            return Vec::new();
        };
        let mut scores: HashMap<usize, (f64, i64)> = HashMap::new();
        for m in self.moves.iter().filter(|m| m.from == from && keep(m)) {
            let entry = scores.entry(m.to).or_insert((0.0, i64::MIN));
            entry.0 += 1.0;
            entry.1 = entry.1.max(m.leave_ms);
        }
        self.ranked(scores)
    }

    fn markov_time_of_day(&self, leave_ms: i64) -> Vec<Guess> {
        let bin = quarter_of_day(leave_ms);
        let guesses = self.markov(|m| quarter_of_day(m.leave_ms) == bin);
        if guesses.is_empty() {
            self.markov(|_| true)
        } else {
            guesses
        }
    }
}

/// The 6-hour bin of the day, UTC.
fn quarter_of_day(time_ms: i64) -> i64 {
    time_ms.div_euclid(6 * HOUR_MS).rem_euclid(4)
}

/// A predicted place.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Guess {
    pub lat: f64,
    pub lon: f64,
    pub probability: f64,
}

/// The predictors, in table order.
pub const PREDICTORS: [&str; 4] = [
    "model",
    "most_visited_other",
    "markov",
    "markov_time_of_day",
];

/// One test transition.
#[derive(Debug, Clone)]
pub struct Case {
    /// The leaving fix: fixes up to this time are ingested before asking.
    pub leave_ms: i64,
    /// Centroid of the stay left and of the next stay.
    pub from: (f64, f64),
    pub next: (f64, f64),
    pub known: bool,
    /// The baselines' guesses, in `PREDICTORS` order after the model.
    pub baselines: [Vec<Guess>; 3],
}

/// A device's test cases, with its fixes split at the cut.
#[derive(Debug, Clone, Default)]
pub struct DevicePlan {
    pub device: String,
    pub train: Vec<Point>,
    pub test: Vec<Point>,
    pub cases: Vec<Case>,
}

/// Offline part of the protocol for one device: stays, places, cases with the baselines.
pub fn plan_device(
    device: &str,
    points: &[Point],
    train_from_ms: i64,
    cut_ms: i64,
    until_ms: i64,
    rules: &Rules,
) -> DevicePlan {
    let window: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.time_ms >= train_from_ms && p.time_ms < until_ms)
        .collect();
    let found = stays(&window, rules);
    let mut history = History::default();
    let mut cases = Vec::new();
    for pair in found.windows(2) {
        let (left, next) = (&pair[0], &pair[1]);
        history.add(left, rules.place_radius_m);
        if left.leave_ms < cut_ms || left.leave_ms >= until_ms {
            continue;
        }
        let Some(current) = history.current else {
            continue;
        };
        let here = &history.places[current];
        if haversine_m(here.lat, here.lon, next.lat, next.lon) <= rules.place_radius_m {
            continue;
        }
        let known = history
            .places
            .iter()
            .any(|p| haversine_m(p.lat, p.lon, next.lat, next.lon) <= rules.place_radius_m);
        cases.push(Case {
            leave_ms: left.leave_ms,
            from: (left.lat, left.lon),
            next: (next.lat, next.lon),
            known,
            baselines: [
                history.most_visited_other(),
                history.markov(|_| true),
                history.markov_time_of_day(left.leave_ms),
            ],
        });
    }
    let (train, test) = window.iter().partition(|p| p.time_ms < cut_ms);
    DevicePlan {
        device: device.to_owned(),
        train,
        test,
        cases,
    }
}

/// Accuracy and calibration of one predictor.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Score {
    pub top1: u32,
    pub top3: u32,
    pub top1_known: u32,
    pub top3_known: u32,
    /// Cases without any prediction.
    pub silent: u32,
    pub brier_sum: f64,
    /// Sum of the first guess's probability, for its mean next to top-1.
    pub p1_sum: f64,
}

impl Score {
    fn add(&mut self, guesses: &[Guess], case: &Case, radius_m: f64) {
        let right = |g: &Guess| haversine_m(g.lat, g.lon, case.next.0, case.next.1) <= radius_m;
        let first_right = guesses.iter().take(K).position(right);
        let top1 = first_right == Some(0);
        let top3 = first_right.is_some();
        self.top1 += u32::from(top1);
        self.top3 += u32::from(top3);
        if case.known {
            self.top1_known += u32::from(top1);
            self.top3_known += u32::from(top3);
        }
        self.silent += u32::from(guesses.is_empty());
        self.p1_sum += guesses.first().map_or(0.0, |g| g.probability);
        let mut brier = if top3 { 0.0 } else { 1.0 };
        for (i, g) in guesses.iter().take(K).enumerate() {
            let o = if Some(i) == first_right { 1.0 } else { 0.0 };
            brier += (g.probability - o).powi(2);
        }
        self.brier_sum += brier;
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub file: String,
    pub train_from: String,
    pub cut: String,
    pub until: String,
    pub devices: usize,
    pub train_fixes: usize,
    pub test_fixes: usize,
    pub transitions: u32,
    pub transitions_known: u32,
    pub predictors: Vec<PredictorReport>,
    /// Every case, for the analysis.
    pub cases: Vec<CaseReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CaseReport {
    pub device: String,
    pub leave: String,
    pub known: bool,
    /// Centroids of the stay left and of the next stay.
    pub from: (f64, f64),
    pub next: (f64, f64),
    /// The model's `from` place and its distance to the stay left (m).
    pub model_from: Option<(f64, f64)>,
    pub model_from_m: Option<f64>,
    /// Per predictor (PREDICTORS order): rank of the first right guess (1..=3), 0 if none.
    pub ranks: Vec<usize>,
    pub model: Vec<Guess>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PredictorReport {
    pub name: String,
    pub top1: f64,
    pub top3: f64,
    pub top1_known: f64,
    pub top3_known: f64,
    pub brier: f64,
    pub mean_p1: f64,
    pub silent: u32,
    pub hits: Score,
}

/// The model's answer to one case.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub guesses: Vec<Guess>,
    /// The place the model predicted from.
    pub from: Option<(f64, f64)>,
}

/// Scores the cases; `model` holds the model's answers per case, in plan order, if asked.
pub fn score(plans: &[DevicePlan], model: Option<&[Vec<Answer>]>, rules: &Rules) -> [Score; 4] {
    let mut scores: [Score; 4] = Default::default();
    for (d, plan) in plans.iter().enumerate() {
        for (c, case) in plan.cases.iter().enumerate() {
            if let Some(answer) = model.and_then(|m| m.get(d)).and_then(|m| m.get(c)) {
                scores[0].add(&answer.guesses, case, rules.place_radius_m);
            }
            for (b, guesses) in case.baselines.iter().enumerate() {
                scores[b + 1].add(guesses, case, rules.place_radius_m);
            }
        }
    }
    scores
}

pub fn report(
    options: &Options,
    plans: &[DevicePlan],
    scores: &[Score; 4],
    model: Option<&[Vec<Answer>]>,
) -> Report {
    let with_model = model.is_some();
    let radius = options.rules.place_radius_m;
    let rank = |guesses: &[Guess], case: &Case| {
        guesses
            .iter()
            .take(K)
            .position(|g| haversine_m(g.lat, g.lon, case.next.0, case.next.1) <= radius)
            .map_or(0, |i| i + 1)
    };
    let mut case_reports = Vec::new();
    for (d, plan) in plans.iter().enumerate() {
        for (c, case) in plan.cases.iter().enumerate() {
            let answer = model.and_then(|m| m.get(d)).and_then(|m| m.get(c));
            let mut ranks = vec![answer.map_or(0, |a| rank(&a.guesses, case))];
            ranks.extend(case.baselines.iter().map(|g| rank(g, case)));
            let model_from = answer.and_then(|a| a.from);
            case_reports.push(CaseReport {
                device: plan.device.clone(),
                leave: time::format_ms(case.leave_ms),
                known: case.known,
                from: case.from,
                next: case.next,
                model_from,
                model_from_m: model_from
                    .map(|(lat, lon)| haversine_m(lat, lon, case.from.0, case.from.1).round()),
                ranks,
                model: answer.map(|a| a.guesses.clone()).unwrap_or_default(),
            });
        }
    }
    let cases = plans.iter().flat_map(|p| &p.cases);
    let transitions = u32::try_from(cases.clone().count()).unwrap_or(u32::MAX);
    let known = u32::try_from(cases.filter(|c| c.known).count()).unwrap_or(u32::MAX);
    let ratio = |a: u32, b: u32| {
        if b == 0 {
            0.0
        } else {
            f64::from(a) / f64::from(b)
        }
    };
    let predictors = PREDICTORS
        .iter()
        .zip(scores)
        .filter(|(name, _)| with_model || **name != "model")
        .map(|(name, s)| PredictorReport {
            name: (*name).to_owned(),
            top1: ratio(s.top1, transitions),
            top3: ratio(s.top3, transitions),
            top1_known: ratio(s.top1_known, known),
            top3_known: ratio(s.top3_known, known),
            brier: if transitions == 0 {
                0.0
            } else {
                s.brier_sum / f64::from(transitions)
            },
            mean_p1: if transitions == 0 {
                0.0
            } else {
                s.p1_sum / f64::from(transitions)
            },
            silent: s.silent,
            hits: s.clone(),
        })
        .collect();
    Report {
        file: options.file.display().to_string(),
        train_from: options
            .train_from_ms
            .map_or_else(|| "start".to_owned(), time::format_ms),
        cut: time::format_ms(options.cut_ms),
        until: time::format_ms(options.until_ms),
        devices: plans.len(),
        train_fixes: plans.iter().map(|p| p.train.len()).sum(),
        test_fixes: plans.iter().map(|p| p.test.len()).sum(),
        transitions,
        transitions_known: known,
        predictors,
        cases: case_reports,
    }
}

/// The report as a table.
pub fn render(report: &Report) -> String {
    let header = [
        "predictor",
        "top-1",
        "top-3",
        "top-1 known",
        "top-3 known",
        "Brier",
        "mean p1",
        "silent",
    ];
    let rows: Vec<Vec<String>> = report
        .predictors
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                format!("{:.2} ({})", p.top1, p.hits.top1),
                format!("{:.2} ({})", p.top3, p.hits.top3),
                format!("{:.2} ({})", p.top1_known, p.hits.top1_known),
                format!("{:.2} ({})", p.top3_known, p.hits.top3_known),
                format!("{:.3}", p.brier),
                format!("{:.2}", p.mean_p1),
                p.silent.to_string(),
            ]
        })
        .collect();
    format!(
        "{}: train {} .. {}, test .. {}; {} devices, {} training fixes, {} test fixes\n\
         {} transitions, {} to known places\n{}",
        report.file,
        report.train_from,
        report.cut,
        report.until,
        report.devices,
        report.train_fixes,
        report.test_fixes,
        report.transitions,
        report.transitions_known,
        table::render(&header, &rows)
    )
}

/// Reads FILE into sorted, deduplicated points per device.
pub fn read(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, Vec<Point>>> {
    let name = path.display().to_string();
    let file = File::open(path).with_context(|| format!("opening {name}"))?;
    let reader =
        FixReader::new(BufReader::with_capacity(1 << 20, file)).with_context(|| name.clone())?;
    let mut devices: BTreeMap<String, Vec<Point>> = BTreeMap::new();
    for row in reader {
        // Unreadable rows are skipped, as replay does.
        let Ok(fix) = row.with_context(|| format!("reading {name}"))? else {
            continue;
        };
        devices.entry(fix.device_id).or_default().push(Point {
            time_ms: fix.time_ms,
            lat: fix.lat,
            lon: fix.lon,
        });
    }
    for points in devices.values_mut() {
        // Stable: of two fixes at one time the first in the file counts, as learning-api does.
        points.sort_by_key(|p| p.time_ms);
        points.dedup_by_key(|p| p.time_ms);
    }
    Ok(devices)
}

/// Runs the protocol; without a client only the baselines are scored.
pub async fn run(
    options: &Options,
    client: Option<Client>,
    retry: RetryPolicy,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        options.cut_ms < options.until_ms,
        "--until must come after --cut"
    );
    let devices = read(&options.file)?;
    let train_from = options.train_from_ms.unwrap_or(i64::MIN);
    let plans: Vec<DevicePlan> = devices
        .iter()
        .map(|(device, points)| {
            plan_device(
                device,
                points,
                train_from,
                options.cut_ms,
                options.until_ms,
                &options.rules,
            )
        })
        .filter(|plan| !plan.train.is_empty() || !plan.test.is_empty())
        .collect();
    let model = match client {
        Some(client) => Some(ask_model(options, &plans, &client, retry).await?),
        None => None,
    };
    let scores = score(&plans, model.as_deref(), &options.rules);
    Ok(report(options, &plans, &scores, model.as_deref()))
}

/// Ingests the training fixes, then walks every device's test cases: the model's guesses.
async fn ask_model(
    options: &Options,
    plans: &[DevicePlan],
    client: &Client,
    retry: RetryPolicy,
) -> anyhow::Result<Vec<Vec<Answer>>> {
    let concurrency = options.concurrency.max(1);
    futures::stream::iter(plans)
        .map(|plan| ingest(client, retry, &options.prefix, &plan.device, &plan.train))
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    futures::stream::iter(plans)
        .map(|plan| walk(client, retry, &options.prefix, plan))
        .buffered(concurrency)
        .try_collect()
        .await
}

async fn walk(
    client: &Client,
    retry: RetryPolicy,
    prefix: &str,
    plan: &DevicePlan,
) -> anyhow::Result<Vec<Answer>> {
    let mut sent = 0;
    let mut out = Vec::with_capacity(plan.cases.len());
    for case in &plan.cases {
        let upto = plan.test.partition_point(|p| p.time_ms <= case.leave_ms);
        if upto > sent {
            ingest(client, retry, prefix, &plan.device, &plan.test[sent..upto]).await?;
            sent = upto;
        }
        let request = DevicePredictRequest {
            device_id: format!("{prefix}{}", plan.device),
            k: K as u32,
        };
        let response: PredictNextResponse = retry
            .run(
                || {
                    let (mut client, request) = (client.clone(), request.clone());
                    async move { client.predict_next(request).await }
                },
                |_, _| {},
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| status_error("PredictNext failed", &status))?;
        out.push(Answer {
            guesses: response
                .predictions
                .iter()
                .filter_map(|p| {
                    p.place.as_ref().map(|place| Guess {
                        lat: place.lat,
                        lon: place.lon,
                        probability: p.probability,
                    })
                })
                .collect(),
            from: response.from.as_ref().map(|p| (p.lat, p.lon)),
        });
    }
    Ok(out)
}

async fn ingest(
    client: &Client,
    retry: RetryPolicy,
    prefix: &str,
    device: &str,
    points: &[Point],
) -> anyhow::Result<()> {
    let device_id = format!("{prefix}{device}");
    for chunk in points.chunks(BATCH) {
        let request = IngestRequest {
            fixes: chunk
                .iter()
                .map(|p| Fix {
                    device_id: device_id.clone(),
                    time_ms: p.time_ms,
                    lat: p.lat,
                    lon: p.lon,
                    ..Fix::default()
                })
                .collect(),
            sequence: 0,
        };
        // Learning is best effort in the gateway: a batch it missed would leave the model
        // short of history, so it is sent again (learning ignores what it saw already).
        let mut attempt = 0;
        loop {
            let response = retry
                .run(
                    || {
                        let (mut client, request) = (client.clone(), request.clone());
                        async move { client.ingest(request).await }
                    },
                    |_, _| {},
                )
                .await
                .map_err(|status| status_error("ingest failed", &status))?
                .into_inner();
            if response.learning_ok || response.accepted == 0 {
                break;
            }
            attempt += 1;
            anyhow::ensure!(
                attempt < retry.attempts,
                "learning did not observe a batch of {device_id} after {attempt} attempts \
                 (learning_ok false): is learning-api up?"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }
    Ok(())
}

/// Great-circle distance in metres (mean Earth radius), as learning-api measures it.
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const R: f64 = 6_371_008.8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * R * a.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * HOUR_MS;
    // Tuesday 2020-12-01 00:00 UTC.
    const DAY0: i64 = 1_606_780_800_000;
    const A: (f64, f64) = (40.60, -74.00);
    const B: (f64, f64) = (40.65, -74.00);
    const C: (f64, f64) = (40.60, -74.06);

    /// A fix every 5 minutes: at `at` from `from_h` to `to_h` (hours of `day`), travelling
    /// in between (a straight line, fixes every 5 minutes).
    fn schedule(days: i64, visits: &[((f64, f64), f64, f64)]) -> Vec<Point> {
        let mut points = Vec::new();
        for day in 0..days {
            let base = DAY0 + day * DAY_MS;
            for (i, &(at, from_h, to_h)) in visits.iter().enumerate() {
                let start = base + (from_h * HOUR_MS as f64) as i64;
                let end = base + (to_h * HOUR_MS as f64) as i64;
                let mut t = start;
                while t <= end {
                    points.push(Point {
                        time_ms: t,
                        lat: at.0,
                        lon: at.1,
                    });
                    t += 5 * 60_000;
                }
                // Travel to the next place in an hour.
                let (next, _, _) = visits[(i + 1) % visits.len()];
                for step in 1..12 {
                    let f = f64::from(step) / 12.0;
                    points.push(Point {
                        time_ms: end + i64::from(step) * 5 * 60_000,
                        lat: at.0 + (next.0 - at.0) * f,
                        lon: at.1 + (next.1 - at.1) * f,
                    });
                }
            }
        }
        points.sort_by_key(|p| p.time_ms);
        points.dedup_by_key(|p| p.time_ms);
        points
    }

    #[test]
    fn stays_follow_the_sliding_rule() {
        let rules = Rules::default();
        let mut points = Vec::new();
        // 30 min at A, one fix 1 km away, 10 min at B (too short), 13 h gap, 25 min at C.
        for m in 0..=30 {
            points.push(Point {
                time_ms: m * 60_000,
                lat: A.0,
                lon: A.1,
            });
        }
        points.push(Point {
            time_ms: 31 * 60_000,
            lat: A.0 + 0.01,
            lon: A.1,
        });
        for m in 32..=42 {
            points.push(Point {
                time_ms: m * 60_000,
                lat: B.0,
                lon: B.1,
            });
        }
        let later = 42 * 60_000 + 13 * HOUR_MS;
        for m in 0..=25 {
            points.push(Point {
                time_ms: later + m * 60_000,
                lat: C.0,
                lon: C.1,
            });
        }
        points.push(Point {
            time_ms: later + 26 * 60_000,
            lat: A.0,
            lon: A.1,
        });
        let found = stays(&points, &rules);
        assert_eq!(found.len(), 2, "{found:?}");
        let open = stays(&points[..points.len() - 1], &rules);
        assert_eq!(open.len(), 2, "the open stay at C lasted 25 min");
        assert_eq!(open[1].leave_ms, i64::MAX);
        assert_eq!(
            (found[0].start_ms, found[0].end_ms, found[0].leave_ms),
            (0, 31 * 60_000, 31 * 60_000)
        );
        assert!((found[0].lat - A.0).abs() < 1e-9);
        assert_eq!(
            (found[1].start_ms, found[1].leave_ms),
            (later, later + 26 * 60_000)
        );
    }

    /// Home A; mornings A → B → A, afternoons A → C → A. From A the next place depends on
    /// the time of day only: the time-aware chain is always right; plain Markov ties B and
    /// C and breaks the tie by recency, which is always the other one, so it is right only
    /// when leaving B or C (half of the transitions).
    #[test]
    fn baselines_on_a_schedule_with_a_known_answer() {
        let points = schedule(
            5,
            &[
                (A, 0.0, 7.0),
                (B, 8.0, 11.0),
                (A, 12.0, 14.0),
                (C, 15.0, 19.0),
                (A, 20.0, 23.5),
            ],
        );
        let rules = Rules::default();
        let plan = plan_device(
            "d",
            &points,
            i64::MIN,
            DAY0 + 4 * DAY_MS,
            DAY0 + 5 * DAY_MS,
            &rules,
        );
        // Day 4: A→B, B→A, A→C, C→A; the evening stay at A is still open at midnight.
        assert_eq!(
            plan.cases.len(),
            4,
            "{:?}",
            plan.cases.iter().map(|c| c.leave_ms).collect::<Vec<_>>()
        );
        assert!(plan.cases.iter().all(|c| c.known));
        let scores = score(&[plan], None, &rules);
        let [_, visited, markov, time_of_day] = &scores;
        assert_eq!((time_of_day.top1, time_of_day.top3), (4, 4));
        assert_eq!((markov.top1, markov.top3), (2, 4));
        // Most visited other: from A it names B or C (tied), from B and C it names A.
        assert_eq!(visited.top3, 4);
        assert_eq!(visited.top1, 2);
        assert!(
            time_of_day.brier_sum < 1e-9,
            "certain and right: {}",
            time_of_day.brier_sum
        );
        // Plain Markov from A: 4:4 in the morning (0.5^2 + 0.5^2), 5:4 for B in the
        // afternoon when C is right ((5/9)^2 + (4/9 - 1)^2); sure and right from B and C.
        let expected = 0.5 + 50.0 / 81.0;
        assert!(
            (markov.brier_sum - expected).abs() < 1e-9,
            "{}",
            markov.brier_sum
        );
    }

    #[test]
    fn no_case_looks_past_its_moment() {
        // The first test transition goes to a place first seen on the test day: unknown,
        // and no baseline can name it.
        let mut points = schedule(2, &[(A, 0.0, 7.0), (B, 8.0, 20.0)]);
        let test_day = DAY0 + 2 * DAY_MS;
        for m in (0..=120).step_by(5) {
            points.push(Point {
                time_ms: test_day + m * 60_000,
                lat: A.0,
                lon: A.1,
            });
        }
        for m in (130..=200).step_by(5) {
            points.push(Point {
                time_ms: test_day + m * 60_000,
                lat: C.0,
                lon: C.1,
            });
        }
        points.push(Point {
            time_ms: test_day + 205 * 60_000,
            lat: B.0,
            lon: B.1,
        });
        let rules = Rules::default();
        let plan = plan_device("d", &points, i64::MIN, test_day, test_day + DAY_MS, &rules);
        let first = plan
            .cases
            .iter()
            .find(|c| haversine_m(c.next.0, c.next.1, C.0, C.1) < 1.0)
            .map(|c| c.known);
        assert_eq!(first, Some(false), "{:?}", plan.cases);
        let at_c = |c: &Case| haversine_m(c.next.0, c.next.1, C.0, C.1) < 1.0;
        let to_c = plan.cases.iter().position(at_c).unwrap();
        let one = DevicePlan {
            cases: vec![plan.cases[to_c].clone()],
            ..plan
        };
        let scores = score(&[one], None, &rules);
        assert!(scores[1..].iter().all(|s| s.top3 == 0), "{scores:?}");
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        // One degree of latitude: 111.2 km on the mean sphere.
        let d = haversine_m(0.0, 0.0, 1.0, 0.0);
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
    }
}
