//! The audit trail's search parameters: parsing them into a filter, resolving the patient
//! they name to an enterprise person, and the trimmed view a member's platform gets.

use actix_web::HttpRequest;
use chrono::{NaiveDate, NaiveDateTime};
use serde_json::{Value, json};
use yiqiao_registry::audit::EMPI_SYSTEM;
use yiqiao_registry::audit::query::{EventFilter, StoredEvent, TimeBound};
use yiqiao_registry::empi::store as empi;

use crate::error::ApiError;

pub(super) const SEARCH_PARAMS: [&str; 9] = [
    "patient", "agent", "entity", "date", "outcome", "purpose", "_count", "_id", "_cursor",
];

/// A parsed search: the filter without the patient (resolved against the EMPI later).
pub(super) struct Search {
    pub(super) filter: EventFilter,
    pub(super) patient: Option<String>,
    pub(super) count: i64,
    pub(super) params: Vec<(String, String)>,
}

pub(super) fn parse_time(name: &str, raw: &str) -> Result<Vec<TimeBound>, ApiError> {
    let (prefix, value) = match raw.get(..2) {
        Some(p @ ("eq" | "ge" | "gt" | "le" | "lt")) => (p, &raw[2..]),
        _ => ("eq", raw),
    };
    let bad = || {
        ApiError::invalid_param(
            name,
            "must be [eq|ge|gt|le|lt]YYYY-MM-DD or an RFC 3339 date-time (e.g. ge2026-11-01T00:00:00Z)",
        )
    };
    if let Ok(day) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        let start = day.and_hms_opt(0, 0, 0).ok_or_else(bad)?;
        let next = start + chrono::Duration::days(1);
        return Ok(match prefix {
            "eq" => vec![TimeBound::From(start), TimeBound::Before(next)],
            "ge" => vec![TimeBound::From(start)],
            "gt" => vec![TimeBound::From(next)],
            "le" => vec![TimeBound::Before(next)],
            _ => vec![TimeBound::Before(start)],
        });
    }
    let t: NaiveDateTime = chrono::DateTime::parse_from_rfc3339(value)
        .map_err(|_| bad())?
        .naive_utc();
    Ok(match prefix {
        "eq" => vec![TimeBound::From(t), TimeBound::Until(t)],
        "ge" => vec![TimeBound::From(t)],
        "gt" => vec![TimeBound::After(t)],
        "le" => vec![TimeBound::Until(t)],
        _ => vec![TimeBound::Before(t)],
    })
}

/// `Organization/x`, `system|x` or `x` → `x`.
pub(super) fn reference_value(raw: &str) -> String {
    if let Some((_, v)) = raw.split_once('|') {
        return v.to_string();
    }
    match raw.split_once('/') {
        Some((_, v)) if !v.is_empty() => v.to_string(),
        _ => raw.to_string(),
    }
}

pub(super) fn parse_search(req: &HttpRequest) -> Result<Search, ApiError> {
    let params: Vec<(String, String)> = url::form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect();
    let mut filter = EventFilter::default();
    let mut patient = None;
    let mut count = 50;
    let mut seen = std::collections::BTreeSet::new();
    for (name, value) in &params {
        if !SEARCH_PARAMS.contains(&name.as_str()) {
            return Err(ApiError::invalid_param(
                name,
                format!("unknown parameter; supported: {}", SEARCH_PARAMS.join(", ")),
            ));
        }
        if name != "date" && !seen.insert(name.clone()) {
            return Err(ApiError::invalid_param(name, "may be given only once"));
        }
        if value.trim().is_empty() {
            return Err(ApiError::invalid_param(name, "must not be empty"));
        }
        match name.as_str() {
            "patient" => patient = Some(value.clone()),
            "agent" => filter.agent = Some(reference_value(value)),
            "entity" => {
                if !value.contains('/') {
                    return Err(ApiError::invalid_param(
                        "entity",
                        "must be a reference such as Patient/123 or Organization/hosp-001",
                    ));
                }
                filter.entity = Some(value.clone());
            }
            "date" => filter.time.extend(parse_time("date", value)?),
            "outcome" => {
                if !["0", "4", "8", "12"].contains(&value.as_str()) {
                    return Err(ApiError::invalid_param("outcome", "must be 0, 4, 8 or 12"));
                }
                filter.outcome = Some(value.clone());
            }
            "purpose" => {
                let code = value.rsplit('|').next().unwrap_or(value);
                if yiqiao_consent::Purpose::from_code(code).is_none() {
                    return Err(ApiError::invalid_param(
                        "purpose",
                        "must be a purpose of use code: TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH, PATRQT",
                    ));
                }
                filter.purpose = Some(code.to_string());
            }
            "_count" => {
                count = value
                    .parse::<i64>()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid_param("_count", "must be an integer from 1 to 500")
                    })?;
            }
            "_id" => filter.event_id = Some(value.clone()),
            _ => {
                filter.before_seq = Some(value.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(
                    || ApiError::invalid_param("_cursor", "must be the value from a next link"),
                )?);
            }
        }
    }
    filter.limit = count + 1;
    Ok(Search {
        filter,
        patient,
        count,
        params,
    })
}

/// The enterprise person a `patient` parameter names: `Patient/<source record id>` (resolved
/// through the EMPI), `<empi system>|<id>` or a bare enterprise id. `None`: no such patient.
pub(super) fn resolve_patient(
    conn: &mut yiqiao_registry::store::DbConn,
    raw: &str,
) -> Result<Option<String>, ApiError> {
    if let Some(record) = raw.strip_prefix("Patient/") {
        return match empi::get_record(conn, record) {
            Ok(r) => Ok(r.link.map(|l| l.person_id)),
            Err(empi::EmpiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e.into()),
        };
    }
    match raw.split_once('|') {
        Some((system, value)) if system == EMPI_SYSTEM => Ok(Some(value.to_string())),
        Some(_) => Err(ApiError::invalid_param(
            "patient",
            format!("must be Patient/<id>, {EMPI_SYSTEM}|<enterprise id> or an enterprise id"),
        )),
        None => Ok(Some(raw.to_string())),
    }
}

/// The "who accessed my records" view of an event: accessing institution, purpose of use,
/// time, action and outcome; no user, role, address, query text, replica or request id.
pub(super) fn trimmed(e: &StoredEvent) -> Value {
    let stored: Value = serde_json::from_str(&e.resource).unwrap_or(Value::Null);
    let requestor = &stored["agent"][0];
    let mut agent = json!({
        "requestor": true,
        "type": requestor["type"],
        "who": requestor["who"],
    });
    if !requestor["purposeOfUse"].is_null() {
        agent["purposeOfUse"] = requestor["purposeOfUse"].clone();
    }
    let mut v = json!({
        "resourceType": "AuditEvent",
        "id": e.event_id,
        "type": stored["type"],
        "subtype": stored["subtype"],
        "action": stored["action"],
        "recorded": stored["recorded"],
        "outcome": stored["outcome"],
        "agent": [agent],
        "source": {"observer": {"display": "Yiqiao regional gateway"}},
    });
    if let Some(p) = &e.patient_id {
        v["entity"] = json!([{
            "what": {"identifier": {"system": EMPI_SYSTEM, "value": p}},
            "role": {"system": yiqiao_registry::audit::OBJECT_ROLE_SYSTEM, "code": "1"},
        }]);
    }
    v
}
