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
    let offset = match query.get("_offset") {
        None => 0,
        Some(raw) => raw
            .parse::<i64>()
            .ok()
            .filter(|n| (0..=MAX_OFFSET).contains(n))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "_offset",
                    format!("must be an integer from 0 to {MAX_OFFSET} (narrow the search to go further)"),
                )
            })?,
    };
    Ok((count, offset))
}

/// The deepest page a search may ask for: bounded so that `offset + count` (the next page,
/// the rows a page reads) never overflows, whatever a client sends.
pub const MAX_OFFSET: i64 = 10_000_000;

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

#[cfg(test)]
mod paging_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn offsets_are_bounded_so_next_pages_cannot_overflow() {
        let q = |o: &str| HashMap::from([("_offset".to_string(), o.to_string())]);
        assert_eq!(paging(&q("10000000"), 20, 200).unwrap(), (20, MAX_OFFSET));
        for bad in ["9223372036854775807", "10000001", "-1", "1e3", ""] {
            let e = paging(&q(bad), 20, 200).unwrap_err();
            assert!(e.to_string().contains("_offset"), "{bad}: {e}");
        }
    }
}
