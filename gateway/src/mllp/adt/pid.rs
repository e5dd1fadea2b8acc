//! PID → FHIR Patient: identifiers (record numbers, resident ID), names, contacts, and
//! the locations an error names.

use super::*;

/// HL7 location of a FHIR field: the first (prefix, location) of `table` whose prefix the
/// field starts with, else `default`.
pub(super) fn hl7_location(
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
pub(super) fn pid_location(fhir_field: &str) -> &'static str {
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
pub(super) fn record_number(
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
        patient["birthDate"] = json!(birth_date(s, f)?);
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
        && let Some(address) = address(s, r)
    {
        patient["address"] = json!([address]);
    }
    let telecom = telecom(s, pid);
    if !telecom.is_empty() {
        patient["telecom"] = json!(telecom);
    }
    Ok(patient)
}

/// PID-7 (date of birth, `YYYY[MM[DD]]`) as a FHIR date.
fn birth_date(s: &Separators, f: &Field<'_>) -> Result<String, Nak> {
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
    Ok(birth)
}

/// The first PID-11 repetition (XAD) as a FHIR address; `None` when it is empty.
fn address(s: &Separators, r: &Repeat<'_>) -> Option<Value> {
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
    (!a.is_empty()).then_some(Value::Object(a))
}

/// PID-13 (home) and PID-14 (work) numbers and e-mail addresses as FHIR telecom entries.
fn telecom(s: &Separators, pid: &Segment<'_>) -> Vec<Value> {
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
    telecom
}

/// The OID of the resident-ID system (PID-3 repetitions assigned by it are not record numbers).
pub(super) fn resident_oid(state: &AppState) -> String {
    state
        .settings
        .empi
        .resident_id_system
        .trim_start_matches("urn:oid:")
        .to_string()
}

/// The sender's own record number in PID-3 (AE 101 at `PID^1^3` when there is none).
pub(super) fn pid_record_number(
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
