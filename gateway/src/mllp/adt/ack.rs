//! The original-mode acknowledgement: AA/AE/AR with MSA and ERR, and the rejections
//! answered before a message could be parsed.

use super::*;

/// Acknowledgment code (HL7 table 0008, original mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCode {
    Accept,
    Error,
    Reject,
}

impl AckCode {
    pub(super) fn as_str(self) -> &'static str {
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

pub(super) fn nak(
    ack: AckCode,
    code: u16,
    location: Option<&str>,
    message: impl Into<String>,
) -> Nak {
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
pub(super) struct Header {
    pub(super) separators: Separators,
    pub(super) sending_app: String,
    pub(super) sending_facility: String,
    pub(super) control_id: String,
    pub(super) processing_id: String,
    pub(super) version: String,
    pub(super) event: String,
}

fn encode(separators: &Separators, text: &str) -> String {
    separators.encode(text).to_string()
}

fn now_ts() -> String {
    chrono::Utc::now().format("%Y%m%d%H%M%S%z").to_string()
}

/// Our control id for an ACK (MSH-10, at most 20 characters).
pub(super) fn control_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()[..20].to_uppercase()
}

pub(super) fn build_ack(h: &Header, outcome: Result<String, Nak>) -> String {
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
pub(super) fn reject_at(raw: &[u8], location: Option<&str>, reason: &str) -> String {
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
