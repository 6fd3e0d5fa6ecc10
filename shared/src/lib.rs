//! What the four trackmesh services share: config, telemetry, serving, health, shutdown, geo math.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod config;
mod conn;
pub mod fix_messages;
pub mod geo;
pub mod grpc;
pub mod ids;
pub mod metrics;
pub mod redis;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
