//! Care relationships (visits): register a visit or record its new state, for every adapter
//! (FHIR `Encounter`, HL7 v2 A01/A04/A03/A11, a registration carrying a visit).
//!
//! Rule for every adapter: a visit that is finished, cancelled or entered in error is not
//! reopened by an admit or a registration (an in-progress/planned/arrived state): a late or
//! replayed message must not give an institution a care relationship again (409).

use yiqiao_registry::audit::{AuditEvent, EntityRef};
use yiqiao_registry::encounters::{
    self as store, EncounterError, EncounterStatus, NewEncounter, Precondition, StoredEncounter,
    UpsertOutcome,
};
use yiqiao_registry::store::Audited;

use crate::error::{ApiError, ErrorCode};

/// Is this status a closed visit?
fn closed(status: EncounterStatus) -> bool {
    matches!(
        status,
        EncounterStatus::Finished | EncounterStatus::Cancelled | EncounterStatus::EnteredInError
    )
}

/// Register or update a visit inside an audited change (the caller's transaction), applying the
/// rule of the module docs. Errors name the Encounter field.
pub fn upsert_in(
    tx: &mut Audited<'_>,
    new: &NewEncounter,
    pre: Precondition,
) -> Result<(UpsertOutcome, StoredEncounter), ApiError> {
    if !closed(new.status)
        && let Some(stored) = store::find(tx.conn(), &new.institution_id, &new.identifier)?
        && closed(stored.status)
        // A stale If-Match is answered 412 by the store first.
        && !matches!(pre, Precondition::Version(v) if v != stored.version)
    {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "visit {} is already {} (Encounter/{}); it is not reopened by an admit or registration",
                new.identifier,
                stored.status.as_str(),
                stored.id
            ),
        )
        .field("Encounter.identifier"));
    }
    store::upsert_with(tx, new, pre).map_err(|e| match e {
        EncounterError::ChangeRefused { id, visit } => ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "visit {visit} is registered (Encounter/{id}) with other content; changing it needs scope system/Encounter.u (or PUT /fhir/Encounter/{id})"
            ),
        ),
        other => other.into(),
    })
}

/// The audit interaction of an upsert's outcome.
/// [`upsert_in`], with `event` (the change's audit record) describing what it did.
pub fn upsert_recorded(
    tx: &mut Audited<'_>,
    event: &mut AuditEvent,
    new: &NewEncounter,
    pre: Precondition,
) -> Result<(UpsertOutcome, StoredEncounter), ApiError> {
    let (outcome, stored) = upsert_in(tx, new, pre)?;
    describe(event, outcome, &stored);
    Ok((outcome, stored))
}

/// An audit record of a visit's registration or update: create or update, the Encounter's
/// version, the patient's enterprise person.
pub fn describe(event: &mut AuditEvent, outcome: UpsertOutcome, stored: &StoredEncounter) {
    let (interaction, action) = interaction(outcome);
    event.subtype_code = interaction.into();
    event.action = action.into();
    event.entities.push(EntityRef::resource(format!(
        "Encounter/{}/_history/{}",
        stored.id, stored.version
    )));
    event.patient_id = stored.person_id.clone();
}

pub fn interaction(outcome: UpsertOutcome) -> (&'static str, &'static str) {
    match outcome {
        UpsertOutcome::Created => ("create", "C"),
        _ => ("update", "U"),
    }
}
