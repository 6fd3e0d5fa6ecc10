//! The whole mesh for the gateway's integration tests: the four binaries as processes against
//! the real Redis, ClickHouse and tansu that scripts/test started, and a gRPC client.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use futures::StreamExt as _;
use testkit::Process;
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use trackmesh_proto::v1::{
    Fix, GetTrackRequest, IngestRequest, IngestResponse, RefinedFix, gateway_client::GatewayClient,
};
pub use trackmesh_shared::domain::now_ms;

pub type Client = GatewayClient<InterceptedService<Channel, Auth>>;

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The four services with their own tenants, database and topic.
pub struct Mesh {
    pub refinement: Vec<Process>,
    pub learning: Process,
    pub storage: Process,
    pub gateway: Process,
    /// (tenant, key) pairs the gateway accepts.
    pub tenants: Vec<(String, String)>,
    /// Per tenant, its ingest token.
    pub ingest_tokens: Vec<String>,
}

#[derive(Default)]
pub struct Options {
    pub refinement_replicas: usize,
    pub gateway_env: Vec<(&'static str, String)>,
    /// For all four services.
    pub env: Vec<(&'static str, String)>,
    /// For storage, over the test defaults.
    pub storage_env: Vec<(&'static str, String)>,
    /// Refinement's and learning's Redis, if not the shared one (a test that flushes it).
    pub redis: Option<String>,
}

impl Mesh {
    pub async fn start(options: Options) -> Self {
        let redis = options.redis.clone().unwrap_or_else(testkit::redis_addr);
        let common = |extra: &[(&'static str, String)]| {
            let mut env = vec![
                ("READINESS_INTERVAL", "100ms".to_owned()),
                ("RUST_LOG", "info".to_owned()),
            ];
            env.extend_from_slice(&options.env);
            env.extend_from_slice(extra);
            env
        };
        let mut refinement = Vec::new();
        for _ in 0..options.refinement_replicas.max(1) {
            refinement.push(
                Process::start("refinement-api", &common(&[("REDIS_ADDR", redis.clone())])).await,
            );
        }
        let name = testkit::unique("mesh");
        let learning = Process::start(
            "learning-api",
            &common(&[
                ("REDIS_ADDR", redis.clone()),
                ("KAFKA_BROKERS", testkit::kafka_brokers()),
                ("KAFKA_TOPIC", format!("{name}.fixes")),
                ("KAFKA_EVENTS_TOPIC", format!("{name}.events")),
                ("KAFKA_GEOFENCES_TOPIC", format!("{name}.geofences")),
                ("KAFKA_GROUP_ID", format!("{name}-learning")),
                ("KAFKA_PARTITIONS", "4".into()),
            ]),
        )
        .await;
        let storage = Process::start(
            "storage-service",
            &common(&[
                ("CLICKHOUSE_URL", testkit::clickhouse_url()),
                ("CLICKHOUSE_DATABASE", name.clone()),
                ("KAFKA_BROKERS", testkit::kafka_brokers()),
                ("KAFKA_TOPIC", format!("{name}.fixes")),
                ("KAFKA_EVENTS_TOPIC", format!("{name}.events")),
                ("KAFKA_DLQ_TOPIC", format!("{name}.dlq")),
                ("KAFKA_GROUP_ID", name.clone()),
                ("KAFKA_PARTITIONS", "4".into()),
                ("KAFKA_SESSION_TIMEOUT", "6s".into()),
                ("BATCH_MAX_WAIT", "200ms".into()),
            ])
            .into_iter()
            .chain(options.storage_env.iter().cloned())
            .collect::<Vec<_>>(),
        )
        .await;
        let tenants: Vec<(String, String)> = (0..2)
            .map(|i| {
                (
                    testkit::unique(&format!("tenant{i}")),
                    format!("key-{i}-{}", testkit::unique("k")),
                )
            })
            .collect();
        let keys: Vec<String> = tenants.iter().map(|(t, k)| format!("{t}:{k}")).collect();
        let ingest_tokens: Vec<String> =
            tenants.iter().map(|(_, k)| format!("ingest-{k}")).collect();
        let token_entries: Vec<String> = tenants
            .iter()
            .zip(&ingest_tokens)
            .map(|((t, _), token)| format!("{t}:{token}"))
            .collect();
        let refinement_addrs: Vec<String> = refinement.iter().map(Process::url).collect();
        let mut gateway_env = common(&[
            ("REFINEMENT_ADDR", refinement_addrs.join(",")),
            ("LEARNING_ADDR", learning.url()),
            ("STORAGE_ADDR", storage.url()),
            ("API_KEYS", keys.join(",")),
            ("INGEST_TOKENS", token_entries.join(",")),
            ("RESOLVE_INTERVAL", "100ms".into()),
            ("KAFKA_BROKERS", testkit::kafka_brokers()),
            ("KAFKA_TOPIC", format!("{name}.fixes")),
            ("KAFKA_EVENTS_TOPIC", format!("{name}.events")),
        ]);
        gateway_env.extend(options.gateway_env);
        let gateway = Process::start("gateway", &gateway_env).await;
        Self {
            refinement,
            learning,
            storage,
            gateway,
            tenants,
            ingest_tokens,
        }
    }

    pub async fn client_with(&self, key: Option<&str>) -> Client {
        let channel = Channel::from_shared(self.gateway.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let auth = Auth(key.map(|key| format!("Bearer {key}").parse().unwrap()));
        GatewayClient::with_interceptor(channel, auth)
    }

    /// A client of tenant `i` on a channel of the caller's making.
    pub fn client_on(&self, channel: Channel, i: usize) -> Client {
        let auth = Auth(Some(
            format!("Bearer {}", self.tenants[i].1).parse().unwrap(),
        ));
        GatewayClient::with_interceptor(channel, auth)
    }

    /// A client of tenant `i`.
    pub async fn client(&self, i: usize) -> Client {
        self.client_with(Some(&self.tenants[i].1)).await
    }
}

pub async fn ingest(client: &mut Client, fixes: Vec<Fix>) -> Result<IngestResponse, Status> {
    client
        .ingest(IngestRequest { fixes, sequence: 0 })
        .await
        .map(tonic::Response::into_inner)
}

pub async fn track(client: &mut Client, device: &str) -> Vec<RefinedFix> {
    let mut stream = client
        .get_track(GetTrackRequest {
            device_id: device.into(),
            ..GetTrackRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut fixes = Vec::new();
    while let Some(chunk) = stream.next().await {
        fixes.extend(chunk.unwrap().fixes);
    }
    fixes
}

/// Waits until `device` has `n` fixes stored (or a minute passed), then returns them.
pub async fn stored(client: &mut Client, device: &str, n: usize) -> Vec<RefinedFix> {
    let start = std::time::Instant::now();
    loop {
        let fixes = track(client, device).await;
        if fixes.len() >= n || start.elapsed() > Duration::from_secs(60) {
            return fixes;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plausible moving vessel, one fix a minute, the last a few minutes ago.
pub fn moving(device: &str, n: usize) -> Vec<Fix> {
    let start = now_ms() - (n as i64 + 5) * 60_000;
    (0..n)
        .map(|i| Fix {
            device_id: device.into(),
            time_ms: start + i as i64 * 60_000,
            lat: 36.9 + i as f64 * 0.002,
            lon: -76.3,
            ..Fix::default()
        })
        .collect()
}

/// A device's stored stays / trips, all of them.
pub async fn stays(client: &mut Client, device: &str) -> Vec<trackmesh_proto::v1::Stay> {
    let request = trackmesh_proto::v1::GetStaysRequest {
        device_id: device.into(),
        ..Default::default()
    };
    client.get_stays(request).await.unwrap().into_inner().stays
}

pub async fn trips(client: &mut Client, device: &str) -> Vec<trackmesh_proto::v1::Trip> {
    let request = trackmesh_proto::v1::GetTripsRequest {
        device_id: device.into(),
        ..Default::default()
    };
    client.get_trips(request).await.unwrap().into_inner().trips
}

/// The rows of an AIS sample in data/ (`device_id,timestamp,lon,lat`) of `devices` (all when
/// empty), in time order as a live feed would deliver them.
pub fn ais(file: &str, devices: &[&str]) -> Vec<Fix> {
    let path = format!("{}/../../data/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let mut fixes: Vec<Fix> = text
        .lines()
        .skip(1)
        .map(|line| line.split(',').collect::<Vec<&str>>())
        .filter(|fields| devices.is_empty() || devices.contains(&fields[0]))
        .map(|fields| {
            let time = humantime::parse_rfc3339(fields[1]).unwrap();
            Fix {
                device_id: fields[0].into(),
                time_ms: time
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64,
                lon: fields[2].parse().unwrap(),
                lat: fields[3].parse().unwrap(),
                ..Fix::default()
            }
        })
        .collect();
    fixes.sort_by_key(|fix| fix.time_ms);
    fixes
}

pub fn times(fixes: &[RefinedFix]) -> Vec<i64> {
    fixes
        .iter()
        .map(|f| f.fix.as_ref().unwrap().time_ms)
        .collect()
}

/// A Watch stream, once the gateway's tail has read the topics' ends.
pub async fn watch(
    client: &mut Client,
    request: trackmesh_proto::v1::WatchRequest,
) -> tonic::Streaming<trackmesh_proto::v1::WatchMessage> {
    let start = std::time::Instant::now();
    loop {
        match client.watch(request.clone()).await {
            Ok(stream) => return stream.into_inner(),
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && start.elapsed() < Duration::from_secs(30) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => panic!("watch: {status:?}"),
        }
    }
}

/// An HTTP answer: the status, the head (status line and headers) and the body, de-chunked.
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.body.trim())
            .unwrap_or_else(|err| panic!("{err}: {:?}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection; `head` without the final blank line.
pub async fn send(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> Answer {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{head}\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Answer {
        status: head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        head: head.to_owned(),
        body: if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
