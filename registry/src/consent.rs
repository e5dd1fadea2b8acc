//! Storage of patients' consents and data-sharing agreements (issue 5).
//!
//! - `consents` holds the current version of each FHIR Consent (the JSON as recorded, plus the
//!   columns decisions and searches need); `consent_history` holds every version.
//! - `data_sharing_agreements` holds agreements between a custodian and a recipient.
//! - `consent_change_seq` is one counter incremented by every write to either table, in the
//!   same transaction; each changed row records the counter value (`change_seq`). A replica
//!   that remembers the counter it last saw asks [`changes_since`] which patients changed, so
//!   cached consents are refreshed on the next request after a commit (versioned reads).
//!   The counter row is updated first in every write transaction, so writers are serialised and
//!   counter values become visible in order.
//!
//! The enterprise person id is the patient key; the gateway resolves references before storing.
//! Consents follow EMPI merges without being rewritten: the consents that apply to a person
//! are its own and those of every person merged into it ([`for_patients`]). A merge or unmerge
//! calls [`subjects_changed`] in its transaction, so caches drop both persons.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::store::schema::{
    consent_change_seq, consent_history, consent_subject_changes, consents,
    data_sharing_agreements, empi_persons,
};
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// A consent as stored (current version).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = consents)]
pub struct StoredConsent {
    pub id: String,
    pub version: i64,
    /// Enterprise person id.
    pub patient_id: String,
    /// FHIR status, or `revoked`.
    pub status: String,
    /// `permit` or `deny`.
    pub provision: String,
    pub period_start: Option<NaiveDateTime>,
    pub period_end: Option<NaiveDateTime>,
    pub recorded_by: String,
    /// FHIR Consent JSON text.
    pub resource: String,
    pub change_seq: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// What a create or update writes.
#[derive(Debug, Clone)]
pub struct ConsentWrite {
    pub id: String,
    pub patient_id: String,
    pub status: String,
    pub provision: String,
    pub period_start: Option<NaiveDateTime>,
    pub period_end: Option<NaiveDateTime>,
    /// Who makes the change (an institution id, or `staff:<subject>`). On create it becomes
    /// the consent's recorder (`recorded_by`, its custodian), which later versions keep.
    pub actor: String,
    /// FHIR Consent JSON text.
    pub resource: String,
}

/// One version in the history.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = consent_history)]
pub struct ConsentVersion {
    pub id: String,
    pub version: i64,
    pub status: String,
    pub resource: String,
    pub changed_by: String,
    pub changed_at: NaiveDateTime,
}

/// Increment the change counter (first statement of every write transaction); returns it.
fn bump(conn: &mut DbConn) -> Result<i64, diesel::result::Error> {
    diesel::update(consent_change_seq::table.find(1))
        .set(consent_change_seq::seq.eq(consent_change_seq::seq + 1))
        .execute(conn)?;
    consent_change_seq::table
        .find(1)
        .select(consent_change_seq::seq)
        .first(conn)
}

/// The change counter now (0 before any change).
pub fn current_seq(conn: &mut DbConn) -> Result<i64, StoreError> {
    consent_change_seq::table
        .find(1)
        .select(consent_change_seq::seq)
        .first(conn)
        .optional()
        .map(|s| s.unwrap_or(0))
        .map_err(StoreError::from_diesel)
}

/// What changed after counter value `seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// The counter now.
    pub seq: i64,
    /// Patients whose consents changed.
    pub patients: Vec<String>,
    /// Whether any agreement changed.
    pub agreements: bool,
}

/// Patients and agreements changed after `seq`. Reads the counter first, so a change committed
/// while this runs is reported now or on the next call, never lost.
pub fn changes_since(conn: &mut DbConn, seq: i64) -> Result<Changes, StoreError> {
    let now = current_seq(conn)?;
    if now == seq {
        return Ok(Changes {
            seq,
            ..Changes::default()
        });
    }
    let patients: Vec<String> = consents::table
        .filter(consents::change_seq.gt(seq))
        .select(consents::patient_id)
        .distinct()
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    let moved: Vec<String> = consent_subject_changes::table
        .filter(consent_subject_changes::change_seq.gt(seq))
        .select(consent_subject_changes::person_id)
        .distinct()
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    let mut patients = patients;
    for p in moved {
        if !patients.contains(&p) {
            patients.push(p);
        }
    }
    let agreements: i64 = data_sharing_agreements::table
        .filter(data_sharing_agreements::change_seq.gt(seq))
        .count()
        .get_result(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(Changes {
        seq: now,
        patients,
        agreements: agreements > 0,
    })
}

fn history_row(conn: &mut DbConn, c: &StoredConsent, by: &str) -> QueryResult<usize> {
    diesel::insert_into(consent_history::table)
        .values((
            consent_history::id.eq(&c.id),
            consent_history::version.eq(c.version),
            consent_history::status.eq(&c.status),
            consent_history::resource.eq(&c.resource),
            consent_history::changed_by.eq(by),
            consent_history::changed_at.eq(c.updated_at),
        ))
        .execute(conn)
}

/// Store a new consent (version 1). A duplicate id is a [`StoreError::Conflict`].
pub fn create(tx: &mut Audited<'_>, w: &ConsentWrite) -> Result<StoredConsent, StoreError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let seq = bump(conn)?;
        let now = now_utc();
        let row = StoredConsent {
            id: w.id.clone(),
            version: 1,
            patient_id: w.patient_id.clone(),
            status: w.status.clone(),
            provision: w.provision.clone(),
            period_start: w.period_start,
            period_end: w.period_end,
            recorded_by: w.actor.clone(),
            resource: w.resource.clone(),
            change_seq: seq,
            created_at: now,
            updated_at: now,
        };
        diesel::insert_into(consents::table)
            .values((
                consents::id.eq(&row.id),
                consents::version.eq(row.version),
                consents::patient_id.eq(&row.patient_id),
                consents::status.eq(&row.status),
                consents::provision.eq(&row.provision),
                consents::period_start.eq(row.period_start),
                consents::period_end.eq(row.period_end),
                consents::recorded_by.eq(&row.recorded_by),
                consents::resource.eq(&row.resource),
                consents::change_seq.eq(row.change_seq),
                consents::created_at.eq(row.created_at),
                consents::updated_at.eq(row.updated_at),
            ))
            .execute(conn)?;
        history_row(conn, &row, &w.actor)?;
        Ok(row)
    })
    .map_err(StoreError::from_diesel)
}

/// Why an update was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("consent {0} does not exist")]
    NotFound(String),
    #[error(
        "version conflict: the consent is at version {actual}, the request expected {expected}"
    )]
    VersionConflict { expected: i64, actual: i64 },
    #[error("a consent cannot move to another patient (stored for {stored}); record a new Consent")]
    PatientChanged { stored: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for UpdateError {
    fn from(e: diesel::result::Error) -> UpdateError {
        UpdateError::Store(StoreError::from_diesel(e))
    }
}

/// Replace a consent with a new version. `expected` is the version the caller read
/// (`If-Match`), checked inside the transaction.
pub fn update(
    tx: &mut Audited<'_>,
    w: &ConsentWrite,
    expected: Option<i64>,
) -> Result<StoredConsent, UpdateError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let seq = bump(conn)?;
        let old: StoredConsent = consents::table
            .find(&w.id)
            .select(StoredConsent::as_select())
            .first(conn)
            .optional()?
            .ok_or_else(|| UpdateError::NotFound(w.id.clone()))?;
        if let Some(expected) = expected
            && expected != old.version
        {
            return Err(UpdateError::VersionConflict {
                expected,
                actual: old.version,
            });
        }
        if old.patient_id != w.patient_id {
            return Err(UpdateError::PatientChanged {
                stored: old.patient_id,
            });
        }
        let row = StoredConsent {
            version: old.version + 1,
            status: w.status.clone(),
            provision: w.provision.clone(),
            period_start: w.period_start,
            period_end: w.period_end,
            // The custodian that recorded the consent stays its custodian; who made this
            // version is in the history (`changed_by`) and the audit trail.
            recorded_by: old.recorded_by.clone(),
            resource: w.resource.clone(),
            change_seq: seq,
            updated_at: now_utc(),
            ..old
        };
        diesel::update(consents::table.find(&row.id))
            .set((
                consents::version.eq(row.version),
                consents::status.eq(&row.status),
                consents::provision.eq(&row.provision),
                consents::period_start.eq(row.period_start),
                consents::period_end.eq(row.period_end),
                consents::resource.eq(&row.resource),
                consents::change_seq.eq(row.change_seq),
                consents::updated_at.eq(row.updated_at),
            ))
            .execute(conn)?;
        history_row(conn, &row, &w.actor)?;
        Ok(row)
    })
}

/// One consent by id.
pub fn get(conn: &mut DbConn, id: &str) -> Result<Option<StoredConsent>, StoreError> {
    consents::table
        .find(id)
        .select(StoredConsent::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}

/// Every version of a consent, oldest first.
pub fn history(conn: &mut DbConn, id: &str) -> Result<Vec<ConsentVersion>, StoreError> {
    consent_history::table
        .filter(consent_history::id.eq(id))
        .order(consent_history::version.asc())
        .select(ConsentVersion::as_select())
        .load(conn)
        .map_err(StoreError::from_diesel)
}

/// Search filter.
#[derive(Debug, Clone, Default)]
pub struct ConsentFilter {
    pub patient_id: Option<String>,
    pub status: Option<String>,
    pub limit: i64,
    pub offset: i64,
}

/// Consents matching the filter, by id.
pub fn search(conn: &mut DbConn, f: &ConsentFilter) -> Result<Vec<StoredConsent>, StoreError> {
    let mut q = consents::table
        .select(StoredConsent::as_select())
        .order(consents::id.asc())
        .limit(f.limit)
        .offset(f.offset)
        .into_boxed();
    if let Some(p) = &f.patient_id {
        q = q.filter(consents::patient_id.eq(p.clone()));
    }
    if let Some(s) = &f.status {
        q = q.filter(consents::status.eq(s.clone()));
    }
    q.load(conn).map_err(StoreError::from_diesel)
}

/// The consents of persons whose applicable consents changed without a consent row changing
/// (an EMPI merge or unmerge of them): increments the change counter and records them, in the
/// caller's transaction. Returns the counter value.
pub fn subjects_changed(conn: &mut DbConn, persons: &[&str]) -> Result<i64, StoreError> {
    let seq = bump(conn).map_err(StoreError::from_diesel)?;
    let mut seen: Vec<&str> = Vec::new();
    for p in persons {
        if seen.contains(p) {
            continue;
        }
        seen.push(p);
        diesel::insert_into(consent_subject_changes::table)
            .values((
                consent_subject_changes::change_seq.eq(seq),
                consent_subject_changes::person_id.eq(*p),
            ))
            .execute(conn)
            .map_err(StoreError::from_diesel)?;
    }
    Ok(seq)
}

/// Longest chain of merges followed (a merge of a merged person is refused, so chains are
/// built only by merging survivors; this bounds a corrupt cycle).
const MAX_MERGE_DEPTH: usize = 16;

/// All consents that apply to these patients (any status; the engine keeps only those in
/// force), as (requested patient, consent): a person's own consents and those recorded for
/// every person merged into it, directly or through a chain of merges.
pub fn for_patients(
    conn: &mut DbConn,
    patients: &[String],
) -> Result<Vec<(String, StoredConsent)>, StoreError> {
    // subject person -> the requested persons its consents count for.
    let mut owners: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for p in patients {
        owners.entry(p.clone()).or_default().push(p.clone());
    }
    let mut frontier: Vec<String> = owners.keys().cloned().collect();
    for _ in 0..MAX_MERGE_DEPTH {
        if frontier.is_empty() {
            break;
        }
        let mut next = Vec::new();
        for chunk in frontier.chunks(500) {
            let merged: Vec<(String, Option<String>)> = empi_persons::table
                .filter(empi_persons::merged_into.eq_any(chunk))
                .filter(empi_persons::status.eq("merged"))
                .select((empi_persons::id, empi_persons::merged_into))
                .load(conn)
                .map_err(StoreError::from_diesel)?;
            for (id, into) in merged {
                let Some(into) = into else { continue };
                let inherited = owners.get(&into).cloned().unwrap_or_default();
                let entry = owners.entry(id.clone()).or_default();
                let before = entry.len();
                for o in inherited {
                    if !entry.contains(&o) {
                        entry.push(o);
                    }
                }
                if entry.len() > before {
                    next.push(id);
                }
            }
        }
        frontier = next;
    }
    let subjects: Vec<String> = owners.keys().cloned().collect();
    let mut out = Vec::new();
    // Bounded IN lists (SQLite's default variable limit is generous, but keep batches small).
    for chunk in subjects.chunks(500) {
        let rows: Vec<StoredConsent> = consents::table
            .filter(consents::patient_id.eq_any(chunk))
            .select(StoredConsent::as_select())
            .load(conn)
            .map_err(StoreError::from_diesel)?;
        for row in rows {
            for p in owners.get(&row.patient_id).into_iter().flatten() {
                out.push((p.clone(), row.clone()));
            }
        }
    }
    Ok(out)
}

/// A data-sharing agreement as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = data_sharing_agreements)]
pub struct StoredAgreement {
    pub id: String,
    pub custodian: String,
    pub recipient: String,
    /// JSON array of purpose codes.
    pub purposes: String,
    /// JSON array of `{"system","code"}` data classes.
    pub classes: String,
    pub period_start: Option<NaiveDateTime>,
    pub period_end: Option<NaiveDateTime>,
    pub status: String,
    pub version: i64,
    pub change_seq: i64,
    pub updated_at: NaiveDateTime,
}

/// What an agreement write stores.
#[derive(Debug, Clone)]
pub struct AgreementWrite {
    pub id: String,
    pub custodian: String,
    pub recipient: String,
    pub purposes: String,
    pub classes: String,
    pub period_start: Option<NaiveDateTime>,
    pub period_end: Option<NaiveDateTime>,
    pub status: String,
}

/// Create or replace an agreement (version 1, or the next version).
pub fn put_agreement(
    tx: &mut Audited<'_>,
    w: &AgreementWrite,
) -> Result<StoredAgreement, StoreError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        let seq = bump(conn)?;
        let old: Option<i64> = data_sharing_agreements::table
            .find(&w.id)
            .select(data_sharing_agreements::version)
            .first(conn)
            .optional()?;
        let row = StoredAgreement {
            id: w.id.clone(),
            custodian: w.custodian.clone(),
            recipient: w.recipient.clone(),
            purposes: w.purposes.clone(),
            classes: w.classes.clone(),
            period_start: w.period_start,
            period_end: w.period_end,
            status: w.status.clone(),
            version: old.map_or(1, |v| v + 1),
            change_seq: seq,
            updated_at: now_utc(),
        };
        let values = (
            data_sharing_agreements::custodian.eq(&row.custodian),
            data_sharing_agreements::recipient.eq(&row.recipient),
            data_sharing_agreements::purposes.eq(&row.purposes),
            data_sharing_agreements::classes.eq(&row.classes),
            data_sharing_agreements::period_start.eq(row.period_start),
            data_sharing_agreements::period_end.eq(row.period_end),
            data_sharing_agreements::status.eq(&row.status),
            data_sharing_agreements::version.eq(row.version),
            data_sharing_agreements::change_seq.eq(row.change_seq),
            data_sharing_agreements::updated_at.eq(row.updated_at),
        );
        if old.is_some() {
            diesel::update(data_sharing_agreements::table.find(&row.id))
                .set(values)
                .execute(conn)?;
        } else {
            diesel::insert_into(data_sharing_agreements::table)
                .values((data_sharing_agreements::id.eq(&row.id), values))
                .execute(conn)?;
        }
        Ok(row)
    })
    .map_err(StoreError::from_diesel)
}

/// All agreements (a region has few; the gateway caches them whole).
pub fn list_agreements(conn: &mut DbConn) -> Result<Vec<StoredAgreement>, StoreError> {
    data_sharing_agreements::table
        .order(data_sharing_agreements::id.asc())
        .select(StoredAgreement::as_select())
        .load(conn)
        .map_err(StoreError::from_diesel)
}

/// One agreement by id.
pub fn get_agreement(conn: &mut DbConn, id: &str) -> Result<Option<StoredAgreement>, StoreError> {
    data_sharing_agreements::table
        .find(id)
        .select(StoredAgreement::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}
