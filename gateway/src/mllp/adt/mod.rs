//! HL7 v2 ADT messages → EMPI registrations and merges, answered with an original-mode ACK.
//!
//! - A01, A04, A05, A08, A28, A31: PID is mapped to a FHIR Patient ([`patient_from_pid`]) and
//!   registered exactly like `POST /fhir/Patient` from the sending institution (idempotent on
//!   its record number), audited like the FHIR feed.
//! - A40: the persons of the surviving record (PID-3) and of the prior record (MRG-1) are
//!   merged (`decided_by = merge`), as `POST /empi/persons/{id}/$merge` would.
//! - Encounters (care relationships, crate::routes::encounters): A01 (admit) and A04 (register
//!   an outpatient) with a PV1 carrying a visit number (PV1-19) also open the visit, in the same
//!   transaction as the patient registration; A03 (discharge) finishes it, A11 (cancel admit)
//!   cancels it. The visit is mapped to a FHIR Encounter and stored exactly like
//!   `POST /fhir/Encounter` from the sending institution.
//!
//! The sending facility MSH-4.1 must be one of the institutions the connection was
//! authenticated for (super::peer: allow-listed address or client certificate; else AR and an
//! audit record) and an active institution id of the directory. Before parsing, the message's
//! structure is checked against the limits of super::limits (else AR naming the limit).
//! Answers: `AA` accepted; `AE` (application error: a field is wrong, or storage failed; ERR
//! names the field and the HL7 table 0357 code, MSA-3 says why); `AR` (rejected: not HL7,
//! not UTF-8, unknown message type or event, unknown sender).

use std::net::SocketAddr;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use hl7_parser::Message;
use hl7_parser::message::{Field, Repeat, Segment, Separators};
use serde_json::{Value, json};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::directory::{self, DirectoryError, Institution};
use yiqiao_registry::empi::store::{self as empi, RegistrationOutcome};
use yiqiao_registry::encounters::{self, EncounterClass, EncounterStatus, UpsertOutcome};

use super::limits::{self, ParseLimits};
use super::peer::Peer;
use crate::error::{ApiError, ErrorCode};
use crate::routes::encounters::{ACT_CODE_SYSTEM, map_encounter};
use crate::sanitize::{describe, escaped, first_refused};
use crate::service::authz::PatientCreate;
use crate::state::AppState;

mod ack;
mod fields;
mod pid;
mod visit;

pub use ack::*;
pub use fields::*;
pub use pid::*;
use visit::*;

/// Sending application/facility of our ACKs (MSH-3, MSH-4).
pub const GATEWAY_APPLICATION: &str = "YIQIAO";

/// Events registering or updating a patient.
const REGISTER_EVENTS: [&str; 6] = ["A01", "A04", "A05", "A08", "A28", "A31"];
/// Events changing a registered visit: A03 discharge (finished), A11 cancel admit (cancelled).
const VISIT_EVENTS: [&str; 2] = ["A03", "A11"];
/// UTC offset of HL7 timestamps that carry none: China Standard Time (UTC+8, no daylight saving).
const FEED_UTC_OFFSET_SECS: i64 = 8 * 3600;
/// Identifier type codes (HL7 table 0203) of a resident ID number: China's national number.
const RESIDENT_ID_TYPES: [&str; 1] = ["NNCHN"];
/// Identifier type codes of an institution's own record number.
const RECORD_TYPES: [&str; 3] = ["MR", "PI", "PT"];

/// Handle one MLLP block from an authenticated peer; returns the ACK to send back.
pub async fn handle(state: &AppState, peer: &Peer, bytes: &[u8]) -> String {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            return reject_raw(
                bytes,
                &format!("the message is not UTF-8 (byte {})", e.valid_up_to()),
            );
        }
    };
    let text = text.trim_matches(|c| c == '\r' || c == '\n');
    if !text.starts_with("MSH") || text.len() < 8 {
        return build_ack(
            &Header::default(),
            Err(nak(
                AckCode::Reject,
                100,
                Some("MSH"),
                "the message must start with an MSH segment",
            )),
        );
    }
    if let Err(breach) = limits::check(text, &ParseLimits::of(&state.settings.mllp)) {
        tracing::info!(peer = %peer.addr, reason = %breach.message, "HL7 v2 message over a structure limit");
        return reject_at(bytes, breach.location.as_deref(), &breach.message);
    }
    let message = match Message::parse_with_lenient_newlines(text, true) {
        Ok(m) => m,
        Err(e) => return reject_raw(bytes, &format!("the message cannot be parsed: {e}")),
    };
    let header = header_of(&message);
    let outcome = match control_character(&message.separators, text) {
        Some((location, c)) => Err(nak(
            AckCode::Error,
            102,
            Some(&location),
            format!(
                "{location} {} (escape sequences decoded); text may hold tab but no other control character",
                describe(c)
            ),
        )),
        None => process(state, peer, &message, &header).await,
    };
    if let Err(n) = &outcome {
        tracing::info!(peer = %peer.addr, control_id = %header.control_id, ack = n.ack.as_str(), code = n.code,
            location = n.location.as_deref().unwrap_or(""), reason = %n.message, "HL7 v2 message not accepted");
    }
    build_ack(&header, outcome)
}

async fn process(
    state: &AppState,
    authenticated: &Peer,
    m: &Message<'_>,
    h: &Header,
) -> Result<String, Nak> {
    let peer = authenticated.addr;
    let s = &m.separators;
    let msh = m
        .segment("MSH")
        .ok_or_else(|| nak(AckCode::Reject, 100, Some("MSH"), "no MSH segment"))?;
    let msg_type = msh.field(9);
    let kind = msg_type
        .and_then(|f| f.component(1))
        .map(|c| c.raw_value())
        .unwrap_or("");
    if kind != "ADT" {
        return Err(nak(
            AckCode::Reject,
            200,
            Some("MSH^1^9"),
            format!("unsupported message type {kind:?}: only ADT is accepted"),
        ));
    }
    if h.control_id.is_empty() {
        return Err(nak(
            AckCode::Reject,
            101,
            Some("MSH^1^10"),
            "MSH-10 (message control id) is required",
        ));
    }
    let event = h.event.as_str();
    if !REGISTER_EVENTS.contains(&event) && !VISIT_EVENTS.contains(&event) && event != "A40" {
        return Err(nak(
            AckCode::Reject,
            201,
            Some("MSH^1^9"),
            format!(
                "unsupported event {event:?}: accepted are {}, {} and A40",
                REGISTER_EVENTS.join(", "),
                VISIT_EVENTS.join(", ")
            ),
        ));
    }
    let facility = field(msh, 4)
        .and_then(|f| f.component(1))
        .map(|c| decoded(s, c.raw_value()))
        .unwrap_or_default();
    if facility.is_empty() {
        return Err(nak(
            AckCode::Reject,
            101,
            Some("MSH^1^4"),
            "MSH-4 (sending facility) is required: the institution id",
        ));
    }
    if let Err(reason) = authenticated
        .may_send_for(state, &facility, event, &h.control_id)
        .await
    {
        return Err(nak(AckCode::Reject, 207, Some("MSH^1^4"), reason));
    }
    let institution = sender(state, &facility).await?;
    let pid = m.segment("PID").ok_or_else(|| {
        nak(
            AckCode::Error,
            100,
            Some("PID"),
            "the message has no PID segment",
        )
    })?;
    if REGISTER_EVENTS.contains(&event) {
        let visit = match event {
            "A01" => opening_visit(m, msh, &institution, EncounterStatus::InProgress)?,
            "A04" => opening_visit(m, msh, &institution, EncounterStatus::Arrived)?,
            _ => None,
        };
        register(state, peer, &institution, s, pid, visit).await
    } else if VISIT_EVENTS.contains(&event) {
        change_visit(state, peer, &institution, m, msh, pid, event).await
    } else {
        let mrg = m.segment("MRG").ok_or_else(|| {
            nak(
                AckCode::Error,
                100,
                Some("MRG"),
                "an A40 needs an MRG segment after PID",
            )
        })?;
        merge(state, peer, &institution, s, pid, mrg).await
    }
}

async fn sender(state: &AppState, facility: &str) -> Result<Institution, Nak> {
    let id = facility.to_string();
    let found = state
        .db(move |conn| match directory::get(conn, &id) {
            Ok(i) => Ok(Some(i)),
            Err(DirectoryError::NotFound(_)) => Ok(None),
            Err(e) => Err(ApiError::from(e)),
        })
        .await
        .map_err(internal)?;
    match found {
        Some(i) if i.is_active() => Ok(i),
        Some(_) => Err(nak(
            AckCode::Reject,
            103,
            Some("MSH^1^4"),
            format!("the sending facility {facility} is not active in the directory"),
        )),
        None => Err(nak(
            AckCode::Reject,
            103,
            Some("MSH^1^4"),
            format!("unknown sending facility {facility}: not an institution of the directory"),
        )),
    }
}

fn internal(e: ApiError) -> Nak {
    tracing::warn!(code = e.code.code(), message = %e.message, internal = e.internal.as_deref().unwrap_or(""), "HL7 v2 message failed");
    let (code, message) = match e.code {
        ErrorCode::Conflict => (205, e.message),
        ErrorCode::NotFound => (204, e.message),
        ErrorCode::ValidationFailed => (207, e.message),
        _ => (
            207,
            format!("{} (retry later)", e.code.meaning().trim_end_matches('.')),
        ),
    };
    nak(AckCode::Error, code, None, message)
}

fn actor(institution: &Institution) -> String {
    format!("institution:{} (hl7v2)", institution.id)
}

fn feed_event(
    state: &AppState,
    interaction: &str,
    action: &str,
    institution: &Institution,
    peer: SocketAddr,
) -> yiqiao_registry::audit::AuditEvent {
    let mut event = state.auditor.rest_event(interaction, action);
    event.agent_institution = Some(institution.id.to_string());
    event.agent_user = Some(format!("mllp:{peer}"));
    event.agent_role = Some("hl7v2-feed".into());
    event
}

async fn register(
    state: &AppState,
    peer: SocketAddr,
    institution: &Institution,
    s: &Separators,
    pid: &Segment<'_>,
    visit: Option<Value>,
) -> Result<String, Nak> {
    let resident_system = state.settings.empi.resident_id_system.clone();
    let patient = patient_from_pid(s, pid, institution, &resident_system)?;
    let actor = crate::service::Actor::Member(crate::auth::Caller::feed(institution.clone()));
    let template = feed_event(state, "create", "C", institution, peer);
    let done = async {
        let permit = crate::service::authz::Permit::<PatientCreate>::check(actor)?;
        crate::service::patients::register(state, &permit, patient, None, visit, template).await
    }
    .await
    .map_err(|e| match e.field.as_deref() {
        Some(f) if f.starts_with("Encounter") => visit_nak(e),
        Some(f) if f.starts_with("Patient") => {
            let loc = pid_location(f);
            nak(AckCode::Error, 102, Some(loc), e.message)
        }
        _ => internal(e),
    })?;
    let opened = done.visit;
    let done = done.patient;
    let person = done
        .record
        .link
        .as_ref()
        .map(|l| l.person_id.as_str())
        .unwrap_or("");
    let outcome = match done.outcome {
        RegistrationOutcome::Created => "created",
        RegistrationOutcome::Updated => "updated",
        RegistrationOutcome::Unchanged => "unchanged",
    };
    let mut text = format!("{outcome} Patient/{} person {person}", done.record.id);
    if let Some((visit_outcome, encounter)) = opened {
        text.push_str(&format!(
            "; {} Encounter/{}",
            outcome_word(visit_outcome, encounter.status),
            encounter.id
        ));
    }
    Ok(text)
}

async fn merge(
    state: &AppState,
    peer: SocketAddr,
    institution: &Institution,
    s: &Separators,
    pid: &Segment<'_>,
    mrg: &Segment<'_>,
) -> Result<String, Nak> {
    let resident_oid = resident_oid(state);
    let surviving = pid_record_number(state, s, pid, institution)?;
    let prior = record_number(s, field(mrg, 1), institution, &resident_oid).ok_or_else(|| {
        nak(
            AckCode::Error,
            101,
            Some("MRG^1^1"),
            format!(
                "MRG-1 (prior patient identifier list) has no record number of {}",
                institution.id
            ),
        )
    })?;
    if surviving == prior {
        return Err(nak(
            AckCode::Error,
            205,
            Some("MRG^1^1"),
            "MRG-1 names the same record as PID-3",
        ));
    }
    let system = institution.patient_id_system.clone();
    let actor = actor(institution);
    let template = feed_event(state, "update", "U", institution, peer);
    let (surv_id, prior_id, person, outcome, merged) = state
        .auditor
        .change(template, move |tx, event| {
            let find = |conn: &mut _, value: &str, loc: &'static str| {
                empi::find_by_identifier(conn, &system, value)
                    .map_err(ApiError::from)?
                    .ok_or_else(|| {
                        ApiError::new(
                            ErrorCode::NotFound,
                            format!("{loc}: record {value} of this institution is not registered"),
                        )
                    })
            };
            let surv = find(tx.conn(), &surviving, "PID-3")?;
            let prior = find(tx.conn(), &prior, "MRG-1")?;
            event
                .entities
                .push(EntityRef::resource(format!("Patient/{}", surv.id)));
            event
                .entities
                .push(EntityRef::resource(format!("Patient/{}", prior.id)));
            let person_of = |r: &empi::StoredRecord| {
                r.link
                    .as_ref()
                    .map(|l| l.person_id.clone())
                    .ok_or_else(|| ApiError::internal(format!("record {} has no person", r.id)))
            };
            let (target, source) = (person_of(&surv)?, person_of(&prior)?);
            event.patient_id = Some(target.clone());
            if target == source {
                return Ok::<_, ApiError>((surv.id, prior.id, target, "already one person", None));
            }
            empi::merge(tx, &target, &source, &actor)?;
            Ok((surv.id, prior.id, target, "merged", Some(source)))
        })
        .await
        .map_err(|e| {
            let loc = if e.message.starts_with("MRG-1") {
                "MRG^1^1"
            } else {
                "PID^1^3"
            };
            let mut n = internal(e);
            if n.code == 204 {
                n.location = Some(loc.into());
            }
            n
        })?;
    if let Some(source) = &merged {
        state.persons_merged(&[&person, source]).await;
    }
    Ok(format!(
        "{outcome}: Patient/{prior_id} and Patient/{surv_id} are person {person}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_escapes_text_with_the_message_separators() {
        let m = Message::parse("MSH|^~\\&|HIS|fz-001|YQ|YQ|20260101||ADT^A01^ADT_A01|c1|P|2.5")
            .unwrap_or_else(|e| panic!("{e}"));
        let h = header_of(&m);
        assert_eq!(h.event, "A01");
        assert_eq!(h.control_id, "c1");
        let ack = build_ack(
            &h,
            Err(nak(
                AckCode::Error,
                102,
                Some("PID^1^7"),
                "bad | value ^ here",
            )),
        );
        let segs: Vec<&str> = ack.split('\r').collect();
        assert!(segs[0].starts_with("MSH|^~\\&|YIQIAO|YIQIAO|HIS|fz-001|"));
        assert!(segs[0].contains("|ACK^A01^ACK|"));
        assert!(segs[0].ends_with("|P|2.5"));
        assert_eq!(segs[1], "MSA|AE|c1|bad \\F\\ value \\S\\ here");
        assert!(segs[2].starts_with("ERR||PID^1^7|102^Data type error^HL70357|E|"));
    }

    #[test]
    fn unescape_handles_han_text_and_custom_delimiters() {
        let d = Separators::default();
        assert_eq!(unescape(&d, "鼓楼路1号\\T\\2单元"), "鼓楼路1号&2单元");
        assert_eq!(unescape(&d, "a\\F\\b\\S\\c\\R\\d\\E\\e"), "a|b^c~d\\e");
        assert_eq!(unescape(&d, "\\XE5BCA0\\三"), "张三");
        assert_eq!(unescape(&d, "x\\H\\y\\N\\"), "xy");
        assert_eq!(unescape(&d, "open\\F"), "open\\F");
        let custom = Separators {
            component: '#',
            escape: '!',
            ..Separators::default()
        };
        assert_eq!(unescape(&custom, "王!S!五"), "王#五");
    }

    #[test]
    fn hl7_timestamps_become_utc() {
        let t = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok();
        // Without an offset: China Standard Time.
        assert_eq!(parse_ts("20261129"), t("2026-11-28 16:00:00"));
        assert_eq!(parse_ts("2026112908"), t("2026-11-29 00:00:00"));
        assert_eq!(parse_ts("202611290830"), t("2026-11-29 00:30:00"));
        assert_eq!(parse_ts("20261129083015.25"), t("2026-11-29 00:30:15.25"));
        assert_eq!(parse_ts("20261129083015+0000"), t("2026-11-29 08:30:15"));
        assert_eq!(parse_ts("20261129083015-0530"), t("2026-11-29 14:00:15"));
        for bad in [
            "",
            "2026-11-29",
            "2026112",
            "202611290",
            "20261399",
            "202611290830.5",
            "20261129083015.12345",
            "20261129+08",
            "20261129083015+2500",
        ] {
            assert_eq!(parse_ts(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reject_raw_without_msh_still_answers() {
        let ack = reject_raw(b"\xff\xfe garbage", "not HL7");
        assert!(ack.contains("MSA|AR||not HL7\r"), "{ack}");
    }
}
