//! HL7 v2 over MLLP as the feed reads it: frame decoding, the structure limits checked before
//! parsing, the parser, the AR answer built from raw bytes, escape decoding and PID → FHIR
//! Patient. The input is fed both as an MLLP byte stream and as one message.
#![no_main]

#[path = "common.rs"]
mod common;

use hl7_parser::Message;
use libfuzzer_sys::fuzz_target;
use yiqiao_gateway::mllp::adt;
use yiqiao_gateway::mllp::limits::{self, ParseLimits};
use yiqiao_gateway::mllp::settings::MllpSettings;
use yiqiao_gateway::mllp::{Decoder, Frame};

fn message(bytes: &[u8], limits: &ParseLimits) {
    let _ = adt::reject_raw(bytes, "fuzz");
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let text = text.trim_matches(|c| c == '\r' || c == '\n');
    if !text.starts_with("MSH") || limits::check(text, limits).is_err() {
        return;
    }
    let Ok(message) = Message::parse_with_lenient_newlines(text, true) else {
        return;
    };
    for seg in message.segments() {
        for field in seg.fields() {
            let _ = adt::unescape(&message.separators, field.raw_value());
        }
    }
    if let Some(pid) = message.segment("PID") {
        let _ = adt::patient_from_pid(
            &message.separators,
            pid,
            common::institution(),
            common::RESIDENT_SYSTEM,
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = ParseLimits::of(&MllpSettings::default());
    let mut decoder = Decoder::new(64 * 1024);
    let mut rest = data;
    while !rest.is_empty() {
        let (used, frame) = decoder.feed(rest);
        match frame {
            Some(Frame::Message(m)) | Some(Frame::Oversized(m)) => message(&m, &limits),
            _ => {}
        }
        if used == 0 {
            break;
        }
        rest = &rest[used..];
    }
    message(data, &limits);
});
