//! Agreement with the offline anchor: the stays learning-api finds online in the AIS sample
//! against those trackintel finds offline with the same thresholds
//! (`scripts/reference/stays.py`, committed as `scripts/reference/ais-virginia-beach-stays.csv`).
//!
//! `cargo test -p learning --test reference -- --nocapture` prints the agreement.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};

use learning::model::Rules;
use learning::{Config, run};
use prost::Message as _;
use testkit::Service;
use trackmesh_proto::v1::{
    Fix, GetPlacesRequest, ObserveRequest, RebuildRequest, RefinedFix, Stay, Verdict,
    learning_client::LearningClient,
};
use trackmesh_shared::{event_messages::TenantEvents, geo, redis::RedisConfig};

const SAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../data/ais-virginia-beach-2020-06-04..06.csv"
);
const REFERENCE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/reference/ais-virginia-beach-stays.csv"
);
/// The same with `STAY_RADIUS_M=500`.
const REFERENCE_500M: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/reference/ais-virginia-beach-stays-500m.csv"
);
/// Start and end of matched stays may differ by this much.
const TIME_TOLERANCE_MS: i64 = 60_000;

/// `2020-06-04T03:07:16Z` → Unix epoch milliseconds.
fn parse_time(text: &str) -> i64 {
    let number = |range: std::ops::Range<usize>| -> i64 { text[range].parse().unwrap() };
    assert!(text.len() == 20 && text.ends_with('Z'), "{text}");
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + number(11..13)) * 60 + number(14..16)) * 60_000 + number(17..19) * 1000
}

fn sample() -> Vec<RefinedFix> {
    let text = std::fs::read_to_string(SAMPLE).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("device_id,timestamp,lon,lat"));
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            RefinedFix {
                fix: Some(Fix {
                    device_id: f[0].into(),
                    time_ms: parse_time(f[1]),
                    lon: f[2].parse().unwrap(),
                    lat: f[3].parse().unwrap(),
                    ..Fix::default()
                }),
                verdict: Verdict::Accepted as i32,
                ..RefinedFix::default()
            }
        })
        .collect()
}

struct Reference {
    device: String,
    start_ms: i64,
    end_ms: i64,
    lat: f64,
    lon: f64,
    location: String,
}

fn reference(path: &str) -> Vec<Reference> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("device_id,started_ms,finished_ms,lat,lon,fixes,location_id")
    );
    lines
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Reference {
                device: f[0].into(),
                start_ms: f[1].parse().unwrap(),
                end_ms: f[2].parse().unwrap(),
                lat: f[3].parse().unwrap(),
                lon: f[4].parse().unwrap(),
                location: f[6].into(),
            }
        })
        .collect()
}

#[test]
fn time_parsing() {
    assert_eq!(parse_time("1970-01-01T00:00:00Z"), 0);
    assert_eq!(parse_time("2020-06-04T03:07:16Z"), 1_591_240_036_000);
    assert_eq!(parse_time("2024-02-29T23:59:59Z"), 1_709_251_199_000);
}

/// Matches each reference stay with at most one stay of the same device (start and end within
/// TIME_TOLERANCE_MS, centroids within the stay radius), asserts that every difference is the
/// designed one, and returns the agreement in words.
fn agreement(
    stays: &[Stay],
    reference: &[Reference],
    fixes: &[RefinedFix],
    rules: &Rules,
) -> String {
    let mut used = vec![false; stays.len()];
    let mut matched = 0;
    let mut exact = 0;
    let mut distances = Vec::new();
    let mut missing = Vec::new();
    for stay in reference {
        let found = stays.iter().enumerate().position(|(i, s)| {
            !used[i]
                && s.device_id == stay.device
                && (s.start_ms - stay.start_ms).abs() <= TIME_TOLERANCE_MS
                && (s.end_ms - stay.end_ms).abs() <= TIME_TOLERANCE_MS
                && geo::haversine_m(s.lat, s.lon, stay.lat, stay.lon) <= rules.stay_radius_m
        });
        match found {
            Some(i) => {
                used[i] = true;
                matched += 1;
                let s = &stays[i];
                exact += usize::from(s.start_ms == stay.start_ms && s.end_ms == stay.end_ms);
                distances.push(geo::haversine_m(s.lat, s.lon, stay.lat, stay.lon));
            }
            None => missing.push((&stay.device, stay.start_ms, stay.end_ms)),
        }
    }

    // Stays without a match must be the designed difference: a candidate closed by a gap over
    // MAX_TIME_DIFF (or a jump over MAX_SPEED_KMH), which trackintel drops.
    let mut next_fix: BTreeMap<(&str, i64), (i64, f64, f64)> = BTreeMap::new();
    let mut by_device: BTreeMap<&str, Vec<&Fix>> = BTreeMap::new();
    for fix in fixes.iter().filter_map(|f| f.fix.as_ref()) {
        by_device.entry(&fix.device_id).or_default().push(fix);
    }
    for (device, track) in &by_device {
        for pair in track.windows(2) {
            next_fix.insert(
                (device, pair[0].time_ms),
                (pair[1].time_ms, pair[1].lat, pair[1].lon),
            );
        }
    }
    let closed_by_gap = |stay: &Stay| {
        let last = by_device[stay.device_id.as_str()]
            .iter()
            .find(|f| f.time_ms == stay.end_ms)
            .copied();
        let next = next_fix.get(&(stay.device_id.as_str(), stay.end_ms));
        match (last, next) {
            (Some(last), Some((time, lat, lon))) => {
                time - last.time_ms > rules.max_time_diff_ms
                    || geo::speed_kmh(
                        geo::haversine_m(last.lat, last.lon, *lat, *lon),
                        time - last.time_ms,
                    ) > rules.max_speed_kmh
            }
            _ => false,
        }
    };
    let extra: Vec<&Stay> = stays
        .iter()
        .zip(&used)
        .filter(|(_, used)| !**used)
        .map(|(stay, _)| stay)
        .collect();
    let unexplained: Vec<&&Stay> = extra.iter().filter(|s| !closed_by_gap(s)).collect();

    distances.sort_by(f64::total_cmp);
    let median = distances.get(distances.len() / 2).copied().unwrap_or(0.0);
    let max = distances.last().copied().unwrap_or(0.0);
    assert!(reference.len() > 200, "the reference is the AIS sample's");
    assert!(missing.is_empty(), "reference stays not found: {missing:?}");
    assert!(
        unexplained.is_empty(),
        "stays not in the reference: {unexplained:?}"
    );
    assert!(max <= rules.stay_radius_m);
    format!(
        "{matched}/{} trackintel stays matched ({:.1}%), {exact} with identical start and end; \
         {} stays, {} unmatched, all closed by a gap over MAX_TIME_DIFF or a jump (trackintel \
         drops those), precision {:.1}%; centroid distance median {median:.1} m, max {max:.1} m",
        reference.len(),
        100.0 * matched as f64 / reference.len() as f64,
        stays.len(),
        extra.len(),
        100.0 * matched as f64 / stays.len() as f64,
    )
}

/// As a live feed would deliver it: all vessels interleaved in time order.
fn sample_in_time_order() -> Vec<RefinedFix> {
    let mut fixes = sample();
    fixes.sort_by_key(|f| f.fix.as_ref().map_or(0, |f| f.time_ms));
    fixes
}

#[tokio::test]
async fn online_stays_agree_with_trackintel() {
    let config = Config::for_redis(RedisConfig {
        redis_addr: testkit::redis_addr(),
        ..RedisConfig::default()
    });
    let rules = config.service.rules();
    let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
    let mut client = LearningClient::connect(service.url()).await.unwrap();
    let tenant = testkit::unique("ais");

    let fixes = sample_in_time_order();
    let mut online: Vec<Stay> = Vec::new();
    for batch in fixes.chunks(1_000) {
        let response = client
            .observe(ObserveRequest {
                tenant_id: tenant.clone(),
                fixes: batch.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        online.extend(response.stays);
    }
    let reference = reference(REFERENCE);
    let agreement = agreement(&online, &reference, &fixes, &rules);

    // Places, for information: learning-api's online places against trackintel's DBSCAN
    // locations (a different method, so not expected to agree everywhere).
    let mut locations: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for stay in &reference {
        locations
            .entry(&stay.device)
            .or_default()
            .insert(&stay.location);
    }
    let mut same_places = 0;
    for (device, ids) in &locations {
        let places = client
            .get_places(GetPlacesRequest {
                tenant_id: tenant.clone(),
                device_id: (*device).into(),
                k: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .places;
        same_places += usize::from(places.len() == ids.len());
    }
    println!(
        "reference agreement, online: {agreement}; devices with as many places as trackintel \
         locations: {same_places}/{}",
        locations.len(),
    );
}

/// A relearn after STAY_RADIUS_M changed: each device's model rebuilt (Learning.Rebuild, what
/// Gateway.Relearn calls with the stored fixes) by a learning-api started with 500 m; its
/// stays, read back from the events topic, against trackintel's with 500 m.
#[tokio::test]
async fn a_rebuild_with_a_larger_radius_agrees_with_trackintel_at_that_radius() {
    let mut config = Config::for_redis(RedisConfig {
        redis_addr: testkit::redis_addr(),
        ..RedisConfig::default()
    });
    config.service.stay_radius_m = 500.0;
    let name = testkit::unique("reference");
    config.service.kafka_brokers = Some(testkit::kafka_brokers());
    config.service.kafka_topic = format!("{name}.fixes");
    config.service.kafka_events_topic = format!("{name}.events");
    config.service.kafka_geofences_topic = format!("{name}.geofences");
    config.service.kafka_group_id = name.clone();
    config.service.kafka_partitions = 1;
    let rules = config.service.rules();
    let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
    let mut client = LearningClient::connect(service.url()).await.unwrap();
    let tenant = testkit::unique("ais");

    let fixes = sample_in_time_order();
    let mut by_device: BTreeMap<String, Vec<RefinedFix>> = BTreeMap::new();
    for fix in &fixes {
        let device = fix.fix.as_ref().unwrap().device_id.clone();
        by_device.entry(device).or_default().push(fix.clone());
    }
    let mut expected_stays = 0;
    for (device, track) in &by_device {
        let mut requests = vec![RebuildRequest {
            tenant_id: tenant.clone(),
            device_id: device.clone(),
            ..RebuildRequest::default()
        }];
        requests.extend(track.chunks(500).map(|chunk| RebuildRequest {
            fixes: chunk.to_vec(),
            ..RebuildRequest::default()
        }));
        requests.push(RebuildRequest {
            done: true,
            ..RebuildRequest::default()
        });
        let mut replies = client
            .rebuild(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut last = None;
        while let Some(reply) = replies.message().await.unwrap() {
            last = Some(reply);
        }
        let last = last.unwrap();
        assert!(
            last.replaced && last.need_after_ms == 0,
            "{device}: {last:?}"
        );
        expected_stays += last.stays;
    }

    let stays = read_stays(&format!("{name}.events"), expected_stays as usize).await;
    let agreement = agreement(&stays, &reference(REFERENCE_500M), &fixes, &rules);
    println!("reference agreement, rebuilt with STAY_RADIUS_M=500: {agreement}");
}

/// The closed stays on an events topic, once `n` have arrived (or a minute passed).
async fn read_stays(topic: &str, n: usize) -> Vec<Stay> {
    use rdkafka::{
        ClientConfig, Message as _,
        consumer::{Consumer as _, StreamConsumer},
    };
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", testkit::kafka_brokers())
        .set("group.id", testkit::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut stays = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while stays.len() < n {
        let message = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} stays on {topic}", stays.len()))
            .unwrap();
        let value = TenantEvents::decode(message.payload().unwrap_or_default()).unwrap();
        stays.extend(value.stays.into_iter().map(Stay::from));
    }
    stays
}
