//! Conversions from the registry's rows and FHIR resources to the consent engine's types.

use super::*;

/// The [`DataItem`] of a FHIR resource: its type, and the labels in `meta.security`. For a
/// `DocumentReference` also the document's own `securityLabel`s, and its `type` and
/// `category` codings as data classes (a consent's `provision.class` can name a document type
/// or category as `system|code`).
pub fn data_item_of(resource: &Value) -> DataItem {
    let ty = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    let mut item = DataItem::resource(ty);
    let mut labels: Vec<&Value> = resource
        .pointer("/meta/security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if ty == "DocumentReference" {
        for label in resource
            .get("securityLabel")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            labels.extend(
                label
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            );
        }
        let concepts = resource
            .get("category")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .chain(resource.get("type"));
        for concept in concepts {
            for coding in concept
                .get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(system), Some(code)) = (
                    coding.get("system").and_then(Value::as_str),
                    coding.get("code").and_then(Value::as_str),
                ) {
                    item.classes.push(DataClass::coded(system, code));
                }
            }
        }
    }
    for coding in labels {
        let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
        let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
        if system == yiqiao_consent::codes::CONFIDENTIALITY_SYSTEM {
            if let Some(c) = Confidentiality::from_code(code)
                && c > item.confidentiality
            {
                item.confidentiality = c;
            }
        } else if system == yiqiao_consent::codes::ACT_CODE_SYSTEM
            && let Some(s) = Sensitivity::from_code(code)
        {
            item.sensitivities.insert(s);
        }
    }
    item
}

/// The engine's kind for a directory kind.
pub fn kind_of(kind: directory::InstitutionKind) -> InstitutionKind {
    match kind {
        directory::InstitutionKind::Hospital => InstitutionKind::Hospital,
        directory::InstitutionKind::InternetHospital => InstitutionKind::InternetHospital,
        directory::InstitutionKind::PublicHealth => InstitutionKind::PublicHealth,
        directory::InstitutionKind::RegionalPlatform => InstitutionKind::RegionalPlatform,
    }
}

/// The engine's consent from a stored row: the FHIR JSON, with id, patient (enterprise id)
/// taken from the row's columns.
pub fn consent_of(row: &StoredConsent) -> Result<Consent, String> {
    let mut resource: Value = serde_json::from_str(&row.resource)
        .map_err(|e| format!("stored consent {} is not JSON: {e}", row.id))?;
    resource["id"] = json!(row.id);
    resource["patient"] = json!({ "reference": format!("Patient/{}", row.patient_id) });
    let mut consent = consent_from_fhir(&resource)
        .map_err(|e| format!("stored consent {} cannot be read: {e}", row.id))?;
    consent.id = ConsentId::new(row.id.clone());
    consent.patient = PatientId::new(row.patient_id.clone());
    Ok(consent)
}

fn to_utc(t: Option<chrono::NaiveDateTime>) -> Option<DateTime<Utc>> {
    t.map(|t| t.and_utc())
}

/// The engine's agreement from a stored row.
pub fn agreement_of(row: &StoredAgreement) -> Result<Agreement, String> {
    let purposes: Vec<String> = serde_json::from_str(&row.purposes)
        .map_err(|e| format!("agreement {}: purposes: {e}", row.id))?;
    let classes: Vec<DataClass> = serde_json::from_str(&row.classes)
        .map_err(|e| format!("agreement {}: classes: {e}", row.id))?;
    Ok(Agreement {
        id: AgreementId::new(row.id.clone()),
        custodian: InstitutionId::new(row.custodian.clone()),
        recipient: InstitutionId::new(row.recipient.clone()),
        purposes: purposes
            .iter()
            .map(|p| {
                Purpose::from_code(p).ok_or_else(|| format!("agreement {}: purpose {p}", row.id))
            })
            .collect::<Result<_, _>>()?,
        classes,
        period: Period {
            start: to_utc(row.period_start),
            end: to_utc(row.period_end),
        },
        status: match row.status.as_str() {
            "active" => AgreementStatus::Active,
            "suspended" => AgreementStatus::Suspended,
            _ => AgreementStatus::Terminated,
        },
    })
}

pub(super) fn resource_ref(resource: &Value) -> Option<String> {
    let ty = resource.get("resourceType")?.as_str()?;
    let id = resource.get("id")?.as_str()?;
    Some(format!("{ty}/{id}"))
}

/// Whether a consent status counts (`active`), for documentation in answers.
pub fn status_code(status: ConsentStatus) -> &'static str {
    match status {
        ConsentStatus::Draft => "draft",
        ConsentStatus::Proposed => "proposed",
        ConsentStatus::Active => "active",
        ConsentStatus::Rejected => "rejected",
        ConsentStatus::Inactive => "inactive",
        ConsentStatus::Revoked => "revoked",
        ConsentStatus::EnteredInError => "entered-in-error",
    }
}
