//! Consent use cases: record, change (revoke), read and search patients' consents, with the
//! ownership rules of docs/consent.md ("Who may record and change a consent"):
//! - a consent is created, changed or revoked only by the custodian institution that recorded
//!   it (on create: a member holding the patient's records), by the patient through a
//!   patient-facing platform with a current care relationship with the patient, or by a steward;
//! - a member cannot name another institution as the actor of a permit (only the patient, through
//!   its platform, or a steward can grant a third institution access);
//! - search without a patient is for stewards and auditors; a member sees only consents of
//!   patients it holds (or recorded), others get 403 (search) or 404 (read).

use chrono::Utc;
use serde_json::{Value, json};
use yiqiao_consent::{Consent, ProvisionType, consent_from_fhir};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::consent::{
    self as store, ConsentFilter, ConsentWrite, StoredConsent, UpdateError,
};
use yiqiao_registry::directory::InstitutionKind;
use yiqiao_registry::empi::store::{self as empi, EmpiError};
use yiqiao_registry::store::DbConn;

use crate::error::{ApiError, ErrorCode};
use crate::policy::status_code;
use crate::routes::patients::EMPI_SYSTEM;
use crate::service::Actor;
use crate::service::authz::{
    AgreementSearch, AgreementUpdate, ConsentCreate, ConsentRead, ConsentSearch, ConsentUpdate,
    Facts, Op, Permit, Resource, Who,
};
use crate::state::AppState;

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(field)
}

/// The enterprise person of a Patient reference or id: a source record id resolves through its
/// link; otherwise the id must be an enterprise person (a merged person resolves to the
/// survivor). `Ok(None)`: neither exists.
pub fn person_of(conn: &mut DbConn, id: &str) -> Result<Option<String>, ApiError> {
    match empi::get_record(conn, id) {
        Ok(r) => {
            return match r.link {
                Some(l) => Ok(Some(l.person_id)),
                None => Err(invalid(
                    "Consent.patient",
                    format!("Patient/{id} is not linked to an enterprise person yet"),
                )),
            };
        }
        Err(EmpiError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut current = id.to_string();
    for _ in 0..8 {
        match empi::get_person(conn, &current) {
            Ok(p) => match p.merged_into {
                Some(next) if p.status == "merged" => current = next,
                _ => return Ok(Some(p.id)),
            },
            Err(EmpiError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(current))
}

/// The id named by `Consent.patient` (reference `Patient/<id>` or EMPI identifier).
fn patient_key(resource: &Value) -> Result<String, ApiError> {
    let patient = resource
        .get("patient")
        .ok_or_else(|| invalid("Consent.patient", "Consent.patient is required"))?;
    if let Some(reference) = patient.get("reference") {
        let reference = reference
            .as_str()
            .ok_or_else(|| invalid("Consent.patient.reference", "must be a string"))?;
        return reference
            .strip_prefix("Patient/")
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .map(str::to_string)
            .ok_or_else(|| {
                invalid(
                    "Consent.patient.reference",
                    format!("expected Patient/<id>, got `{reference}`"),
                )
            });
    }
    let identifier = patient.get("identifier").ok_or_else(|| {
        invalid(
            "Consent.patient",
            "give a reference Patient/<id> or an identifier in the EMPI system",
        )
    })?;
    if identifier.get("system").and_then(Value::as_str) != Some(EMPI_SYSTEM) {
        return Err(invalid(
            "Consent.patient.identifier.system",
            format!("only the EMPI system {EMPI_SYSTEM} is accepted"),
        ));
    }
    identifier
        .get("value")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .ok_or_else(|| invalid("Consent.patient.identifier.value", "is required"))
}

/// A Consent body checked for shape (before its patient is resolved).
pub struct ConsentBody {
    body: Value,
    patient_key: String,
}

impl ConsentBody {
    /// Check the body's shape and that its id (for an update) matches.
    pub fn parse(body: Value, id_in_url: Option<&str>) -> Result<ConsentBody, ApiError> {
        if !body.is_object() {
            return Err(invalid("Consent", "the body must be a FHIR Consent object"));
        }
        if body.get("resourceType").and_then(Value::as_str) != Some("Consent") {
            return Err(invalid(
                "Consent.resourceType",
                "resourceType must be Consent",
            ));
        }
        if let Some(id) = id_in_url {
            match body.get("id") {
                Some(Value::String(body_id)) if body_id == id => {}
                _ => {
                    return Err(invalid(
                        "Consent.id",
                        format!("Consent.id must be present and equal the id in the URL ({id})"),
                    ));
                }
            }
        }
        let patient_key = patient_key(&body)?;
        Ok(ConsentBody { body, patient_key })
    }

    /// Resolve the patient and build the stored form (`id`: the id it is stored under).
    fn resolve(
        self,
        conn: &mut DbConn,
        id: &str,
        actor: &str,
    ) -> Result<(ConsentWrite, Consent), ApiError> {
        let key = self.patient_key;
        let person = person_of(conn, &key)?.ok_or_else(|| {
            invalid(
                "Consent.patient",
                format!("no Patient source record or enterprise person with id {key}"),
            )
        })?;
        let mut body = self.body;
        body["id"] = json!(id);
        if let Some(obj) = body.as_object_mut() {
            obj.remove("meta");
            let mut patient = obj.get("patient").cloned().unwrap_or_else(|| json!({}));
            if patient.get("reference").is_none() {
                patient["reference"] = json!(format!("Patient/{person}"));
            }
            patient["identifier"] = json!({ "system": EMPI_SYSTEM, "value": person });
            obj.insert("patient".into(), patient);
        }
        // Parse exactly as the enforcement point will (patient by enterprise id).
        let mut probe = body.clone();
        probe["patient"] = json!({ "reference": format!("Patient/{person}") });
        let consent = consent_from_fhir(&probe).map_err(|e| {
            ApiError::new(ErrorCode::ValidationFailed, e.to_string()).field(e.path().to_string())
        })?;
        let status = body
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let write = ConsentWrite {
            id: id.to_string(),
            patient_id: person,
            status,
            provision: match consent.provision {
                ProvisionType::Deny => "deny".into(),
                ProvisionType::Permit => "permit".into(),
            },
            period_start: consent.period.start.map(|t| t.naive_utc()),
            period_end: consent.period.end.map(|t| t.naive_utc()),
            actor: actor.to_string(),
            resource: body.to_string(),
        };
        Ok((write, consent))
    }
}

/// The facts about `person` (and the consent's recorder, when there is one) that the table's
/// `Custodian` and `PatientPlatform` need, read inside the caller's transaction.
fn facts(
    conn: &mut DbConn,
    actor: &Actor,
    person: &str,
    recorder: Option<&str>,
    holding_counts: bool,
) -> Result<Facts, ApiError> {
    let Some(caller) = actor.member() else {
        return Ok(Facts::default());
    };
    let me = caller.institution.id.as_str();
    let recorded = recorder == Some(me);
    let holds = holding_counts
        && !recorded
        && empi::holders_of_person(conn, person)?
            .iter()
            .any(|(institution, _)| institution == me);
    let patient_platform = caller.institution.kind == InstitutionKind::InternetHospital
        && yiqiao_registry::encounters::active_for_persons(
            conn,
            &[person.to_string()],
            Utc::now().naive_utc(),
        )?
        .iter()
        .any(|(_, institution, _, _)| institution == me);
    Ok(Facts {
        custodian: recorded || holds,
        patient_platform,
    })
}

/// A member recording a permit as the custodian names no other institution as its actor.
fn check_permit_actors(actor: &Actor, way: Who, consent: &Consent) -> Result<(), ApiError> {
    let (Some(caller), Who::Custodian) = (actor.member(), way) else {
        return Ok(());
    };
    if consent.provision != ProvisionType::Permit {
        return Ok(());
    }
    if let Some(other) = consent
        .scope
        .actors
        .iter()
        .find(|a| a.as_str() != caller.institution.id.as_str())
    {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "a member cannot name another institution ({other}) as the actor of a permit; \
                 the patient (through its platform) or a steward can"
            ),
        )
        .field("Consent.provision.actor"));
    }
    Ok(())
}

fn recorded_event(
    actor: &Actor,
    state: &AppState,
    interaction: &str,
    action: &str,
) -> yiqiao_registry::audit::AuditEvent {
    actor.attribute(
        &state.auditor,
        state.auditor.rest_event(interaction, action),
        None,
    )
}

/// Record a new consent. The service assigns the id.
pub async fn create(
    state: &AppState,
    permit: &Permit<ConsentCreate>,
    body: ConsentBody,
) -> Result<StoredConsent, ApiError> {
    let (actor, check) = (&permit.actor, permit.check.clone());
    let id = uuid::Uuid::now_v7().to_string();
    let mut event = recorded_event(actor, state, "create", "C");
    event
        .entities
        .push(EntityRef::resource(format!("Consent/{id}")));
    let (who, recorder) = (actor.clone(), actor.recorded_as());
    let row = state
        .auditor
        .change(event, move |tx, event| {
            let (write, consent) = body.resolve(tx.conn(), &id, &recorder)?;
            event.patient_id = Some(write.patient_id.clone());
            let facts = facts(tx.conn(), &who, &write.patient_id, None, true)?;
            let way = check.settle(facts, Resource::Consent, Op::Create, None)?;
            check_permit_actors(&who, way, &consent)?;
            event.consent_decision = Some(format!("recorded-{}", status_code(consent.status)));
            Ok(store::create(tx, &write)?)
        })
        .await?;
    state.policy.changed(Some(&row.patient_id)).await;
    Ok(row)
}

/// Replace a consent with a new version (revoking is an update to status `inactive`).
/// `expected`: the version from `If-Match`.
pub async fn update(
    state: &AppState,
    permit: &Permit<ConsentUpdate>,
    id: String,
    expected: Option<i64>,
    body: ConsentBody,
) -> Result<StoredConsent, ApiError> {
    let (actor, check) = (&permit.actor, permit.check.clone());
    let mut event = recorded_event(actor, state, "update", "U");
    event
        .entities
        .push(EntityRef::resource(format!("Consent/{id}")));
    let (who, changer) = (actor.clone(), actor.recorded_as());
    let row = state
        .auditor
        .change(event, move |tx, event| {
            let not_found = format!("Consent/{id} not found");
            let stored = store::get(tx.conn(), &id)?
                .ok_or_else(|| ApiError::not_found(not_found.clone()))?;
            event.patient_id = Some(stored.patient_id.clone());
            // Only the recorder counts as custodian of a change; a member that merely holds
            // the patient may not change another institution's record of the consent.
            let facts = facts(
                tx.conn(),
                &who,
                &stored.patient_id,
                Some(&stored.recorded_by),
                false,
            )?;
            // A member that may not even read the consent is told it does not exist.
            let hidden = check.needs_facts()
                && !facts.custodian
                && !facts.patient_platform
                && !holds_patient(tx.conn(), &who, &stored.patient_id)?;
            let way = check.settle(
                facts,
                Resource::Consent,
                Op::Update,
                hidden.then_some(not_found.as_str()),
            )?;
            let (write, consent) = body.resolve(tx.conn(), &id, &changer)?;
            check_permit_actors(&who, way, &consent)?;
            event.entities = vec![EntityRef::resource(format!(
                "Consent/{id}/_history/{}",
                stored.version + 1
            ))];
            event.consent_decision = Some(format!("recorded-{}", status_code(consent.status)));
            store::update(tx, &write, expected).map_err(|e| match e {
                UpdateError::NotFound(id) => ApiError::not_found(format!("Consent/{id} not found")),
                UpdateError::VersionConflict { .. } => {
                    ApiError::new(ErrorCode::VersionConflict, e.to_string())
                }
                UpdateError::PatientChanged { .. } => invalid("Consent.patient", e.to_string()),
                UpdateError::Store(s) => s.into(),
            })
        })
        .await?;
    state.policy.changed(Some(&row.patient_id)).await;
    Ok(row)
}

/// Does the member hold records of `person`? (A holder may read a consent it cannot change:
/// it gets 403 on a change, not 404.)
fn holds_patient(conn: &mut DbConn, actor: &Actor, person: &str) -> Result<bool, ApiError> {
    let Some(caller) = actor.member() else {
        return Ok(false);
    };
    Ok(empi::holders_of_person(conn, person)?
        .iter()
        .any(|(institution, _)| institution == caller.institution.id.as_str()))
}

/// Read one consent; recorded in the audit trail before it is returned.
pub async fn read(
    state: &AppState,
    permit: &Permit<ConsentRead>,
    id: String,
) -> Result<StoredConsent, ApiError> {
    let (actor, check) = (&permit.actor, permit.check.clone());
    let (who, lookup, probe) = (actor.clone(), id.clone(), check.clone());
    let found = state
        .db(move |conn| -> Result<_, ApiError> {
            let Some(row) = store::get(conn, &lookup)? else {
                return Ok(None);
            };
            let facts = if probe.needs_facts() {
                facts(conn, &who, &row.patient_id, Some(&row.recorded_by), true)?
            } else {
                Facts::default()
            };
            Ok(Some((row, facts)))
        })
        .await?;
    let not_found = format!("Consent/{id} not found");
    let refused = |patient: Option<String>, e: ApiError| {
        let mut event = state.auditor.read_event(format!("Consent/{id}"));
        event.outcome = yiqiao_registry::audit::outcome::MINOR_FAILURE.into();
        event.outcome_desc = Some(format!("{}: {}", e.code.code(), e.message));
        state
            .auditor
            .record_refusal(actor.attribute(&state.auditor, event, patient));
        e
    };
    let Some((row, facts)) = found else {
        return Err(refused(None, ApiError::not_found(not_found)));
    };
    check
        .settle(facts, Resource::Consent, Op::Read, Some(&not_found))
        .map_err(|e| refused(Some(row.patient_id.clone()), e))?;
    let event = state.auditor.read_event(format!("Consent/{}", row.id));
    state
        .auditor
        .record(actor.attribute(&state.auditor, event, Some(row.patient_id.clone())))
        .await?;
    Ok(row)
}

/// A consent search: `patient` is a Patient source record or enterprise person id.
pub struct ConsentQuery {
    pub patient: Option<String>,
    pub status: Option<String>,
    pub count: i64,
    pub offset: i64,
    /// The query as received (path and query string), for the audit record.
    pub text: String,
}

/// Search consents. Members must name a patient they hold (or are the platform of); the
/// result is recorded before it is returned. Returns one more row than `count` when there are.
pub async fn search(
    state: &AppState,
    permit: &Permit<ConsentSearch>,
    q: ConsentQuery,
) -> Result<Vec<StoredConsent>, ApiError> {
    let (actor, check) = (&permit.actor, permit.check.clone());
    if check.needs_facts() && q.patient.is_none() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a member must search consents by patient (patient=Patient/<id>); search without a \
             patient is for stewards and auditors",
        ));
    }
    let who = actor.clone();
    let (patient, status, count, offset) = (q.patient, q.status, q.count, q.offset);
    let (person, rows) = state
        .db(move |conn| -> Result<_, ApiError> {
            let person = match &patient {
                None => None,
                Some(id) => match person_of(conn, id) {
                    Ok(Some(p)) => Some(p),
                    // Unknown or unlinked patient: nothing can match.
                    Ok(None) | Err(_) => return Ok((None, Vec::new())),
                },
            };
            if let (Some(p), true) = (&person, check.needs_facts()) {
                let facts = facts(conn, &who, p, None, true)?;
                check.settle(facts, Resource::Consent, Op::Search, None)?;
            }
            let rows = store::search(
                conn,
                &ConsentFilter {
                    patient_id: person.clone(),
                    status,
                    limit: count + 1,
                    offset,
                },
            )?;
            Ok((person, rows))
        })
        .await?;
    let event = state.auditor.search_event(q.text);
    state
        .auditor
        .record(actor.attribute(&state.auditor, event, person))
        .await?;
    Ok(rows)
}

/// Create or replace a data-sharing agreement; both institutions must be registered. Takes
/// effect on the next request on every replica, like a consent change.
pub async fn put_agreement(
    state: &AppState,
    permit: &Permit<AgreementUpdate>,
    write: store::AgreementWrite,
) -> Result<store::StoredAgreement, ApiError> {
    let actor = &permit.actor;
    let event = actor.attribute(
        &state.auditor,
        {
            let mut e = state.auditor.rest_event("update", "U");
            e.entities
                .push(EntityRef::resource(format!("Agreement/{}", write.id)));
            e
        },
        None,
    );
    let row = state
        .auditor
        .change(event, move |tx, event| {
            for (field, inst) in [
                ("custodian", &write.custodian),
                ("recipient", &write.recipient),
            ] {
                match yiqiao_registry::directory::get(tx.conn(), inst) {
                    Ok(_) => {}
                    Err(yiqiao_registry::directory::DirectoryError::NotFound(_)) => {
                        return Err(invalid(
                            field,
                            format!("institution {inst} is not registered"),
                        ));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            event.consent_decision = Some(format!("agreement-{}", write.status));
            Ok(store::put_agreement(tx, &write)?)
        })
        .await?;
    state.policy.changed(None).await;
    Ok(row)
}

/// Every data-sharing agreement.
pub async fn list_agreements(
    state: &AppState,
    permit: &Permit<AgreementSearch>,
) -> Result<Vec<store::StoredAgreement>, ApiError> {
    let rows = state.db(store::list_agreements).await?;
    permit
        .record(
            &state.auditor,
            state.auditor.search_event("Agreement".into()),
            None,
        )
        .await?;
    Ok(rows)
}
