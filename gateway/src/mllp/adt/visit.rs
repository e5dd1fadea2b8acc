//! Visits (PV1) → FHIR Encounter: A01/A04 open a visit, A03 finishes it, A11 cancels it.

use super::*;

/// HL7 location of an Encounter field named by the encounter validation or store.
fn visit_location(fhir_field: &str) -> &'static str {
    const PV1: [(&str, &str); 5] = [
        ("Encounter.identifier", "PV1^1^19"),
        ("Encounter.class", "PV1^1^2"),
        ("Encounter.period.end", "PV1^1^45"),
        ("Encounter.period", "PV1^1^44"),
        ("Encounter.subject", "PID^1^3"),
    ];
    hl7_location(fhir_field, &PV1, "PV1")
}

/// AE for a visit that could not be stored: ERR names the PV1 (or PID) field.
pub(super) fn visit_nak(e: ApiError) -> Nak {
    let location = e.field.as_deref().map(visit_location);
    let validation = matches!(e.code, ErrorCode::ValidationFailed);
    let mut n = internal(e);
    if validation {
        n.code = 102;
    }
    if n.location.is_none() {
        n.location = location.map(String::from);
    }
    n
}

/// What happened to a visit, for the ACK text.
pub(super) fn outcome_word(outcome: UpsertOutcome, status: EncounterStatus) -> &'static str {
    match (outcome, status) {
        (UpsertOutcome::Unchanged, _) => "unchanged",
        (UpsertOutcome::Created, _) => "opened",
        (UpsertOutcome::Updated, EncounterStatus::Finished) => "finished",
        (UpsertOutcome::Updated, EncounterStatus::Cancelled) => "cancelled",
        (UpsertOutcome::Updated, _) => "updated",
    }
}

/// The visit number PV1-19 (first component), when given.
fn visit_number(m: &Message<'_>) -> Option<String> {
    let pv1 = m.segment("PV1")?;
    let number = field(pv1, 19)?
        .component(1)
        .map(|c| decoded(&m.separators, c.raw_value()))?;
    (!number.is_empty()).then_some(number)
}

/// A01/A04: the visit of PV1 as a FHIR Encounter without subject (the PID patient is set by
/// [`register`]); `None` when there is no PV1 or no visit number (PV1-19): then only the
/// patient is registered, as before encounters were kept.
pub(super) fn opening_visit(
    m: &Message<'_>,
    msh: &Segment<'_>,
    institution: &Institution,
    status: EncounterStatus,
) -> Result<Option<Value>, Nak> {
    let (Some(pv1), Some(number)) = (m.segment("PV1"), visit_number(m)) else {
        return Ok(None);
    };
    let class = field(pv1, 2)
        .map(|f| decoded(&m.separators, f.raw_value()))
        .unwrap_or_default();
    let class = match class.as_str() {
        "I" => EncounterClass::Inpatient,
        "O" => EncounterClass::Ambulatory,
        "E" => EncounterClass::Emergency,
        "" => {
            return Err(nak(
                AckCode::Error,
                101,
                Some("PV1^1^2"),
                "PV1-2 (patient class: I, O or E) is required with a visit number",
            ));
        }
        other => {
            return Err(nak(
                AckCode::Error,
                103,
                Some("PV1^1^2"),
                format!("PV1-2 (patient class) {other:?} is not one of I, O, E"),
            ));
        }
    };
    let start = time_or_message_time(pv1, 44, "PV1^1^44", msh)?;
    Ok(Some(json!({
        "resourceType": "Encounter",
        "identifier": [{
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN" }] },
            "value": number,
        }],
        "status": status.as_str(),
        "class": { "system": ACT_CODE_SYSTEM, "code": class.code() },
        "period": { "start": utc_text(start) },
        "serviceProvider": { "reference": format!("Organization/{}", institution.id) },
    })))
}

/// A03 (finished, period.end from PV1-45 or MSH-7) and A11 (cancelled): the new state of a
/// registered visit (PV1-19) of the PID-3 patient.
pub(super) async fn change_visit(
    state: &AppState,
    peer: SocketAddr,
    institution: &Institution,
    m: &Message<'_>,
    msh: &Segment<'_>,
    pid: &Segment<'_>,
    event: &str,
) -> Result<String, Nak> {
    let s = &m.separators;
    let number = visit_number(m).ok_or_else(|| {
        nak(
            AckCode::Error,
            101,
            Some("PV1^1^19"),
            format!("PV1-19 (visit number) is required for {event}"),
        )
    })?;
    let record = pid_record_number(state, s, pid, institution)?;
    let (status, end) = if event == "A03" {
        let pv1 = m
            .segment("PV1")
            .ok_or_else(|| nak(AckCode::Error, 100, Some("PV1"), "no PV1 segment"))?;
        let end = time_or_message_time(pv1, 45, "PV1^1^45", msh)?;
        (EncounterStatus::Finished, Some(end))
    } else {
        (EncounterStatus::Cancelled, None)
    };
    let inst = institution.clone();
    let system = institution.patient_id_system.clone();
    let template = feed_event(state, "update", "U", institution, peer);
    let (outcome, encounter) = state
        .auditor
        .change(template, move |tx, event| {
            let registered = encounters::find(tx.conn(), inst.id.as_str(), &number)?.ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("PV1-19: visit {number} of this institution is not registered (send A01 or A04 first)"),
                )
                .field("Encounter.identifier")
            })?;
            let mut resource = registered.resource.clone();
            if !resource.is_object() {
                return Err(ApiError::internal(format!(
                    "stored Encounter/{} is not a JSON object",
                    registered.id
                )));
            }
            resource["status"] = json!(status.as_str());
            resource["subject"] = json!({ "identifier": { "system": system, "value": record } });
            if let Some(end) = end {
                match resource.get_mut("period").and_then(Value::as_object_mut) {
                    Some(period) => {
                        period.insert("end".into(), json!(utc_text(end)));
                    }
                    None => {
                        resource["period"] = json!({
                            "start": utc_text(registered.period_start),
                            "end": utc_text(end),
                        });
                    }
                }
            }
            let new = map_encounter(&inst, &resource)?;
            crate::service::encounters::upsert_recorded(
                tx,
                event,
                &new,
                yiqiao_registry::encounters::Precondition::None,
            )
        })
        .await
        .map_err(visit_nak)?;
    Ok(format!(
        "{} Encounter/{}",
        outcome_word(outcome, encounter.status),
        encounter.id
    ))
}
