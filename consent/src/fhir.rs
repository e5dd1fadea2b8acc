//! Conversion between FHIR R4 `Consent` resources and [`Consent`].
//!
//! Supported shape (one provision, no nested `provision.provision`):
//!
//! | FHIR element | model |
//! |---|---|
//! | `Consent.id` | [`Consent::id`] |
//! | `Consent.status` (+ revoked extension) | [`ConsentStatus`] |
//! | `Consent.patient.reference` = `Patient/<id>` | [`Consent::patient`] |
//! | `Consent.provision.type` = `deny` \| `permit` | [`ProvisionType`] |
//! | `Consent.provision.period` | [`Consent::period`] |
//! | `Consent.provision.actor[].reference.reference` = `Organization/<id>` | [`Scope::actors`] |
//! | `Consent.provision.purpose[]` (v3 ActReason) | [`Scope::purposes`] |
//! | `Consent.provision.class[]` (resource types or other codings) | [`Scope::classes`] |
//! | `Consent.provision.securityLabel[]` (v3 Confidentiality / ActCode) | [`Scope::labels`] |
//!
//! Dates without a time (`2024`, `2024-05`, `2024-05-01`) are read in China Standard Time
//! (UTC+08:00): a start means the first instant of that year/month/day, an end the last.

use crate::codes::{
    ACT_CODE_SYSTEM, ACT_REASON_SYSTEM, CONFIDENTIALITY_SYSTEM, Confidentiality, DataClass,
    Purpose, RESOURCE_TYPES_SYSTEM, SecurityLabel, Sensitivity,
};
use crate::ids::{ConsentId, InstitutionId, PatientId};
use crate::model::{Consent, ConsentStatus, Period, ProvisionType, Scope};
use chrono::{DateTime, Duration, FixedOffset, NaiveDate, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value, json};
use thiserror::Error;

/// Extension on `Consent` marking an `inactive` consent as revoked by the patient.
pub const REVOKED_EXTENSION_URL: &str =
    "https://example.invalid/yiqiao/fhir/StructureDefinition/consent-revoked";

/// A FHIR Consent that cannot be read; `path` names the offending element.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FhirConsentError {
    /// A required element is absent.
    #[error("{path}: required element is missing")]
    Missing {
        /// FHIR path, e.g. `Consent.provision.type`.
        path: String,
    },
    /// An element has a wrong type or value.
    #[error("{path}: {problem}")]
    Invalid {
        /// FHIR path, e.g. `Consent.provision.period.end`.
        path: String,
        /// What is wrong, in words.
        problem: String,
    },
    /// Valid FHIR that this engine does not support.
    #[error("{path}: not supported: {problem}")]
    Unsupported {
        /// FHIR path.
        path: String,
        /// What is not supported.
        problem: String,
    },
}

impl FhirConsentError {
    /// The FHIR path of the offending element.
    pub fn path(&self) -> &str {
        match self {
            Self::Missing { path }
            | Self::Invalid { path, .. }
            | Self::Unsupported { path, .. } => path,
        }
    }
}

fn invalid(path: &str, problem: impl Into<String>) -> FhirConsentError {
    FhirConsentError::Invalid {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

fn missing(path: &str) -> FhirConsentError {
    FhirConsentError::Missing {
        path: path.to_owned(),
    }
}

fn get_str<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'v str>, FhirConsentError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(&format!("{path}.{key}"), "must be a string")),
    }
}

fn req_str<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'v str, FhirConsentError> {
    get_str(obj, key, path)?.ok_or_else(|| missing(&format!("{path}.{key}")))
}

fn get_obj<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'v Map<String, Value>>, FhirConsentError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(invalid(&format!("{path}.{key}"), "must be an object")),
    }
}

/// An array element with its FHIR path.
type PathedObject<'v> = (String, &'v Map<String, Value>);

/// The elements of an array field with their paths (`path.key[i]`), each required to be an object.
fn get_objects<'v>(
    obj: &'v Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Vec<PathedObject<'v>>, FhirConsentError> {
    match obj.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let p = format!("{path}.{key}[{i}]");
                match v {
                    Value::Object(o) => Ok((p, o)),
                    _ => Err(invalid(&p, "must be an object")),
                }
            })
            .collect(),
        Some(_) => Err(invalid(&format!("{path}.{key}"), "must be an array")),
    }
}

fn reference_id<'v>(reference: &'v str, ty: &str, path: &str) -> Result<&'v str, FhirConsentError> {
    reference
        .strip_prefix(ty)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .ok_or_else(|| FhirConsentError::Unsupported {
            path: path.to_owned(),
            problem: format!("expected a relative reference `{ty}/<id>`, got `{reference}`"),
        })
}

/// UTC+08:00 (`east_opt` only fails beyond ±24h, so this is always `Some`).
fn china_standard_time() -> Option<FixedOffset> {
    FixedOffset::east_opt(8 * 3600)
}

/// Parses a FHIR `dateTime`; `end` chooses the last instant of a partial date.
pub fn parse_fhir_datetime(
    value: &str,
    end: bool,
    path: &str,
) -> Result<DateTime<Utc>, FhirConsentError> {
    if value.contains('T') {
        return DateTime::parse_from_rfc3339(value)
            .map(|d| d.with_timezone(&Utc))
            .map_err(|e| {
                invalid(
                    path,
                    format!("`{value}` is not a FHIR dateTime with time zone ({e})"),
                )
            });
    }
    let bad = || {
        invalid(
            path,
            format!("`{value}` is not a FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)"),
        )
    };
    let parts: Vec<&str> = value.split('-').collect();
    let num = |s: &str, len: usize| -> Result<u32, FhirConsentError> {
        if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (first, next) = match parts.as_slice() {
        [y] => {
            let y = i32::try_from(num(y, 4)?).map_err(|_| bad())?;
            (
                NaiveDate::from_ymd_opt(y, 1, 1),
                NaiveDate::from_ymd_opt(y + 1, 1, 1),
            )
        }
        [y, m] => {
            let (y, m) = (i32::try_from(num(y, 4)?).map_err(|_| bad())?, num(m, 2)?);
            let next = if m == 12 {
                NaiveDate::from_ymd_opt(y + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(y, m + 1, 1)
            };
            (NaiveDate::from_ymd_opt(y, m, 1), next)
        }
        [y, m, d] => {
            let day = NaiveDate::from_ymd_opt(
                i32::try_from(num(y, 4)?).map_err(|_| bad())?,
                num(m, 2)?,
                num(d, 2)?,
            );
            (day, day.and_then(|d| d.succ_opt()))
        }
        _ => return Err(bad()),
    };
    let (Some(first), Some(next)) = (first, next) else {
        return Err(bad());
    };
    let day = if end { next } else { first };
    let local = day.and_hms_opt(0, 0, 0).ok_or_else(bad)?;
    let instant = china_standard_time()
        .ok_or_else(bad)?
        .from_local_datetime(&local)
        .single()
        .ok_or_else(bad)?
        .with_timezone(&Utc);
    Ok(if end {
        instant - Duration::nanoseconds(1)
    } else {
        instant
    })
}

fn parse_status(resource: &Map<String, Value>) -> Result<ConsentStatus, FhirConsentError> {
    let status = req_str(resource, "status", "Consent")?;
    let revoked = get_objects(resource, "extension", "Consent")?
        .iter()
        .any(|(_, e)| {
            e.get("url").and_then(Value::as_str) == Some(REVOKED_EXTENSION_URL)
                && e.get("valueBoolean").and_then(Value::as_bool) == Some(true)
        });
    Ok(match status {
        "draft" => ConsentStatus::Draft,
        "proposed" => ConsentStatus::Proposed,
        "active" => ConsentStatus::Active,
        "rejected" => ConsentStatus::Rejected,
        "inactive" if revoked => ConsentStatus::Revoked,
        "inactive" => ConsentStatus::Inactive,
        "entered-in-error" => ConsentStatus::EnteredInError,
        other => {
            return Err(invalid(
                "Consent.status",
                format!("unknown status `{other}`"),
            ));
        }
    })
}

fn check_system(
    coding: &Map<String, Value>,
    path: &str,
    allowed: &[&str],
) -> Result<(), FhirConsentError> {
    match get_str(coding, "system", path)? {
        Some(system) if !allowed.contains(&system) => Err(invalid(
            &format!("{path}.system"),
            format!("expected {}, got `{system}`", allowed.join(" or ")),
        )),
        _ => Ok(()),
    }
}

fn parse_label(coding: &Map<String, Value>, path: &str) -> Result<SecurityLabel, FhirConsentError> {
    check_system(coding, path, &[CONFIDENTIALITY_SYSTEM, ACT_CODE_SYSTEM])?;
    let code = req_str(coding, "code", path)?;
    let system = get_str(coding, "system", path)?;
    let confidentiality = Confidentiality::from_code(code).map(SecurityLabel::Confidentiality);
    let sensitivity = Sensitivity::from_code(code).map(SecurityLabel::Sensitivity);
    match system {
        Some(CONFIDENTIALITY_SYSTEM) => confidentiality,
        Some(_) => sensitivity,
        None => confidentiality.or(sensitivity),
    }
    .ok_or_else(|| {
        invalid(
            &format!("{path}.code"),
            format!("unknown security label `{code}`"),
        )
    })
}

fn parse_period(provision: &Map<String, Value>) -> Result<Period, FhirConsentError> {
    let path = "Consent.provision.period";
    let Some(period) = get_obj(provision, "period", "Consent.provision")? else {
        return Ok(Period::ALWAYS);
    };
    let start = get_str(period, "start", path)?
        .map(|s| parse_fhir_datetime(s, false, &format!("{path}.start")))
        .transpose()?;
    let end = get_str(period, "end", path)?
        .map(|s| parse_fhir_datetime(s, true, &format!("{path}.end")))
        .transpose()?;
    if let (Some(s), Some(e)) = (start, end)
        && e < s
    {
        return Err(invalid(
            &format!("{path}.end"),
            "ends before the period starts",
        ));
    }
    Ok(Period { start, end })
}

fn parse_scope(provision: &Map<String, Value>) -> Result<Scope, FhirConsentError> {
    let path = "Consent.provision";
    let mut scope = Scope::default();
    for (p, actor) in get_objects(provision, "actor", path)? {
        let reference =
            get_obj(actor, "reference", &p)?.ok_or_else(|| missing(&format!("{p}.reference")))?;
        let r = req_str(reference, "reference", &format!("{p}.reference"))?;
        let id = reference_id(r, "Organization", &format!("{p}.reference.reference"))?;
        scope.actors.push(InstitutionId::new(id));
    }
    for (p, coding) in get_objects(provision, "purpose", path)? {
        check_system(coding, &p, &[ACT_REASON_SYSTEM])?;
        let code = req_str(coding, "code", &p)?;
        let purpose = Purpose::from_code(code).ok_or_else(|| {
            invalid(
                &format!("{p}.code"),
                format!("unknown purpose of use `{code}`"),
            )
        })?;
        scope.purposes.insert(purpose);
    }
    for (p, coding) in get_objects(provision, "class", path)? {
        let code = req_str(coding, "code", &p)?;
        let system = get_str(coding, "system", &p)?.unwrap_or(RESOURCE_TYPES_SYSTEM);
        scope.classes.push(DataClass::coded(system, code));
    }
    for (p, coding) in get_objects(provision, "securityLabel", path)? {
        scope.labels.push(parse_label(coding, &p)?);
    }
    Ok(scope)
}

/// Reads a FHIR R4 `Consent` resource.
pub fn consent_from_fhir(resource: &Value) -> Result<Consent, FhirConsentError> {
    let obj = resource
        .as_object()
        .ok_or_else(|| invalid("Consent", "must be a JSON object"))?;
    let ty = req_str(obj, "resourceType", "Consent")?;
    if ty != "Consent" {
        return Err(invalid(
            "Consent.resourceType",
            format!("expected `Consent`, got `{ty}`"),
        ));
    }
    let id = req_str(obj, "id", "Consent")?;
    let status = parse_status(obj)?;
    let patient = get_obj(obj, "patient", "Consent")?.ok_or_else(|| missing("Consent.patient"))?;
    let patient_ref = req_str(patient, "reference", "Consent.patient")?;
    let patient_id = reference_id(patient_ref, "Patient", "Consent.patient.reference")?;
    let provision =
        get_obj(obj, "provision", "Consent")?.ok_or_else(|| missing("Consent.provision"))?;
    if provision.contains_key("provision") {
        return Err(FhirConsentError::Unsupported {
            path: "Consent.provision.provision".to_owned(),
            problem: "nested provisions; record each exception as its own Consent".to_owned(),
        });
    }
    let provision_type = match req_str(provision, "type", "Consent.provision")? {
        "deny" => ProvisionType::Deny,
        "permit" => ProvisionType::Permit,
        other => {
            return Err(invalid(
                "Consent.provision.type",
                format!("expected `deny` or `permit`, got `{other}`"),
            ));
        }
    };
    Ok(Consent {
        id: ConsentId::new(id),
        patient: PatientId::new(patient_id),
        status,
        provision: provision_type,
        period: parse_period(provision)?,
        scope: parse_scope(provision)?,
    })
}

fn fhir_instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn coding(system: &str, code: &str) -> Value {
    json!({ "system": system, "code": code })
}

/// Writes a [`Consent`] as a FHIR R4 `Consent` resource (scope `patient-privacy`, category
/// LOINC 59284-0, policyRule OPTIN/OPTOUT after the provision type).
pub fn consent_to_fhir(consent: &Consent) -> Value {
    let status = match consent.status {
        ConsentStatus::Draft => "draft",
        ConsentStatus::Proposed => "proposed",
        ConsentStatus::Active => "active",
        ConsentStatus::Rejected => "rejected",
        ConsentStatus::Inactive | ConsentStatus::Revoked => "inactive",
        ConsentStatus::EnteredInError => "entered-in-error",
    };
    let (provision_type, policy) = match consent.provision {
        ProvisionType::Deny => ("deny", "OPTOUT"),
        ProvisionType::Permit => ("permit", "OPTIN"),
    };
    let mut provision = Map::new();
    provision.insert("type".to_owned(), json!(provision_type));
    let mut period = Map::new();
    if let Some(s) = consent.period.start {
        period.insert("start".to_owned(), json!(fhir_instant(s)));
    }
    if let Some(e) = consent.period.end {
        period.insert("end".to_owned(), json!(fhir_instant(e)));
    }
    if !period.is_empty() {
        provision.insert("period".to_owned(), Value::Object(period));
    }
    let scope = &consent.scope;
    let mut put = |key: &str, items: Vec<Value>| {
        if !items.is_empty() {
            provision.insert(key.to_owned(), Value::Array(items));
        }
    };
    put(
        "actor",
        scope
            .actors
            .iter()
            .map(|a| {
                json!({
                    "role": { "coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP")] },
                    "reference": { "reference": format!("Organization/{a}") }
                })
            })
            .collect(),
    );
    put(
        "purpose",
        scope
            .purposes
            .iter()
            .map(|p| coding(ACT_REASON_SYSTEM, p.code()))
            .collect(),
    );
    put(
        "class",
        scope
            .classes
            .iter()
            .map(|c| coding(&c.system, &c.code))
            .collect(),
    );
    put(
        "securityLabel",
        scope
            .labels
            .iter()
            .map(|l| {
                let (system, code) = l.coding();
                coding(system, code)
            })
            .collect(),
    );
    let mut resource = json!({
        "resourceType": "Consent",
        "id": consent.id.as_str(),
        "status": status,
        "scope": { "coding": [coding("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy")] },
        "category": [{ "coding": [coding("http://loinc.org", "59284-0")] }],
        "patient": { "reference": format!("Patient/{}", consent.patient) },
        "policyRule": { "coding": [coding(ACT_CODE_SYSTEM, policy)] },
        "provision": Value::Object(provision),
    });
    if consent.status == ConsentStatus::Revoked
        && let Value::Object(map) = &mut resource
    {
        map.insert(
            "extension".to_owned(),
            json!([{ "url": REVOKED_EXTENSION_URL, "valueBoolean": true }]),
        );
    }
    resource
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use chrono::TimeZone;

    fn sample() -> Value {
        json!({
            "resourceType": "Consent",
            "id": "c1",
            "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/e-42"},
            "provision": {
                "type": "permit",
                "period": {"start": "2025-01-01", "end": "2025-12-31T23:59:59+08:00"},
                "actor": [{"role": {"coding": [{"code": "IRCP"}]}, "reference": {"reference": "Organization/h2"}}],
                "purpose": [{"system": ACT_REASON_SYSTEM, "code": "TREAT"}],
                "class": [{"system": RESOURCE_TYPES_SYSTEM, "code": "Observation"}],
                "securityLabel": [{"system": ACT_CODE_SYSTEM, "code": "PSY"},
                                  {"system": CONFIDENTIALITY_SYSTEM, "code": "V"}]
            }
        })
    }

    #[test]
    fn reads_a_consent() {
        let c = consent_from_fhir(&sample()).unwrap();
        assert_eq!(c.id.as_str(), "c1");
        assert_eq!(c.patient.as_str(), "e-42");
        assert_eq!(c.status, ConsentStatus::Active);
        assert_eq!(c.provision, ProvisionType::Permit);
        assert_eq!(c.scope.actors, vec![InstitutionId::new("h2")]);
        assert!(c.scope.purposes.contains(&Purpose::Treatment));
        assert_eq!(
            c.scope.classes,
            vec![DataClass::resource_type("Observation")]
        );
        assert_eq!(
            c.scope.labels,
            vec![
                SecurityLabel::Sensitivity(Sensitivity::Psy),
                SecurityLabel::Confidentiality(Confidentiality::V)
            ]
        );
        // 2025-01-01 in China Standard Time is 2024-12-31T16:00Z.
        assert_eq!(
            c.period.start,
            Some(Utc.with_ymd_and_hms(2024, 12, 31, 16, 0, 0).unwrap())
        );
        assert_eq!(
            c.period.end,
            Some(Utc.with_ymd_and_hms(2025, 12, 31, 15, 59, 59).unwrap())
        );
    }

    #[test]
    fn round_trips_through_fhir() {
        let c = consent_from_fhir(&sample()).unwrap();
        let back = consent_from_fhir(&consent_to_fhir(&c)).unwrap();
        assert_eq!(back, c);
        let revoked = Consent {
            status: ConsentStatus::Revoked,
            ..c
        };
        let fhir = consent_to_fhir(&revoked);
        assert_eq!(fhir["status"], "inactive");
        assert_eq!(consent_from_fhir(&fhir).unwrap(), revoked);
    }

    #[test]
    fn date_only_ends_cover_the_whole_period() {
        let end = parse_fhir_datetime("2025-02", true, "x").unwrap();
        assert_eq!(
            end,
            Utc.with_ymd_and_hms(2025, 2, 28, 15, 59, 59).unwrap()
                + Duration::nanoseconds(999_999_999)
        );
        let start = parse_fhir_datetime("2025", false, "x").unwrap();
        assert_eq!(start, Utc.with_ymd_and_hms(2024, 12, 31, 16, 0, 0).unwrap());
    }

    fn error_for(edit: impl FnOnce(&mut Value)) -> FhirConsentError {
        let mut v = sample();
        edit(&mut v);
        consent_from_fhir(&v).unwrap_err()
    }

    #[test]
    fn errors_name_the_offending_path() {
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "Consent.provision.period.end",
                Box::new(|v| v["provision"]["period"]["end"] = json!("2025-13-01")),
            ),
            (
                "Consent.provision.period.end",
                Box::new(|v| v["provision"]["period"]["end"] = json!("2024-01-01")),
            ),
            (
                "Consent.provision.period.start",
                Box::new(|v| v["provision"]["period"]["start"] = json!(20250101)),
            ),
            (
                "Consent.provision.type",
                Box::new(|v| v["provision"]["type"] = json!("maybe")),
            ),
            (
                "Consent.provision.type",
                Box::new(|v| {
                    v["provision"].as_object_mut().unwrap().remove("type");
                }),
            ),
            (
                "Consent.provision.actor[0].reference.reference",
                Box::new(|v| {
                    v["provision"]["actor"][0]["reference"]["reference"] = json!("Practitioner/d1")
                }),
            ),
            (
                "Consent.provision.purpose[0].code",
                Box::new(|v| v["provision"]["purpose"][0]["code"] = json!("FUN")),
            ),
            (
                "Consent.provision.purpose[0].system",
                Box::new(|v| v["provision"]["purpose"][0]["system"] = json!("http://x")),
            ),
            (
                "Consent.provision.securityLabel[1].code",
                Box::new(|v| v["provision"]["securityLabel"][1]["code"] = json!("ZZZ")),
            ),
            (
                "Consent.provision.class[0].code",
                Box::new(|v| {
                    v["provision"]["class"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("code");
                }),
            ),
            (
                "Consent.patient.reference",
                Box::new(|v| v["patient"]["reference"] = json!("Group/g1")),
            ),
            (
                "Consent.status",
                Box::new(|v| v["status"] = json!("on-hold")),
            ),
            (
                "Consent.resourceType",
                Box::new(|v| v["resourceType"] = json!("Patient")),
            ),
            (
                "Consent.id",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("id");
                }),
            ),
            (
                "Consent.provision",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("provision");
                }),
            ),
            (
                "Consent.provision.provision",
                Box::new(|v| v["provision"]["provision"] = json!([{"type": "deny"}])),
            ),
            (
                "Consent.provision.actor",
                Box::new(|v| v["provision"]["actor"] = json!({})),
            ),
        ];
        for (path, edit) in cases {
            let err = error_for(edit);
            assert_eq!(err.path(), path, "{err}");
            assert!(err.to_string().starts_with(path), "{err}");
        }
    }
}
