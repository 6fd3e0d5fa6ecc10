//! Redis for per-device state (refinement, learning): standalone or Cluster, with versioned
//! compare-and-set of many keys per round trip so that replicas never overwrite each other.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::try_join_all;
pub use redis::RedisError;
use redis::{
    AsyncCommands as _, Cmd, ErrorKind, Pipeline, RedisResult, Script, ServerErrorKind,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

/// Where Redis is: one server, or the seed nodes of a Redis Cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// A key's stored bytes and the version a compare-and-set must expect (0 when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versioned {
    pub version: u64,
    pub data: Option<Vec<u8>>,
}

/// Replace `key` with `data` if it is still at version `expected`; both keys expire after
/// `ttl` without writes.
#[derive(Clone, Debug)]
pub struct Write {
    pub key: String,
    pub expected: u64,
    pub data: Vec<u8>,
    pub ttl: Duration,
    /// Bytes to append, in the same atomic step, to a log kept at most `Log::max_bytes` long.
    pub log: Option<Log>,
}

/// An append-only byte log beside a state key (same hash tag, so same Cluster slot).
#[derive(Clone, Debug)]
pub struct Log {
    pub key: String,
    pub append: Vec<u8>,
    /// The log keeps at least this many newest bytes, and never less than the latest append
    /// (so a whole batch stays recognisable however large); trimmed when twice as long, so
    /// records of a fixed size that divides both stay aligned.
    pub max_bytes: usize,
}

// State lives in a hash: `v` is the version, `s` the encoded state.
const CAS: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', v + 1, 's', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if #KEYS > 1 then
  if #ARGV[4] > 0 then
    local len = redis.call('APPEND', KEYS[2], ARGV[4])
    local max = math.max(tonumber(ARGV[5]), #ARGV[4])
    if len > 2 * max then
      redis.call('SET', KEYS[2], redis.call('GETRANGE', KEYS[2], len - max, -1))
    end
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
";

// The records of a log (fixed-size, sorted by a little-endian i64 at their start) whose key
// lies in [ARGV[2], ARGV[3]], found by binary search so that only they leave Redis.
const RANGE: &str = r"
local size = tonumber(ARGV[1])
local n = math.floor(redis.call('STRLEN', KEYS[1]) / size)
local function first_at_least(t)
  local lo, hi = 0, n
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local key = struct.unpack('<i8', redis.call('GETRANGE', KEYS[1], mid * size, mid * size + 7))
    if key < t then lo = mid + 1 else hi = mid end
  end
  return lo
end
local from = first_at_least(tonumber(ARGV[2]))
local to = first_at_least(tonumber(ARGV[3]) + 1)
if to <= from then return '' end
return redis.call('GETRANGE', KEYS[1], from * size, to * size - 1)
";

/// Which records of a log to read: those whose i64 key lies in `from..=to`.
#[derive(Clone, Debug)]
pub struct LogRange {
    pub key: String,
    pub record_size: usize,
    pub from: i64,
    pub to: i64,
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    // Cluster pipelines must stay within one slot, so requests go one key at a time,
    // concurrently, multiplexed on the node connections.
    Cluster(ClusterConnection),
}

#[derive(Clone)]
pub struct Redis {
    connection: Connection,
    cas: Arc<Script>,
    range: Arc<Script>,
}

impl Redis {
    /// Connects lazily: a Redis that is down at start-up shows as "not ready", not as a crash.
    pub fn connect(target: &Target, timeout: Duration) -> RedisResult<Self> {
        let connection = match target {
            Target::Single(url) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Connection::Single(ConnectionManager::new_lazy_with_config(
                    redis::Client::open(url.as_str())?,
                    config,
                )?)
            }
            Target::Cluster(nodes) => {
                let client = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()?;
                Connection::Cluster(
                    client.get_pending_async_connection_with_config(Default::default()),
                )
            }
        };
        Ok(Self {
            connection,
            cas: Arc::new(Script::new(CAS)),
            range: Arc::new(Script::new(RANGE)),
        })
    }

    /// The readiness check of a service whose only dependency is this Redis.
    pub fn ready_check(&self) -> crate::server::ReadyCheck {
        let redis = self.clone();
        crate::server::ready_check(move || {
            let redis = redis.clone();
            async move { redis.ping().await }
        })
    }

    /// For readiness: `Err` says what is wrong.
    pub async fn ping(&self) -> Result<(), String> {
        let reply: RedisResult<String> = match &self.connection {
            Connection::Single(c) => redis::cmd("PING").query_async(&mut c.clone()).await,
            Connection::Cluster(c) => redis::cmd("PING").query_async(&mut c.clone()).await,
        };
        reply.map(drop).map_err(|err| format!("redis: {err}"))
    }

    /// Reads the state of `keys`, in order, in one round trip.
    pub async fn read(&self, keys: &[String]) -> RedisResult<Vec<Versioned>> {
        let start = Instant::now();
        let commands: Vec<Cmd> = keys
            .iter()
            .map(|key| {
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(key).arg("v").arg("s");
                cmd
            })
            .collect();
        type Reply = (Option<u64>, Option<Vec<u8>>);
        let replies: RedisResult<Vec<Reply>> = self.run(&commands).await;
        record("read", start, replies.is_ok());
        Ok(replies?
            .into_iter()
            .map(|(version, data)| Versioned {
                version: version.unwrap_or(0),
                data,
            })
            .collect())
    }

    /// Applies each write whose key is still at its expected version; `true` where it was.
    pub async fn write(&self, writes: &[Write]) -> RedisResult<Vec<bool>> {
        let start = Instant::now();
        let commands: Vec<Cmd> = writes
            .iter()
            .map(|write| {
                let ttl_ms = u64::try_from(write.ttl.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.cas.get_hash());
                match &write.log {
                    None => cmd
                        .arg(1)
                        .arg(&write.key)
                        .arg(write.expected)
                        .arg(&write.data)
                        .arg(ttl_ms),
                    Some(log) => cmd
                        .arg(2)
                        .arg(&write.key)
                        .arg(&log.key)
                        .arg(write.expected)
                        .arg(&write.data)
                        .arg(ttl_ms)
                        .arg(&log.append)
                        .arg(log.max_bytes),
                };
                cmd
            })
            .collect();
        let replies: RedisResult<Vec<i64>> = self.run_script(&self.cas, &commands).await;
        record("cas", start, replies.is_ok());
        Ok(replies?.into_iter().map(|applied| applied == 1).collect())
    }

    /// Reads a range of records of each log, in order, in one round trip; an absent log
    /// reads as empty. Only the records asked for cross the network, however long the log.
    pub async fn log_ranges(&self, ranges: &[LogRange]) -> RedisResult<Vec<Vec<u8>>> {
        let start = Instant::now();
        let commands: Vec<Cmd> = ranges
            .iter()
            .map(|range| {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(self.range.get_hash())
                    .arg(1)
                    .arg(&range.key)
                    .arg(range.record_size)
                    .arg(range.from)
                    .arg(range.to);
                cmd
            })
            .collect();
        let replies = self.run_script(&self.range, &commands).await;
        record("log_range", start, replies.is_ok());
        replies
    }

    /// Deletes `keys` (all in one hash slot); `true` if any existed.
    pub async fn delete(&self, keys: &[String]) -> RedisResult<bool> {
        let start = Instant::now();
        let deleted: RedisResult<u64> = match &self.connection {
            Connection::Single(c) => c.clone().del(keys).await,
            Connection::Cluster(c) => c.clone().del(keys).await,
        };
        record("delete", start, deleted.is_ok());
        Ok(deleted? > 0)
    }

    /// Runs EVALSHA `commands` of `script`; if Redis restarted or flushed its script cache,
    /// loads the script and goes again.
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        commands: &[Cmd],
    ) -> RedisResult<Vec<T>> {
        match self.run(commands).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                match &self.connection {
                    Connection::Single(c) => script.load_async(&mut c.clone()).await?,
                    // SCRIPT LOAD is routed to every primary.
                    Connection::Cluster(c) => script.load_async(&mut c.clone()).await?,
                };
                self.run(commands).await
            }
            replies => replies,
        }
    }

    async fn run<T: redis::FromRedisValue>(&self, commands: &[Cmd]) -> RedisResult<Vec<T>> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        match &self.connection {
            Connection::Single(c) => {
                let mut pipeline = Pipeline::with_capacity(commands.len());
                for cmd in commands {
                    pipeline.add_command(cmd.clone());
                }
                pipeline.query_async(&mut c.clone()).await
            }
            Connection::Cluster(c) => {
                try_join_all(commands.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<T>(&mut c).await }
                }))
                .await
            }
        }
    }
}

fn record(op: &'static str, start: Instant, ok: bool) {
    metrics::histogram!("redis_request_duration_seconds", "op" => op)
        .record(start.elapsed().as_secs_f64());
    if !ok {
        metrics::counter!("redis_errors_total", "op" => op).increment(1);
    }
}

/// True for errors worth retrying later (connection trouble, timeouts, failover).
pub fn is_transient(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_cluster_error()
}

/// How services find Redis: `REDIS_ADDR`, or `REDIS_CLUSTER_NODES` for a Redis Cluster.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct RedisConfig {
    /// `host:port` or `redis://` URL of a standalone Redis.
    pub redis_addr: String,
    /// Comma-separated seed nodes of a Redis Cluster; wins over `REDIS_ADDR` when set.
    pub redis_cluster_nodes: Vec<String>,
    /// Connect and response timeout of every Redis call.
    pub redis_timeout: crate::config::Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            redis_addr: "127.0.0.1:6379".into(),
            redis_cluster_nodes: Vec::new(),
            redis_timeout: crate::config::Duration::from_secs(2),
        }
    }
}

impl RedisConfig {
    pub fn target(&self) -> Target {
        if self.redis_cluster_nodes.is_empty() {
            Target::Single(redis_url(&self.redis_addr))
        } else {
            Target::Cluster(
                self.redis_cluster_nodes
                    .iter()
                    .map(|node| redis_url(node))
                    .collect(),
            )
        }
    }
}

fn redis_url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("redis://{addr}")
    }
}

impl crate::config::Validate for RedisConfig {
    fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::{Duration, check_range, url};
        url("REDIS_ADDR", &self.redis_addr, "redis")?;
        for node in &self.redis_cluster_nodes {
            url("REDIS_CLUSTER_NODES", node, "redis")?;
        }
        check_range(
            "REDIS_TIMEOUT",
            self.redis_timeout,
            Duration::from_millis(10)..=Duration::from_secs(60),
        )
    }
}
