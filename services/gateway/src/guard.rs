//! The gate in front of the Gateway service, at the HTTP level: the API key is checked and the
//! tenant's concurrency slot taken from the headers alone, before any of the body is read, and
//! the body is then read through a per-method size limit that refuses an oversize message from
//! its 5-byte gRPC prefix, before tonic reserves memory for it or prost decodes it.
//! Health and reflection are other routes and stay open.

use std::{
    collections::HashMap,
    convert::Infallible,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http_body::{Frame, SizeHint};
use tonic::{Status, body::Body, codegen::Bytes, server::NamedService};
use tower::Service;

use crate::auth::{Credentials, Scope};

/// The authenticated tenant of a call, put into the request's extensions for the handlers.
#[derive(Clone, Debug)]
pub struct Tenant(pub String);

/// Encoded size of the largest valid fix inside an IngestRequest: field tag and length (3),
/// device id of 128 bytes with tag and length (131), time (11), lat and lon (9 each) and the
/// four optional floats (5 each). Checked against prost in the tests below.
pub const MAX_FIX_BYTES: usize = 183;

/// Decode limit of the query methods: their messages are a few ids and tokens.
pub const QUERY_MESSAGE_BYTES: usize = 64 * 1024;

/// Decode limit of Ingest and IngestStream messages: `max_batch` of the largest fixes, plus
/// room for the sequence number and fields a newer client may add.
pub fn ingest_message_bytes(max_batch: u32) -> usize {
    usize::try_from(max_batch).unwrap_or(usize::MAX / MAX_FIX_BYTES) * MAX_FIX_BYTES + 64 * 1024
}

/// What the guard enforces.
pub struct Settings {
    pub keys: Credentials,
    /// Fixes per Ingest message: counted on the wire, so that a message of many tiny (empty)
    /// fixes is refused before decoding turns its 2 bytes per fix into 80.
    pub max_batch: u32,
    /// Unary calls and GetTrack streams in flight per tenant; 0: no limit.
    pub tenant_requests: u32,
    /// IngestStream calls open per tenant; 0: no limit.
    pub tenant_streams: u32,
    pub ingest_message_bytes: usize,
}

/// Wraps the Gateway service (see the module comment).
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    keys: Credentials,
    max_batch: usize,
    requests: TenantSlots,
    streams: TenantSlots,
    ingest_message_bytes: usize,
}

impl<S> Guard<S> {
    pub fn new(inner: S, settings: Settings) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                keys: settings.keys,
                max_batch: usize::try_from(settings.max_batch).unwrap_or(usize::MAX),
                requests: TenantSlots::new(
                    "TENANT_MAX_CONCURRENT_REQUESTS",
                    settings.tenant_requests,
                ),
                streams: TenantSlots::new("TENANT_MAX_STREAMS", settings.tenant_streams),
                ingest_message_bytes: settings.ingest_message_bytes,
            }),
        }
    }
}

impl<S> Guard<S> {
    /// The same credentials and tenant slots, for the HTTP front door.
    pub fn admission(&self) -> Admission {
        Admission(self.shared.clone())
    }
}

/// What the guard checks, for front doors other than gRPC (see `http::api`).
#[derive(Clone)]
pub struct Admission(Arc<Shared>);

impl Admission {
    pub fn credentials(&self) -> &Credentials {
        &self.0.keys
    }

    /// One of the tenant's TENANT_MAX_CONCURRENT_REQUESTS slots, held while the slot lives.
    pub fn slot(&self, tenant: &str) -> Result<Slot, Status> {
        Self::take(&self.0.requests, tenant)
    }

    /// One of the tenant's TENANT_MAX_STREAMS slots, for a long-lived stream.
    pub fn stream_slot(&self, tenant: &str) -> Result<Slot, Status> {
        Self::take(&self.0.streams, tenant)
    }

    fn take(slots: &TenantSlots, tenant: &str) -> Result<Slot, Status> {
        slots.try_take(tenant).map_err(|refused| {
            metrics::counter!("gateway_tenant_limited_total", "tenant" => tenant.to_owned(), "kind" => refused.setting)
                .increment(1);
            refused.status()
        })
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

/// The streaming-request methods: long-lived, counted in their own slots.
pub const STREAM_METHODS: &[&str] = &["IngestStream", "Watch", "Relearn"];

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let refuse = |status: Status| -> Self::Future {
            Box::pin(futures::future::ready(Ok(status.into_http())))
        };
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        // The request body is not touched before this point: a caller without a valid key
        // costs the headers only, whatever it sends after them.
        let ingest = method.starts_with("Ingest");
        let scope = if ingest { Scope::Ingest } else { Scope::Full };
        let tenant = match self.shared.keys.tenant(request.headers(), scope) {
            Ok(tenant) => tenant,
            Err(error) => return refuse(error.into()),
        };
        let stream = STREAM_METHODS.contains(&method.as_str());
        let slots = if stream {
            &self.shared.streams
        } else {
            &self.shared.requests
        };
        let slot = match slots.try_take(&tenant) {
            Ok(slot) => slot,
            Err(refused) => {
                metrics::counter!("gateway_tenant_limited_total", "tenant" => tenant, "kind" => refused.setting)
                    .increment(1);
                return refuse(refused.status());
            }
        };
        let (limit, fixes) = if ingest {
            (
                self.shared.ingest_message_bytes,
                Some(self.shared.max_batch),
            )
        } else {
            (QUERY_MESSAGE_BYTES, None)
        };
        request.extensions_mut().insert(Tenant(tenant));
        let request = request.map(|body| Body::new(Limited::new(body, limit, fixes, method)));
        // The service that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            // The slot is held until the response body is done: for a stream, its whole life.
            Ok(response.map(|body| {
                Body::new(Held {
                    inner: body,
                    _slot: slot,
                })
            }))
        })
    }
}

/// Per-tenant counters of calls in flight, with a limit.
struct TenantSlots {
    setting: &'static str,
    limit: usize,
    in_use: Arc<Mutex<HashMap<String, usize>>>,
}

/// One call's place in its tenant's count, given back when dropped.
pub struct Slot {
    in_use: Option<Arc<Mutex<HashMap<String, usize>>>>,
    tenant: String,
}

struct Refused {
    setting: &'static str,
    limit: usize,
}

impl Refused {
    fn status(&self) -> Status {
        Status::resource_exhausted(format!(
            "too many concurrent calls for this tenant: {}={} reached; retry with backoff",
            self.setting, self.limit
        ))
    }
}

impl TenantSlots {
    fn new(setting: &'static str, limit: u32) -> Self {
        Self {
            setting,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            in_use: Arc::default(),
        }
    }

    fn try_take(&self, tenant: &str) -> Result<Slot, Refused> {
        if self.limit == 0 {
            return Ok(Slot {
                in_use: None,
                tenant: String::new(),
            });
        }
        let mut in_use = lock(&self.in_use);
        let count = in_use.entry(tenant.to_owned()).or_default();
        if *count >= self.limit {
            return Err(Refused {
                setting: self.setting,
                limit: self.limit,
            });
        }
        *count += 1;
        Ok(Slot {
            in_use: Some(self.in_use.clone()),
            tenant: tenant.to_owned(),
        })
    }

    #[cfg(test)]
    fn count(&self, tenant: &str) -> usize {
        lock(&self.in_use).get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(in_use) = &self.in_use {
            let mut in_use = lock(in_use);
            if let Some(count) = in_use.get_mut(&self.tenant) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    // Idle tenants take no memory.
                    in_use.remove(&self.tenant);
                }
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters are updated in one step each, so a poisoned lock holds consistent data.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A response body that holds its call's slot.
struct Held {
    inner: Body,
    _slot: Slot,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body read through the gRPC framing: every message announces its length in a
/// 5-byte prefix (flag, u32 length), and one longer than `limit` ends the body with
/// RESOURCE_EXHAUSTED before anything is buffered for it.
struct Limited {
    inner: Body,
    limit: usize,
    method: String,
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// For IngestRequest messages: their fixes counted on the wire.
    fixes: Option<FixCounter>,
    failed: bool,
}

impl Limited {
    fn new(inner: Body, limit: usize, max_fixes: Option<usize>, method: String) -> Self {
        Self {
            inner,
            limit,
            method,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            fixes: max_fixes.map(FixCounter::new),
            failed: false,
        }
    }

    /// Follows the framing through `data`; an error names the method and the limit.
    fn inspect(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                if let Some(fixes) = &mut self.fixes {
                    fixes.scan(&data[..n]);
                    // Checked with the message's last bytes, before tonic has it whole.
                    if self.remaining == 0 {
                        fixes.check()?;
                    }
                }
                data = &data[n..];
                continue;
            }
            let n = (self.prefix.len() - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + n].copy_from_slice(&data[..n]);
            self.prefix_len += n;
            data = &data[n..];
            if self.prefix_len == self.prefix.len() {
                self.prefix_len = 0;
                let [_, a, b, c, d] = self.prefix;
                let len = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
                if len > self.limit {
                    return Err(Status::resource_exhausted(format!(
                        "{} message of {len} bytes is larger than the {} bytes allowed",
                        self.method, self.limit
                    )));
                }
                self.remaining = len;
                if let Some(fixes) = &mut self.fixes {
                    fixes.restart();
                    // A compressed message cannot be walked (and the gateway accepts none).
                    if self.prefix[0] != 0 {
                        fixes.state = Scan::Done;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counts the `fixes` (field 1) of an IngestRequest from its protobuf encoding as it streams
/// by, without decoding: top-level fields are walked by tag, length-delimited ones skipped.
/// Encodings it does not expect end the count; prost then judges the message. The bytes still
/// reach tonic's buffer (bounded by the byte limit); only decoding them is avoided.
struct FixCounter {
    max: usize,
    count: usize,
    state: Scan,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scan {
    /// Reading a varint: a field's tag, a length (of a fix when `fix`), or a varint value.
    Varint {
        what: VarintOf,
        value: u64,
        shift: u32,
    },
    /// Bytes of a field's value to pass over.
    Skip(u64),
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VarintOf {
    Tag,
    Length { fix: bool },
    Value,
}

impl FixCounter {
    fn new(max: usize) -> Self {
        Self {
            max,
            count: 0,
            state: Scan::Varint {
                what: VarintOf::Tag,
                value: 0,
                shift: 0,
            },
        }
    }

    fn restart(&mut self) {
        *self = Self::new(self.max);
    }

    /// INVALID_ARGUMENT, as the service itself would answer, when the message that just
    /// ended had more than `max` fixes.
    fn check(&self) -> Result<(), Status> {
        if self.count > self.max {
            return Err(trackmesh_shared::grpc::invalid_argument(
                "fixes",
                format!("{} fixes, more than MAX_BATCH={}", self.count, self.max),
            ));
        }
        Ok(())
    }

    fn scan(&mut self, mut data: &[u8]) {
        while let Some(&byte) = data.first() {
            match &mut self.state {
                Scan::Done => return,
                Scan::Skip(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    *n -= take as u64;
                    data = &data[take..];
                    if *n == 0 {
                        self.state = tag();
                    }
                }
                Scan::Varint { what, value, shift } => {
                    data = &data[1..];
                    if *shift > 63 {
                        self.state = Scan::Done;
                        continue;
                    }
                    *value |= u64::from(byte & 0x7f) << *shift;
                    *shift += 7;
                    if byte & 0x80 != 0 {
                        continue;
                    }
                    let (what, value) = (*what, *value);
                    self.state = match what {
                        VarintOf::Tag => match (value >> 3, value & 7) {
                            (_, 0) => Scan::Varint {
                                what: VarintOf::Value,
                                value: 0,
                                shift: 0,
                            },
                            (_, 1) => Scan::Skip(8),
                            (field, 2) => Scan::Varint {
                                what: VarintOf::Length { fix: field == 1 },
                                value: 0,
                                shift: 0,
                            },
                            (_, 5) => Scan::Skip(4),
                            _ => Scan::Done,
                        },
                        VarintOf::Length { fix } => {
                            self.count += usize::from(fix);
                            if value == 0 { tag() } else { Scan::Skip(value) }
                        }
                        VarintOf::Value => tag(),
                    };
                }
            }
        }
    }
}

fn tag() -> Scan {
    Scan::Varint {
        what: VarintOf::Tag,
        value: 0,
        shift: 0,
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Err(status) = self.inspect(data)
        {
            self.failed = true;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use trackmesh_proto::v1::{Fix, IngestRequest};

    use super::*;

    #[test]
    fn the_largest_fix_fits_max_fix_bytes() {
        let fix = Fix {
            device_id: "\u{10FFFF}".repeat(32),
            time_ms: i64::MIN,
            lat: -90.0,
            lon: -180.0,
            accuracy_m: Some(f32::MAX),
            speed_mps: Some(f32::MAX),
            heading_deg: Some(f32::MAX),
            altitude_m: Some(f32::MAX),
        };
        assert_eq!(fix.device_id.len(), 128);
        let one = IngestRequest {
            fixes: vec![fix],
            sequence: 0,
        };
        assert_eq!(one.encoded_len(), MAX_FIX_BYTES);
        let full = IngestRequest {
            fixes: vec![one.fixes[0].clone(); 1000],
            sequence: u64::MAX,
        };
        assert!(full.encoded_len() <= ingest_message_bytes(1000));
    }

    fn framed(len: u32) -> Vec<u8> {
        let mut data = vec![0];
        data.extend_from_slice(&len.to_be_bytes());
        data.extend(std::iter::repeat_n(7, len as usize));
        data
    }

    #[test]
    fn framing_is_followed_across_chunks() {
        let mut limited = Limited::new(Body::empty(), 10, None, "Ingest".into());
        let mut data = framed(10);
        data.extend(framed(0));
        data.extend(framed(3));
        // Every split of the same bytes gives the same answer.
        for chunk in 1..data.len() {
            let mut limited = Limited::new(Body::empty(), 10, None, "Ingest".into());
            for part in data.chunks(chunk) {
                limited.inspect(part).unwrap();
            }
            assert_eq!((limited.prefix_len, limited.remaining), (0, 0));
        }
        let mut over = framed(10);
        over.extend(framed(11));
        let err = over
            .chunks(4)
            .try_for_each(|part| limited.inspect(part))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            err.message(),
            "Ingest message of 11 bytes is larger than the 10 bytes allowed"
        );
    }

    #[test]
    fn slots_are_per_tenant_and_given_back() {
        let slots = TenantSlots::new("TENANT_MAX_STREAMS", 2);
        let a1 = slots.try_take("a").ok().unwrap();
        let _a2 = slots.try_take("a").ok().unwrap();
        let refused = slots.try_take("a").err().unwrap();
        assert!(refused.status().message().contains("TENANT_MAX_STREAMS=2"),);
        assert!(slots.try_take("b").is_ok(), "another tenant");
        drop(a1);
        assert_eq!(slots.count("a"), 1);
        assert!(slots.try_take("a").is_ok());
        assert_eq!(slots.count("b"), 0, "forgotten when idle");
        let off = TenantSlots::new("TENANT_MAX_STREAMS", 0);
        let held: Vec<_> = (0..1000).map(|_| off.try_take("a").ok().unwrap()).collect();
        assert_eq!(held.len(), 1000);
    }

    /// `fixes` fixes (and every other field set) as an IngestRequest, framed.
    fn ingest(fixes: usize) -> Vec<u8> {
        let fix = Fix {
            device_id: "d".repeat(200),
            time_ms: 1_750_000_000_000,
            lat: 1.5,
            lon: -2.5,
            accuracy_m: Some(3.0),
            speed_mps: Some(4.0),
            heading_deg: None,
            altitude_m: Some(5.0),
        };
        let message = IngestRequest {
            fixes: vec![fix; fixes],
            sequence: 300,
        }
        .encode_to_vec();
        let mut data = vec![0];
        data.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
        data.extend(message);
        data
    }

    #[test]
    fn fixes_are_counted_on_the_wire() {
        let mut data = ingest(3);
        data.extend(ingest(3));
        data.extend(ingest(0));
        for chunk in [1, 2, 7, 100, data.len()] {
            let mut limited = Limited::new(Body::empty(), 1 << 20, Some(3), "Ingest".into());
            for part in data.chunks(chunk) {
                limited.inspect(part).unwrap();
            }
        }
        for chunk in [1, 3, 64, 10_000] {
            let mut limited = Limited::new(Body::empty(), 1 << 20, Some(3), "Ingest".into());
            let err = ingest(4)
                .chunks(chunk)
                .try_for_each(|part| limited.inspect(part))
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert_eq!(err.message(), "fixes: 4 fixes, more than MAX_BATCH=3");
        }
        // Empty fixes, two bytes each, are fixes too.
        let mut limited = Limited::new(Body::empty(), 1 << 20, Some(1000), "Ingest".into());
        let mut data = vec![0];
        data.extend_from_slice(&2002_u32.to_be_bytes());
        data.extend([0x0a, 0x00].repeat(1001));
        assert!(limited.inspect(&data).is_err());
    }
}
