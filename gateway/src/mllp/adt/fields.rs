//! Reading HL7 v2 fields: escape sequences, components, the message header, timestamps.

use super::*;

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

pub(super) fn decoded(separators: &Separators, raw: &str) -> String {
    unescape(separators, raw)
}

pub(super) fn field<'m>(seg: &'m Segment<'m>, n: usize) -> Option<&'m Field<'m>> {
    seg.field(n).filter(|f| !f.is_empty())
}

/// Component `n` (1-based) of a repeat, decoded (its first subcomponent when it has some).
pub(super) fn comp(separators: &Separators, r: &Repeat<'_>, n: usize) -> String {
    r.component(n)
        .map(|c| match c.subcomponent(1) {
            Some(sc) if c.has_subcomponents() => decoded(separators, sc.raw_value()),
            _ => decoded(separators, c.raw_value()),
        })
        .unwrap_or_default()
}

pub(super) fn header_of(m: &Message<'_>) -> Header {
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

/// The first field holding a control character other than tab, raw or decoded from an escape
/// sequence (`\X00\`), as (`PID^1^5`, the character): refused at the edge before anything is
/// looked up or stored (crate::sanitize). Escapes never span a delimiter, so each component is
/// decoded alone; MSH-2 (the delimiters themselves) is skipped.
pub(super) fn control_character(s: &Separators, text: &str) -> Option<(String, char)> {
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

pub(super) fn utc_text(t: NaiveDateTime) -> String {
    format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

/// A time from `seg`'s field `n` (first component), else the message time MSH-7.
pub(super) fn time_or_message_time(
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
