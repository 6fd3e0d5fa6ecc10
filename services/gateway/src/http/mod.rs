//! The HTTP front door: the routes (`api`), and the pure parsing of the device protocols and
//! the JSON API behind them.

pub mod api;
pub mod fields;
pub mod ingest_json;
pub mod osmand;
pub mod owntracks;

#[cfg(test)]
mod roundtrip_tests;
