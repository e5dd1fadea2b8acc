//! FHIR `DocumentReference` registry (IHE MHD-style): registration by the custodian (single or
//! a transaction Bundle, all or nothing), read, cross-hospital search with paging, and
//! retrieval of the content through the gateway with an SM3 check (`/fhir/Binary/{id}`).
//!
//! Consent: every document a caller would see, read or retrieve passes the consent policy
//! (`state.policy`, gateway/src/policy.rs) as the custodian's data about the person the
//! document's patient record is linked to now; permitted documents leave masked by the
//! decision's obligations, and every decision is audited with its reasons.

use std::collections::HashMap;
use std::time::Instant;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{Duration as ChronoDuration, NaiveDate, NaiveDateTime};
use serde_json::{Value, json};
use yiqiao_consent::{Decision, Obligation};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::directory;
use yiqiao_registry::documents::{
    self as registry, DocStatus, DocumentError, DocumentFilter, NewDocument, RegisterOutcome,
    StoredDocument,
};
use yiqiao_registry::empi::store as empi;
use yiqiao_sm::{ENVELOPE_MEDIA_TYPE, RequestBinding};

use crate::auth::Caller;
use crate::documents::document_view;
use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::fhir;
use crate::policy::{Ask, Released, annotate_decision, data_item_of};
use crate::routes::patients::EMPI_SYSTEM;
use crate::service::authz::{
    DocumentReferenceCreate, DocumentReferenceRead, DocumentReferenceSearch, Facts, Permit,
};
use crate::state::AppState;

mod map;

use map::{map_document, parse_instant, str_at};

fn fhir_response(status: StatusCode, body: Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(fhir::FHIR_JSON)
        .json(body)
}

/// Prefix a DocumentReference field path with the Bundle entry it came from.
fn in_entry(mut e: ApiError, index: usize) -> ApiError {
    let field = e.field.take().unwrap_or_else(|| "DocumentReference".into());
    let inner = field.strip_prefix("DocumentReference").unwrap_or(&field);
    e.field = Some(format!("Bundle.entry[{index}].resource{inner}"));
    e.message = format!("entry {index}: {}", e.message);
    e
}

fn registry_error(err: DocumentError, bundle: bool) -> ApiError {
    let index = match &err {
        DocumentError::Invalid { index, .. } | DocumentError::Conflict { index, .. } => *index,
        _ => 0,
    };
    let e = ApiError::from(err);
    if bundle && e.field.is_some() {
        in_entry(e, index)
    } else {
        e
    }
}

async fn register(
    state: &web::Data<AppState>,
    caller: &Caller,
    docs: Vec<NewDocument>,
    bundle: bool,
) -> Result<Vec<(RegisterOutcome, StoredDocument)>, ApiError> {
    // The gateway fetches every location when a member reads the Binary: refuse now what the
    // outbound policy would refuse then.
    // The policy decides by scheme, credentials, host and port: a Bundle of many documents at
    // one custodian resolves its host once.
    let mut checked_origins = std::collections::HashSet::new();
    for (i, d) in docs.iter().enumerate() {
        let origin = url::Url::parse(&d.location).ok().map(|u| {
            format!(
                "{}://{}:{}@{}:{:?}",
                u.scheme(),
                u.username(),
                u.password().unwrap_or(""),
                u.host_str().unwrap_or(""),
                u.port()
            )
        });
        if origin.as_ref().is_some_and(|o| checked_origins.contains(o)) {
            continue;
        }
        let checked = state
            .outbound
            .check_registration(&d.location, "DocumentReference.content[0].attachment.url")
            .await;
        if let Err(e) = checked {
            return Err(if bundle { in_entry(e, i) } else { e });
        }
        checked_origins.extend(origin);
    }
    let event = state.auditor.by_caller(
        state
            .auditor
            .rest_event(if bundle { "transaction" } else { "create" }, "C"),
        caller,
        None,
    );
    let done = state
        .auditor
        .change(event, move |tx, event| {
            let done =
                registry::register_batch(tx, &docs).map_err(|e| registry_error(e, bundle))?;
            for (_, d) in &done {
                event
                    .entities
                    .push(EntityRef::resource(format!("DocumentReference/{}", d.id)));
            }
            event.patient_id = done.first().map(|(_, d)| d.person_id.clone());
            Ok(done)
        })
        .await?;
    if done.iter().any(|(o, _)| *o != RegisterOutcome::Unchanged) {
        state.documents.wake.notify_one();
    }
    Ok(done)
}

/// Register one DocumentReference (the caller is its custodian). Idempotent on
/// masterIdentifier; relatesTo replaces supersedes the target.
#[utoipa::path(post, path = "/fhir/DocumentReference", tag = "documents",
    request_body(content = Object, description = "FHIR DocumentReference (docs/documents.md for the required elements)"),
    responses((status = 201, description = "Registered; the stored DocumentReference"),
        (status = 200, description = "Already registered (unchanged) or withdrawn (entered-in-error)"),
        (status = 409, description = "masterIdentifier registered with other metadata, or the replaced document is not current"),
        (status = 422, description = "OperationOutcome naming the field")))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<DocumentReferenceCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    // map_document accepts only the caller as the custodian.
    permit.settle(Facts::OWN, None)?;
    let doc = map_document(&state, caller, &body)?;
    let mut done = register(&state, caller, vec![doc], false).await?;
    let (outcome, stored) = done
        .pop()
        .ok_or_else(|| ApiError::internal("registration returned nothing"))?;
    let status = if outcome == RegisterOutcome::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = fhir_response(status, document_view(&state.base_url, &stored));
    let location = format!("{}/fhir/DocumentReference/{}", state.base_url, stored.id);
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// A transaction Bundle of DocumentReference registrations: all or nothing.
#[utoipa::path(post, path = "/fhir", tag = "documents",
    request_body(content = Object, description = "Bundle type transaction; every entry POST DocumentReference"),
    responses((status = 200, description = "transaction-response Bundle"),
        (status = 422, description = "OperationOutcome naming Bundle.entry[i] and the field; nothing stored")))]
pub async fn transaction(
    state: web::Data<AppState>,
    permit: Permit<DocumentReferenceCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    // map_document accepts only the caller as the custodian.
    permit.settle(Facts::OWN, None)?;
    let bundle = body;
    let bad = |field: &str, message: String| {
        ApiError::new(ErrorCode::ValidationFailed, message).field(field.to_string())
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(bad(
            "Bundle.resourceType",
            "the body must be a Bundle".into(),
        ));
    }
    if bundle.get("type").and_then(Value::as_str) != Some("transaction") {
        return Err(bad(
            "Bundle.type",
            "only transaction Bundles are accepted".into(),
        ));
    }
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .filter(|e| !e.is_empty())
        .ok_or_else(|| bad("Bundle.entry", "the Bundle has no entries".into()))?;
    let max = state.settings.documents.max_bundle_entries;
    if entries.len() > max {
        return Err(bad(
            "Bundle.entry",
            format!("at most {max} entries per transaction"),
        ));
    }
    let mut docs = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let request = entry.get("request");
        let method = request.and_then(|r| str_at(r, "method"));
        let url = request.and_then(|r| str_at(r, "url"));
        if method != Some("POST") || url != Some("DocumentReference") {
            return Err(bad(
                &format!("Bundle.entry[{i}].request"),
                format!("entry {i}: only request POST DocumentReference is supported"),
            ));
        }
        let resource = entry.get("resource").ok_or_else(|| {
            bad(
                &format!("Bundle.entry[{i}].resource"),
                format!("entry {i}: resource is required"),
            )
        })?;
        docs.push(map_document(&state, caller, resource).map_err(|e| in_entry(e, i))?);
    }
    let done = register(&state, caller, docs, true).await?;
    let entries: Vec<Value> = done
        .iter()
        .map(|(outcome, d)| {
            let status = match outcome {
                RegisterOutcome::Created => "201 Created",
                _ => "200 OK",
            };
            json!({
                "fullUrl": format!("{}/fhir/DocumentReference/{}", state.base_url, d.id),
                "resource": document_view(&state.base_url, d),
                "response": {
                    "status": status,
                    "location": format!("DocumentReference/{}/_history/{}", d.id, d.version),
                },
            })
        })
        .collect();
    Ok(fhir_response(
        StatusCode::OK,
        json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": entries }),
    ))
}

/// Read one DocumentReference by registry id.
#[utoipa::path(get, path = "/fhir/DocumentReference/{id}", tag = "documents",
    params(("id" = String, Path)),
    responses((status = 200, description = "DocumentReference"), (status = 404, description = "OperationOutcome")))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<DocumentReferenceRead>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (caller, doc) = stored_document(&state, &permit, id.into_inner()).await?;
    let resource = crate::routes::release_read(
        &state,
        caller,
        &req,
        format!("DocumentReference/{}", doc.id),
        crate::documents::candidate(&state.base_url, &doc),
    )
    .await?;
    Ok(fhir_response(StatusCode::OK, resource))
}

pub const SEARCH_PARAMS: [&str; 10] = [
    "patient",
    "patient.identifier",
    "type",
    "category",
    "date",
    "status",
    "custodian",
    "_count",
    "_offset",
    "_sort",
];

/// A FHIR date search value: [from, before) of its precision, with the prefix applied.
fn date_bounds(raw: &str) -> Result<(Option<NaiveDateTime>, Option<NaiveDateTime>), ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "date",
            "must be [eq|ge|gt|le|lt]YYYY, YYYY-MM, YYYY-MM-DD or an instant with time zone",
        )
    };
    let (prefix, value) = match raw.get(..2) {
        Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p, &raw[2..]),
        _ => ("eq", raw),
    };
    let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok();
    let (start, end) = match value.len() {
        4 => {
            let y: i32 = value.parse().map_err(|_| bad())?;
            let s = NaiveDate::from_ymd_opt(y, 1, 1).ok_or_else(bad)?;
            let e = NaiveDate::from_ymd_opt(y + 1, 1, 1).ok_or_else(bad)?;
            (
                s.and_time(Default::default()),
                e.and_time(Default::default()),
            )
        }
        7 => {
            let s = day(&format!("{value}-01")).ok_or_else(bad)?;
            let e = s
                .checked_add_months(chrono::Months::new(1))
                .ok_or_else(bad)?;
            (
                s.and_time(Default::default()),
                e.and_time(Default::default()),
            )
        }
        10 => {
            let s = day(value).ok_or_else(bad)?;
            (
                s.and_time(Default::default()),
                (s + ChronoDuration::days(1)).and_time(Default::default()),
            )
        }
        _ => {
            let t = parse_instant(value).ok_or_else(bad)?;
            (t, t + ChronoDuration::microseconds(1))
        }
    };
    Ok(match prefix {
        "eq" => (Some(start), Some(end)),
        "ge" => (Some(start), None),
        "gt" => (Some(end), None),
        "le" => (None, Some(end)),
        _ => (None, Some(start)),
    })
}

fn tokens(raw: &str) -> Vec<&str> {
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A parsed DocumentReference search: the registry filter (all but the patient) and the
/// patient parameters still to resolve against the EMPI.
struct DocumentQuery {
    f: DocumentFilter,
    count: i64,
    offset: i64,
    patient_ref: Option<String>,
    patient_ident: Option<String>,
}

fn parse_query(state: &AppState, req: &HttpRequest) -> Result<DocumentQuery, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::new(ErrorCode::InvalidParameter, format!("query string: {e}")))?;
    let mut single: HashMap<String, String> = HashMap::new();
    for (k, v) in &pairs {
        if k != "date" && single.insert(k.clone(), v.clone()).is_some() {
            return Err(ApiError::invalid_param(k, "given more than once"));
        }
    }
    crate::routes::check_params(&single, &SEARCH_PARAMS)?;
    let (count, offset) = crate::routes::paging(&single, 20, 200)?;
    let mut f = DocumentFilter {
        limit: count + 1,
        offset,
        ..DocumentFilter::default()
    };
    for (_, v) in pairs.iter().filter(|(k, _)| k == "date") {
        let (from, before) = date_bounds(v)?;
        f.date_from.extend(from);
        f.date_before.extend(before);
    }
    f.oldest_first = match single.get("_sort").map(String::as_str) {
        None | Some("-date") => false,
        Some("date") => true,
        Some(_) => return Err(ApiError::invalid_param("_sort", "must be date or -date")),
    };
    if let Some(raw) = single.get("status") {
        let mut v = Vec::new();
        for s in tokens(raw) {
            let st = DocStatus::parse(s).ok_or_else(|| {
                ApiError::invalid_param("status", "must be current, superseded or entered-in-error")
            })?;
            v.push(st.as_str().to_string());
        }
        f.statuses = Some(v);
    }
    if let Some(raw) = single.get("custodian") {
        f.custodians = Some(
            tokens(raw)
                .into_iter()
                .map(|t| {
                    t.rsplit_once("Organization/")
                        .map_or(t, |(_, id)| id)
                        .to_string()
                })
                .collect(),
        );
    }
    let codes = &state.documents.codes;
    if let Some(raw) = single.get("type") {
        let mut v = Vec::new();
        for t in tokens(raw) {
            match t.split_once('|') {
                Some((s, c)) if !s.is_empty() => v.push(format!("{s}|{c}")),
                Some((_, c)) => v.extend(codes.types_with_code(c)),
                None => v.extend(codes.types_with_code(t)),
            }
        }
        f.type_codes = Some(v);
    }
    if let Some(raw) = single.get("category") {
        let mut v = Vec::new();
        for t in tokens(raw) {
            match t.split_once('|') {
                Some((s, c)) if s.is_empty() || s == codes.category_system() => {
                    v.push(c.to_string())
                }
                Some(_) => {}
                None => v.push(t.to_string()),
            }
        }
        f.categories = Some(v);
    }
    // Patient: resolved to the enterprise person, then to all of its source records.
    let patient_ref = single.get("patient").cloned();
    let patient_ident = single.get("patient.identifier").cloned();
    if let Some(p) = &patient_ref {
        let id = p.rsplit_once("Patient/").map_or(p.as_str(), |(_, id)| id);
        if id.is_empty() || id.contains('/') {
            return Err(ApiError::invalid_param(
                "patient",
                "must be Patient/<id> (an EMPI source record)",
            ));
        }
    }
    if let Some(i) = &patient_ident
        && !i.contains('|')
    {
        return Err(ApiError::invalid_param(
            "patient.identifier",
            "must be system|value",
        ));
    }
    Ok(DocumentQuery {
        f,
        count,
        offset,
        patient_ref,
        patient_ident,
    })
}

/// Search DocumentReferences across all custodians.
#[utoipa::path(get, path = "/fhir/DocumentReference", tag = "documents",
    params(("patient" = Option<String>, Query, description = "Patient/<source record id>: documents of the enterprise person"),
        ("patient.identifier" = Option<String>, Query, description = "system|value of a registered identifier, or the EMPI system|person id"),
        ("type" = Option<String>, Query, description = "[system|]code, comma-separated"),
        ("category" = Option<String>, Query, description = "[system|]code, comma-separated"),
        ("date" = Option<String>, Query, description = "[eq|ge|gt|le|lt]date, repeatable"),
        ("status" = Option<String>, Query, description = "current, superseded, entered-in-error (comma-separated)"),
        ("custodian" = Option<String>, Query, description = "Organization/<id>, comma-separated"),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query),
        ("_sort" = Option<String>, Query, description = "date or -date (default)")),
    responses((status = 200, description = "searchset Bundle with next link")))]
pub async fn search(
    state: web::Data<AppState>,
    permit: Permit<DocumentReferenceSearch>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let started = Instant::now();
    let DocumentQuery {
        mut f,
        count,
        offset,
        patient_ref,
        patient_ident,
    } = parse_query(&state, &req)?;
    let (filter, person) = state
        .db(move |conn| -> Result<_, ApiError> {
            let mut person: Option<String> = None;
            let mut unknown = false;
            if let Some(p) = &patient_ref {
                let id = p.rsplit_once("Patient/").map_or(p.as_str(), |(_, id)| id);
                match empi::get_record(conn, id) {
                    Ok(r) => person = r.link.map(|l| l.person_id),
                    Err(empi::EmpiError::NotFound(_)) => unknown = true,
                    Err(e) => return Err(e.into()),
                }
                unknown |= person.is_none();
            }
            if let Some(i) = &patient_ident {
                let (system, value) = i.split_once('|').unwrap_or(("", i));
                let p = if system == EMPI_SYSTEM {
                    Some(value.to_string())
                } else {
                    empi::find_by_identifier(conn, system, value)?
                        .and_then(|r| r.link.map(|l| l.person_id))
                };
                match (&person, p) {
                    (_, None) => unknown = true,
                    (Some(a), Some(b)) if *a != b => unknown = true,
                    (_, Some(b)) => person = Some(b),
                }
            }
            if unknown {
                return Ok((None, person));
            }
            if let Some(p) = &person {
                let records = empi::records_of_person(conn, p)?;
                f.patient_records = Some(records.into_iter().map(|r| r.id).collect());
            }
            Ok((Some(f), person))
        })
        .await?;
    let resolve_ms = ms_since(started);
    let ask = state.policy.ask(caller, &req);
    let page = match filter {
        Some(f) => fill_page(&state, caller, &ask, f, offset, count).await?,
        None => Page::default(),
    };
    let audit_started = Instant::now();
    let (self_url, next) =
        crate::routes::directory::page_urls_at(&state, &req, offset, count, page.next_offset);
    let mut event = state
        .auditor
        .search_event(format!("{}?{}", req.path(), req.query_string()));
    page.released.annotate(&mut event);
    // The record goes to the writer now; the Bundle is encoded while it is made durable, and
    // nothing is sent before it is.
    let pending = state
        .auditor
        .submit(state.auditor.by_caller(event, caller, person))
        .await?;
    let submit_ms = ms_since(audit_started);
    let encode_started = Instant::now();
    let body = serde_json::to_vec(&fhir::searchset(
        &state.base_url,
        &self_url,
        next,
        None,
        page.entries,
    ))
    .map_err(ApiError::internal)?;
    let encode_ms = ms_since(encode_started);
    let wait_started = Instant::now();
    pending.durable().await?;
    // `audit`: preparing and queueing the record, plus any wait for durability left after
    // encoding (the rest of the write overlapped the encoding).
    let audit_ms = submit_ms + ms_since(wait_started);
    // Server-Timing (W3C, ms): where the search's time went (BENCHMARKS.md, consent share).
    let timing = format!(
        "resolve;dur={resolve_ms:.3}, query;dur={:.3}, policy;dur={:.3}, audit;dur={audit_ms:.3}, \
         encode;dur={:.3}, handler;dur={:.3}",
        page.query_ms,
        page.policy_ms,
        encode_ms,
        ms_since(started)
    );
    Ok(HttpResponse::Ok()
        .content_type(fhir::FHIR_JSON)
        .insert_header(("Server-Timing", timing))
        .body(body))
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Most stored documents read to fill one page (the rest of a page the consent policy
/// thinned out is left to the next link).
const MAX_SCAN: i64 = 1_000;

/// One page of a document search after consent.
#[derive(Debug, Default)]
struct Page {
    entries: Vec<Value>,
    released: Released,
    /// Offset (in stored documents) of the next page, when there may be one.
    next_offset: Option<i64>,
    /// Time spent in the registry queries and in the consent policy (ms).
    query_ms: f64,
    policy_ms: f64,
}

/// Read stored documents from `offset` in filter order and release them through the consent
/// policy until `count` are visible, the results end, or [`MAX_SCAN`] were read. Paging is over
/// stored documents, so the next page starts after the last one read; a page is short only
/// when the results end or the scan limit is reached.
async fn fill_page(
    state: &AppState,
    caller: &Caller,
    ask: &Ask,
    filter: DocumentFilter,
    offset: i64,
    count: i64,
) -> Result<Page, ApiError> {
    let mut page = Page::default();
    let mut pos = offset;
    let mut read = 0usize;
    loop {
        let want = count - page.entries.len() as i64;
        let mut f = filter.clone();
        f.offset = pos;
        f.limit = want + 1;
        let t = Instant::now();
        // The consent caches are brought up to date on the same connection as the first
        // query (one trip to the blocking pool instead of two).
        let policy = (pos == offset).then(|| state.policy.clone());
        let (found, synced) = state
            .db(move |conn| -> Result<_, ApiError> {
                let synced = match &policy {
                    Some(p) => p.sync_on(conn)?,
                    None => None,
                };
                Ok((registry::search(conn, &f).map_err(ApiError::from)?, synced))
            })
            .await?;
        page.query_ms += ms_since(t);
        let t = Instant::now();
        let n = found.len();
        let candidates = found
            .iter()
            .map(|d| crate::documents::candidate(&state.base_url, d))
            .collect();
        let mut released = state
            .policy
            .release_with(caller, ask, candidates, synced)
            .await?;
        page.policy_ms += ms_since(t);
        // Take released documents in order until the page is full.
        let mut kept: HashMap<usize, Value> =
            std::mem::take(&mut released.kept).into_iter().collect();
        let mut used = 0usize;
        for i in 0..n {
            if page.entries.len() as i64 == count {
                break;
            }
            used = i + 1;
            if let Some(r) = kept.remove(&i) {
                page.entries.push(r);
            }
        }
        released.kept = kept.into_iter().filter(|(i, _)| *i < used).collect();
        released.truncate(used);
        page.released.append(released, read);
        read += used;
        pos += used as i64;
        let exhausted = (n as i64) <= want;
        if page.entries.len() as i64 == count {
            page.next_offset = (used < n || !exhausted).then_some(pos);
            return Ok(page);
        }
        if exhausted {
            return Ok(page);
        }
        if pos - offset >= MAX_SCAN {
            page.next_offset = Some(pos);
            return Ok(page);
        }
    }
}

/// The custodian did not serve `doc` (unreachable, an error status, a broken stream).
fn upstream(doc: &StoredDocument, msg: String) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::UpstreamUnavailable,
        format!(
            "the custodian {} did not serve the document",
            doc.custodian_id
        ),
    );
    e.internal = Some(msg);
    e
}

/// GET the content from the custodian, asking for an SM envelope bound to `request_id`: the
/// body (read up to what the registered size allows) and whether it came sealed.
async fn fetch_content(
    state: &AppState,
    doc: &StoredDocument,
    location: url::Url,
    request_id: &str,
) -> Result<(Vec<u8>, bool), ApiError> {
    let settings = &state.settings.documents;
    let upstream = |msg: String| upstream(doc, msg);
    let target = match location.query() {
        Some(q) => format!("{}?{q}", location.path()),
        None => location.path().to_string(),
    };
    // The gateway's SM2 request signature (docs/hospital-contract.md), with the request id
    // and requester it binds.
    let identity = state
        .federation
        .identity_headers("GET", &target, request_id, b"")
        .map_err(|e| upstream(format!("request signature: {e}")))?;
    let mut request = state.documents.http.get(location).header(
        reqwest::header::ACCEPT,
        format!("{ENVELOPE_MEDIA_TYPE}, {};q=0.5", doc.content_type),
    );
    for (name, value) in identity {
        request = request.header(name, value);
    }
    let resp = request
        .timeout(std::time::Duration::from_millis(
            settings.retrieval_timeout_ms,
        ))
        .send()
        .await
        .map_err(|e| match crate::outbound::refusal_of(&e) {
            Some(why) => crate::outbound::log_refusal(
                &doc.location,
                &why,
                "DocumentReference.content[0].attachment.url",
            ),
            None => upstream(e.to_string()),
        })?;
    if !resp.status().is_success() {
        return Err(upstream(format!("HTTP {}", resp.status())));
    }
    let sealed = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(ENVELOPE_MEDIA_TYPE));
    let content_limit = (doc.content_size as u64).min(settings.max_retrieval_bytes);
    // An envelope carries the content base64-encoded (4/3) with a bounded header.
    let limit = if sealed {
        content_limit.saturating_mul(4) / 3 + 8 * 1024
    } else {
        content_limit
    };
    let mut body: Vec<u8> = Vec::new();
    let mut stream = resp.bytes_stream();
    use futures::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| upstream(e.to_string()))?;
        body.extend_from_slice(&chunk);
        if body.len() as u64 > limit {
            break;
        }
    }
    Ok((body, sealed))
}

/// Retrieve a document's content: the gateway fetches it from the custodian's location,
/// checks size and SM3 hash against the registry, and relays it only when both match.
#[utoipa::path(get, path = "/fhir/Binary/{id}", tag = "documents",
    params(("id" = String, Path, description = "DocumentReference id")),
    responses((status = 200, description = "The content, with the registered content type; an SM envelope (application/yiqiao-sm-envelope+json) sealed to the requester's key when asked with Accept and X-Request-Id or required by its directory entry"),
        (status = 404, description = "No such document"),
        (status = 422, description = "The location is refused by the outbound policy (outbound-refused)"),
        (status = 502, description = "Custodian unreachable (upstream-unavailable, one text whatever the cause) or content does not match the registry (upstream-integrity)")))]
pub async fn retrieve(
    state: web::Data<AppState>,
    permit: Permit<DocumentReferenceRead>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (caller, doc) = stored_document(&state, &permit, id.into_inner()).await?;
    let decision = content_decision(&state, caller, &req, &doc).await?;
    let upstream = |msg: String| upstream(&doc, msg);
    let wanted = crate::envelope::requester_envelope(&req, caller)?;
    // Ask the custodian for an SM envelope bound to this request (a custodian that only
    // serves plain content may ignore it; its content is still checked against the
    // registered SM3 hash and size below).
    let request_id = uuid::Uuid::new_v4().to_string();
    let gateway_id = state.federation.settings().gateway_id.clone();
    let location = state.outbound.check_syntax(&doc.location).map_err(|why| {
        crate::outbound::log_refusal(
            &doc.location,
            &why,
            "DocumentReference.content[0].attachment.url",
        )
    })?;
    let target = match location.query() {
        Some(q) => format!("{}?{q}", location.path()),
        None => location.path().to_string(),
    };
    let binding = RequestBinding::new("GET", &target, &gateway_id, &request_id)
        .map_err(|e| upstream(format!("request binding: {e}")))?;
    let (mut body, sealed) = fetch_content(&state, &doc, location, &request_id).await?;
    let (st, who, d) = (&state, caller, &doc);
    let integrity = |why: String| async move {
        tracing::warn!(document = %d.id, custodian = %d.custodian_id, cause = %why, "retrieved content refused");
        // Reported in the audit trail as well as to the requester; nothing is relayed.
        let mut event = st.auditor.read_event(format!("Binary/{}", d.id));
        event.outcome = yiqiao_registry::audit::outcome::SERIOUS_FAILURE.into();
        event.outcome_desc = Some(format!("content from {} refused: {why}", d.custodian_id));
        let recorded = st
            .auditor
            .record(st.auditor.by_caller(event, who, Some(d.person_id.clone())))
            .await;
        if let Err(e) = recorded {
            return e;
        }
        ApiError::new(
            ErrorCode::UpstreamIntegrity,
            format!(
                "the content served by {} for DocumentReference/{} was refused: {why}",
                d.custodian_id, d.id
            ),
        )
    };
    if sealed {
        let custodian = doc.custodian_id.clone();
        let institution = state
            .db(move |conn| directory::get(conn, &custodian))
            .await?;
        let keys = state.federation.public_keys(&institution);
        match state
            .federation
            .open_answer(&body, &doc.custodian_id, &keys, binding)
        {
            Ok((payload, _)) => body = payload,
            Err(p) => {
                return Err(integrity(format!("SM envelope {}: {}", p.label(), p.detail())).await);
            }
        }
    }
    let digest = yiqiao_sm::sm3_hex(&body);
    if body.len() as i64 != doc.content_size || digest != doc.sm3_hash {
        return Err(
            integrity("it does not match the registered SM3 hash and size".to_string()).await,
        );
    }
    let mut event = state.auditor.read_event(format!("Binary/{}", doc.id));
    if let Some(decision) = &decision {
        annotate_decision(&mut event, decision);
    }
    state
        .auditor
        .record(
            state
                .auditor
                .by_caller(event, caller, Some(doc.person_id.clone())),
        )
        .await?;
    if let Some(envelope) = wanted {
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.path().to_string(), |pq| pq.as_str().to_string());
        let sealed =
            crate::envelope::seal_for(&state, caller, &target, envelope, body, &doc.content_type)
                .await?;
        return Ok(HttpResponse::Ok()
            .content_type(ENVELOPE_MEDIA_TYPE)
            .insert_header(("X-Content-SM3", doc.sm3_hash.clone()))
            .body(sealed));
    }
    Ok(HttpResponse::Ok()
        .content_type(doc.content_type.clone())
        .insert_header(("X-Content-SM3", doc.sm3_hash.clone()))
        .body(body))
}

/// The member reading, and the stored document `id` (what it sees of it is the consent
/// engine's decision).
async fn stored_document<'a>(
    state: &AppState,
    permit: &'a Permit<DocumentReferenceRead>,
    id: String,
) -> Result<(&'a Caller, StoredDocument), ApiError> {
    let caller = permit.member()?;
    let doc = state.db(move |conn| registry::get(conn, &id)).await?;
    Ok((caller, doc))
}

/// The consent decision on handing out a document's content, taken before the custodian is
/// asked for it. Content is relayed as the custodian serves it, so a decision whose
/// obligations would mask or pseudonymise anything cannot be met and refuses the content (the
/// metadata can still be read, masked). A refusal is audited here. `None` when
/// `consent.enforce` is off.
async fn content_decision(
    state: &AppState,
    caller: &Caller,
    req: &HttpRequest,
    doc: &StoredDocument,
) -> Result<Option<Decision>, ApiError> {
    if !state.policy.enforced() {
        return Ok(None);
    }
    let ask = state.policy.ask(caller, req);
    let view = document_view(&state.base_url, doc);
    let decision = state
        .policy
        .decide(
            caller,
            &ask,
            &doc.person_id,
            &doc.custodian_id,
            &data_item_of(&view),
        )
        .await?;
    let unmet = decision
        .obligations
        .iter()
        .any(|o| !matches!(o, Obligation::FlagForReview { .. }));
    let refusal = if !decision.is_permit() {
        Some(format!(
            "withheld by the access policy (rule {}): {}",
            decision.decided_by.rule.as_str(),
            decision.decided_by.text
        ))
    } else if unmet {
        Some(format!(
            "the access policy permits this document only masked or pseudonymised (rule {}), which cannot be done to its content; read the DocumentReference instead",
            decision.decided_by.rule.as_str()
        ))
    } else {
        None
    };
    if let Some(message) = refusal {
        let mut event = state.auditor.read_event(format!("Binary/{}", doc.id));
        annotate_decision(&mut event, &decision);
        event.consent_decision = Some("deny".into());
        event.outcome = yiqiao_registry::audit::outcome::MINOR_FAILURE.into();
        state
            .auditor
            .record(
                state
                    .auditor
                    .by_caller(event, caller, Some(doc.person_id.clone())),
            )
            .await?;
        return Err(ApiError::new(ErrorCode::ConsentDenied, message));
    }
    Ok(Some(decision))
}
