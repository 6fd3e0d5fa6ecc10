//! Fuzzing of the HTTP front door (issue 12): thousands of mutated HTTP/1.1 requests, sent as raw
//! bytes so that invalid UTF-8, broken percent-encoding, absurd numbers, bad JSON, wrong
//! content lengths, odd methods and paths reach the gateway as a hostile client would send them.
//! The gateway, a process of the real mesh, must answer each with a status below 500 (or close
//! the connection), and still be alive and healthy afterwards.

mod common;

use std::{collections::BTreeMap, time::Duration};

use base64::Engine as _;
use common::{Mesh, Options};
use futures::StreamExt as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const REQUESTS: usize = 10_000;
/// Connections in flight at once.
const PARALLEL: usize = 64;
/// A request whose body never completes may get no answer at all; that is fine.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// One request before serialization, so that mutations can aim at one part of it.
#[derive(Clone)]
struct Parts {
    method: Vec<u8>,
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
}

/// Tokens that break parsers: encodings, numbers at or beyond their limits, JSON syntax, framing.
const TOKENS: &[&[u8]] = &[
    b"%",
    b"%f",
    b"%ff",
    b"%zz",
    b"%00",
    b"%2f",
    b"%2e%2e",
    b"\xff",
    b"\xc3\x28",
    b"\xf0\x9f\x9a\x80",
    b"\0",
    b"NaN",
    b"nan",
    b"inf",
    b"-inf",
    b"Infinity",
    b"1e999",
    b"-1e999",
    b"1e-999",
    b"-0",
    b"-1",
    b"0x10",
    b"9223372036854775807",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"4294967296",
    b"1.7976931348623157e308",
    b"99999999999999999999999999999999",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"null",
    b"true",
    b",",
    b":",
    b"&",
    b"=",
    b"&&",
    b"==",
    b"?",
    b"#",
    b";",
    b"/",
    b"..",
    b" ",
    b"+",
    b"\r\n",
    b"\n",
    b"\r",
    b"\t",
];

fn now_s() -> i64 {
    common::now_ms() / 1000
}

/// Valid requests for every route, for tenant `tenant` with API key `key`.
fn seeds(rng: &mut fastrand::Rng, tenant: &str, key: &str) -> Vec<Parts> {
    let device = format!("fz{}", rng.u32(..1000));
    let bearer = format!("Bearer {key}").into_bytes();
    let ts = now_s() - i64::from(rng.u32(..86_400));
    let (lat, lon) = (rng.f64() * 170.0 - 85.0, rng.f64() * 350.0 - 175.0);
    let get = |target: String| Parts {
        method: b"GET".to_vec(),
        target: target.into_bytes(),
        headers: vec![(b"authorization".to_vec(), bearer.clone())],
        body: Vec::new(),
    };
    let post = |target: String, headers: Vec<(Vec<u8>, Vec<u8>)>, body: String| Parts {
        method: b"POST".to_vec(),
        target: target.into_bytes(),
        headers,
        body: body.into_bytes(),
    };
    let json = (b"content-type".to_vec(), b"application/json".to_vec());
    let form = (
        b"content-type".to_vec(),
        b"application/x-www-form-urlencoded".to_vec(),
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{tenant}:{key}"));
    let osmand_query = format!(
        "id={device}&lat={lat}&lon={lon}&timestamp={ts}&speed=3.5&bearing=90&altitude=12&accuracy=5&hdop=0.9&batt=80"
    );
    vec![
        Parts {
            headers: Vec::new(),
            ..get(format!("/osmand/{key}?{osmand_query}"))
        },
        post(format!("/osmand/{key}"), vec![form], osmand_query.clone()),
        post(
            format!("/osmand/{key}"),
            vec![json.clone()],
            format!(
                r#"{{"location":{{"timestamp":"2025-06-15T13:45:12.862Z","coords":{{"latitude":{lat},"longitude":{lon},"accuracy":5,"speed":1,"heading":-1,"altitude":5}},"is_moving":false,"battery":{{"level":0.5}}}},"device_id":"{device}"}}"#
            ),
        ),
        post(
            "/owntracks".into(),
            vec![
                json.clone(),
                (
                    b"authorization".to_vec(),
                    format!("Basic {basic}").into_bytes(),
                ),
                (b"x-limit-u".to_vec(), b"alice".to_vec()),
                (b"x-limit-d".to_vec(), device.clone().into_bytes()),
            ],
            format!(
                r#"{{"_type":"location","tid":"a1","lat":{lat},"lon":{lon},"tst":{ts},"acc":10,"alt":3,"batt":87,"cog":270,"vel":12}}"#
            ),
        ),
        post(
            "/v1/ingest".into(),
            vec![
                json.clone(),
                (b"x-api-key".to_vec(), key.as_bytes().to_vec()),
            ],
            format!(
                r#"{{"sequence":"7","fixes":[{{"deviceId":"{device}","timeMs":"{}","lat":{lat},"lon":{lon},"accuracyM":5,"speedMps":1.5}},{{"deviceId":"{device}","timeMs":{},"lat":"{lat}","lon":{lon}}}]}}"#,
                ts * 1000,
                ts * 1000 + 60_000
            ),
        ),
        get("/v1/devices?page_size=5&sort=-last_ms,device_id".into()),
        get(format!(
            "/v1/devices/{device}/track?from={}&to={}&format={}",
            (ts - 3600) * 1000,
            (ts + 3600) * 1000,
            ["json", "geojson", "gpx", "csv"][rng.usize(..4)]
        )),
        get(format!(
            "/v1/devices/{device}/stats?from=0&to={}",
            ts * 1000
        )),
        get(format!("/v1/devices/{device}/places?k=3")),
        get(format!("/v1/devices/{device}/predict?k=2")),
        Parts {
            method: b"DELETE".to_vec(),
            ..get(format!("/v1/devices/{device}"))
        },
    ]
}

/// A mutated copy of `bytes`: flips, insertions of tokens or long runs, deletions,
/// duplications and truncations.
fn mutate_bytes(rng: &mut fastrand::Rng, bytes: &mut Vec<u8>) {
    for _ in 0..=rng.usize(..4) {
        let at = rng.usize(..=bytes.len());
        match rng.u8(..8) {
            0 if !bytes.is_empty() => {
                let i = rng.usize(..bytes.len());
                bytes[i] ^= 1 << rng.u8(..8);
            }
            1 if !bytes.is_empty() => {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
            2 | 3 => {
                let token = TOKENS[rng.usize(..TOKENS.len())];
                bytes.splice(at..at, token.iter().copied());
            }
            4 => {
                let end = (at + rng.usize(..16)).min(bytes.len());
                bytes.drain(at..end);
            }
            5 if !bytes.is_empty() => {
                // Duplicate a slice: repeated parameters, keys, brackets.
                let start = rng.usize(..bytes.len());
                let end = (start + rng.usize(1..64)).min(bytes.len());
                let slice = bytes[start..end].to_vec();
                bytes.splice(at..at, slice);
            }
            6 => {
                let len = [100, 4096, 20_000, 70_000][rng.usize(..4)];
                let byte = [b'a', b'9', b'%', b'{', b'[', b'&'][rng.usize(..6)];
                bytes.splice(at..at, std::iter::repeat_n(byte, len));
            }
            _ => bytes.truncate(at),
        }
    }
}

/// The request as bytes, with one of several kinds of damage (or none).
fn build(rng: &mut fastrand::Rng, mut parts: Parts) -> Vec<u8> {
    match rng.u8(..10) {
        0 => mutate_bytes(rng, &mut parts.target),
        1 | 2 => mutate_bytes(rng, &mut parts.body),
        3 => {
            parts.method = match rng.u8(..8) {
                0 => b"PUT".to_vec(),
                1 => b"PATCH".to_vec(),
                2 => b"HEAD".to_vec(),
                3 => b"OPTIONS".to_vec(),
                4 => b"G\xffT".to_vec(),
                5 => Vec::new(),
                6 => b"CONNECT".to_vec(),
                _ => b"DELETE".to_vec(),
            }
        }
        4 if !parts.headers.is_empty() => {
            let i = rng.usize(..parts.headers.len());
            mutate_bytes(rng, &mut parts.headers[i].1);
        }
        5 => {
            let (name, value): (&[u8], Vec<u8>) = match rng.u8(..6) {
                0 => (b"x-long", vec![b'x'; rng.usize(1..40_000)]),
                1 => (b"content-type", b"application/json; charset=\xff".to_vec()),
                2 => (b"transfer-encoding", b"chunked".to_vec()),
                3 => (b"authorization", b"Basic !!!".to_vec()),
                4 => (b"x-api-key", b"\xff\xfe".to_vec()),
                _ => (b"content-length", rng.u64(..).to_string().into_bytes()),
            };
            parts.headers.push((name.to_vec(), value));
        }
        6 => {
            // Shuffle the query parameters or duplicate some of them.
            let target = parts.target.clone();
            if let Some(q) = target.iter().position(|&b| b == b'?') {
                let mut pairs: Vec<&[u8]> = target[q + 1..].split(|&b| b == b'&').collect();
                rng.shuffle(&mut pairs);
                let extra: Vec<&[u8]> = pairs.iter().filter(|_| rng.bool()).copied().collect();
                pairs.extend(extra);
                parts.target = [&target[..=q], &pairs.join(&b'&')[..]].concat();
            } else {
                mutate_bytes(rng, &mut parts.target);
            }
        }
        _ => {
            mutate_bytes(rng, &mut parts.body);
            mutate_bytes(rng, &mut parts.target);
        }
    }
    // The declared length: mostly right, sometimes short, long, absent or garbage.
    let length = match rng.u8(..12) {
        0 => Some(
            (parts.body.len() + rng.usize(1..100))
                .to_string()
                .into_bytes(),
        ),
        1 => Some(
            parts
                .body
                .len()
                .saturating_sub(rng.usize(1..10))
                .to_string()
                .into_bytes(),
        ),
        2 => None,
        3 => Some(b"-1".to_vec()),
        4 => Some(b"1e3".to_vec()),
        _ => Some(parts.body.len().to_string().into_bytes()),
    };
    let mut out = serialize(&parts, length.as_deref());
    // Rarely, damage the framing itself (request line, header block, anything).
    if rng.u8(..20) == 0 {
        mutate_bytes(rng, &mut out);
    }
    out
}

fn serialize(parts: &Parts, length: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&parts.method);
    out.push(b' ');
    out.extend_from_slice(&parts.target);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(length) = length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(length);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&parts.body);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Status(u16),
    /// Closed (or reset) without a status line: e.g. a request line hyper cannot parse.
    Closed,
    /// No answer within READ_TIMEOUT: e.g. a body shorter than its declared length.
    Timeout,
}

async fn send(addr: std::net::SocketAddr, request: &[u8]) -> (Outcome, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect to gateway");
    // The server may answer (and close) before reading everything: a failed write is fine.
    // No shutdown(Write) after it: the server (hyper, no half-close) takes an EOF as the
    // client gone and drops the request unanswered, so a body shorter than its declared
    // length waits for READ_TIMEOUT instead.
    let _ = stream.write_all(request).await;
    if std::env::var("FUZZ_SHUTDOWN").is_ok() {
        let _ = stream.shutdown().await;
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let status = response
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| std::str::from_utf8(rest.get(..3)?).ok())
        .and_then(|code| code.parse().ok());
    let outcome = match (status, read) {
        (Some(status), _) => Outcome::Status(status),
        (None, Ok(())) => Outcome::Closed,
        (None, Err(_)) => Outcome::Timeout,
    };
    (outcome, response)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesized command name; Z is a zombie (exited).
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_get_a_5xx_and_the_gateway_survives() {
    let mesh = Mesh::start(Options::default()).await;
    let addr = mesh.gateway.addr();
    let (tenant, key) = mesh.tenants[0].clone();
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x007e_5712);
    println!("FUZZ_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let requests: Vec<Vec<u8>> = (0..REQUESTS)
        .map(|i| {
            let mut seeds = seeds(&mut rng, &tenant, &key);
            let parts = seeds.swap_remove(rng.usize(..seeds.len()));
            // One request in ten is sent as is: the valid paths must work too.
            if i % 10 == 0 {
                let length = parts.body.len().to_string().into_bytes();
                serialize(&parts, Some(&length))
            } else {
                build(&mut rng, parts)
            }
        })
        .collect();

    let outcomes: Vec<(Outcome, Vec<u8>, usize)> =
        futures::stream::iter(requests.iter().enumerate())
            .map(|(i, request)| async move {
                let (outcome, response) = send(addr, request).await;
                (outcome, response, i)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;

    let mut counts: BTreeMap<Outcome, usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for (outcome, response, i) in &outcomes {
        let count = counts.entry(*outcome).or_default();
        if *count == 0 && !matches!(outcome, Outcome::Status(200)) {
            let body = response
                .trim_ascii_end()
                .split(|&b| b == b'\n')
                .next_back()
                .unwrap_or_default();
            println!(
                "first {outcome:?}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
        }
        *count += 1;
        if matches!(outcome, Outcome::Status(status) if *status >= 500) && failures.len() < 5 {
            let request = &requests[*i];
            failures.push(format!(
                "request #{i}:\n{}\n--- answer:\n{}",
                String::from_utf8_lossy(&request[..request.len().min(2000)]),
                String::from_utf8_lossy(&response[..response.len().min(2000)])
            ));
        }
    }
    println!("outcomes of {REQUESTS} requests: {counts:?}");
    assert!(
        failures.is_empty(),
        "5xx answers:\n{}",
        failures.join("\n\n")
    );
    // The fuzz reached the routes: valid requests succeeded and broken ones were refused.
    assert!(
        counts.get(&Outcome::Status(200)).copied().unwrap_or(0) > REQUESTS / 20,
        "{counts:?}"
    );
    assert!(
        counts.get(&Outcome::Status(400)).copied().unwrap_or(0) > REQUESTS / 20,
        "{counts:?}"
    );

    let pid = mesh.gateway.pid().expect("gateway child");
    assert!(alive(pid), "the gateway process exited");
    assert_eq!(testkit::http_status(addr, "/health").await, Some(200));
    // And it still takes a fix.
    let (outcome, response) = send(
        addr,
        format!(
            "GET /osmand/{key}?id=after-fuzz&lat=1.5&lon=2.5&timestamp={} HTTP/1.1\r\nhost: g\r\nconnection: close\r\n\r\n",
            now_s()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::Status(200),
        "{}",
        String::from_utf8_lossy(&response)
    );
}
