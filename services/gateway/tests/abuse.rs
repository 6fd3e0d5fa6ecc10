//! Abuse and lock-out (issue 10): requests that must be refused before they cost memory,
//! tenants that must not starve each other, idle streams that must end, and ingest that must
//! be refused before refinement when storage cannot take the result. The gateway runs as a
//! process (its memory is measured in /proc); refinement is real (Redis), and storage and
//! learning are stand-ins that only answer health checks, unless a test needs more.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use prost::bytes::{Buf as _, BufMut as _, Bytes};
use testkit::Process;
use tokio::net::TcpListener;
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Channel, Server},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use trackmesh_proto::v1::{
    Fix, GetDeviceStateRequest, IngestRequest, gateway_client::GatewayClient,
    refinement_client::RefinementClient,
};
use trackmesh_shared::domain::now_ms;

/// A downstream that answers health checks and nothing else.
struct Fake {
    addr: std::net::SocketAddr,
    health: HealthReporter,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, service) = tonic_health::server::health_reporter();
        // Storage's Store part, which the gateway checks; harmless on the other fakes.
        health
            .set_service_status(trackmesh_proto::STORE_HEALTH_NAME, ServingStatus::Serving)
            .await;
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Self { addr, health, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Stack {
    refinement: Process,
    _learning: Fake,
    storage: Fake,
    gateway: Process,
    /// (tenant, key) of two tenants.
    tenants: Vec<(String, String)>,
}

impl Stack {
    async fn start(gateway_env: &[(&str, &str)]) -> Self {
        let refinement = Process::start(
            "refinement-api",
            &[
                ("REDIS_ADDR", testkit::redis_addr()),
                ("READINESS_INTERVAL", "100ms".into()),
            ],
        )
        .await;
        let (learning, storage) = (Fake::start().await, Fake::start().await);
        let tenants: Vec<(String, String)> = (0..2)
            .map(|i| {
                (
                    testkit::unique(&format!("tenant{i}")),
                    format!("key-{i}-{}", testkit::unique("k")),
                )
            })
            .collect();
        let keys: Vec<String> = tenants.iter().map(|(t, k)| format!("{t}:{k}")).collect();
        let mut env = vec![
            ("REFINEMENT_ADDR", refinement.url()),
            ("LEARNING_ADDR", learning.url()),
            ("STORAGE_ADDR", storage.url()),
            ("API_KEYS", keys.join(",")),
            ("RESOLVE_INTERVAL", "100ms".into()),
            ("READINESS_INTERVAL", "100ms".into()),
        ];
        env.extend(gateway_env.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let gateway = Process::start("gateway", &env).await;
        Self {
            refinement,
            _learning: learning,
            storage,
            gateway,
            tenants,
        }
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.gateway.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    fn key(&self, tenant: usize) -> &str {
        &self.tenants[tenant].1
    }

    /// The gateway's peak resident memory so far (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let pid = self.gateway.pid().expect("gateway running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/<pid>/status");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmHWM in kB");
        kib * 1024
    }
}

/// Sends request bodies as they are, so that a test can send what no well-behaved client
/// would build (and without building 15 million `Fix` values in the test process).
#[derive(Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// One unary call of `method` (e.g. `/trackmesh.v1.Gateway/Ingest`) with `body` as its message.
async fn raw_call(
    channel: Channel,
    method: &'static str,
    key: Option<&str>,
    body: Bytes,
) -> Result<Bytes, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|err| Status::unavailable(err.to_string()))?;
    let mut request = Request::new(body);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    grpc.unary(request, PathAndQuery::from_static(method), Raw)
        .await
        .map(tonic::Response::into_inner)
}

/// An IngestRequest of `bytes` bytes: nothing but empty fixes (2 bytes each on the wire, but
/// about 80 bytes each once decoded).
fn empty_fixes(bytes: usize) -> Bytes {
    Bytes::from([0x0a_u8, 0x00].repeat(bytes / 2))
}

fn authorized<T>(message: T, key: &str) -> Request<T> {
    let mut request = Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

fn fix(device: &str, lat: f64) -> Fix {
    Fix {
        device_id: device.into(),
        time_ms: now_ms() - 60_000,
        lat,
        lon: -76.3,
        ..Fix::default()
    }
}

const MIB: u64 = 1024 * 1024;

#[allow(clippy::print_stderr)]
fn report(what: &str, before: u64, after: u64) {
    eprintln!(
        "{what}: gateway peak RSS {:.1} MiB -> {:.1} MiB (+{:.1} MiB)",
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        after.saturating_sub(before) as f64 / MIB as f64
    );
}

#[tokio::test]
async fn unauthenticated_large_ingest_is_refused_before_its_body_is_read() {
    let stack = Stack::start(&[]).await;
    let channel = stack.channel().await;
    // Warm up the connection and the gateway's code paths before the baseline.
    let small = raw_call(
        channel.clone(),
        "/trackmesh.v1.Gateway/Ingest",
        None,
        empty_fixes(10),
    )
    .await;
    assert_eq!(small.unwrap_err().code(), Code::Unauthenticated);
    let before = stack.peak_rss();
    let body = empty_fixes(30_000_000);
    for key in [None, Some("wrong-key-wrong-key")] {
        for _ in 0..2 {
            let status = raw_call(
                channel.clone(),
                "/trackmesh.v1.Gateway/Ingest",
                key,
                body.clone(),
            )
            .await
            .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        }
    }
    let after = stack.peak_rss();
    report("4 unauthenticated 30 MB Ingest calls", before, after);
    // Decoding one such body took over 1 GiB; reading it unread into buffers would take 30 MiB.
    assert!(
        after - before < 10 * MIB,
        "peak RSS grew by {} MiB",
        (after - before) / MIB
    );
    // Health stays open without a key.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn oversize_messages_are_resource_exhausted_before_decoding() {
    let stack = Stack::start(&[("MAX_BATCH", "1000")]).await;
    let channel = stack.channel().await;
    let key = stack.key(0);
    let before = stack.peak_rss();
    // A batch larger than MAX_BATCH fixes can need, with a valid key.
    let status = raw_call(
        channel.clone(),
        "/trackmesh.v1.Gateway/Ingest",
        Some(key),
        empty_fixes(30_000_000),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("Ingest"), "{status:?}");
    let after = stack.peak_rss();
    report("authenticated 30 MB Ingest", before, after);
    assert!(
        after - before < 10 * MIB,
        "peak RSS grew by {} MiB",
        (after - before) / MIB
    );
    // Queries are small: 1 MiB is far beyond any of them (field 1, the device id).
    let mut query = Vec::with_capacity(MIB as usize + 8);
    query.push(0x0a_u8);
    prost::encoding::encode_varint(MIB, &mut query);
    query.resize(query.len() + MIB as usize, b'x');
    for method in [
        "/trackmesh.v1.Gateway/GetDailyStats",
        "/trackmesh.v1.Gateway/GetPlaces",
        "/trackmesh.v1.Gateway/DeleteDevice",
    ] {
        let status = raw_call(
            channel.clone(),
            method,
            Some(key),
            Bytes::from(query.clone()),
        )
        .await
        .unwrap_err();
        assert_eq!(
            status.code(),
            Code::ResourceExhausted,
            "{method}: {status:?}"
        );
    }
    // A batch of MAX_BATCH fixes with the longest device ids still fits.
    let long_id = "d".repeat(128);
    let fixes = (0..1000).map(|_| fix(&long_id, 91.0)).collect();
    let mut client = GatewayClient::new(channel);
    let response = client
        .ingest(authorized(IngestRequest { fixes, sequence: 1 }, key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.rejected, 1000, "INVALID latitude, all refused");
}

#[tokio::test]
async fn batches_of_tiny_fixes_are_counted_before_decoding() {
    // Default MAX_BATCH (10 000): the byte limit lets about 900 000 empty fixes through, which
    // prost would decode into about 80 bytes each.
    let stack = Stack::start(&[]).await;
    let channel = stack.channel().await;
    let before = stack.peak_rss();
    let body = empty_fixes(1_800_000);
    let calls = (0..4).map(|_| {
        raw_call(
            channel.clone(),
            "/trackmesh.v1.Gateway/Ingest",
            Some(stack.key(0)),
            body.clone(),
        )
    });
    for result in futures::future::join_all(calls).await {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            "fixes: 900000 fixes, more than MAX_BATCH=10000"
        );
    }
    let after = stack.peak_rss();
    report(
        "4 concurrent Ingest calls of 900 000 empty fixes",
        before,
        after,
    );
    assert!(
        after - before < 32 * MIB,
        "peak RSS grew by {} MiB",
        (after - before) / MIB
    );
}

#[tokio::test]
async fn one_tenants_idle_streams_do_not_lock_out_another_tenant() {
    let stack = Stack::start(&[
        ("MAX_CONCURRENT_REQUESTS", "64"),
        ("TENANT_MAX_CONCURRENT_REQUESTS", "32"),
        ("TENANT_MAX_STREAMS", "40"),
    ])
    .await;
    // Tenant A opens more idle streams than the global limit, over several connections.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        let mut client = GatewayClient::new(stack.channel().await);
        for _ in 0..25 {
            let idle = futures::stream::pending::<IngestRequest>();
            match client.ingest_stream(authorized(idle, stack.key(0))).await {
                Ok(stream) => open.push(stream.into_inner()),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        status.message().contains("TENANT_MAX_STREAMS=40"),
                        "{status:?}"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert_eq!(
        open.len(),
        40,
        "TENANT_MAX_STREAMS streams, {refused} refused"
    );
    // Tenant B opens as many: together more than MAX_CONCURRENT_REQUESTS, as streams hold no
    // global permit.
    let mut client = GatewayClient::new(stack.channel().await);
    for _ in 0..40 {
        let idle = futures::stream::pending::<IngestRequest>();
        let stream = client
            .ingest_stream(authorized(idle, stack.key(1)))
            .await
            .expect("tenant B's stream");
        open.push(stream.into_inner());
    }
    // Tenant B is served, and so are tenant A's own unary calls.
    for tenant in [1, 0] {
        let mut client = GatewayClient::new(stack.channel().await);
        // Refined (and refused by refinement), so storage, a stand-in here, is not needed.
        let request = IngestRequest {
            fixes: vec![fix("b1", 91.0)],
            sequence: 7,
        };
        let response = client
            .ingest(authorized(request, stack.key(tenant)))
            .await
            .unwrap_or_else(|status| panic!("tenant {tenant}: {status:?}"))
            .into_inner();
        assert_eq!((response.sequence, response.rejected), (7, 1));
    }
    drop(open);
}

#[test]
fn bad_limits_exit_64_with_one_line() {
    testkit::assert_bad_config_exits_64(
        &testkit::binary("gateway"),
        &[
            ("API_KEYS", "demo:demo-key"),
            ("MAX_CONCURRENT_REQUESTS", "100"),
        ],
        &[
            (
                "TENANT_MAX_CONCURRENT_REQUESTS",
                "100",
                "TENANT_MAX_CONCURRENT_REQUESTS=100: must be below MAX_CONCURRENT_REQUESTS=100",
            ),
            ("TENANT_MAX_STREAMS", "-1", "TENANT_MAX_STREAMS=-1"),
            (
                "STREAM_IDLE_TIMEOUT",
                "10ms",
                "STREAM_IDLE_TIMEOUT=10ms: out of range",
            ),
            (
                "STREAM_MAX_DURATION",
                "soon",
                "STREAM_MAX_DURATION=soon: not a duration",
            ),
        ],
    );
}

#[tokio::test]
async fn idle_streams_are_closed_and_their_slot_freed() {
    let stack = Stack::start(&[("STREAM_IDLE_TIMEOUT", "1s"), ("TENANT_MAX_STREAMS", "1")]).await;
    let mut client = GatewayClient::new(stack.channel().await);
    let idle = futures::stream::pending::<IngestRequest>();
    let mut stream = client
        .ingest_stream(authorized(idle, stack.key(0)))
        .await
        .unwrap()
        .into_inner();
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("an idle stream must be closed");
    let status = ended.expect("a status, not a silent end").unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("STREAM_IDLE_TIMEOUT"),
        "{status:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    // The slot it held is free again.
    testkit::wait_until(Duration::from_secs(10), "a new stream", async || {
        let idle = futures::stream::pending::<IngestRequest>();
        client
            .ingest_stream(authorized(idle, stack.key(0)))
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test]
async fn ingest_is_refused_before_refinement_when_storage_is_down() {
    let stack = Stack::start(&[]).await;
    stack
        .storage
        .health
        .set_service_status(
            trackmesh_proto::STORE_HEALTH_NAME,
            ServingStatus::NotServing,
        )
        .await;
    testkit::wait_http_status(stack.gateway.addr(), "/ready", 503, Duration::from_secs(10)).await;
    let device = testkit::unique("dev");
    let mut client = GatewayClient::new(stack.channel().await);
    let request = IngestRequest {
        fixes: vec![fix(&device, 36.9)],
        sequence: 0,
    };
    let status = client
        .ingest(authorized(request, stack.key(0)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("storage"), "{status:?}");
    // Nothing was refined: refinement holds no state for the device.
    let mut refinement = RefinementClient::connect(stack.refinement.url())
        .await
        .unwrap();
    let state = refinement
        .get_device_state(GetDeviceStateRequest {
            tenant_id: stack.tenants[0].0.clone(),
            device_id: device,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!state.found, "refined although storage was down: {state:?}");
}
