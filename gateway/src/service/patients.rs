//! Patient registration (the FHIR Patient feed, the HL7 v2 ADT feed, bulk import): a member
//! registers its own source records — the registration is keyed by the member's own identifier
//! system, so the member is always the record's custodian — optionally together with a visit
//! (HL7 A01/A04 carry both), in one audited transaction.

use serde_json::{Value, json};
use yiqiao_registry::audit::{AuditEvent, EntityRef};
use yiqiao_registry::empi::store::{self as empi, Registered, RegistrationOutcome};
use yiqiao_registry::encounters::{NewEncounter, Precondition, StoredEncounter, UpsertOutcome};

use crate::auth::Caller;
use crate::auth::CallerVia;
use crate::error::ApiError;
use crate::service::authz::{Facts, Need, Permit};
use crate::service::{derived, encounters};
use crate::state::AppState;

/// What a registration did: the patient, and the visit it carried.
pub struct Done {
    pub patient: Registered,
    pub visit: Option<(UpsertOutcome, StoredEncounter)>,
}

/// The feed a member's registration came by, for the registry's rows.
fn feed_of(caller: &Caller) -> Option<&'static str> {
    (caller.via == CallerVia::Feed).then_some("hl7v2")
}

/// How registry rows name a member's change (`institution:<id>`, with the feed it came by).
pub fn actor_label(caller: &Caller, feed: Option<&str>) -> String {
    match feed {
        Some(feed) => format!("institution:{} ({feed})", caller.institution.id),
        None => format!("institution:{}", caller.institution.id),
    }
}

/// Register (create or update) the FHIR `patient` sent by `caller`, and the FHIR `visit`
/// (Encounter) it carries, if any; `op` is what the adapter asked for (`Create`: POST or a feed
/// message; `Update`: a conditional update naming `expected` = (system, value)), as the
/// permit's type says. `template` is
/// the attributed audit event (who, from where): one record is made for the patient and one for
/// the visit, in the change's transaction. Errors name the FHIR field (`Patient.…`,
/// `Encounter.…`), which the HL7 adapter maps to PID/PV1 locations.
pub async fn register<N: Need>(
    state: &AppState,
    permit: &Permit<N>,
    patient: Value,
    expected: Option<(String, String)>,
    visit: Option<Value>,
    template: AuditEvent,
) -> Result<Done, ApiError> {
    let Some(caller) = permit.actor.member() else {
        return Err(ApiError::new(
            crate::error::ErrorCode::Forbidden,
            "patients are registered by member institutions",
        ));
    };
    let label = actor_label(caller, feed_of(caller));
    let reg = crate::routes::patients::registration(
        &caller.institution,
        patient,
        expected.as_ref().map(|(s, v)| (s.as_str(), v.as_str())),
        &state.settings.empi.resident_id_system,
    )?;
    // The registration is in the caller's own identifier system (the mapping guarantees it):
    // the caller is the custodian of what it registers.
    let own = reg.institution_id == caller.institution.id.as_str()
        && reg.id_system == caller.institution.patient_id_system;
    permit.settle(
        Facts {
            custodian: own,
            patient_platform: false,
        },
        None,
    )?;
    // The visit's patient is the record just mapped; checked before anything is stored.
    let visit: Option<NewEncounter> = match visit {
        None => None,
        Some(mut encounter) => {
            encounter["subject"] =
                json!({ "identifier": { "system": reg.id_system, "value": reg.id_value } });
            Some(crate::routes::encounters::map_encounter(
                &caller.institution,
                &encounter,
            )?)
        }
    };
    let failed = derived(&template, N::OP.name(), "C");
    state
        .auditor
        .change_many(failed, move |tx| {
            let patient = empi::register(tx, &reg, &label)?;
            let person = patient.record.link.as_ref().map(|l| l.person_id.clone());
            let (interaction, action) = match patient.outcome {
                RegistrationOutcome::Created => ("create", "C"),
                _ => ("update", "U"),
            };
            let mut event = derived(&template, interaction, action);
            event.entities.push(EntityRef::resource(format!(
                "Patient/{}",
                patient.record.id
            )));
            event.patient_id = person;
            let mut events = vec![event];
            let visit = match visit {
                None => None,
                Some(v) => {
                    let (outcome, stored) = encounters::upsert_in(tx, &v, Precondition::None)?;
                    let (interaction, action) = encounters::interaction(outcome);
                    let mut event = derived(&template, interaction, action);
                    encounters::describe(&mut event, outcome, &stored);
                    events.push(event);
                    Some((outcome, stored))
                }
            };
            Ok((Done { patient, visit }, events))
        })
        .await
}
