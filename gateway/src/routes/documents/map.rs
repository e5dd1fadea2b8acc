//! Checking a FHIR DocumentReference and mapping it for the registry: one function per part
//! of the resource (identity, type, security labels, content, replacement).

use chrono::{DateTime, NaiveDateTime};
use serde_json::Value;
use yiqiao_consent::{Confidentiality, Sensitivity};
use yiqiao_registry::documents::{DocStatus, NewDocument};

use crate::auth::Caller;
use crate::documents::{ACT_CODE_SYSTEM, CONFIDENTIALITY_SYSTEM, SM3_HASH_EXT};
use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

pub(super) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message).field(format!("DocumentReference.{field}"))
}

pub(super) fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Parse `2024-03-01T08:00:00+08:00` (an instant with offset) to UTC.
pub(super) fn parse_instant(raw: &str) -> Option<NaiveDateTime> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|d| d.naive_utc())
}

/// Check a DocumentReference and map it for the registry. `caller` must be the custodian.
pub(super) fn map_document(
    state: &AppState,
    caller: &Caller,
    doc: &Value,
) -> Result<NewDocument, ApiError> {
    let Identity {
        custodian_doc_id,
        status,
        custodian,
        patient_system,
        patient_value,
    } = identity(caller, doc)?;
    let (type_code, category_code) = doc_type(state, doc)?;
    let date = str_at(doc, "date")
        .ok_or_else(|| invalid("date", "date (an instant with time zone) is required"))?;
    let date = parse_instant(date).ok_or_else(|| {
        invalid(
            "date",
            "date must be an instant with time zone, e.g. 2024-03-01T08:00:00+08:00",
        )
    })?;
    let author_id = doc
        .get("author")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| str_at(a, "reference"))
        .find_map(|r| r.strip_prefix("Organization/"))
        .map(String::from);
    let (confidentiality, sensitivity) = security_labels(doc)?;
    let content = content(doc)?;
    let replaces = replaces(doc)?;
    Ok(NewDocument {
        custodian_id: custodian,
        custodian_doc_id,
        patient_system,
        patient_value,
        type_code,
        category_code,
        date,
        author_id,
        confidentiality: confidentiality
            .unwrap_or(Confidentiality::N)
            .code()
            .to_string(),
        sensitivity,
        content_type: content.content_type,
        content_size: content.size,
        sm3_hash: content.hash,
        location: content.location,
        status,
        replaces,
        resource: doc.clone(),
    })
}

/// Who holds the document and whose it is.
struct Identity {
    custodian_doc_id: String,
    status: DocStatus,
    /// The caller: a member registers only documents it holds.
    custodian: String,
    patient_system: String,
    patient_value: String,
}

fn identity(caller: &Caller, doc: &Value) -> Result<Identity, ApiError> {
    if doc.get("resourceType").and_then(Value::as_str) != Some("DocumentReference") {
        return Err(invalid(
            "resourceType",
            "resourceType must be DocumentReference",
        ));
    }
    let custodian_doc_id = doc
        .get("masterIdentifier")
        .and_then(|m| str_at(m, "value"))
        .ok_or_else(|| {
            invalid(
                "masterIdentifier.value",
                "masterIdentifier.value (the custodian's document id) is required",
            )
        })?;
    if custodian_doc_id.len() > 256 {
        return Err(invalid(
            "masterIdentifier.value",
            "masterIdentifier.value is longer than 256 characters",
        ));
    }
    let status = match str_at(doc, "status") {
        Some("current") => DocStatus::Current,
        Some("entered-in-error") => DocStatus::EnteredInError,
        Some("superseded") => {
            return Err(invalid(
                "status",
                "superseded is set by the registry when a replacement is registered",
            ));
        }
        _ => {
            return Err(invalid(
                "status",
                "status must be current (or entered-in-error to withdraw a registered document)",
            ));
        }
    };
    // Custodian: the caller itself.
    let own = caller.institution.id.to_string();
    let custodian = doc
        .get("custodian")
        .and_then(|c| str_at(c, "reference"))
        .ok_or_else(|| {
            invalid(
                "custodian",
                "custodian (Organization/<your id>) is required",
            )
        })?;
    if custodian.strip_prefix("Organization/") != Some(own.as_str()) {
        return Err(invalid(
            "custodian",
            format!("custodian {custodian} is not the calling institution Organization/{own}"),
        ));
    }
    // Subject: the patient by the identifier the custodian registered in the EMPI.
    let ident = doc
        .get("subject")
        .and_then(|s| s.get("identifier"))
        .ok_or_else(|| {
            invalid(
                "subject.identifier",
                "subject.identifier (system and value of the patient's registered identifier) is required",
            )
        })?;
    let (patient_system, patient_value) = match (str_at(ident, "system"), str_at(ident, "value")) {
        (Some(s), Some(v)) => (s.to_string(), v.to_string()),
        _ => {
            return Err(invalid(
                "subject.identifier",
                "subject.identifier needs system and value",
            ));
        }
    };
    Ok(Identity {
        custodian_doc_id: custodian_doc_id.to_string(),
        status,
        custodian: own,
        patient_system,
        patient_value,
    })
}

/// Type (`system|code`, a known code of an enabled type system) and category (optional;
/// defaults to the type's).
fn doc_type(state: &AppState, doc: &Value) -> Result<(String, String), ApiError> {
    // Type: a coding in an enabled type system with a known code.
    let codes = &state.documents.codes;
    let type_codings: Vec<&Value> = doc
        .get("type")
        .and_then(|t| t.get("coding"))
        .and_then(Value::as_array)
        .map(|c| c.iter().collect())
        .unwrap_or_default();
    if type_codings.is_empty() {
        return Err(invalid("type", "type.coding is required"));
    }
    let mut doc_type = None;
    for (i, c) in type_codings.iter().enumerate() {
        let system = str_at(c, "system").unwrap_or_default();
        if !codes.is_type_system(system) {
            continue;
        }
        let code = str_at(c, "code").unwrap_or_default();
        doc_type = Some(codes.document_type(system, code).ok_or_else(|| {
            invalid(
                &format!("type.coding[{i}].code"),
                format!("unknown document type code {code} in {system}"),
            )
        })?);
        break;
    }
    let doc_type = doc_type.ok_or_else(|| {
        invalid(
            "type.coding",
            format!(
                "no coding in an accepted type system ({})",
                codes.type_systems().collect::<Vec<_>>().join(", ")
            ),
        )
    })?;
    // Category: optional; defaults to the type's category.
    let category_code = match doc
        .get("category")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("coding"))
        .and_then(|c| c.get(0))
    {
        None => doc_type.category.clone(),
        Some(c) => {
            let system = str_at(c, "system").unwrap_or_default();
            let code = str_at(c, "code").unwrap_or_default();
            if system != codes.category_system() || codes.category(code).is_none() {
                return Err(invalid(
                    "category[0].coding[0]",
                    format!(
                        "unknown category {system}|{code}; categories are codes of {}",
                        codes.category_system()
                    ),
                ));
            }
            code.to_string()
        }
    };
    Ok((
        format!("{}|{}", doc_type.system, doc_type.code),
        category_code,
    ))
}

/// Confidentiality (at most one) and sensitivity labels.
fn security_labels(doc: &Value) -> Result<(Option<Confidentiality>, Vec<String>), ApiError> {
    // Security labels.
    let mut confidentiality: Option<Confidentiality> = None;
    let mut sensitivity = Vec::new();
    for (i, label) in doc
        .get("securityLabel")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        for (j, c) in label
            .get("coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let field = format!("securityLabel[{i}].coding[{j}]");
            let system = str_at(c, "system").unwrap_or_default();
            let code = str_at(c, "code").unwrap_or_default();
            if system == CONFIDENTIALITY_SYSTEM {
                let level = Confidentiality::from_code(code).ok_or_else(|| {
                    invalid(&field, format!("unknown confidentiality code {code}"))
                })?;
                if confidentiality.replace(level).is_some() {
                    return Err(invalid(&field, "only one confidentiality label is allowed"));
                }
            } else if system == ACT_CODE_SYSTEM {
                let s = Sensitivity::from_code(code)
                    .ok_or_else(|| invalid(&field, format!("unknown sensitivity code {code}")))?;
                if !sensitivity.contains(&s.code().to_string()) {
                    sensitivity.push(s.code().to_string());
                }
            } else {
                return Err(invalid(
                    &field,
                    format!(
                        "security labels must be codes of {CONFIDENTIALITY_SYSTEM} or {ACT_CODE_SYSTEM}"
                    ),
                ));
            }
        }
    }
    Ok((confidentiality, sensitivity))
}

/// The one attachment at the custodian.
struct Content {
    location: String,
    content_type: String,
    size: i64,
    /// Lower-case hex.
    hash: String,
}

fn content(doc: &Value) -> Result<Content, ApiError> {
    // Content: one attachment at the custodian, with size and SM3 hash.
    let contents = doc
        .get("content")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| invalid("content", "content with one attachment is required"))?;
    if contents.len() > 1 {
        return Err(invalid(
            "content",
            "one content entry per DocumentReference is supported",
        ));
    }
    let att = contents[0]
        .get("attachment")
        .ok_or_else(|| invalid("content[0].attachment", "attachment is required"))?;
    let location = str_at(att, "url").ok_or_else(|| {
        invalid(
            "content[0].attachment.url",
            "attachment.url (the location at the custodian) is required",
        )
    })?;
    // Scheme and destination are the outbound policy's (checked in `register`).
    if !url::Url::parse(location).is_ok_and(|u| u.has_host()) {
        return Err(invalid(
            "content[0].attachment.url",
            "attachment.url must be an absolute URL",
        ));
    }
    let content_type = str_at(att, "contentType").ok_or_else(|| {
        invalid(
            "content[0].attachment.contentType",
            "attachment.contentType is required",
        )
    })?;
    let size = att
        .get("size")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            invalid(
                "content[0].attachment.size",
                "attachment.size (bytes, a non-negative integer) is required",
            )
        })?;
    let hash = att
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(SM3_HASH_EXT))
        .and_then(|e| e.get("valueString"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                "content[0].attachment.extension",
                format!("the SM3 hash of the content is required (extension {SM3_HASH_EXT}, valueString)"),
            )
        })?;
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "content[0].attachment.extension",
            "the SM3 hash must be 64 hexadecimal digits",
        ));
    }
    Ok(Content {
        location: location.to_string(),
        content_type: content_type.to_string(),
        size,
        hash: hash.to_ascii_lowercase(),
    })
}

/// `relatesTo`: only `replaces`, at most once; the registry id it replaces.
fn replaces(doc: &Value) -> Result<Option<String>, ApiError> {
    // relatesTo: only `replaces`, at most once.
    let mut replaces = None;
    for (i, rel) in doc
        .get("relatesTo")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if str_at(rel, "code") != Some("replaces") {
            return Err(invalid(
                &format!("relatesTo[{i}].code"),
                "only relatesTo code replaces is supported",
            ));
        }
        let target = rel
            .get("target")
            .and_then(|t| str_at(t, "reference"))
            .and_then(|r| r.rsplit_once("DocumentReference/").map(|(_, id)| id))
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| {
                invalid(
                    &format!("relatesTo[{i}].target"),
                    "target.reference must be DocumentReference/<registry id>",
                )
            })?;
        if replaces.replace(target.to_string()).is_some() {
            return Err(invalid(
                &format!("relatesTo[{i}]"),
                "a document replaces at most one other",
            ));
        }
    }
    Ok(replaces)
}
