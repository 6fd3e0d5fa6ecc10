//! Logs (JSON or pretty, filtered by `RUST_LOG`), OpenTelemetry traces over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and W3C trace-context propagation helpers.

pub use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::{Context, global, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    runtime,
    trace::{SdkTracerProvider, span_processor_with_async_runtime::BatchSpanProcessor},
};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{CommonConfig, LogFormat};

/// Flushes pending spans when dropped at the end of `main`.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// Installs the global subscriber and propagator; call once, inside the Tokio runtime.
pub fn init(service: &'static str, config: &CommonConfig) -> anyhow::Result<Telemetry> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder().with_service_name(service).build();
    let mut provider = SdkTracerProvider::builder().with_resource(resource);
    // Without an endpoint spans still get ids, so trace context passes through this service.
    if let Some(endpoint) = &config.otel_exporter_otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        provider = provider
            .with_span_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build());
    }
    let provider = provider.build();
    global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true),
            )
            .try_init()?,
        LogFormat::Pretty => registry
            .with(tracing_subscriber::fmt::layer().pretty())
            .try_init()?,
    }
    Ok(Telemetry { provider })
}

/// Writes the current span's trace context into `carrier`.
pub fn inject(carrier: &mut dyn Injector) {
    let context = tracing::Span::current().context();
    global::get_text_map_propagator(|propagator| propagator.inject_context(&context, carrier));
}

/// Reads a trace context written by [`inject`] on the other side.
pub fn extract(carrier: &dyn Extractor) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(carrier))
}

/// Makes `span` a child of the trace context found in `carrier`, if any.
pub fn set_parent(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent = extract(carrier);
    // An error only means the span is disabled (filtered out); nothing to link then.
    let _ = span.set_parent(parent);
}

/// Carries trace context in HTTP headers (incoming gRPC requests).
pub struct HeaderCarrier<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Carries trace context in outgoing gRPC metadata.
pub struct MetadataCarrier<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// A tonic client interceptor that propagates the current trace to the callee.
pub fn propagate(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    inject(&mut MetadataCarrier(request.metadata_mut()));
    Ok(request)
}
