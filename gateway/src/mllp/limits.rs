//! Bounds on a message's structure, checked on its text before it is parsed.
//!
//! The parser (`hl7-parser`) allocates a node for every field, repetition, component and
//! subcomponent — a few hundred bytes each — so a 1 MiB block of 500,000 empty fields cost
//! over 400 MB. One pass over the characters counts what the parser would build and stops at
//! the first limit passed: the message is then answered AR naming the limit (its
//! `mllp.*` setting), and nothing more is allocated for it.

use std::collections::HashMap;

use super::settings::MllpSettings;

/// The structure limits of `[mllp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseLimits {
    pub segments: usize,
    pub fields: usize,
    pub repetitions: usize,
    pub components: usize,
    pub values: usize,
}

impl ParseLimits {
    pub fn of(s: &MllpSettings) -> ParseLimits {
        ParseLimits {
            segments: s.max_segments.max(1),
            fields: s.max_fields_per_segment.max(1),
            repetitions: s.max_repetitions_per_field.max(1),
            components: s.max_components.max(1),
            values: s.max_values.max(1),
        }
    }
}

/// A limit passed: where (ERR-2, e.g. `PID^1^3`) and which limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Breach {
    pub location: Option<String>,
    pub message: String,
}

/// The delimiters of MSH-1 and MSH-2 (the HL7 defaults where the message gives none).
struct Delimiters {
    field: char,
    component: char,
    repetition: char,
    subcomponent: char,
    /// Bytes of `MSH` + MSH-1 + MSH-2: not counted (MSH-2 holds the delimiters themselves).
    header_len: usize,
}

fn delimiters(text: &str) -> Delimiters {
    let field = text.get(3..).and_then(|t| t.chars().next()).unwrap_or('|');
    let start = 3 + field.len_utf8();
    let mut encoding = ['^', '~', '\\', '&'];
    let mut header_len = start;
    let msh2 = text
        .get(start..)
        .unwrap_or("")
        .chars()
        .take_while(|c| *c != field && *c != '\r' && *c != '\n');
    for (i, c) in msh2.enumerate() {
        if let Some(slot) = encoding.get_mut(i) {
            *slot = c;
        }
        header_len += c.len_utf8();
    }
    let [component, repetition, _escape, subcomponent] = encoding;
    Delimiters {
        field,
        component,
        repetition,
        subcomponent,
        header_len,
    }
}

/// `what` has more than `max` `unit` (the setting `mllp.{key}`).
fn over(location: Option<String>, what: &str, max: usize, unit: &str, key: &str) -> Breach {
    Breach {
        location,
        message: format!("{what} has more than {max} {unit} (limit mllp.{key})"),
    }
}

/// Check `text` (an HL7 v2 message, segments separated by CR or LF) against `limits`.
pub fn check(text: &str, limits: &ParseLimits) -> Result<(), Breach> {
    let d = delimiters(text);
    let mut values = 0usize;
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut segments = 0usize;
    for segment in text.split(['\r', '\n']) {
        if segment.is_empty() {
            continue;
        }
        let first = segments == 0;
        segments += 1;
        if segments > limits.segments {
            let max = limits.segments;
            return Err(over(None, "the message", max, "segments", "max_segments"));
        }
        let id: String = segment
            .chars()
            .take_while(|c| *c != d.field)
            .take(3)
            .collect();
        let seq = {
            let count = seen.entry(id.clone()).or_insert(0);
            *count += 1;
            *count
        };
        // MSH-1 is the field separator itself and MSH-2 the delimiters: fields start at 3.
        let (body, mut field) = if first && segment.starts_with("MSH") {
            (segment.get(d.header_len..).unwrap_or(""), 2)
        } else {
            (segment, 0)
        };
        let (mut repetitions, mut components, mut subcomponents) = (1, 1, 1);
        values += 1;
        let at = |field: usize| Some(format!("{id}^{seq}^{field}"));
        for c in body.chars() {
            let breach = if c == d.field {
                field += 1;
                (repetitions, components, subcomponents) = (1, 1, 1);
                (field > limits.fields).then(|| {
                    let what = format!("segment {id}");
                    let location = Some(format!("{id}^{seq}"));
                    over(
                        location,
                        &what,
                        limits.fields,
                        "fields",
                        "max_fields_per_segment",
                    )
                })
            } else if c == d.repetition {
                repetitions += 1;
                (components, subcomponents) = (1, 1);
                (repetitions > limits.repetitions).then(|| {
                    let (what, max) = (format!("{id}-{field}"), limits.repetitions);
                    over(
                        at(field),
                        &what,
                        max,
                        "repetitions",
                        "max_repetitions_per_field",
                    )
                })
            } else if c == d.component || c == d.subcomponent {
                let n = if c == d.component {
                    components += 1;
                    subcomponents = 1;
                    components
                } else {
                    subcomponents += 1;
                    subcomponents
                };
                (n > limits.components).then(|| {
                    let (what, max) = (format!("{id}-{field}"), limits.components);
                    over(
                        at(field),
                        &what,
                        max,
                        "components or subcomponents",
                        "max_components",
                    )
                })
            } else {
                continue;
            };
            values += 1;
            if let Some(b) = breach {
                return Err(b);
            }
            if values > limits.values {
                let unit = "values (fields, repetitions, components)";
                return Err(over(
                    at(field),
                    "the message",
                    limits.values,
                    unit,
                    "max_values",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const LIMITS: ParseLimits = ParseLimits {
        segments: 4,
        fields: 12,
        repetitions: 3,
        components: 5,
        values: 60,
    };
    const MSH: &str = "MSH|^~\\&|HIS|hosp-001|YQ|YQ|20260101||ADT^A01^ADT_A01|c1|P|2.5";

    fn breach(text: &str) -> Breach {
        check(text, &LIMITS).unwrap_err()
    }

    #[test]
    fn a_message_within_the_limits_passes() {
        let text = format!("{MSH}\rPID|1||M1^^^h^MR~R2||张^伟||19800102|M\r\nPV1|1|O\n");
        assert_eq!(check(&text, &LIMITS), Ok(()));
        // The delimiters in MSH-2 are not counted as components.
        assert_eq!(check("MSH|^~\\&&&&&&&&|a", &LIMITS), Ok(()));
    }

    #[test]
    fn each_limit_is_named_with_its_location() {
        let b = breach(&format!("{MSH}\rPID{}", "|".repeat(500_000)));
        assert_eq!(b.location.as_deref(), Some("PID^1"));
        assert!(b.message.contains("mllp.max_fields_per_segment"), "{b:?}");
        // MSH counts MSH-1 and MSH-2: its 13th field is over the limit of 12.
        assert_eq!(
            breach(&format!("{MSH}|x")).location.as_deref(),
            Some("MSH^1")
        );
        let b = breach(&format!("{MSH}\rPID|1||a~b~c~d"));
        assert_eq!(b.location.as_deref(), Some("PID^1^3"));
        assert!(b.message.contains("max_repetitions_per_field"), "{b:?}");
        let b = breach(&format!("{MSH}\rNTE|1\rPID|1||a^b^c^d^e^f"));
        assert_eq!(b.location.as_deref(), Some("PID^1^3"));
        assert!(b.message.contains("mllp.max_components"), "{b:?}");
        let b = breach(&format!("{MSH}\rPID|1||a^b&c&d&e&f&g"));
        assert!(b.message.contains("mllp.max_components"), "{b:?}");
        let b = breach(&format!("{MSH}\rNTE|1\rNTE|2\rNTE|3\rNTE|4"));
        assert!(b.message.contains("mllp.max_segments"), "{b:?}");
        let many = "|a^b^c^d~e^f^g^h~i".repeat(4);
        let b = breach(&format!("{MSH}\rPID{many}\rPV1{many}"));
        assert!(b.message.contains("mllp.max_values"), "{b:?}");
        assert_eq!(b.location.as_deref(), Some("PV1^1^2"));
    }

    #[test]
    fn custom_delimiters_are_honoured() {
        let text = "MSH#*~\\&#HIS#h#YQ#YQ#20260101##ADT*A01#c1#P#2.5\rPID#1##a|b|c|d|e|f|g";
        assert_eq!(check(text, &LIMITS), Ok(()));
        let b = breach("MSH#*~\\&#HIS#h#YQ#YQ#20260101##ADT*A01#c1#P#2.5\rPID#1##a*b*c*d*e*f");
        assert_eq!(b.location.as_deref(), Some("PID^1^3"));
    }
}
