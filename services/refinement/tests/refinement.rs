//! refinement-api against real Redis (standalone and a 3-node Cluster) started by scripts/test.

use std::time::Duration;

use refinement::{Config, run};
use testkit::Service;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;
use trackmesh_proto::v1::{
    Fix, GetDeviceStateRequest, RefineRequest, RefineResponse, RefinedFix, ResetDeviceRequest,
    SeedRequest, SeedResponse, Verdict, refinement_client::RefinementClient,
};
use trackmesh_shared::{
    config::Duration as ConfigDuration,
    redis::{Log, LogRange, Redis, RedisConfig, Write},
};

const T0: i64 = 1_750_000_000_000;

fn config(redis: RedisConfig) -> Config {
    let mut config = Config::for_redis(redis);
    config.common.readiness_interval = ConfigDuration::from_millis(100);
    config
}

async fn start(config: Config) -> (Service, Client) {
    let service = Service::spawn(|listener, shutdown| run(config, listener, shutdown)).await;
    let client = RefinementClient::connect(service.url()).await.unwrap();
    (service, client)
}

/// A vessel moving ~10 m every 10 s from a start point.
fn track(device: &str, n: usize, start_ms: i64) -> Vec<Fix> {
    (0..n)
        .map(|i| Fix {
            device_id: device.into(),
            time_ms: start_ms + i as i64 * 10_000,
            lat: 40.6 + i as f64 * 0.0001,
            lon: -74.0,
            ..Fix::default()
        })
        .collect()
}

type Client = RefinementClient<Channel>;

async fn refine(client: &mut Client, tenant: &str, fixes: &[Fix]) -> RefineResponse {
    let (tenant_id, fixes) = (tenant.into(), fixes.to_vec());
    let request = RefineRequest { tenant_id, fixes };
    client.refine(request).await.unwrap().into_inner()
}

fn verdicts(results: &[RefinedFix]) -> Vec<Verdict> {
    results.iter().map(RefinedFix::verdict).collect()
}

async fn accepted_count(client: &mut Client, tenant: &str, device: &str) -> (bool, u64) {
    let state = client
        .get_device_state(GetDeviceStateRequest {
            tenant_id: tenant.into(),
            device_id: device.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (state.found, state.accepted_count)
}

testkit::on_both_redis!(
    verdicts_in_input_order,
    replay_after_lost_response,
    concurrent_replicas_agree_with_serial,
    state_expires,
    reset_forgets_the_device,
    a_retried_max_batch_of_one_device_is_replayed_whole,
    a_retried_reanchor_stores_its_run,
    replay_logs_are_read_by_range,
    seed_anchors_devices_without_state,
    concurrent_seeds_of_a_device_seed_it_once
);

async fn verdicts_in_input_order(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let mut fixes = track("a", 3, T0);
    fixes.insert(
        1,
        Fix {
            device_id: "b".into(),
            time_ms: T0,
            lat: 0.0,
            lon: 0.0,
            ..Fix::default()
        },
    );
    fixes.push(Fix {
        device_id: "b".into(),
        time_ms: T0 + 1,
        lat: 91.0,
        lon: 0.0,
        ..Fix::default()
    });
    fixes.push(Fix {
        device_id: "a".into(),
        time_ms: T0 + 15_000,
        lat: 41.6,
        lon: -74.0,
        ..Fix::default()
    });
    fixes.push(Fix {
        device_id: "c".into(),
        time_ms: T0 + 3_600_000 * 24 * 365 * 30,
        lat: 1.0,
        lon: 1.0,
        ..Fix::default()
    });
    let response = refine(&mut client, &tenant, &fixes).await;
    assert_eq!(
        verdicts(&response.results),
        [
            Verdict::Accepted,
            Verdict::NullIsland,
            Verdict::Accepted,
            Verdict::Accepted,
            Verdict::Invalid,
            Verdict::Speed,
            Verdict::Future,
        ]
    );
    assert_eq!(response.results[1].fix.as_ref().unwrap().device_id, "b");
    assert_eq!(response.results[3].dt_ms, 10_000);
    assert!(response.results[4].detail.starts_with("lat:"));
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (true, 3));
    assert_eq!(accepted_count(&mut client, &tenant, "b").await, (false, 0));
}

async fn replay_after_lost_response(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let fixes: Vec<Fix> = ["a", "b"].iter().flat_map(|d| track(d, 50, T0)).collect();
    let first = refine(&mut client, &tenant, &fixes[..60]).await;
    let second = refine(&mut client, &tenant, &fixes[60..]).await;
    assert!(
        first
            .results
            .iter()
            .chain(&second.results)
            .all(|r| r.verdict() == Verdict::Accepted && !r.replay)
    );

    // The answer to the first batch was "lost": the client sends it again, much later.
    let retry = refine(&mut client, &tenant, &fixes[..60]).await;
    for (original, again) in first.results.iter().zip(&retry.results) {
        assert_eq!(again.verdict(), Verdict::Accepted);
        assert!(again.replay);
        assert_eq!(
            (again.segment, again.dt_ms, again.distance_m.to_bits()),
            (
                original.segment,
                original.dt_ms,
                original.distance_m.to_bits()
            )
        );
    }
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (true, 50));
    // A fix that was never accepted stays out of order.
    let mut stranger = fixes[3].clone();
    stranger.lat += 0.5;
    let answer = refine(&mut client, &tenant, &[stranger]).await;
    assert_eq!(verdicts(&answer.results), [Verdict::OutOfOrder]);
}

async fn a_retried_max_batch_of_one_device_is_replayed_whole(redis: RedisConfig) {
    // A whole MAX_BATCH of one device, ten times REPLAY_HISTORY: if its answer is lost
    // (storage failed), the retry must find every fix again, or 9 000 accepted fixes are lost.
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let fixes = track("4b1c9a3e-5f7d-4e2a-9c1b-2d3e4f5a6b7c", 10_000, T0);
    let first = refine(&mut client, &tenant, &fixes).await;
    assert!(
        first
            .results
            .iter()
            .all(|r| r.verdict() == Verdict::Accepted && !r.replay)
    );
    let retry = refine(&mut client, &tenant, &fixes).await;
    let replays = retry
        .results
        .iter()
        .filter(|r| r.verdict() == Verdict::Accepted && r.replay)
        .count();
    assert_eq!(replays, 10_000, "{:?}", verdicts(&retry.results[..3]));
    // The next batch trims the log back to REPLAY_HISTORY.
    let next = refine(
        &mut client,
        &tenant,
        &track(&fixes[0].device_id, 10_001, T0)[10_000..],
    )
    .await;
    assert_eq!(verdicts(&next.results), [Verdict::Accepted]);
    let old = refine(&mut client, &tenant, &fixes[..1]).await;
    assert_eq!(verdicts(&old.results), [Verdict::OutOfOrder]);
}

async fn a_retried_reanchor_stores_its_run(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let at = |time_ms: i64, lat: f64| Fix {
        device_id: "a".into(),
        time_ms,
        lat,
        lon: 13.0,
        ..Fix::default()
    };
    // A bad first fix; then the real track, one fix per call, answered SPEED until the
    // third re-anchors on them.
    refine(&mut client, &tenant, &[at(T0, 10.0)]).await;
    let run = [
        at(T0 + 60_000, 52.0),
        at(T0 + 120_000, 52.001),
        at(T0 + 180_000, 52.002),
    ];
    for fix in &run[..2] {
        let answer = refine(&mut client, &tenant, std::slice::from_ref(fix)).await;
        assert_eq!(verdicts(&answer.results), [Verdict::Speed]);
    }
    let completing = refine(&mut client, &tenant, &run[2..]).await;
    assert_eq!(completing.recovered.len(), 2);
    // That answer is lost (storage was down): the retry must bring the run back, or the two
    // recovered fixes are never stored.
    let retry = refine(&mut client, &tenant, &run[2..]).await;
    assert!(retry.results[0].replay);
    let times = |fixes: &[RefinedFix]| -> Vec<i64> {
        fixes
            .iter()
            .map(|r| r.fix.as_ref().unwrap().time_ms)
            .collect()
    };
    assert_eq!(times(&retry.recovered), times(&completing.recovered));
    assert!(
        retry
            .recovered
            .iter()
            .all(|r| r.replay && r.verdict() == Verdict::Accepted)
    );
}

async fn replay_logs_are_read_by_range(redis_config: RedisConfig) {
    // A retry storm must cost what is re-sent, not whole logs: only the records in the
    // asked time range leave Redis.
    let redis = Redis::connect(&redis_config.target(), Duration::from_secs(2)).unwrap();
    let key = format!("tm:test-log:{{{}}}", testkit::unique("d"));
    const SIZE: usize = 45;
    let mut log = Vec::new();
    for i in 0..10_000_i64 {
        let mut record = (T0 + i * 1_000).to_le_bytes().to_vec();
        record.resize(SIZE, u8::try_from(i % 251).unwrap());
        log.extend(record);
    }
    let write = Write {
        key: format!("{key}:state"),
        expected: 0,
        data: b"s".to_vec(),
        ttl: Duration::from_secs(60),
        log: Some(Log {
            key: key.clone(),
            append: log.clone(),
            max_bytes: 1_000 * SIZE,
        }),
    };
    assert_eq!(redis.write(&[write]).await.unwrap(), [true]);
    let range = |from: i64, to: i64| LogRange {
        key: key.clone(),
        record_size: SIZE,
        from,
        to,
    };
    let read = redis
        .log_ranges(&[
            range(T0 + 4_000_000, T0 + 4_002_000),
            range(T0 + 4_000_500, T0 + 4_000_900),
            range(T0 - 5_000, T0),
            range(T0 + 9_999_000, i64::from(i32::MAX) * 1_000),
            range(0, T0 - 1),
            LogRange {
                key: format!("{key}:absent"),
                ..range(0, i64::MAX / 2)
            },
        ])
        .await
        .unwrap();
    // The whole batch of 10 000 stays although REPLAY_HISTORY is 1 000.
    assert_eq!(read[0], log[4_000 * SIZE..4_003 * SIZE]);
    assert!(read[1].is_empty(), "no record between two fixes");
    assert_eq!(read[2], log[..SIZE]);
    assert_eq!(read[3], log[9_999 * SIZE..]);
    assert!(read[4].is_empty());
    assert!(read[5].is_empty());
}

async fn concurrent_replicas_agree_with_serial(redis: RedisConfig) {
    // Two replicas; two clients send the same stream for the same devices at the same time,
    // as a retrying client talking to both would. Serially, each fix is accepted once and
    // replayed once; lost updates would accept some twice or lose the count.
    let (_one, client_one) = start(config(redis.clone())).await;
    let (_two, client_two) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let devices: Vec<String> = (0..10).map(|d| format!("vessel-{d}")).collect();
    let batches: Vec<Vec<Fix>> = (0..20)
        .map(|b| {
            devices
                .iter()
                .flat_map(|d| track(d, 200, T0)[b * 10..(b + 1) * 10].to_vec())
                .collect()
        })
        .collect();
    let send = |mut client: Client, batches: Vec<Vec<Fix>>, tenant: String| async move {
        let mut results = Vec::new();
        for batch in batches {
            results.extend(refine(&mut client, &tenant, &batch).await.results);
        }
        results
    };
    let (a, b) = tokio::join!(
        tokio::spawn(send(client_one.clone(), batches.clone(), tenant.clone())),
        tokio::spawn(send(client_two, batches, tenant.clone())),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.len(), 2000);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.verdict(), Verdict::Accepted, "{x:?}");
        assert_eq!(y.verdict(), Verdict::Accepted, "{y:?}");
        assert!(
            x.replay != y.replay,
            "exactly one of the two is the first acceptance: {x:?} {y:?}"
        );
        assert_eq!((x.segment, x.dt_ms), (y.segment, y.dt_ms));
    }
    let mut client = client_one;
    for device in &devices {
        assert_eq!(
            accepted_count(&mut client, &tenant, device).await,
            (true, 200)
        );
    }
}

async fn state_expires(redis: RedisConfig) {
    let mut config = config(redis);
    config.service.state_ttl = ConfigDuration::from_secs(1);
    let (_service, mut client) = start(config).await;
    let tenant = testkit::unique("t");
    refine(&mut client, &tenant, &track("a", 5, T0)).await;
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (true, 5));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (false, 0));
    // Expired means forgotten: an older fix is new again.
    let again = refine(&mut client, &tenant, &track("a", 1, T0)).await;
    assert_eq!(verdicts(&again.results), [Verdict::Accepted]);
    assert!(!again.results[0].replay);
}

async fn reset_forgets_the_device(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    refine(&mut client, &tenant, &track("a", 5, T0)).await;
    let reset = |existed| ResetDeviceRequest {
        tenant_id: tenant.clone(),
        device_id: existed,
    };
    assert!(
        client
            .reset_device(reset("a".into()))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !client
            .reset_device(reset("a".into()))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (false, 0));
}

/// A device's last stored fix, as storage returns it.
fn stored(device: &str, time_ms: i64, lat: f64, segment: u32) -> RefinedFix {
    RefinedFix {
        fix: Some(Fix {
            device_id: device.into(),
            time_ms,
            lat,
            lon: -74.0,
            ..Fix::default()
        }),
        verdict: Verdict::Accepted as i32,
        segment,
        distance_m: 11.1,
        dt_ms: 10_000,
        speed_kmh: 4.0,
        ..RefinedFix::default()
    }
}

async fn seed(
    client: &mut Client,
    tenant: &str,
    fixes: Vec<RefinedFix>,
) -> Result<SeedResponse, tonic::Status> {
    client
        .seed(SeedRequest {
            tenant_id: tenant.into(),
            fixes,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn seed_anchors_devices_without_state(redis: RedisConfig) {
    let (_service, mut client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    // "b" has state, last accepted at T0 + 20 s; "a" has none (its state was lost).
    refine(&mut client, &tenant, &track("b", 3, T0)).await;
    let answer = seed(
        &mut client,
        &tenant,
        vec![
            stored("a", T0 + 100_000, 40.6, 3),
            stored("b", T0 + 1_000_000, 41.0, 7),
        ],
    )
    .await
    .unwrap();
    assert_eq!((answer.seeded, answer.kept), (1, 1));

    // A late fix older than the seeded one is out of order again, not accepted as new.
    let late = refine(&mut client, &tenant, &track("a", 1, T0 + 50_000)).await;
    assert_eq!(verdicts(&late.results), [Verdict::OutOfOrder]);
    // The next one continues from the seed: its segment, distance and time from it.
    let next = Fix {
        device_id: "a".into(),
        time_ms: T0 + 110_000,
        lat: 40.6001,
        lon: -74.0,
        ..Fix::default()
    };
    let answer = refine(&mut client, &tenant, &[next]).await;
    let result = &answer.results[0];
    assert_eq!(verdicts(&answer.results), [Verdict::Accepted]);
    assert!(!result.replay);
    assert_eq!((result.segment, result.dt_ms), (3, 10_000));
    assert!((result.distance_m - 11.12).abs() < 0.05, "{result:?}");
    assert!((result.speed_kmh - 4.0).abs() < 0.05, "{result:?}");
    // The seeded fix re-sent is a replay of it.
    let again = refine(&mut client, &tenant, &track("a", 1, T0 + 100_000)).await;
    assert_eq!(verdicts(&again.results), [Verdict::Accepted]);
    assert!(again.results[0].replay);

    // "b" kept its own state: T0 + 30 s is its next fix, not older than a seed at T0 + 1000 s.
    let state = client
        .get_device_state(GetDeviceStateRequest {
            tenant_id: tenant.clone(),
            device_id: "b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.accepted_count, 3);
    assert_eq!(
        state.last_accepted.unwrap().fix.unwrap().time_ms,
        T0 + 20_000
    );
    let b = refine(&mut client, &tenant, &track("b", 4, T0)[3..]).await;
    assert_eq!(verdicts(&b.results), [Verdict::Accepted]);

    // Seeding again changes nothing: "a" has state now.
    let answer = seed(
        &mut client,
        &tenant,
        vec![stored("a", T0 + 500_000, 40.7, 9)],
    )
    .await
    .unwrap();
    assert_eq!((answer.seeded, answer.kept), (0, 1));
    // The seed counts no accepted fix of its own: one accepted since.
    assert_eq!(accepted_count(&mut client, &tenant, "a").await, (true, 1));
    let later = refine(&mut client, &tenant, &track("a", 1, T0 + 120_000)).await;
    assert_eq!(verdicts(&later.results), [Verdict::Accepted]);
}

async fn concurrent_seeds_of_a_device_seed_it_once(redis: RedisConfig) {
    // Gateways reseeding at the same time: each device is seeded by one of them, the others
    // count it as kept (the compare-and-set on "no state" decides).
    let (_service, client) = start(config(redis)).await;
    let tenant = testkit::unique("t");
    let devices: Vec<String> = (0..20).map(|d| format!("d{d}")).collect();
    let calls: Vec<_> = (0..8)
        .map(|call| {
            let (mut client, tenant) = (client.clone(), tenant.clone());
            let fixes: Vec<RefinedFix> = devices
                .iter()
                .map(|d| stored(d, T0 + call * 1_000, 40.6, 1))
                .collect();
            tokio::spawn(async move { seed(&mut client, &tenant, fixes).await.unwrap() })
        })
        .collect();
    let (mut seeded, mut kept) = (0, 0);
    for call in calls {
        let answer = call.await.unwrap();
        seeded += answer.seeded;
        kept += answer.kept;
    }
    assert_eq!((seeded, kept), (20, 7 * 20));
}

#[tokio::test]
async fn seed_checks_the_whole_request_before_writing() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let tenant = testkit::unique("t");
    let good = || stored("x", T0, 40.6, 1);
    let cases: Vec<(&str, Vec<RefinedFix>, &str)> = vec![
        (
            "",
            vec![good()],
            "tenant_id: required, 1 to 64 characters of A-Z a-z 0-9 _ . -",
        ),
        (
            &tenant,
            vec![good(), RefinedFix::default()],
            "fixes[1].fix: required",
        ),
        (
            &tenant,
            vec![good(), stored("", T0, 40.6, 1)],
            "fixes[1].fix.device_id: required",
        ),
        (
            &tenant,
            vec![
                good(),
                stored("y", T0, 40.6, 1),
                stored("x", T0 + 1, 40.6, 1),
            ],
            "fixes[2].fix.device_id: at most one fix per device, fixes[0] has the same device",
        ),
        (
            &tenant,
            vec![
                good(),
                RefinedFix {
                    verdict: Verdict::Speed as i32,
                    ..stored("y", T0, 40.6, 1)
                },
            ],
            "fixes[1].verdict: must be ACCEPTED, a device is anchored on an accepted fix only",
        ),
        (
            &tenant,
            vec![good(), stored("y", T0, 91.0, 1)],
            "fixes[1].fix.lat: 91 is outside -90..=90",
        ),
        (
            &tenant,
            vec![good(), stored("y", 0, 40.6, 1)],
            "fixes[1].fix.time_ms: required, Unix epoch milliseconds",
        ),
    ];
    for (tenant, fixes, message) in cases {
        let err = seed(&mut client, tenant, fixes).await.unwrap_err();
        assert_eq!(
            (err.code(), err.message()),
            (Code::InvalidArgument, message)
        );
    }
    // None of the refused requests wrote its valid part.
    assert_eq!(accepted_count(&mut client, &tenant, "x").await, (false, 0));
    let answer = seed(&mut client, &tenant, vec![]).await.unwrap();
    assert_eq!((answer.seeded, answer.kept), (0, 0));
}

#[tokio::test]
async fn tenants_are_isolated() {
    let (_service, mut client) = start(config(testkit::redis_standalone())).await;
    let (one, two) = (testkit::unique("t"), testkit::unique("t"));
    refine(&mut client, &one, &track("same-id", 5, T0)).await;
    let other = refine(&mut client, &two, &track("same-id", 1, T0)).await;
    assert!(!other.results[0].replay);
    assert_eq!(
        accepted_count(&mut client, &two, "same-id").await,
        (true, 1)
    );
}

#[tokio::test]
async fn invalid_requests_name_the_field() {
    let mut config = config(testkit::redis_standalone());
    config.service.max_batch = 10;
    let (_service, mut client) = start(config).await;
    let call = |tenant: &str, fixes: Vec<Fix>| RefineRequest {
        tenant_id: tenant.into(),
        fixes,
    };
    let err = client
        .refine(call("", track("a", 1, T0)))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message().starts_with("tenant_id:")),
        (Code::InvalidArgument, true),
        "{err:?}"
    );
    let err = client
        .refine(call("t", track("a", 11, T0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("MAX_BATCH=10"), "{}", err.message());
    let mut fixes = track("a", 3, T0);
    fixes[2].device_id.clear();
    let err = client.refine(call("t", fixes)).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, "fixes[2].device_id: required")
    );
    let err = client
        .get_device_state(GetDeviceStateRequest {
            tenant_id: "t".into(),
            device_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn redis_restart_mid_run() {
    let (mut redis, redis_config) = testkit::private_redis();
    let (service, mut client) = start(config(redis_config)).await;
    service.wait_ready(200, Duration::from_secs(5)).await;
    let tenant = testkit::unique("t");
    let fixes = track("a", 30, T0);
    refine(&mut client, &tenant, &fixes[..10]).await;

    let request = client.refine(RefineRequest {
        tenant_id: tenant.clone(),
        fixes: fixes[10..20].to_vec(),
    });
    service
        .lose_redis(&mut redis, "trackmesh.v1.Refinement", request)
        .await;
    redis.restart();
    service.wait_ready(200, Duration::from_secs(10)).await;
    assert_eq!(service.grpc_health("").await, ServingStatus::Serving);
    // Redis lost its memory (no persistence): the device starts over, nothing is rejected.
    let after = refine(&mut client, &tenant, &fixes[10..20]).await;
    assert!(
        after
            .results
            .iter()
            .all(|r| r.verdict() == Verdict::Accepted)
    );
}

mod process {
    //! The `refinement-api` binary itself: exit codes and signals.

    use super::*;

    #[test]
    fn bad_configuration_exits_64_with_one_line() {
        testkit::assert_bad_config_exits_64(
            std::path::Path::new(env!("CARGO_BIN_EXE_refinement-api")),
            &[],
            &[
                (
                    "MAX_SPEED_KMH",
                    "-1",
                    "MAX_SPEED_KMH=-1: out of range, allowed 1..=100000",
                ),
                (
                    "MAX_TIME_DIFF",
                    "banana",
                    "MAX_TIME_DIFF=banana: not a duration",
                ),
                (
                    "SERVER_PORT",
                    "70000",
                    "SERVER_PORT=70000: out of range, allowed 1..=65535",
                ),
                ("REDIS_ADDR", "redis://", "REDIS_ADDR=redis://:"),
            ],
        );
    }

    #[tokio::test]
    async fn sigterm_lets_in_flight_requests_finish() {
        let env = [
            ("REDIS_ADDR", testkit::redis_addr()),
            ("SHUTDOWN_GRACE", "30s".into()),
        ];
        let mut process = testkit::Process::start("refinement-api", &env).await;
        let client = RefinementClient::connect(process.url()).await.unwrap();
        let tenant = testkit::unique("t");

        // Many large batches at once, so that most are still in flight when the signal comes.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        for batch in 0..16 {
            let (mut client, tenant, done) = (client.clone(), tenant.clone(), done_tx.clone());
            let fixes: Vec<Fix> = (0..50)
                .flat_map(|d| track(&format!("{batch}-{d}"), 200, T0))
                .collect();
            tokio::spawn(async move {
                let result = client
                    .refine(RefineRequest {
                        tenant_id: tenant,
                        fixes,
                    })
                    .await;
                let _ = done.send(result.map(|r| r.into_inner().results.len()));
            });
        }
        drop(done_tx);
        let first = done_rx.recv().await.unwrap();
        assert_eq!(first.unwrap(), 10_000);
        process.terminate();

        let mut after_signal = 0;
        while let Some(result) = done_rx.recv().await {
            assert_eq!(result.expect("in-flight request completes"), 10_000);
            after_signal += 1;
        }
        assert!(
            after_signal > 0,
            "all requests had finished before the signal; the test proved nothing"
        );
        assert_eq!(process.exit_code().await, Some(0));
    }
}
