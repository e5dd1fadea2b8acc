//! FHIR `Consent` (patients' privacy decisions, recorded by member institutions) and the policy
//! simulator `POST /consent/$evaluate` for staff (docs/consent.md).
//!
//! `Consent.patient` names the patient as a reference to a Patient source record
//! (`Patient/<source record id>`, resolved to its enterprise person), as a reference to the
//! enterprise person id (`Patient/<person id>`), or by identifier in the EMPI system. Consents are
//! stored under the enterprise person id. Every change is a new version (`meta.versionId`,
//! `If-Match` honoured on update) and is audited; revoking is an update to `status` `inactive`
//! (optionally with the revoked extension), effective on the next request on every replica.

use std::collections::HashMap;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;
use yiqiao_consent::{DataItem, Decision, Purpose, Requester};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::consent::{self as store, StoredConsent};

use crate::error::{ApiError, ErrorCode};
use crate::extract::{IfMatch, ValidJson};
use crate::fhir;
use crate::policy::{Ask, annotate_decision, kind_of, status_code};
use crate::routes::{check_params, paging};
use crate::service::authz::{
    AgreementSearch, AgreementUpdate, ConsentCreate, ConsentPolicyRead, ConsentRead, ConsentSearch,
    ConsentUpdate, Permit,
};
use crate::service::consent::{self as service, ConsentBody, ConsentQuery};
use crate::state::AppState;

const STATUSES: [&str; 6] = [
    "draft",
    "proposed",
    "active",
    "rejected",
    "inactive",
    "entered-in-error",
];

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(field)
}

/// The Consent as served: the stored JSON with id and meta.
pub fn consent_view(row: &StoredConsent) -> Value {
    let mut v: Value = serde_json::from_str(&row.resource).unwrap_or_else(|_| json!({}));
    v["resourceType"] = json!("Consent");
    v["id"] = json!(row.id);
    v["meta"] = json!({
        "versionId": row.version.to_string(),
        "lastUpdated": format!("{}Z", row.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
    });
    v
}

fn respond(state: &AppState, status: StatusCode, row: &StoredConsent) -> HttpResponse {
    let mut resp = HttpResponse::build(status)
        .content_type(fhir::FHIR_JSON)
        .json(consent_view(row));
    if let Ok(v) = header::HeaderValue::from_str(&format!("W/\"{}\"", row.version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    if status == StatusCode::CREATED
        && let Ok(v) =
            header::HeaderValue::from_str(&format!("{}/fhir/Consent/{}", state.base_url, row.id))
    {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Record a patient's consent.
#[utoipa::path(post, path = "/fhir/Consent", tag = "consent",
    request_body(content = Object, description = "FHIR R4 Consent with one provision (docs/consent.md); the server assigns the id"),
    responses((status = 201, description = "Stored; the Consent with id and meta.versionId"),
        (status = 403, description = "Scope system/Consent.c not granted"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<ConsentCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = ConsentBody::parse(body.checked()?, None)?;
    let row = service::create(&state, &permit, body).await?;
    Ok(respond(&state, StatusCode::CREATED, &row))
}

/// Replace a consent with a new version (e.g. revoke it: status `inactive`).
#[utoipa::path(put, path = "/fhir/Consent/{id}", tag = "consent",
    params(("id" = String, Path), ("If-Match" = Option<String>, Header, description = "Expected version, e.g. W/\"1\"")),
    request_body(content = Object, description = "FHIR R4 Consent; Consent.id must equal the path id"),
    responses((status = 200, description = "Updated; the new version"),
        (status = 404, description = "No such consent"),
        (status = 412, description = "If-Match names another version"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn update(
    state: web::Data<AppState>,
    permit: Permit<ConsentUpdate>,
    id: web::Path<String>,
    if_match: IfMatch,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let id = id.into_inner();
    let expected = if_match.checked()?;
    let body = ConsentBody::parse(body, Some(&id))?;
    let row = service::update(&state, &permit, id, expected, body).await?;
    Ok(respond(&state, StatusCode::OK, &row))
}

/// Read a consent.
#[utoipa::path(get, path = "/fhir/Consent/{id}", tag = "consent",
    params(("id" = String, Path)),
    responses((status = 200, description = "FHIR Consent"), (status = 404, description = "OperationOutcome")),
    security(("access_token" = [])))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<ConsentRead>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let row = service::read(&state, &permit, id.into_inner()).await?;
    Ok(respond(&state, StatusCode::OK, &row))
}

/// Search consents by patient and status.
#[utoipa::path(get, path = "/fhir/Consent", tag = "consent",
    params(("patient" = Option<String>, Query, description = "Patient/<source record or enterprise id>, or the id alone"),
        ("status" = Option<String>, Query, description = "draft | proposed | active | rejected | inactive | entered-in-error"),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query)),
    responses((status = 200, description = "searchset Bundle of Consents")),
    security(("access_token" = [])))]
pub async fn search(
    state: web::Data<AppState>,
    permit: Permit<ConsentSearch>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    check_params(&query, &["patient", "status", "_count", "_offset"])?;
    let (count, offset) = paging(&query, 20, 200)?;
    if let Some(s) = query.get("status")
        && !STATUSES.contains(&s.as_str())
    {
        return Err(ApiError::invalid_param(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ));
    }
    let patient = match query.get("patient") {
        None => None,
        Some(raw) => {
            let id = raw.strip_prefix("Patient/").unwrap_or(raw).to_string();
            if id.is_empty() || id.contains('/') {
                return Err(ApiError::invalid_param(
                    "patient",
                    "must be Patient/<id> or <id>",
                ));
            }
            Some(id)
        }
    };
    let q = ConsentQuery {
        patient,
        status: query.get("status").cloned(),
        count,
        offset,
        text: format!("{}?{}", req.path(), req.query_string()),
    };
    let mut rows = service::search(&state, &permit, q).await?;
    let more = rows.len() as i64 > count;
    rows.truncate(count as usize);
    let (self_url, next) = crate::routes::directory::page_urls(&state, &req, offset, count, more);
    let resources = rows.iter().map(consent_view).collect();
    Ok(HttpResponse::Ok()
        .content_type(fhir::FHIR_JSON)
        .json(fhir::searchset(
            &state.base_url,
            &self_url,
            next,
            None,
            resources,
        )))
}

/// A hypothetical request for the policy simulator.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluateInput {
    /// Requesting institution id. Its kind comes from the directory unless `requester_kind`
    /// is given (then it need not be registered).
    pub requester: String,
    /// hospital | internet_hospital | public_health | regional_platform
    pub requester_kind: Option<String>,
    /// Purpose of use (TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH, PATRQT).
    pub purpose: String,
    /// Enterprise person id (or a Patient source record id).
    pub patient: String,
    /// Institution holding the data.
    pub custodian: String,
    /// FHIR resource type of the data (default Patient).
    pub resource_type: Option<String>,
    /// Security labels of the data: a confidentiality code (U L M N R V) and/or sensitivity
    /// codes (PSY, HIV, ...).
    #[serde(default)]
    pub security: Vec<String>,
    /// Instant to evaluate at (RFC 3339); default now.
    pub at: Option<String>,
    /// Stated reason for break-the-glass (ETREAT).
    pub break_glass_reason: Option<String>,
}

/// The simulator's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct EvaluateOutput {
    /// permit | deny
    pub effect: String,
    /// Enterprise person id the request was evaluated for.
    pub patient: String,
    /// Instant evaluated at.
    pub at: String,
    /// The full decision: decided_by (rule id, consent/agreement, text), obligations, notes.
    #[schema(value_type = Object)]
    pub decision: Decision,
    /// The patient's stored consents (id, status, provision) the engine saw.
    #[schema(value_type = Vec<Object>)]
    pub consents: Vec<Value>,
}

/// Policy simulator: evaluate a hypothetical request against the stored consents, agreements
/// and the configured rules. Roles admin, auditor or security-officer.
#[utoipa::path(post, path = "/consent/$evaluate", tag = "consent",
    request_body = EvaluateInput,
    responses((status = 200, description = "The decision with its reasons", body = EvaluateOutput),
        (status = 401, description = "No staff credential"),
        (status = 403, description = "Credential without admin, auditor or security-officer role"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("admin_token" = [])))]
pub async fn evaluate(
    permit: Permit<ConsentPolicyRead>,
    state: web::Data<AppState>,
    body: ValidJson<EvaluateInput>,
) -> Result<HttpResponse, ApiError> {
    let staff = permit.staff()?;
    let input = body.checked()?;
    let purpose = Purpose::from_code(&input.purpose).ok_or_else(|| {
        invalid(
            "purpose",
            "must be one of TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH, PATRQT",
        )
    })?;
    let at: DateTime<Utc> = match &input.at {
        None => Utc::now(),
        Some(raw) => DateTime::parse_from_rfc3339(raw)
            .map_err(|e| invalid("at", format!("must be an RFC 3339 instant: {e}")))?
            .with_timezone(&Utc),
    };
    let mut data = DataItem::resource(input.resource_type.as_deref().unwrap_or("Patient"));
    for (i, label) in input.security.iter().enumerate() {
        if let Some(c) = yiqiao_consent::Confidentiality::from_code(label) {
            data.confidentiality = c;
        } else if let Some(s) = yiqiao_consent::Sensitivity::from_code(label) {
            data.sensitivities.insert(s);
        } else {
            return Err(invalid(
                &format!("security[{i}]"),
                format!("`{label}` is neither a confidentiality nor a sensitivity code"),
            ));
        }
    }
    let requester_id = input.requester.clone();
    let kind = match &input.requester_kind {
        Some(k) => yiqiao_registry::directory::InstitutionKind::parse(k).map_err(|_| {
            invalid(
                "requester_kind",
                "must be hospital, internet_hospital, public_health or regional_platform",
            )
        })?,
        None => {
            let id = requester_id.clone();
            state
                .db(
                    move |conn| match yiqiao_registry::directory::get(conn, &id) {
                        Ok(i) => Ok(Some(i.kind)),
                        Err(yiqiao_registry::directory::DirectoryError::NotFound(_)) => Ok(None),
                        Err(e) => Err(e),
                    },
                )
                .await?
                .ok_or_else(|| {
                    invalid(
                        "requester",
                        format!(
                            "institution {requester_id} is not registered; give requester_kind"
                        ),
                    )
                })?
        }
    };
    let key = input.patient.clone();
    let patient = state
        .db(move |conn| service::person_of(conn, &key))
        .await?
        .unwrap_or_else(|| input.patient.clone());
    let requester = Requester::institution(input.requester.as_str(), kind_of(kind));
    let ask = Ask {
        purpose,
        break_glass_reason: input.break_glass_reason.clone(),
    };
    let decision = state
        .policy
        .decide_for(&requester, &ask, &patient, &input.custodian, &data, at)
        .await?;
    let consents = state
        .policy
        .consents_for(&patient)
        .await?
        .iter()
        .map(|c| {
            json!({
                "id": c.id.as_str(),
                "status": status_code(c.status),
                "provision": c.provision,
                "in_force": c.in_force(at),
            })
        })
        .collect();
    let mut event = state.auditor.staff_rest_event(staff, "operation", "E");
    event.patient_id = Some(patient.clone());
    event.entities.push(EntityRef::query(format!(
        "consent/$evaluate requester={} purpose={} custodian={}",
        input.requester,
        purpose.code(),
        input.custodian
    )));
    annotate_decision(&mut event, &decision);
    state.auditor.record(event).await?;
    let out = EvaluateOutput {
        effect: match decision.effect {
            yiqiao_consent::Effect::Permit => "permit".into(),
            yiqiao_consent::Effect::Deny => "deny".into(),
        },
        patient,
        at: at.to_rfc3339(),
        decision,
        consents,
    };
    Ok(HttpResponse::Ok().json(out))
}

/// A data-sharing agreement: the custodian shares data with the recipient.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgreementInput {
    /// Institution holding the data (registered).
    pub custodian: String,
    /// Institution receiving the data (registered).
    pub recipient: String,
    /// Purposes covered (v3 ActReason codes); at least one.
    pub purposes: Vec<String>,
    /// FHIR resource types covered; empty = all data.
    #[serde(default)]
    pub resource_types: Vec<String>,
    /// First instant in force (RFC 3339); absent = open.
    pub start: Option<String>,
    /// Last instant in force (RFC 3339); absent = open.
    pub end: Option<String>,
    /// active | suspended | terminated
    pub status: String,
}

/// An agreement as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgreementView {
    pub id: String,
    pub custodian: String,
    pub recipient: String,
    pub purposes: Vec<String>,
    pub resource_types: Vec<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub status: String,
    pub version: i64,
}

fn agreement_view(row: &store::StoredAgreement) -> AgreementView {
    let classes: Vec<yiqiao_consent::DataClass> =
        serde_json::from_str(&row.classes).unwrap_or_default();
    AgreementView {
        id: row.id.clone(),
        custodian: row.custodian.clone(),
        recipient: row.recipient.clone(),
        purposes: serde_json::from_str(&row.purposes).unwrap_or_default(),
        resource_types: classes.into_iter().map(|c| c.code).collect(),
        start: row
            .period_start
            .map(|t| format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S"))),
        end: row
            .period_end
            .map(|t| format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S"))),
        status: row.status.clone(),
        version: row.version,
    }
}

fn instant(field: &str, raw: &Option<String>) -> Result<Option<chrono::NaiveDateTime>, ApiError> {
    raw.as_ref()
        .map(|r| {
            DateTime::parse_from_rfc3339(r)
                .map(|t| t.naive_utc())
                .map_err(|e| invalid(field, format!("must be an RFC 3339 instant: {e}")))
        })
        .transpose()
}

/// Create or replace a data-sharing agreement (admin). Takes effect on the next request on
/// every replica, like a consent change.
#[utoipa::path(put, path = "/admin/agreements/{id}", tag = "consent",
    params(("id" = String, Path)),
    request_body = AgreementInput,
    responses((status = 200, body = AgreementView), (status = 422, description = "OperationOutcome naming the field")),
    security(("admin_token" = [])))]
pub async fn put_agreement(
    permit: Permit<AgreementUpdate>,
    state: web::Data<AppState>,
    id: web::Path<String>,
    input: ValidJson<AgreementInput>,
) -> Result<HttpResponse, ApiError> {
    let input = input.checked()?;
    let id = id.into_inner();
    if id.is_empty() || id.len() > 64 {
        return Err(ApiError::invalid_param("id", "must be 1 to 64 characters"));
    }
    if input.purposes.is_empty() {
        return Err(invalid("purposes", "at least one purpose is required"));
    }
    for (i, p) in input.purposes.iter().enumerate() {
        if Purpose::from_code(p).is_none() {
            return Err(invalid(
                &format!("purposes[{i}]"),
                format!(
                    "`{p}` is not a purpose of use (TREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH, PATRQT, ETREAT)"
                ),
            ));
        }
    }
    if !["active", "suspended", "terminated"].contains(&input.status.as_str()) {
        return Err(invalid("status", "must be active, suspended or terminated"));
    }
    let classes: Vec<yiqiao_consent::DataClass> = input
        .resource_types
        .iter()
        .map(yiqiao_consent::DataClass::resource_type)
        .collect();
    let write = store::AgreementWrite {
        id: id.clone(),
        custodian: input.custodian.clone(),
        recipient: input.recipient.clone(),
        purposes: serde_json::to_string(&input.purposes).map_err(ApiError::internal)?,
        classes: serde_json::to_string(&classes).map_err(ApiError::internal)?,
        period_start: instant("start", &input.start)?,
        period_end: instant("end", &input.end)?,
        status: input.status.clone(),
    };
    let row = service::put_agreement(&state, &permit, write).await?;
    Ok(HttpResponse::Ok().json(agreement_view(&row)))
}

/// List data-sharing agreements (admin).
#[utoipa::path(get, path = "/admin/agreements", tag = "consent",
    responses((status = 200, body = Vec<AgreementView>)),
    security(("admin_token" = [])))]
pub async fn list_agreements(
    permit: Permit<AgreementSearch>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let rows = service::list_agreements(&state, &permit).await?;
    Ok(HttpResponse::Ok().json(rows.iter().map(agreement_view).collect::<Vec<_>>()))
}
