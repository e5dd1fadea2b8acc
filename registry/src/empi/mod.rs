//! Enterprise master patient index: matching engine (pure) and identity store.
//!
//! The engine does no IO. Flow: [`record::prepare`] a [`record::SourceRecord`] →
//! [`blocking::blocking_keys`] (stored by the storage layer as `(record_id, key)`) →
//! candidates sharing a key → [`compare::compare`] → [`fs::MatchParameters::score`] →
//! [`fs::Thresholds::decide`]. Parameters are estimated by [`fs::estimate`] (EM) and stored
//! as JSON. [`synth`] generates a population with ground truth and [`evaluate`] measures
//! linkage quality on it.

pub mod blocking;
pub mod compare;
pub mod evaluate;
pub mod fs;
pub mod ident;
pub mod normalize;
pub mod record;
pub mod store;
pub mod synth;
