//! FHIR `Patient` of the EMPI: the registration feed (create, conditional update), read,
//! PDQm search, PIXm `$ihe-pix` and `$match`.
//!
//! Returned Patients are SOURCE records (what one institution registered, `id` = source
//! record id), each with the extension [`ENTERPRISE_PERSON_EXT`] naming its enterprise
//! person. The golden record of a person is served by `/empi/persons/{id}`.

use std::collections::{BTreeSet, HashMap};

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::NaiveDate;
use serde_json::{Value, json};
use yiqiao_registry::empi::fs::Decision;
use yiqiao_registry::empi::ident::{IdentifierKind, Sex, normalise_phone, parse_resident_id};
use yiqiao_registry::empi::record::{Identifier, RecordId, SourceRecord};
use yiqiao_registry::empi::store::{
    self as empi, RecordFilter, Registration, RegistrationOutcome, ScoredCandidate, StoredRecord,
};

use crate::error::{ApiError, ErrorCode};
use crate::extract::ValidJson;
use crate::fhir;
use crate::policy::Candidate;
use crate::routes::{check_params, paging};
use crate::service::{
    self,
    authz::{Need, PatientCreate, PatientRead, PatientSearch, PatientUpdate, Permit},
};
use crate::state::AppState;

/// Extension on a Patient naming its enterprise person (valueIdentifier in [`EMPI_SYSTEM`]).
pub const ENTERPRISE_PERSON_EXT: &str =
    "https://yiqiao.health/fhir/StructureDefinition/enterprise-person";
/// Identifier system of enterprise person ids.
pub const EMPI_SYSTEM: &str = "https://yiqiao.health/fhir/sid/empi";
/// Match grade extension of `Bundle.entry.search` ($match).
pub const MATCH_GRADE_EXT: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";
/// Per-field explanation of a `$match` score (one sub-extension per compared field).
pub const MATCH_EXPLANATION_EXT: &str =
    "https://yiqiao.health/fhir/StructureDefinition/match-explanation";

fn fhir_response(status: actix_web::http::StatusCode, body: Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(fhir::FHIR_JSON)
        .json(body)
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(field)
}

/// Demographics of a FHIR Patient, mapped for matching.
struct MappedPatient {
    record: SourceRecord,
    family: String,
    given: String,
}

/// Map a FHIR Patient to a source record. `institution` namespaces record numbers.
fn map_patient(
    patient: &Value,
    institution: &str,
    institution_system: Option<&str>,
    resident_system: &str,
) -> Result<MappedPatient, ApiError> {
    if patient.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return Err(invalid(
            "Patient.resourceType",
            "resourceType must be Patient",
        ));
    }
    let fhir::NameParts {
        family,
        given,
        full,
    } = fhir::human_name(patient);
    if full.is_empty() {
        return Err(invalid(
            "Patient.name",
            "a name (text, or family and given) is required",
        ));
    }
    let sex = match patient.get("gender").map(|g| g.as_str()) {
        None => None,
        Some(Some("male")) => Some(Sex::Male),
        Some(Some("female")) => Some(Sex::Female),
        Some(Some("other" | "unknown")) => None,
        _ => {
            return Err(invalid(
                "Patient.gender",
                "gender must be male, female, other or unknown",
            ));
        }
    };
    let birth_date = match patient.get("birthDate") {
        None => None,
        Some(v) => {
            let raw = v
                .as_str()
                .ok_or_else(|| invalid("Patient.birthDate", "birthDate must be a string"))?;
            match raw.len() {
                // Partial dates (year, year-month) are kept in the resource, not matched on.
                4 | 7
                    if raw
                        .get(..4)
                        .is_some_and(|y| y.bytes().all(|b| b.is_ascii_digit())) =>
                {
                    None
                }
                _ => Some(NaiveDate::parse_from_str(raw, "%Y-%m-%d").map_err(|_| {
                    invalid(
                        "Patient.birthDate",
                        "birthDate must be YYYY, YYYY-MM or YYYY-MM-DD",
                    )
                })?),
            }
        }
    };
    let mut identifiers = Vec::new();
    for (i, ident) in patient
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let system = ident.get("system").and_then(Value::as_str).unwrap_or("");
        let value = ident.get("value").and_then(Value::as_str).unwrap_or("");
        if value.trim().is_empty() {
            return Err(invalid(
                &format!("Patient.identifier[{i}].value"),
                "an identifier needs a value",
            ));
        }
        if system == resident_system {
            identifiers.push(Identifier {
                kind: IdentifierKind::ResidentId,
                value: value.to_string(),
            });
        } else if Some(system) == institution_system {
            identifiers.push(Identifier {
                kind: IdentifierKind::InstitutionRecord,
                value: value.to_string(),
            });
        }
    }
    for t in patient
        .get("telecom")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if t.get("system").and_then(Value::as_str) == Some("phone")
            && let Some(v) = t.get("value").and_then(Value::as_str)
        {
            identifiers.push(Identifier {
                kind: IdentifierKind::Phone,
                value: v.to_string(),
            });
        }
    }
    let address = patient
        .get("address")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(fhir::address_line);
    Ok(MappedPatient {
        record: SourceRecord {
            record_id: RecordId(0),
            institution: institution.to_string(),
            name: full,
            sex,
            birth_date,
            identifiers,
            address,
        },
        family,
        given,
    })
}

/// The caller's own identifier on the Patient (its registered `patient_id_system`).
fn own_identifier(patient: &Value, system: &str) -> Result<String, ApiError> {
    patient
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system))
        .and_then(|i| i.get("value").and_then(Value::as_str))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            invalid(
                "Patient.identifier",
                format!("the Patient must carry an identifier with your system {system}"),
            )
        })
}

/// The Patient as served: the stored resource with id, meta and the person extension.
pub fn patient_view(r: &StoredRecord) -> Value {
    let mut p = r.resource.clone();
    if !p.is_object() {
        p = json!({ "resourceType": "Patient" });
    }
    p["id"] = json!(r.id);
    // Security labels the institution set are kept: the consent policy decides on them.
    let security = p.pointer("/meta/security").cloned();
    p["meta"] = json!({
        "versionId": r.version.to_string(),
        "lastUpdated": format!("{}Z", r.updated_at.format("%Y-%m-%dT%H:%M:%S%.6f")),
    });
    if let Some(security) = security {
        p["meta"]["security"] = security;
    }
    let mut ext: Vec<Value> = p
        .get("extension")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ext.retain(|e| e.get("url").and_then(Value::as_str) != Some(ENTERPRISE_PERSON_EXT));
    if let Some(link) = &r.link {
        ext.push(json!({
            "url": ENTERPRISE_PERSON_EXT,
            "valueIdentifier": { "system": EMPI_SYSTEM, "value": link.person_id },
        }));
    }
    p["extension"] = json!(ext);
    p
}

/// A stored record as a policy candidate (custodian = the registering institution).
fn candidate(r: &StoredRecord) -> Candidate {
    Candidate {
        custodian: r.institution_id.clone(),
        patient: r.link.as_ref().map(|l| l.person_id.clone()),
        resource: patient_view(r),
    }
}

/// The EMPI registration of a FHIR Patient sent by `institution` (identifier in `system`):
/// the same mapping `POST /fhir/Patient` applies, for loaders such as the demo and the simulator.
pub(crate) fn registration_of(
    patient: &Value,
    institution: &str,
    system: &str,
    resident_system: &str,
) -> Result<Registration, ApiError> {
    let value = own_identifier(patient, system)?;
    let mapped = map_patient(patient, institution, Some(system), resident_system)?;
    Ok(Registration {
        institution_id: institution.to_string(),
        id_system: system.to_string(),
        id_value: value,
        record: mapped.record,
        family: mapped.family,
        given: mapped.given,
        resource: patient.clone(),
    })
}

/// The registration of a FHIR Patient sent by `institution` (FHIR feed, HL7 v2 feed, bulk
/// import): its own identifier (`expected`, when the entry point names it separately, must be
/// the same) and the mapped demographics. Errors name the offending Patient field.
pub fn registration(
    institution: &yiqiao_registry::directory::Institution,
    patient: Value,
    expected: Option<(&str, &str)>,
    resident_system: &str,
) -> Result<Registration, ApiError> {
    // The FHIR feed's body was checked by `ValidJson`; the HL7 v2 feed and the bulk import
    // build theirs (crate::sanitize).
    crate::sanitize::check_json_value(&patient)?;
    let system = institution.patient_id_system.clone();
    let value = own_identifier(&patient, &system)?;
    if let Some((qs, qv)) = expected
        && (qs != system || qv != value)
    {
        return Err(invalid(
            "Patient.identifier",
            "the identifier in the body differs from the one in the URL",
        ));
    }
    let id = institution.id.to_string();
    let mapped = map_patient(&patient, &id, Some(&system), resident_system)?;
    Ok(Registration {
        institution_id: id,
        id_system: system,
        id_value: value,
        record: mapped.record,
        family: mapped.family,
        given: mapped.given,
        resource: patient,
    })
}

async fn register_patient<N: Need>(
    state: web::Data<AppState>,
    permit: Permit<N>,
    patient: Value,
    expected: Option<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let template = permit.actor.attribute(
        &state.auditor,
        state.auditor.rest_event("create", "C"),
        None,
    );
    let done = service::patients::register(&state, &permit, patient, expected, None, template)
        .await?
        .patient;
    let status = match done.outcome {
        RegistrationOutcome::Created => actix_web::http::StatusCode::CREATED,
        _ => actix_web::http::StatusCode::OK,
    };
    let location = format!("{}/fhir/Patient/{}", state.base_url, done.record.id);
    let mut resp = fhir_response(status, patient_view(&done.record));
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&format!("W/\"{}\"", done.record.version)) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    Ok(resp)
}

/// Register a patient (idempotent on the institution's identifier).
#[utoipa::path(post, path = "/fhir/Patient", tag = "empi",
    request_body(content = Object, description = "FHIR Patient carrying the caller's patient_id_system identifier"),
    responses((status = 201, description = "Registered; Patient with the enterprise-person extension"),
        (status = 200, description = "Already registered (unchanged or updated)"),
        (status = 422, description = "OperationOutcome naming the field")))]
pub async fn create(
    state: web::Data<AppState>,
    permit: Permit<PatientCreate>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    register_patient(state, permit, body, None).await
}

fn split_token(raw: &str) -> (Option<String>, String) {
    match raw.split_once('|') {
        Some((s, v)) if !s.is_empty() => (Some(s.to_string()), v.to_string()),
        Some((_, v)) => (None, v.to_string()),
        None => (None, raw.to_string()),
    }
}

/// Conditional update `PUT /fhir/Patient?identifier=system|value`.
#[utoipa::path(put, path = "/fhir/Patient", tag = "empi",
    params(("identifier" = String, Query, description = "system|value of the caller's identifier")),
    request_body(content = Object, description = "FHIR Patient"),
    responses((status = 200, description = "Updated (or unchanged)"), (status = 201, description = "Created"),
        (status = 422, description = "OperationOutcome naming the field")))]
pub async fn conditional_update(
    state: web::Data<AppState>,
    permit: Permit<PatientUpdate>,
    query: web::Query<HashMap<String, String>>,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    check_params(&query, &["identifier"])?;
    let raw = query
        .get("identifier")
        .ok_or_else(|| ApiError::invalid_param("identifier", "system|value is required"))?;
    let (system, value) = split_token(raw);
    let system =
        system.ok_or_else(|| ApiError::invalid_param("identifier", "must be system|value"))?;
    let own_system = permit
        .actor
        .member()
        .map(|c| c.institution.patient_id_system.as_str());
    if own_system != Some(system.as_str()) {
        return Err(ApiError::invalid_param(
            "identifier",
            "only your own patient_id_system can be updated",
        ));
    }
    register_patient(state, permit, body, Some((system, value))).await
}

/// Read one source record.
#[utoipa::path(get, path = "/fhir/Patient/{id}", tag = "empi",
    params(("id" = String, Path)),
    responses((status = 200, description = "FHIR Patient"), (status = 404, description = "OperationOutcome")))]
pub async fn read(
    state: web::Data<AppState>,
    permit: Permit<PatientRead>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let id = id.into_inner();
    let r = state.db(move |conn| empi::get_record(conn, &id)).await?;
    let candidate = Candidate {
        custodian: r.institution_id.clone(),
        patient: r.link.as_ref().map(|l| l.person_id.clone()),
        resource: patient_view(&r),
    };
    let resource =
        crate::routes::release_read(&state, caller, &req, format!("Patient/{}", r.id), candidate)
            .await?;
    Ok(fhir_response(actix_web::http::StatusCode::OK, resource))
}

/// The parameters PDQm search takes (also what the search-parameter fuzz target checks against).
pub const SEARCH_PARAMS: [&str; 9] = [
    "family",
    "given",
    "name",
    "birthdate",
    "gender",
    "identifier",
    "telecom",
    "_count",
    "_offset",
];

/// PDQm search over source records.
#[utoipa::path(get, path = "/fhir/Patient", tag = "empi",
    params(("family" = Option<String>, Query), ("given" = Option<String>, Query),
        ("name" = Option<String>, Query, description = "Han characters or pinyin, substring"),
        ("birthdate" = Option<String>, Query, description = "YYYY-MM-DD"),
        ("gender" = Option<String>, Query), ("identifier" = Option<String>, Query, description = "[system|]value"),
        ("telecom" = Option<String>, Query), ("_count" = Option<i64>, Query), ("_offset" = Option<i64>, Query)),
    responses((status = 200, description = "searchset Bundle of source-record Patients")))]
pub async fn search(
    state: web::Data<AppState>,
    permit: Permit<PatientSearch>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    check_params(&query, &SEARCH_PARAMS)?;
    // A search must say whom it looks for: no listing the region's patients page by page.
    const IDENTIFYING: [&str; 6] = [
        "family",
        "given",
        "name",
        "birthdate",
        "identifier",
        "telecom",
    ];
    if !IDENTIFYING
        .iter()
        .any(|p| query.get(*p).is_some_and(|v| !v.trim().is_empty()))
    {
        return Err(ApiError::invalid_param(
            "family",
            format!(
                "a patient search needs at least one demographic criterion: {}",
                IDENTIFYING.join(", ")
            ),
        ));
    }
    let (count, offset) = paging(&query, 20, 200)?;
    let mut f = RecordFilter {
        limit: count + 1,
        offset,
        family: query.get("family").cloned(),
        given: query.get("given").cloned(),
        name: query.get("name").cloned(),
        ..RecordFilter::default()
    };
    if let Some(d) = query.get("birthdate") {
        let d = d.strip_prefix("eq").unwrap_or(d);
        f.birth_date = Some(
            NaiveDate::parse_from_str(d, "%Y-%m-%d")
                .map_err(|_| ApiError::invalid_param("birthdate", "must be YYYY-MM-DD"))?,
        );
    }
    if let Some(g) = query.get("gender") {
        f.sex = Some(match g.as_str() {
            "male" => Sex::Male,
            "female" => Sex::Female,
            _ => return Err(ApiError::invalid_param("gender", "must be male or female")),
        });
    }
    if let Some(raw) = query.get("identifier") {
        let (system, value) = split_token(raw);
        if system.as_deref() == Some(state.settings.empi.resident_id_system.as_str()) {
            f.resident_id = Some(parse_resident_id(&value).0.number);
        } else {
            f.identifier = Some((system, value));
        }
    }
    if let Some(t) = query.get("telecom") {
        let (_, v) = split_token(t);
        f.phone = Some(normalise_phone(&v).unwrap_or(v));
    }
    let mut found = state.db(move |conn| empi::search_records(conn, &f)).await?;
    let more = found.len() as i64 > count;
    found.truncate(count as usize);
    let (self_url, next) = crate::routes::directory::page_urls(&state, &req, offset, count, more);
    // Paging is over the stored records; records the policy withholds leave gaps in a page.
    let ask = state.policy.ask(caller, &req);
    let released = state
        .policy
        .release(caller, &ask, found.iter().map(candidate).collect())
        .await?;
    let mut event = state
        .auditor
        .search_event(format!("{}?{}", req.path(), req.query_string()));
    released.annotate(&mut event);
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, None))
        .await?;
    let resources = released.kept.into_iter().map(|(_, r)| r).collect();
    Ok(fhir_response(
        actix_web::http::StatusCode::OK,
        fhir::searchset(&state.base_url, &self_url, next, None, resources),
    ))
}

/// PIXm: identifiers of the same enterprise person in other systems.
#[utoipa::path(get, path = "/fhir/Patient/$ihe-pix", tag = "empi",
    params(("sourceIdentifier" = String, Query, description = "system|value"),
        ("targetSystem" = Option<String>, Query, description = "restrict to these systems (comma-separated)")),
    responses((status = 200, description = "Parameters with targetIdentifier and targetId per linked record"),
        (status = 404, description = "sourceIdentifier not known")))]
pub async fn pix(
    state: web::Data<AppState>,
    permit: Permit<PatientRead>,
    req: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    check_params(&query, &["sourceIdentifier", "targetSystem"])?;
    let raw = query
        .get("sourceIdentifier")
        .ok_or_else(|| ApiError::invalid_param("sourceIdentifier", "system|value is required"))?;
    let (system, value) = split_token(raw);
    let system = system
        .ok_or_else(|| ApiError::invalid_param("sourceIdentifier", "must be system|value"))?;
    let targets: Option<BTreeSet<String>> = query
        .get("targetSystem")
        .map(|t| t.split(',').map(|s| s.trim().to_string()).collect());
    let resident = state.settings.empi.resident_id_system.clone();
    let (source, records) = state
        .db(move |conn| -> Result<_, empi::EmpiError> {
            let source = if system == resident {
                let number = parse_resident_id(&value).0.number;
                empi::search_records(
                    conn,
                    &RecordFilter {
                        resident_id: Some(number),
                        limit: 1,
                        ..RecordFilter::default()
                    },
                )?
                .into_iter()
                .next()
            } else {
                empi::find_by_identifier(conn, &system, &value)?
            };
            let Some(source) = source else {
                return Err(empi::EmpiError::NotFound(format!(
                    "sourceIdentifier {system}|{value}"
                )));
            };
            let records = match &source.link {
                Some(l) => empi::records_of_person(conn, &l.person_id)?,
                None => Vec::new(),
            };
            Ok((source, records))
        })
        .await?;
    let wanted = |s: &str| targets.as_ref().is_none_or(|t| t.contains(s));
    // Each answer is a record of some institution: the source (whose release carries the
    // enterprise id) and every wanted target, each decided and masked by the policy.
    let person = source.link.as_ref().map(|l| l.person_id.clone());
    let mut listed: Vec<&StoredRecord> = vec![&source];
    listed.extend(
        records
            .iter()
            .filter(|r| r.id != source.id && wanted(&r.id_system)),
    );
    let candidates = listed
        .iter()
        .map(|r| Candidate {
            custodian: r.institution_id.clone(),
            patient: person.clone(),
            resource: json!({ "resourceType": "Patient", "id": r.id,
                "identifier": [{ "system": r.id_system, "value": r.id_value }] }),
        })
        .collect();
    let ask = state.policy.ask(caller, &req);
    let released = state.policy.release(caller, &ask, candidates).await?;
    let mut params = Vec::new();
    for (index, resource) in &released.kept {
        if *index == 0 {
            if let Some(l) = &source.link
                && wanted(EMPI_SYSTEM)
            {
                params.push(json!({ "name": "targetIdentifier", "valueIdentifier": { "system": EMPI_SYSTEM, "value": l.person_id } }));
            }
            continue;
        }
        if let Some(identifier) = resource.pointer("/identifier/0") {
            params.push(json!({ "name": "targetIdentifier", "valueIdentifier": identifier }));
        }
        if let Some(id) = resource.get("id").and_then(Value::as_str) {
            params.push(json!({ "name": "targetId", "valueReference": { "reference": format!("Patient/{id}") } }));
        }
    }
    let mut event = state.auditor.rest_event("operation", "E");
    event
        .entities
        .push(yiqiao_registry::audit::EntityRef::resource(format!(
            "Patient/{}",
            source.id
        )));
    released.annotate(&mut event);
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, person))
        .await?;
    Ok(fhir_response(
        actix_web::http::StatusCode::OK,
        json!({ "resourceType": "Parameters", "parameter": params }),
    ))
}

fn grade(c: &ScoredCandidate) -> &'static str {
    match c.decision {
        Decision::AutoLink => "certain",
        Decision::Review => "probable",
        Decision::NonMatch if c.score.total > 0.0 => "possible",
        Decision::NonMatch => "certainly-not",
    }
}

/// `$match`: score a Patient against the index (nothing is stored).
#[utoipa::path(post, path = "/fhir/Patient/$match", tag = "empi",
    request_body(content = Object, description = "Parameters: resource (Patient), onlyCertainMatches, count"),
    responses((status = 200, description = "searchset Bundle with search.score, match-grade and per-field explanation")))]
pub async fn match_patient(
    state: web::Data<AppState>,
    permit: Permit<PatientSearch>,
    req: HttpRequest,
    body: ValidJson<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = body.checked()?;
    let caller = permit.member()?;
    let params = body;
    if params.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(invalid(
            "Parameters.resourceType",
            "the body must be a Parameters resource",
        ));
    }
    let mut patient = None;
    let mut only_certain = false;
    let mut count: usize = 10;
    for (i, p) in params
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        match p.get("name").and_then(Value::as_str) {
            Some("resource") => patient = p.get("resource").cloned(),
            Some("onlyCertainMatches") => {
                only_certain = p
                    .get("valueBoolean")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| {
                        invalid(
                            &format!("Parameters.parameter[{i}].valueBoolean"),
                            "onlyCertainMatches needs valueBoolean",
                        )
                    })?;
            }
            Some("count") => {
                count = p
                    .get("valueInteger")
                    .and_then(Value::as_u64)
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            &format!("Parameters.parameter[{i}].valueInteger"),
                            "count must be an integer from 1 to 100",
                        )
                    })? as usize;
            }
            _ => {
                return Err(invalid(
                    &format!("Parameters.parameter[{i}].name"),
                    "supported parameters: resource, onlyCertainMatches, count",
                ));
            }
        }
    }
    let patient = patient.ok_or_else(|| {
        invalid(
            "Parameters.parameter",
            "a parameter named resource with a Patient is required",
        )
    })?;
    let mapped = map_patient(
        &patient,
        "$match",
        None,
        &state.settings.empi.resident_id_system,
    )?;
    let candidates = state
        .db(move |conn| empi::match_record(conn, &mapped.record))
        .await?;
    let ask = state.policy.ask(caller, &req);
    let released = state
        .policy
        .release(
            caller,
            &ask,
            candidates.iter().map(|c| candidate(&c.record)).collect(),
        )
        .await?;
    let mut event = state.auditor.search_event("Patient/$match".into());
    released.annotate(&mut event);
    state
        .auditor
        .record(state.auditor.by_caller(event, caller, None))
        .await?;
    // Best released record per enterprise person.
    let mut seen = BTreeSet::new();
    let mut entries = Vec::new();
    for (index, resource) in released.kept {
        let c = &candidates[index];
        let person = c.record.link.as_ref().map(|l| l.person_id.clone());
        if !seen.insert(person.unwrap_or_else(|| c.record.id.clone())) {
            continue;
        }
        if only_certain && c.decision != Decision::AutoLink {
            continue;
        }
        if entries.len() >= count {
            break;
        }
        let explanation: Vec<Value> = c
            .score
            .explanation
            .iter()
            .map(|w| {
                let level = w.level.map_or("missing".to_string(), |l| format!("{l:?}"));
                json!({ "url": format!("{:?}", w.field), "valueString": format!("{level} {:+.2}", w.weight) })
            })
            .collect();
        entries.push(json!({
            "fullUrl": format!("{}/fhir/Patient/{}", state.base_url, resource["id"].as_str().unwrap_or_default()),
            "resource": resource,
            "search": {
                "mode": "match",
                "score": (c.posterior * 10_000.0).round() / 10_000.0,
                "extension": [
                    { "url": MATCH_GRADE_EXT, "valueCode": grade(c) },
                    { "url": MATCH_EXPLANATION_EXT, "extension": explanation },
                ],
            },
        }));
    }
    Ok(fhir_response(
        actix_web::http::StatusCode::OK,
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": entries.len(),
            "entry": entries,
        }),
    ))
}
