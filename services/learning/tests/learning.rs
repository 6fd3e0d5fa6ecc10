//! learning-api against real Redis (standalone and a 3-node Cluster) started by scripts/test,
//! and with the real Kafka-protocol broker where stays and trips go out (Observe, Rebuild).

use std::time::Duration;

use futures::channel::mpsc;
use learning::{Config, run};
use learning::{
    fence::FenceState,
    model::{self, Model, Point, Rules},
};
use prost::Message as _;
use rdkafka::{
    ClientConfig, Message as _,
    consumer::{Consumer as _, StreamConsumer},
};
use testkit::{Rng, Service};
use tonic::{Code, transport::Channel};
use trackmesh_proto::v1::{
    Fix, ForgetRequest, GetPlacesRequest, GetPlacesResponse, GetProfileRequest, GetProfileResponse,
    ObserveRequest, ObserveResponse, Place, PlaceLabel, PredictNextRequest, PredictNextResponse,
    RebuildReply, RebuildRequest, RefinedFix, Stay, Trip, Verdict, learning_client::LearningClient,
};
use trackmesh_shared::{
    config::Duration as ConfigDuration,
    event_messages::TenantEvents,
    geo,
    redis::{Redis, RedisConfig, Write},
};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// Monday 2024-01-01 00:00 UTC.
const MONDAY: i64 = 1_704_067_200_000;

const HOME: (f64, f64) = (36.8500, -76.3000);
const WORK: (f64, f64) = (36.9150, -76.2500);
const GYM: (f64, f64) = (36.8300, -76.2700);

fn config(redis: RedisConfig) -> Config {
    let mut config = Config::for_redis(redis);
    config.common.readiness_interval = ConfigDuration::from_millis(100);
    config
}

async fn start(config: Config) -> (Service, Client) {
    let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
    let client = LearningClient::connect(service.url()).await.unwrap();
    (service, client)
}

fn accepted(device: &str, time_ms: i64, (lat, lon): (f64, f64)) -> RefinedFix {
    RefinedFix {
        fix: Some(Fix {
            device_id: device.into(),
            time_ms,
            lat,
            lon,
            ..Fix::default()
        }),
        verdict: Verdict::Accepted as i32,
        ..RefinedFix::default()
    }
}

/// A fix every 5 minutes at `spot` from `from` to `to` inclusive.
fn dwell(device: &str, from: i64, to: i64, spot: (f64, f64)) -> Vec<RefinedFix> {
    (0..)
        .map(|i| from + i * 5 * MINUTE_MS)
        .take_while(|t| *t <= to)
        .map(|t| accepted(device, t, spot))
        .collect()
}

/// A device at home, then at work, then home again: two closed stays and an open one.
fn commute(device: &str) -> Vec<RefinedFix> {
    let mut fixes = dwell(device, MONDAY, MONDAY + 2 * HOUR_MS, HOME);
    fixes.extend(dwell(
        device,
        MONDAY + 3 * HOUR_MS,
        MONDAY + 6 * HOUR_MS,
        WORK,
    ));
    fixes.extend(dwell(
        device,
        MONDAY + 7 * HOUR_MS,
        MONDAY + 8 * HOUR_MS,
        HOME,
    ));
    fixes
}

type Client = LearningClient<Channel>;

async fn observe(client: &mut Client, tenant: &str, fixes: &[RefinedFix]) -> ObserveResponse {
    let (tenant_id, fixes) = (tenant.into(), fixes.to_vec());
    let request = ObserveRequest { tenant_id, fixes };
    client.observe(request).await.unwrap().into_inner()
}

async fn places(client: &mut Client, tenant: &str, device: &str) -> Vec<Place> {
    let response: GetPlacesResponse = client
        .get_places(GetPlacesRequest {
            tenant_id: tenant.into(),
            device_id: device.into(),
            k: 0,
        })
        .await
        .unwrap()
        .into_inner();
    response.places
}

async fn profile(client: &mut Client, tenant: &str, device: &str) -> GetProfileResponse {
    let (tenant_id, device_id) = (tenant.into(), device.into());
    let request = GetProfileRequest {
        tenant_id,
        device_id,
    };
    client.get_profile(request).await.unwrap().into_inner()
}

async fn predict(client: &mut Client, tenant: &str, device: &str, k: u32) -> PredictNextResponse {
    client
        .predict_next(PredictNextRequest {
            tenant_id: tenant.into(),
            device_id: device.into(),
            k,
        })
        .await
        .unwrap()
        .into_inner()
}

fn near(place: &Place, spot: (f64, f64)) -> bool {
    geo::haversine_m(place.lat, place.lon, spot.0, spot.1) < 100.0
}

// ---- a synthetic week

/// A phone's week: fixes about once a minute while staying (some missing, GPS noise of
/// ~12 m, now and then ~30 m) and every 30 s while travelling.
struct Week {
    rng: Rng,
    device: String,
    t: i64,
    at: (f64, f64),
    fixes: Vec<RefinedFix>,
}

impl Week {
    fn new(device: &str, seed: u64) -> Self {
        Self {
            rng: Rng(seed),
            device: device.into(),
            t: MONDAY,
            at: HOME,
            fixes: Vec::new(),
        }
    }

    fn fix(&mut self, (lat, lon): (f64, f64), noise_m: f64) {
        let metres = 1.0 / 111_195.0;
        let lat = lat + self.rng.normal() * noise_m * metres;
        let lon = lon + self.rng.normal() * noise_m * metres / lat.to_radians().cos();
        let fix = accepted(&self.device, self.t, (lat, lon));
        self.fixes.push(fix);
    }

    /// Stays where it is until `until`.
    fn stay_until(&mut self, until: i64) {
        loop {
            let next = self.t + self.rng.between(45_000, 75_000);
            if next > until {
                break;
            }
            self.t = next;
            if self.rng.uniform() > 0.05 {
                let noise = if self.rng.uniform() < 0.02 {
                    30.0
                } else {
                    12.0
                };
                self.fix(self.at, noise);
            }
        }
    }

    /// Travels to `to` in `minutes`, in a straight line.
    fn go(&mut self, to: (f64, f64), minutes: i64) {
        let (from, steps) = (self.at, minutes * 2);
        for step in 1..=steps {
            let f = step as f64 / steps as f64;
            self.t += 30_000;
            self.fix(
                (from.0 + (to.0 - from.0) * f, from.1 + (to.1 - from.1) * f),
                8.0,
            );
        }
        self.at = to;
    }

    /// Time `hours` into day `day` of the week, give or take up to `jitter_min` minutes.
    fn time(&mut self, day: i64, hours: f64, jitter_min: i64) -> i64 {
        MONDAY
            + day * DAY_MS
            + (hours * HOUR_MS as f64) as i64
            + self.rng.between(-jitter_min, jitter_min + 1) * MINUTE_MS
    }

    /// Home at night, work on weekdays, the gym on Monday, Wednesday, Friday evening and
    /// Saturday morning; ends on the next Monday at 07:00, at home.
    fn generate(mut self) -> Vec<RefinedFix> {
        for day in 0..7 {
            if day < 5 {
                let leave = self.time(day, 8.0, 20);
                self.stay_until(leave);
                self.go(WORK, 20);
                let done = self.time(day, 17.0, 20);
                self.stay_until(done);
                if day % 2 == 0 {
                    self.go(GYM, 15);
                    let t = self.t + self.rng.between(60, 90) * MINUTE_MS;
                    self.stay_until(t);
                    self.go(HOME, 10);
                } else {
                    self.go(HOME, 20);
                }
            } else if day == 5 {
                let leave = self.time(day, 10.0, 30);
                self.stay_until(leave);
                self.go(GYM, 10);
                let t = self.t + self.rng.between(60, 90) * MINUTE_MS;
                self.stay_until(t);
                self.go(HOME, 10);
            }
        }
        self.stay_until(MONDAY + 7 * DAY_MS + 7 * HOUR_MS);
        self.fixes
    }
}

/// Cuts `fixes` into batches of `size` and shuffles each: the service must sort them.
fn shuffled_batches(fixes: &[RefinedFix], size: usize, seed: u64) -> Vec<Vec<RefinedFix>> {
    let mut rng = Rng(seed);
    fixes
        .chunks(size)
        .map(|chunk| {
            let mut batch = chunk.to_vec();
            for i in (1..batch.len()).rev() {
                batch.swap(i, (rng.u64() % (i as u64 + 1)) as usize);
            }
            batch
        })
        .collect()
}

testkit::on_both_redis!(
    synthetic_week_learns_home_work_and_gym,
    stay_open_across_a_service_restart,
    concurrent_replicas_agree_with_serial,
    model_expires,
    forget_drops_the_model,
);

async fn synthetic_week_learns_home_work_and_gym(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let fixes = Week::new("phone", 7).generate();
    let mut observed = 0;
    for batch in shuffled_batches(&fixes, 500, 11) {
        observed += observe(&mut client, &tenant, &batch).await.observed;
    }
    assert_eq!(observed as usize, fixes.len());

    let places = places(&mut client, &tenant, "phone").await;
    assert_eq!(places.len(), 3, "{places:#?}");
    let home = places.iter().find(|p| near(p, HOME)).expect("home learned");
    let work = places.iter().find(|p| near(p, WORK)).expect("work learned");
    let gym = places.iter().find(|p| near(p, GYM)).expect("gym learned");
    assert_eq!(home.label, PlaceLabel::Home as i32);
    assert_eq!(work.label, PlaceLabel::Work as i32);
    assert_eq!(gym.label, PlaceLabel::Unspecified as i32);
    assert_eq!(places[0].place_id, home.place_id, "most dwell first");
    assert_eq!(work.visits, 5);
    assert_eq!(gym.visits, 4);
    assert_eq!(work.dwell_by_hour_ms.len(), 168);
    assert!(
        work.dwell_by_hour_ms[5 * 24..].iter().all(|ms| *ms == 0),
        "no work at the weekend"
    );

    let profile = profile(&mut client, &tenant, "phone").await;
    assert!(profile.found);
    assert_eq!(
        profile.home.as_ref().map(|p| &p.place_id),
        Some(&home.place_id)
    );
    assert_eq!(
        profile.work.as_ref().map(|p| &p.place_id),
        Some(&work.place_id)
    );
    assert_eq!(profile.places, 3);
    assert_eq!(profile.fixes_observed as usize, fixes.len());
    let current = profile.current_stay.expect("at home now");
    assert_eq!(current.place_id, home.place_id);

    let forecast = predict(&mut client, &tenant, "phone", 0).await;
    assert!(!forecast.no_history);
    assert_eq!(
        forecast.from.map(|p| p.place_id),
        Some(home.place_id.clone())
    );
    let next: Vec<(&str, f64)> = forecast
        .predictions
        .iter()
        .map(|p| (p.place.as_ref().unwrap().place_id.as_str(), p.probability))
        .collect();
    assert_eq!(next[0].0, work.place_id, "{next:?}");
    assert_eq!(next.len(), 2, "{next:?}");
    // Five of the six moves from home went to work, all from the 06-12 bin it is in now;
    // the visits, which favour the nearer gym, pull a little: (5 + 0.767) / 7.
    // Of what the known places share; a new place gets (places + 1) / (stays + 2).
    let known = 1.0 - (f64::from(profile.places) + 1.0) / (profile.stays as f64 + 2.0);
    assert!((next[0].1 / known - 0.824).abs() < 0.001, "{next:?}");
    assert_eq!(
        forecast.predictions[0].place.as_ref().unwrap().label,
        PlaceLabel::Work as i32
    );
}

async fn stay_open_across_a_service_restart(redis: RedisConfig) {
    let tenant = testkit::unique("t");
    let fixes = commute("car");
    let (service, mut client) = start(config(redis.clone())).await;
    // Home, then work up to its last fix: the work stay is still open when the replica goes.
    let first = observe(&mut client, &tenant, &fixes[..62]).await;
    assert_eq!((first.observed, first.stays_closed), (62, 1));
    assert_eq!(first.stays[0].device_id, "car");
    service.shutdown().await.unwrap();

    let (_service, mut client) = start(config(redis)).await;
    let open = profile(&mut client, &tenant, "car").await.current_stay;
    assert_eq!(open.map(|s| s.start_ms), Some(MONDAY + 3 * HOUR_MS));
    let second = observe(&mut client, &tenant, &fixes[62..]).await;
    assert_eq!(second.stays_closed, 1);
    let stay = &second.stays[0];
    assert_eq!(
        (stay.start_ms, stay.end_ms, stay.fixes),
        (MONDAY + 3 * HOUR_MS, MONDAY + 7 * HOUR_MS, 37)
    );
    assert_eq!(stay.place_id, "p2");
    let profile = profile(&mut client, &tenant, "car").await;
    assert_eq!(profile.stays, 2);
    assert_eq!(profile.last_stay.map(|s| s.place_id), Some("p2".into()));
    let forecast = predict(&mut client, &tenant, "car", 3).await;
    assert_eq!(forecast.from.map(|p| p.place_id), Some("p1".into()));
    assert_eq!(forecast.predictions.len(), 1);
    // The only other place, but two stays founded two places: 1 - 3/4 is left for it.
    assert_eq!(forecast.predictions[0].probability, 0.25);
}

async fn concurrent_replicas_agree_with_serial(redis: RedisConfig) {
    // Two replicas; two clients send the same batches for the same devices at the same time,
    // as a retrying gateway would. Each fix must be learned exactly once, and the models must
    // end as one client alone leaves them.
    let (_one, client_one) = start(config(redis.clone())).await;
    let (_two, client_two) = start(config(redis)).await;
    let (tenant, serial) = (testkit::unique("t"), testkit::unique("t"));
    let devices: Vec<String> = (0..6).map(|d| format!("phone-{d}")).collect();
    let mut fixes: Vec<RefinedFix> = devices
        .iter()
        .enumerate()
        .flat_map(|(seed, d)| Week::new(d, seed as u64).generate())
        .collect();
    fixes.sort_by_key(|f| f.fix.as_ref().map_or(0, |f| f.time_ms));
    let batches = shuffled_batches(&fixes, 1_000, 3);

    let send = |mut client: Client, batches: Vec<Vec<RefinedFix>>, tenant: String| async move {
        let mut total = ObserveResponse::default();
        for batch in batches {
            let response = observe(&mut client, &tenant, &batch).await;
            total.observed += response.observed;
            total.ignored += response.ignored;
            total.stays_closed += response.stays_closed;
        }
        total
    };
    let (a, b) = tokio::join!(
        tokio::spawn(send(client_one.clone(), batches.clone(), tenant.clone())),
        tokio::spawn(send(client_two, batches.clone(), tenant.clone())),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let alone = send(client_one.clone(), batches, serial.clone()).await;
    assert_eq!(alone.observed as usize, fixes.len());
    assert_eq!(
        a.observed + b.observed,
        alone.observed,
        "each fix learned once"
    );
    assert_eq!(a.ignored + b.ignored, alone.observed);
    assert_eq!(a.stays_closed + b.stays_closed, alone.stays_closed);

    let mut client = client_one;
    for device in &devices {
        let concurrent = profile(&mut client, &tenant, device).await;
        let expected = profile(&mut client, &serial, device).await;
        assert!(expected.found && expected.places == 3, "{expected:?}");
        assert_eq!(concurrent, expected, "{device}");
        assert_eq!(
            places(&mut client, &tenant, device).await,
            places(&mut client, &serial, device).await
        );
        assert_eq!(
            predict(&mut client, &tenant, device, 5).await,
            predict(&mut client, &serial, device, 5).await
        );
    }
}

async fn model_expires(redis: RedisConfig) {
    let mut config = config(redis);
    config.service.state_ttl = ConfigDuration::from_secs(1);
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let fixes = commute("car");
    observe(&mut client, &tenant, &fixes[..40]).await;
    assert!(profile(&mut client, &tenant, "car").await.found);
    // A re-sent batch changes nothing, so it does not keep the model alive either.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        observe(&mut client, &tenant, &fixes[..40]).await.observed,
        0
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let gone = profile(&mut client, &tenant, "car").await;
    assert!(!gone.found, "{gone:?}");
    assert_eq!((gone.stays, gone.fixes_observed), (0, 0));
    // Expired means forgotten: the same fixes are new again.
    assert_eq!(
        observe(&mut client, &tenant, &fixes[..40]).await.observed,
        40
    );
}

async fn forget_drops_the_model(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    observe(&mut client, &tenant, &commute("car")).await;
    assert_eq!(places(&mut client, &tenant, "car").await.len(), 2);
    let forget = |device: &str| ForgetRequest {
        tenant_id: tenant.clone(),
        device_id: device.into(),
    };
    assert!(
        client
            .forget(forget("car"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !client
            .forget(forget("car"))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(places(&mut client, &tenant, "car").await.is_empty());
    assert!(!profile(&mut client, &tenant, "car").await.found);
}

#[tokio::test]
async fn unknown_devices_have_no_history() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    assert!(places(&mut client, &tenant, "nobody").await.is_empty());
    let forecast = predict(&mut client, &tenant, "nobody", 3).await;
    assert!(forecast.no_history && forecast.from.is_none() && forecast.predictions.is_empty());
    let profile = profile(&mut client, &tenant, "nobody").await;
    assert!(!profile.found && profile.home.is_none() && profile.last_stay.is_none());
}

#[tokio::test]
async fn places_are_limited_to_k_and_sorted_by_dwell() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    observe(&mut client, &tenant, &commute("car")).await;
    let top = client
        .get_places(GetPlacesRequest {
            tenant_id: tenant.clone(),
            device_id: "car".into(),
            k: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .places;
    assert_eq!(top.len(), 1);
    let all = places(&mut client, &tenant, "car").await;
    assert!(all[0].total_dwell_ms >= all[1].total_dwell_ms);
    assert_eq!(top[0], all[0]);
}

#[tokio::test]
async fn tenants_are_isolated() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let (one, two) = (testkit::unique("t"), testkit::unique("t"));
    observe(&mut client, &one, &commute("same-id")).await;
    assert!(places(&mut client, &two, "same-id").await.is_empty());
    let again = observe(&mut client, &two, &commute("same-id")).await;
    assert_eq!(
        again.ignored, 0,
        "another tenant's watermark does not apply"
    );
}

#[tokio::test]
async fn only_accepted_fixes_are_learned() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let mut fixes = commute("car");
    let mut rejected = accepted("car", MONDAY + 5, (91.0, 0.0));
    rejected.verdict = Verdict::Invalid as i32;
    fixes.insert(3, rejected);
    let mut outlier = accepted("car", MONDAY + 6, (0.0, 0.0));
    outlier.verdict = Verdict::Speed as i32;
    fixes.insert(7, outlier);
    let response = observe(&mut client, &tenant, &fixes).await;
    assert_eq!(
        (response.observed, response.ignored),
        (fixes.len() as u32 - 2, 2)
    );
    assert_eq!(response.stays_closed, 2);
    assert_eq!(response.places_created, 2);
    // Sent again: all of it is seen already.
    let again = observe(&mut client, &tenant, &fixes).await;
    assert_eq!((again.observed, again.ignored), (0, fixes.len() as u32));
}

#[tokio::test]
async fn invalid_requests_name_the_field_and_apply_nothing() {
    let mut config = config(testkit::redis_standalone());
    config.service.max_batch = 100;
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let call = |tenant: &str, fixes: Vec<RefinedFix>| ObserveRequest {
        tenant_id: tenant.into(),
        fixes,
    };
    let err = client.observe(call("", commute("car"))).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("tenant_id:"), "{err:?}");

    let too_many = dwell("car", MONDAY, MONDAY + 101 * 5 * MINUTE_MS, HOME);
    let err = client.observe(call(&tenant, too_many)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("MAX_BATCH=100"), "{}", err.message());

    // A good device first, then a bad fix of another: nothing at all is learned.
    let good = commute("good");
    let spoil = |index: usize, change: &dyn Fn(&mut RefinedFix)| {
        let mut fixes = good[..50].to_vec();
        let mut bad = accepted("bad", MONDAY, HOME);
        change(&mut bad);
        fixes.insert(index, bad);
        fixes
    };
    for (fixes, expected) in [
        (
            spoil(7, &|f| f.fix.as_mut().unwrap().lat = 91.0),
            "fixes[7].fix.lat: 91 is outside -90..=90",
        ),
        (
            spoil(3, &|f| f.fix.as_mut().unwrap().lon = f64::NAN),
            "fixes[3].fix.lon: NaN is outside -180..=180",
        ),
        (
            spoil(0, &|f| f.fix.as_mut().unwrap().time_ms = 0),
            "fixes[0].fix.time_ms: required, Unix epoch milliseconds",
        ),
        (
            spoil(9, &|f| f.fix.as_mut().unwrap().device_id.clear()),
            "fixes[9].fix.device_id: required",
        ),
        (
            spoil(50, &|f| f.fix = None),
            "fixes[50].fix: required for an accepted fix",
        ),
    ] {
        let err = client.observe(call(&tenant, fixes)).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, expected)
        );
    }
    assert!(!profile(&mut client, &tenant, "good").await.found);

    let err = client
        .get_places(GetPlacesRequest {
            tenant_id: tenant.clone(),
            device_id: String::new(),
            k: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "device_id: required")
    );
    let err = client
        .predict_next(PredictNextRequest {
            tenant_id: "no/slash".into(),
            device_id: "car".into(),
            k: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .forget(ForgetRequest {
            tenant_id: tenant.clone(),
            device_id: "a\nb".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn unreadable_model_is_an_internal_error() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let redis = Redis::connect(
        &testkit::redis_standalone().target(),
        Duration::from_secs(2),
    )
    .unwrap();
    let written = redis
        .write(&[Write {
            key: format!("tm:learn:{{{tenant}/broken}}"),
            expected: 0,
            data: vec![0xff; 7],
            ttl: Duration::from_secs(60),
            log: None,
        }])
        .await
        .unwrap();
    assert_eq!(written, [true]);
    let err = client
        .get_profile(GetProfileRequest {
            tenant_id: tenant.clone(),
            device_id: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("device broken"), "{err:?}");
    let err = client
        .observe(ObserveRequest {
            tenant_id: tenant.clone(),
            fixes: commute("broken"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    // Forgetting the device is the way out.
    let forgotten = client
        .forget(ForgetRequest {
            tenant_id: tenant.clone(),
            device_id: "broken".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(forgotten.existed);
    assert_eq!(
        observe(&mut client, &tenant, &commute("broken"))
            .await
            .stays_closed,
        2
    );
}

#[tokio::test]
async fn metrics_are_exported() {
    let (service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    observe(&mut client, &tenant, &commute("car")).await;
    let (status, body) = testkit::http_get(service.addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for name in [
        "learning_observe_duration_seconds_bucket",
        "learning_batch_size_bucket",
        "learning_fixes_total{result=\"observed\"}",
        "learning_stays_detected_total",
        "learning_trips_total",
        "learning_places_created_total",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn redis_restart_mid_run() {
    let (mut redis, redis_config) = testkit::private_redis();
    let (service, mut client) = start(config(redis_config)).await;
    service.wait_ready(200, Duration::from_secs(5)).await;
    let tenant = testkit::unique("t");
    let fixes = commute("car");
    observe(&mut client, &tenant, &fixes[..30]).await;

    let request = client.observe(ObserveRequest {
        tenant_id: tenant.clone(),
        fixes: fixes[30..60].to_vec(),
    });
    service
        .lose_redis(&mut redis, "trackmesh.v1.Learning", request)
        .await;
    let err = client
        .get_places(GetPlacesRequest {
            tenant_id: tenant.clone(),
            device_id: "car".into(),
            k: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    redis.restart();
    service.wait_ready(200, Duration::from_secs(10)).await;
    // Redis lost its memory (no persistence): the device is learned from scratch.
    let after = observe(&mut client, &tenant, &fixes[30..]).await;
    assert_eq!(after.observed as usize, fixes.len() - 30);
    assert_eq!(after.stays_closed, 1, "work; home was before the restart");
}

mod process {
    //! The `learning-api` binary itself: exit codes and signals.

    use super::*;

    #[test]
    fn bad_configuration_exits_64_with_one_line() {
        let cases = [
            (
                "STAY_RADIUS_M",
                "0",
                "STAY_RADIUS_M=0: out of range, allowed 1..=100000",
            ),
            (
                "STAY_MIN_DURATION",
                "banana",
                "STAY_MIN_DURATION=banana: not a duration",
            ),
            (
                "NIGHT_HOURS",
                "25-3",
                "NIGHT_HOURS=25-3: write hours as START-END",
            ),
            ("UTC_OFFSET", "+15:00", "UTC_OFFSET=+15:00: write an offset"),
            (
                "WORK_DAYS",
                "weekdays",
                "WORK_DAYS=weekdays: write days like",
            ),
            (
                "MAX_PLACES_PER_DEVICE",
                "0",
                "MAX_PLACES_PER_DEVICE=0: out of range, allowed 1..=1000",
            ),
            ("REDIS_ADDR", "redis://", "REDIS_ADDR=redis://:"),
        ];
        testkit::assert_bad_config_exits_64(
            std::path::Path::new(env!("CARGO_BIN_EXE_learning-api")),
            &[],
            &cases,
        );
    }

    #[tokio::test]
    async fn serves_until_sigterm() {
        let env = [
            ("REDIS_ADDR", testkit::redis_addr()),
            ("STAY_MIN_DURATION", "200m".into()),
        ];
        let mut process = testkit::Process::start("learning-api", &env).await;
        let mut client = LearningClient::connect(process.url()).await.unwrap();
        let tenant = testkit::unique("t");
        // STAY_MIN_DURATION=200m from the environment: the 4 h at work is a stay, the 3 h
        // at home before is not.
        let response = observe(&mut client, &tenant, &commute("car")).await;
        assert_eq!(response.stays_closed, 1);
        assert_eq!(response.stays[0].start_ms, MONDAY + 3 * HOUR_MS);
        process.terminate();
        assert_eq!(process.exit_code().await, Some(0));
    }
}

// ---- stays and trips on the events topic, and Rebuild

/// A learning-api with Kafka, its topics named after `name` (events: `{name}.events`).
fn kafka_config(name: &str) -> Config {
    let mut config = config(testkit::redis_standalone());
    let learning = &mut config.service;
    learning.kafka_brokers = Some(testkit::kafka_brokers());
    learning.kafka_topic = format!("{name}.fixes");
    learning.kafka_events_topic = format!("{name}.events");
    learning.kafka_geofences_topic = format!("{name}.geofences");
    learning.kafka_group_id = name.to_owned();
    learning.kafka_partitions = 1;
    config
}

/// The model, stays and trips learned offline from `fixes` (what the service must agree with).
fn offline(fixes: &[RefinedFix], rules: &Rules) -> (Model, Vec<Stay>, Vec<Trip>) {
    let points: Vec<Point> = fixes
        .iter()
        .filter_map(|f| f.fix.as_ref())
        .map(|f| Point {
            time_ms: f.time_ms,
            lat: f.lat,
            lon: f.lon,
        })
        .collect();
    let device = &fixes[0].fix.as_ref().unwrap().device_id;
    let mut model = Model::default();
    let outcome = model::observe(&mut model, &points, rules);
    let stays = outcome
        .stays
        .iter()
        .map(|s| Stay::from(s.to_stay(device)))
        .collect();
    let trips = outcome
        .trips
        .iter()
        .map(|t| Trip::from(t.to_trip(device)))
        .collect();
    (model, stays, trips)
}

/// The messages on `topic` by key, in order, once `enough` holds of them; then a second more,
/// so that a message too many shows.
async fn read_events(
    topic: &str,
    enough: impl Fn(&[(String, TenantEvents)]) -> bool,
) -> Vec<(String, TenantEvents)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", testkit::kafka_brokers())
        .set("group.id", testkit::unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut grace = None;
    loop {
        let until = grace.unwrap_or(deadline);
        let Ok(message) = tokio::time::timeout_at(until, consumer.recv()).await else {
            assert!(grace.is_some(), "not enough on {topic}: {messages:#?}");
            return messages;
        };
        let message = message.unwrap();
        let key = String::from_utf8(message.key().unwrap_or_default().to_vec()).unwrap();
        let value = TenantEvents::decode(message.payload().unwrap_or_default()).unwrap();
        messages.push((key, value));
        if grace.is_none() && enough(&messages) {
            grace = Some(tokio::time::Instant::now() + Duration::from_secs(1));
        }
    }
}

fn of_key<'a>(
    messages: &'a [(String, TenantEvents)],
    key: &'a str,
) -> impl Iterator<Item = &'a TenantEvents> {
    messages
        .iter()
        .filter(move |(k, _)| k == key)
        .map(|(_, m)| m)
}

fn stays_of(messages: &[(String, TenantEvents)], key: &str) -> Vec<Stay> {
    of_key(messages, key)
        .flat_map(|m| m.stays.clone())
        .map(Stay::from)
        .collect()
}

fn trips_of(messages: &[(String, TenantEvents)], key: &str) -> Vec<Trip> {
    of_key(messages, key)
        .flat_map(|m| m.trips.clone())
        .map(Trip::from)
        .collect()
}

#[tokio::test]
async fn observe_sends_stays_and_trips_with_the_events_once() {
    let name = testkit::unique("learn");
    let config = kafka_config(&name);
    let rules = config.service.rules();
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    let fixes = Week::new("phone", 3).generate();
    let (_, stays, trips) = offline(&fixes, &rules);
    assert!(
        trips.len() >= 10 && trips.len() + 1 == stays.len(),
        "{trips:?}"
    );

    let mut answered = Vec::new();
    for batch in shuffled_batches(&fixes, 500, 5) {
        answered.extend(observe(&mut client, &tenant, &batch).await.stays);
    }
    assert_eq!(answered, stays);
    // A client retrying: nothing new is learned, nothing goes out again.
    for batch in fixes.chunks(1_000) {
        assert_eq!(observe(&mut client, &tenant, batch).await.observed, 0);
    }

    let key = format!("{tenant}/phone");
    let messages = read_events(&format!("{name}.events"), |m| {
        stays_of(m, &key).len() >= stays.len() && trips_of(m, &key).len() >= trips.len()
    })
    .await;
    assert_eq!(stays_of(&messages, &key), stays);
    assert_eq!(trips_of(&messages, &key), trips);
    for (_, message) in &messages {
        assert_eq!(message.tenant_id, tenant);
        // A trip ends where a stay starts: the stay that closed it, in the same message.
        for trip in &message.trips {
            assert!(
                message.stays.iter().any(|s| s.start_ms == trip.end_ms),
                "{message:?}"
            );
        }
    }
    // The places' ARRIVE/DEPART travel in the same messages.
    assert!(of_key(&messages, &key).any(|m| !m.events.is_empty() && !m.stays.is_empty()));
}

/// A Rebuild call in progress.
struct Rebuilding {
    requests: mpsc::UnboundedSender<RebuildRequest>,
    replies: tonic::Streaming<RebuildReply>,
}

impl Rebuilding {
    async fn start(client: &mut Client, tenant: &str, device: &str) -> Self {
        let (requests, inbound) = mpsc::unbounded();
        requests
            .unbounded_send(RebuildRequest {
                tenant_id: tenant.into(),
                device_id: device.into(),
                ..RebuildRequest::default()
            })
            .unwrap();
        let replies = client.rebuild(inbound).await.unwrap().into_inner();
        Self { requests, replies }
    }

    fn send(&self, request: RebuildRequest) {
        self.requests.unbounded_send(request).unwrap();
    }

    /// Sends `fixes` in chunks of `chunk` and reads a progress reply for each.
    async fn feed(&mut self, fixes: &[RefinedFix], chunk: usize) -> Vec<RebuildReply> {
        let mut progress = Vec::new();
        for part in fixes.chunks(chunk) {
            self.send(RebuildRequest {
                fixes: part.to_vec(),
                ..RebuildRequest::default()
            });
            let reply = self.replies.message().await.unwrap().expect("progress");
            assert!(!reply.replaced && reply.need_after_ms == 0, "{reply:?}");
            progress.push(reply);
        }
        progress
    }

    async fn done(&mut self, force: bool) -> RebuildReply {
        self.send(RebuildRequest {
            done: true,
            force,
            ..RebuildRequest::default()
        });
        self.replies
            .message()
            .await
            .unwrap()
            .expect("an answer to done")
    }

    /// The error the call ends with.
    async fn error(mut self) -> tonic::Status {
        loop {
            match self.replies.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the rebuild ended without an error"),
                Err(status) => return status,
            }
        }
    }
}

fn redis() -> Redis {
    Redis::connect(
        &testkit::redis_standalone().target(),
        Duration::from_secs(2),
    )
    .unwrap()
}

/// The stored model of a device and its version (0: none).
async fn stored(tenant: &str, device: &str) -> (u64, Model) {
    let value = redis()
        .read(&[format!("tm:learn:{{{tenant}/{device}}}")])
        .await
        .unwrap()
        .pop()
        .unwrap();
    let model = value
        .data
        .map(|data| Model::decode(data.as_slice()).unwrap())
        .unwrap_or_default();
    (value.version, model)
}

fn last_time(fixes: &[RefinedFix]) -> i64 {
    fixes.last().unwrap().fix.as_ref().unwrap().time_ms
}

#[tokio::test]
async fn rebuild_from_the_observed_fixes_gives_the_observed_model() {
    let name = testkit::unique("rebuild");
    let config = kafka_config(&name);
    let rules = config.service.rules();
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    // The same week for two devices: one learned online, one rebuilt.
    let online = Week::new("online", 4).generate();
    let rebuilt = Week::new("rebuilt", 4).generate();
    for batch in shuffled_batches(&online, 500, 9) {
        observe(&mut client, &tenant, &batch).await;
    }
    let (_, observed) = stored(&tenant, "online").await;
    assert!(observed.places.len() >= 3 && observed.trip.is_some());
    // The device being rebuilt has a model of one fix, already at the newest time, with a
    // place the rebuild will not find; what carries over: inside a geofence, and at home
    // with ARRIVE sent (Kafka on: places events are evaluated online, not in a rebuild).
    assert_ne!(observed.candidate.as_ref().unwrap().arrived_place, 0);
    let mut current = Model {
        watermark_ms: last_time(&rebuilt),
        fixes_observed: 1,
        candidate: observed.candidate.clone(),
        places: observed.places[..1].to_vec(),
        fences: vec![FenceState {
            fence_id: "gf-1".into(),
            inside: true,
            pending_since_ms: 0,
        }],
        ..Model::default()
    };
    current.places[0].lat += 1.0;
    let written = redis()
        .write(&[Write {
            key: format!("tm:learn:{{{tenant}/rebuilt}}"),
            expected: 0,
            data: current.encode_to_vec(),
            ttl: Duration::from_secs(600),
            log: None,
        }])
        .await
        .unwrap();
    assert_eq!(written, [true]);

    let mut call = Rebuilding::start(&mut client, &tenant, "rebuilt").await;
    let progress = call.feed(&rebuilt, 700).await;
    assert_eq!(progress.len(), rebuilt.len().div_ceil(700));
    assert_eq!(progress[0].fixes, 700);
    assert!(progress.windows(2).all(|w| w[0].stays <= w[1].stays));
    let reply = call.done(false).await;
    assert!(reply.replaced, "{reply:?}");
    assert_eq!(
        (reply.places_before, reply.places_after),
        (1, observed.places.len() as u32)
    );
    assert_eq!(
        (reply.fixes, reply.stays),
        (rebuilt.len() as u64, observed.stays)
    );
    assert!(
        call.replies.message().await.unwrap().is_none(),
        "ends once replaced"
    );

    // Everything as learned online, the fences carried over.
    let (_, model) = stored(&tenant, "rebuilt").await;
    let expected = Model {
        fences: current.fences.clone(),
        ..observed
    };
    assert_eq!(model, expected);

    // Its stays and trips went out as the online device's did, without events.
    let (_, stays, trips) = offline(&rebuilt, &rules);
    let key = format!("{tenant}/rebuilt");
    let messages = read_events(&format!("{name}.events"), |m| {
        stays_of(m, &key).len() >= stays.len() && trips_of(m, &key).len() >= trips.len()
    })
    .await;
    assert_eq!(stays_of(&messages, &key), stays);
    assert_eq!(trips_of(&messages, &key), trips);
    assert!(of_key(&messages, &key).all(|m| m.events.is_empty()));
}

#[tokio::test]
async fn rebuild_behind_the_model_asks_for_the_newer_fixes() {
    // Without Kafka: nothing to send stays to, the rebuild works the same.
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let fixes = Week::new("phone", 5).generate();
    for batch in fixes.chunks(1_000) {
        observe(&mut client, &tenant, batch).await;
    }
    let (version, observed) = stored(&tenant, "phone").await;
    let split = fixes.len() - 10;

    let mut call = Rebuilding::start(&mut client, &tenant, "phone").await;
    call.feed(&fixes[..split], 1_000).await;
    let reply = call.done(false).await;
    assert!(!reply.replaced);
    assert_eq!(reply.need_after_ms, last_time(&fixes[..split]));
    assert_eq!(reply.fixes, split as u64);
    assert_eq!(stored(&tenant, "phone").await.0, version, "not replaced");

    call.feed(&fixes[split..], 1_000).await;
    let reply = call.done(false).await;
    assert!(reply.replaced, "{reply:?}");
    let (after, model) = stored(&tenant, "phone").await;
    assert!(after > version);
    assert_eq!(model, observed);
}

#[tokio::test]
async fn forced_rebuild_replaces_a_model_that_saw_newer_fixes() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let fixes = Week::new("phone", 6).generate();
    for batch in fixes.chunks(1_000) {
        observe(&mut client, &tenant, batch).await;
    }
    let (_, observed) = stored(&tenant, "phone").await;
    let half = &fixes[..fixes.len() / 2];

    let mut call = Rebuilding::start(&mut client, &tenant, "phone").await;
    call.feed(half, 1_000).await;
    assert_eq!(call.done(false).await.need_after_ms, last_time(half));
    let reply = call.done(true).await;
    assert!(reply.replaced, "{reply:?}");
    assert_eq!(reply.places_before, observed.places.len() as u32);
    let (_, model) = stored(&tenant, "phone").await;
    assert_eq!(
        (model.watermark_ms, model.fixes_observed),
        (last_time(half), half.len() as u64)
    );
    // Newer fixes are learned again after it.
    let response = observe(&mut client, &tenant, &fixes[half.len()..]).await;
    assert_eq!(response.observed as usize, fixes.len() - half.len());
    assert_eq!(stored(&tenant, "phone").await.1, observed);
}

#[tokio::test]
async fn bad_rebuild_messages_name_the_field() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let expect = async |call: Rebuilding, field: &str| {
        let status = call.error().await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    };
    expect(
        Rebuilding::start(&mut client, "", "phone").await,
        "tenant_id",
    )
    .await;
    expect(
        Rebuilding::start(&mut client, "bad/tenant", "phone").await,
        "tenant_id",
    )
    .await;
    expect(
        Rebuilding::start(&mut client, &tenant, "").await,
        "device_id",
    )
    .await;

    let call = Rebuilding::start(&mut client, &tenant, "phone").await;
    call.send(RebuildRequest {
        device_id: "other".into(),
        ..RebuildRequest::default()
    });
    expect(call, "device_id").await;

    let call = Rebuilding::start(&mut client, &tenant, "phone").await;
    call.send(RebuildRequest {
        fixes: vec![accepted("other", MONDAY, HOME)],
        ..RebuildRequest::default()
    });
    expect(call, "fixes").await;

    let call = Rebuilding::start(&mut client, &tenant, "phone").await;
    call.send(RebuildRequest {
        fixes: vec![accepted("phone", MONDAY, (95.0, 0.0))],
        ..RebuildRequest::default()
    });
    expect(call, "fixes[0].fix.lat").await;
    assert_eq!(stored(&tenant, "phone").await.0, 0, "nothing written");

    // Fixes not accepted are skipped; a client gone before done writes nothing.
    let mut call = Rebuilding::start(&mut client, &tenant, "phone").await;
    let mut fixes = commute("phone");
    fixes[0].verdict = Verdict::Speed as i32;
    let progress = call.feed(&fixes, 100).await;
    assert_eq!(progress[0].fixes, fixes.len() as u64 - 1);
    drop(call);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(stored(&tenant, "phone").await.0, 0, "nothing written");
}
