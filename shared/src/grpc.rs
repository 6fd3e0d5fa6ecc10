//! gRPC plumbing every service shares: the server layer (per-method metrics, trace context,
//! load shedding), deadlines, and error statuses that name the offending field.

use std::{
    fmt,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status, metadata::MetadataMap};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::telemetry;

/// The longest rule an INVALID_ARGUMENT carries; longer ones are cut.
pub const MAX_RULE_BYTES: usize = 512;

/// INVALID_ARGUMENT naming `field` and the rule it breaks, with a `google.rpc.BadRequest` detail.
pub fn invalid_argument(field: &str, rule: impl fmt::Display) -> Status {
    let mut rule = rule.to_string();
    // The message travels in HTTP/2 headers (twice, with the details): a rule that quotes a
    // huge input would overflow the peer's header limit and fail the whole connection.
    if rule.len() > MAX_RULE_BYTES {
        let mut end = MAX_RULE_BYTES;
        while !rule.is_char_boundary(end) {
            end -= 1;
        }
        rule.truncate(end);
        rule.push('…');
    }
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {rule}"),
        ErrorDetails::with_bad_request_violation(field, rule),
    )
}

/// Implements a tonic service trait whose unary methods each hand the request's message to an
/// inherent method of the same name, `async fn(&self, Message) -> Result<Reply, E>` with
/// `Status: From<E>`; the other items (streaming methods) follow as written.
#[macro_export]
macro_rules! unary_methods {
    (impl $service:ident for $ty:ty {
        $($method:ident($request:ty) -> $reply:ty;)*
    } $($rest:tt)*) => {
        #[tonic::async_trait]
        impl $service for $ty {
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$request>,
                ) -> Result<tonic::Response<$reply>, tonic::Status> {
                    Ok(tonic::Response::new(Self::$method(self, request.into_inner()).await?))
                }
            )*
            $($rest)*
        }
    };
}

/// When a request must be answered by: the caller's `grpc-timeout`, capped by `max`.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The deadline the caller propagated in `grpc-timeout`, or `max` from now, whichever is sooner.
    pub fn from_metadata(metadata: &MetadataMap, max: Duration) -> Self {
        let timeout = metadata
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map_or(max, |timeout| timeout.min(max));
        Self::after(timeout)
    }

    /// Time left, never zero (a zero timeout would mean "none" to some clients).
    pub fn remaining(self) -> Duration {
        self.0
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Time to spend on work, keeping a little back for the answer to reach the caller
    /// before its own deadline fires.
    pub fn budget(self) -> Duration {
        let remaining = self.remaining();
        remaining
            .saturating_sub((remaining / 10).min(Duration::from_millis(200)))
            .max(Duration::from_millis(1))
    }
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Wraps every gRPC call: a span continuing the caller's trace, a global concurrency limit
/// that sheds load with RESOURCE_EXHAUSTED, and `grpc_server_*` metrics by method and code.
#[derive(Clone)]
pub struct GrpcLayer {
    permits: Arc<Semaphore>,
    own_limits: Arc<[String]>,
}

impl GrpcLayer {
    pub fn new(max_concurrent_requests: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent_requests)),
            own_limits: Arc::new([]),
        }
    }

    /// Paths (`/package.Service/Method`) of long-lived calls the service bounds itself: they
    /// take no permit, so that idle streams cannot hold the permits every other call needs.
    pub fn with_own_limits(mut self, paths: &[String]) -> Self {
        self.own_limits = paths.into();
        self
    }
}

impl<S> Layer<S> for GrpcLayer {
    type Service = GrpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcService {
            inner,
            permits: self.permits.clone(),
            own_limits: self.own_limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcService<S> {
    inner: S,
    permits: Arc<Semaphore>,
    own_limits: Arc<[String]>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The service that was polled ready is the one that must be called.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
        if !is_grpc {
            return Box::pin(async move {
                let response = inner.call(request).await?;
                Ok(response.map(|body| MeteredBody {
                    inner: body,
                    call: None,
                }))
            });
        }

        let (service, method) = split_path(request.uri().path());
        // Probes and reflection must answer even under overload.
        let exempt = service.starts_with("grpc.health.")
            || service.starts_with("grpc.reflection.")
            || self
                .own_limits
                .iter()
                .any(|path| path == request.uri().path());
        let permit = if exempt {
            None
        } else if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            Some(permit)
        } else {
            let call = Call::start(service, method, None, tracing::Span::none());
            call.finish(Code::ResourceExhausted);
            let status = Status::resource_exhausted(
                "server overloaded: too many concurrent requests, retry with backoff",
            );
            return Box::pin(futures::future::ready(Ok(status
                .into_http::<ResBody>()
                .map(|body| MeteredBody {
                    inner: body,
                    call: None,
                }))));
        };

        let span = tracing::info_span!(
            "grpc request",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        telemetry::set_parent(&span, &telemetry::HeaderCarrier(request.headers()));
        let mut call = Call::start(service, method, permit, span.clone());
        Box::pin(async move {
            let response = inner.call(request).instrument(span).await?;
            // Errors are often "trailers-only": the status is in the headers.
            call.code = header_code(response.headers());
            Ok(response.map(|body| MeteredBody {
                inner: body,
                call: Some(call),
            }))
        })
    }
}

fn split_path(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_owned();
    let method = parts.next().unwrap_or_default().to_owned();
    (service, method)
}

fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// One call being measured; recorded when its response body is done or dropped.
struct Call {
    service: String,
    method: String,
    start: Instant,
    code: Option<Code>,
    span: tracing::Span,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Call {
    fn start(
        service: String,
        method: String,
        permit: Option<OwnedSemaphorePermit>,
        span: tracing::Span,
    ) -> Self {
        Self {
            service,
            method,
            start: Instant::now(),
            code: None,
            span,
            _permit: permit,
        }
    }

    fn finish(mut self, code: Code) {
        self.code = Some(code);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // No status at all means the client went away before the end.
        let code = self.code.unwrap_or(Code::Cancelled);
        let code_name = format!("{code:?}");
        self.span.record("rpc.grpc.status_code", code as i32);
        let labels = [
            ("grpc_service", self.service.clone()),
            ("grpc_method", self.method.clone()),
            ("grpc_code", code_name),
        ];
        metrics::counter!("grpc_server_handled_total", &labels).increment(1);
        metrics::histogram!("grpc_server_handling_seconds", &labels)
            .record(self.start.elapsed().as_secs_f64());
    }
}

pin_project_lite::pin_project! {
    /// A response body that records its call's metrics once the status trailer has passed.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(code) = frame.trailers_ref().and_then(header_code) {
                        call.code = Some(code);
                    }
                }
                Some(Err(_)) => call.code = Some(Code::Internal),
                None => {
                    if call.code.is_none() {
                        call.code = Some(Code::Unknown);
                    }
                    *this.call = None;
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Default> Default for MeteredBody<B> {
    fn default() -> Self {
        Self {
            inner: B::default(),
            call: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_rules_are_cut_to_fit_in_headers() {
        let status = invalid_argument(
            "sort[0].field",
            format!("unknown field {:?}", "é".repeat(20_000)),
        );
        assert!(
            status.message().len() <= MAX_RULE_BYTES + 20,
            "{}",
            status.message().len()
        );
        assert!(status.message().starts_with("sort[0].field: unknown field"));
        assert!(status.message().ends_with('…'));
        assert_eq!(invalid_argument("lat", "short").message(), "lat: short");
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[test]
    fn deadline_takes_the_sooner() {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", "100m".parse().unwrap());
        let deadline = Deadline::from_metadata(&metadata, Duration::from_secs(30));
        assert!(deadline.remaining() <= Duration::from_millis(100));
        let deadline = Deadline::from_metadata(&MetadataMap::new(), Duration::from_millis(50));
        assert!(deadline.remaining() <= Duration::from_millis(50));
    }

    #[test]
    fn invalid_argument_names_field() {
        let status = invalid_argument("fixes[3].lat", "must be within ±90");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "fixes[3].lat: must be within ±90");
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations[0].field, "fixes[3].lat");
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/trackmesh.v1.Refinement/Refine"),
            ("trackmesh.v1.Refinement".to_owned(), "Refine".to_owned())
        );
    }
}
