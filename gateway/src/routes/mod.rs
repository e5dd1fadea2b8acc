//! HTTP routes: one module per resource; the route table is in [`crate::app::routes`].

pub mod auditing;
pub mod consent;
pub mod directory;
pub mod docs;
pub mod documents;
pub mod empi;
pub mod encounters;
pub mod institutions;
pub mod metadata;
pub mod ops;
pub mod patients;
pub mod practitioners;
pub mod subscriptions;

use std::collections::HashMap;

use crate::error::ApiError;

/// Reject query parameters a handler does not know (a typo must not silently widen a search).
pub fn check_params(query: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    let mut unknown: Vec<&str> = query
        .keys()
        .map(String::as_str)
        .filter(|k| !known.contains(k))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(first) => Err(ApiError::invalid_param(
            first,
            format!("unknown parameter; supported: {}", known.join(", ")),
        )),
    }
}

/// `_count` (1..=max, default) and `_offset` (≥ 0) paging parameters.
pub fn paging(
    query: &HashMap<String, String>,
    default: i64,
    max: i64,
) -> Result<(i64, i64), ApiError> {
    let count = match query.get("_count") {
        None => default,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_param("_count", format!("must be an integer from 1 to {max}"))
            })?,
    };
    let offset =
        match query.get("_offset") {
            None => 0,
            Some(raw) => raw.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::invalid_param("_offset", "must be a non-negative integer")
            })?,
        };
    Ok((count, offset))
}

/// A stored FHIR resource as an answer: `ETag: W/"<version>"` and, for 201 Created,
/// `Location: <base>/fhir/<type>/<id>`.
pub(crate) fn versioned_response(
    base_url: &str,
    status: actix_web::http::StatusCode,
    (resource_type, id, version): (&str, &str, i64),
    body: serde_json::Value,
) -> actix_web::HttpResponse {
    use actix_web::http::header::{ETAG, HeaderValue, LOCATION};
    let mut resp = actix_web::HttpResponse::build(status)
        .content_type(crate::fhir::FHIR_JSON)
        .json(body);
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        resp.headers_mut().insert(ETAG, v);
    }
    if status == actix_web::http::StatusCode::CREATED
        && let Ok(v) = HeaderValue::from_str(&format!("{base_url}/fhir/{resource_type}/{id}"))
    {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

/// One resource read through the consent policy: released (masked) or refused with
/// `403 consent-denied` naming the rule; either way audited as a read of `what` with the
/// decision, before the answer.
pub(crate) async fn release_read(
    state: &crate::state::AppState,
    caller: &crate::auth::Caller,
    req: &actix_web::HttpRequest,
    what: String,
    candidate: crate::policy::Candidate,
) -> Result<serde_json::Value, ApiError> {
    let patient = candidate.patient.clone();
    let ask = state.policy.ask(caller, req);
    let mut released = state.policy.release(caller, &ask, vec![candidate]).await?;
    let mut event = state.auditor.read_event(what);
    released.annotate(&mut event);
    if released.kept.is_empty() {
        event.outcome = yiqiao_registry::audit::outcome::MINOR_FAILURE.into();
    }
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, patient))
        .await?;
    match released.kept.pop() {
        Some((_, resource)) => Ok(resource),
        None => Err(released.refusal()),
    }
}
