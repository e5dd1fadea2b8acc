//! The auditors' workspace API (docs/audit.md "Auditors' API"):
//!
//! - `GET /fhir/AuditEvent` and `GET /fhir/AuditEvent/{id}` — for the **auditor** role: the
//!   stored BALP AuditEvents as hashed, newest first, paged by a chain-position cursor.
//! - `GET /fhir/AuditEvent?patient=…` with an institution's access token holding
//!   `system/AuditEvent.s` — **"who accessed my records"** for patient-facing platforms: only
//!   events about that patient, only for a patient the institution itself registered, and each
//!   event trimmed to the accessing institution, purpose of use, time, action and outcome.
//! - `/audit/alerts` (list, acknowledge) and `/audit/flagged-patients` (the VIP list) — auditor.
//!
//! The admin credential never reaches these APIs (403), and every read here is itself audited
//! before the response is built.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{NaiveDate, NaiveDateTime};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use yiqiao_registry::audit::alerts;
use yiqiao_registry::audit::query::{self, EventFilter, TimeBound};
use yiqiao_registry::empi::store as empi;

use crate::auth::{Caller, CallerVia};
use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::fhir;
use crate::service::Actor;
use crate::service::authz::{
    AlertSearch, AlertUpdate, AuditEventRead, AuditEventSearch, AuditReportRead, Facts,
    FlaggedPatientDelete, FlaggedPatientSearch, FlaggedPatientUpdate, Need, Op, Permit, Resource,
};
use crate::staff::Staff;
use crate::state::AppState;

mod search_query;

use search_query::{parse_search, resolve_patient, trimmed};

/// Who is reading the trail.
enum Viewer {
    /// The auditor role: everything, as stored.
    Auditor(Staff),
    /// A member institution (patient-facing platform): one of its patients, trimmed.
    Platform(Box<Caller>),
}

/// Who reads the trail, from the permit: a staff role the table lets in, or a member's access
/// token (not the admin credential on its behalf).
fn viewer<N: Need>(permit: &Permit<N>) -> Result<Viewer, ApiError> {
    match &permit.actor {
        Actor::Staff(staff) => Ok(Viewer::Auditor(staff.clone())),
        Actor::Member(caller) if caller.via != CallerVia::AccessToken => Err(ApiError::new(
            ErrorCode::Forbidden,
            "the audit trail is not available on behalf of an institution",
        )),
        Actor::Member(caller) => Ok(Viewer::Platform(Box::new(caller.clone()))),
    }
}

/// The record of an auditor's read of the trail: who, the role, the query text and the patient
/// the query names.
fn auditor_search_event(
    state: &AppState,
    staff: &Staff,
    query: String,
    patient: Option<String>,
) -> yiqiao_registry::audit::AuditEvent {
    let mut e = state.auditor.search_event(query);
    e.agent_user = Some(staff.subject.clone());
    e.agent_role = Some("auditor".into());
    e.patient_id = patient;
    e
}

/// Record an auditor's read (the request's path and query) durably, before the answer is built.
async fn record_auditor_read(
    state: &AppState,
    staff: &Staff,
    req: &HttpRequest,
    patient: Option<String>,
) -> Result<(), ApiError> {
    let query = format!("{}?{}", req.path(), req.query_string());
    let event = auditor_search_event(state, staff, query, patient);
    state.auditor.record(event).await?;
    Ok(())
}

fn fhir_ok(body: Value) -> HttpResponse {
    HttpResponse::Ok().content_type(fhir::FHIR_JSON).json(body)
}

/// Search the audit trail (auditor role), or one patient's accesses (institution access token
/// with system/AuditEvent.s, `patient` required). Newest first; `next` link pages on.
#[utoipa::path(get, path = "/fhir/AuditEvent", tag = "audit",
    params(
        ("patient" = Option<String>, Query, description = "Patient/<source record id>, https://yiqiao.health/fhir/sid/empi|<id> or an enterprise id (required for institutions)"),
        ("agent" = Option<String>, Query, description = "Requesting institution (Organization/<id> or id) or user"),
        ("entity" = Option<String>, Query, description = "A resource the event is about, e.g. Organization/hosp-001"),
        ("date" = Option<String>, Query, description = "[eq|ge|gt|le|lt]YYYY-MM-DD or RFC 3339 date-time; repeatable"),
        ("outcome" = Option<String>, Query, description = "0 | 4 | 8 | 12"),
        ("purpose" = Option<String>, Query, description = "Purpose of use code (TREAT, ETREAT, …)"),
        ("_count" = Option<i64>, Query, description = "Page size, 1–500 (default 50)"),
        ("_id" = Option<String>, Query, description = "AuditEvent id"),
        ("_cursor" = Option<i64>, Query, description = "Paging cursor from a next link"),
    ),
    responses(
        (status = 200, description = "searchset Bundle of AuditEvents (BALP), newest first"),
        (status = 400, description = "OperationOutcome naming the parameter"),
        (status = 401, description = "No credential"),
        (status = 403, description = "Not the auditor role, missing scope, or a patient the institution did not register"),
    ),
    security(("auditor_token" = []), ("access_token" = [])))]
pub async fn search(
    permit: Permit<AuditEventSearch>,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let viewer = viewer(&permit)?;
    let s = parse_search(&req)?;
    if let Viewer::Platform(_) = &viewer {
        if s.patient.is_none() {
            return Err(ApiError::invalid_param(
                "patient",
                "is required: an institution sees the accesses to one of its own patients",
            ));
        }
        if s.filter.agent.is_some() || s.filter.entity.is_some() || s.filter.event_id.is_some() {
            return Err(ApiError::invalid_param(
                "patient",
                "institutions may filter by patient, date, outcome and purpose only",
            ));
        }
    }
    let platform = match &viewer {
        Viewer::Platform(c) => Some(c.institution.id.to_string()),
        Viewer::Auditor(_) => None,
    };
    let raw_patient = s.patient.clone();
    let mut filter = s.filter.clone();
    let check = permit.check.clone();
    let (person, found, archived) = state
        .db(move |conn| -> Result<_, ApiError> {
            let person = match &raw_patient {
                None => None,
                Some(raw) => Some(resolve_patient(conn, raw)?),
            };
            if let Some(inst) = &platform {
                // Only a patient the institution registered itself.
                let registered = match person.as_ref().and_then(|p| p.as_ref()) {
                    Some(p) => empi::records_of_person(conn, p)?
                        .iter()
                        .any(|r| &r.institution_id == inst),
                    None => false,
                };
                let facts = Facts {
                    custodian: registered,
                    ..Facts::default()
                };
                check
                    .settle(facts, Resource::AuditEvent, Op::Search, None)
                    .map_err(|_| ApiError::new(
                        ErrorCode::Forbidden,
                        format!("the patient is not registered by {inst}; an institution sees only the accesses to its own patients"),
                    ))?;
            }
            let found = match &person {
                Some(None) => Vec::new(),
                Some(Some(p)) => {
                    filter.patient = Some(p.clone());
                    query::search(conn, &filter)?
                }
                None => query::search(conn, &filter)?,
            };
            let archived = yiqiao_registry::audit::archive::latest(conn)?;
            Ok((person.flatten(), found, archived))
        })
        .await?;
    let mut found = found;
    let more = found.len() as i64 > s.count;
    found.truncate(s.count as usize);
    // The reader's own access, recorded before the response is built.
    let query_text = format!("{}?{}", req.path(), req.query_string());
    let event = match &viewer {
        Viewer::Auditor(staff) => auditor_search_event(&state, staff, query_text, person.clone()),
        Viewer::Platform(caller) => {
            let e = state.auditor.search_event(query_text);
            state.auditor.by_caller(e, caller, person.clone())
        }
    };
    state.auditor.record(event).await?;
    let resources: Vec<Value> = found
        .iter()
        .map(|e| match viewer {
            Viewer::Auditor(_) => serde_json::from_str(&e.resource).unwrap_or(Value::Null),
            Viewer::Platform(_) => trimmed(e),
        })
        .collect();
    let path = req.path();
    let build = |cursor: Option<i64>| {
        let mut p: Vec<(String, String)> = s
            .params
            .iter()
            .filter(|(k, _)| k != "_cursor")
            .cloned()
            .collect();
        if let Some(c) = cursor {
            p.push(("_cursor".into(), c.to_string()));
        }
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(p)
            .finish();
        format!("{}{path}?{q}", state.base_url)
    };
    let self_url = build(s.filter.before_seq);
    let next = more.then(|| build(found.last().map(|e| e.seq)));
    let mut bundle = fhir::searchset(&state.base_url, &self_url, next, None, resources);
    if let Some(note) = archived.and_then(|m| archive_note(&m, &s.filter))
        && let Some(entries) = bundle["entry"].as_array_mut()
    {
        entries.push(note);
    }
    Ok(fhir_ok(bundle))
}

/// When older months were archived (docs/audit.md "Retention, partitions and archives") and
/// the search may reach them: an OperationOutcome entry saying the result covers only the
/// records still stored.
fn archive_note(
    latest: &yiqiao_registry::audit::archive::ArchiveManifest,
    filter: &EventFilter,
) -> Option<Value> {
    let until = yiqiao_registry::audit::archive::covered_until(latest)?;
    let starts_after = filter.time.iter().any(|b| match *b {
        TimeBound::From(t) | TimeBound::After(t) => t >= until,
        TimeBound::Until(_) | TimeBound::Before(_) => false,
    });
    if starts_after {
        return None;
    }
    Some(json!({
        "resource": {
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "information",
                "code": "informational",
                "details": {"text": format!(
                    "audit records of months up to {} (chain positions 1..{}) are archived: this search covers only the records still stored; search the archive files for earlier ones",
                    latest.month, latest.last_seq
                )},
            }],
        },
        "search": {"mode": "outcome"},
    }))
}

/// Read one AuditEvent (auditor role).
#[utoipa::path(get, path = "/fhir/AuditEvent/{id}", tag = "audit",
    params(("id" = String, Path, description = "AuditEvent id")),
    responses((status = 200, description = "AuditEvent (BALP), as hashed"), (status = 404, description = "OperationOutcome")),
    security(("auditor_token" = [])))]
pub async fn read(
    permit: Permit<AuditEventRead>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    let id = id.into_inner();
    let wanted = id.clone();
    let found = state
        .db(move |conn| {
            query::search(
                conn,
                &EventFilter {
                    event_id: Some(wanted),
                    limit: 1,
                    ..EventFilter::default()
                },
            )
        })
        .await?;
    let stored = found
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::not_found(format!("AuditEvent/{id} not found")))?;
    let mut event = state.auditor.read_event(format!("AuditEvent/{id}"));
    event.agent_user = Some(auditor.subject.clone());
    event.agent_role = Some("auditor".into());
    event.patient_id = stored.patient_id.clone();
    state.auditor.record(event).await?;
    Ok(fhir_ok(
        serde_json::from_str(&stored.resource).unwrap_or(Value::Null),
    ))
}

/// An alert as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertView {
    pub id: String,
    /// many-patients | off-hours | break-the-glass | break-the-glass-frequent |
    /// flagged-patient | denials | same-surname-address
    pub rule: String,
    pub agent: Option<String>,
    pub patient_id: Option<String>,
    pub first_seq: i64,
    pub last_seq: i64,
    #[schema(value_type = Object)]
    pub detail: Value,
    pub created_at: String,
    /// open | acknowledged
    pub status: String,
    pub ack_by: Option<String>,
    pub ack_note: Option<String>,
    pub ack_at: Option<String>,
    /// none | pending | delivered | failed
    pub webhook_state: String,
    pub webhook_attempts: i32,
}

fn ts(t: NaiveDateTime) -> String {
    yiqiao_registry::audit::format_time(&t)
}

impl From<alerts::Alert> for AlertView {
    fn from(a: alerts::Alert) -> AlertView {
        AlertView {
            detail: serde_json::from_str(&a.detail).unwrap_or(Value::String(a.detail)),
            id: a.id,
            rule: a.rule,
            agent: a.agent,
            patient_id: a.patient_id,
            first_seq: a.first_seq,
            last_seq: a.last_seq,
            created_at: ts(a.created_at),
            status: a.status,
            ack_by: a.ack_by,
            ack_note: a.ack_note,
            ack_at: a.ack_at.map(ts),
            webhook_state: a.webhook_state,
            webhook_attempts: a.webhook_attempts,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    pub items: Vec<AlertView>,
    /// Offset of the next page, absent on the last page.
    pub next_offset: Option<i64>,
}

/// Anomaly alerts, newest first (auditor role).
#[utoipa::path(get, path = "/audit/alerts", tag = "audit",
    params(("status" = Option<String>, Query, description = "open | acknowledged"),
        ("rule" = Option<String>, Query), ("_count" = Option<i64>, Query, description = "1–500 (default 100)"),
        ("_offset" = Option<i64>, Query)),
    responses((status = 200, body = AlertList)),
    security(("auditor_token" = [])))]
pub async fn list_alerts(
    permit: Permit<AlertSearch>,
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    crate::routes::check_params(&q, &["status", "rule", "_count", "_offset"])?;
    let (count, offset) = crate::routes::paging(&q, 100, 500)?;
    let status = q.get("status").cloned();
    if let Some(s) = &status
        && !["open", "acknowledged"].contains(&s.as_str())
    {
        return Err(ApiError::invalid_param(
            "status",
            "must be open or acknowledged",
        ));
    }
    let rule = q.get("rule").cloned();
    let mut items = state
        .db(move |conn| alerts::list(conn, status.as_deref(), rule.as_deref(), count + 1, offset))
        .await?;
    let next_offset = (items.len() as i64 > count).then_some(offset + count);
    items.truncate(count as usize);
    record_auditor_read(&state, auditor, &req, None).await?;
    Ok(HttpResponse::Ok().json(AlertList {
        items: items.into_iter().map(AlertView::from).collect(),
        next_offset,
    }))
}

/// A note on an acknowledgement or a flag.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NoteInput {
    /// What was checked or why (1–2000 characters).
    pub note: String,
}

fn check_note(note: &str) -> Result<String, ApiError> {
    let note = note.trim();
    if note.is_empty() || note.chars().count() > 2000 {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "note must be 1–2000 characters",
        )
        .field("note"));
    }
    Ok(note.to_string())
}

/// The start of an auditor's change, the same for every one: the CSRF check of a session
/// cookie, the note (when the change takes one), and the audit event of the operation the
/// permit names on `reference`.
struct AuditorChange {
    /// Who makes the change (the staff subject).
    by: String,
    note: String,
    event: yiqiao_registry::audit::AuditEvent,
}

fn auditor_change<N: Need>(
    state: &AppState,
    permit: &Permit<N>,
    req: &HttpRequest,
    note: Option<&str>,
    reference: String,
) -> Result<AuditorChange, ApiError> {
    let auditor = permit.staff()?;
    crate::console::require_csrf(req, auditor)?;
    let note = note.map(check_note).transpose()?.unwrap_or_default();
    let event = state
        .auditor
        .staff_event(auditor, N::OP.name(), N::OP.action(), reference);
    Ok(AuditorChange {
        by: auditor.subject.clone(),
        note,
        event,
    })
}

/// Acknowledge an alert with a note (auditor role; recorded in the audit trail with the change).
#[utoipa::path(post, path = "/audit/alerts/{id}/ack", tag = "audit",
    params(("id" = String, Path)), request_body = NoteInput,
    responses((status = 200, body = AlertView),
        (status = 403, description = "Not the auditor role, or a session cookie without X-CSRF-Token (from /console/session)"),
        (status = 404, description = "No such alert"),
        (status = 409, description = "Already acknowledged"), (status = 422, description = "Empty note")),
    security(("auditor_token" = [])))]
pub async fn ack_alert(
    permit: Permit<AlertUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: ValidJson<NoteInput>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let id = id.into_inner();
    let AuditorChange { by, note, event } = auditor_change(
        &state,
        &permit,
        &req,
        Some(&body.note),
        format!("AuditAlert/{id}"),
    )?;
    let alert = state
        .auditor
        .change(event, move |conn, event| {
            let a = alerts::acknowledge(conn, &id, &by, &note).map_err(|e| match e {
                alerts::AckError::NotFound(_) => ApiError::not_found(e.to_string()),
                alerts::AckError::Already(..) => ApiError::new(ErrorCode::Conflict, e.to_string()),
                alerts::AckError::Db(d) => yiqiao_registry::StoreError::from_diesel(d).into(),
            })?;
            event.patient_id = a.patient_id.clone();
            event.outcome_desc = Some(format!("acknowledged: {note}"));
            Ok(a)
        })
        .await?;
    Ok(HttpResponse::Ok().json(AlertView::from(alert)))
}

/// A flagged (VIP) patient.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlagView {
    pub patient_id: String,
    pub note: String,
    pub flagged_by: String,
    pub flagged_at: String,
}

/// The flagged (VIP) patients whose every access raises an alert (auditor role).
#[utoipa::path(get, path = "/audit/flagged-patients", tag = "audit",
    responses((status = 200, body = [FlagView])),
    security(("auditor_token" = [])))]
pub async fn list_flags(
    permit: Permit<FlaggedPatientSearch>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    let flags = state
        .db(|conn| alerts::flagged(conn).map_err(yiqiao_registry::StoreError::from_diesel))
        .await?;
    let event = auditor_search_event(&state, auditor, "/audit/flagged-patients".into(), None);
    state.auditor.record(event).await?;
    Ok(HttpResponse::Ok().json(
        flags
            .into_iter()
            .map(|f| FlagView {
                patient_id: f.patient_id,
                note: f.note,
                flagged_by: f.flagged_by,
                flagged_at: ts(f.flagged_at),
            })
            .collect::<Vec<_>>(),
    ))
}

/// Flag a patient (enterprise id) as VIP, with a note (auditor role; audited).
#[utoipa::path(put, path = "/audit/flagged-patients/{patient}", tag = "audit",
    params(("patient" = String, Path, description = "Enterprise (EMPI) patient id")), request_body = NoteInput,
    responses((status = 200, body = FlagView),
        (status = 403, description = "Not the auditor role, or a session cookie without X-CSRF-Token"),
        (status = 422, description = "Empty note")),
    security(("auditor_token" = [])))]
pub async fn put_flag(
    permit: Permit<FlaggedPatientUpdate>,
    state: web::Data<AppState>,
    patient: web::Path<String>,
    body: ValidJson<NoteInput>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let patient = patient.into_inner();
    let AuditorChange {
        by,
        note,
        mut event,
    } = auditor_change(
        &state,
        &permit,
        &req,
        Some(&body.note),
        format!("AuditFlag/{patient}"),
    )?;
    if patient.is_empty() || patient.len() > 128 {
        return Err(ApiError::invalid_param(
            "patient",
            "must be 1–128 characters",
        ));
    }
    event.patient_id = Some(patient.clone());
    event.outcome_desc = Some(format!("flagged: {note}"));
    let flag = state
        .auditor
        .change(event, move |conn, _| {
            alerts::flag(conn, &patient, &note, &by)
                .map_err(|e| yiqiao_registry::StoreError::from_diesel(e).into())
        })
        .await?;
    Ok(HttpResponse::Ok().json(FlagView {
        patient_id: flag.patient_id,
        note: flag.note,
        flagged_by: flag.flagged_by,
        flagged_at: ts(flag.flagged_at),
    }))
}

/// Remove a flag (auditor role; audited).
#[utoipa::path(delete, path = "/audit/flagged-patients/{patient}", tag = "audit",
    params(("patient" = String, Path)),
    responses((status = 204, description = "Removed"),
        (status = 403, description = "Not the auditor role, or a session cookie without X-CSRF-Token"),
        (status = 404, description = "Not flagged")),
    security(("auditor_token" = [])))]
pub async fn delete_flag(
    permit: Permit<FlaggedPatientDelete>,
    state: web::Data<AppState>,
    patient: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let patient = patient.into_inner();
    let AuditorChange { mut event, .. } =
        auditor_change(&state, &permit, &req, None, format!("AuditFlag/{patient}"))?;
    event.patient_id = Some(patient.clone());
    state
        .auditor
        .change(event, move |conn, _| {
            if alerts::unflag(conn, &patient).map_err(yiqiao_registry::StoreError::from_diesel)? {
                Ok(())
            } else {
                Err(ApiError::not_found(format!(
                    "patient {patient} is not flagged"
                )))
            }
        })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A problem verification found.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainProblem {
    /// The chain position (0 for a manifest).
    pub seq: i64,
    /// modified | deleted | inserted | reordered | truncated | bad-checkpoint-signature | checkpoint-mismatch
    pub kind: String,
    pub detail: String,
}

/// The result of verifying the audit chain (what `yiqiao audit verify` prints).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainStatus {
    /// `verified`, `failed` or `empty` (no records in the range).
    pub status: String,
    /// One line, as `yiqiao audit verify` prints it.
    pub summary: String,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    /// Records checked.
    pub records: u64,
    /// Signed checkpoints checked.
    pub checkpoints: u64,
    /// The chain head (last position) and the last signed checkpoint's position.
    pub head_seq: i64,
    pub checkpoint_seq: i64,
    /// Key id of the SM2 key checkpoints were verified with.
    pub key_id: String,
    /// The first broken position, when verification failed.
    pub broken_at: Option<i64>,
    pub problem_count: usize,
    /// The first 100 problems, by position.
    pub problems: Vec<ChainProblem>,
    pub verified_at: String,
    pub duration_ms: u64,
}

fn position_param(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<i64>, ApiError> {
    q.get(name)
        .map(|raw| {
            raw.parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::invalid_param(name, "must be a chain position (≥ 1)"))
        })
        .transpose()
}

/// Verify the audit chain now (auditor role): every record's hash and link, the columns against
/// the hashed resource, and every signed checkpoint, over positions `from..=to` (default: the
/// whole chain). Names the first broken position. The read is audited.
#[utoipa::path(get, path = "/audit/chain", tag = "audit",
    params(("from" = Option<i64>, Query, description = "First position (default 1)"),
           ("to" = Option<i64>, Query, description = "Last position (default the chain head)")),
    responses((status = 200, description = "Verification result (also when it failed)", body = ChainStatus),
              (status = 400, description = "OperationOutcome naming the parameter")),
    security(("auditor_token" = [])))]
pub async fn chain_status(
    permit: Permit<AuditReportRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    crate::routes::check_params(&q, &["from", "to"])?;
    let (from, to) = (position_param(&q, "from")?, position_param(&q, "to")?);
    record_auditor_read(&state, auditor, &req, None).await?;
    let key = state.auditor.signer().public_key().clone();
    let key_id = state.auditor.signer().key_id().to_string();
    let started = std::time::Instant::now();
    let ((head_seq, _, checkpoint_seq), report) = state
        .db(move |conn| {
            let head = yiqiao_registry::audit::chain_head(conn)?;
            let report = yiqiao_registry::audit::verify_db(conn, from, to, &key)?;
            Ok::<_, yiqiao_registry::StoreError>((head, report))
        })
        .await?;
    let (status, summary) = match (report.first_problem(), report.records) {
        (Some(p), _) => (
            "failed",
            format!(
                "audit verification FAILED at position {}: {}: {} ({} problem(s))",
                p.seq,
                p.kind.as_str(),
                p.detail,
                report.problems.len()
            ),
        ),
        (None, 0) => ("empty", "no records in this range".to_string()),
        (None, n) => (
            "verified",
            format!(
                "audit chain OK: positions {}..{} ({n} records, {} checkpoints verified)",
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                report.checkpoints
            ),
        ),
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(ChainStatus {
            status: status.into(),
            summary,
            first_seq: report.first_seq,
            last_seq: report.last_seq,
            records: report.records,
            checkpoints: report.checkpoints,
            head_seq,
            checkpoint_seq,
            key_id,
            broken_at: report.first_problem().map(|p| p.seq),
            problem_count: report.problems.len(),
            problems: report
                .problems
                .iter()
                .take(100)
                .map(|p| ChainProblem {
                    seq: p.seq,
                    kind: p.kind.as_str().into(),
                    detail: p.detail.clone(),
                })
                .collect(),
            verified_at: ts(yiqiao_registry::store::now_utc()),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
}

/// One requester's records per day.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyRow {
    /// Institution id, `staff` (people and operators) or `unauthenticated`.
    pub requester: String,
    /// Successful records per day, aligned with `days`.
    pub accesses: Vec<u64>,
    /// Refused or failed requests per day, aligned with `days`.
    pub denials: Vec<u64>,
    pub total_accesses: u64,
    pub total_denials: u64,
}

/// Access volume and denials per requester per day.
#[derive(Debug, Serialize, ToSchema)]
pub struct DailyStats {
    pub from: String,
    pub to: String,
    /// Every day of the period (UTC), oldest first.
    pub days: Vec<String>,
    /// One row per requester with any record in the period, by requester.
    pub rows: Vec<DailyRow>,
}

fn day_param(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<NaiveDate>, ApiError> {
    q.get(name)
        .map(|raw| {
            NaiveDate::parse_from_str(raw, "%Y-%m-%d")
                .map_err(|_| ApiError::invalid_param(name, "must be a date YYYY-MM-DD"))
        })
        .transpose()
}

/// Access volume and denials per institution per day (auditor role): successful records and
/// refused or failed requests of each requester on each day (UTC) of `from..=to` (default: the
/// last 14 days; at most 366 days). The read is audited.
#[utoipa::path(get, path = "/audit/stats/daily", tag = "audit",
    params(("from" = Option<String>, Query, description = "First day YYYY-MM-DD (default 13 days before `to`)"),
           ("to" = Option<String>, Query, description = "Last day YYYY-MM-DD, included (default today, UTC)")),
    responses((status = 200, body = DailyStats),
              (status = 400, description = "OperationOutcome naming the parameter")),
    security(("auditor_token" = [])))]
pub async fn daily_stats(
    permit: Permit<AuditReportRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    crate::routes::check_params(&q, &["from", "to"])?;
    let to = day_param(&q, "to")?.unwrap_or_else(|| yiqiao_registry::store::now_utc().date());
    let from = day_param(&q, "from")?.unwrap_or(to - chrono::Duration::days(13));
    let span = (to - from).num_days();
    if !(0..366).contains(&span) {
        return Err(ApiError::invalid_param(
            "from",
            "must be on or before `to`, at most 366 days",
        ));
    }
    record_auditor_read(&state, auditor, &req, None).await?;
    let (start, end) = (
        from.and_time(chrono::NaiveTime::MIN),
        (to + chrono::Duration::days(1)).and_time(chrono::NaiveTime::MIN),
    );
    let counts = state
        .db(move |conn| query::daily_by_requester(conn, start, end))
        .await?;
    let days: Vec<String> = from
        .iter_days()
        .take_while(|d| *d <= to)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .collect();
    let mut rows: Vec<DailyRow> = Vec::new();
    for c in counts {
        if rows.last().is_none_or(|r| r.requester != c.requester) {
            rows.push(DailyRow {
                requester: c.requester.clone(),
                accesses: vec![0; days.len()],
                denials: vec![0; days.len()],
                total_accesses: 0,
                total_denials: 0,
            });
        }
        let (Some(row), Some(i)) = (rows.last_mut(), days.iter().position(|d| *d == c.day)) else {
            continue;
        };
        row.accesses[i] = c.accesses;
        row.denials[i] = c.denials;
        row.total_accesses += c.accesses;
        row.total_denials += c.denials;
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(DailyStats {
            from: from.format("%Y-%m-%d").to_string(),
            to: to.format("%Y-%m-%d").to_string(),
            days,
            rows,
        }))
}

/// The compliance report over a period (auditor role), as `yiqiao audit report` writes it:
/// `format=html` (one self-contained page) or `csv`, sent as a download. The period's chain
/// verification is in the report and in the `X-Audit-Chain` header (`verified` or `failed`).
/// The read is audited.
#[utoipa::path(get, path = "/audit/report", tag = "audit",
    params(("from" = String, Query, description = "Start: YYYY-MM-DD or RFC 3339 time (UTC)"),
           ("to" = String, Query, description = "End: YYYY-MM-DD (that day included) or RFC 3339 time (excluded)"),
           ("format" = Option<String>, Query, description = "html (default) | csv")),
    responses((status = 200, description = "The report (text/html or text/csv, Content-Disposition: attachment)"),
              (status = 400, description = "OperationOutcome naming the parameter")),
    security(("auditor_token" = [])))]
pub async fn report(
    permit: Permit<AuditReportRead>,
    state: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<std::collections::HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    crate::routes::check_params(&q, &["from", "to", "format"])?;
    let bound = |name: &str, is_end: bool| {
        let raw = q
            .get(name)
            .ok_or_else(|| ApiError::invalid_param(name, "is required"))?;
        crate::report::period_bound(raw, is_end).ok_or_else(|| {
            ApiError::invalid_param(name, "must be a date YYYY-MM-DD or an RFC 3339 time")
        })
    };
    let (from, to) = (bound("from", false)?, bound("to", true)?);
    if from >= to {
        return Err(ApiError::invalid_param("to", "must be after `from`"));
    }
    let csv = match q.get("format").map(String::as_str) {
        None | Some("html") => false,
        Some("csv") => true,
        Some(_) => return Err(ApiError::invalid_param("format", "must be html or csv")),
    };
    record_auditor_read(&state, auditor, &req, None).await?;
    let key = state.auditor.signer().public_key().clone();
    let data = state
        .db(move |conn| crate::report::gather(conn, from, to, &key))
        .await?;
    let name = format!(
        "yiqiao-audit-report-{}-{}",
        from.format("%Y%m%dT%H%M%S"),
        to.format("%Y%m%dT%H%M%S")
    );
    let (body, content_type, ext) = if csv {
        (crate::report::csv(&data), "text/csv; charset=utf-8", "csv")
    } else {
        (
            crate::report::html(&data),
            "text/html; charset=utf-8",
            "html",
        )
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}.{ext}\""),
        ))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        // The HTML report has inline styles and no scripts: allow nothing else.
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; sandbox",
        ))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((
            "X-Audit-Chain",
            if data.verified() {
                "verified"
            } else {
                "failed"
            },
        ))
        .body(body))
}
