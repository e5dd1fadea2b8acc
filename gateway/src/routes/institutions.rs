//! Admin API of the institution directory: `/admin/institutions`.

use std::collections::HashMap;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use yiqiao_registry::directory::{
    self, Institution, InstitutionFilter, InstitutionKind, InstitutionSpec, InstitutionStatus,
    Sm2Key,
};

use crate::error::{ApiError, ErrorCode};
use crate::extract::{IfMatch, ValidJson};
use crate::routes::{check_params, paging};
use crate::service::authz::{
    InstitutionCreate, InstitutionRead, InstitutionSearch, InstitutionUpdate, Permit,
};
use crate::state::AppState;

/// An institution as registered by an administrator.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstitutionInput {
    /// Lowercase slug, 2–64 of a–z, 0–9, '-'.
    #[schema(example = "hosp-fz-001")]
    pub id: String,
    #[schema(example = "福州市第一医院")]
    pub name: String,
    /// Unified social credit code (统一社会信用代码, GB 32100), with its check character.
    #[schema(example = "91350100M000100Y43")]
    pub uscc: String,
    /// Administrative division code (GB/T 2260), 6 digits.
    #[schema(example = "350100")]
    pub region_code: String,
    /// 3A (三级甲等) … 1C, or unrated.
    #[schema(example = "3A")]
    pub level: String,
    /// hospital | internet_hospital | public_health | regional_platform
    #[schema(example = "hospital")]
    pub kind: String,
    /// Base URL of the institution's FHIR R4 endpoint.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Public keys for RS/ES client assertions (a JWKS; private members are rejected).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub jwks: Option<serde_json::Value>,
    /// SM2 public keys (SPKI PEM), each with a kid.
    #[serde(default)]
    pub sm2_keys: Vec<Sm2KeyInput>,
    /// Identifier system (URI) of the institution's patient record numbers.
    #[schema(example = "urn:oid:2.16.156.10011.1.99.1")]
    pub patient_id_system: String,
    /// SMART scopes the institution may be granted, e.g. system/Patient.rs.
    #[serde(default)]
    pub allowed_scopes: Vec<String>,
    /// Always wrap responses to this institution in the SM envelope.
    #[serde(default)]
    pub require_sm_envelope: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sm2KeyInput {
    pub kid: String,
    pub pem: String,
}

impl InstitutionInput {
    pub fn into_spec(self) -> InstitutionSpec {
        InstitutionSpec {
            id: self.id,
            name: self.name,
            uscc: self.uscc,
            region_code: self.region_code,
            level: self.level,
            kind: self.kind,
            endpoint_url: self.endpoint_url,
            jwks: self.jwks,
            sm2_keys: self
                .sm2_keys
                .into_iter()
                .map(|k| Sm2Key {
                    kid: k.kid,
                    pem: k.pem,
                })
                .collect(),
            patient_id_system: self.patient_id_system,
            allowed_scopes: self.allowed_scopes,
            require_sm_envelope: self.require_sm_envelope,
        }
    }
}

/// A directory entry as the admin API returns it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstitutionView {
    pub id: String,
    pub name: String,
    pub uscc: String,
    pub region_code: String,
    pub level: String,
    pub kind: String,
    pub endpoint_url: Option<String>,
    #[schema(value_type = Object)]
    pub jwks: serde_json::Value,
    pub sm2_keys: Vec<Sm2KeyInput>,
    pub patient_id_system: String,
    pub allowed_scopes: Vec<String>,
    pub require_sm_envelope: bool,
    /// active | suspended
    pub status: String,
    /// Increases on every change; send it back in If-Match to update safely.
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Institution> for InstitutionView {
    fn from(i: Institution) -> InstitutionView {
        InstitutionView {
            id: i.id.to_string(),
            name: i.name,
            uscc: i.uscc,
            region_code: i.region_code,
            level: i.level,
            kind: i.kind.as_str().to_string(),
            endpoint_url: i.endpoint_url,
            jwks: i.jwks,
            sm2_keys: i
                .sm2_keys
                .into_iter()
                .map(|k| Sm2KeyInput {
                    kid: k.kid,
                    pem: k.pem,
                })
                .collect(),
            patient_id_system: i.patient_id_system,
            allowed_scopes: i.allowed_scopes,
            require_sm_envelope: i.require_sm_envelope,
            status: i.status.as_str().to_string(),
            version: i.version,
            created_at: format!("{}Z", i.created_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
            updated_at: format!("{}Z", i.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InstitutionList {
    pub items: Vec<InstitutionView>,
    /// Offset of the next page, absent on the last page.
    pub next_offset: Option<i64>,
}

fn with_etag(status: actix_web::http::StatusCode, inst: Institution) -> HttpResponse {
    let etag = format!("W/\"{}\"", inst.version);
    HttpResponse::build(status)
        .insert_header((header::ETAG, etag))
        .json(InstitutionView::from(inst))
}

/// Register an institution.
#[utoipa::path(post, path = "/admin/institutions", tag = "directory",
    request_body = InstitutionInput,
    responses(
        (status = 201, description = "Registered", body = InstitutionView),
        (status = 400, description = "Malformed JSON or unknown field"),
        (status = 401, description = "No admin credential"),
        (status = 409, description = "id, uscc or patient_id_system already registered"),
        (status = 413, description = "Body too large"),
        (status = 415, description = "Not JSON"),
        (status = 422, description = "A field breaks a rule; the field is named"),
    ),
    security(("admin_token" = [])))]
pub async fn create(
    permit: Permit<InstitutionCreate>,
    state: web::Data<AppState>,
    input: ValidJson<InstitutionInput>,
) -> Result<HttpResponse, ApiError> {
    let input = input.checked()?;
    let admin = permit.staff()?;
    check_endpoint(&state, &input).await?;
    let event =
        state
            .auditor
            .staff_event(admin, "create", "C", format!("Organization/{}", input.id));
    let created = state
        .auditor
        .change(event, move |conn, _| {
            let spec = directory::validate(&input.into_spec())?;
            Ok(directory::create(conn, &spec)?)
        })
        .await?;
    tracing::info!(institution = %created.id, "institution registered");
    let location = format!("/admin/institutions/{}", created.id);
    let mut resp = with_etag(actix_web::http::StatusCode::CREATED, created);
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// The gateway calls an institution's FHIR endpoint in federated queries: refuse now what the
/// outbound policy would refuse then (a malformed URL is left to `directory::validate`).
async fn check_endpoint(state: &AppState, input: &InstitutionInput) -> Result<(), ApiError> {
    match input.endpoint_url.as_deref() {
        // A URL the directory refuses anyway (no host, credentials in it) is left to its
        // validation, which names the rule.
        Some(url)
            if url::Url::parse(url).is_ok_and(|u| {
                u.has_host() && u.username().is_empty() && u.password().is_none()
            }) =>
        {
            state.outbound.check_registration(url, "endpoint_url").await
        }
        _ => Ok(()),
    }
}

/// Read an institution.
#[utoipa::path(get, path = "/admin/institutions/{id}", tag = "directory",
    params(("id" = String, Path, description = "Institution id")),
    responses((status = 200, body = InstitutionView), (status = 404, description = "No such institution")),
    security(("admin_token" = [])))]
pub async fn read(
    permit: Permit<InstitutionRead>,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let inst = state.db(move |conn| directory::get(conn, &id)).await?;
    let event = state
        .auditor
        .read_event(format!("Organization/{}", inst.id));
    permit.record(&state.auditor, event, None).await?;
    Ok(with_etag(actix_web::http::StatusCode::OK, inst))
}

/// List institutions (filters: status, kind, name contains; paging: _count, _offset).
#[utoipa::path(get, path = "/admin/institutions", tag = "directory",
    params(
        ("status" = Option<String>, Query, description = "active | suspended"),
        ("kind" = Option<String>, Query, description = "hospital | internet_hospital | public_health | regional_platform"),
        ("name" = Option<String>, Query, description = "Substring of the name"),
        ("_count" = Option<i64>, Query, description = "Page size, 1–1000 (default 100)"),
        ("_offset" = Option<i64>, Query, description = "Start offset"),
    ),
    responses((status = 200, body = InstitutionList)),
    security(("admin_token" = [])))]
pub async fn list(
    permit: Permit<InstitutionSearch>,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    check_params(&query, &["status", "kind", "name", "_count", "_offset"])?;
    let (count, offset) = paging(&query, 100, 1000)?;
    let status = match query.get("status").map(String::as_str) {
        None => None,
        Some("active") => Some(InstitutionStatus::Active),
        Some("suspended") => Some(InstitutionStatus::Suspended),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "status",
                "must be active or suspended",
            ));
        }
    };
    let kind = match query.get("kind") {
        None => None,
        Some(raw) => Some(
            InstitutionKind::parse(raw).map_err(|e| ApiError::invalid_param("kind", e.message))?,
        ),
    };
    let filter = InstitutionFilter {
        status,
        kind,
        name_contains: query.get("name").cloned(),
        uscc: None,
        limit: count + 1,
        offset,
    };
    let mut items = state.db(move |conn| directory::list(conn, &filter)).await?;
    let event = state
        .auditor
        .search_event(format!("{}?{}", req.path(), req.query_string()));
    permit.record(&state.auditor, event, None).await?;
    let next_offset = if items.len() as i64 > count {
        items.truncate(count as usize);
        Some(offset + count)
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(InstitutionList {
        items: items.into_iter().map(InstitutionView::from).collect(),
        next_offset,
    }))
}

/// Replace an institution's registrable fields (status is changed by suspend/activate).
#[utoipa::path(put, path = "/admin/institutions/{id}", tag = "directory",
    params(("id" = String, Path), ("If-Match" = Option<String>, Header, description = "Expected version, e.g. W/\"3\"")),
    request_body = InstitutionInput,
    responses((status = 200, body = InstitutionView), (status = 404), (status = 409), (status = 412, description = "Version mismatch"), (status = 422)),
    security(("admin_token" = [])))]
pub async fn update(
    permit: Permit<InstitutionUpdate>,
    state: web::Data<AppState>,
    if_match: IfMatch,
    id: web::Path<String>,
    input: ValidJson<InstitutionInput>,
) -> Result<HttpResponse, ApiError> {
    let input = input.checked()?;
    let admin = permit.staff()?;
    let id = id.into_inner();
    if input.id != id {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            format!("id: the body names {} but the URL names {id}", input.id),
        )
        .field("id"));
    }
    check_endpoint(&state, &input).await?;
    let expected = if_match.checked()?;
    let event = state
        .auditor
        .staff_event(admin, "update", "U", format!("Organization/{id}"));
    let updated = state
        .auditor
        .change(event, move |conn, _| {
            let spec = directory::validate(&input.into_spec())?;
            Ok(directory::update(conn, &spec, expected)?)
        })
        .await?;
    crate::oauth::forget_institution(&state, updated.id.as_str());
    tracing::info!(institution = %updated.id, version = updated.version, "institution updated");
    Ok(with_etag(actix_web::http::StatusCode::OK, updated))
}

async fn set_status(
    staff: &crate::staff::Staff,
    state: web::Data<AppState>,
    if_match: IfMatch,
    id: String,
    status: InstitutionStatus,
) -> Result<HttpResponse, ApiError> {
    let expected = if_match.checked()?;
    let mut event = state
        .auditor
        .staff_event(staff, "update", "U", format!("Organization/{id}"));
    event.outcome_desc = Some(format!("status set to {}", status.as_str()));
    let inst = state
        .auditor
        .change(event, move |conn, _| {
            Ok(directory::set_status(conn, &id, status, expected)?)
        })
        .await?;
    crate::oauth::forget_institution(&state, inst.id.as_str());
    tracing::info!(institution = %inst.id, status = status.as_str(), "institution status set");
    Ok(with_etag(actix_web::http::StatusCode::OK, inst))
}

/// Suspend an institution: it can no longer obtain tokens or be queried. Idempotent.
#[utoipa::path(post, path = "/admin/institutions/{id}/suspend", tag = "directory",
    params(("id" = String, Path)),
    responses((status = 200, body = InstitutionView), (status = 404)),
    security(("admin_token" = [])))]
pub async fn suspend(
    permit: Permit<InstitutionUpdate>,
    state: web::Data<AppState>,
    if_match: IfMatch,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let admin = permit.staff()?;
    set_status(
        admin,
        state,
        if_match,
        id.into_inner(),
        InstitutionStatus::Suspended,
    )
    .await
}

/// Reactivate a suspended institution. Idempotent.
#[utoipa::path(post, path = "/admin/institutions/{id}/activate", tag = "directory",
    params(("id" = String, Path)),
    responses((status = 200, body = InstitutionView), (status = 404)),
    security(("admin_token" = [])))]
pub async fn activate(
    permit: Permit<InstitutionUpdate>,
    state: web::Data<AppState>,
    if_match: IfMatch,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let admin = permit.staff()?;
    set_status(
        admin,
        state,
        if_match,
        id.into_inner(),
        InstitutionStatus::Active,
    )
    .await
}
