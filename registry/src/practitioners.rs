//! The staff roster (practitioner directory): member institutions register the people who use
//! their systems as FHIR `Practitioner`s, so the gateway can tell who an end user named in
//! `X-Yiqiao-User` is — today for one anomaly rule (`same-surname-address`,
//! [`crate::audit::alerts`]): an access to a patient who shares the user's surname and
//! address (a relative, a neighbour, or the user themself).
//!
//! Invariants:
//! - `(institution_id, identifier_value)` is unique: the identifier is the staff number in the
//!   institution's practitioner namespace ([`identifier_system`]); registering it again with
//!   the same content stores nothing ([`UpsertOutcome::Unchanged`]), a change makes the next
//!   version.
//! - `surname_key` and `address_key` are [`surname_key`] / [`comparable`] of what was sent,
//!   computed on every write, so the anomaly scan compares stored keys without re-parsing.
//! - Writes of one practitioner are serialised (PostgreSQL: a transaction-scoped advisory lock;
//!   SQLite: the transaction holds the write lock), so concurrent registrations make one row.
//!
//! Normalisation for comparison ([`comparable`], docs/audit.md "same-surname-address"):
//! Unicode NFKC (full-width letters, digits and spaces become half-width, compatibility forms
//! are folded), lower case, then every character that is not a letter or digit (white space,
//! punctuation of both widths, symbols such as `#` or `-`) is removed. A surname goes through
//! the EMPI name normalisation first ([`crate::empi::normalize::normalise_name`]: Han
//! characters kept as they are, Latin tokens case- and diacritic-folded and sorted), so a
//! practitioner's family name and a patient's `empi_source_records.family` compare alike.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use crate::empi::normalize::normalise_name;
use crate::store::schema::practitioners as pr_t;
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// The identifier system of an institution's staff numbers:
/// `https://yiqiao.health/fhir/sid/practitioner/<institution id>`.
pub const PRACTITIONER_SYSTEM_PREFIX: &str = "https://yiqiao.health/fhir/sid/practitioner/";

/// Longest staff identifier accepted (characters), in the roster and in `X-Yiqiao-User`.
pub const MAX_IDENTIFIER_CHARS: usize = 128;

/// The practitioner identifier system of `institution`.
pub fn identifier_system(institution: &str) -> String {
    format!("{PRACTITIONER_SYSTEM_PREFIX}{institution}")
}

/// Text for comparison: NFKC, lower case, letters and digits only (module docs).
pub fn comparable(raw: &str) -> String {
    raw.nfkc()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .collect()
}

/// A family name for comparison: the EMPI name normalisation, then [`comparable`].
pub fn surname_key(family: &str) -> String {
    comparable(&normalise_name(family).full)
}

/// Why a staff identifier (roster entry or `X-Yiqiao-User` value) is refused, if it is.
pub fn identifier_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("must not be empty".into());
    }
    if value.chars().count() > MAX_IDENTIFIER_CHARS {
        return Some(format!("must be at most {MAX_IDENTIFIER_CHARS} characters"));
    }
    if value.chars().any(char::is_control) {
        return Some("must not contain control characters".into());
    }
    if value.trim() != value {
        return Some("must not start or end with white space".into());
    }
    None
}

/// A registration (or its new content) as the FHIR entry point maps it.
#[derive(Debug, Clone)]
pub struct NewPractitioner {
    pub institution_id: String,
    /// The staff number (identifier value in [`identifier_system`]).
    pub identifier: String,
    /// `HumanName.family` as sent (trimmed), or the surname split from a Han `text`.
    pub family: String,
    pub given: String,
    /// The address that counts (home, else the first), as one line; `None` when absent.
    pub address: Option<String>,
    /// The Practitioner as it is to be served (without id and meta).
    pub resource: Value,
}

/// A stored roster entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPractitioner {
    pub id: String,
    pub institution_id: String,
    pub identifier: String,
    pub family: String,
    pub given: String,
    pub surname_key: String,
    pub address_key: Option<String>,
    pub resource: Value,
    pub version: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

/// What [`upsert`] did.
pub use crate::store::UpsertOutcome;

/// What a write may do (the caller's scopes: `c` creates, `u` changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub create: bool,
    pub change: bool,
}

/// Errors of the roster; `field` is a FHIR path inside the Practitioner.
#[derive(Debug, thiserror::Error)]
pub enum PractitionerError {
    #[error("{message}")]
    Invalid { field: String, message: String },
    #[error("{0} not found")]
    NotFound(String),
    /// Not registered, and the caller may not create.
    #[error("practitioner {identifier} is not registered")]
    CreateRefused { identifier: String },
    /// Registered with other content, and the caller may not change it.
    #[error("practitioner {identifier} is registered (Practitioner/{id}) with other content")]
    ChangeRefused { id: String, identifier: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for PractitionerError {
    fn from(err: diesel::result::Error) -> PractitionerError {
        PractitionerError::Store(StoreError::from_diesel(err))
    }
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = pr_t)]
struct Row {
    id: String,
    institution_id: String,
    identifier_value: String,
    family: String,
    given: String,
    surname_key: String,
    address_key: Option<String>,
    resource: String,
    version: i64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

impl Row {
    fn into_stored(self) -> Result<StoredPractitioner, PractitionerError> {
        let resource = serde_json::from_str(&self.resource).map_err(|e| {
            PractitionerError::Store(StoreError::Unavailable(format!(
                "corrupt practitioner {}: {e}",
                self.id
            )))
        })?;
        Ok(StoredPractitioner {
            id: self.id,
            institution_id: self.institution_id,
            identifier: self.identifier_value,
            family: self.family,
            given: self.given,
            surname_key: self.surname_key,
            address_key: self.address_key,
            resource,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// One roster entry by registry id.
pub fn get(conn: &mut DbConn, id: &str) -> Result<StoredPractitioner, PractitionerError> {
    pr_t::table
        .find(id)
        .select(Row::as_select())
        .first(conn)
        .optional()?
        .ok_or_else(|| PractitionerError::NotFound(format!("Practitioner/{id}")))?
        .into_stored()
}

/// The roster entry of an institution's staff number.
pub fn find(
    conn: &mut DbConn,
    institution: &str,
    identifier: &str,
) -> Result<Option<StoredPractitioner>, PractitionerError> {
    pr_t::table
        .filter(pr_t::institution_id.eq(institution))
        .filter(pr_t::identifier_value.eq(identifier))
        .select(Row::as_select())
        .first(conn)
        .optional()?
        .map(Row::into_stored)
        .transpose()
}

/// An institution's roster, by staff number (paging: `limit`, `offset`).
pub fn list(
    conn: &mut DbConn,
    institution: &str,
    limit: i64,
    offset: i64,
) -> Result<Vec<StoredPractitioner>, PractitionerError> {
    pr_t::table
        .filter(pr_t::institution_id.eq(institution))
        .order(pr_t::identifier_value.asc())
        .limit(limit)
        .offset(offset)
        .select(Row::as_select())
        .load(conn)?
        .into_iter()
        .map(Row::into_stored)
        .collect()
}

fn validate(new: &NewPractitioner) -> Result<(String, Option<String>), PractitionerError> {
    if let Some(problem) = identifier_problem(&new.identifier) {
        return Err(PractitionerError::Invalid {
            field: "Practitioner.identifier".into(),
            message: format!("the staff identifier {problem}"),
        });
    }
    let surname = surname_key(&new.family);
    if surname.is_empty() {
        return Err(PractitionerError::Invalid {
            field: "Practitioner.name".into(),
            message:
                "a name with a family name (name.family, or a Han name in name.text) is required"
                    .into(),
        });
    }
    let address = new
        .address
        .as_deref()
        .map(comparable)
        .filter(|a| !a.is_empty());
    Ok((surname, address))
}

/// Serialise writers of one entry. PostgreSQL: a transaction-scoped advisory lock (two-key
/// form, a class of its own). SQLite: nothing more is needed — [`upsert`] runs in
/// [`crate::store::write_tx`] (`BEGIN IMMEDIATE`), or nested in a transaction that already holds
/// the write lock (`Auditor::change` takes it first).
fn lock_entry(conn: &mut DbConn, institution: &str, identifier: &str) -> QueryResult<()> {
    if let DbConn::Postgresql(pg) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock(1886545252, hashtext($1))")
            .bind::<diesel::sql_types::Text, _>(format!("{institution}|{identifier}"))
            .execute(pg)?;
    }
    Ok(())
}

/// Register a practitioner or record its new content; idempotent on (institution, staff
/// number). One transaction (a savepoint inside an outer one): on error nothing is stored.
pub fn upsert(
    tx: &mut Audited<'_>,
    new: &NewPractitioner,
    allowed: Allowed,
) -> Result<(UpsertOutcome, StoredPractitioner), PractitionerError> {
    let conn = tx.conn();
    let (surname, address) = validate(new)?;
    crate::store::write_tx(conn, |conn| {
        lock_entry(conn, &new.institution_id, &new.identifier)?;
        let resource = new.resource.to_string();
        let now = now_utc();
        let Some(old) = find(conn, &new.institution_id, &new.identifier)? else {
            if !allowed.create {
                return Err(PractitionerError::CreateRefused {
                    identifier: new.identifier.clone(),
                });
            }
            let id = uuid::Uuid::now_v7().to_string();
            diesel::insert_into(pr_t::table)
                .values((
                    pr_t::id.eq(&id),
                    pr_t::institution_id.eq(&new.institution_id),
                    pr_t::identifier_value.eq(&new.identifier),
                    pr_t::family.eq(&new.family),
                    pr_t::given.eq(&new.given),
                    pr_t::surname_key.eq(&surname),
                    pr_t::address_key.eq(address.as_deref()),
                    pr_t::resource.eq(&resource),
                    pr_t::version.eq(1_i64),
                    pr_t::created_at.eq(now),
                    pr_t::updated_at.eq(now),
                ))
                .execute(conn)?;
            return Ok((UpsertOutcome::Created, get(conn, &id)?));
        };
        if old.resource == new.resource && old.family == new.family && old.given == new.given {
            return Ok((UpsertOutcome::Unchanged, old));
        }
        if !allowed.change {
            return Err(PractitionerError::ChangeRefused {
                id: old.id,
                identifier: old.identifier,
            });
        }
        diesel::update(pr_t::table.find(&old.id))
            .set((
                pr_t::family.eq(&new.family),
                pr_t::given.eq(&new.given),
                pr_t::surname_key.eq(&surname),
                pr_t::address_key.eq(address.as_deref()),
                pr_t::resource.eq(&resource),
                pr_t::version.eq(old.version + 1),
                pr_t::updated_at.eq(now),
            ))
            .execute(conn)?;
        Ok((UpsertOutcome::Updated, get(conn, &old.id)?))
    })
}

/// The comparison keys of a roster entry: (institution, staff number) → (surname, address).
pub type RosterKeys = std::collections::BTreeMap<(String, String), (String, Option<String>)>;

/// The keys of these (institution, staff number) pairs that are on the roster, in a few
/// queries (institutions × identifiers, filtered to the exact pairs; chunks of 500).
pub fn keys_of(conn: &mut DbConn, agents: &[(String, String)]) -> Result<RosterKeys, StoreError> {
    let mut out = RosterKeys::new();
    let wanted: std::collections::BTreeSet<&(String, String)> = agents.iter().collect();
    for chunk in agents.chunks(500) {
        let institutions: Vec<&str> = chunk.iter().map(|(i, _)| i.as_str()).collect();
        let identifiers: Vec<&str> = chunk.iter().map(|(_, u)| u.as_str()).collect();
        let rows: Vec<(String, String, String, Option<String>)> = pr_t::table
            .filter(pr_t::institution_id.eq_any(institutions))
            .filter(pr_t::identifier_value.eq_any(identifiers))
            .select((
                pr_t::institution_id,
                pr_t::identifier_value,
                pr_t::surname_key,
                pr_t::address_key,
            ))
            .load(conn)
            .map_err(StoreError::from_diesel)?;
        for (institution, identifier, surname, address) in rows {
            let key = (institution, identifier);
            if wanted.contains(&key) {
                out.insert(key, (surname, address));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use serde_json::json;

    use super::*;
    use crate::Backend;
    use crate::directory::{self, InstitutionSpec};
    use crate::store::testdb::TestStore;

    #[test]
    fn comparable_folds_width_case_space_and_punctuation() {
        assert_eq!(
            comparable("福建省福州市鼓楼区 五四路　８８号－３０１室"),
            "福建省福州市鼓楼区五四路88号301室"
        );
        assert_eq!(
            comparable("福建省福州市鼓楼区五四路88号301室"),
            comparable("福建省，福州市 鼓楼区·五四路 ８８ 号 (301室)")
        );
        assert_eq!(comparable("Ｎｏ. 12, Main St."), "no12mainst");
        assert_eq!(comparable(" \t-—,。 "), "");
        assert_ne!(comparable("五四路88号"), comparable("五四路89号"));
    }

    #[test]
    fn surnames_compare_like_the_empi() {
        assert_eq!(surname_key("王"), "王");
        assert_eq!(surname_key(" 欧阳 "), "欧阳");
        assert_eq!(surname_key("ＷＡＮＧ"), "wang");
        assert_eq!(surname_key("van der Berg"), surname_key("Van  Der BERG"));
        assert_eq!(surname_key("Zhāng"), "zhang");
        assert_eq!(surname_key("  "), "");
        assert_ne!(surname_key("王"), surname_key("汪"));
    }

    #[test]
    fn identifiers_are_checked() {
        assert_eq!(identifier_problem("D-0042"), None);
        assert_eq!(identifier_problem("医生042"), None);
        assert!(identifier_problem("").is_some());
        assert!(identifier_problem(" D1").is_some());
        assert!(identifier_problem("D\n1").is_some());
        assert!(identifier_problem("D\u{7f}1").is_some());
        assert!(identifier_problem(&"x".repeat(MAX_IDENTIFIER_CHARS + 1)).is_some());
        assert!(identifier_problem(&"x".repeat(MAX_IDENTIFIER_CHARS)).is_none());
    }

    pub(crate) fn institution(conn: &mut DbConn, n: u32) {
        let first17 = format!("91350100M{n:08}");
        let check = directory::uscc_check_character(&first17).unwrap();
        let spec = InstitutionSpec {
            id: format!("hosp-{n:03}"),
            name: format!("医院 {n}"),
            uscc: format!("{first17}{check}"),
            region_code: "350100".into(),
            level: "3A".into(),
            kind: "hospital".into(),
            endpoint_url: None,
            jwks: None,
            sm2_keys: vec![],
            patient_id_system: format!("urn:oid:2.16.156.10011.1.99.{n}"),
            allowed_scopes: vec!["system/Practitioner.cru".into()],
            require_sm_envelope: false,
        };
        directory::create(
            &mut Audited::unaudited(conn),
            &directory::validate(&spec).unwrap(),
        )
        .unwrap();
    }

    pub(crate) fn staff(n: u32, id: &str, family: &str, address: Option<&str>) -> NewPractitioner {
        NewPractitioner {
            institution_id: format!("hosp-{n:03}"),
            identifier: id.into(),
            family: family.into(),
            given: "医生".into(),
            address: address.map(String::from),
            resource: json!({ "resourceType": "Practitioner", "identifier": [{ "value": id }],
                "name": [{ "family": family }], "address": address }),
        }
    }

    const ALL: Allowed = Allowed {
        create: true,
        change: true,
    };

    fn upsert_is_idempotent_and_respects_scopes(backend: Backend) {
        let db = TestStore::new(backend);
        let mut conn = db.store.conn().unwrap();
        institution(&mut conn, 1);
        institution(&mut conn, 2);
        let a = staff(1, "D001", "王", Some("福州市鼓楼区五四路88号"));
        let (outcome, first) = upsert(&mut Audited::unaudited(&mut conn), &a, ALL).unwrap();
        assert_eq!(outcome, UpsertOutcome::Created);
        assert_eq!(first.surname_key, "王");
        assert_eq!(first.address_key.as_deref(), Some("福州市鼓楼区五四路88号"));
        let (outcome, again) = upsert(&mut Audited::unaudited(&mut conn), &a, ALL).unwrap();
        assert_eq!((outcome, again.version), (UpsertOutcome::Unchanged, 1));
        // The same staff number at another institution is another person.
        let (outcome, other) = upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(2, "D001", "李", None),
            ALL,
        )
        .unwrap();
        assert_eq!(outcome, UpsertOutcome::Created);
        assert_ne!(other.id, first.id);
        // A change needs `change`; a new entry needs `create`.
        let moved = staff(1, "D001", "王", Some("福州市台江区八一七中路1号"));
        let only = |create, change| Allowed { create, change };
        let refused = upsert(
            &mut Audited::unaudited(&mut conn),
            &moved,
            only(true, false),
        );
        assert!(matches!(
            refused,
            Err(PractitionerError::ChangeRefused { .. })
        ));
        let refused = upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(1, "D002", "张", None),
            only(false, true),
        );
        assert!(matches!(
            refused,
            Err(PractitionerError::CreateRefused { .. })
        ));
        assert!(find(&mut conn, "hosp-001", "D002").unwrap().is_none());
        let (outcome, updated) = upsert(&mut Audited::unaudited(&mut conn), &moved, ALL).unwrap();
        assert_eq!((outcome, updated.version), (UpsertOutcome::Updated, 2));
        assert_eq!(
            updated.address_key.as_deref(),
            Some("福州市台江区八一七中路1号")
        );
        // Invalid entries name the field and store nothing.
        let err = upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(1, " D3", "张", None),
            ALL,
        )
        .unwrap_err();
        assert!(
            matches!(err, PractitionerError::Invalid { ref field, .. } if field == "Practitioner.identifier")
        );
        let err = upsert(
            &mut Audited::unaudited(&mut conn),
            &staff(1, "D3", " ", None),
            ALL,
        )
        .unwrap_err();
        assert!(
            matches!(err, PractitionerError::Invalid { ref field, .. } if field == "Practitioner.name")
        );
        // Keys of exact pairs only (hosp-002/D001 is 李, hosp-001/D404 is not registered).
        let keys = keys_of(
            &mut conn,
            &[
                ("hosp-001".into(), "D001".into()),
                ("hosp-002".into(), "D001".into()),
                ("hosp-001".into(), "D404".into()),
            ],
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[&("hosp-002".to_string(), "D001".to_string())].0, "李");
        assert_eq!(get(&mut conn, &first.id).unwrap().version, 2);
        let roster = list(&mut conn, "hosp-001", 10, 0).unwrap();
        assert_eq!(roster.len(), 1);
        assert_eq!(roster[0].identifier, "D001");
    }

    fn concurrent_registrations_make_one_row(backend: Backend) {
        let db = TestStore::new(backend);
        institution(&mut db.store.conn().unwrap(), 1);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let store = db.store.clone();
                std::thread::spawn(move || {
                    let mut conn = store.conn().unwrap();
                    upsert(
                        &mut Audited::unaudited(&mut conn),
                        &staff(1, "D009", "陈", None),
                        ALL,
                    )
                    .unwrap()
                })
            })
            .collect();
        let ids: std::collections::BTreeSet<String> = handles
            .into_iter()
            .map(|h| h.join().unwrap().1.id)
            .collect();
        assert_eq!(ids.len(), 1);
    }

    use crate::store::testdb::on_both_backends;

    on_both_backends!(
        upsert_is_idempotent_and_respects_scopes,
        concurrent_registrations_make_one_row,
    );
}
