//! FHIR `Practitioner`: the staff roster of each member institution (the people who use its
//! systems), so the gateway knows who the end user named with `X-Yiqiao-User` is. Used by the
//! anomaly rule `same-surname-address` (docs/audit.md); served back only to the registering
//! institution.
//!
//! - `PUT /fhir/Practitioner?identifier=<system>|<staff number>` (`system/Practitioner.u`,
//!   plus `.c` when the entry does not exist yet): FHIR R4 conditional update — updates the
//!   entry with that identifier, or creates it when there is none (201). The way to keep a
//!   roster in step with the HIS: idempotent, a repeat with the same content stores nothing.
//! - `POST /fhir/Practitioner` (`system/Practitioner.c`): create, idempotent on the staff
//!   number (a repeat answers 200 with the registered entry); a POST that would change a
//!   registered entry needs `system/Practitioner.u` as well.
//! - `GET /fhir/Practitioner/{id}` (`.r`), `GET /fhir/Practitioner?identifier=` (`.s`; without
//!   `identifier` the caller's whole roster, paged with `_count`/`_offset`).
//!
//! The identifier system is the institution's practitioner namespace
//! `https://yiqiao.health/fhir/sid/practitioner/<institution id>` (the staff number is the
//! value; the same value goes into `X-Yiqiao-User`). Every change is committed with its audit
//! record in one transaction (`Auditor::change`); reads and searches are audited.

use std::collections::HashMap;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::directory::Institution;
use yiqiao_registry::practitioners::{
    self as store, Allowed, NewPractitioner, StoredPractitioner, UpsertOutcome, identifier_system,
};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::fhir;
use crate::routes::{check_params, paging};
use crate::service::authz::{
    Facts, Permit, PractitionerCreate, PractitionerRead, PractitionerSearch, PractitionerUpdate,
};
use crate::state::AppState;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(format!("Practitioner.{field}"))
}

/// The address that counts for the roster: `use` home, else the first that is not `work` or
/// `old` (a workplace is not where someone lives).
fn home_address(body: &Value) -> Option<String> {
    let addresses = body.get("address").and_then(Value::as_array)?;
    fn use_of(a: &Value) -> &str {
        a.get("use").and_then(Value::as_str).unwrap_or("")
    }
    addresses
        .iter()
        .find(|a| use_of(a) == "home")
        .or_else(|| {
            addresses
                .iter()
                .find(|a| !matches!(use_of(a), "work" | "old"))
        })
        .and_then(fhir::address_line)
}

/// Check a Practitioner sent by `institution` and map it for the roster. The stored content is
/// the resource without `id` and `meta`.
pub fn map_practitioner(
    institution: &Institution,
    body: &Value,
) -> Result<NewPractitioner, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Practitioner") {
        return Err(invalid("resourceType", "resourceType must be Practitioner"));
    }
    let system = identifier_system(institution.id.as_str());
    let identifier = body
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system.as_str()))
        .and_then(|i| i.get("value").and_then(Value::as_str))
        .ok_or_else(|| {
            invalid(
                "identifier",
                format!(
                    "the Practitioner must carry an identifier with your practitioner system {system} (value: the staff number your systems send in X-Yiqiao-User)"
                ),
            )
        })?
        .to_string();
    let name = fhir::human_name(body);
    let mut resource = body.clone();
    if let Some(obj) = resource.as_object_mut() {
        obj.remove("id");
        obj.remove("meta");
    }
    Ok(NewPractitioner {
        institution_id: institution.id.to_string(),
        identifier,
        family: name.family,
        given: name.given,
        address: home_address(body),
        resource,
    })
}

/// The Practitioner as served: the stored content with registry id and meta.
pub fn practitioner_view(p: &StoredPractitioner) -> Value {
    let mut r = p.resource.clone();
    if !r.is_object() {
        r = json!({ "resourceType": "Practitioner" });
    }
    r["id"] = json!(p.id);
    r["meta"] = json!({
        "versionId": p.version.to_string(),
        "lastUpdated": format!("{}Z", p.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
    });
    r
}

fn respond(state: &AppState, status: StatusCode, p: &StoredPractitioner) -> HttpResponse {
    crate::routes::versioned_response(
        &state.base_url,
        status,
        ("Practitioner", &p.id, p.version),
        practitioner_view(p),
    )
}

/// Store a mapped entry and its audit record (`create` or `update`) in one transaction.
async fn write(
    state: &AppState,
    caller: &Caller,
    new: NewPractitioner,
) -> Result<HttpResponse, ApiError> {
    let allowed = Allowed {
        create: caller.allows("Practitioner", 'c'),
        change: caller.allows("Practitioner", 'u'),
    };
    let mut event = state.auditor.rest_event("update", "U");
    event.entities.push(EntityRef::query(format!(
        "Practitioner?identifier={}|{}",
        identifier_system(&new.institution_id),
        new.identifier
    )));
    let event = state.auditor.by_caller(event, caller, None);
    let (outcome, stored) = state
        .auditor
        .change(event, move |conn, event| {
            let (outcome, stored) = store::upsert(conn, &new, allowed)?;
            if outcome == UpsertOutcome::Created {
                event.subtype_code = "create".into();
                event.action = "C".into();
            }
            event.entities = vec![EntityRef::resource(format!(
                "Practitioner/{}/_history/{}",
                stored.id, stored.version
            ))];
            Ok((outcome, stored))
        })
        .await?;
    let status = match outcome {
        UpsertOutcome::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    Ok(respond(state, status, &stored))
}

/// Register a practitioner of the calling institution (idempotent on the staff number).
#[utoipa::path(post, path = "/fhir/Practitioner", tag = "roster",
    request_body(content = Object, description = "FHIR R4 Practitioner: identifier with system https://yiqiao.health/fhir/sid/practitioner/<your institution id> (value: the staff number sent in X-Yiqiao-User), name (family, given or a Han text), address (home, else the first not work/old). docs/hospital-contract.md"),
    responses((status = 201, description = "Registered; the Practitioner with id and meta.versionId"),
        (status = 200, description = "Already registered: unchanged, or updated (needs system/Practitioner.u)"),
        (status = 403, description = "Scope system/Practitioner.c not granted, or a change without system/Practitioner.u"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<PractitionerCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    // A member's roster is its own by construction (its practitioner system).
    permit.settle(Facts::OWN, None)?;
    let new = map_practitioner(&caller.institution, &body)?;
    write(&state, caller, new).await
}

/// `identifier=system|value` of the caller's own practitioner system → the staff number.
fn own_identifier(caller: &Caller, raw: &str) -> Result<String, ApiError> {
    let system = identifier_system(caller.institution.id.as_str());
    let value = match raw.split_once('|') {
        Some((s, v)) if s == system || s.is_empty() => v,
        None => raw,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "identifier",
                format!("only your own roster can be used: the system is {system}"),
            ));
        }
    };
    if value.is_empty() {
        return Err(ApiError::invalid_param("identifier", "the value is empty"));
    }
    Ok(value.to_string())
}

/// Conditional update `PUT /fhir/Practitioner?identifier=system|value`: update the entry with
/// that identifier or create it.
#[utoipa::path(put, path = "/fhir/Practitioner", tag = "roster",
    params(("identifier" = String, Query, description = "https://yiqiao.health/fhir/sid/practitioner/<your institution id>|<staff number>")),
    request_body(content = Object, description = "FHIR R4 Practitioner carrying the same identifier"),
    responses((status = 200, description = "Updated (or unchanged)"),
        (status = 201, description = "Created (needs system/Practitioner.c as well)"),
        (status = 400, description = "identifier missing or not your practitioner system"),
        (status = 403, description = "Scope not granted"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn conditional_update(
    state: web::Data<AppState>,
    permit: Permit<PractitionerUpdate>,
    query: web::Query<HashMap<String, String>>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    permit.settle(Facts::OWN, None)?;
    check_params(&query, &["identifier"])?;
    let raw = query.get("identifier").ok_or_else(|| {
        ApiError::invalid_param(
            "identifier",
            "system|value is required (conditional update)",
        )
    })?;
    let value = own_identifier(caller, raw)?;
    let new = map_practitioner(&caller.institution, &body)?;
    if new.identifier != value {
        return Err(invalid(
            "identifier",
            "the identifier in the body differs from the one in the URL",
        ));
    }
    write(&state, caller, new).await
}

/// Read a roster entry (only the registering institution).
#[utoipa::path(get, path = "/fhir/Practitioner/{id}", tag = "roster",
    params(("id" = String, Path)),
    responses((status = 200, description = "Practitioner"),
        (status = 404, description = "No such practitioner of the caller")),
    security(("access_token" = [])))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<PractitionerRead>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let id = id.into_inner();
    let stored = state.db(move |conn| store::get(conn, &id)).await?;
    let reference = format!("Practitioner/{}", stored.id);
    permit.settle_audited(
        &state.auditor,
        Facts {
            custodian: stored.institution_id == caller.institution.id.as_str(),
            ..Facts::default()
        },
        Some(&format!("{reference} not found")),
        state.auditor.read_event(reference.clone()),
    )?;
    let event = state.auditor.read_event(reference);
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, None))
        .await?;
    Ok(respond(&state, StatusCode::OK, &stored))
}

/// Search the caller's roster: by `identifier`, or all of it (paged).
#[utoipa::path(get, path = "/fhir/Practitioner", tag = "roster",
    params(("identifier" = Option<String>, Query, description = "[system|]staff number (your practitioner system)"),
        ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query)),
    responses((status = 200, description = "searchset Bundle of the caller's Practitioners"),
        (status = 400, description = "Unknown parameter, or another institution's system")),
    security(("access_token" = [])))]
pub async fn search(
    state: web::Data<AppState>,
    permit: Permit<PractitionerSearch>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    permit.settle(Facts::OWN, None)?;
    check_params(&query, &["identifier", "_count", "_offset"])?;
    let (count, offset) = paging(&query, 50, 500)?;
    let identifier = query
        .get("identifier")
        .map(|raw| own_identifier(caller, raw))
        .transpose()?;
    let institution = caller.institution.id.to_string();
    let mut found = state
        .db(move |conn| match identifier {
            Some(value) => Ok(store::find(conn, &institution, &value)?
                .into_iter()
                .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                .collect()),
            None => store::list(conn, &institution, count + 1, offset),
        })
        .await?;
    let more = found.len() as i64 > count;
    found.truncate(usize::try_from(count).unwrap_or(usize::MAX));
    let query_text = match req.query_string() {
        "" => req.path().to_string(),
        q => format!("{}?{q}", req.path()),
    };
    let event = state.auditor.search_event(query_text);
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, None))
        .await?;
    let (self_url, next) = crate::routes::directory::page_urls(&state, &req, offset, count, more);
    let resources = found.iter().map(practitioner_view).collect();
    let bundle = fhir::searchset(&state.base_url, &self_url, next, None, resources);
    Ok(HttpResponse::Ok()
        .content_type(fhir::FHIR_JSON)
        .json(bundle))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn home_address_prefers_home_and_skips_work() {
        let body = json!({ "address": [
            { "use": "work", "text": "福州市鼓楼区 第一人民医院" },
            { "use": "home", "city": "福州市", "district": "鼓楼区", "line": ["五四路88号", "301室"] },
        ]});
        assert_eq!(
            home_address(&body).as_deref(),
            Some("福州市鼓楼区五四路88号301室")
        );
        let only_work = json!({ "address": [{ "use": "work", "text": "医院" }] });
        assert_eq!(home_address(&only_work), None);
        let unlabelled = json!({ "address": [{ "text": "台江区八一七中路1号" }] });
        assert_eq!(
            home_address(&unlabelled).as_deref(),
            Some("台江区八一七中路1号")
        );
    }
}
