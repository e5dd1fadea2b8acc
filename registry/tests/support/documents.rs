//! Fixtures shared by `tests/documents_register.rs` and `examples/documents_bench.rs`
//! (included with `#[path]`): directory and EMPI rows written directly, and a document.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde_json::json;
use yiqiao_registry::documents::{DocStatus, NewDocument};
use yiqiao_registry::empi::record::{RecordId, SourceRecord};
use yiqiao_registry::store::DbConn;
use yiqiao_registry::store::schema::{
    empi_links, empi_persons, empi_source_records as records, institutions,
};

/// An active hospital `id` whose patients' identifiers are in `system`.
pub fn insert_institution(
    conn: &mut DbConn,
    id: &str,
    uscc: &str,
    system: &str,
    now: NaiveDateTime,
) -> QueryResult<()> {
    diesel::insert_into(institutions::table)
        .values((
            institutions::id.eq(id),
            institutions::name.eq(format!("hospital {id}")),
            institutions::uscc.eq(uscc),
            institutions::region_code.eq("350100"),
            institutions::level.eq("3A"),
            institutions::kind.eq("hospital"),
            institutions::jwks.eq("{\"keys\":[]}"),
            institutions::sm2_keys.eq("[]"),
            institutions::patient_id_system.eq(system),
            institutions::allowed_scopes.eq(""),
            institutions::require_sm_envelope.eq(false),
            institutions::status.eq("active"),
            institutions::version.eq(1_i64),
            institutions::created_at.eq(now),
            institutions::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Person `person` with one source record `record` (number `record_no`, `system|value` at
/// `institution`), linked automatically.
pub fn insert_patient(
    conn: &mut DbConn,
    (person, record, record_no): (&str, &str, u64),
    institution: &str,
    (system, value): (&str, &str),
    now: NaiveDateTime,
) -> QueryResult<()> {
    diesel::insert_into(empi_persons::table)
        .values((
            empi_persons::id.eq(person),
            empi_persons::status.eq("active"),
            empi_persons::version.eq(1_i64),
            empi_persons::created_at.eq(now),
            empi_persons::updated_at.eq(now),
        ))
        .execute(conn)?;
    let source = SourceRecord {
        record_id: RecordId(record_no),
        institution: institution.into(),
        name: "x".into(),
        sex: None,
        birth_date: None,
        identifiers: Vec::new(),
        address: None,
    };
    diesel::insert_into(records::table)
        .values((
            records::id.eq(record),
            records::institution_id.eq(institution),
            records::id_system.eq(system),
            records::id_value.eq(value),
            records::name_search.eq("x"),
            records::family.eq("x"),
            records::given.eq("x"),
            records::record_json.eq(serde_json::to_string(&source).unwrap_or_default()),
            records::resource.eq("{}"),
            records::version.eq(1_i64),
            records::created_at.eq(now),
            records::updated_at.eq(now),
        ))
        .execute(conn)?;
    diesel::insert_into(empi_links::table)
        .values((
            empi_links::record_id.eq(record),
            empi_links::person_id.eq(person),
            empi_links::decided_by.eq("auto"),
            empi_links::actor.eq("fixture"),
            empi_links::decided_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

/// A current document `doc_id` of `custodian` about the patient `system|value`, with a
/// minimal resource.
pub fn new_document(
    custodian: &str,
    doc_id: &str,
    (system, value): (&str, &str),
    (type_code, category): (&str, &str),
    date: NaiveDateTime,
) -> NewDocument {
    NewDocument {
        custodian_id: custodian.into(),
        custodian_doc_id: doc_id.into(),
        patient_system: system.into(),
        patient_value: value.into(),
        type_code: type_code.into(),
        category_code: category.into(),
        date,
        author_id: None,
        confidentiality: "N".into(),
        sensitivity: Vec::new(),
        content_type: "application/xml".into(),
        content_size: 2048,
        sm3_hash: "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0".into(),
        location: format!("https://{custodian}.example/docs/{doc_id}"),
        status: DocStatus::Current,
        replaces: None,
        resource: json!({ "resourceType": "DocumentReference", "masterIdentifier": { "value": doc_id } }),
    }
}
