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
const DEFAULT_MODEL: &str = include_str!("default_model.json");

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

fn load_link(conn: &mut DbConn, record_id: &str) -> Result<Option<Link>, EmpiError> {
    links_t::table
        .find(record_id)
        .select(LinkRow::as_select())
        .first(conn)
        .optional()?
        .map(LinkRow::into_link)
        .transpose()
}

/// One source record by id.
pub fn get_record(conn: &mut DbConn, id: &str) -> Result<StoredRecord, EmpiError> {
    let row = records_t::table
        .find(id)
        .select(RecordRow::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| EmpiError::NotFound(format!("Patient/{id}")))?;
    let link = load_link(conn, id)?;
    row.into_stored(link)
}

/// The source record registered under an institution identifier.
pub fn find_by_identifier(
    conn: &mut DbConn,
    system: &str,
    value: &str,
) -> Result<Option<StoredRecord>, EmpiError> {
    let row = records_t::table
        .filter(records_t::id_system.eq(system))
        .filter(records_t::id_value.eq(value))
        .select(RecordRow::as_select())
        .first(conn)
        .optional()?;
    match row {
        None => Ok(None),
        Some(row) => {
            let link = load_link(conn, &row.id)?;
            Ok(Some(row.into_stored(link)?))
        }
    }
}

fn load_records(conn: &mut DbConn, ids: &[String]) -> Result<Vec<StoredRecord>, EmpiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // One statement: each record with its link (if any).
    let rows: Vec<(RecordRow, Option<LinkRow>)> = records_t::table
        .left_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((RecordRow::as_select(), Option::<LinkRow>::as_select()))
        .load(conn)?;
    stored_records(rows)
}

/// Records with their links (a left join's rows), ordered by id.
fn stored_records(rows: Vec<(RecordRow, Option<LinkRow>)>) -> Result<Vec<StoredRecord>, EmpiError> {
    let mut out: Vec<StoredRecord> = rows
        .into_iter()
        .map(|(r, l)| r.into_stored(l.map(LinkRow::into_link).transpose()?))
        .collect::<Result<_, _>>()?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// The linked records among `ids` as (id, engine record as JSON, person): what the matcher
/// needs of a candidate, in one statement, without the stored resource or link evidence.
fn load_linked_candidates(
    conn: &mut DbConn,
    ids: &[String],
) -> Result<Vec<(String, String, String)>, EmpiError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(records_t::table
        .inner_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((records_t::id, records_t::record_json, links_t::person_id))
        .load(conn)?)
}

/// The source records linked to a person, oldest first.
pub fn records_of_person(
    conn: &mut DbConn,
    person_id: &str,
) -> Result<Vec<StoredRecord>, EmpiError> {
    let ids: Vec<String> = links_t::table
        .filter(links_t::person_id.eq(person_id))
        .select(links_t::record_id)
        .load(conn)?;
    load_records(conn, &ids)
}

/// An institution holding records of a person: its id and the (system, value) identifiers of
/// those records.
pub type Holder = (String, Vec<(String, String)>);

/// Where a person's records are held: per institution (sorted by id), the identifiers
/// (system, value) of its records linked to the person. One statement, nothing decoded (the
/// federated search needs only this, not the records).
pub fn holders_of_person(conn: &mut DbConn, person_id: &str) -> Result<Vec<Holder>, EmpiError> {
    let rows: Vec<(String, String, String)> = links_t::table
        .inner_join(records_t::table.on(records_t::id.eq(links_t::record_id)))
        .filter(links_t::person_id.eq(person_id))
        .select((
            records_t::institution_id,
            records_t::id_system,
            records_t::id_value,
        ))
        .order((
            records_t::institution_id,
            records_t::id_system,
            records_t::id_value,
        ))
        .load(conn)?;
    let mut out: Vec<Holder> = Vec::new();
    for (institution, system, value) in rows {
        match out.last_mut() {
            Some((last, ids)) if *last == institution => ids.push((system, value)),
            _ => out.push((institution, vec![(system, value)])),
        }
    }
    Ok(out)
}

/// One candidate of a record, scored.
#[derive(Clone, Debug)]
pub struct ScoredCandidate {
    pub record: StoredRecord,
    pub score: Score,
    pub vector: ComparisonVector,
    pub decision: Decision,
    pub posterior: f64,
}

/// Records sharing a blocking key with `prepared`, scored with `model`, best first.
fn scored_candidates(
    conn: &mut DbConn,
    prepared: &PreparedRecord,
    keys: &[String],
    exclude: Option<&str>,
    model: &StoredModel,
) -> Result<Vec<ScoredCandidate>, EmpiError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    // No DISTINCT in SQL: `SELECT DISTINCT … LIMIT` let PostgreSQL walk the whole
    // (record_id, key) primary key in order, filtering on the key, instead of looking the
    // keys up. A record shares at most `keys.len()` keys with the query (one row per key),
    // so `MAX_CANDIDATES × keys.len()` key rows hold at least `MAX_CANDIDATES` distinct
    // records whenever that many exist; beyond `MAX_CANDIDATES` an arbitrary subset is
    // scored, as before. One statement: the key lookup is a subquery of the records' load.
    let row_limit = MAX_CANDIDATES.saturating_mul(i64::try_from(keys.len()).unwrap_or(i64::MAX));
    // Record ids are never empty, so "" excludes nothing.
    let ids = keys_t::table
        .filter(keys_t::key.eq_any(keys))
        .filter(keys_t::record_id.ne(exclude.unwrap_or_default()))
        .select(keys_t::record_id)
        .limit(row_limit);
    let rows: Vec<(RecordRow, Option<LinkRow>)> = records_t::table
        .left_join(links_t::table.on(links_t::record_id.eq(records_t::id)))
        .filter(records_t::id.eq_any(ids))
        .select((RecordRow::as_select(), Option::<LinkRow>::as_select()))
        .load(conn)?;
    let mut records = stored_records(rows)?;
    records.truncate(usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX));
    let mut out: Vec<ScoredCandidate> = records
        .into_iter()
        .map(|r| {
            let (score, vector, decision) = score_pair(model, prepared, &prepare(&r.record));
            let posterior = model.posterior(score.total);
            ScoredCandidate {
                record: r,
                score,
                vector,
                decision,
                posterior,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .total
            .total_cmp(&a.score.total)
            .then(a.record.id.cmp(&b.record.id))
    });
    Ok(out)
}

/// Compare two prepared records and score the pair with `model`.
fn score_pair(
    model: &StoredModel,
    a: &PreparedRecord,
    b: &PreparedRecord,
) -> (Score, ComparisonVector, Decision) {
    let vector = compare(a, b);
    let score = model.parameters.score(&vector);
    let decision = model.thresholds.decide_pair(score.total, &vector);
    (score, vector, decision)
}

/// Score a record against the index without storing anything (`$match`).
pub fn match_record(
    conn: &mut DbConn,
    record: &SourceRecord,
) -> Result<Vec<ScoredCandidate>, EmpiError> {
    let (_, model) = current_model(conn)?;
    let prepared = prepare(record);
    let keys = blocking_keys(&prepared);
    scored_candidates(conn, &prepared, &keys, None, &model)
}

fn sex_str(s: Option<Sex>) -> Option<&'static str> {
    s.map(|s| match s {
        Sex::Male => "male",
        Sex::Female => "female",
    })
}

fn search_text(raw: &str) -> String {
    super::normalize::normalise_name(raw).full.to_lowercase()
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

fn record_event(
    conn: &mut DbConn,
    kind: &str,
    person: Option<&str>,
    other_person: Option<&str>,
    record: Option<&str>,
    actor: &str,
    detail: serde_json::Value,
) -> Result<String, EmpiError> {
    let id = new_id();
    diesel::insert_into(events_t::table)
        .values((
            events_t::id.eq(&id),
            events_t::kind.eq(kind),
            events_t::person_id.eq(person),
            events_t::other_person_id.eq(other_person),
            events_t::record_id.eq(record),
            events_t::actor.eq(actor),
            events_t::detail.eq(detail.to_string()),
            events_t::created_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(id)
}

fn new_person(conn: &mut DbConn) -> Result<String, EmpiError> {
    let id = new_id();
    let now = now_utc();
    diesel::insert_into(persons_t::table)
        .values((
            persons_t::id.eq(&id),
            persons_t::status.eq("active"),
            persons_t::version.eq(1i64),
            persons_t::created_at.eq(now),
            persons_t::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(id)
}

fn touch_person(conn: &mut DbConn, id: &str, status: &str) -> Result<(), EmpiError> {
    diesel::update(persons_t::table.find(id))
        .set((
            persons_t::status.eq(status),
            persons_t::version.eq(persons_t::version + 1),
            persons_t::updated_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

fn linked_count(conn: &mut DbConn, person: &str) -> Result<i64, EmpiError> {
    Ok(links_t::table
        .filter(links_t::person_id.eq(person))
        .count()
        .get_result(conn)?)
}

fn set_link(
    conn: &mut DbConn,
    record: &str,
    person: &str,
    score: Option<&Score>,
    decided_by: DecidedBy,
    actor: &str,
) -> Result<(), EmpiError> {
    diesel::delete(links_t::table.find(record)).execute(conn)?;
    insert_link(conn, record, person, score, decided_by, actor)
}

/// [`set_link`] for a record known to have no link (a new record).
fn insert_link(
    conn: &mut DbConn,
    record: &str,
    person: &str,
    score: Option<&Score>,
    decided_by: DecidedBy,
    actor: &str,
) -> Result<(), EmpiError> {
    let explanation = score
        .map(|s| serde_json::to_string(&s.explanation))
        .transpose()
        .map_err(ModelError::from)?;
    diesel::insert_into(links_t::table)
        .values((
            links_t::record_id.eq(record),
            links_t::person_id.eq(person),
            links_t::score.eq(score.map(|s| s.total)),
            links_t::explanation.eq(explanation),
            links_t::decided_by.eq(decided_by.as_str()),
            links_t::actor.eq(actor),
            links_t::decided_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Pairs a steward kept separate that involve `record`.
fn kept_separate(conn: &mut DbConn, record: &str) -> Result<BTreeSet<String>, EmpiError> {
    let rows: Vec<(String, String)> = review_t::table
        .filter(review_t::status.eq("kept-separate"))
        .filter(
            review_t::record_a
                .eq(record)
                .or(review_t::record_b.eq(record)),
        )
        .select((review_t::record_a, review_t::record_b))
        .load(conn)?;
    Ok(rows
        .into_iter()
        .map(|(a, b)| if a == record { b } else { a })
        .collect())
}

fn queue_review(conn: &mut DbConn, a: &str, b: &str, score: &Score) -> Result<(), EmpiError> {
    let (a, b) = pair(a, b);
    let exists: i64 = review_t::table
        .filter(review_t::record_a.eq(&a))
        .filter(review_t::record_b.eq(&b))
        .count()
        .get_result(conn)?;
    if exists > 0 {
        return Ok(());
    }
    diesel::insert_into(review_t::table)
        .values((
            review_t::id.eq(new_id()),
            review_t::record_a.eq(&a),
            review_t::record_b.eq(&b),
            review_t::score.eq(score.total),
            review_t::explanation
                .eq(serde_json::to_string(&score.explanation).map_err(ModelError::from)?),
            review_t::status.eq("open"),
            review_t::created_at.eq(now_utc()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Register (or update) a source record and link it, in one transaction.
pub fn register(
    tx: &mut Audited<'_>,
    reg: &Registration,
    actor: &str,
) -> Result<Registered, EmpiError> {
    register_with(tx, reg, actor, None)
}

/// Register many records in one write transaction (bulk import), the model loaded once. Per
/// record: its outcome, or the `Invalid`/`Conflict` error that refused it alone (raised
/// before the record writes anything, so no savepoint is needed). Any other error rolls the
/// whole batch back and is returned.
pub fn register_batch(
    tx: &mut Audited<'_>,
    regs: &[&Registration],
    actor: &str,
) -> Result<Vec<Result<RegistrationOutcome, EmpiError>>, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        let (_, model) = current_model(conn)?;
        if let Some(out) = register_new_set(conn, regs, actor, &model)? {
            return Ok(out);
        }
        let mut out = Vec::with_capacity(regs.len());
        for reg in regs {
            out.push(
                match register_inner(conn, reg, actor, Some(&model), Nesting::InBatch) {
                    Ok((outcome, _)) => Ok(outcome),
                    Err(e @ (EmpiError::Invalid { .. } | EmpiError::Conflict(_))) => Err(e),
                    Err(other) => return Err(other),
                },
            );
        }
        Ok(out)
    })
}

/// Rows per multi-row statement of the set-based path (bind parameters stay far below
/// PostgreSQL's 65,535 and SQLite's 32,766 for the widest table, 16 columns).
const SET_CHUNK: usize = 1_000;

/// Whether any of the (system, value) identifiers is registered: one statement per chunk,
/// an index probe of the (id_system, id_value) unique index per pair (a filter on the values
/// alone would scan that whole index; one per system would be a statement per institution).
fn any_registered(conn: &mut DbConn, idents: &[(&str, &str)]) -> Result<bool, EmpiError> {
    use diesel::sql_types::{Array, BigInt, Text};
    #[derive(QueryableByName)]
    struct Found {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    for chunk in idents.chunks(SET_CHUNK) {
        let found: Found = match conn {
            DbConn::Postgresql(pg) => diesel::sql_query(
                "SELECT count(*) AS n FROM unnest($1::text[], $2::text[]) AS q (s, v) \
                 JOIN empi_source_records r ON r.id_system = q.s AND r.id_value = q.v",
            )
            .bind::<Array<Text>, _>(chunk.iter().map(|(s, _)| *s).collect::<Vec<_>>())
            .bind::<Array<Text>, _>(chunk.iter().map(|(_, v)| *v).collect::<Vec<_>>())
            .get_result(pg)?,
            DbConn::Sqlite(lite) => {
                // CROSS JOIN keeps the VALUES list as the outer loop.
                let rows = vec!["(?, ?)"; chunk.len()].join(", ");
                let mut query = diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM (VALUES {rows}) AS q CROSS JOIN \
                     empi_source_records r ON r.id_system = q.column1 AND r.id_value = q.column2"
                ))
                .into_boxed();
                for (system, value) in chunk {
                    query = query.bind::<Text, _>(*system).bind::<Text, _>(*value);
                }
                query.get_result(lite)?
            }
        };
        if found.n > 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// One record of [`register_new_set`], prepared.
struct NewItem<'a> {
    reg: &'a Registration,
    id: String,
    prepared: PreparedRecord,
    keys: Vec<String>,
    record_json: String,
    resource: String,
    issues: BTreeSet<String>,
}

/// A record a batch record is compared with: stored before the batch, or earlier in it.
struct Known {
    prepared: PreparedRecord,
    person: String,
}

/// The set-based bulk registration: when every valid record of the batch is new (no stored
/// record has its identifier, no identifier twice in the batch), register them all with one
/// statement per step instead of ~14 per record — one identifier lock, one existence check,
/// one key lock, one candidate-key query and one candidate load for the whole batch, then
/// matching in memory (each record against the stored records and the batch's earlier
/// records that share a blocking key, exactly as one-by-one registration in the same order
/// would see them), then multi-row inserts of records, keys, issues, persons, links, events
/// and review items and one person update per touch count. `None`: some record exists or
/// repeats; the caller registers one by one (updates, re-imports).
///
/// Same decisions as [`register_inner`] per record in order, as long as no record has more
/// than [`MAX_CANDIDATES`] candidates (beyond that both paths score an arbitrary subset).
fn register_new_set(
    conn: &mut DbConn,
    regs: &[&Registration],
    actor: &str,
    model: &StoredModel,
) -> Result<Option<Vec<Result<RegistrationOutcome, EmpiError>>>, EmpiError> {
    // Per-record refusals come first, as in `register_inner` (nothing written for them).
    let mut refused: BTreeMap<usize, EmpiError> = BTreeMap::new();
    let mut idents: BTreeSet<(&str, &str)> = BTreeSet::new();
    for (index, reg) in regs.iter().enumerate() {
        if reg.record.institution != reg.institution_id {
            refused.insert(
                index,
                EmpiError::Invalid {
                    field: "institution",
                    message: "the record's institution must be the registering institution".into(),
                },
            );
        } else if !idents.insert((reg.id_system.as_str(), reg.id_value.as_str())) {
            return Ok(None);
        }
    }
    if idents.is_empty() {
        return Ok(None);
    }
    let exclusive = idents.len() >= EXCLUSIVE_BATCH;
    if exclusive {
        lock_all_writers(conn)?;
    } else {
        lock(
            conn,
            &idents
                .iter()
                .map(|(system, value)| format!("id:{system}|{value}"))
                .collect(),
        )?;
    }
    let pairs: Vec<(&str, &str)> = idents.iter().copied().collect();
    if any_registered(conn, &pairs)? {
        return Ok(None);
    }
    let mut items: Vec<NewItem> = Vec::with_capacity(idents.len());
    for (index, reg) in regs.iter().enumerate() {
        if refused.contains_key(&index) {
            continue;
        }
        let prepared = prepare(&reg.record);
        let keys = blocking_keys(&prepared);
        let issues = prepared
            .issues
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(ModelError::from)?;
        items.push(NewItem {
            reg,
            id: new_id(),
            keys,
            record_json: serde_json::to_string(&reg.record).map_err(ModelError::from)?,
            resource: reg.resource.to_string(),
            issues,
            prepared,
        });
    }
    let all_keys: BTreeSet<&str> = items
        .iter()
        .flat_map(|i| i.keys.iter().map(String::as_str))
        .collect();
    if !exclusive {
        lock(conn, &all_keys.iter().map(|k| format!("key:{k}")).collect())?;
    }

    // Stored records sharing a key with any batch record, by key.
    let key_list: Vec<&str> = all_keys.iter().copied().collect();
    let mut stored_by_key: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in key_list.chunks(SET_CHUNK) {
        let rows: Vec<(String, String)> = keys_t::table
            .filter(keys_t::key.eq_any(chunk))
            .select((keys_t::key, keys_t::record_id))
            .load(conn)?;
        for (key, record) in rows {
            stored_by_key.entry(key).or_default().push(record);
        }
    }
    let limit = usize::try_from(MAX_CANDIDATES).unwrap_or(usize::MAX);
    let stored_ids: BTreeSet<String> = items
        .iter()
        .flat_map(|item| {
            let mut seen = BTreeSet::new();
            item.keys
                .iter()
                .flat_map(|k| stored_by_key.get(k).into_iter().flatten())
                .filter(|id| seen.insert(id.as_str()))
                .take(limit)
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect();
    let mut known: HashMap<String, Known> = HashMap::new();
    let stored_ids: Vec<String> = stored_ids.into_iter().collect();
    for chunk in stored_ids.chunks(SET_CHUNK) {
        // Only linked records are candidates (as in `link_by_matcher`).
        for (id, json, person) in load_linked_candidates(conn, chunk)? {
            let record: SourceRecord = serde_json::from_str(&json).map_err(corrupt)?;
            known.insert(
                id,
                Known {
                    prepared: prepare(&record),
                    person,
                },
            );
        }
    }

    // Match in order, in memory.
    let now = now_utc();
    let mut batch_by_key: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut persons: Vec<String> = Vec::with_capacity(items.len());
    let mut new_persons: BTreeSet<String> = BTreeSet::new();
    let mut touches: BTreeMap<String, i64> = BTreeMap::new();
    let mut links = Vec::with_capacity(items.len());
    let mut events = Vec::with_capacity(items.len());
    let mut reviews = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut candidates: Vec<(&str, &PreparedRecord, &str)> = Vec::new();
        for key in &item.keys {
            for id in stored_by_key.get(key).into_iter().flatten() {
                if candidates.len() < limit
                    && let Some(k) = known.get(id)
                    && seen.insert(id.as_str())
                {
                    candidates.push((id.as_str(), &k.prepared, k.person.as_str()));
                }
            }
            for &earlier in batch_by_key.get(key.as_str()).into_iter().flatten() {
                let other = &items[earlier];
                if candidates.len() < limit && seen.insert(other.id.as_str()) {
                    candidates.push((
                        other.id.as_str(),
                        &other.prepared,
                        persons[earlier].as_str(),
                    ));
                }
            }
        }
        let mut scored: Vec<(&str, &str, Score, Decision)> = candidates
            .into_iter()
            .map(|(id, other, person)| {
                let (score, _, decision) = score_pair(model, &item.prepared, other);
                (id, person, score, decision)
            })
            .collect();
        scored.sort_by(|a, b| b.2.total.total_cmp(&a.2.total).then(a.0.cmp(b.0)));
        let best = scored.iter().find(|c| c.3 == Decision::AutoLink);
        let (person, score) = match best {
            Some(c) => (c.1.to_string(), Some(&c.2)),
            None => {
                let id = new_id();
                new_persons.insert(id.clone());
                (id, None)
            }
        };
        *touches.entry(person.clone()).or_insert(0) += 1;
        let explanation = score
            .map(|s| serde_json::to_string(&s.explanation))
            .transpose()
            .map_err(ModelError::from)?;
        links.push((
            links_t::record_id.eq(item.id.clone()),
            links_t::person_id.eq(person.clone()),
            links_t::score.eq(score.map(|s| s.total)),
            links_t::explanation.eq(explanation),
            links_t::decided_by.eq(DecidedBy::Auto.as_str()),
            links_t::actor.eq(actor),
            links_t::decided_at.eq(now),
        ));
        events.push((
            events_t::id.eq(new_id()),
            events_t::kind.eq("link"),
            events_t::person_id.eq(Some(person.clone())),
            events_t::other_person_id.eq(None::<String>),
            events_t::record_id.eq(Some(item.id.clone())),
            events_t::actor.eq(actor),
            events_t::detail.eq(
                serde_json::json!({ "decided_by": "auto", "score": score.map(|s| s.total) })
                    .to_string(),
            ),
            events_t::created_at.eq(now),
        ));
        for (other, other_person, s, decision) in &scored {
            if *other_person != person && *decision != Decision::NonMatch {
                let (a, b) = pair(&item.id, other);
                reviews.push((
                    review_t::id.eq(new_id()),
                    review_t::record_a.eq(a),
                    review_t::record_b.eq(b),
                    review_t::score.eq(s.total),
                    review_t::explanation
                        .eq(serde_json::to_string(&s.explanation).map_err(ModelError::from)?),
                    review_t::status.eq("open"),
                    review_t::created_at.eq(now),
                ));
            }
        }
        persons.push(person);
        for key in &item.keys {
            batch_by_key.entry(key.as_str()).or_default().push(pos);
        }
    }

    // Write, one multi-row statement per table and chunk.
    let records: Vec<_> = items
        .iter()
        .map(|item| {
            let reg = item.reg;
            (
                (
                    records_t::id.eq(item.id.as_str()),
                    records_t::institution_id.eq(reg.institution_id.as_str()),
                    records_t::id_system.eq(reg.id_system.as_str()),
                    records_t::id_value.eq(reg.id_value.as_str()),
                    records_t::name_search.eq(format!(
                        "{} {}",
                        search_text(&reg.record.name),
                        item.prepared.name.romanised
                    )),
                    records_t::family.eq(search_text(&reg.family)),
                    records_t::given.eq(search_text(&reg.given)),
                    records_t::sex.eq(sex_str(reg.record.sex)),
                ),
                (
                    records_t::birth_date.eq(reg.record.birth_date.map(|d| d.to_string())),
                    records_t::resident_id.eq(item
                        .prepared
                        .resident_id
                        .as_ref()
                        .map(|r| r.number.clone())),
                    records_t::phone.eq(item.prepared.phones.first().cloned()),
                    records_t::record_json.eq(item.record_json.as_str()),
                    records_t::resource.eq(item.resource.as_str()),
                    records_t::version.eq(1i64),
                    records_t::created_at.eq(now),
                    records_t::updated_at.eq(now),
                ),
            )
        })
        .collect();
    insert_chunks!(conn, records_t::table, records, SET_CHUNK);
    let keys: Vec<_> = items
        .iter()
        .flat_map(|item| {
            item.keys.iter().map(|k| {
                (
                    keys_t::record_id.eq(item.id.as_str()),
                    keys_t::key.eq(k.as_str()),
                )
            })
        })
        .collect();
    insert_chunks!(conn, keys_t::table, keys, SET_CHUNK * 4);
    let issues: Vec<_> = items
        .iter()
        .flat_map(|item| {
            item.issues.iter().map(|i| {
                (
                    issues_t::record_id.eq(item.id.as_str()),
                    issues_t::issue.eq(i.as_str()),
                )
            })
        })
        .collect();
    insert_chunks!(conn, issues_t::table, issues, SET_CHUNK * 4);
    // A new person is created (version 1) and touched once per record linked to it.
    let created: Vec<_> = new_persons
        .iter()
        .map(|id| {
            (
                persons_t::id.eq(id.as_str()),
                persons_t::status.eq("active"),
                persons_t::version.eq(1 + touches.get(id).copied().unwrap_or(0)),
                persons_t::created_at.eq(now),
                persons_t::updated_at.eq(now),
            )
        })
        .collect();
    insert_chunks!(conn, persons_t::table, created, SET_CHUNK);
    let mut by_count: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    for (person, n) in &touches {
        if !new_persons.contains(person) {
            by_count.entry(*n).or_default().push(person.as_str());
        }
    }
    for (n, ids) in by_count {
        for chunk in ids.chunks(SET_CHUNK) {
            diesel::update(persons_t::table.filter(persons_t::id.eq_any(chunk)))
                .set((
                    persons_t::status.eq("active"),
                    persons_t::version.eq(persons_t::version + n),
                    persons_t::updated_at.eq(now),
                ))
                .execute(conn)?;
        }
    }
    insert_chunks!(conn, links_t::table, links, SET_CHUNK);
    insert_chunks!(conn, events_t::table, events, SET_CHUNK);
    insert_chunks!(conn, review_t::table, reviews, SET_CHUNK);

    let mut out = Vec::with_capacity(regs.len());
    for index in 0..regs.len() {
        out.push(match refused.remove(&index) {
            Some(e) => Err(e),
            None => Ok(RegistrationOutcome::Created),
        });
    }
    Ok(Some(out))
}

/// Refresh the query planner's statistics of the identity tables (PostgreSQL `ANALYZE`; on
/// SQLite nothing: its planner needs no statistics for these equality lookups). A bulk load
/// into small tables otherwise keeps the plans made when they were nearly empty — each
/// connection's cached generic plans read every row of `empi_source_records` and
/// `empi_links` per registration — until autovacuum analyses them, and autovacuum may be off.
pub fn refresh_statistics(conn: &mut DbConn) -> Result<(), EmpiError> {
    if let DbConn::Postgresql(pg) = conn {
        diesel::sql_query(
            "ANALYZE empi_source_records, empi_links, empi_blocking_keys, empi_persons, \
             empi_review_items",
        )
        .execute(pg)?;
    }
    Ok(())
}

/// Settings of a connection dedicated to a bulk load (`yiqiao mpi import`, the store bench),
/// made once before its first batch. PostgreSQL: none — a commit is durable with the
/// default `synchronous_commit = on`, which is what a resumable import needs of each batch.
/// SQLite (WAL): `synchronous = FULL`, so each batch's commit is on disk before the import
/// records it in its checkpoint file (the store's `NORMAL` leaves a WAL commit to the next
/// checkpoint's sync: a power failure could lose a batch the checkpoint file counts as
/// stored), and `wal_autocheckpoint` at 16,384 pages (64 MiB) instead of 1,000, so index
/// pages that several batches change are copied into the database once per checkpoint,
/// not once per batch (a batch of 500 dirties thousands of index pages, so with 1,000 every
/// commit checkpointed), and a page cache of up to 1 GiB (`cache_size`; the default 2 MiB is
/// far below what one large batch dirties, so SQLite spilled dirty pages to the WAL in the
/// middle of the transaction and wrote many of them again before the commit). The
/// connection keeps these settings until it is closed.
pub fn bulk_load_session(conn: &mut DbConn) -> Result<(), EmpiError> {
    if let DbConn::Sqlite(lite) = conn {
        diesel::sql_query("PRAGMA synchronous = FULL").execute(lite)?;
        diesel::sql_query("PRAGMA wal_autocheckpoint = 16384").execute(lite)?;
        diesel::sql_query("PRAGMA cache_size = -1048576").execute(lite)?;
    }
    Ok(())
}

/// When a bulk load refreshes statistics ([`refresh_statistics`]): after its first batch,
/// then each time the rows loaded have doubled (a handful of `ANALYZE`s for a million rows).
#[derive(Debug)]
pub struct StatisticsSchedule {
    next_at: u64,
}

impl Default for StatisticsSchedule {
    fn default() -> Self {
        StatisticsSchedule { next_at: 1 }
    }
}

impl StatisticsSchedule {
    /// Call after each committed batch with the rows loaded so far; returns whether it
    /// refreshed.
    pub fn after_batch(&mut self, conn: &mut DbConn, rows_done: u64) -> Result<bool, EmpiError> {
        if rows_done < self.next_at {
            return Ok(false);
        }
        refresh_statistics(conn)?;
        self.next_at = rows_done.saturating_mul(2);
        Ok(true)
    }
}

/// [`register`] with the match model given (bulk import loads it once per batch; `None`: the
/// current one). Inside an outer transaction this is a savepoint: a failed registration
/// leaves nothing behind and the outer transaction goes on.
pub fn register_with(
    tx: &mut Audited<'_>,
    reg: &Registration,
    actor: &str,
    model: Option<&StoredModel>,
) -> Result<Registered, EmpiError> {
    let conn = tx.conn();
    let (outcome, read) = register_inner(conn, reg, actor, model, Nesting::Own)?;
    let (record, issues) = read.ok_or_else(|| corrupt("registered record not read back"))?;
    Ok(Registered {
        outcome,
        record,
        issues,
    })
}

/// The stored record and the data-quality issues of a registration.
type ReadBack = (StoredRecord, Vec<super::ident::DataQualityIssue>);

/// How [`register_inner`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nesting {
    /// In its own write transaction (a savepoint inside an outer one); reads the stored
    /// record back.
    Own,
    /// Inside [`register_batch`]'s write transaction, no savepoint: its only per-record
    /// errors (`Invalid`, `Conflict`) are raised before the record writes anything, and any
    /// other error rolls the whole batch back. Reads nothing back (the import needs the
    /// outcome alone).
    InBatch,
}

/// [`register_with`] and one record of [`register_batch`].
fn register_inner(
    conn: &mut DbConn,
    reg: &Registration,
    actor: &str,
    model: Option<&StoredModel>,
    nesting: Nesting,
) -> Result<(RegistrationOutcome, Option<ReadBack>), EmpiError> {
    let read_back = nesting == Nesting::Own;
    if reg.record.institution != reg.institution_id {
        return Err(EmpiError::Invalid {
            field: "institution",
            message: "the record's institution must be the registering institution".into(),
        });
    }
    let prepared = prepare(&reg.record);
    let keys = blocking_keys(&prepared);
    let record_json = serde_json::to_string(&reg.record).map_err(ModelError::from)?;
    let resource = reg.resource.to_string();
    let issues = &prepared.issues;
    let body = |conn: &mut DbConn| {
        lock(
            conn,
            &BTreeSet::from([format!("id:{}|{}", reg.id_system, reg.id_value)]),
        )?;
        let existing = records_t::table
            .filter(records_t::id_system.eq(&reg.id_system))
            .filter(records_t::id_value.eq(&reg.id_value))
            .select(RecordRow::as_select())
            .first(conn)
            .optional()?;
        let old_keys: Vec<String> = match &existing {
            Some(row) => keys_t::table
                .filter(keys_t::record_id.eq(&row.id))
                .select(keys_t::key)
                .load(conn)?,
            None => Vec::new(),
        };
        if let Some(row) = &existing {
            if row.institution_id != reg.institution_id {
                return Err(EmpiError::Conflict(
                    "the identifier is registered by another institution".into(),
                ));
            }
            if row.record_json == record_json && row.resource == resource {
                let record = if read_back {
                    Some((get_record(conn, &row.id)?, issues.clone()))
                } else {
                    None
                };
                return Ok((RegistrationOutcome::Unchanged, record));
            }
        }
        let mut names: BTreeSet<String> = keys.iter().map(|k| format!("key:{k}")).collect();
        names.extend(old_keys.iter().map(|k| format!("key:{k}")));
        lock(conn, &names)?;

        let now = now_utc();
        let first_phone = prepared.phones.first().cloned();
        let columns = (
            records_t::name_search.eq(format!(
                "{} {}",
                search_text(&reg.record.name),
                prepared.name.romanised
            )),
            records_t::family.eq(search_text(&reg.family)),
            records_t::given.eq(search_text(&reg.given)),
            records_t::sex.eq(sex_str(reg.record.sex)),
            records_t::birth_date.eq(reg.record.birth_date.map(|d| d.to_string())),
            records_t::resident_id.eq(prepared.resident_id.as_ref().map(|r| r.number.clone())),
            records_t::phone.eq(first_phone),
            records_t::record_json.eq(&record_json),
            records_t::resource.eq(&resource),
        );
        let (record_id, outcome) = match &existing {
            Some(row) => {
                diesel::update(records_t::table.find(&row.id))
                    .set((
                        columns,
                        records_t::version.eq(row.version + 1),
                        records_t::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                diesel::delete(keys_t::table.filter(keys_t::record_id.eq(&row.id)))
                    .execute(conn)?;
                diesel::delete(issues_t::table.filter(issues_t::record_id.eq(&row.id)))
                    .execute(conn)?;
                // Open review items were about the old content.
                diesel::delete(
                    review_t::table.filter(review_t::status.eq("open")).filter(
                        review_t::record_a
                            .eq(&row.id)
                            .or(review_t::record_b.eq(&row.id)),
                    ),
                )
                .execute(conn)?;
                (row.id.clone(), RegistrationOutcome::Updated)
            }
            None => {
                let id = new_id();
                diesel::insert_into(records_t::table)
                    .values((
                        records_t::id.eq(&id),
                        records_t::institution_id.eq(&reg.institution_id),
                        records_t::id_system.eq(&reg.id_system),
                        records_t::id_value.eq(&reg.id_value),
                        columns,
                        records_t::version.eq(1i64),
                        records_t::created_at.eq(now),
                        records_t::updated_at.eq(now),
                    ))
                    .execute(conn)?;
                (id, RegistrationOutcome::Created)
            }
        };
        // One multi-row INSERT each (not one round trip per key or issue).
        if !keys.is_empty() {
            let rows: Vec<_> = keys
                .iter()
                .map(|key| (keys_t::record_id.eq(&record_id), keys_t::key.eq(key)))
                .collect();
            per_backend!(conn, |c| diesel::insert_into(keys_t::table)
                .values(&rows)
                .execute(c))?;
        }
        let distinct_issues: BTreeSet<String> = issues
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()
            .map_err(ModelError::from)?;
        if !distinct_issues.is_empty() {
            let rows: Vec<_> = distinct_issues
                .iter()
                .map(|issue| {
                    (
                        issues_t::record_id.eq(&record_id),
                        issues_t::issue.eq(issue),
                    )
                })
                .collect();
            per_backend!(conn, |c| diesel::insert_into(issues_t::table)
                .values(&rows)
                .execute(c))?;
        }
        link_by_matcher(
            conn,
            &record_id,
            outcome == RegistrationOutcome::Created,
            &prepared,
            &keys,
            actor,
            model,
        )?;
        let record = if read_back {
            Some((get_record(conn, &record_id)?, issues.clone()))
        } else {
            None
        };
        Ok((outcome, record))
    };
    match nesting {
        Nesting::Own => write_transaction(conn, body),
        Nesting::InBatch => body(conn),
    }
}

/// Decide the person of a (new or changed) record; manual and merge links are kept.
/// `created`: the record was inserted in this transaction, so it has no link and no review
/// item yet (nothing to read).
fn link_by_matcher(
    conn: &mut DbConn,
    record_id: &str,
    created: bool,
    prepared: &PreparedRecord,
    keys: &[String],
    actor: &str,
    model: Option<&StoredModel>,
) -> Result<(), EmpiError> {
    let current = if created {
        None
    } else {
        load_link(conn, record_id)?
    };
    if current
        .as_ref()
        .is_some_and(|l| l.decided_by != DecidedBy::Auto)
    {
        return Ok(());
    }
    let loaded;
    let model = match model {
        Some(m) => m,
        None => {
            loaded = current_model(conn)?.1;
            &loaded
        }
    };
    let separate = if created {
        BTreeSet::new()
    } else {
        kept_separate(conn, record_id)?
    };
    let candidates: Vec<ScoredCandidate> =
        scored_candidates(conn, prepared, keys, Some(record_id), model)?
            .into_iter()
            .filter(|c| !separate.contains(&c.record.id) && c.record.link.is_some())
            .collect();
    let best = candidates.iter().find(|c| c.decision == Decision::AutoLink);
    let current_person = current.as_ref().map(|l| l.person_id.clone());
    let target = match best {
        Some(c) => c
            .record
            .link
            .as_ref()
            .map(|l| (l.person_id.clone(), Some(c.score.clone()))),
        None => None,
    };
    let (person, score) = match (target, &current_person) {
        (Some((p, s)), _) => (p, s),
        (None, Some(p)) if linked_count(conn, p)? <= 1 => (p.clone(), None),
        (None, _) => (new_person(conn)?, None),
    };
    if current_person.as_deref() != Some(person.as_str()) || current.is_none() {
        if current.is_none() {
            insert_link(
                conn,
                record_id,
                &person,
                score.as_ref(),
                DecidedBy::Auto,
                actor,
            )?;
        } else {
            set_link(
                conn,
                record_id,
                &person,
                score.as_ref(),
                DecidedBy::Auto,
                actor,
            )?;
        }
        touch_person(conn, &person, "active")?;
        if let Some(old) = current_person.as_deref().filter(|old| *old != person)
            && linked_count(conn, old)? == 0
        {
            touch_person(conn, old, "empty")?;
        }
        record_event(
            conn,
            if current.is_none() { "link" } else { "relink" },
            Some(&person),
            current_person.as_deref(),
            Some(record_id),
            actor,
            serde_json::json!({ "decided_by": "auto", "score": score.as_ref().map(|s| s.total) }),
        )?;
    } else if let Some(s) = &score {
        // Same person, fresher evidence.
        set_link(conn, record_id, &person, Some(s), DecidedBy::Auto, actor)?;
    }
    for c in &candidates {
        let other_person = c.record.link.as_ref().map(|l| l.person_id.as_str());
        if other_person != Some(person.as_str()) && c.decision != Decision::NonMatch {
            queue_review(conn, record_id, &c.record.id, &c.score)?;
        }
    }
    Ok(())
}

/// Search filters of PDQm (all optional, combined with AND).
#[derive(Clone, Debug, Default)]
pub struct RecordFilter {
    pub family: Option<String>,
    pub given: Option<String>,
    /// Matches the name (Han or Latin) or its romanised (pinyin) form, by substring.
    pub name: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<Sex>,
    /// Normalised resident ID number.
    pub resident_id: Option<String>,
    /// (system, value) of an institution identifier; system `None` matches any.
    pub identifier: Option<(Option<String>, String)>,
    pub phone: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

fn like_escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Source records matching a filter, ordered by id.
pub fn search_records(conn: &mut DbConn, f: &RecordFilter) -> Result<Vec<StoredRecord>, EmpiError> {
    let mut q = records_t::table.select(records_t::id).into_boxed();
    if let Some(v) = &f.family {
        q = q.filter(
            records_t::family
                .like(format!("{}%", like_escape(&search_text(v))))
                .escape('\\'),
        );
    }
    if let Some(v) = &f.given {
        q = q.filter(
            records_t::given
                .like(format!("{}%", like_escape(&search_text(v))))
                .escape('\\'),
        );
    }
    if let Some(v) = &f.name {
        let pattern = format!("%{}%", like_escape(&search_text(v)));
        q = q.filter(records_t::name_search.like(pattern).escape('\\'));
    }
    if let Some(d) = f.birth_date {
        q = q.filter(records_t::birth_date.eq(d.to_string()));
    }
    if let Some(s) = sex_str(f.sex) {
        q = q.filter(records_t::sex.eq(s));
    }
    if let Some(r) = &f.resident_id {
        q = q.filter(records_t::resident_id.eq(r.clone()));
    }
    if let Some((system, value)) = &f.identifier {
        q = q.filter(records_t::id_value.eq(value.clone()));
        if let Some(system) = system {
            q = q.filter(records_t::id_system.eq(system.clone()));
        }
    }
    if let Some(p) = &f.phone {
        // Any of the record's phones, through its `ph:` blocking key (the key index serves
        // the lookup; the phone column keeps only the first phone and has no index).
        q = q.filter(
            records_t::id.eq_any(
                keys_t::table
                    .filter(keys_t::key.eq(phone_key(p)))
                    .select(keys_t::record_id),
            ),
        );
    }
    let limit = if f.limit <= 0 { 100 } else { f.limit.min(1000) };
    let ids: Vec<String> = q
        .order(records_t::id.asc())
        .limit(limit)
        .offset(f.offset.max(0))
        .load(conn)?;
    load_records(conn, &ids)
}

/// An enterprise person with its linked records.
#[derive(Clone, Debug)]
pub struct Person {
    pub id: String,
    pub status: String,
    pub merged_into: Option<String>,
    pub version: i64,
    pub records: Vec<StoredRecord>,
    /// Institution level (e.g. `3A`) of each record's institution, by institution id.
    pub institution_levels: BTreeMap<String, String>,
}

pub fn get_person(conn: &mut DbConn, id: &str) -> Result<Person, EmpiError> {
    let (pid, status, merged_into, version): (String, String, Option<String>, i64) =
        persons_t::table
            .find(id)
            .select((
                persons_t::id,
                persons_t::status,
                persons_t::merged_into,
                persons_t::version,
            ))
            .first(conn)
            .optional()?
            .ok_or_else(|| EmpiError::NotFound(format!("person {id}")))?;
    let records = records_of_person(conn, id)?;
    let inst_ids: Vec<String> = records.iter().map(|r| r.institution_id.clone()).collect();
    let institution_levels = institutions::table
        .filter(institutions::id.eq_any(&inst_ids))
        .select((institutions::id, institutions::level))
        .load::<(String, String)>(conn)?
        .into_iter()
        .collect();
    Ok(Person {
        id: pid,
        status,
        merged_into,
        version,
        records,
        institution_levels,
    })
}

/// Golden record of a person, by the survivorship rules in docs/empi.md.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GoldenRecord {
    pub name: Option<String>,
    pub name_from: Option<String>,
    pub sex: Option<Sex>,
    pub birth_date: Option<NaiveDate>,
    pub resident_id: Option<String>,
    pub phone: Option<String>,
    pub address: Option<String>,
}

/// Rank of an institution level: `3A` (三级甲等) highest; unrated lowest.
fn level_rank(level: &str) -> (u8, u8) {
    let mut chars = level.chars();
    let grade = chars.next().and_then(|c| c.to_digit(10)).unwrap_or(0);
    let class = match chars.next() {
        Some('A') => 3,
        Some('B') => 2,
        Some('C') => 1,
        _ => 0,
    };
    (u8::try_from(grade).unwrap_or(0), class)
}

/// Survivorship: the trusted resident ID held by most records (ties: most recent); sex and
/// birth date from that ID when present, else from the most recent record that has them;
/// name from the highest-level institution's most recent record; phone and address from the
/// most recent record that has them.
pub fn golden_record(person: &Person) -> GoldenRecord {
    let mut recent: Vec<(&StoredRecord, PreparedRecord)> = person
        .records
        .iter()
        .map(|r| (r, prepare(&r.record)))
        .collect();
    recent.sort_by_key(|r| std::cmp::Reverse(r.0.updated_at));
    let mut ids: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, (_, p)) in recent.iter().enumerate() {
        if let Some(r) = p.resident_id.as_ref().filter(|r| r.trusted) {
            let e = ids.entry(r.number.clone()).or_insert((0, i));
            e.0 += 1;
        }
    }
    let resident = ids
        .iter()
        .max_by(|a, b| a.1.0.cmp(&b.1.0).then(b.1.1.cmp(&a.1.1)))
        .map(|(n, _)| n.clone());
    let id_info = resident.as_ref().and_then(|n| {
        recent
            .iter()
            .filter_map(|(_, p)| p.resident_id.as_ref())
            .find(|r| &r.number == n)
            .cloned()
    });
    let named = recent
        .iter()
        .filter(|(r, _)| !r.record.name.trim().is_empty())
        .max_by(|a, b| {
            let la = level_rank(
                person
                    .institution_levels
                    .get(&a.0.institution_id)
                    .map_or("", String::as_str),
            );
            let lb = level_rank(
                person
                    .institution_levels
                    .get(&b.0.institution_id)
                    .map_or("", String::as_str),
            );
            la.cmp(&lb).then(a.0.updated_at.cmp(&b.0.updated_at))
        });
    GoldenRecord {
        name: named.map(|(r, _)| r.record.name.clone()),
        name_from: named.map(|(r, _)| r.id.clone()),
        sex: id_info
            .as_ref()
            .and_then(|r| r.sex)
            .or_else(|| recent.iter().find_map(|(r, _)| r.record.sex)),
        birth_date: id_info
            .as_ref()
            .and_then(|r| r.birth_date)
            .or_else(|| recent.iter().find_map(|(r, _)| r.record.birth_date)),
        resident_id: resident,
        phone: recent.iter().find_map(|(_, p)| p.phones.first().cloned()),
        address: recent
            .iter()
            .find_map(|(_, p)| p.address.as_ref().map(|a| a.full.clone())),
    }
}

/// Lineage stored with a merge event, enough to undo it exactly.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MergeLineage {
    target: String,
    source: String,
    source_status: String,
    moved: Vec<Link>,
}

fn lock_persons(conn: &mut DbConn, persons: &[&str]) -> Result<(), EmpiError> {
    lock(
        conn,
        &persons.iter().map(|p| format!("person:{p}")).collect(),
    )?;
    let records: Vec<String> = links_t::table
        .filter(links_t::person_id.eq_any(persons))
        .select(links_t::record_id)
        .load(conn)?;
    let keys: Vec<String> = keys_t::table
        .filter(keys_t::record_id.eq_any(&records))
        .select(keys_t::key)
        .load(conn)?;
    lock(
        conn,
        &keys.into_iter().map(|k| format!("key:{k}")).collect(),
    )
}

fn person_status(conn: &mut DbConn, id: &str) -> Result<String, EmpiError> {
    persons_t::table
        .find(id)
        .select(persons_t::status)
        .first(conn)
        .optional()?
        .ok_or_else(|| EmpiError::NotFound(format!("person {id}")))
}

/// Merge person `source` into `target`: every record of `source` is linked to `target`
/// (decided_by merge). Returns the merge event id.
pub fn merge(
    tx: &mut Audited<'_>,
    target: &str,
    source: &str,
    actor: &str,
) -> Result<String, EmpiError> {
    let conn = tx.conn();
    if target == source {
        return Err(EmpiError::Invalid {
            field: "source",
            message: "cannot merge a person into itself".into(),
        });
    }
    write_transaction(conn, |conn| {
        lock_persons(conn, &[target, source])?;
        let target_status = person_status(conn, target)?;
        let source_status = person_status(conn, source)?;
        if target_status == "merged" || source_status == "merged" {
            return Err(EmpiError::Conflict(
                "a person that was merged away cannot take part in a merge".into(),
            ));
        }
        let moved: Vec<Link> = links_t::table
            .filter(links_t::person_id.eq(source))
            .select(LinkRow::as_select())
            .order(links_t::record_id.asc())
            .load(conn)?
            .into_iter()
            .map(LinkRow::into_link)
            .collect::<Result<_, _>>()?;
        for l in &moved {
            set_link(conn, &l.record_id, target, None, DecidedBy::Merge, actor)?;
        }
        diesel::update(persons_t::table.find(source))
            .set((
                persons_t::status.eq("merged"),
                persons_t::merged_into.eq(Some(target)),
                persons_t::version.eq(persons_t::version + 1),
                persons_t::updated_at.eq(now_utc()),
            ))
            .execute(conn)?;
        touch_person(conn, target, "active")?;
        // The source's consents now apply to the target (consent::for_patients).
        crate::consent::subjects_changed(conn, &[target, source])?;
        let lineage = MergeLineage {
            target: target.into(),
            source: source.into(),
            source_status,
            moved,
        };
        let id = record_event(
            conn,
            "merge",
            Some(target),
            Some(source),
            None,
            actor,
            serde_json::to_value(&lineage).map_err(ModelError::from)?,
        )?;
        // Subscribers to the patient-merge topic, in the same transaction (outbox; last, it
        // takes the event counter lock).
        emit_merge_event(conn, NewEvent::patient_merged(target, source))?;
        Ok(id)
    })
}

/// Undo the latest merge of `source` into `target`, restoring every moved link exactly
/// (person, score, explanation, decided_by, actor, time). Refused when a moved record has
/// been relinked since.
pub fn unmerge(
    tx: &mut Audited<'_>,
    target: &str,
    source: &str,
    actor: &str,
) -> Result<String, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        lock_persons(conn, &[target, source])?;
        let event: Option<(String, String)> = events_t::table
            .filter(events_t::kind.eq("merge"))
            .filter(events_t::person_id.eq(target))
            .filter(events_t::other_person_id.eq(source))
            .order(events_t::id.desc())
            .select((events_t::id, events_t::detail))
            .first(conn)
            .optional()?;
        let Some((event_id, detail)) = event else {
            return Err(EmpiError::NotFound(format!(
                "merge of person {source} into {target}"
            )));
        };
        let undone: i64 = events_t::table
            .filter(events_t::kind.eq("unmerge"))
            .filter(events_t::detail.like(format!("%\"merge_event\":\"{event_id}\"%")))
            .count()
            .get_result(conn)?;
        if undone > 0 || person_status(conn, source)? != "merged" {
            return Err(EmpiError::Conflict("that merge was already undone".into()));
        }
        let lineage: MergeLineage = serde_json::from_str(&detail).map_err(corrupt)?;
        for l in &lineage.moved {
            let now = load_link(conn, &l.record_id)?;
            if now
                .as_ref()
                .is_none_or(|n| n.person_id != target || n.decided_by != DecidedBy::Merge)
            {
                return Err(EmpiError::Conflict(format!(
                    "record {} was relinked after the merge; resolve it manually",
                    l.record_id
                )));
            }
            diesel::delete(links_t::table.find(&l.record_id)).execute(conn)?;
            diesel::insert_into(links_t::table)
                .values((
                    links_t::record_id.eq(&l.record_id),
                    links_t::person_id.eq(&l.person_id),
                    links_t::score.eq(l.score),
                    links_t::explanation
                        .eq(l.explanation.as_ref().map(serde_json::Value::to_string)),
                    links_t::decided_by.eq(l.decided_by.as_str()),
                    links_t::actor.eq(&l.actor),
                    links_t::decided_at.eq(l.decided_at),
                ))
                .execute(conn)?;
        }
        diesel::update(persons_t::table.find(source))
            .set((
                persons_t::status.eq(&lineage.source_status),
                persons_t::merged_into.eq(None::<String>),
                persons_t::version.eq(persons_t::version + 1),
                persons_t::updated_at.eq(now_utc()),
            ))
            .execute(conn)?;
        touch_person(conn, target, "active")?;
        crate::consent::subjects_changed(conn, &[target, source])?;
        let id = record_event(
            conn,
            "unmerge",
            Some(target),
            Some(source),
            None,
            actor,
            serde_json::json!({ "merge_event": event_id }),
        )?;
        emit_merge_event(conn, NewEvent::patient_unmerged(target, source))?;
        Ok(id)
    })
}

fn emit_merge_event(conn: &mut DbConn, event: NewEvent) -> Result<(), EmpiError> {
    outbox::emit(conn, &[event]).map_err(|e| match e {
        crate::documents::DocumentError::Store(s) => EmpiError::Store(s),
        other => EmpiError::Store(StoreError::Unavailable(format!(
            "merge notification not stored: {other}"
        ))),
    })?;
    Ok(())
}

/// A review queue item.
#[derive(Clone, Debug, Serialize)]
pub struct ReviewItem {
    pub id: String,
    pub record_a: String,
    pub record_b: String,
    pub score: f64,
    pub explanation: serde_json::Value,
    pub status: String,
    pub resolver: Option<String>,
    pub note: Option<String>,
    pub created_at: NaiveDateTime,
    pub resolved_at: Option<NaiveDateTime>,
}

type ReviewRow = (
    String,
    String,
    String,
    f64,
    String,
    String,
    Option<String>,
    Option<String>,
    NaiveDateTime,
    Option<NaiveDateTime>,
);

fn review_item(r: ReviewRow) -> Result<ReviewItem, EmpiError> {
    Ok(ReviewItem {
        id: r.0,
        record_a: r.1,
        record_b: r.2,
        score: r.3,
        explanation: serde_json::from_str(&r.4).map_err(corrupt)?,
        status: r.5,
        resolver: r.6,
        note: r.7,
        created_at: r.8,
        resolved_at: r.9,
    })
}

const REVIEW_COLUMNS: (
    review_t::id,
    review_t::record_a,
    review_t::record_b,
    review_t::score,
    review_t::explanation,
    review_t::status,
    review_t::resolver,
    review_t::note,
    review_t::created_at,
    review_t::resolved_at,
) = (
    review_t::id,
    review_t::record_a,
    review_t::record_b,
    review_t::score,
    review_t::explanation,
    review_t::status,
    review_t::resolver,
    review_t::note,
    review_t::created_at,
    review_t::resolved_at,
);

/// Review items with a status (`open`, `linked`, `kept-separate`), oldest first.
pub fn list_review(
    conn: &mut DbConn,
    status: &str,
    limit: i64,
    offset: i64,
) -> Result<Vec<ReviewItem>, EmpiError> {
    review_t::table
        .filter(review_t::status.eq(status))
        .order(review_t::id.asc())
        .limit(limit)
        .offset(offset)
        .select(REVIEW_COLUMNS)
        .load::<ReviewRow>(conn)?
        .into_iter()
        .map(review_item)
        .collect()
}

/// A steward's decision on a review item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewDecision {
    /// Same person: record_b is linked (manual) to record_a's person.
    Link,
    /// Different persons: never linked automatically.
    KeepSeparate,
}

pub fn resolve_review(
    tx: &mut Audited<'_>,
    id: &str,
    decision: ReviewDecision,
    actor: &str,
    note: Option<&str>,
) -> Result<ReviewItem, EmpiError> {
    let conn = tx.conn();
    write_transaction(conn, |conn| {
        let item = review_t::table
            .find(id)
            .select(REVIEW_COLUMNS)
            .first::<ReviewRow>(conn)
            .optional()?
            .ok_or_else(|| EmpiError::NotFound(format!("review item {id}")))
            .and_then(review_item)?;
        if item.status != "open" {
            return Err(EmpiError::Conflict(format!(
                "review item is already {}",
                item.status
            )));
        }
        let a = load_link(conn, &item.record_a)?
            .ok_or_else(|| corrupt("review record without link"))?;
        let b = load_link(conn, &item.record_b)?
            .ok_or_else(|| corrupt("review record without link"))?;
        lock_persons(conn, &[&a.person_id, &b.person_id])?;
        let status = match decision {
            ReviewDecision::Link => {
                if a.person_id != b.person_id {
                    set_link(
                        conn,
                        &item.record_b,
                        &a.person_id,
                        None,
                        DecidedBy::Manual,
                        actor,
                    )?;
                    touch_person(conn, &a.person_id, "active")?;
                    if linked_count(conn, &b.person_id)? == 0 {
                        touch_person(conn, &b.person_id, "empty")?;
                    }
                }
                record_event(
                    conn,
                    "link",
                    Some(&a.person_id),
                    Some(&b.person_id),
                    Some(&item.record_b),
                    actor,
                    serde_json::json!({ "decided_by": "manual", "review": id }),
                )?;
                "linked"
            }
            ReviewDecision::KeepSeparate => {
                // The pair is excluded from automatic linking from now on; when the matcher
                // had linked them, record_b gets a person of its own (a manual decision).
                if a.person_id == b.person_id {
                    let p = new_person(conn)?;
                    set_link(conn, &item.record_b, &p, None, DecidedBy::Manual, actor)?;
                }
                record_event(
                    conn,
                    "keep-separate",
                    Some(&a.person_id),
                    Some(&b.person_id),
                    Some(&item.record_b),
                    actor,
                    serde_json::json!({ "review": id }),
                )?;
                "kept-separate"
            }
        };
        diesel::update(review_t::table.find(id))
            .set((
                review_t::status.eq(status),
                review_t::resolver.eq(actor),
                review_t::note.eq(note),
                review_t::resolved_at.eq(Some(now_utc())),
            ))
            .execute(conn)?;
        review_t::table
            .find(id)
            .select(REVIEW_COLUMNS)
            .first::<ReviewRow>(conn)
            .map_err(EmpiError::from)
            .and_then(review_item)
    })
}

/// An event of the log, oldest first.
#[derive(Clone, Debug, Serialize)]
pub struct EmpiEvent {
    pub id: String,
    pub kind: String,
    pub person_id: Option<String>,
    pub other_person_id: Option<String>,
    pub record_id: Option<String>,
    pub actor: String,
    pub detail: serde_json::Value,
    pub created_at: NaiveDateTime,
}

/// Events that involve a person (as either side).
pub fn events_of_person(conn: &mut DbConn, person: &str) -> Result<Vec<EmpiEvent>, EmpiError> {
    let rows: Vec<EventRow> = events_t::table
        .filter(
            events_t::person_id
                .eq(person)
                .or(events_t::other_person_id.eq(person)),
        )
        .order(events_t::id.asc())
        .select(EVENT_COLUMNS)
        .load(conn)?;
    rows.into_iter().map(event_of_row).collect()
}

type EventRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    String,
    NaiveDateTime,
);

const EVENT_COLUMNS: (
    events_t::id,
    events_t::kind,
    events_t::person_id,
    events_t::other_person_id,
    events_t::record_id,
    events_t::actor,
    events_t::detail,
    events_t::created_at,
) = (
    events_t::id,
    events_t::kind,
    events_t::person_id,
    events_t::other_person_id,
    events_t::record_id,
    events_t::actor,
    events_t::detail,
    events_t::created_at,
);

fn event_of_row(r: EventRow) -> Result<EmpiEvent, EmpiError> {
    Ok(EmpiEvent {
        detail: serde_json::from_str(&r.6).map_err(corrupt)?,
        id: r.0,
        kind: r.1,
        person_id: r.2,
        other_person_id: r.3,
        record_id: r.4,
        actor: r.5,
        created_at: r.7,
    })
}

/// Events not yet delivered to institutions (`notified_at` NULL), oldest first (ids are
/// UUIDv7, so id order is creation order). For the notification sender (subscriptions).
pub fn pending_events(conn: &mut DbConn, limit: i64) -> Result<Vec<EmpiEvent>, EmpiError> {
    let rows: Vec<EventRow> = events_t::table
        .filter(events_t::notified_at.is_null())
        .order(events_t::id.asc())
        .limit(limit)
        .select(EVENT_COLUMNS)
        .load(conn)?;
    rows.into_iter().map(event_of_row).collect()
}

/// Mark events delivered; returns how many were still pending (a second call marks none).
pub fn mark_notified(conn: &mut DbConn, ids: &[String]) -> Result<usize, EmpiError> {
    Ok(diesel::update(
        events_t::table
            .filter(events_t::id.eq_any(ids))
            .filter(events_t::notified_at.is_null()),
    )
    .set(events_t::notified_at.eq(Some(now_utc())))
    .execute(conn)?)
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::empi::synth::{PopulationConfig, generate};
    use crate::store::Backend;
    use crate::store::testdb::TestStore;

    fn add_institutions(conn: &mut DbConn, records: &[SourceRecord]) {
        let ids: BTreeSet<&str> = records.iter().map(|r| r.institution.as_str()).collect();
        let now = now_utc();
        for (n, id) in ids.into_iter().enumerate() {
            diesel::insert_into(institutions::table)
                .values((
                    institutions::id.eq(id),
                    institutions::name.eq(format!("test {id}")),
                    institutions::uscc.eq(format!("91350100MA{n:08}")),
                    institutions::region_code.eq("350100"),
                    institutions::level.eq("3A"),
                    institutions::kind.eq("hospital"),
                    institutions::jwks.eq("{\"keys\":[]}"),
                    institutions::sm2_keys.eq("[]"),
                    institutions::patient_id_system.eq(format!("urn:test:{id}")),
                    institutions::allowed_scopes.eq(""),
                    institutions::require_sm_envelope.eq(false),
                    institutions::status.eq("active"),
                    institutions::version.eq(1i64),
                    institutions::created_at.eq(now),
                    institutions::updated_at.eq(now),
                ))
                .execute(conn)
                .unwrap();
        }
    }

    fn registrations(records: &[SourceRecord]) -> Vec<Registration> {
        records
            .iter()
            .map(|r| Registration {
                institution_id: r.institution.clone(),
                id_system: format!("urn:test:{}", r.institution),
                id_value: r.record_id.0.to_string(),
                record: r.clone(),
                family: String::new(),
                given: String::new(),
                resource: serde_json::json!({ "resourceType": "Patient" }),
            })
            .collect()
    }

    /// Everything matching decided, keyed by identifiers (record and person ids differ between
    /// stores): the persons as sets of identifiers with their versions, each link's score
    /// and decider, the open review pairs, event kinds and data-quality issues.
    #[derive(Debug, PartialEq)]
    struct Decided {
        persons: BTreeSet<(BTreeSet<String>, i64)>,
        links: BTreeMap<String, (Option<String>, String)>,
        reviews: BTreeSet<(String, String, String)>,
        events: BTreeMap<String, usize>,
        issues: BTreeSet<(String, String)>,
    }

    fn decided(conn: &mut DbConn) -> Decided {
        let records: Vec<(String, String, String)> = records_t::table
            .select((records_t::id, records_t::id_system, records_t::id_value))
            .load(conn)
            .unwrap();
        let ident: HashMap<String, String> = records
            .into_iter()
            .map(|(id, s, v)| (id, format!("{s}|{v}")))
            .collect();
        let links: Vec<LinkRow> = links_t::table
            .select(LinkRow::as_select())
            .load(conn)
            .unwrap();
        let versions: HashMap<String, i64> = persons_t::table
            .select((persons_t::id, persons_t::version))
            .load(conn)
            .unwrap()
            .into_iter()
            .collect();
        let mut groups: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut by_record = BTreeMap::new();
        for l in &links {
            groups
                .entry(l.person_id.clone())
                .or_default()
                .insert(ident[&l.record_id].clone());
            by_record.insert(
                ident[&l.record_id].clone(),
                (l.score.map(|s| format!("{s:.9}")), l.decided_by.clone()),
            );
        }
        let reviews: Vec<(String, String, f64, String)> = review_t::table
            .select((
                review_t::record_a,
                review_t::record_b,
                review_t::score,
                review_t::status,
            ))
            .load(conn)
            .unwrap();
        let mut events = BTreeMap::new();
        for kind in events_t::table
            .select(events_t::kind)
            .load::<String>(conn)
            .unwrap()
        {
            *events.entry(kind).or_insert(0) += 1;
        }
        Decided {
            persons: groups
                .into_iter()
                .map(|(p, members)| (members, versions[&p]))
                .collect(),
            links: by_record,
            reviews: reviews
                .into_iter()
                .map(|(a, b, score, status)| {
                    let (a, b) = pair(&ident[&a], &ident[&b]);
                    (a, format!("{b} {score:.9}"), status)
                })
                .collect(),
            events,
            issues: issues_t::table
                .select((issues_t::record_id, issues_t::issue))
                .load::<(String, String)>(conn)
                .unwrap()
                .into_iter()
                .map(|(r, i)| (ident[&r].clone(), i))
                .collect(),
        }
    }

    /// The set-based batch path decides exactly what one-by-one registration decides: the
    /// same persons, link scores, review items, events and issues for a synthetic population
    /// with typos, homophones, twins and missing IDs; and batches that contain a stored or
    /// repeated identifier, or a refused record, still behave as before.
    fn batch_equals_one_by_one(backend: Backend) {
        let pop = generate(&PopulationConfig::new(1_200, 7));
        let regs = registrations(&pop.records);

        let one = TestStore::new(backend);
        let mut a = one.store.conn().unwrap();
        add_institutions(&mut a, &pop.records);
        for reg in &regs {
            register(&mut Audited::unaudited(&mut a), reg, "test").unwrap();
        }

        let set = TestStore::new(backend);
        let mut b = set.store.conn().unwrap();
        add_institutions(&mut b, &pop.records);
        for chunk in regs.chunks(250) {
            let refs: Vec<&Registration> = chunk.iter().collect();
            // The set-based path itself (register_batch would fall back silently).
            let out = write_transaction(&mut b, |c| {
                let (_, model) = current_model(c)?;
                register_new_set(c, &refs, "test", &model)
            })
            .unwrap()
            .expect("all new: the set-based path registers the batch");
            assert!(
                out.iter()
                    .all(|o| matches!(o, Ok(RegistrationOutcome::Created)))
            );
        }
        let expected = decided(&mut a);
        assert!(expected.persons.len() < regs.len(), "some records linked");
        assert!(!expected.reviews.is_empty(), "some pairs queued for review");
        assert_eq!(decided(&mut b), expected);

        // A batch with stored identifiers goes one by one: unchanged, nothing new.
        let again: Vec<&Registration> = regs.iter().take(20).collect();
        let out = register_batch(&mut Audited::unaudited(&mut b), &again, "test").unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, Ok(RegistrationOutcome::Unchanged)))
        );
        assert_eq!(decided(&mut b), expected);

        // A refused record inside a new batch: refused alone, the others created.
        let extra = generate(&PopulationConfig::new(30, 99));
        let mut fresh = registrations(&extra.records);
        for r in &mut fresh {
            r.id_system = format!("{}:extra", r.id_system);
        }
        fresh[3].institution_id = "someone-else".into();
        let refs: Vec<&Registration> = fresh.iter().collect();
        let out = register_batch(&mut Audited::unaudited(&mut b), &refs, "test").unwrap();
        assert!(matches!(
            out[3],
            Err(EmpiError::Invalid {
                field: "institution",
                ..
            })
        ));
        assert_eq!(
            out.iter()
                .filter(|o| matches!(o, Ok(RegistrationOutcome::Created)))
                .count(),
            29
        );
        // An identifier twice in one batch: the second is an update of the first (one by one).
        let twice = [&fresh[0], &fresh[0]];
        let before = decided(&mut b);
        let out = register_batch(&mut Audited::unaudited(&mut b), &twice, "test").unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, Ok(RegistrationOutcome::Unchanged)))
        );
        assert_eq!(decided(&mut b), before);
    }

    /// A telecom search finds a record by any of its phones (through the `ph:` keys), not
    /// only by the first one the phone column keeps.
    fn phone_search_finds_any_of_a_records_phones(backend: Backend) {
        use crate::empi::ident::IdentifierKind;
        use crate::empi::record::Identifier;
        let test = TestStore::new(backend);
        let mut conn = test.store.conn().unwrap();
        let mut record = generate(&PopulationConfig::new(1, 3)).records.remove(0);
        record
            .identifiers
            .retain(|i| i.kind != IdentifierKind::Phone);
        for phone in ["13800138000", "0591-87654321"] {
            record.identifiers.push(Identifier {
                kind: IdentifierKind::Phone,
                value: phone.into(),
            });
        }
        add_institutions(&mut conn, std::slice::from_ref(&record));
        let reg = registrations(std::slice::from_ref(&record)).remove(0);
        register(&mut Audited::unaudited(&mut conn), &reg, "test").unwrap();
        let prepared = prepare(&record);
        assert_eq!(prepared.phones.len(), 2, "{:?}", prepared.phones);
        for phone in &prepared.phones {
            let found = search_records(
                &mut conn,
                &RecordFilter {
                    phone: Some(phone.clone()),
                    ..RecordFilter::default()
                },
            )
            .unwrap();
            assert_eq!(found.len(), 1, "phone {phone}");
            assert_eq!(found[0].id_value, reg.id_value);
        }
        let none = search_records(
            &mut conn,
            &RecordFilter {
                phone: Some("13900000000".into()),
                ..RecordFilter::default()
            },
        )
        .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn phone_search_finds_any_of_a_records_phones_sqlite() {
        phone_search_finds_any_of_a_records_phones(Backend::Sqlite);
    }

    #[test]
    fn phone_search_finds_any_of_a_records_phones_postgres() {
        phone_search_finds_any_of_a_records_phones(Backend::Postgres);
    }

    /// The records of one fresh population, registered as new (all `Created`) in one batch.
    fn register_all_new(conn: &mut DbConn, regs: &[Registration]) {
        let refs: Vec<&Registration> = regs.iter().collect();
        let out = register_batch(&mut Audited::unaudited(conn), &refs, "test").unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, Ok(RegistrationOutcome::Created)))
        );
    }

    /// A batch far larger than the PostgreSQL lock table could hold as per-key locks
    /// (`max_locks_per_transaction` × connections; ~7 locks a record; without the writers'
    /// lock this fails with "out of shared memory") registers: such batches hold the one
    /// writers' lock instead.
    fn large_batches_fit_the_lock_table(backend: Backend) {
        let test = TestStore::new(backend);
        let mut conn = test.store.conn().unwrap();
        let records = match &mut *conn {
            DbConn::Postgresql(pg) => {
                #[derive(QueryableByName)]
                struct Slots {
                    #[diesel(sql_type = diesel::sql_types::BigInt)]
                    n: i64,
                }
                let slots: Slots = diesel::sql_query(
                    "SELECT current_setting('max_locks_per_transaction')::bigint * \
                     (current_setting('max_connections')::bigint + \
                      current_setting('max_prepared_transactions')::bigint) AS n",
                )
                .get_result(pg)
                .unwrap();
                // ≥ 6 keys and 1 identifier a record: about 7 locks per slot (1/3 of that
                // still fitted in the table's spare shared memory; this does not).
                usize::try_from(slots.n).unwrap()
            }
            DbConn::Sqlite(_) => 6_400,
        };
        let pop = generate(&PopulationConfig::new(records, 5));
        add_institutions(&mut conn, &pop.records);
        let regs = registrations(&pop.records);
        register_all_new(&mut conn, &regs);
        let stored: i64 = records_t::table.count().get_result(&mut *conn).unwrap();
        assert_eq!(stored, i64::try_from(regs.len()).unwrap());
    }

    #[test]
    fn large_batches_fit_the_lock_table_sqlite() {
        large_batches_fit_the_lock_table(Backend::Sqlite);
    }

    #[test]
    fn large_batches_fit_the_lock_table_postgres() {
        large_batches_fit_the_lock_table(Backend::Postgres);
    }

    /// While a bulk batch (which takes no per-key locks) is uncommitted, a registration of
    /// the same person from another institution waits for it, and then links to its record
    /// instead of making a second person from a view without the batch.
    fn a_registration_waits_for_an_uncommitted_bulk_batch(backend: Backend) {
        let test = TestStore::new(backend);
        let pop = generate(&PopulationConfig::new(EXCLUSIVE_BATCH + 50, 13));
        let mut setup = test.store.conn().unwrap();
        add_institutions(&mut setup, &pop.records);
        let regs = registrations(&pop.records);
        // The first record again, exactly, as registered by another institution.
        let mut twin = regs[0].clone();
        let other = regs
            .iter()
            .find(|r| r.institution_id != twin.institution_id)
            .unwrap()
            .institution_id
            .clone();
        twin.record.institution.clone_from(&other);
        twin.institution_id.clone_from(&other);
        twin.record.record_id = RecordId(u64::MAX);
        twin.id_system = format!("urn:test:{other}");
        twin.id_value = "twin-of-first".into();
        let (started_tx, started) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let store = &test.store;
            let regs = &regs;
            scope.spawn(move || {
                let mut a = store.conn().unwrap();
                crate::store::write_tx(&mut a, |c| -> Result<(), EmpiError> {
                    let refs: Vec<&Registration> = regs.iter().collect();
                    register_batch(&mut Audited::unaudited(c), &refs, "bulk")?;
                    started_tx.send(()).unwrap();
                    // Long enough for the other registration to finish if it did not wait.
                    std::thread::sleep(std::time::Duration::from_millis(800));
                    Ok(())
                })
                .unwrap();
            });
            started.recv().unwrap();
            let mut b = store.conn().unwrap();
            register(&mut Audited::unaudited(&mut b), &twin, "feed").unwrap();
        });
        let person_of = |conn: &mut DbConn, system: &str, value: &str| -> String {
            let id = find_by_identifier(conn, system, value).unwrap().unwrap().id;
            load_link(conn, &id).unwrap().unwrap().person_id
        };
        assert_eq!(
            person_of(&mut setup, &twin.id_system, &twin.id_value),
            person_of(&mut setup, &regs[0].id_system, &regs[0].id_value),
            "the registration saw the committed batch and linked to its record"
        );
    }

    #[test]
    fn a_registration_waits_for_an_uncommitted_bulk_batch_sqlite() {
        a_registration_waits_for_an_uncommitted_bulk_batch(Backend::Sqlite);
    }

    #[test]
    fn a_registration_waits_for_an_uncommitted_bulk_batch_postgres() {
        a_registration_waits_for_an_uncommitted_bulk_batch(Backend::Postgres);
    }

    #[test]
    fn batch_equals_one_by_one_sqlite() {
        batch_equals_one_by_one(Backend::Sqlite);
    }

    #[test]
    fn batch_equals_one_by_one_postgres() {
        batch_equals_one_by_one(Backend::Postgres);
    }
}
