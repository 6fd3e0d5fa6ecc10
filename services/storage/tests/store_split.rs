//! Store splits a device's fixes into Kafka messages under `KAFKA_MESSAGE_MAX_BYTES`: against
//! the real tansu broker and ClickHouse, and the splitter itself as a property.

mod common;

use std::time::Duration;

use common::start;
use futures::StreamExt as _;
use proptest::prelude::*;
use prost::Message as _;
use storage::{Config, pack, partition_of, split_batch};
use tonic::{Code, transport::Channel};
use trackmesh_proto::v1::{
    DailyStatsRequest, Fix, QueryTrackRequest, RefinedFix, StoreRequest, Verdict,
    storage_client::StorageClient,
};
use trackmesh_shared::{
    config::Duration as ConfigDuration, domain::Refined, fix_messages::FixBatch,
};

const T0: i64 = 1_750_000_000_000;
/// A UUID, the longest device id seen in the field.
const UUID: &str = "7f3c2a9e-5b1d-4e8f-a6c0-2d9b8e1f4a7c";

/// A storage of its own whose Kafka messages stay under `message_max_bytes`.
fn config(message_max_bytes: u32) -> Config {
    let mut config = common::config();
    config.storage.kafka_message_max_bytes = message_max_bytes;
    config.storage.produce_timeout = ConfigDuration::from_secs(10);
    config
}

/// Accepted fixes one second apart with every optional field set: the largest a fix gets.
fn track(device: &str, n: usize) -> Vec<RefinedFix> {
    (0..n)
        .map(|i| RefinedFix {
            fix: Some(Fix {
                device_id: device.into(),
                time_ms: T0 + i as i64 * 1000,
                lat: 36.8 + i as f64 * 1e-5,
                lon: -76.3 - i as f64 * 1e-5,
                accuracy_m: Some(4.5),
                speed_mps: Some(1.2),
                heading_deg: Some(271.5),
                altitude_m: Some(12.25),
            }),
            verdict: Verdict::Accepted as i32,
            segment: 1,
            distance_m: if i == 0 { 0.0 } else { 1.4 },
            dt_ms: if i == 0 { 0 } else { 1000 },
            speed_kmh: 5.04,
            ..RefinedFix::default()
        })
        .collect()
}

/// Fixes as the fixes topic holds them.
fn stored(fixes: Vec<RefinedFix>) -> Vec<Refined> {
    fixes.into_iter().map(Into::into).collect()
}

fn times(fixes: &[RefinedFix]) -> Vec<i64> {
    fixes
        .iter()
        .map(|f| f.fix.as_ref().map_or(0, |fix| fix.time_ms))
        .collect()
}

async fn read_track(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    device: &str,
) -> Vec<RefinedFix> {
    let query = QueryTrackRequest {
        tenant_id: tenant.into(),
        device_id: device.into(),
        ..QueryTrackRequest::default()
    };
    let mut stream = client.query_track(query).await.unwrap().into_inner();
    let mut fixes = Vec::new();
    while let Some(chunk) = stream.next().await {
        fixes.extend(chunk.unwrap().fixes);
    }
    fixes
}

async fn daily_total(client: &mut StorageClient<Channel>, tenant: &str, device: &str) -> u64 {
    let request = DailyStatsRequest {
        tenant_id: tenant.into(),
        device_id: device.into(),
        ..DailyStatsRequest::default()
    };
    let days = client.daily_stats(request).await.unwrap().into_inner().days;
    days.iter().map(|d| d.fixes).sum()
}

/// Waits until every device has `n` rows, then checks each track is exactly `expected`.
async fn assert_stored(
    client: &mut StorageClient<Channel>,
    tenant: &str,
    expected: &[(&str, Vec<RefinedFix>)],
) {
    for (device, fixes) in expected {
        let mut read = Vec::new();
        testkit::wait_until(
            Duration::from_secs(60),
            &format!("{device}: not every fix reached ClickHouse"),
            async || {
                read = read_track(client, tenant, device).await;
                read.len() >= fixes.len()
            },
        )
        .await;
        assert_eq!(
            times(&read),
            times(fixes),
            "{device}: every fix once, in order"
        );
        assert_eq!(
            read.last().map(|f| &f.fix),
            fixes.last().map(|f| &f.fix),
            "{device}: fields survive"
        );
        assert_eq!(
            daily_total(client, tenant, device).await,
            fixes.len() as u64,
            "{device}: daily stats"
        );
    }
}

/// Issue 10, item 1: 10 000 fixes of one device were one 1.3 MB message, over Kafka's 1 MB
/// default; Store failed with MessageSizeTooLarge and the gateway's retry lost 9 000 fixes.
#[tokio::test]
async fn ten_thousand_fixes_of_one_device_are_stored_on_the_first_try() {
    let (_service, mut client) = start(config(1_000_000)).await;
    let tenant = testkit::unique("t");
    let fixes = track(UUID, 10_000);
    let one_message = FixBatch {
        tenant_id: tenant.clone(),
        device_id: UUID.into(),
        fixes: stored(fixes.clone()),
    };
    assert!(
        one_message.encoded_len() > 1_000_000,
        "the case must exceed the limit"
    );
    let request = StoreRequest {
        tenant_id: tenant.clone(),
        fixes: fixes.clone(),
    };
    let stored = client.store(request).await.unwrap().into_inner().stored;
    assert_eq!(stored, 10_000);
    assert_stored(&mut client, &tenant, &[(UUID, fixes)]).await;
}

/// A small limit cuts each device into many messages; interleaved devices stay in order.
#[tokio::test]
async fn devices_split_into_many_messages_keep_their_order() {
    let (_service, mut client) = start(config(16_384)).await;
    let tenant = testkit::unique("t");
    let devices: Vec<(&str, Vec<RefinedFix>)> = ["a", "b", UUID]
        .into_iter()
        .map(|d| (d, track(d, 1500)))
        .collect();
    // One request, the devices' fixes interleaved as a gateway forwards them.
    let mixed: Vec<RefinedFix> = (0..1500)
        .flat_map(|i| devices.iter().map(move |(_, f)| f[i].clone()))
        .collect();
    let request = StoreRequest {
        tenant_id: tenant.clone(),
        fixes: mixed,
    };
    let stored = client.store(request).await.unwrap().into_inner().stored;
    assert_eq!(stored, 4500);
    assert_stored(&mut client, &tenant, &devices).await;
}

/// A fix that cannot fit any message is the caller's error, named, not a retryable failure.
#[tokio::test]
async fn a_fix_larger_than_a_message_is_invalid_argument() {
    let (_service, mut client) = start(config(16_384)).await;
    let mut huge = track("big", 2);
    huge[1].detail = "x".repeat(20_000);
    let request = StoreRequest {
        tenant_id: testkit::unique("t"),
        fixes: huge,
    };
    let status = client.store(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("KAFKA_MESSAGE_MAX_BYTES"),
        "{status:?}"
    );
}

#[test]
fn bad_producer_settings_exit_64() {
    testkit::assert_bad_config_exits_64(
        std::path::Path::new(env!("CARGO_BIN_EXE_storage-service")),
        &[],
        &[
            (
                "KAFKA_MESSAGE_MAX_BYTES",
                "1000",
                "KAFKA_MESSAGE_MAX_BYTES=1000: out of range",
            ),
            (
                "KAFKA_MESSAGE_MAX_BYTES",
                "1MB",
                "KAFKA_MESSAGE_MAX_BYTES=1MB",
            ),
            ("KAFKA_LINGER", "6s", "KAFKA_LINGER=6s: out of range"),
            ("KAFKA_LINGER", "soon", "KAFKA_LINGER=soon: not a duration"),
        ],
    );
}

fn arb_fix() -> impl Strategy<Value = RefinedFix> {
    (
        "[a-z0-9-]{1,64}",
        any::<i64>(),
        proptest::option::of(any::<f32>()),
        proptest::option::of(any::<f32>()),
        0usize..300,
    )
        .prop_map(
            |(device_id, time_ms, accuracy_m, speed_mps, detail)| RefinedFix {
                fix: Some(Fix {
                    device_id,
                    time_ms,
                    lat: 1.5,
                    lon: -2.5,
                    accuracy_m,
                    speed_mps,
                    ..Fix::default()
                }),
                verdict: Verdict::Accepted as i32,
                detail: "d".repeat(detail),
                ..RefinedFix::default()
            },
        )
}

proptest! {
    /// Every fix appears once, in order, in chunks that each stay within the limit.
    #[test]
    fn split_keeps_every_fix_in_order_under_the_limit(
        fixes in proptest::collection::vec(arb_fix(), 0..400),
        limit in 1_000usize..20_000,
    ) {
        let batch = FixBatch { tenant_id: "tenant".into(), device_id: "device".into(), fixes: stored(fixes) };
        let chunks = split_batch(batch.clone(), limit).unwrap();
        prop_assert!(!chunks.is_empty());
        for chunk in &chunks {
            prop_assert!(chunk.encoded_len() <= limit, "{} > {limit}", chunk.encoded_len());
            prop_assert_eq!(&chunk.tenant_id, "tenant");
            prop_assert_eq!(&chunk.device_id, "device");
            prop_assert!(!chunk.fixes.is_empty() || chunks.len() == 1);
        }
        // Greedy: no chunk could have taken the next chunk's first fix.
        for pair in chunks.windows(2) {
            let mut grown = pair[0].clone();
            grown.fixes.push(pair[1].fixes[0].clone());
            prop_assert!(grown.encoded_len() > limit);
        }
        let joined: Vec<Refined> = chunks.into_iter().flat_map(|c| c.fixes).collect();
        prop_assert_eq!(joined, batch.fixes);
    }

    /// Packing devices into shared messages keeps each under the limit and every device's
    /// fixes once, in order.
    #[test]
    fn pack_keeps_every_device_in_order_under_the_limit(
        devices in proptest::collection::vec(proptest::collection::vec(arb_fix(), 0..60), 0..20),
        limit in 1_000usize..20_000,
    ) {
        let batches: Vec<FixBatch> = devices
            .into_iter()
            .enumerate()
            .map(|(d, fixes)| FixBatch { tenant_id: "t".into(), device_id: format!("d{d}"), fixes: stored(fixes) })
            .collect();
        let messages = pack(batches.clone(), limit).unwrap();
        for message in &messages {
            prop_assert!(message.encoded_len() <= limit, "{} > {limit}", message.encoded_len());
            prop_assert!(!message.batches.is_empty());
        }
        for batch in &batches {
            let packed: Vec<Refined> = messages
                .iter()
                .flat_map(|m| &m.batches)
                .filter(|b| b.device_id == batch.device_id)
                .flat_map(|b| b.fixes.clone())
                .collect();
            prop_assert_eq!(&packed, &batch.fixes);
        }
    }
}

/// `partition_of` is the CRC-32 (IEEE) librdkafka's partitioner uses: its standard check value.
#[test]
fn partition_of_is_crc32_of_the_key() {
    assert_eq!(
        partition_of("123456789", i32::MAX),
        (0xCBF4_3926u32 % i32::MAX as u32) as i32
    );
    assert_eq!(partition_of("", 12), 0);
}

#[test]
fn a_fix_over_the_limit_is_a_clear_error() {
    let mut fixes = track(UUID, 3);
    fixes[2].detail = "x".repeat(5_000);
    let batch = FixBatch {
        tenant_id: "t".into(),
        device_id: UUID.into(),
        fixes: stored(fixes),
    };
    let error = split_batch(batch, 4_096).unwrap_err().to_string();
    assert!(error.starts_with("fixes: a fix of device"), "{error}");
    assert!(error.contains("KAFKA_MESSAGE_MAX_BYTES"), "{error}");
}
