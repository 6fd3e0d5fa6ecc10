//! Parsing for the HTTP front door (issue 12): device protocols and the JSON API, pure functions.

pub mod fields;
pub mod ingest_json;
pub mod osmand;
pub mod owntracks;

#[cfg(test)]
mod roundtrip_tests;
