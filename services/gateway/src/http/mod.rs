//! The HTTP front door: the routes (`api`), live fixes over SSE (`live`), and the pure parsing of the device protocols and
//! the JSON API behind them.

pub mod api;
pub mod console;
pub mod fields;
pub mod geofences;
pub mod history;
pub mod ingest_json;
pub mod live;
pub mod osmand;
pub mod owntracks;

#[cfg(test)]
mod roundtrip_tests;
