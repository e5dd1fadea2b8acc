//! FHIR R4 representations the gateway emits (views over registry data) and shared FHIR helpers.

use serde_json::{Value, json};
use yiqiao_registry::directory::{Institution, InstitutionKind};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
pub const FHIR_VERSION: &str = "4.0.1";

/// Identifier system of the unified social credit code (统一社会信用代码, GB 32100).
/// No national FHIR URI is mandated; this project-defined URI is documented in docs/fhir.md.
pub const USCC_SYSTEM: &str = "https://yiqiao.health/fhir/sid/uscc";
/// Identifier system of Yiqiao institution ids.
pub const INSTITUTION_ID_SYSTEM: &str = "https://yiqiao.health/fhir/sid/institution";
/// Code system of administrative division codes (GB/T 2260).
pub const REGION_CODE_SYSTEM: &str = "https://yiqiao.health/fhir/sid/gbt2260";
/// Code systems defined by Yiqiao.
pub const INSTITUTION_KIND_SYSTEM: &str = "https://yiqiao.health/fhir/CodeSystem/institution-kind";
pub const HOSPITAL_LEVEL_SYSTEM: &str = "https://yiqiao.health/fhir/CodeSystem/hospital-level";

/// A non-empty string element of `v`, trimmed.
pub fn text_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// `subject.identifier` (system, value) of a resource that names its patient by an identifier
/// registered in the EMPI. Else the field (relative to the resource) and what is wrong.
pub fn subject_identifier(
    resource: &Value,
) -> Result<(String, String), (&'static str, &'static str)> {
    let ident = resource
        .get("subject")
        .and_then(|s| s.get("identifier"))
        .ok_or((
            "subject.identifier",
            "subject.identifier (system and value of the patient's registered identifier) is required",
        ))?;
    match (text_at(ident, "system"), text_at(ident, "value")) {
        (Some(s), Some(v)) => Ok((s.to_string(), v.to_string())),
        _ => Err((
            "subject.identifier",
            "subject.identifier needs system and value",
        )),
    }
}

/// Whether `s` holds a Han character (CJK unified ideographs, extension A).
pub fn has_han(s: &str) -> bool {
    s.chars()
        .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c) || ('\u{3400}'..='\u{4dbf}').contains(&c))
}

/// A person's name taken from a resource's `name` (HumanName list): the `official` one, else
/// the first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameParts {
    /// `family`, or the surname split from a Han `text` when neither family nor given is sent.
    pub family: String,
    /// The `given` parts joined by a space (or the rest of a split Han `text`).
    pub given: String,
    /// `text`, else family + given (Han: no space) or given + family (other scripts).
    pub full: String,
}

/// The name of a Patient or Practitioner (see [`NameParts`]); all parts empty without a name.
pub fn human_name(resource: &Value) -> NameParts {
    let names = resource
        .get("name")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let Some(n) = names
        .iter()
        .find(|n| n.get("use").and_then(Value::as_str) == Some("official"))
        .or_else(|| names.first())
    else {
        return NameParts::default();
    };
    let mut family = n
        .get("family")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim()
        .to_string();
    let givens: Vec<&str> = n
        .get("given")
        .and_then(Value::as_array)
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut given = givens.join(" ").trim().to_string();
    let full = match n.get("text").and_then(Value::as_str) {
        Some(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ if has_han(&family) || has_han(&given) => format!("{family}{}", givens.join("")),
        _ => format!("{given} {family}").trim().to_string(),
    };
    if family.is_empty() && given.is_empty() && has_han(&full) {
        let (f, g) = yiqiao_registry::empi::normalize::split_han_name(&full);
        family = f;
        given = g;
    }
    NameParts {
        family,
        given,
        full,
    }
}

/// One FHIR `Address` as a single line: its `text`, else state + city + district + lines
/// concatenated (Chinese order, no separators). `None` when it says nothing.
pub fn address_line(address: &Value) -> Option<String> {
    match address.get("text").and_then(Value::as_str) {
        Some(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
        _ => {
            let mut parts: Vec<String> = ["state", "city", "district"]
                .iter()
                .filter_map(|k| address.get(*k).and_then(Value::as_str).map(String::from))
                .collect();
            parts.extend(
                address
                    .get("line")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|l| l.as_str().map(String::from)),
            );
            let joined = parts.concat();
            (!joined.is_empty()).then_some(joined)
        }
    }
}

fn kind_display(kind: InstitutionKind) -> &'static str {
    match kind {
        InstitutionKind::Hospital => "Hospital (医院)",
        InstitutionKind::InternetHospital => "Internet-hospital platform (互联网医院平台)",
        InstitutionKind::PublicHealth => "Public-health body (公共卫生机构)",
        InstitutionKind::RegionalPlatform => "Regional platform (区域平台)",
    }
}

/// HL7 organization-type code for a kind.
fn hl7_org_type(kind: InstitutionKind) -> (&'static str, &'static str) {
    match kind {
        InstitutionKind::Hospital => ("prov", "Healthcare Provider"),
        InstitutionKind::InternetHospital => ("prov", "Healthcare Provider"),
        InstitutionKind::PublicHealth => ("govt", "Government"),
        InstitutionKind::RegionalPlatform => ("other", "Other"),
    }
}

/// The directory entry as a FHIR `Organization`.
pub fn organization(inst: &Institution) -> Value {
    let (hl7_code, hl7_display) = hl7_org_type(inst.kind);
    let mut org = json!({
        "resourceType": "Organization",
        "id": inst.id.as_str(),
        "meta": {
            "versionId": inst.version.to_string(),
            "lastUpdated": format!("{}Z", inst.updated_at.format("%Y-%m-%dT%H:%M:%S%.3f")),
        },
        "identifier": [
            { "use": "official", "system": USCC_SYSTEM, "value": inst.uscc },
            { "use": "usual", "system": INSTITUTION_ID_SYSTEM, "value": inst.id.as_str() },
        ],
        "active": inst.is_active(),
        "type": [{
            "coding": [
                { "system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": hl7_code, "display": hl7_display },
                { "system": INSTITUTION_KIND_SYSTEM, "code": inst.kind.as_str(), "display": kind_display(inst.kind) },
                { "system": HOSPITAL_LEVEL_SYSTEM, "code": inst.level },
            ]
        }],
        "name": inst.name,
        "address": [{
            "extension": [{
                "url": "https://yiqiao.health/fhir/StructureDefinition/region-code",
                "valueCoding": { "system": REGION_CODE_SYSTEM, "code": inst.region_code },
            }],
            "country": "CN",
        }],
    });
    if inst.endpoint_url.is_some() {
        org["endpoint"] = json!([{ "reference": format!("Endpoint/{}", inst.id) }]);
    }
    org
}

/// The institution's FHIR endpoint as a FHIR `Endpoint`, if it registered one.
pub fn endpoint(inst: &Institution) -> Option<Value> {
    let address = inst.endpoint_url.as_ref()?;
    Some(json!({
        "resourceType": "Endpoint",
        "id": inst.id.as_str(),
        "meta": { "versionId": inst.version.to_string() },
        "status": if inst.is_active() { "active" } else { "suspended" },
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "name": format!("{} FHIR R4", inst.name),
        "managingOrganization": { "reference": format!("Organization/{}", inst.id) },
        "payloadType": [{ "coding": [{ "system": "http://hl7.org/fhir/resource-types", "code": "any" }] }],
        "payloadMimeType": if inst.require_sm_envelope {
            json!(["application/yiqiao-sm-envelope+json"])
        } else {
            json!(["application/fhir+json", "application/yiqiao-sm-envelope+json"])
        },
        "address": address,
    }))
}

/// The date a clinical resource is sorted and filtered by (as sent): the first of
/// `effectiveDateTime`, `period.start`, `recordedDate`, `authoredOn`, `issued`,
/// `onsetDateTime` and `meta.lastUpdated` present.
pub fn clinical_date(resource: &Value) -> Option<&str> {
    let r = resource;
    r["effectiveDateTime"]
        .as_str()
        .or_else(|| r["period"]["start"].as_str())
        .or_else(|| r["recordedDate"].as_str())
        .or_else(|| r["authoredOn"].as_str())
        .or_else(|| r["issued"].as_str())
        .or_else(|| r["onsetDateTime"].as_str())
        .or_else(|| r["meta"]["lastUpdated"].as_str())
}

/// A searchset Bundle with a self link and optional next link.
pub fn searchset(
    base: &str,
    self_url: &str,
    next_url: Option<String>,
    total: Option<i64>,
    resources: Vec<Value>,
) -> Value {
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next_url {
        links.push(json!({ "relation": "next", "url": next }));
    }
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let full_url = match (r["resourceType"].as_str(), r["id"].as_str()) {
                (Some(t), Some(id)) => Value::String(format!("{base}/fhir/{t}/{id}")),
                _ => Value::Null,
            };
            json!({ "fullUrl": full_url, "resource": r, "search": { "mode": "match" } })
        })
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    bundle
}
