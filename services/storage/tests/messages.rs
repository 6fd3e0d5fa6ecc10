//! Kafka message layout against the real tansu broker and ClickHouse: a Store of many devices
//! becomes one message per partition (schema version 2), each device on the partition
//! librdkafka's own partitioner gives its key, and messages of the earlier one-device format
//! (schema version 1) are still stored.

mod common;

use std::time::Duration;

use common::{Topic, start};
use futures::StreamExt as _;
use prost::Message as _;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
};
use storage::partition_of;
use tonic::transport::Channel;
use trackmesh_proto::v1::{
    Fix, ListStoredDevicesRequest, QueryTrackRequest, RefinedFix, StoreRequest, Verdict,
    storage_client::StorageClient,
};
use trackmesh_shared::fix_messages::FixBatch;

const T0: i64 = 1_750_000_000_000;
const DEVICES: usize = 300;

fn fix(device: &str, i: i64) -> RefinedFix {
    RefinedFix {
        fix: Some(Fix {
            device_id: device.into(),
            time_ms: T0 + i * 1000,
            lat: 40.6 + i as f64 * 1e-4,
            lon: -74.0,
            ..Fix::default()
        }),
        verdict: Verdict::Accepted as i32,
        segment: 1,
        ..RefinedFix::default()
    }
}

/// Messages in the topic so far (tansu's offsets count one per message).
fn messages_in(topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", testkit::kafka_brokers())
        .set("group.id", testkit::unique("watermarks"))
        .create()
        .unwrap();
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .unwrap();
            high - low
        })
        .sum()
}

async fn stored_fixes(client: &mut StorageClient<Channel>, tenant: &str) -> u64 {
    let request = ListStoredDevicesRequest {
        tenant_id: tenant.into(),
        page_size: 1000,
        ..ListStoredDevicesRequest::default()
    };
    let devices = client.list_devices(request).await.unwrap();
    devices.into_inner().devices.iter().map(|d| d.fixes).sum()
}

async fn track_times(client: &mut StorageClient<Channel>, tenant: &str, device: &str) -> Vec<i64> {
    let query = QueryTrackRequest {
        tenant_id: tenant.into(),
        device_id: device.into(),
        ..QueryTrackRequest::default()
    };
    let mut stream = client.query_track(query).await.unwrap().into_inner();
    let mut times = Vec::new();
    while let Some(chunk) = stream.next().await {
        times.extend(
            chunk
                .unwrap()
                .fixes
                .iter()
                .filter_map(|f| f.fix.as_ref().map(|f| f.time_ms)),
        );
    }
    times
}

/// A storage of its own, its client, its topic and the topic's partition count.
async fn start_storage() -> (testkit::Service, StorageClient<Channel>, String, i32) {
    let config = common::config();
    let (topic, partitions) = (
        config.storage.kafka_topic.clone(),
        i32::try_from(config.storage.kafka_partitions).unwrap(),
    );
    let (service, client) = start(config).await;
    (service, client, topic, partitions)
}

#[tokio::test]
async fn a_store_of_many_devices_is_one_message_per_partition() {
    let (_service, mut client, topic, partitions) = start_storage().await;
    let tenant = testkit::unique("t");
    let devices: Vec<String> = (0..DEVICES).map(|d| format!("dev-{d}")).collect();
    // Two fixes per device, interleaved as a coalesced gateway batch sends them.
    let fixes: Vec<RefinedFix> = (0..2)
        .flat_map(|i| devices.iter().map(move |d| fix(d, i)))
        .collect();
    let request = StoreRequest {
        tenant_id: tenant.clone(),
        fixes,
    };
    assert_eq!(
        client.store(request).await.unwrap().into_inner().stored,
        600
    );
    // One message per partition (300 devices cover all of them), not one per device.
    assert_eq!(messages_in(&topic, partitions), i64::from(partitions));
    testkit::wait_until(
        Duration::from_secs(60),
        "not every fix reached ClickHouse",
        async || stored_fixes(&mut client, &tenant).await >= 600,
    )
    .await;
    assert_eq!(stored_fixes(&mut client, &tenant).await, 600);
    for device in ["dev-0", "dev-299"] {
        assert_eq!(
            track_times(&mut client, &tenant, device).await,
            [T0, T0 + 1000],
            "{device}: both fixes, in order"
        );
    }
}

/// A message as releases before schema version 2 wrote it: one device, keyed `tenant/device`,
/// placed by librdkafka's default partitioner. It lands where `partition_of` puts the device's
/// new messages (so the device stays in order across an upgrade) and is still stored.
#[tokio::test]
async fn one_device_messages_of_earlier_releases_are_stored_on_the_devices_partition() {
    let (_service, mut client, topic, partitions) = start_storage().await;
    let tenant = testkit::unique("t");
    let topic = Topic::new(&topic);
    let devices: Vec<String> = (0..20).map(|d| format!("old-{d}")).collect();
    for device in &devices {
        let key = format!("{tenant}/{device}");
        let payload = FixBatch {
            tenant_id: tenant.clone(),
            device_id: device.clone(),
            fixes: vec![fix(device, 0).into()],
        }
        .encode_to_vec();
        let partition = topic.send(&key, &payload, None, Some("1")).await;
        assert_eq!(partition, partition_of(&key, partitions), "{key}");
    }
    testkit::wait_until(
        Duration::from_secs(60),
        "the old messages were not stored",
        async || stored_fixes(&mut client, &tenant).await >= 20,
    )
    .await;
    assert_eq!(stored_fixes(&mut client, &tenant).await, 20);
    assert_eq!(track_times(&mut client, &tenant, "old-7").await, [T0]);
}
