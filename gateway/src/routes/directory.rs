//! FHIR read views of the directory: `Organization` and `Endpoint` under `/fhir`.
//!
//! Public: no credential is needed (the directory lists the members of the exchange and their
//! FHIR base URLs; no patient data). Each read spends from its client address's budget
//! (`rate_limits.directory_per_minute`, 429 beyond it) and is recorded in the audit trail
//! WITHOUT waiting for the record to be durable (`Auditor::record_public`: a bounded queue,
//! counted when full), so anonymous readers cannot load the group commit that data requests
//! wait on. See docs/audit.md and docs/auth.md.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, web};
use yiqiao_registry::directory::{self, InstitutionFilter, InstitutionKind, InstitutionStatus};

use crate::error::ApiError;
use crate::fhir;
use crate::ratelimit::{admit_public, client_address};
use crate::routes::{check_params, paging};
use crate::service::authz::Public;
use crate::state::AppState;

fn fhir_ok(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok().content_type(fhir::FHIR_JSON).json(body)
}

/// Record a public read without waiting for it (module docs), with the client's address.
fn record(state: &AppState, req: &HttpRequest, mut event: yiqiao_registry::audit::AuditEvent) {
    event.agent_address = client_address(req);
    state.auditor.record_public(event);
}

/// Read one Organization.
#[utoipa::path(get, path = "/fhir/Organization/{id}", tag = "fhir",
    params(("id" = String, Path)),
    responses((status = 200, description = "FHIR Organization"), (status = 404, description = "OperationOutcome"),
        (status = 429, description = "Too many directory reads from this address (Retry-After); OperationOutcome rate-limited")))]
pub async fn read_organization(
    _public: Public,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    admit_public(&req).await?;
    let id = id.into_inner();
    let inst = state.db(move |conn| directory::get(conn, &id)).await?;
    let event = state
        .auditor
        .read_event(format!("Organization/{}", inst.id));
    record(&state, &req, event);
    Ok(fhir_ok(fhir::organization(&inst)))
}

/// Read one Endpoint (the institution's FHIR base URL).
#[utoipa::path(get, path = "/fhir/Endpoint/{id}", tag = "fhir",
    params(("id" = String, Path)),
    responses((status = 200, description = "FHIR Endpoint"), (status = 404, description = "OperationOutcome"),
        (status = 429, description = "Too many directory reads from this address (Retry-After); OperationOutcome rate-limited")))]
pub async fn read_endpoint(
    _public: Public,
    state: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    admit_public(&req).await?;
    let id = id.into_inner();
    let lookup = id.clone();
    let inst = state.db(move |conn| directory::get(conn, &lookup)).await?;
    let body = fhir::endpoint(&inst).ok_or_else(|| {
        ApiError::not_found(format!("institution {id} has no registered endpoint"))
    })?;
    let event = state.auditor.read_event(format!("Endpoint/{}", inst.id));
    record(&state, &req, event);
    Ok(fhir_ok(body))
}

/// Common filters of Organization and Endpoint searches.
fn filter_from(
    query: &HashMap<String, String>,
    count: i64,
    offset: i64,
) -> Result<InstitutionFilter, ApiError> {
    let mut filter = InstitutionFilter {
        limit: count + 1,
        offset,
        ..InstitutionFilter::default()
    };
    if let Some(name) = query.get("name") {
        filter.name_contains = Some(name.clone());
    }
    if let Some(active) = query.get("active") {
        filter.status = Some(match active.as_str() {
            "true" => InstitutionStatus::Active,
            "false" => InstitutionStatus::Suspended,
            _ => return Err(ApiError::invalid_param("active", "must be true or false")),
        });
    }
    if let Some(status) = query.get("status") {
        filter.status = Some(match status.as_str() {
            "active" => InstitutionStatus::Active,
            "suspended" => InstitutionStatus::Suspended,
            _ => {
                return Err(ApiError::invalid_param(
                    "status",
                    "must be active or suspended",
                ));
            }
        });
    }
    if let Some(kind) = query.get("type") {
        let code = kind.rsplit('|').next().unwrap_or_default();
        filter.kind = Some(
            InstitutionKind::parse(code).map_err(|e| ApiError::invalid_param("type", e.message))?,
        );
    }
    Ok(filter)
}

/// `identifier=system|value` against the USCC or the institution id.
enum IdentifierQuery {
    Uscc(String),
    Id(String),
}

fn identifier_query(raw: &str) -> Result<IdentifierQuery, ApiError> {
    match raw.split_once('|') {
        Some((fhir::USCC_SYSTEM, value)) | Some(("", value)) if !value.is_empty() => {
            Ok(IdentifierQuery::Uscc(value.to_string()))
        }
        Some((fhir::INSTITUTION_ID_SYSTEM, value)) if !value.is_empty() => {
            Ok(IdentifierQuery::Id(value.to_string()))
        }
        None if !raw.is_empty() => Ok(IdentifierQuery::Uscc(raw.to_string())),
        _ => Err(ApiError::invalid_param(
            "identifier",
            format!(
                "use {}|CODE or {}|ID",
                fhir::USCC_SYSTEM,
                fhir::INSTITUTION_ID_SYSTEM
            ),
        )),
    }
}

pub(crate) fn page_urls(
    state: &AppState,
    req: &HttpRequest,
    offset: i64,
    count: i64,
    more: bool,
) -> (String, Option<String>) {
    page_urls_at(state, req, offset, count, more.then_some(offset + count))
}

/// Self and next links when the next page starts at `next` (a search that read past
/// `offset + count` stored rows to fill its page).
pub(crate) fn page_urls_at(
    state: &AppState,
    req: &HttpRequest,
    offset: i64,
    count: i64,
    next: Option<i64>,
) -> (String, Option<String>) {
    let path = req.path();
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(req.query_string().as_bytes())
            .into_owned()
            .filter(|(k, _)| k != "_offset" && k != "_count")
            .collect();
    params.push(("_count".into(), count.to_string()));
    let build = |offset: i64| {
        let mut p = params.clone();
        p.push(("_offset".into(), offset.to_string()));
        let q: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(p)
            .finish();
        format!("{}{path}?{q}", state.base_url)
    };
    (build(offset), next.map(build))
}

async fn search(
    state: web::Data<AppState>,
    req: HttpRequest,
    query: HashMap<String, String>,
    known: &[&str],
    view: fn(&yiqiao_registry::directory::Institution) -> Option<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    admit_public(&req).await?;
    check_params(&query, known)?;
    let (count, offset) = paging(&query, 50, 500)?;
    let mut filter = filter_from(&query, count, offset)?;
    let by_id = match query
        .get("identifier")
        .or_else(|| query.get("organization"))
    {
        Some(raw) if query.contains_key("identifier") => match identifier_query(raw)? {
            IdentifierQuery::Uscc(code) => {
                filter.uscc = Some(code);
                None
            }
            IdentifierQuery::Id(id) => Some(id),
        },
        Some(raw) => Some(raw.trim_start_matches("Organization/").to_string()),
        None => None,
    };
    let mut found = state
        .db(move |conn| match by_id {
            Some(id) => match directory::get(conn, &id) {
                Ok(inst) => Ok(vec![inst]),
                Err(directory::DirectoryError::NotFound(_)) => Ok(vec![]),
                Err(e) => Err(e),
            },
            None => directory::list(conn, &filter),
        })
        .await?;
    let more = found.len() as i64 > count;
    found.truncate(count as usize);
    let resources: Vec<serde_json::Value> = found.iter().filter_map(view).collect();
    let (self_url, next) = page_urls(&state, &req, offset, count, more);
    let query_text = match req.query_string() {
        "" => req.path().to_string(),
        q => format!("{}?{q}", req.path()),
    };
    let event = state.auditor.search_event(query_text);
    record(&state, &req, event);
    Ok(fhir_ok(fhir::searchset(
        &state.base_url,
        &self_url,
        next,
        None,
        resources,
    )))
}

/// Search Organizations: name (contains), identifier, active, type; _count/_offset paging.
#[utoipa::path(get, path = "/fhir/Organization", tag = "fhir",
    params(
        ("name" = Option<String>, Query), ("identifier" = Option<String>, Query), ("active" = Option<bool>, Query),
        ("type" = Option<String>, Query, description = "Institution kind code"),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query),
    ),
    responses((status = 200, description = "searchset Bundle"), (status = 400, description = "OperationOutcome"),
        (status = 429, description = "Too many directory reads from this address (Retry-After); OperationOutcome rate-limited")))]
pub async fn search_organizations(
    _public: Public,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    search(
        state,
        req,
        query.into_inner(),
        &["name", "identifier", "active", "type", "_count", "_offset"],
        |i| Some(fhir::organization(i)),
    )
    .await
}

/// Search Endpoints: organization, status, name; _count/_offset paging.
#[utoipa::path(get, path = "/fhir/Endpoint", tag = "fhir",
    params(
        ("organization" = Option<String>, Query), ("status" = Option<String>, Query), ("name" = Option<String>, Query),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query),
    ),
    responses((status = 200, description = "searchset Bundle"), (status = 400, description = "OperationOutcome"),
        (status = 429, description = "Too many directory reads from this address (Retry-After); OperationOutcome rate-limited")))]
pub async fn search_endpoints(
    _public: Public,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    search(
        state,
        req,
        query.into_inner(),
        &["organization", "status", "name", "_count", "_offset"],
        fhir::endpoint,
    )
    .await
}
