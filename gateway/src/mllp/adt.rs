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

/// Acknowledgment code (HL7 table 0008, original mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCode {
    Accept,
    Error,
    Reject,
}

impl AckCode {
    fn as_str(self) -> &'static str {
        match self {
            AckCode::Accept => "AA",
            AckCode::Error => "AE",
            AckCode::Reject => "AR",
        }
    }
}

/// A failure to answer with AE or AR: the reason, where (segment, field) and the code of HL7
/// table 0357.
#[derive(Debug)]
pub struct Nak {
    pub ack: AckCode,
    pub code: u16,
    /// `PID^1^7` (ERR-2: segment id, sequence, field).
    pub location: Option<String>,
    pub message: String,
}

fn nak(ack: AckCode, code: u16, location: Option<&str>, message: impl Into<String>) -> Nak {
    Nak {
        ack,
        code,
        location: location.map(String::from),
        message: message.into(),
    }
}

fn code_text(code: u16) -> &'static str {
    match code {
        100 => "Segment sequence error",
        101 => "Required field missing",
        102 => "Data type error",
        103 => "Table value not found",
        200 => "Unsupported message type",
        201 => "Unsupported event code",
        204 => "Unknown key identifier",
        205 => "Duplicate key identifier",
        206 => "Application record locked",
        _ => "Application internal error",
    }
}

/// What the ACK echoes of the message.
#[derive(Debug, Default)]
struct Header {
    separators: Separators,
    sending_app: String,
    sending_facility: String,
    control_id: String,
    processing_id: String,
    version: String,
    event: String,
}

fn encode(separators: &Separators, text: &str) -> String {
    separators.encode(text).to_string()
}

fn now_ts() -> String {
    chrono::Utc::now().format("%Y%m%d%H%M%S%z").to_string()
}

/// Our control id for an ACK (MSH-10, at most 20 characters).
fn control_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()[..20].to_uppercase()
}

fn build_ack(h: &Header, outcome: Result<String, Nak>) -> String {
    let s = &h.separators;
    let enc = format!(
        "{}{}{}{}",
        s.component, s.repetition, s.escape, s.subcomponent
    );
    let f = s.field;
    let c = s.component;
    let event = if h.event.is_empty() {
        String::new()
    } else {
        format!("{c}{}", h.event)
    };
    let mut out = format!(
        "MSH{f}{enc}{f}{GATEWAY_APPLICATION}{f}{GATEWAY_APPLICATION}{f}{}{f}{}{f}{}{f}{f}ACK{event}{c}ACK{f}{}{f}{}{f}{}\r",
        h.sending_app,
        h.sending_facility,
        now_ts(),
        control_id(),
        if h.processing_id.is_empty() {
            "P"
        } else {
            &h.processing_id
        },
        if h.version.is_empty() {
            "2.5"
        } else {
            &h.version
        },
    );
    match outcome {
        Ok(text) => out.push_str(&format!(
            "MSA{f}AA{f}{}{f}{}\r",
            h.control_id,
            encode(s, &text)
        )),
        Err(n) => {
            let text = encode(s, &n.message);
            out.push_str(&format!(
                "MSA{f}{}{f}{}{f}{text}\r",
                n.ack.as_str(),
                h.control_id
            ));
            out.push_str(&format!(
                "ERR{f}{f}{}{f}{}{c}{}{c}HL70357{f}E{f}{f}{f}{f}{text}\r",
                n.location.unwrap_or_default(),
                n.code,
                code_text(n.code),
            ));
        }
    }
    out
}

/// Bytes of a block read for the MSH of a reject.
const MSH_PREFIX: usize = 4096;

/// Answer a block that cannot be handled as a message (oversized, bad frame): AR, echoing
/// the MSH of `raw` when one can be read from its first segment.
pub fn reject_raw(raw: &[u8], reason: &str) -> String {
    reject_at(raw, None, reason)
}

/// [`reject_raw`] with ERR-2 (location). Only MSH-1 to MSH-12 of at most the first 4 KiB are
/// parsed, so the answer costs little whatever the block holds.
fn reject_at(raw: &[u8], location: Option<&str>, reason: &str) -> String {
    let prefix = String::from_utf8_lossy(&raw[..raw.len().min(MSH_PREFIX)]);
    let header = prefix
        .split(['\r', '\n'])
        .next()
        .filter(|seg| seg.starts_with("MSH"))
        .and_then(|seg| {
            let separator = seg[3..].chars().next()?;
            // MSH-1 is the 1st separator, so MSH-12 ends at the 13th.
            let end = seg
                .match_indices(separator)
                .nth(12)
                .map_or(seg.len(), |(i, _)| i);
            Message::parse(&seg[..end]).ok().map(|m| header_of(&m))
        })
        .unwrap_or_default();
    build_ack(&header, Err(nak(AckCode::Reject, 207, location, reason)))
}

/// Decode HL7 escape sequences (chapter 2.7): `\F\ \S\ \T\ \R\ \E\` → the message's own
/// delimiters, `\Xhh…\` → the bytes (UTF-8), `\.br\` → line break; formatting sequences
/// (`\H\ \N\ \.sp\ …`) are dropped; an unterminated escape is kept as it is. (hl7-parser's
/// own decoder slices by character count and panics on Chinese text, so it is not used.)
pub fn unescape(s: &Separators, raw: &str) -> String {
    let esc = s.escape;
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find(esc) {
        out.push_str(&rest[..start]);
        let after = &rest[start + esc.len_utf8()..];
        let Some(end) = after.find(esc) else {
            out.push_str(&rest[start..]);
            return out.trim().to_string();
        };
        let seq = &after[..end];
        match seq {
            "F" => out.push(s.field),
            "S" => out.push(s.component),
            "T" => out.push(s.subcomponent),
            "R" => out.push(s.repetition),
            "E" => out.push(esc),
            ".br" => out.push('\n'),
            _ if seq.starts_with('X') && seq.len() % 2 == 1 => {
                let bytes: Option<Vec<u8>> = (1..seq.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(seq.get(i..i + 2)?, 16).ok())
                    .collect();
                match bytes {
                    Some(b) => out.push_str(&String::from_utf8_lossy(&b)),
                    None => {
                        out.push(esc);
                        out.push_str(seq);
                        out.push(esc);
                    }
                }
            }
            // Highlighting and formatting commands carry no data.
            _ => {}
        }
        rest = &after[end + esc.len_utf8()..];
    }
    out.push_str(rest);
    out.trim().to_string()
}

fn decoded(separators: &Separators, raw: &str) -> String {
    unescape(separators, raw)
}

fn field<'m>(seg: &'m Segment<'m>, n: usize) -> Option<&'m Field<'m>> {
    seg.field(n).filter(|f| !f.is_empty())
}

/// Component `n` (1-based) of a repeat, decoded (its first subcomponent when it has some).
fn comp(separators: &Separators, r: &Repeat<'_>, n: usize) -> String {
    r.component(n)
        .map(|c| match c.subcomponent(1) {
            Some(sc) if c.has_subcomponents() => decoded(separators, sc.raw_value()),
            _ => decoded(separators, c.raw_value()),
        })
        .unwrap_or_default()
}

fn header_of(m: &Message<'_>) -> Header {
    let s = m.separators;
    let Some(msh) = m.segment("MSH") else {
        return Header {
            separators: s,
            ..Header::default()
        };
    };
    let raw = |n: usize| {
        msh.field(n)
            .map(|f| f.raw_value())
            .unwrap_or("")
            .to_string()
    };
    let event = msh
        .field(9)
        .and_then(|f| f.component(2))
        .map(|c| c.raw_value().to_string())
        .unwrap_or_default();
    Header {
        separators: s,
        sending_app: raw(3),
        sending_facility: raw(4),
        control_id: raw(10),
        processing_id: raw(11),
        version: raw(12),
        event,
    }
}

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

/// The first field holding a control character other than tab, raw or decoded from an escape
/// sequence (`\X00\`), as (`PID^1^5`, the character): refused at the edge before anything is
/// looked up or stored (crate::sanitize). Escapes never span a delimiter, so each component is
/// decoded alone; MSH-2 (the delimiters themselves) is skipped.
fn control_character(s: &Separators, text: &str) -> Option<(String, char)> {
    for segment in text.split(['\r', '\n']) {
        let name = segment.get(..3).unwrap_or(segment);
        let msh = name == "MSH";
        for (i, field) in segment.split(s.field).enumerate() {
            if msh && i == 1 {
                continue;
            }
            let found = field
                .split([s.component, s.repetition, s.subcomponent])
                .find_map(|atom| first_refused(&unescape(s, atom), true));
            if let Some(c) = found {
                // MSH-1 is the field separator itself: MSH's fields are numbered one up.
                let number = if msh { i + 1 } else { i };
                return Some((format!("{}^1^{number}", escaped(name)), c));
            }
        }
    }
    None
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

/// HL7 location of a FHIR field: the first (prefix, location) of `table` whose prefix the
/// field starts with, else `default`.
fn hl7_location(
    fhir_field: &str,
    table: &[(&str, &'static str)],
    default: &'static str,
) -> &'static str {
    table
        .iter()
        .find(|(prefix, _)| fhir_field.starts_with(prefix))
        .map_or(default, |(_, location)| location)
}

/// HL7 location of a Patient field named by the registration's validation.
fn pid_location(fhir_field: &str) -> &'static str {
    const PID: [(&str, &str); 5] = [
        ("Patient.name", "PID^1^5"),
        ("Patient.birthDate", "PID^1^7"),
        ("Patient.gender", "PID^1^8"),
        ("Patient.telecom", "PID^1^13"),
        ("Patient.address", "PID^1^11"),
    ];
    hl7_location(fhir_field, &PID, "PID^1^3")
}

fn is_resident_id(s: &Separators, r: &Repeat<'_>, resident_oid: &str) -> bool {
    let kind = comp(s, r, 5);
    let authority_uid = r
        .component(4)
        .and_then(|c| c.subcomponent(2))
        .map(|sc| decoded(s, sc.raw_value()))
        .unwrap_or_default();
    RESIDENT_ID_TYPES.contains(&kind.as_str())
        || (!authority_uid.is_empty() && authority_uid == resident_oid)
}

fn authority(s: &Separators, r: &Repeat<'_>) -> String {
    r.component(4)
        .map(|c| match c.subcomponent(1) {
            Some(sc) if c.has_subcomponents() => decoded(s, sc.raw_value()),
            _ => decoded(s, c.raw_value()),
        })
        .unwrap_or_default()
}

/// The institution's own record number among the repetitions of a CX list (PID-3, MRG-1):
/// type MR/PI/PT (or no type) assigned by nobody or by the institution itself.
fn record_number(
    s: &Separators,
    list: Option<&Field<'_>>,
    institution: &Institution,
    resident_oid: &str,
) -> Option<String> {
    let own: Vec<&Repeat<'_>> = list
        .map(|f| f.repeats().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| {
            let a = authority(s, r);
            !comp(s, r, 1).is_empty()
                && !is_resident_id(s, r, resident_oid)
                && (a.is_empty() || a == institution.id.as_str())
        })
        .collect();
    own.iter()
        .find(|r| RECORD_TYPES.contains(&comp(s, r, 5).as_str()))
        .or_else(|| own.iter().find(|r| comp(s, r, 5).is_empty()))
        .map(|r| comp(s, r, 1))
}

/// PID → FHIR Patient carrying the institution's record number in its `patient_id_system`.
pub fn patient_from_pid(
    s: &Separators,
    pid: &Segment<'_>,
    institution: &Institution,
    resident_system: &str,
) -> Result<Value, Nak> {
    let resident_oid = resident_system.trim_start_matches("urn:oid:");
    let ids = field(pid, 3).ok_or_else(|| {
        nak(
            AckCode::Error,
            101,
            Some("PID^1^3"),
            "PID-3 (patient identifier list) is required",
        )
    })?;
    let own = record_number(s, Some(ids), institution, resident_oid).ok_or_else(|| {
        nak(
            AckCode::Error,
            101,
            Some("PID^1^3"),
            format!(
                "PID-3 has no record number of {} (type MR, PI or PT, assigning authority empty or {})",
                institution.id, institution.id
            ),
        )
    })?;
    let mut identifiers = vec![json!({
        "use": "usual",
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR" }] },
        "system": institution.patient_id_system,
        "value": own,
    })];
    for r in ids.repeats() {
        let value = comp(s, r, 1);
        if value.is_empty() || value == own {
            continue;
        }
        if is_resident_id(s, r, resident_oid) {
            identifiers.push(json!({
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN" }] },
                "system": resident_system,
                "value": value,
            }));
        }
    }
    let mut patient = json!({
        "resourceType": "Patient",
        "identifier": identifiers,
    });
    // Name: the legal one (XPN-7 = L), else the first.
    if let Some(names) = field(pid, 5) {
        let reps: Vec<&Repeat<'_>> = names.repeats().collect();
        let chosen = reps
            .iter()
            .find(|r| comp(s, r, 7) == "L")
            .or_else(|| reps.first());
        if let Some(r) = chosen {
            let family = comp(s, r, 1);
            let given: Vec<String> = [comp(s, r, 2), comp(s, r, 3)]
                .into_iter()
                .filter(|g| !g.is_empty())
                .collect();
            let mut name = json!({ "use": "official" });
            if !family.is_empty() {
                name["family"] = json!(family);
            }
            if !given.is_empty() {
                name["given"] = json!(given);
            }
            patient["name"] = json!([name]);
        }
    }
    if patient.get("name").is_none() {
        return Err(nak(
            AckCode::Error,
            101,
            Some("PID^1^5"),
            "PID-5 (patient name) is required",
        ));
    }
    if let Some(f) = field(pid, 7) {
        let raw = f
            .component(1)
            .map(|c| decoded(s, c.raw_value()))
            .unwrap_or_default();
        let digits: String = raw.chars().take_while(char::is_ascii_digit).collect();
        let bad = || {
            nak(
                AckCode::Error,
                102,
                Some("PID^1^7"),
                format!("PID-7 (date of birth) {raw:?} is not a date YYYY[MM[DD]]"),
            )
        };
        let birth = match digits.len() {
            4 => digits.clone(),
            6 => format!("{}-{}", &digits[..4], &digits[4..6]),
            n if n >= 8 => {
                let d = NaiveDate::parse_from_str(&digits[..8], "%Y%m%d").map_err(|_| bad())?;
                d.format("%Y-%m-%d").to_string()
            }
            _ => return Err(bad()),
        };
        if digits.len() == 6 && !(1..=12).contains(&digits[4..6].parse::<u32>().unwrap_or(0)) {
            return Err(bad());
        }
        patient["birthDate"] = json!(birth);
    }
    if let Some(f) = field(pid, 8) {
        let sex = decoded(s, f.raw_value());
        let gender = match sex.as_str() {
            "M" => "male",
            "F" => "female",
            "O" => "other",
            "U" | "A" | "N" => "unknown",
            other => {
                return Err(nak(
                    AckCode::Error,
                    103,
                    Some("PID^1^8"),
                    format!("PID-8 (administrative sex) {other:?} is not one of M, F, O, U, A, N"),
                ));
            }
        };
        patient["gender"] = json!(gender);
    }
    if let Some(f) = field(pid, 11)
        && let Some(r) = f.repeats().next()
    {
        let mut a = serde_json::Map::new();
        let lines: Vec<String> = [comp(s, r, 1), comp(s, r, 2)]
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect();
        if !lines.is_empty() {
            a.insert("line".into(), json!(lines));
        }
        for (n, key) in [
            (3, "city"),
            (4, "state"),
            (5, "postalCode"),
            (6, "country"),
            (9, "district"),
        ] {
            let v = comp(s, r, n);
            if !v.is_empty() {
                a.insert(key.into(), json!(v));
            }
        }
        if !a.is_empty() {
            patient["address"] = json!([Value::Object(a)]);
        }
    }
    let mut telecom = Vec::new();
    for (n, use_) in [(13, "home"), (14, "work")] {
        for r in field(pid, n).into_iter().flat_map(|f| f.repeats()) {
            let number = [comp(s, r, 1), comp(s, r, 12)]
                .into_iter()
                .find(|v| !v.is_empty())
                .or_else(|| {
                    let local = format!("{}{}", comp(s, r, 6), comp(s, r, 7));
                    (!local.is_empty()).then_some(local)
                });
            if let Some(v) = number {
                let system = if comp(s, r, 3) == "Internet" || v.contains('@') {
                    "email"
                } else {
                    "phone"
                };
                telecom.push(json!({ "system": system, "value": v, "use": use_ }));
            }
        }
    }
    if !telecom.is_empty() {
        patient["telecom"] = json!(telecom);
    }
    Ok(patient)
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
fn visit_nak(e: ApiError) -> Nak {
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
fn outcome_word(outcome: UpsertOutcome, status: EncounterStatus) -> &'static str {
    match (outcome, status) {
        (UpsertOutcome::Unchanged, _) => "unchanged",
        (UpsertOutcome::Created, _) => "opened",
        (UpsertOutcome::Updated, EncounterStatus::Finished) => "finished",
        (UpsertOutcome::Updated, EncounterStatus::Cancelled) => "cancelled",
        (UpsertOutcome::Updated, _) => "updated",
    }
}

/// An HL7 v2 timestamp (DTM: `YYYYMMDD[HH[MM[SS[.S[S[S[S]]]]]]][+/-ZZZZ]`) in UTC; without an
/// offset it is China Standard Time. At least the day is required.
pub fn parse_ts(raw: &str) -> Option<NaiveDateTime> {
    let raw = raw.trim();
    let (main, offset) = match raw.rfind(['+', '-']) {
        Some(i) if i >= 8 => (&raw[..i], Some(&raw[i..])),
        _ => (raw, None),
    };
    let (digits, fraction) = main.split_once('.').unwrap_or((main, ""));
    let all_digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(digits)
        || !all_digits(fraction)
        || !matches!(digits.len(), 8 | 10 | 12 | 14)
        || fraction.len() > 4
        || (!fraction.is_empty() && digits.len() != 14)
    {
        return None;
    }
    let local = NaiveDateTime::parse_from_str(&format!("{digits:0<14}"), "%Y%m%d%H%M%S").ok()?;
    let micros: i64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<6}").parse().ok()?
    };
    let offset_secs = match offset {
        None => FEED_UTC_OFFSET_SECS,
        Some(o) => {
            let (sign, hhmm) = o.split_at(1);
            if hhmm.len() != 4 || !all_digits(hhmm) {
                return None;
            }
            let (h, m): (i64, i64) = (hhmm[..2].parse().ok()?, hhmm[2..].parse().ok()?);
            if h > 14 || m > 59 {
                return None;
            }
            if sign == "-" {
                -(h * 3600 + m * 60)
            } else {
                h * 3600 + m * 60
            }
        }
    };
    Some(local + Duration::microseconds(micros) - Duration::seconds(offset_secs))
}

fn utc_text(t: NaiveDateTime) -> String {
    format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

/// A time from `seg`'s field `n` (first component), else the message time MSH-7.
fn time_or_message_time(
    seg: &Segment<'_>,
    n: usize,
    location: &str,
    msh: &Segment<'_>,
) -> Result<NaiveDateTime, Nak> {
    let (raw, location) = match field(seg, n).and_then(|f| f.component(1)) {
        Some(c) => (c.raw_value(), location),
        None => (
            field(msh, 7)
                .and_then(|f| f.component(1))
                .map(|c| c.raw_value())
                .ok_or_else(|| {
                    nak(
                        AckCode::Error,
                        101,
                        Some("MSH^1^7"),
                        format!("{location} is empty and MSH-7 (message time) is missing"),
                    )
                })?,
            "MSH^1^7",
        ),
    };
    parse_ts(raw).ok_or_else(|| {
        nak(
            AckCode::Error,
            102,
            Some(location),
            format!("{raw:?} is not a time YYYYMMDD[HHMM[SS[.S]]][+/-ZZZZ]"),
        )
    })
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
fn opening_visit(
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
async fn change_visit(
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
            let (outcome, stored) = crate::service::encounters::upsert_in(
                tx,
                &new,
                yiqiao_registry::encounters::Precondition::None,
            )?;
            let (interaction, action) = crate::service::encounters::interaction(outcome);
            event.subtype_code = interaction.into();
            event.action = action.into();
            event.entities.push(EntityRef::resource(format!(
                "Encounter/{}/_history/{}",
                stored.id, stored.version
            )));
            event.patient_id = stored.person_id.clone();
            Ok((outcome, stored))
        })
        .await
        .map_err(visit_nak)?;
    Ok(format!(
        "{} Encounter/{}",
        outcome_word(outcome, encounter.status),
        encounter.id
    ))
}

/// The OID of the resident-ID system (PID-3 repetitions assigned by it are not record numbers).
fn resident_oid(state: &AppState) -> String {
    state
        .settings
        .empi
        .resident_id_system
        .trim_start_matches("urn:oid:")
        .to_string()
}

/// The sender's own record number in PID-3 (AE 101 at `PID^1^3` when there is none).
fn pid_record_number(
    state: &AppState,
    s: &Separators,
    pid: &Segment<'_>,
    institution: &Institution,
) -> Result<String, Nak> {
    record_number(s, field(pid, 3), institution, &resident_oid(state)).ok_or_else(|| {
        nak(
            AckCode::Error,
            101,
            Some("PID^1^3"),
            format!("PID-3 has no record number of {}", institution.id),
        )
    })
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
