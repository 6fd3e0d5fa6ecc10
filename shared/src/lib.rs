//! What the four trackmesh services share: the domain ids, the device-state store, the
//! topics' messages, config, telemetry, serving, health, shutdown, geo math.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod config;
mod conn;
pub mod domain;
pub mod event_messages;
pub mod fix_messages;
pub mod geo;
pub mod grpc;
pub mod metrics;
pub mod redis;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod telemetry;
pub mod tls;
