//! Appending to the chain: one transaction per batch (group commit), the chain head row locked
//! for the whole transaction so positions are dense across replicas.

use chrono::NaiveDateTime;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;

use super::{AuditEvent, AuditSigner, CheckpointRecord, chain_hash};
use crate::store::schema::{audit_chain_head, audit_checkpoints, audit_events};
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// An event with its canonical resource text computed (outside the transaction).
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    pub event: AuditEvent,
    pub resource: String,
}

impl PreparedEvent {
    pub fn new(event: AuditEvent) -> PreparedEvent {
        let resource = event.canonical_resource();
        PreparedEvent { event, resource }
    }
}

/// Where an event landed in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: i64,
    pub hash: String,
}

#[derive(Debug, Clone, Copy)]
pub struct AppendOptions {
    /// Sign a checkpoint when at least this many records follow the last one.
    pub checkpoint_every: i64,
    /// Sign a checkpoint of the head if any record follows the last checkpoint (timer).
    pub force_checkpoint: bool,
}

#[derive(Debug, Clone, Queryable)]
pub(super) struct HeadRow {
    #[allow(dead_code)]
    pub id: i32,
    pub head_seq: i64,
    pub head_hash: String,
    pub checkpoint_seq: i64,
    #[allow(dead_code)]
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone, Insertable, Queryable)]
#[diesel(table_name = audit_events)]
#[diesel(treat_none_as_default_value = false)]
pub(super) struct EventRow {
    pub seq: i64,
    pub event_id: String,
    pub recorded_at: NaiveDateTime,
    pub type_code: String,
    pub subtype_code: String,
    pub outcome: String,
    pub agent_institution: Option<String>,
    pub agent_user: Option<String>,
    pub purpose_of_use: Option<String>,
    pub patient_id: Option<String>,
    pub consent_decision: Option<String>,
    pub request_id: Option<String>,
    pub source_replica: String,
    pub resource: String,
    pub prev_hash: String,
    pub hash: String,
}

impl EventRow {
    fn new(seq: i64, p: &PreparedEvent, prev_hash: String, hash: String) -> EventRow {
        let e = &p.event;
        EventRow {
            seq,
            event_id: e.event_id.clone(),
            recorded_at: e.recorded_at,
            type_code: e.type_code.clone(),
            subtype_code: e.subtype_code.clone(),
            outcome: e.outcome.clone(),
            agent_institution: e.agent_institution.clone(),
            agent_user: e.agent_user.clone(),
            purpose_of_use: e.purpose_of_use.clone(),
            patient_id: e.patient_id.clone(),
            consent_decision: e.consent_decision.clone(),
            request_id: e.request_id.clone(),
            source_replica: e.source_replica.clone(),
            resource: p.resource.clone(),
            prev_hash,
            hash,
        }
    }

    #[cfg(test)]
    pub fn for_test(p: &PreparedEvent) -> EventRow {
        EventRow::new(1, p, String::new(), String::new())
    }

    /// The indexed columns as stored.
    pub fn index(&self) -> IndexColumns {
        IndexColumns {
            event_id: Some(self.event_id.clone()),
            recorded: Some(super::format_time(&self.recorded_at)),
            type_code: Some(self.type_code.clone()),
            subtype_code: Some(self.subtype_code.clone()),
            outcome: Some(self.outcome.clone()),
            agent_institution: self.agent_institution.clone(),
            agent_user: self.agent_user.clone(),
            purpose_of_use: self.purpose_of_use.clone(),
            patient_id: self.patient_id.clone(),
            consent_decision: self.consent_decision.clone(),
            request_id: self.request_id.clone(),
            source_replica: Some(self.source_replica.clone()),
        }
    }
}

/// The values the indexed columns must repeat from the hashed resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct IndexColumns {
    event_id: Option<String>,
    recorded: Option<String>,
    type_code: Option<String>,
    subtype_code: Option<String>,
    outcome: Option<String>,
    agent_institution: Option<String>,
    agent_user: Option<String>,
    purpose_of_use: Option<String>,
    patient_id: Option<String>,
    consent_decision: Option<String>,
    request_id: Option<String>,
    source_replica: Option<String>,
}

impl IndexColumns {
    /// Read the indexed values out of an AuditEvent resource (the shape `to_resource` writes).
    pub fn of_resource(v: &serde_json::Value) -> IndexColumns {
        let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let requestor = &v["agent"][0];
        let patient = v["entity"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["role"]["code"] == "1"))
            .and_then(|e| s(&e["what"]["identifier"]["value"]));
        let ext = |url: &str| {
            v["extension"]
                .as_array()
                .and_then(|xs| xs.iter().find(|x| x["url"] == url))
                .cloned()
        };
        let consent = ext(super::EXT_CONSENT).and_then(|x| {
            x["extension"]
                .as_array()
                .and_then(|xs| xs.iter().find(|i| i["url"] == "decision"))
                .and_then(|i| s(&i["valueCode"]))
        });
        IndexColumns {
            event_id: s(&v["id"]),
            recorded: s(&v["recorded"]),
            type_code: s(&v["type"]["code"]),
            subtype_code: s(&v["subtype"][0]["code"]),
            outcome: s(&v["outcome"]),
            agent_institution: s(&requestor["who"]["identifier"]["value"]),
            agent_user: s(&requestor["altId"]),
            purpose_of_use: s(&requestor["purposeOfUse"][0]["coding"][0]["code"]),
            patient_id: patient,
            consent_decision: consent,
            request_id: ext(super::EXT_REQUEST_ID).and_then(|x| s(&x["valueString"])),
            source_replica: s(&v["source"]["observer"]["display"]),
        }
    }
}

#[derive(Insertable)]
#[diesel(table_name = audit_checkpoints)]
struct CheckpointRow<'a> {
    seq: i64,
    head_hash: &'a str,
    signed_at: NaiveDateTime,
    key_id: &'a str,
    signature: &'a str,
}

/// Rows per INSERT statement (PostgreSQL allows 65535 bind parameters; 20 columns per row).
const INSERT_CHUNK: usize = 1000;

/// The current chain head `(head_seq, head_hash, checkpoint_seq)`, without locking.
pub fn chain_head(conn: &mut DbConn) -> Result<(i64, String, i64), StoreError> {
    let head: HeadRow = audit_chain_head::table
        .find(1)
        .first(conn)
        .map_err(StoreError::from_diesel)?;
    Ok((head.head_seq, head.head_hash, head.checkpoint_seq))
}

/// Is a timed checkpoint worth taking (records after the last checkpoint)?
pub fn checkpoint_due(conn: &mut DbConn) -> Result<bool, StoreError> {
    let (seq, _, cp) = chain_head(conn)?;
    Ok(seq > cp)
}

/// Batches from this many rows go through PostgreSQL's binary `COPY FROM` (fewer bytes, no
/// statement of 16 × 1000 parameters to parse); smaller ones through one INSERT.
const COPY_FROM_ROWS: usize = 32;

/// Insert the chain's new rows on PostgreSQL.
fn insert_rows_pg(tx: &mut diesel::PgConnection, rows: &[EventRow]) -> QueryResult<()> {
    if rows.len() >= COPY_FROM_ROWS {
        diesel::copy_from(audit_events::table)
            .from_insertable(rows)
            .execute(tx)?;
    } else {
        diesel::insert_into(audit_events::table)
            .values(rows)
            .execute(tx)?;
    }
    Ok(())
}

/// Insert the chain's new rows on SQLite.
fn insert_rows_sqlite(tx: &mut diesel::SqliteConnection, rows: &[EventRow]) -> QueryResult<()> {
    for chunk in rows.chunks(INSERT_CHUNK) {
        diesel::insert_into(audit_events::table)
            .values(chunk)
            .execute(tx)?;
    }
    Ok(())
}

macro_rules! append_body {
    ($tx:expr, $head:expr, $batch:expr, $signer:expr, $opts:expr, $insert:path) => {{
        let head: HeadRow = $head;
        let mut seq = head.head_seq;
        let mut prev = head.head_hash;
        let mut rows = Vec::with_capacity($batch.len());
        let mut out = Vec::with_capacity($batch.len());
        for p in $batch {
            seq += 1;
            let hash = chain_hash(&prev, &p.resource);
            out.push(Appended {
                seq,
                hash: hash.clone(),
            });
            rows.push(EventRow::new(
                seq,
                p,
                std::mem::replace(&mut prev, hash.clone()),
                hash,
            ));
        }
        $insert($tx, &rows)?;
        let mut checkpoint_seq = head.checkpoint_seq;
        if seq > checkpoint_seq
            && ($opts.force_checkpoint || seq - checkpoint_seq >= $opts.checkpoint_every)
        {
            let cp: CheckpointRecord = $signer
                .checkpoint(seq, &prev, now_utc())
                .map_err(|e| diesel::result::Error::QueryBuilderError(Box::new(e)))?;
            let signed_at =
                chrono::NaiveDateTime::parse_from_str(&cp.signed_at, "%Y-%m-%dT%H:%M:%S%.6fZ")
                    .map_err(|e| diesel::result::Error::QueryBuilderError(Box::new(e)))?;
            diesel::insert_into(audit_checkpoints::table)
                .values(CheckpointRow {
                    seq,
                    head_hash: &cp.head_hash,
                    signed_at,
                    key_id: &cp.key_id,
                    signature: &cp.signature,
                })
                .execute($tx)?;
            checkpoint_seq = seq;
        }
        if seq != head.head_seq || checkpoint_seq != head.checkpoint_seq {
            diesel::update(audit_chain_head::table.find(1))
                .set((
                    audit_chain_head::head_seq.eq(seq),
                    audit_chain_head::head_hash.eq(&prev),
                    audit_chain_head::checkpoint_seq.eq(checkpoint_seq),
                    audit_chain_head::updated_at.eq(now_utc()),
                ))
                .execute($tx)?;
        }
        Ok(out)
    }};
}

/// Append `batch` in one transaction: lock the chain head, insert the records with dense
/// positions, sign a checkpoint if due, move the head. Durable when this returns `Ok`
/// (PostgreSQL commit; SQLite commit with `synchronous = FULL`).
pub fn append_batch(
    conn: &mut DbConn,
    batch: &[PreparedEvent],
    signer: &AuditSigner,
    opts: AppendOptions,
) -> Result<Vec<Appended>, StoreError> {
    match conn {
        DbConn::Postgresql(pg) => pg
            .transaction::<_, diesel::result::Error, _>(|tx| {
                let head: HeadRow = audit_chain_head::table.find(1).for_update().first(tx)?;
                append_body!(tx, head, batch, signer, opts, insert_rows_pg)
            })
            .map_err(StoreError::from_diesel),
        DbConn::Sqlite(lite) => {
            lite.batch_execute("PRAGMA synchronous = FULL")
                .map_err(StoreError::from_diesel)?;
            lite.immediate_transaction::<_, diesel::result::Error, _>(|tx| {
                let head: HeadRow = audit_chain_head::table.find(1).first(tx)?;
                append_body!(tx, head, batch, signer, opts, insert_rows_sqlite)
            })
            .map_err(StoreError::from_diesel)
        }
    }
}

/// Why an audited change was not committed: the change itself refused, or the database
/// (including the audit append) failed. Either way nothing of it was stored.
#[derive(Debug)]
pub enum ChangeError<E> {
    Change(E),
    Db(diesel::result::Error),
}

impl<E> From<diesel::result::Error> for ChangeError<E> {
    fn from(e: diesel::result::Error) -> ChangeError<E> {
        ChangeError::Db(e)
    }
}

/// Run `work` (a change: it returns its result and the audit event describing it) and append
/// that event in the SAME transaction: the change is committed if and only if its audit record
/// is. The chain head is locked after the change (PostgreSQL), so the lock is held only for the
/// append; on SQLite the write lock is taken first (a deferred transaction cannot wait for it).
/// `work` gets the [`Audited`] connection the registry's write functions require.
pub fn append_with<T, E, F>(
    conn: &mut DbConn,
    signer: &AuditSigner,
    opts: AppendOptions,
    work: F,
) -> Result<(T, Appended), ChangeError<E>>
where
    F: FnOnce(&mut Audited<'_>) -> Result<(T, AuditEvent), E>,
{
    let (value, mut appended) = append_many_with(conn, signer, opts, |tx| {
        work(tx).map(|(value, event)| (value, vec![event]))
    })?;
    let first = appended.pop().ok_or(diesel::result::Error::NotFound)?;
    Ok((value, first))
}

/// [`append_with`] for a change described by several audit records (a batch: one record per
/// registered item), all appended in the change's transaction. An empty list is refused: a
/// change without its record is never committed.
pub fn append_many_with<T, E, F>(
    conn: &mut DbConn,
    signer: &AuditSigner,
    opts: AppendOptions,
    work: F,
) -> Result<(T, Vec<Appended>), ChangeError<E>>
where
    F: FnOnce(&mut Audited<'_>) -> Result<(T, Vec<AuditEvent>), E>,
{
    if let DbConn::Sqlite(lite) = conn {
        lite.batch_execute("PRAGMA synchronous = FULL")?;
    }
    crate::store::write_tx::<_, ChangeError<E>>(conn, |tx| {
        if matches!(tx, DbConn::Sqlite(_)) {
            diesel::update(audit_chain_head::table.find(1))
                .set(audit_chain_head::head_seq.eq(audit_chain_head::head_seq))
                .execute(tx)?;
        }
        let (value, events) = work(&mut Audited::new(tx)).map_err(ChangeError::Change)?;
        if events.is_empty() {
            return Err(ChangeError::Db(diesel::result::Error::QueryBuilderError(
                "an audited change must carry at least one audit record".into(),
            )));
        }
        let prepared: Vec<PreparedEvent> = events.into_iter().map(PreparedEvent::new).collect();
        let appended: Vec<Appended> = match tx {
            DbConn::Postgresql(pg) => {
                let head: HeadRow = audit_chain_head::table.find(1).for_update().first(pg)?;
                (|| -> Result<Vec<Appended>, diesel::result::Error> {
                    append_body!(pg, head, &prepared, signer, opts, insert_rows_pg)
                })()?
            }
            DbConn::Sqlite(lite) => {
                let head: HeadRow = audit_chain_head::table.find(1).first(lite)?;
                (|| -> Result<Vec<Appended>, diesel::result::Error> {
                    append_body!(lite, head, &prepared, signer, opts, insert_rows_sqlite)
                })()?
            }
        };
        Ok((value, appended))
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::Backend;
    use crate::audit::{AuditEvent, verify_db};
    use crate::store::testdb::TestStore;

    /// Events with every optional column both empty and filled, non-ASCII text included.
    fn events(n: usize, tag: &str) -> Vec<PreparedEvent> {
        (0..n)
            .map(|i| {
                let mut e = AuditEvent::rest("read", "R", "replica-α");
                if i % 2 == 0 {
                    e.agent_institution = Some(format!("hosp-{:03}", i % 7));
                    e.patient_id = Some(format!("EMPI-{tag}-{i}"));
                    e.purpose_of_use = Some("TREAT".into());
                    e.consent_decision = Some("permit".into());
                    e.request_id = Some(format!("req-{tag}-{i}"));
                    e.agent_user = Some(format!("医生{i}"));
                }
                e.entities
                    .push(crate::audit::EntityRef::query(format!("张三 {tag} {i}")));
                PreparedEvent::new(e)
            })
            .collect()
    }

    /// A large batch (binary COPY on PostgreSQL) and a small one (INSERT) store exactly the
    /// rows the chain hashes: read back column by column, and the whole chain verifies.
    fn large_and_small_batches_store_the_hashed_rows(backend: Backend) {
        let db = TestStore::new(backend);
        let mut conn = db.store.conn().unwrap();
        let signer = AuditSigner::new(&yiqiao_sm::Sm2PrivateKey::generate().unwrap()).unwrap();
        let opts = AppendOptions {
            checkpoint_every: 100,
            force_checkpoint: false,
        };
        let large = events(COPY_FROM_ROWS * 8 + 3, "large");
        let small = events(COPY_FROM_ROWS - 1, "small");
        let mut appended = append_batch(&mut conn, &large, &signer, opts).unwrap();
        appended.extend(append_batch(&mut conn, &small, &signer, opts).unwrap());
        let expected: Vec<PreparedEvent> = large.into_iter().chain(small).collect();
        assert_eq!(appended.len(), expected.len());
        let stored: Vec<EventRow> = audit_events::table
            .order(audit_events::seq.asc())
            .select((
                audit_events::seq,
                audit_events::event_id,
                audit_events::recorded_at,
                audit_events::type_code,
                audit_events::subtype_code,
                audit_events::outcome,
                audit_events::agent_institution,
                audit_events::agent_user,
                audit_events::purpose_of_use,
                audit_events::patient_id,
                audit_events::consent_decision,
                audit_events::request_id,
                audit_events::source_replica,
                audit_events::resource,
                audit_events::prev_hash,
                audit_events::hash,
            ))
            .load(&mut conn)
            .unwrap();
        assert_eq!(stored.len(), expected.len());
        for ((row, p), a) in stored.iter().zip(&expected).zip(&appended) {
            assert_eq!(row.seq, a.seq);
            assert_eq!(row.hash, a.hash);
            assert_eq!(row.resource, p.resource, "resource text of {}", row.seq);
            let want = EventRow::new(a.seq, p, row.prev_hash.clone(), a.hash.clone());
            assert_eq!(row.index(), want.index(), "indexed columns of {}", row.seq);
            assert_eq!(
                row.index(),
                IndexColumns::of_resource(&serde_json::from_str(&row.resource).unwrap())
            );
        }
        let report = verify_db(&mut conn, None, None, signer.public_key()).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
        assert_eq!(report.records, expected.len() as u64);
    }

    #[test]
    fn large_and_small_batches_store_the_hashed_rows_sqlite() {
        large_and_small_batches_store_the_hashed_rows(Backend::Sqlite);
    }

    #[test]
    fn large_and_small_batches_store_the_hashed_rows_postgres() {
        large_and_small_batches_store_the_hashed_rows(Backend::Postgres);
    }

    /// On PostgreSQL a record too large to keep inline (many consent reasons) is compressed
    /// with lz4 (the store's connections ask for it; this server has it), and reads back
    /// exactly.
    #[test]
    fn large_records_are_lz4_compressed_on_postgres() {
        use diesel::sql_types::{Nullable, Text};
        #[derive(QueryableByName)]
        struct Method {
            #[diesel(sql_type = Nullable<Text>)]
            method: Option<String>,
        }
        let db = TestStore::new(Backend::Postgres);
        let mut conn = db.store.conn().unwrap();
        let signer = AuditSigner::new(&yiqiao_sm::Sm2PrivateKey::generate().unwrap()).unwrap();
        let mut e = AuditEvent::rest("search-type", "E", "replica-1");
        e.consent_decision = Some("permit".into());
        let items: Vec<String> = (0..200)
            .map(|i| format!("{{\"patient\":\"P{i}\",\"resources\":[\"DocumentReference/{i}\"]}}"))
            .collect();
        e.consent_reasons = Some(format!("[{{\"items\":[{}]}}]", items.join(",")));
        let prepared = PreparedEvent::new(e);
        assert!(prepared.resource.len() > 8_000);
        let opts = AppendOptions {
            checkpoint_every: 100,
            force_checkpoint: false,
        };
        let appended =
            append_batch(&mut conn, std::slice::from_ref(&prepared), &signer, opts).unwrap();
        let DbConn::Postgresql(pg) = &mut *conn else {
            panic!("not PostgreSQL")
        };
        let m: Method = diesel::sql_query(
            "SELECT pg_column_compression(resource)::text AS method FROM audit_events WHERE seq = $1",
        )
        .bind::<diesel::sql_types::BigInt, _>(appended[0].seq)
        .get_result(pg)
        .unwrap();
        assert_eq!(m.method.as_deref(), Some("lz4"));
        let text: String = audit_events::table
            .find(appended[0].seq)
            .select(audit_events::resource)
            .first(&mut conn)
            .unwrap();
        assert_eq!(text, prepared.resource);
    }
}
