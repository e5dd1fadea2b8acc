//! Input sanitation at the edge: control characters are refused before anything is stored.
//!
//! PostgreSQL cannot store U+0000 in a `text` column, and other control characters corrupt
//! logs, CSV reports and HL7 answers; so the gateway refuses them where input enters, the same
//! on both backends:
//!
//! - **path segments, query parameters and the headers we read** (`X-On-Behalf-Of`,
//!   `X-Yiqiao-User`, `X-Break-Glass-Reason`, `If-Match`): no control character at all (Unicode
//!   category Cc: U+0000–U+001F, U+007F–U+009F), as decoded from percent-encoding. 400
//!   `invalid-parameter` naming the parameter (middleware [`refuse_control_characters`]);
//! - **JSON bodies** ([`crate::extract::ValidJson`], [`check_json_value`] for the HL7 v2 feed
//!   and the bulk import, which build FHIR resources of their own): every string value and
//!   every object key, at any depth, may contain tab, line feed and carriage return — what a
//!   FHIR `string` allows (FHIR R4 §2.1.0.3: "Strings SHALL NOT contain Unicode character points
//!   below 32, except for u0009, u000D and u000A") — and no other control character. 400
//!   `invalid-body` naming the field (`Consent.provision.actor[0].reference.reference`);
//! - **the token endpoint** (`POST /oauth2/token`) checks its own query string, form and
//!   assertion claims and answers with an OAuth error, so that every refused token request
//!   keeps its `auth_events` row (crate::oauth); so does the login callback
//!   (`GET /login/callback`, a refused login; crate::oidc). The middleware leaves them alone;
//! - **HL7 v2 messages**: after escape sequences are decoded (`\X00\` is a NUL), a field may
//!   hold tab but no other control character (AE 102 at the field; crate::mllp::adt).

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{Error, ResponseError};
use serde_json::Value;

use crate::error::{ApiError, ErrorCode};

/// Is `c` refused? Every control character (Unicode category Cc); in free text
/// (`free_text`) tab, line feed and carriage return are allowed.
pub fn refused(c: char, free_text: bool) -> bool {
    c.is_control() && !(free_text && matches!(c, '\t' | '\n' | '\r'))
}

/// The first refused character of `s`.
pub fn first_refused(s: &str, free_text: bool) -> Option<char> {
    s.chars().find(|c| refused(*c, free_text))
}

/// How an error names a refused character: `the control character U+0000`.
pub fn describe(c: char) -> String {
    format!("contains the control character U+{:04X}", u32::from(c))
}

/// `s` with every control character escaped (`\u{0}`), for naming a value in a message.
pub fn escaped(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Headers the gateway reads whose values reach storage or the audit trail.
const CHECKED_HEADERS: [&str; 4] = [
    "x-on-behalf-of",
    "x-yiqiao-user",
    crate::policy::BREAK_GLASS_HEADER,
    "if-match",
];

/// What an error calls each checked header.
fn header_name(lower: &str) -> &'static str {
    match lower {
        "x-on-behalf-of" => "X-On-Behalf-Of",
        "x-yiqiao-user" => "X-Yiqiao-User",
        "if-match" => "If-Match",
        _ => "X-Break-Glass-Reason",
    }
}

/// The token endpoint and the login callback answer for themselves (module docs).
const SELF_CHECKING: [&str; 2] = ["/oauth2/token", "/login/callback"];

/// Refuse a request whose path, query or read headers carry a control character (module docs).
pub async fn refuse_control_characters(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, Error> {
    if !SELF_CHECKING.contains(&req.path())
        && let Some(err) = request_problem(&req)
    {
        let res = err.error_response();
        return Ok(req.into_response(res).map_into_right_body());
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

fn request_problem(req: &ServiceRequest) -> Option<ApiError> {
    if let Some(err) = path_problem(req.path(), req.match_pattern().as_deref()) {
        return Some(err);
    }
    if let Some(err) = query_problem(req.query_string()) {
        return Some(err);
    }
    for name in CHECKED_HEADERS {
        for value in req.headers().get_all(name) {
            // Header values cannot carry NUL, CR or LF (the HTTP parser refuses them); tab and
            // UTF-8 encoded C1 controls can arrive.
            let text = String::from_utf8_lossy(value.as_bytes());
            if let Some(c) = first_refused(&text, false) {
                let name = header_name(name);
                return Some(ApiError::invalid_param(name, describe(c)));
            }
        }
    }
    None
}

/// A control character in a percent-decoded path segment, named by the route pattern's
/// parameter (`id`) when the segment is one, else `path`.
pub fn path_problem(path: &str, pattern: Option<&str>) -> Option<ApiError> {
    let pattern: Vec<&str> = pattern.unwrap_or_default().split('/').collect();
    for (i, segment) in path.split('/').enumerate() {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        if let Some(c) = first_refused(&decoded, false) {
            let name = pattern
                .get(i)
                .and_then(|p| p.strip_prefix('{'))
                .and_then(|p| p.strip_suffix('}'))
                .map(|p| p.split(':').next().unwrap_or(p))
                .unwrap_or("path");
            return Some(ApiError::invalid_param(name, describe(c)));
        }
    }
    None
}

/// A control character in a query parameter's name or value (form-decoded: `+` and `%XX`).
pub fn query_problem(query: &str) -> Option<ApiError> {
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let bad = first_refused(&name, false).or_else(|| first_refused(&value, false));
        if let Some(c) = bad {
            return Some(ApiError::invalid_param(&escaped(&name), describe(c)));
        }
    }
    None
}

/// Check a JSON body before it is deserialised: a scan of the bytes finds the escapes that
/// could decode to a refused character (`\u00XX`, `\b`, `\f`, and U+007F–U+009F written out);
/// only then is the body parsed to name the field. A body that is not JSON passes (the
/// deserialiser reports it).
pub fn check_json_bytes(body: &[u8]) -> Result<(), ApiError> {
    if !may_hold_control(body) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => check_json_value(&value),
        Err(_) => Ok(()),
    }
}

/// Whether the JSON text may decode to a string holding a refused character. JSON strings
/// cannot hold raw characters below U+0020 (a syntax error), so only escapes and the raw
/// encodings of U+007F–U+009F matter; a false positive only costs a parse.
fn may_hold_control(body: &[u8]) -> bool {
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'\\' => match body.get(i + 1) {
                Some(b'u') => {
                    let hex = body
                        .get(i + 2..i + 6)
                        .and_then(|h| std::str::from_utf8(h).ok());
                    let code = hex.and_then(|h| u32::from_str_radix(h, 16).ok());
                    if code
                        .and_then(char::from_u32)
                        .is_some_and(|c| refused(c, true))
                    {
                        return true;
                    }
                    i += 6;
                }
                Some(b'b' | b'f') => return true,
                _ => i += 2,
            },
            0x7F => return true,
            0xC2 if body.get(i + 1).is_some_and(|b| (0x80..=0x9F).contains(b)) => return true,
            _ => i += 1,
        }
    }
    false
}

/// Check every string value and object key of a JSON document (free text: tab, LF and CR
/// allowed). The error names the field, prefixed with the resource type when the document
/// is a FHIR resource (`Patient.name[0].family`).
pub fn check_json_value(value: &Value) -> Result<(), ApiError> {
    let root = value
        .get("resourceType")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric()))
        .unwrap_or("");
    let mut path = root.to_string();
    match find_control(value, &mut path) {
        None => Ok(()),
        Some(c) => {
            let field = if path.is_empty() {
                "body".to_string()
            } else {
                path.trim_start_matches('.').to_string()
            };
            Err(ApiError::new(
                ErrorCode::InvalidBody,
                format!(
                    "{field}: {}; text may hold tab, line feed and carriage return but no other control character",
                    describe(c)
                ),
            )
            .field(field))
        }
    }
}

/// Depth-first search for a refused character; on a find, `path` names where it is.
fn find_control(value: &Value, path: &mut String) -> Option<char> {
    match value {
        Value::String(s) => first_refused(s, true),
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let found = find_control(item, path);
            if found.is_none() {
                path.truncate(len);
            }
            found
        }),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let len = path.len();
            path.push('.');
            path.push_str(&escaped(key));
            let found = first_refused(key, true).or_else(|| find_control(item, path));
            if found.is_none() {
                path.truncate(len);
            }
            found
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn refused_characters() {
        for c in [
            '\0', '\u{1}', '\u{8}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9f}',
        ] {
            assert!(refused(c, true), "{c:?}");
            assert!(refused(c, false), "{c:?}");
        }
        for c in ['\t', '\n', '\r'] {
            assert!(!refused(c, true));
            assert!(refused(c, false));
        }
        for c in ['a', ' ', '张', '\u{a0}', '\u{200b}', '\u{fffd}'] {
            assert!(!refused(c, false), "{c:?}");
        }
    }

    #[test]
    fn paths_and_queries() {
        let e = path_problem("/fhir/Organization/a%00", Some("/fhir/Organization/{id}")).unwrap();
        assert_eq!(e.field.as_deref(), Some("id"));
        assert_eq!(e.code, ErrorCode::InvalidParameter);
        let e = path_problem("/fhir/Organization/a%09b", None).unwrap();
        assert_eq!(e.field.as_deref(), Some("path"));
        assert!(path_problem("/fhir/Organization/%E5%BC%A0%20a", None).is_none());
        let e = query_problem("name=ok&family=%E5%BC%A0%00").unwrap();
        assert_eq!(e.field.as_deref(), Some("family"));
        assert!(e.message.contains("U+0000"), "{}", e.message);
        let e = query_problem("a%01b=1").unwrap();
        assert_eq!(e.field.as_deref(), Some("a\\u{1}b"));
        assert!(query_problem("name=a+b&x=%C2%A0").is_none());
        assert!(query_problem("x=%C2%85").is_some());
    }

    #[test]
    fn json_bodies_name_the_field() {
        let cases = [
            (
                r#"{"resourceType":"Consent","patient":{"reference":"a\u0000"}}"#,
                Some("Consent.patient.reference"),
            ),
            (r#"{"note":"x\u001b[31m"}"#, Some("note")),
            (r#"{"a":[1,{"b":"\b"}]}"#, Some("a[1].b")),
            (r#"{"k\u0000":1}"#, Some("k\\u{0}")),
            (r#""\u007f""#, Some("body")),
            ("{\"a\":\"\u{85}\"}", Some("a")),
            (r#"{"text":"line one\nline two\ttab\r"}"#, None),
            (r#"{"a":"\\u0000 is text, not a NUL"}"#, None),
            (r#"{"a":"\\b"}"#, None),
            (r#"{"a":"\u00e9\u4e2d"}"#, None),
            (r#"{"broken": "\u0000"#, None),
        ];
        for (body, field) in cases {
            let got = check_json_bytes(body.as_bytes()).err();
            assert_eq!(
                got.as_ref().and_then(|e| e.field.as_deref()),
                field,
                "{body}"
            );
            if let Some(e) = got {
                assert_eq!(e.code, ErrorCode::InvalidBody);
            }
        }
        let v = json!({ "resourceType": "Patient", "name": [{ "family": "王\u{0}" }] });
        let e = check_json_value(&v).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("Patient.name[0].family"));
    }
}
