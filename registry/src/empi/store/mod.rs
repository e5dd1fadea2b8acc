//! Identity store: source records, enterprise persons, links with their evidence, blocking
//! keys, the review queue, stored match parameters and the event log (`empi_*` tables).
//!
//! Invariants:
//! - Every write ([`register`], [`merge`], [`unmerge`], [`resolve_review`]) is one transaction:
//!   on error nothing is stored.
//! - Writers that can create or move links are serialised where they could race: on SQLite
//!   the transaction's first statement writes `empi_write_lock` (so it holds the write lock
//!   from the start, like `BEGIN IMMEDIATE`); on PostgreSQL it takes transaction-scoped
//!   advisory locks on the identifier, then on the record's blocking keys in sorted order
//!   (persons first for merges), so two institutions registering the same person at the same
//!   moment end with one enterprise person and no deadlock. Every such writer holds one
//!   writers' lock in shared mode first; a bulk batch of [`EXCLUSIVE_BATCH`] records or more
//!   holds it exclusive instead of its ~7 locks per record (other writers wait for its commit).
//! - Links decided `manual` or `merge` are never changed by the matcher; pairs a steward kept
//!   separate are never linked automatically.
//! - Registration is idempotent on (identifier system, value): the same content creates
//!   nothing; changed content updates the record and re-matches it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{NaiveDate, NaiveDateTime};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::blocking::{blocking_keys, phone_key};
use super::compare::{ComparisonVector, compare};
use super::fs::{
    Decision, EmOptions, MatchParameters, ModelError, Score, Thresholds, estimate,
    estimate_u_from_random_pairs,
};
use super::ident::Sex;
use super::record::{PreparedRecord, RecordId, SourceRecord, prepare};
use crate::documents::outbox::{self, NewEvent};
use crate::store::schema::{
    empi_blocking_keys as keys_t, empi_events as events_t, empi_links as links_t,
    empi_parameters as params_t, empi_persons as persons_t, empi_quality_issues as issues_t,
    empi_review_items as review_t, empi_source_records as records_t, empi_write_lock, institutions,
};
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// The EM-estimated model shipped with the binary, used until `yiqiao mpi reestimate` stores
/// one. Produced by `cargo run --release -p yiqiao-registry --example empi_evaluate -- 100000
/// 1 registry/src/empi/default_model.json`; no weight in it is set by hand.
const DEFAULT_MODEL: &str = include_str!("../default_model.json");

/// Most candidate records scored for one registration or `$match`.
pub const MAX_CANDIDATES: i64 = 1_000;

/// Match parameters with the thresholds and prior they were estimated with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredModel {
    pub parameters: MatchParameters,
    pub thresholds: Thresholds,
    /// Prior match probability of a random record pair (for posterior probabilities).
    pub prior: f64,
    /// How it was obtained.
    pub source: String,
}

impl StoredModel {
    pub fn to_json(&self) -> Result<String, ModelError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    pub fn from_json(json: &str) -> Result<StoredModel, ModelError> {
        let mut model: StoredModel = serde_json::from_str(json)?;
        // Re-check the fields and levels against this engine.
        model.parameters = MatchParameters::from_json(&serde_json::to_string(&model.parameters)?)?;
        Ok(model)
    }

    /// The model shipped with the binary.
    pub fn shipped() -> Result<StoredModel, ModelError> {
        StoredModel::from_json(DEFAULT_MODEL)
    }

    /// Posterior match probability of a score.
    pub fn posterior(&self, total: f64) -> f64 {
        let prior = self.prior.clamp(1e-15, 1.0 - 1e-15);
        let odds = (prior / (1.0 - prior)) * total.exp2();
        if odds.is_infinite() {
            1.0
        } else {
            odds / (1.0 + odds)
        }
    }
}

/// Errors of the identity store.
#[derive(Debug, thiserror::Error)]
pub enum EmpiError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("match model: {0}")]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for EmpiError {
    fn from(err: diesel::result::Error) -> EmpiError {
        EmpiError::Store(StoreError::from_diesel(err))
    }
}

fn corrupt(what: impl std::fmt::Display) -> EmpiError {
    EmpiError::Store(StoreError::Unavailable(format!(
        "corrupt EMPI data: {what}"
    )))
}

/// How a link was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecidedBy {
    Auto,
    Manual,
    Merge,
}

impl DecidedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Auto => "auto",
            DecidedBy::Manual => "manual",
            DecidedBy::Merge => "merge",
        }
    }

    fn parse(raw: &str) -> Result<DecidedBy, EmpiError> {
        match raw {
            "auto" => Ok(DecidedBy::Auto),
            "manual" => Ok(DecidedBy::Manual),
            "merge" => Ok(DecidedBy::Merge),
            other => Err(corrupt(format!("decided_by {other}"))),
        }
    }
}

/// A registration as an entry point (FHIR, import) hands it over.
#[derive(Clone, Debug)]
pub struct Registration {
    pub institution_id: String,
    /// The institution's patient identifier (system, value): the idempotency key.
    pub id_system: String,
    pub id_value: String,
    /// Demographics for matching (its `institution` must be `institution_id`).
    pub record: SourceRecord,
    /// Search columns as sent (HumanName.family / given).
    pub family: String,
    pub given: String,
    /// The resource as received (stored verbatim).
    pub resource: serde_json::Value,
}

/// What a registration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationOutcome {
    Created,
    Updated,
    Unchanged,
}

/// A link of a source record to an enterprise person.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub record_id: String,
    pub person_id: String,
    pub score: Option<f64>,
    pub explanation: Option<serde_json::Value>,
    pub decided_by: DecidedBy,
    pub actor: String,
    pub decided_at: NaiveDateTime,
}

/// A stored source record with its link.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRecord {
    pub id: String,
    pub institution_id: String,
    pub id_system: String,
    pub id_value: String,
    pub record: SourceRecord,
    pub resource: serde_json::Value,
    pub version: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub link: Option<Link>,
}

/// The result of [`register`].
#[derive(Clone, Debug)]
pub struct Registered {
    pub outcome: RegistrationOutcome,
    pub record: StoredRecord,
    pub issues: Vec<super::ident::DataQualityIssue>,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = records_t)]
struct RecordRow {
    id: String,
    institution_id: String,
    id_system: String,
    id_value: String,
    record_json: String,
    resource: String,
    version: i64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = links_t)]
struct LinkRow {
    record_id: String,
    person_id: String,
    score: Option<f64>,
    explanation: Option<String>,
    decided_by: String,
    actor: String,
    decided_at: NaiveDateTime,
}

impl LinkRow {
    fn into_link(self) -> Result<Link, EmpiError> {
        Ok(Link {
            decided_by: DecidedBy::parse(&self.decided_by)?,
            explanation: self
                .explanation
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(corrupt)?,
            record_id: self.record_id,
            person_id: self.person_id,
            score: self.score,
            actor: self.actor,
            decided_at: self.decided_at,
        })
    }
}

impl RecordRow {
    fn into_stored(self, link: Option<Link>) -> Result<StoredRecord, EmpiError> {
        Ok(StoredRecord {
            record: serde_json::from_str(&self.record_json).map_err(corrupt)?,
            resource: serde_json::from_str(&self.resource).map_err(corrupt)?,
            id: self.id,
            institution_id: self.institution_id,
            id_system: self.id_system,
            id_value: self.id_value,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            link,
        })
    }
}

/// Run a statement the multi-backend connection cannot express (multi-row INSERT) on the
/// concrete connection.
macro_rules! per_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            DbConn::Postgresql($c) => $body,
            DbConn::Sqlite($c) => $body,
        }
    };
}

/// Multi-row INSERT of `rows` into `table`, `chunk` rows per statement.
macro_rules! insert_chunks {
    ($conn:expr, $table:expr, $rows:expr, $chunk:expr) => {
        for chunk in $rows.chunks($chunk) {
            per_backend!($conn, |c| diesel::insert_into($table)
                .values(chunk)
                .execute(c))?;
        }
    };
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// FNV-1a 64 (stable across builds and machines; advisory lock keys).
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// PostgreSQL advisory lock every EMPI writer holds shared (taken first, by its first
/// [`lock`] call) and a large bulk batch holds exclusive ([`lock_all_writers`]) instead of one
/// lock per identifier and blocking key. Outside the range of [`lock_key`].
const WRITERS_LOCK: i64 = i64::MIN;

/// A lock name's advisory lock key (never [`WRITERS_LOCK`]).
fn lock_key(name: &str) -> i64 {
    i64::from_ne_bytes(fnv1a(name.as_bytes()).to_ne_bytes()).max(WRITERS_LOCK + 1)
}

/// Serialise writers that may create or move links (see the module invariants). `keys`
/// are lock names (`id:…`, blocking keys, `person:…`); each call locks them in sorted order,
/// after [`WRITERS_LOCK`] in shared mode (a bulk batch holding it exclusive excludes them).
fn lock(conn: &mut DbConn, names: &BTreeSet<String>) -> Result<(), EmpiError> {
    match conn {
        DbConn::Postgresql(pg) => {
            if names.is_empty() {
                return Ok(());
            }
            let mut hashes: Vec<i64> = names.iter().map(|n| lock_key(n)).collect();
            hashes.push(WRITERS_LOCK);
            hashes.sort_unstable();
            hashes.dedup();
            // One round trip; the sorted subquery feeds the aggregate in order, so the
            // locks are taken in ascending key order (no deadlock between writers), the
            // writers' shared lock (the smallest key) first: a writer never waits for it
            // while holding another EMPI lock.
            diesel::sql_query(
                "SELECT count(CASE WHEN h = $2 THEN pg_advisory_xact_lock_shared(h) \
                 ELSE pg_advisory_xact_lock(h) END) FROM \
                 (SELECT unnest($1::bigint[]) AS h ORDER BY 1) AS sorted_keys",
            )
            .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(hashes)
            .bind::<diesel::sql_types::BigInt, _>(WRITERS_LOCK)
            .execute(pg)?;
            Ok(())
        }
        DbConn::Sqlite(_) => Ok(()),
    }
}

/// Batches of at least this many records lock out every other EMPI writer for their
/// transaction (PostgreSQL; one lock instead of ~7 per record, which would exhaust the
/// server's lock table — `max_locks_per_transaction` × connections — for large batches).
pub const EXCLUSIVE_BATCH: usize = 256;

/// Hold [`WRITERS_LOCK`] exclusive until the transaction ends: no other EMPI writer runs
/// meanwhile (each takes it shared first), so the holder needs no per-key lock. SQLite:
/// nothing (the write transaction already excludes every other writer).
fn lock_all_writers(conn: &mut DbConn) -> Result<(), EmpiError> {
    if let DbConn::Postgresql(pg) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<diesel::sql_types::BigInt, _>(WRITERS_LOCK)
            .execute(pg)?;
    }
    Ok(())
}

/// Run `f` in a transaction that holds the EMPI write lock from its first statement.
fn write_transaction<T>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, EmpiError>,
) -> Result<T, EmpiError> {
    crate::store::write_tx(conn, |conn| {
        if matches!(conn, DbConn::Sqlite(_)) {
            diesel::update(empi_write_lock::table)
                .set(empi_write_lock::counter.eq(empi_write_lock::counter + 1))
                .execute(conn)?;
        }
        f(conn)
    })
}

/// The current model: the latest stored one, or the shipped one (version 0).
pub fn current_model(conn: &mut DbConn) -> Result<(i64, StoredModel), EmpiError> {
    let row: Option<(i64, String)> = params_t::table
        .order(params_t::version.desc())
        .select((params_t::version, params_t::model))
        .first(conn)
        .optional()?;
    match row {
        Some((version, json)) => Ok((version, StoredModel::from_json(&json)?)),
        None => Ok((0, StoredModel::shipped()?)),
    }
}

/// Store a new model version; returns the version.
pub fn store_model(tx: &mut Audited<'_>, model: &StoredModel) -> Result<i64, EmpiError> {
    let conn = tx.conn();
    let json = model.to_json()?;
    crate::store::write_tx(conn, |conn| {
        let max: Option<i64> = params_t::table
            .select(diesel::dsl::max(params_t::version))
            .first(conn)?;
        let version = max.unwrap_or(0) + 1;
        diesel::insert_into(params_t::table)
            .values((
                params_t::version.eq(version),
                params_t::model.eq(&json),
                params_t::source.eq(&model.source),
                params_t::created_at.eq(now_utc()),
            ))
            .execute(conn)?;
        Ok(version)
    })
}

mod bulk;
mod events;
mod merge;
mod query;
mod registration;
mod review;
#[cfg(test)]
mod tests;

pub use bulk::*;
pub use events::*;
pub use merge::*;
pub use query::*;
pub use registration::*;
pub use review::*;

/// Outcome of [`reestimate`].
#[derive(Clone, Debug, Serialize)]
pub struct Reestimation {
    pub version: i64,
    pub records: usize,
    pub candidate_pairs: usize,
    pub model: StoredModel,
}

/// EM over the stored candidate pairs (records sharing a blocking key), u from random
/// record pairs; stores a new model version. Links are not touched: the new parameters apply
/// to later registrations, and manual decisions are never revisited.
pub fn reestimate(
    tx: &mut Audited<'_>,
    link_posterior: f64,
    review_posterior: f64,
    seed: u64,
) -> Result<Reestimation, EmpiError> {
    let rows: Vec<(String, String)> = records_t::table
        .select((records_t::id, records_t::record_json))
        .order(records_t::id.asc())
        .load(tx.conn())?;
    let mut index: HashMap<String, usize> = HashMap::with_capacity(rows.len());
    let mut prepared = Vec::with_capacity(rows.len());
    for (i, (id, json)) in rows.iter().enumerate() {
        let mut r: SourceRecord = serde_json::from_str(json).map_err(corrupt)?;
        r.record_id = RecordId(i as u64);
        prepared.push(prepare(&r));
        index.insert(id.clone(), i);
    }
    let keys: Vec<(String, String)> = keys_t::table
        .select((keys_t::key, keys_t::record_id))
        .order(keys_t::key.asc())
        .load(tx.conn())?;
    let mut blocks: HashMap<&str, Vec<usize>> = HashMap::new();
    for (k, r) in &keys {
        if let Some(i) = index.get(r) {
            blocks.entry(k.as_str()).or_default().push(*i);
        }
    }
    let mut pairs: BTreeSet<(usize, usize)> = BTreeSet::new();
    for members in blocks
        .values()
        .filter(|m| m.len() <= super::evaluate::DEFAULT_MAX_BLOCK)
    {
        for (x, a) in members.iter().enumerate() {
            for b in &members[x + 1..] {
                pairs.insert(((*a).min(*b), (*a).max(*b)));
            }
        }
    }
    let vectors: Vec<ComparisonVector> = pairs
        .iter()
        .map(|(a, b)| compare(&prepared[*a], &prepared[*b]))
        .collect();
    let random = super::evaluate::random_pairs(prepared.len(), 200_000, seed);
    let start = estimate_u_from_random_pairs(
        random
            .iter()
            .map(|(a, b)| compare(&prepared[*a], &prepared[*b])),
        MatchParameters::starting_values(),
    );
    let params = estimate(
        vectors.iter().copied(),
        start,
        EmOptions {
            fix_u: true,
            ..EmOptions::default()
        },
    )?;
    let prior = super::fs::prior_from_candidates(params.prevalence, pairs.len(), prepared.len());
    let model = StoredModel {
        thresholds: Thresholds::from_posterior(prior, link_posterior, review_posterior),
        prior,
        parameters: params,
        source: format!(
            "EM on {} stored candidate pairs of {} records",
            pairs.len(),
            prepared.len()
        ),
    };
    let version = store_model(tx, &model)?;
    Ok(Reestimation {
        version,
        records: prepared.len(),
        candidate_pairs: pairs.len(),
        model,
    })
}
