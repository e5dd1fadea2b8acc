//! DocumentReference metadata: registration (idempotent, replace chains), read and search.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde_json::Value;

use super::outbox::{self, NewEvent};
use super::{DocumentError, invalid};
use crate::empi::store as empi;
use crate::store::schema::{doc_contents as contents_t, doc_references as refs_t, institutions};
use crate::store::{Audited, DbConn, now_utc};

/// DocumentReference.status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DocStatus {
    Current,
    Superseded,
    EnteredInError,
}

impl DocStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DocStatus::Current => "current",
            DocStatus::Superseded => "superseded",
            DocStatus::EnteredInError => "entered-in-error",
        }
    }

    pub fn parse(raw: &str) -> Option<DocStatus> {
        match raw {
            "current" => Some(DocStatus::Current),
            "superseded" => Some(DocStatus::Superseded),
            "entered-in-error" => Some(DocStatus::EnteredInError),
            _ => None,
        }
    }
}

/// A validated registration as the API hands it over.
#[derive(Debug, Clone)]
pub struct NewDocument {
    pub custodian_id: String,
    /// masterIdentifier.value
    pub custodian_doc_id: String,
    /// The patient's identifier as the custodian knows it (an EMPI source record).
    pub patient_system: String,
    pub patient_value: String,
    /// `system|code`
    pub type_code: String,
    /// category code (in the table's category system)
    pub category_code: String,
    pub date: NaiveDateTime,
    pub author_id: Option<String>,
    pub confidentiality: String,
    pub sensitivity: Vec<String>,
    pub content_type: String,
    pub content_size: i64,
    pub sm3_hash: String,
    pub location: String,
    /// `current`, or `entered-in-error` to withdraw an already registered document.
    pub status: DocStatus,
    /// Registry id of the document this one replaces.
    pub replaces: Option<String>,
    /// The resource as received.
    pub resource: Value,
}

/// A stored document.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDocument {
    pub id: String,
    pub custodian_id: String,
    pub custodian_doc_id: String,
    pub patient_record_id: String,
    pub person_id: String,
    pub type_code: String,
    pub category_code: String,
    pub date: NaiveDateTime,
    pub author_id: Option<String>,
    pub confidentiality: String,
    pub status: DocStatus,
    pub replaces: Option<String>,
    pub version: i64,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub sensitivity: Vec<String>,
    pub content_type: String,
    pub content_size: i64,
    pub sm3_hash: String,
    pub location: String,
    pub resource: Value,
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Created,
    /// The same document was registered before: nothing stored.
    Unchanged,
    /// An existing document was marked entered-in-error.
    Withdrawn,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = refs_t)]
struct RefRow {
    id: String,
    custodian_id: String,
    custodian_doc_id: String,
    patient_record_id: String,
    person_id: String,
    type_code: String,
    category_code: String,
    doc_date: NaiveDateTime,
    author_id: Option<String>,
    confidentiality: String,
    status: String,
    replaces: Option<String>,
    version: i64,
    created_at: NaiveDateTime,
    updated_at: NaiveDateTime,
}

#[derive(Queryable, Selectable)]
#[diesel(table_name = contents_t)]
struct ContentRow {
    sensitivity: String,
    content_type: String,
    content_size: i64,
    sm3_hash: String,
    location: String,
    resource: String,
}

fn corrupt(what: impl std::fmt::Display) -> DocumentError {
    DocumentError::Store(crate::StoreError::Unavailable(format!(
        "corrupt document data: {what}"
    )))
}

fn assemble(r: RefRow, c: ContentRow) -> Result<StoredDocument, DocumentError> {
    let status = DocStatus::parse(&r.status).ok_or_else(|| corrupt(&r.status))?;
    let resource = serde_json::from_str(&c.resource).map_err(corrupt)?;
    Ok(StoredDocument {
        id: r.id,
        custodian_id: r.custodian_id,
        custodian_doc_id: r.custodian_doc_id,
        patient_record_id: r.patient_record_id,
        person_id: r.person_id,
        type_code: r.type_code,
        category_code: r.category_code,
        date: r.doc_date,
        author_id: r.author_id,
        confidentiality: r.confidentiality,
        status,
        replaces: r.replaces,
        version: r.version,
        created_at: r.created_at,
        updated_at: r.updated_at,
        sensitivity: c.sensitivity.split_whitespace().map(String::from).collect(),
        content_type: c.content_type,
        content_size: c.content_size,
        sm3_hash: c.sm3_hash,
        location: c.location,
        resource,
    })
}

fn load(conn: &mut DbConn, ids: &[String]) -> Result<Vec<StoredDocument>, DocumentError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(RefRow, ContentRow)> = refs_t::table
        .inner_join(contents_t::table)
        .filter(refs_t::id.eq_any(ids))
        .select((RefRow::as_select(), ContentRow::as_select()))
        .load(conn)?;
    let mut docs: Vec<StoredDocument> = rows
        .into_iter()
        .map(|(r, c)| assemble(r, c))
        .collect::<Result<_, _>>()?;
    // The person is the one the patient record is linked to now (it follows EMPI merges and
    // relinks); the person stored at registration is kept only for an unlinked record.
    let mut records: Vec<String> = docs.iter().map(|d| d.patient_record_id.clone()).collect();
    records.sort();
    records.dedup();
    let mut current: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for chunk in records.chunks(500) {
        let links: Vec<(String, String)> = crate::store::schema::empi_links::table
            .filter(crate::store::schema::empi_links::record_id.eq_any(chunk))
            .select((
                crate::store::schema::empi_links::record_id,
                crate::store::schema::empi_links::person_id,
            ))
            .load(conn)?;
        current.extend(links);
    }
    for d in &mut docs {
        if let Some(p) = current.get(&d.patient_record_id) {
            d.person_id = p.clone();
        }
    }
    // Keep the order of `ids`.
    docs.sort_by_key(|d| ids.iter().position(|i| i == &d.id));
    Ok(docs)
}

/// One document by registry id.
pub fn get(conn: &mut DbConn, id: &str) -> Result<StoredDocument, DocumentError> {
    load(conn, &[id.to_string()])?
        .pop()
        .ok_or_else(|| DocumentError::NotFound(format!("DocumentReference/{id}")))
}

fn find_by_custodian(
    conn: &mut DbConn,
    custodian: &str,
    doc_id: &str,
) -> Result<Option<StoredDocument>, DocumentError> {
    let id: Option<String> = refs_t::table
        .filter(refs_t::custodian_id.eq(custodian))
        .filter(refs_t::custodian_doc_id.eq(doc_id))
        .select(refs_t::id)
        .first(conn)
        .optional()?;
    match id {
        Some(id) => Ok(Some(get(conn, &id)?)),
        None => Ok(None),
    }
}

/// Register documents in one transaction (all or nothing). Each entry is created, found
/// unchanged (same custodian document id and same resource), or withdrawn (status
/// entered-in-error on an existing document). A document replacing another marks it
/// superseded. Events and deliveries for subscribers are written in the same transaction.
pub fn register_batch(
    tx: &mut Audited<'_>,
    docs: &[NewDocument],
) -> Result<Vec<(RegisterOutcome, StoredDocument)>, DocumentError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        outbox::take_write_lock(conn)?;
        let mut results = Vec::with_capacity(docs.len());
        let mut events = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            let (outcome, stored, event) = register_one(conn, i, doc)?;
            events.extend(event);
            results.push((outcome, stored));
        }
        outbox::emit(conn, &events)?;
        Ok(results)
    })
}

/// A registration of a document the custodian registered before: withdrawn
/// (`entered-in-error`), unchanged, or refused when its metadata differ.
fn register_existing(
    conn: &mut DbConn,
    i: usize,
    doc: &NewDocument,
    existing: StoredDocument,
) -> Result<(RegisterOutcome, StoredDocument, Option<NewEvent>), DocumentError> {
    if doc.status == DocStatus::EnteredInError {
        if existing.status == DocStatus::EnteredInError {
            return Ok((RegisterOutcome::Unchanged, existing, None));
        }
        let now = now_utc();
        diesel::update(refs_t::table.find(&existing.id))
            .set((
                refs_t::status.eq(DocStatus::EnteredInError.as_str()),
                refs_t::version.eq(refs_t::version + 1),
                refs_t::updated_at.eq(now),
            ))
            .execute(conn)?;
        let stored = get(conn, &existing.id)?;
        let event = NewEvent::document("document-withdrawn", &stored);
        return Ok((RegisterOutcome::Withdrawn, stored, Some(event)));
    }
    if existing.resource == doc.resource {
        return Ok((RegisterOutcome::Unchanged, existing, None));
    }
    Err(DocumentError::Conflict {
        index: i,
        field: "DocumentReference.masterIdentifier".into(),
        message: format!(
            "document {} of {} is already registered (DocumentReference/{}) with other metadata; register a new document that replaces it (relatesTo code replaces)",
            doc.custodian_doc_id, doc.custodian_id, existing.id
        ),
    })
}

/// Mark `old_id`, the document `doc` replaces, superseded: only its custodian may replace
/// it, only while it is current, and only by a document about the same patient (`person`).
fn supersede(
    conn: &mut DbConn,
    i: usize,
    doc: &NewDocument,
    old_id: &str,
    person: &str,
    now: NaiveDateTime,
) -> Result<(), DocumentError> {
    let old = get(conn, old_id).map_err(|e| match e {
        DocumentError::NotFound(_) => invalid(
            i,
            "DocumentReference.relatesTo.target",
            format!("DocumentReference/{old_id} does not exist"),
        ),
        other => other,
    })?;
    if old.custodian_id != doc.custodian_id {
        return Err(invalid(
            i,
            "DocumentReference.relatesTo.target",
            "only the custodian of a document can replace it",
        ));
    }
    if old.status != DocStatus::Current {
        return Err(DocumentError::Conflict {
            index: i,
            field: "DocumentReference.relatesTo.target".into(),
            message: format!(
                "DocumentReference/{old_id} is {} and cannot be replaced",
                old.status.as_str()
            ),
        });
    }
    if old.person_id != person {
        let same: i64 = crate::store::schema::empi_links::table
            .filter(crate::store::schema::empi_links::record_id.eq(&old.patient_record_id))
            .filter(crate::store::schema::empi_links::person_id.eq(person))
            .count()
            .get_result(conn)?;
        if same == 0 {
            return Err(invalid(
                i,
                "DocumentReference.subject",
                "a replacement must be about the same patient as the document it replaces",
            ));
        }
    }
    diesel::update(refs_t::table.find(old_id))
        .set((
            refs_t::status.eq(DocStatus::Superseded.as_str()),
            refs_t::version.eq(refs_t::version + 1),
            refs_t::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

fn register_one(
    conn: &mut DbConn,
    i: usize,
    doc: &NewDocument,
) -> Result<(RegisterOutcome, StoredDocument, Option<NewEvent>), DocumentError> {
    if let Some(existing) = find_by_custodian(conn, &doc.custodian_id, &doc.custodian_doc_id)? {
        return register_existing(conn, i, doc, existing);
    }
    if doc.status != DocStatus::Current {
        return Err(invalid(
            i,
            "DocumentReference.status",
            "a new document must have status current",
        ));
    }
    let record = empi::find_by_identifier(conn, &doc.patient_system, &doc.patient_value)?
        .ok_or_else(|| {
            invalid(
                i,
                "DocumentReference.subject.identifier",
                format!(
                    "patient identifier {}|{} is not registered in the EMPI; register the Patient first",
                    doc.patient_system, doc.patient_value
                ),
            )
        })?;
    let person = record
        .link
        .as_ref()
        .map(|l| l.person_id.clone())
        .ok_or_else(|| {
            invalid(
                i,
                "DocumentReference.subject.identifier",
                "the patient identifier is not linked to an enterprise person",
            )
        })?;
    if let Some(author) = &doc.author_id {
        let known: i64 = institutions::table
            .filter(institutions::id.eq(author))
            .count()
            .get_result(conn)?;
        if known == 0 {
            return Err(invalid(
                i,
                "DocumentReference.author",
                format!("author institution {author} is not in the directory"),
            ));
        }
    }
    let now = now_utc();
    let mut kind = "document-new";
    if let Some(old_id) = &doc.replaces {
        supersede(conn, i, doc, old_id, &person, now)?;
        kind = "document-replaced";
    }
    let id = uuid::Uuid::now_v7().to_string();
    diesel::insert_into(refs_t::table)
        .values((
            refs_t::id.eq(&id),
            refs_t::custodian_id.eq(&doc.custodian_id),
            refs_t::custodian_doc_id.eq(&doc.custodian_doc_id),
            refs_t::patient_record_id.eq(&record.id),
            refs_t::person_id.eq(&person),
            refs_t::type_code.eq(&doc.type_code),
            refs_t::category_code.eq(&doc.category_code),
            refs_t::doc_date.eq(doc.date),
            refs_t::author_id.eq(&doc.author_id),
            refs_t::confidentiality.eq(&doc.confidentiality),
            refs_t::status.eq(DocStatus::Current.as_str()),
            refs_t::replaces.eq(&doc.replaces),
            refs_t::version.eq(1_i64),
            refs_t::created_at.eq(now),
            refs_t::updated_at.eq(now),
        ))
        .execute(conn)
        .map_err(|e| match crate::StoreError::from_diesel(e) {
            crate::StoreError::Conflict(_) => DocumentError::Conflict {
                index: i,
                field: "DocumentReference.masterIdentifier".into(),
                message: "the same document is being registered concurrently; retry".into(),
            },
            other => DocumentError::Store(other),
        })?;
    let sensitivity = doc.sensitivity.join(" ");
    let resource = doc.resource.to_string();
    diesel::insert_into(contents_t::table)
        .values((
            contents_t::document_id.eq(&id),
            contents_t::sensitivity.eq(&sensitivity),
            contents_t::content_type.eq(&doc.content_type),
            contents_t::content_size.eq(doc.content_size),
            contents_t::sm3_hash.eq(&doc.sm3_hash),
            contents_t::location.eq(&doc.location),
            contents_t::resource.eq(&resource),
        ))
        .execute(conn)?;
    // Build the stored document from what was just inserted rather than reading it back
    // (one round trip fewer per document); read it back when the values might not survive
    // storage unchanged (storage keeps microseconds, not a date's sub-microsecond digits).
    let built = inserted_document(
        &id,
        doc,
        (&record.id, &person),
        now,
        &sensitivity,
        &resource,
    );
    let stored = match built {
        Some(stored) => stored,
        None => get(conn, &id)?,
    };
    let event = NewEvent::document(kind, &stored);
    Ok((RegisterOutcome::Created, stored, Some(event)))
}

/// The document a registration just inserted, exactly as [`get`] would read it back: the
/// same values, the sensitivity split and the resource parsed from the stored text as
/// `assemble` does. `None` when that cannot be guaranteed (the date has sub-microsecond
/// digits, which storage does not keep; the resource text does not parse). A test
/// (`registry/tests/documents_register.rs`) checks the result against `get` on both backends.
fn inserted_document(
    id: &str,
    doc: &NewDocument,
    (patient_record_id, person_id): (&str, &str),
    now: NaiveDateTime,
    sensitivity: &str,
    resource: &str,
) -> Option<StoredDocument> {
    use chrono::Timelike;
    if !doc.date.nanosecond().is_multiple_of(1000) || !now.nanosecond().is_multiple_of(1000) {
        return None;
    }
    Some(StoredDocument {
        id: id.to_string(),
        custodian_id: doc.custodian_id.clone(),
        custodian_doc_id: doc.custodian_doc_id.clone(),
        patient_record_id: patient_record_id.to_string(),
        person_id: person_id.to_string(),
        type_code: doc.type_code.clone(),
        category_code: doc.category_code.clone(),
        date: doc.date,
        author_id: doc.author_id.clone(),
        confidentiality: doc.confidentiality.clone(),
        status: DocStatus::Current,
        replaces: doc.replaces.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
        sensitivity: sensitivity.split_whitespace().map(String::from).collect(),
        content_type: doc.content_type.clone(),
        content_size: doc.content_size,
        sm3_hash: doc.sm3_hash.clone(),
        location: doc.location.clone(),
        resource: serde_json::from_str(resource).ok()?,
    })
}

/// Search criteria; every set field narrows the result (values within one field are OR).
#[derive(Debug, Clone, Default)]
pub struct DocumentFilter {
    /// EMPI source record ids of the patient (all records of the enterprise person).
    pub patient_records: Option<Vec<String>>,
    /// `system|code`
    pub type_codes: Option<Vec<String>>,
    pub categories: Option<Vec<String>>,
    /// doc_date >= each
    pub date_from: Vec<NaiveDateTime>,
    /// doc_date < each
    pub date_before: Vec<NaiveDateTime>,
    pub statuses: Option<Vec<String>>,
    pub custodians: Option<Vec<String>>,
    /// Newest first (default) or oldest first.
    pub oldest_first: bool,
    pub limit: i64,
    pub offset: i64,
}

/// Documents matching a filter, by date (then id), across all custodians.
pub fn search(conn: &mut DbConn, f: &DocumentFilter) -> Result<Vec<StoredDocument>, DocumentError> {
    let mut q = refs_t::table.select(refs_t::id).into_boxed();
    if let Some(v) = &f.patient_records {
        q = q.filter(refs_t::patient_record_id.eq_any(v.clone()));
    }
    if let Some(v) = &f.type_codes {
        q = q.filter(refs_t::type_code.eq_any(v.clone()));
    }
    if let Some(v) = &f.categories {
        q = q.filter(refs_t::category_code.eq_any(v.clone()));
    }
    for d in &f.date_from {
        q = q.filter(refs_t::doc_date.ge(*d));
    }
    for d in &f.date_before {
        q = q.filter(refs_t::doc_date.lt(*d));
    }
    if let Some(v) = &f.statuses {
        q = q.filter(refs_t::status.eq_any(v.clone()));
    }
    if let Some(v) = &f.custodians {
        q = q.filter(refs_t::custodian_id.eq_any(v.clone()));
    }
    q = if f.oldest_first {
        q.order((refs_t::doc_date.asc(), refs_t::id.asc()))
    } else {
        q.order((refs_t::doc_date.desc(), refs_t::id.desc()))
    };
    let limit = if f.limit <= 0 { 100 } else { f.limit.min(1001) };
    let ids: Vec<String> = q.limit(limit).offset(f.offset.max(0)).load(conn)?;
    load(conn, &ids)
}
