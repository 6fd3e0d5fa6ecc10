//! Prometheus metrics: one recorder per process, rendered on `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds, 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Size buckets (fixes per batch, rows per insert).
const SIZE_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0, 500_000.0,
];

/// Byte-size buckets, 1 KiB to 256 MiB.
const BYTES_BUCKETS: &[f64] = &[
    1024.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
];

/// The process-wide recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), SIZE_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
            });
        let recorder = match builder {
            Ok(builder) => builder.build_recorder(),
            Err(error) => {
                tracing::error!(%error, "metric buckets rejected, using summaries");
                PrometheusBuilder::new().build_recorder()
            }
        };
        let handle = recorder.handle();
        if let Err(error) = metrics::set_global_recorder(recorder) {
            tracing::error!(%error, "another metrics recorder is installed");
        }
        handle
    })
}

/// [`register`] with the names written as words: `zero_metrics! { counter … ; gauge … }`.
#[macro_export]
macro_rules! zero_metrics {
    ($($counter:ident)* $(; $($gauge:ident)*)?) => {
        $crate::metrics::register(&[$(stringify!($counter)),*], &[$($(stringify!($gauge)),*)?])
    };
}

/// Makes counters and gauges visible at 0 before their first event, so that `rate()` and
/// `increase()` see that first event too.
pub fn register(counters: &[&'static str], gauges: &[&'static str]) {
    handle();
    for name in counters {
        metrics::counter!(*name).increment(0);
    }
    for name in gauges {
        metrics::gauge!(*name).increment(0.0);
    }
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}
