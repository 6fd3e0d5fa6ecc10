//! Test support: the shared backends `scripts/test` started, private backend processes a test
//! may stop and restart, services run in-process on port 0 or as their binaries, and seeded
//! randomness for tests and benches.
#![forbid(unsafe_code)]
#![allow(clippy::print_stderr)]

use std::{
    f64::consts::PI,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The value of a variable `scripts/test` exports, with a hint when it is missing.
pub fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test, which starts the backends")
    })
}

/// `host:port` of the shared Redis.
pub fn redis_addr() -> String {
    env("TEST_REDIS_ADDR")
}

/// Seed nodes of the shared 3-node Redis Cluster.
pub fn redis_cluster_nodes() -> Vec<String> {
    env("TEST_REDIS_CLUSTER_NODES")
        .split(',')
        .map(str::to_owned)
        .collect()
}

/// The shared standalone Redis, as services configure it.
pub fn redis_standalone() -> trackmesh_shared::redis::RedisConfig {
    trackmesh_shared::redis::RedisConfig {
        redis_addr: redis_addr(),
        ..Default::default()
    }
}

/// The shared 3-node Redis Cluster, as services configure it.
pub fn redis_cluster() -> trackmesh_shared::redis::RedisConfig {
    trackmesh_shared::redis::RedisConfig {
        redis_cluster_nodes: redis_cluster_nodes(),
        ..Default::default()
    }
}

/// Runs each `async fn scenario(redis: RedisConfig)` of the calling module twice, as tests
/// in modules `standalone` and `cluster`: against the shared Redis and the Redis Cluster.
#[macro_export]
macro_rules! on_both_redis {
    ($($name:ident),* $(,)?) => {
        mod standalone {
            $( #[tokio::test] async fn $name() { super::$name($crate::redis_standalone()).await } )*
        }
        mod cluster {
            $( #[tokio::test] async fn $name() { super::$name($crate::redis_cluster()).await } )*
        }
    };
}

/// `http://host:port` of the shared ClickHouse.
pub fn clickhouse_url() -> String {
    env("TEST_CLICKHOUSE_URL")
}

/// `host:port` of the shared Kafka-protocol broker.
pub fn kafka_brokers() -> String {
    env("TEST_KAFKA_BROKERS")
}

/// A name no other test uses, for tenants, databases and topics.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis of this test only, which it may stop and restart, and the settings that reach it
/// (a 500 ms timeout: an outage shows promptly).
pub fn private_redis() -> (Backend, trackmesh_shared::redis::RedisConfig) {
    let redis = Backend::start(Kind::Redis);
    let config = trackmesh_shared::redis::RedisConfig {
        redis_addr: redis.addr(),
        redis_timeout: trackmesh_shared::config::Duration::from_millis(500),
        ..Default::default()
    };
    (redis, config)
}

/// Which server a [`Backend`] runs (via `scripts/backend run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    ClickHouse,
    Tansu,
}

/// A backend server of this test only, so the test may stop and restart it.
/// Killed when dropped.
pub struct Backend {
    kind: Kind,
    dir: PathBuf,
    ports: Vec<u16>,
    child: Option<Child>,
}

impl Backend {
    pub fn start(kind: Kind) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("{kind:?}").to_lowercase()));
        std::fs::create_dir_all(&dir).unwrap();
        let ports = match kind {
            Kind::ClickHouse => vec![free_port(), free_port()],
            Kind::Redis | Kind::Tansu => vec![free_port()],
        };
        let mut backend = Self {
            kind,
            dir,
            ports,
            child: None,
        };
        backend.restart();
        backend
    }

    /// `host:port` (Redis, Tansu) or `http://host:port` (ClickHouse).
    pub fn addr(&self) -> String {
        match self.kind {
            Kind::ClickHouse => format!("http://127.0.0.1:{}", self.ports[0]),
            Kind::Redis | Kind::Tansu => format!("127.0.0.1:{}", self.ports[0]),
        }
    }

    /// Kills the server (SIGKILL: as abrupt as a crash).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let script = backend_script();
        let name = match self.kind {
            Kind::Redis => "redis",
            Kind::ClickHouse => "clickhouse",
            Kind::Tansu => "tansu",
        };
        let ports: Vec<String> = self.ports.iter().map(u16::to_string).collect();
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        let child = Command::new(&script)
            .arg("run")
            .arg(name)
            .arg(&self.dir)
            .args(&ports)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
        let pid = child.id().to_string();
        self.child = Some(child);
        let status = Command::new(&script)
            .args(["wait", name, &ports[0], &pid])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{name} did not start; see {}",
            self.dir.join("server.log").display()
        );
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn backend_script() -> PathBuf {
    std::env::var_os("TM_BACKEND").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/backend"),
        PathBuf::from,
    )
}

/// A service running in-process on a free port; stopped (gracefully) when dropped.
pub struct Service {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), String>>>,
}

impl Service {
    /// Binds `127.0.0.1:0` and spawns `run(listener, shutdown)`.
    pub async fn spawn<F, Fut, E>(run: F) -> Self
    where
        F: FnOnce(TcpListener, std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Debug,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = Box::pin(async move {
            let _ = stopped.await;
        });
        let fut = run(listener, shutdown);
        let task = tokio::spawn(async move { fut.await.map_err(|err| format!("{err:?}")) });
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Asks the service to shut down and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap().await.unwrap()
    }

    /// Polls `GET /ready` until it answers `status` (200 or 503), or panics after `timeout`.
    pub async fn wait_ready(&self, status: u16, timeout: Duration) {
        wait_http_status(self.addr, "/ready", status, timeout).await;
    }

    /// The gRPC health of `name` (`""`: the whole server).
    pub async fn grpc_health(&self, name: &str) -> ServingStatus {
        let channel = tonic::transport::Channel::from_shared(self.url()).unwrap();
        let mut client = HealthClient::new(channel.connect().await.unwrap());
        let request = HealthCheckRequest {
            service: name.into(),
        };
        client.check(request).await.unwrap().into_inner().status()
    }

    /// Kills `redis` under this service: `request` (one that needs Redis, not yet polled)
    /// fails UNAVAILABLE promptly, `/ready` turns 503 and the health of `name` NOT_SERVING.
    pub async fn lose_redis<T: std::fmt::Debug>(
        &self,
        redis: &mut Backend,
        name: &str,
        request: impl Future<Output = Result<T, tonic::Status>>,
    ) {
        redis.stop();
        let started = Instant::now();
        let err = request.await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "answered promptly, not hung"
        );
        self.wait_ready(503, Duration::from_secs(5)).await;
        assert_eq!(self.grpc_health(name).await, ServingStatus::NotServing);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The HTTP status of `GET path` on `addr`, or `None` when nothing answers.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(status, _)| status)
}

/// `GET path` over plain HTTP/1.1: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Polls `GET path` until it answers `status`, or panics after `timeout`.
pub async fn wait_http_status(addr: SocketAddr, path: &str, status: u16, timeout: Duration) {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        last = http_status(addr, path).await;
        if last == Some(status) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("GET {path} on {addr} answered {last:?}, not {status}, within {timeout:?}");
}

/// A trackmesh binary built next to the running test (`cargo test --workspace` builds them all).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A service binary running as its own process on a free port; killed when dropped.
pub struct Process {
    name: String,
    env: Vec<(String, String)>,
    pub port: u16,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl Process {
    /// Starts `name` with `env` (plus `SERVER_HOST`/`SERVER_PORT`) and waits until `/ready` is 200.
    pub async fn start(name: &str, env: &[(&str, String)]) -> Self {
        let mut process = Self {
            name: name.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            port: free_port(),
            child: None,
            log: std::env::temp_dir()
                .join(unique(name))
                .with_extension("log"),
        };
        process.restart().await;
        process
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// SIGKILL: as abrupt as a crash.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts it again on the same port and waits until it is ready.
    pub async fn restart(&mut self) {
        self.kill().await;
        let log = std::fs::File::create(&self.log).unwrap();
        let child = tokio::process::Command::new(binary(&self.name))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let ready = async {
            loop {
                if http_status(self.addr(), "/ready").await == Some(200) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .is_err()
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{} did not become ready; last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

/// Runs `binary` with only `base` and one case's variable in its environment, for each case
/// `(variable, value, expected)`: it must exit with 64 and print one line containing `expected`.
pub fn assert_bad_config_exits_64(
    binary: &std::path::Path,
    base: &[(&str, &str)],
    cases: &[(&str, &str, &str)],
) {
    for (var, value, expected) in cases {
        let output = Command::new(binary)
            .env_clear()
            .envs(base.iter().copied())
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{var}={value}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{var}={value}: one line, got {stderr}"
        );
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
    }
}

/// Polls `condition` every 200 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < timeout, "{what} (waited {timeout:?})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Process {
    /// The running child's process id, e.g. to read its `/proc/<pid>/status`.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// SIGTERM, as an orchestrator stops it.
    pub fn terminate(&self) {
        let pid = self.pid().unwrap().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }

    /// How it exits (within 30 s).
    pub async fn exit_code(&mut self) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        status.unwrap().unwrap().code()
    }
}

/// splitmix64: seeded randomness without a dependency, the same on every run.
pub struct Rng(pub u64);

impl Rng {
    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high).
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + self.uniform() * (high - low)
    }

    pub fn between(&mut self, low: i64, high: i64) -> i64 {
        low + (self.uniform() * (high - low) as f64) as i64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// A closed ring of `[lon, lat]`, star-shaped around a centre (so simple, often concave):
    /// `vertices` at most `size_m` from it; `at(north_m, east_m)` places an offset from it.
    pub fn star(
        &mut self,
        vertices: usize,
        size_m: f64,
        at: impl Fn(f64, f64) -> (f64, f64),
    ) -> Vec<[f64; 2]> {
        let mut ring: Vec<[f64; 2]> = (0..vertices)
            .map(|k| {
                let a = (k as f64 + self.range(0.1, 0.9)) / vertices as f64 * 2.0 * PI;
                let r = size_m * self.range(0.3, 1.0);
                let (lat, lon) = at(r * a.sin(), r * a.cos());
                [lon, lat]
            })
            .collect();
        ring.push(ring[0]);
        ring
    }
}
