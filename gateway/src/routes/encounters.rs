//! FHIR `Encounter` registration: care relationships — which institution treats which patient,
//! and when. The consent engine reads them (rule 6: an internet hospital sees a patient only
//! with a consent naming it or during an active encounter with it). A registered encounter is
//! not clinical content; the gateway serves it back only to the institution that registered it.
//!
//! - `POST /fhir/Encounter` (`system/Encounter.c`): the treating institution registers a visit,
//!   idempotent on its visit number (`identifier`). A POST that changes a registered visit
//!   needs `system/Encounter.u` as well.
//! - `PUT /fhir/Encounter/{id}` (`system/Encounter.u`): the new state of a registered visit
//!   (status, period, ...); `If-Match: W/"n"` honoured.
//! - `GET /fhir/Encounter/{id}` (`system/Encounter.r`): the registering institution reads it.
//!
//! `GET /fhir/Encounter?patient=` is NOT a search of these registrations: it is the federated
//! search that asks the hospitals for their clinical Encounters (crate::federation).
//!
//! The HL7 v2 feed (crate::mllp::adt, PV1 of A01/A04/A03/A11) maps to the same
//! [`map_encounter`] and store.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, NaiveDateTime, SubsecRound};
use serde_json::{Value, json};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::directory::Institution;
use yiqiao_registry::encounters::{
    self as store, EncounterClass, EncounterStatus, NewEncounter, Precondition, StoredEncounter,
    UpsertOutcome,
};

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::extract::{IfMatch, ValidJson};
use crate::fhir::{subject_identifier, text_at};
use crate::service::authz::{EncounterCreate, EncounterRead, EncounterUpdate, Facts, Need, Permit};
use crate::state::AppState;

/// Code system of `Encounter.class`.
pub const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(format!("Encounter.{field}"))
}

/// An instant with time zone (`2026-11-29T08:00:00+08:00`) → UTC, microseconds.
fn instant(v: &Value, field: &str, required: bool) -> Result<Option<NaiveDateTime>, ApiError> {
    let Some(raw) = v.get(field) else {
        return if required {
            Err(invalid(
                &format!("period.{field}"),
                format!("period.{field} (an instant with time zone) is required"),
            ))
        } else {
            Ok(None)
        };
    };
    raw.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map(|t| Some(t.naive_utc().trunc_subsecs(6)))
        .ok_or_else(|| {
            invalid(
                &format!("period.{field}"),
                format!(
                    "period.{field} must be an instant with time zone, e.g. 2026-11-29T08:00:00+08:00"
                ),
            )
        })
}

/// Check an Encounter sent by `institution` (its treating institution) and map it for the
/// store. The stored content is the resource without `id` and `meta`, `subject` without its
/// `reference` (the patient is named by identifier), and `serviceProvider` set to the caller.
pub fn map_encounter(institution: &Institution, body: &Value) -> Result<NewEncounter, ApiError> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Encounter") {
        return Err(invalid("resourceType", "resourceType must be Encounter"));
    }
    let own = institution.id.to_string();
    // The visit number: the first identifier with a value.
    let identifier = body
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find_map(|i| text_at(i, "value"))
        .ok_or_else(|| {
            invalid(
                "identifier",
                "identifier with a value (the institution's visit number) is required",
            )
        })?
        .to_string();
    let allowed: Vec<&str> = EncounterStatus::ALL.iter().map(|s| s.as_str()).collect();
    let status = text_at(body, "status")
        .and_then(EncounterStatus::parse)
        .ok_or_else(|| {
            invalid(
                "status",
                format!("status must be one of {}", allowed.join(", ")),
            )
        })?;
    let codes: Vec<&str> = EncounterClass::ALL.iter().map(|c| c.code()).collect();
    let class_field = body.get("class").ok_or_else(|| {
        invalid(
            "class",
            format!(
                "class is required (a coding of {ACT_CODE_SYSTEM}: {})",
                codes.join(", ")
            ),
        )
    })?;
    if let Some(system) = text_at(class_field, "system")
        && system != ACT_CODE_SYSTEM
    {
        return Err(invalid(
            "class.system",
            format!("class.system must be {ACT_CODE_SYSTEM}"),
        ));
    }
    let class = text_at(class_field, "code")
        .and_then(EncounterClass::parse)
        .ok_or_else(|| {
            invalid(
                "class.code",
                format!("class.code must be one of {}", codes.join(", ")),
            )
        })?;
    // Subject: the patient by the identifier this institution registered in the EMPI.
    let (patient_system, patient_value) =
        subject_identifier(body).map_err(|(field, message)| invalid(field, message))?;
    if patient_system != institution.patient_id_system {
        return Err(invalid(
            "subject.identifier.system",
            format!(
                "subject.identifier.system must be your patient identifier system {}",
                institution.patient_id_system
            ),
        ));
    }
    let period = body
        .get("period")
        .filter(|p| p.is_object())
        .ok_or_else(|| invalid("period", "period with start is required"))?;
    let period_start = instant(period, "start", true)?
        .ok_or_else(|| invalid("period.start", "period.start is required"))?;
    let period_end = instant(period, "end", false)?;
    // The treating institution is the caller.
    let reference = format!("Organization/{own}");
    if let Some(provider) = body.get("serviceProvider")
        && text_at(provider, "reference") != Some(reference.as_str())
    {
        return Err(invalid(
            "serviceProvider",
            format!("serviceProvider must be the calling institution ({reference}) or absent"),
        ));
    }
    let mut resource = body.clone();
    if let Some(obj) = resource.as_object_mut() {
        obj.remove("id");
        obj.remove("meta");
        obj.insert("serviceProvider".into(), json!({ "reference": reference }));
        if let Some(subject) = obj.get_mut("subject").and_then(Value::as_object_mut) {
            subject.remove("reference");
        }
    }
    Ok(NewEncounter {
        institution_id: own,
        identifier,
        patient_system,
        patient_value,
        status,
        class,
        period_start,
        period_end,
        resource,
    })
}

/// The Encounter as served: the stored content with registry id, meta and the subject's EMPI
/// source record.
pub fn encounter_view(e: &StoredEncounter) -> Value {
    let mut r = e.resource.clone();
    if !r.is_object() {
        r = json!({ "resourceType": "Encounter" });
    }
    r["id"] = json!(e.id);
    r["meta"] = json!({
        "versionId": e.version.to_string(),
        "lastUpdated": format!("{}Z", e.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
    });
    if let Some(subject) = r.get_mut("subject").and_then(Value::as_object_mut) {
        subject.insert(
            "reference".into(),
            json!(format!("Patient/{}", e.patient_record_id)),
        );
    }
    r
}

fn respond(state: &AppState, status: StatusCode, e: &StoredEncounter) -> HttpResponse {
    crate::routes::versioned_response(
        &state.base_url,
        status,
        ("Encounter", &e.id, e.version),
        encounter_view(e),
    )
}

/// Store a mapped encounter with its audit event (`create` or `update`), in one transaction.
async fn write(
    state: &AppState,
    caller: &Caller,
    new: NewEncounter,
    pre: Precondition,
) -> Result<(UpsertOutcome, StoredEncounter), ApiError> {
    let event = state
        .auditor
        .by_caller(state.auditor.rest_event("update", "U"), caller, None);
    state
        .auditor
        .change(event, move |tx, event| {
            crate::service::encounters::upsert_recorded(tx, event, &new, pre)
        })
        .await
}

/// Register a visit (care relationship) of the calling institution.
#[utoipa::path(post, path = "/fhir/Encounter", tag = "encounters",
    request_body(content = Object, description = "FHIR R4 Encounter: identifier (visit number), status, class (v3 ActCode AMB, IMP, EMER, VR), subject.identifier (your registered patient identifier), period.start, optional period.end, serviceProvider absent or the caller (docs/consent.md)"),
    responses((status = 201, description = "Registered; the Encounter with id and meta.versionId"),
        (status = 200, description = "Already registered: unchanged, or its new state recorded (needs system/Encounter.u)"),
        (status = 403, description = "Scope system/Encounter.c not granted, or a change without system/Encounter.u"),
        (status = 409, description = "The visit is registered for another patient"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<EncounterCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    // The visit is registered under the caller's own id (map_encounter).
    permit.settle(Facts::OWN, None)?;
    let new = map_encounter(&caller.institution, &body)?;
    let pre = if caller.allows("Encounter", 'u') {
        Precondition::None
    } else {
        Precondition::NoChange
    };
    let (outcome, stored) = write(&state, caller, new, pre).await?;
    let status = match outcome {
        UpsertOutcome::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    Ok(respond(&state, status, &stored))
}

/// A registered encounter of the caller, else not found (another institution's registration is
/// not revealed).
/// The refusal is recorded as `event`.
async fn own_encounter<N: Need>(
    state: &AppState,
    permit: &Permit<N>,
    id: String,
    event: yiqiao_registry::audit::AuditEvent,
) -> Result<StoredEncounter, ApiError> {
    let caller = permit.member()?;
    let stored = state.db(move |conn| store::get(conn, &id)).await?;
    let facts = Facts {
        custodian: stored.institution_id == caller.institution.id.as_str(),
        ..Facts::default()
    };
    permit.settle_audited(
        &state.auditor,
        facts,
        Some(&format!("Encounter/{} not found", stored.id)),
        event,
    )?;
    Ok(stored)
}

/// Record the new state of a registered visit (e.g. status finished and period.end).
#[utoipa::path(put, path = "/fhir/Encounter/{id}", tag = "encounters",
    params(("id" = String, Path), ("If-Match" = Option<String>, Header, description = "Expected version, e.g. W/\"1\"")),
    request_body(content = Object, description = "FHIR R4 Encounter; id (if present) equal to the path id, the same visit number"),
    responses((status = 200, description = "The current version (a new one when something changed)"),
        (status = 404, description = "No such encounter of the caller"),
        (status = 412, description = "If-Match names another version"),
        (status = 422, description = "OperationOutcome naming the field")),
    security(("access_token" = [])))]
pub async fn update(
    state: web::Data<AppState>,
    permit: Permit<EncounterUpdate>,
    id: web::Path<String>,
    if_match: IfMatch,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    let id = id.into_inner();
    let expected = if_match.checked()?;
    if let Some(body_id) = body.get("id")
        && body_id.as_str() != Some(id.as_str())
    {
        return Err(invalid(
            "id",
            format!("Encounter.id must equal the id in the URL ({id}) or be absent"),
        ));
    }
    let mut refused = state.auditor.rest_event("update", "U");
    refused
        .entities
        .push(EntityRef::resource(format!("Encounter/{id}")));
    let stored = own_encounter(&state, &permit, id, refused).await?;
    let new = map_encounter(&caller.institution, &body)?;
    if new.identifier != stored.identifier {
        return Err(invalid(
            "identifier",
            format!(
                "the visit number of Encounter/{} is {}; it cannot change (register another visit with POST)",
                stored.id, stored.identifier
            ),
        ));
    }
    let pre = expected.map_or(Precondition::None, Precondition::Version);
    let (_, stored) = write(&state, caller, new, pre).await?;
    Ok(respond(&state, StatusCode::OK, &stored))
}

/// Read a registered encounter (only the registering institution).
#[utoipa::path(get, path = "/fhir/Encounter/{id}", tag = "encounters",
    params(("id" = String, Path)),
    responses((status = 200, description = "Encounter"),
        (status = 404, description = "No such encounter of the caller")),
    security(("access_token" = [])))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<EncounterRead>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let id = id.into_inner();
    let refused = state.auditor.read_event(format!("Encounter/{id}"));
    let stored = own_encounter(&state, &permit, id, refused).await?;
    let event = state.auditor.read_event(format!("Encounter/{}", stored.id));
    state
        .auditor
        .record(
            state
                .auditor
                .by_caller(event, caller, stored.person_id.clone()),
        )
        .await?;
    Ok(respond(&state, StatusCode::OK, &stored))
}
