//! Care relationships (encounters): which institution treats which patient, and when.
//!
//! The treating institution registers its visits (FHIR `Encounter`, or HL7 v2 ADT with PV1);
//! the consent engine asks [`active_for_persons`] whether a patient has an encounter with an
//! institution that counts as a care relationship at a given time (rule 6: an internet hospital
//! sees a patient only with a consent naming it or during such an encounter). An encounter here
//! says who treats whom, when — it is not clinical content and is not served to other
//! institutions.
//!
//! Invariants:
//! - `(institution_id, institution_encounter_id)` is unique: registering the same visit again
//!   with the same content stores nothing ([`UpsertOutcome::Unchanged`]); a change of status,
//!   class, period or resource makes the next version.
//! - The patient is an EMPI source record of the registering institution (by its identifier).
//!   The enterprise person is not stored: it is read through `empi_links` whenever encounters
//!   are looked up, so merges and unmerges are followed without rewriting encounters.
//! - Writes of one visit are serialised (PostgreSQL: a transaction-scoped advisory lock on the
//!   visit; SQLite: the transaction writes first, so it holds the write lock), so concurrent
//!   registrations of one visit make one row and updates are never lost.
//! - A `finished` encounter always has `period_end` (checked on write).
//!
//! Which encounters count as a care relationship at time `at` ([`EncounterStatus::counts`]):
//! status `arrived`, `in-progress`, `onleave` or `finished`, with `period_start <= at` and
//! (`period_end` absent or `at <= period_end`). `planned` does not count: a booked visit is not
//! yet a relationship, and counting it would let an institution open access to a patient's
//! records ahead of time just by booking. `cancelled` and `entered-in-error` never count.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde_json::Value;

use crate::empi::store::{self as empi, EmpiError};
use crate::store::schema::{empi_links, encounters as enc_t};
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// Longest visit number accepted (characters).
pub const MAX_IDENTIFIER_CHARS: usize = 256;

/// `Encounter.status` (FHIR R4), the subset the registry accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EncounterStatus {
    Planned,
    Arrived,
    InProgress,
    #[serde(rename = "onleave")]
    OnLeave,
    Finished,
    Cancelled,
    EnteredInError,
}

impl EncounterStatus {
    pub const ALL: [EncounterStatus; 7] = [
        EncounterStatus::Planned,
        EncounterStatus::Arrived,
        EncounterStatus::InProgress,
        EncounterStatus::OnLeave,
        EncounterStatus::Finished,
        EncounterStatus::Cancelled,
        EncounterStatus::EnteredInError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EncounterStatus::Planned => "planned",
            EncounterStatus::Arrived => "arrived",
            EncounterStatus::InProgress => "in-progress",
            EncounterStatus::OnLeave => "onleave",
            EncounterStatus::Finished => "finished",
            EncounterStatus::Cancelled => "cancelled",
            EncounterStatus::EnteredInError => "entered-in-error",
        }
    }

    pub fn parse(raw: &str) -> Option<EncounterStatus> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Whether an encounter in this status is a care relationship during its period.
    pub fn counts(self) -> bool {
        matches!(
            self,
            EncounterStatus::Arrived
                | EncounterStatus::InProgress
                | EncounterStatus::OnLeave
                | EncounterStatus::Finished
        )
    }
}

/// `Encounter.class` (v3 ActCode), the codes the registry accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum EncounterClass {
    /// `AMB` — outpatient (门诊).
    Ambulatory,
    /// `IMP` — inpatient (住院).
    Inpatient,
    /// `EMER` — emergency (急诊).
    Emergency,
    /// `VR` — virtual, e.g. an internet-hospital consultation (互联网诊疗).
    Virtual,
}

impl EncounterClass {
    pub const ALL: [EncounterClass; 4] = [
        EncounterClass::Ambulatory,
        EncounterClass::Inpatient,
        EncounterClass::Emergency,
        EncounterClass::Virtual,
    ];

    pub fn code(self) -> &'static str {
        match self {
            EncounterClass::Ambulatory => "AMB",
            EncounterClass::Inpatient => "IMP",
            EncounterClass::Emergency => "EMER",
            EncounterClass::Virtual => "VR",
        }
    }

    pub fn parse(code: &str) -> Option<EncounterClass> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// A registration (or a new state of a registered visit) as an entry point hands it over.
#[derive(Debug, Clone)]
pub struct NewEncounter {
    /// The treating institution (`serviceProvider`), also the registering one.
    pub institution_id: String,
    /// The institution's visit number (`Encounter.identifier` value).
    pub identifier: String,
    /// The patient's identifier as the institution registered it in the EMPI.
    pub patient_system: String,
    pub patient_value: String,
    pub status: EncounterStatus,
    pub class: EncounterClass,
    /// UTC, truncated to microseconds by the caller.
    pub period_start: NaiveDateTime,
    pub period_end: Option<NaiveDateTime>,
    /// The Encounter as it is to be served (without id and meta).
    pub resource: Value,
}

/// A stored encounter.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEncounter {
    pub id: String,
    pub institution_id: String,
    pub identifier: String,
    pub patient_record_id: String,
    /// The enterprise person the patient record is linked to now.
    pub person_id: Option<String>,
    pub status: EncounterStatus,
    pub class: EncounterClass,
    pub period_start: NaiveDateTime,
    pub period_end: Option<NaiveDateTime>,
    pub resource: Value,
    pub version: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// What [`upsert`] did.
pub use crate::store::UpsertOutcome;

/// One care relationship found by [`active_for_persons`]:
/// (enterprise person id, institution id, period start, period end), times in UTC.
pub type CareRelationship = (String, String, NaiveDateTime, Option<NaiveDateTime>);

/// Errors of the encounter store; `field` is a FHIR path inside the Encounter.
#[derive(Debug, thiserror::Error)]
pub enum EncounterError {
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{message}")]
    Conflict { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    /// [`Precondition::Version`] named another version.
    #[error(
        "version conflict: the encounter is at version {actual}, the request expected {expected}"
    )]
    VersionConflict { expected: i64, actual: i64 },
    /// [`Precondition::NoChange`]: the visit is registered with other content.
    #[error("visit {visit} is registered (Encounter/{id}) with other content")]
    ChangeRefused { id: String, visit: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for EncounterError {
    fn from(err: diesel::result::Error) -> EncounterError {
        EncounterError::Store(StoreError::from_diesel(err))
    }
}

impl From<EmpiError> for EncounterError {
    fn from(err: EmpiError) -> EncounterError {
        match err {
            EmpiError::NotFound(what) => EncounterError::NotFound(what),
            EmpiError::Store(s) => EncounterError::Store(s),
            other => EncounterError::Store(StoreError::Unavailable(other.to_string())),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> EncounterError {
    EncounterError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = enc_t)]
struct Row {
    id: String,
    institution_id: String,
    institution_encounter_id: String,
    patient_record_id: String,
    status: String,
    class_code: String,
    period_start: NaiveDateTime,
    period_end: Option<NaiveDateTime>,
    resource: String,
    version: i64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl Row {
    fn into_stored(self, person_id: Option<String>) -> Result<StoredEncounter, EncounterError> {
        let corrupt = |what: String| {
            EncounterError::Store(StoreError::Unavailable(format!(
                "corrupt encounter {}: {what}",
                self.id
            )))
        };
        let status = EncounterStatus::parse(&self.status)
            .ok_or_else(|| corrupt(format!("status {}", self.status)))?;
        let class = EncounterClass::parse(&self.class_code)
            .ok_or_else(|| corrupt(format!("class {}", self.class_code)))?;
        let resource =
            serde_json::from_str(&self.resource).map_err(|e| corrupt(format!("resource: {e}")))?;
        Ok(StoredEncounter {
            id: self.id,
            institution_id: self.institution_id,
            identifier: self.institution_encounter_id,
            patient_record_id: self.patient_record_id,
            person_id,
            status,
            class,
            period_start: self.period_start,
            period_end: self.period_end,
            resource,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// The encounter with this id or this (institution, visit number), with the person its patient
/// record is linked to now.
fn load(
    conn: &mut DbConn,
    by_id: Option<&str>,
    by_visit: Option<(&str, &str)>,
) -> Result<Option<StoredEncounter>, EncounterError> {
    let mut q = enc_t::table
        .left_join(empi_links::table.on(empi_links::record_id.eq(enc_t::patient_record_id)))
        .select((Row::as_select(), empi_links::person_id.nullable()))
        .into_boxed();
    if let Some(id) = by_id {
        q = q.filter(enc_t::id.eq(id.to_string()));
    }
    if let Some((institution, visit)) = by_visit {
        q = q
            .filter(enc_t::institution_id.eq(institution.to_string()))
            .filter(enc_t::institution_encounter_id.eq(visit.to_string()));
    }
    let row: Option<(Row, Option<String>)> = q.first(conn).optional()?;
    row.map(|(r, person)| r.into_stored(person)).transpose()
}

/// One encounter by registry id.
pub fn get(conn: &mut DbConn, id: &str) -> Result<StoredEncounter, EncounterError> {
    load(conn, Some(id), None)?.ok_or_else(|| EncounterError::NotFound(format!("Encounter/{id}")))
}

/// The encounter an institution registered under its visit number.
pub fn find(
    conn: &mut DbConn,
    institution: &str,
    visit: &str,
) -> Result<Option<StoredEncounter>, EncounterError> {
    load(conn, None, Some((institution, visit)))
}

fn validate(new: &NewEncounter) -> Result<(), EncounterError> {
    let visit = new.identifier.trim();
    if visit.is_empty() {
        return Err(invalid(
            "Encounter.identifier",
            "identifier (the institution's visit number) is required",
        ));
    }
    if visit != new.identifier {
        return Err(invalid(
            "Encounter.identifier",
            "the visit number must not start or end with white space",
        ));
    }
    if visit.chars().count() > MAX_IDENTIFIER_CHARS {
        return Err(invalid(
            "Encounter.identifier",
            format!("the visit number is longer than {MAX_IDENTIFIER_CHARS} characters"),
        ));
    }
    if let Some(end) = new.period_end
        && end < new.period_start
    {
        return Err(invalid(
            "Encounter.period.end",
            "period.end is before period.start",
        ));
    }
    if new.status == EncounterStatus::Finished && new.period_end.is_none() {
        return Err(invalid(
            "Encounter.period.end",
            "a finished encounter needs period.end (when it ended)",
        ));
    }
    Ok(())
}

/// Serialise writers of one visit (module invariants).
fn lock_visit(conn: &mut DbConn, institution: &str, visit: &str) -> Result<(), EncounterError> {
    match conn {
        DbConn::Postgresql(pg) => {
            // The two-key form: a lock space apart from the EMPI's single 64-bit keys.
            diesel::sql_query("SELECT pg_advisory_xact_lock(1701733219, hashtext($1))")
                .bind::<diesel::sql_types::Text, _>(format!("{institution}|{visit}"))
                .execute(pg)?;
        }
        DbConn::Sqlite(_) => {
            // A write that changes nothing still takes SQLite's write lock, so the lookup
            // below cannot be overtaken by another writer.
            diesel::update(enc_t::table.filter(enc_t::id.eq("")))
                .set(enc_t::version.eq(enc_t::version))
                .execute(conn)?;
        }
    }
    Ok(())
}

/// What a write requires of an already registered visit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    /// Nothing: create, or record the new state.
    None,
    /// Create, or find it unchanged; a change is refused ([`EncounterError::ChangeRefused`]).
    NoChange,
    /// The registered visit must be at this version (`If-Match`), else
    /// [`EncounterError::VersionConflict`].
    Version(i64),
}

/// Register a visit, or record its new state. Idempotent on (institution, visit number).
/// One transaction (a savepoint inside an outer one): on error nothing is stored.
pub fn upsert(
    tx: &mut Audited<'_>,
    new: &NewEncounter,
) -> Result<(UpsertOutcome, StoredEncounter), EncounterError> {
    upsert_with(tx, new, Precondition::None)
}

/// [`upsert`] with a precondition on the registered visit, checked under the visit's lock.
pub fn upsert_with(
    tx: &mut Audited<'_>,
    new: &NewEncounter,
    pre: Precondition,
) -> Result<(UpsertOutcome, StoredEncounter), EncounterError> {
    let conn = tx.conn();
    validate(new)?;
    crate::store::write_tx(conn, |conn| {
        lock_visit(conn, &new.institution_id, &new.identifier)?;
        let record = empi::find_by_identifier(conn, &new.patient_system, &new.patient_value)?
            .ok_or_else(|| {
                invalid(
                    "Encounter.subject.identifier",
                    format!(
                        "patient identifier {}|{} is not registered in the EMPI; register the Patient first",
                        new.patient_system, new.patient_value
                    ),
                )
            })?;
        if record.institution_id != new.institution_id {
            return Err(invalid(
                "Encounter.subject.identifier",
                format!(
                    "patient identifier {}|{} was registered by another institution; use your own patient identifier",
                    new.patient_system, new.patient_value
                ),
            ));
        }
        let resource = new.resource.to_string();
        let now = now_utc();
        let found = find(conn, &new.institution_id, &new.identifier)?;
        if let (Precondition::Version(expected), Some(old)) = (pre, &found)
            && old.version != expected
        {
            return Err(EncounterError::VersionConflict {
                expected,
                actual: old.version,
            });
        }
        let Some(old) = found else {
            let id = uuid::Uuid::now_v7().to_string();
            diesel::insert_into(enc_t::table)
                .values((
                    enc_t::id.eq(&id),
                    enc_t::institution_id.eq(&new.institution_id),
                    enc_t::institution_encounter_id.eq(&new.identifier),
                    enc_t::patient_record_id.eq(&record.id),
                    enc_t::status.eq(new.status.as_str()),
                    enc_t::class_code.eq(new.class.code()),
                    enc_t::period_start.eq(new.period_start),
                    enc_t::period_end.eq(new.period_end),
                    enc_t::resource.eq(&resource),
                    enc_t::version.eq(1_i64),
                    enc_t::created_at.eq(now),
                    enc_t::updated_at.eq(now),
                ))
                .execute(conn)?;
            return Ok((UpsertOutcome::Created, get(conn, &id)?));
        };
        if old.patient_record_id != record.id {
            return Err(EncounterError::Conflict {
                field: "Encounter.subject".into(),
                message: format!(
                    "visit {} is registered for another patient (Patient/{}); an encounter cannot move to another patient — mark it entered-in-error and register the visit under a new number",
                    new.identifier, old.patient_record_id
                ),
            });
        }
        if old.status == new.status
            && old.class == new.class
            && old.period_start == new.period_start
            && old.period_end == new.period_end
            && old.resource == new.resource
        {
            return Ok((UpsertOutcome::Unchanged, old));
        }
        if pre == Precondition::NoChange {
            return Err(EncounterError::ChangeRefused {
                id: old.id,
                visit: old.identifier,
            });
        }
        diesel::update(enc_t::table.find(&old.id))
            .set((
                enc_t::status.eq(new.status.as_str()),
                enc_t::class_code.eq(new.class.code()),
                enc_t::period_start.eq(new.period_start),
                enc_t::period_end.eq(new.period_end),
                enc_t::resource.eq(&resource),
                enc_t::version.eq(old.version + 1),
                enc_t::updated_at.eq(now),
            ))
            .execute(conn)?;
        Ok((UpsertOutcome::Updated, get(conn, &old.id)?))
    })
}

/// Statuses that can count as a care relationship (see the module docs).
fn counting_statuses() -> Vec<&'static str> {
    EncounterStatus::ALL
        .into_iter()
        .filter(|s| s.counts())
        .map(EncounterStatus::as_str)
        .collect()
}

/// The care relationships of these enterprise persons at `at` (UTC): every encounter of every
/// source record linked to one of them now whose status counts and whose period covers `at`
/// (module docs). Sorted by person, institution, start. Persons without any: absent.
pub fn active_for_persons(
    conn: &mut DbConn,
    persons: &[String],
    at: NaiveDateTime,
) -> Result<Vec<CareRelationship>, StoreError> {
    let statuses = counting_statuses();
    let mut out: Vec<CareRelationship> = Vec::new();
    for chunk in persons.chunks(500) {
        out.extend(
            enc_t::table
                .inner_join(
                    empi_links::table.on(empi_links::record_id.eq(enc_t::patient_record_id)),
                )
                .filter(empi_links::person_id.eq_any(chunk))
                .filter(enc_t::status.eq_any(statuses.clone()))
                .filter(enc_t::period_start.le(at))
                .filter(enc_t::period_end.is_null().or(enc_t::period_end.ge(at)))
                // Defence in depth: a finished encounter without an end never counts.
                .filter(
                    enc_t::status
                        .ne(EncounterStatus::Finished.as_str())
                        .or(enc_t::period_end.is_not_null()),
                )
                .select((
                    empi_links::person_id,
                    enc_t::institution_id,
                    enc_t::period_start,
                    enc_t::period_end,
                ))
                .load::<CareRelationship>(conn)
                .map_err(StoreError::from_diesel)?,
        );
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use chrono::{Duration, NaiveDate};
    use serde_json::json;

    use super::*;
    use crate::Backend;
    use crate::directory::{self, InstitutionSpec};
    use crate::empi::ident::{IdentifierKind, Sex};
    use crate::empi::record::{Identifier, RecordId, SourceRecord};
    use crate::empi::store::Registration;
    use crate::store::testdb::TestStore;

    fn system(n: u32) -> String {
        format!("urn:oid:2.16.156.10011.1.99.{n}")
    }

    fn institution(conn: &mut DbConn, n: u32, kind: &str) {
        let first17 = format!("91350100M{n:08}");
        let check = directory::uscc_check_character(&first17).unwrap();
        let spec = InstitutionSpec {
            id: format!("hosp-{n:03}"),
            name: format!("医院 {n}"),
            uscc: format!("{first17}{check}"),
            region_code: "350100".into(),
            level: "3A".into(),
            kind: kind.into(),
            endpoint_url: None,
            jwks: None,
            sm2_keys: vec![],
            patient_id_system: system(n),
            allowed_scopes: vec!["system/Encounter.cu".into()],
            require_sm_envelope: false,
        };
        directory::create(
            &mut Audited::unaudited(conn),
            &directory::validate(&spec).unwrap(),
        )
        .unwrap();
    }

    /// Register a patient at institution `n`; returns (record id, person id).
    fn patient(
        conn: &mut DbConn,
        n: u32,
        mrn: &str,
        name: &str,
        birth: (i32, u32, u32),
    ) -> (String, String) {
        let inst = format!("hosp-{n:03}");
        let reg = Registration {
            institution_id: inst.clone(),
            id_system: system(n),
            id_value: mrn.into(),
            record: SourceRecord {
                record_id: RecordId(0),
                institution: inst.clone(),
                name: name.into(),
                sex: Some(Sex::Female),
                birth_date: NaiveDate::from_ymd_opt(birth.0, birth.1, birth.2),
                identifiers: vec![Identifier {
                    kind: IdentifierKind::InstitutionRecord,
                    value: mrn.into(),
                }],
                address: None,
            },
            family: name.chars().take(1).collect(),
            given: name.chars().skip(1).collect(),
            resource: json!({ "resourceType": "Patient" }),
        };
        let done = empi::register(&mut Audited::unaudited(conn), &reg, "test").unwrap();
        (done.record.id, done.record.link.unwrap().person_id)
    }

    fn t(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap()
    }

    fn visit(
        n: u32,
        number: &str,
        mrn: &str,
        status: EncounterStatus,
        start: &str,
        end: Option<&str>,
    ) -> NewEncounter {
        NewEncounter {
            institution_id: format!("hosp-{n:03}"),
            identifier: number.into(),
            patient_system: system(n),
            patient_value: mrn.into(),
            status,
            class: EncounterClass::Virtual,
            period_start: t(start),
            period_end: end.map(t),
            resource: json!({ "resourceType": "Encounter", "status": status.as_str(),
                "identifier": [{ "value": number }], "start": start, "end": end }),
        }
    }

    fn field_of(e: EncounterError) -> String {
        match e {
            EncounterError::Invalid { field, .. } | EncounterError::Conflict { field, .. } => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    fn upsert_is_idempotent_and_versions_changes(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        institution(conn, 1, "internet_hospital");
        institution(conn, 2, "hospital");
        let (rec_a, _) = patient(conn, 1, "A-1", "王芳", (1990, 1, 2));
        let (rec_b, _) = patient(conn, 1, "B-1", "赵丽", (1971, 7, 9));
        patient(conn, 2, "C-1", "孙敏", (1965, 3, 4));

        let v1 = visit(
            1,
            "V1",
            "A-1",
            EncounterStatus::InProgress,
            "2026-11-01 08:00",
            None,
        );
        let (o, first) = upsert(&mut Audited::unaudited(conn), &v1).unwrap();
        assert_eq!(o, UpsertOutcome::Created);
        assert_eq!(first.version, 1);
        assert_eq!(first.patient_record_id, rec_a);
        assert!(first.person_id.is_some());
        assert_eq!(first.resource, v1.resource);
        // The same again: nothing stored.
        let (o, again) = upsert(&mut Audited::unaudited(conn), &v1).unwrap();
        assert_eq!(o, UpsertOutcome::Unchanged);
        assert_eq!(again, first);
        // Finished: a new version.
        let done = visit(
            1,
            "V1",
            "A-1",
            EncounterStatus::Finished,
            "2026-11-01 08:00",
            Some("2026-11-01 09:00"),
        );
        let (o, second) = upsert(&mut Audited::unaudited(conn), &done).unwrap();
        assert_eq!(o, UpsertOutcome::Updated);
        assert_eq!((second.version, second.id.as_str()), (2, first.id.as_str()));
        assert_eq!(second.status, EncounterStatus::Finished);
        assert_eq!(second.period_end, Some(t("2026-11-01 09:00")));
        // Preconditions: NoChange takes a repeat and refuses a change; Version(n) must be current.
        let (o, _) =
            upsert_with(&mut Audited::unaudited(conn), &done, Precondition::NoChange).unwrap();
        assert_eq!(o, UpsertOutcome::Unchanged);
        assert!(matches!(
            upsert_with(&mut Audited::unaudited(conn), &v1, Precondition::NoChange),
            Err(EncounterError::ChangeRefused { .. })
        ));
        assert!(matches!(
            upsert_with(&mut Audited::unaudited(conn), &v1, Precondition::Version(1)),
            Err(EncounterError::VersionConflict {
                expected: 1,
                actual: 2
            })
        ));
        assert_eq!(get(conn, &first.id).unwrap(), second);
        assert_eq!(find(conn, "hosp-001", "V1").unwrap(), Some(second.clone()));
        assert_eq!(find(conn, "hosp-002", "V1").unwrap(), None);
        assert!(matches!(
            get(conn, "nope"),
            Err(EncounterError::NotFound(_))
        ));

        // Refusals name the field and store nothing.
        let cases = [
            (
                visit(
                    1,
                    "V1",
                    "B-1",
                    EncounterStatus::InProgress,
                    "2026-11-01 08:00",
                    None,
                ),
                "Encounter.subject",
            ),
            (
                visit(
                    1,
                    "V2",
                    "NOBODY",
                    EncounterStatus::InProgress,
                    "2026-11-01 08:00",
                    None,
                ),
                "Encounter.subject.identifier",
            ),
            (
                NewEncounter {
                    patient_system: system(2),
                    patient_value: "C-1".into(),
                    ..visit(
                        1,
                        "V2",
                        "x",
                        EncounterStatus::InProgress,
                        "2026-11-01 08:00",
                        None,
                    )
                },
                "Encounter.subject.identifier",
            ),
            (
                visit(
                    1,
                    "V2",
                    "A-1",
                    EncounterStatus::Finished,
                    "2026-11-01 08:00",
                    None,
                ),
                "Encounter.period.end",
            ),
            (
                visit(
                    1,
                    "V2",
                    "A-1",
                    EncounterStatus::Arrived,
                    "2026-11-01 08:00",
                    Some("2026-11-01 07:59"),
                ),
                "Encounter.period.end",
            ),
            (
                visit(
                    1,
                    " ",
                    "A-1",
                    EncounterStatus::Arrived,
                    "2026-11-01 08:00",
                    None,
                ),
                "Encounter.identifier",
            ),
            (
                visit(
                    1,
                    &"9".repeat(257),
                    "A-1",
                    EncounterStatus::Arrived,
                    "2026-11-01 08:00",
                    None,
                ),
                "Encounter.identifier",
            ),
        ];
        for (bad, field) in cases {
            assert_eq!(
                field_of(upsert(&mut Audited::unaudited(conn), &bad).unwrap_err()),
                field,
                "{bad:?}"
            );
        }
        assert_eq!(get(conn, &first.id).unwrap(), second);
        assert_eq!(find(conn, "hosp-001", "V2").unwrap(), None);
        assert_ne!(rec_a, rec_b);
    }

    fn concurrent_registrations_make_one_row(backend: Backend) {
        let db = TestStore::new(backend);
        {
            let mut pooled = db.store.conn().unwrap();
            let conn = &mut *pooled;
            institution(conn, 1, "hospital");
            patient(conn, 1, "A-1", "王芳", (1990, 1, 2));
        }
        // Several rounds, four writers of the same new visit at once in each.
        for round in 0..6 {
            let number = format!("V-RACE-{round}");
            let v = visit(
                1,
                &number,
                "A-1",
                EncounterStatus::Arrived,
                "2026-11-01 08:00",
                None,
            );
            let outcomes: Vec<UpsertOutcome> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        let (store, v) = (db.store.clone(), v.clone());
                        s.spawn(move || {
                            upsert(&mut Audited::unaudited(&mut store.conn().unwrap()), &v)
                                .unwrap()
                                .0
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let created = outcomes
                .iter()
                .filter(|o| **o == UpsertOutcome::Created)
                .count();
            assert_eq!(created, 1, "{outcomes:?}");
            assert!(
                outcomes.iter().all(|o| *o != UpsertOutcome::Updated),
                "{outcomes:?}"
            );
        }
        let mut pooled = db.store.conn().unwrap();
        let rows: i64 = enc_t::table.count().get_result(&mut *pooled).unwrap();
        assert_eq!(rows, 6);
    }

    fn active_follows_status_period_and_merges(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        institution(conn, 1, "internet_hospital");
        institution(conn, 2, "hospital");
        let (_, p1) = patient(conn, 1, "A-1", "王芳", (1990, 1, 2));
        let (_, p2) = patient(conn, 2, "C-1", "孙敏", (1965, 3, 4));
        assert_ne!(p1, p2);
        let at = t("2026-11-10 12:00");
        use EncounterStatus as S;
        // Encounters of person 1 at hosp-001, one per case.
        let cases = [
            ("in-progress", S::InProgress, "2026-11-10 08:00", None, true),
            ("arrived", S::Arrived, "2026-11-10 11:00", None, true),
            (
                "onleave",
                S::OnLeave,
                "2026-11-01 08:00",
                Some("2026-11-20 08:00"),
                true,
            ),
            (
                "finished-covering",
                S::Finished,
                "2026-11-10 08:00",
                Some("2026-11-10 12:00"),
                true,
            ),
            (
                "finished-before",
                S::Finished,
                "2026-11-09 08:00",
                Some("2026-11-10 11:59"),
                false,
            ),
            ("planned", S::Planned, "2026-11-10 08:00", None, false),
            ("not-started", S::Arrived, "2026-11-10 12:01", None, false),
            ("cancelled", S::Cancelled, "2026-11-10 08:00", None, false),
            (
                "entered-in-error",
                S::EnteredInError,
                "2026-11-10 08:00",
                None,
                false,
            ),
        ];
        for (number, status, start, end, _) in cases {
            upsert(
                &mut Audited::unaudited(conn),
                &visit(1, number, "A-1", status, start, end),
            )
            .unwrap();
        }
        let mut expected: Vec<CareRelationship> = cases
            .iter()
            .filter(|c| c.4)
            .map(|c| (p1.clone(), "hosp-001".to_string(), t(c.2), c.3.map(t)))
            .collect();
        expected.sort();
        assert_eq!(
            active_for_persons(conn, std::slice::from_ref(&p1), at).unwrap(),
            expected
        );
        // Just after the covering finished encounter ended, it no longer counts.
        let later = at + Duration::microseconds(1);
        assert_eq!(
            active_for_persons(conn, std::slice::from_ref(&p1), later)
                .unwrap()
                .len(),
            expected.len() - 1
        );
        // Person 2 (hosp-002) has one current visit.
        upsert(
            &mut Audited::unaudited(conn),
            &visit(2, "H2-1", "C-1", S::InProgress, "2026-11-09 00:00", None),
        )
        .unwrap();
        let p2_rel = (
            p2.clone(),
            "hosp-002".to_string(),
            t("2026-11-09 00:00"),
            None,
        );
        assert_eq!(
            active_for_persons(conn, std::slice::from_ref(&p2), at).unwrap(),
            vec![p2_rel.clone()]
        );
        assert!(
            active_for_persons(conn, &["nobody".to_string()], at)
                .unwrap()
                .is_empty()
        );
        assert!(active_for_persons(conn, &[], at).unwrap().is_empty());

        // Merge person 2 into person 1: the survivor has the encounters of both records.
        empi::merge(&mut Audited::unaudited(conn), &p1, &p2, "steward").unwrap();
        let mut merged = expected.clone();
        merged.push((
            p1.clone(),
            "hosp-002".to_string(),
            t("2026-11-09 00:00"),
            None,
        ));
        merged.sort();
        assert_eq!(
            active_for_persons(conn, std::slice::from_ref(&p1), at).unwrap(),
            merged
        );
        assert!(
            active_for_persons(conn, std::slice::from_ref(&p2), at)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            find(conn, "hosp-002", "H2-1").unwrap().unwrap().person_id,
            Some(p1.clone())
        );
        // Unmerge: back to separate people.
        empi::unmerge(&mut Audited::unaudited(conn), &p1, &p2, "steward").unwrap();
        assert_eq!(
            active_for_persons(conn, std::slice::from_ref(&p1), at).unwrap(),
            expected
        );
        assert_eq!(
            active_for_persons(conn, &[p1.clone(), p2.clone()], at)
                .unwrap()
                .len(),
            expected.len() + 1
        );
    }

    use crate::store::testdb::on_both_backends;

    on_both_backends!(
        upsert_is_idempotent_and_versions_changes,
        concurrent_registrations_make_one_row,
        active_follows_status_period_and_merges,
    );
}
