//! Source records as institutions send them, and their prepared (normalised) form that
//! blocking and comparison work on.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::ident::{
    DataQualityIssue, IdentifierKind, ResidentId, Sex, normalise_other_id, normalise_phone,
    parse_resident_id_of,
};
use super::normalize::{Address, NameScript, PersonName, normalise_address, normalise_name};

/// Identifier of a source record, assigned by the storage layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordId(pub u64);

/// One identifier value as sent by an institution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: IdentifierKind,
    pub value: String,
}

/// A patient record as registered by one institution (WS/T 790.6 resident registration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub record_id: RecordId,
    /// Registering institution; namespaces [`IdentifierKind::InstitutionRecord`] values.
    pub institution: String,
    pub name: String,
    pub sex: Option<Sex>,
    pub birth_date: Option<NaiveDate>,
    pub identifiers: Vec<Identifier>,
    pub address: Option<String>,
}

/// A non-resident identifier after normalisation; institution record numbers carry the
/// institution in `value` (`"{institution}/{number}"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OtherId {
    pub kind: IdentifierKind,
    pub value: String,
}

/// A record after normalisation and validation. Pure function of the [`SourceRecord`]:
/// storage may cache it or recompute it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreparedRecord {
    pub record_id: RecordId,
    pub name: PersonName,
    /// Recorded sex, or the one encoded in a trusted resident ID when none was recorded.
    pub sex: Option<Sex>,
    /// Recorded birth date, or the one in a trusted resident ID when none was recorded.
    pub birth_date: Option<NaiveDate>,
    pub resident_id: Option<ResidentId>,
    pub other_ids: Vec<OtherId>,
    pub phones: Vec<String>,
    pub address: Option<Address>,
    pub issues: Vec<DataQualityIssue>,
}

/// Normalise and validate a source record.
pub fn prepare(record: &SourceRecord) -> PreparedRecord {
    let mut issues = Vec::new();
    let name = normalise_name(&record.name);
    if name.script == NameScript::Empty {
        issues.push(DataQualityIssue::NameEmpty);
    }
    let mut resident_id: Option<ResidentId> = None;
    let mut other_ids = Vec::new();
    let mut phones = Vec::new();
    for ident in &record.identifiers {
        if ident.value.trim().is_empty() {
            issues.push(DataQualityIssue::IdentifierEmpty(ident.kind));
            continue;
        }
        match ident.kind {
            IdentifierKind::ResidentId => {
                let (id, found) = parse_resident_id_of(&ident.value, record.birth_date);
                issues.extend(found);
                // Keep the first trusted one; an untrusted one only if nothing better.
                if resident_id
                    .as_ref()
                    .is_none_or(|r| !r.trusted && id.trusted)
                {
                    resident_id = Some(id);
                }
            }
            IdentifierKind::Phone => match normalise_phone(&ident.value) {
                Some(p) => phones.push(p),
                None => issues.push(DataQualityIssue::PhoneInvalid),
            },
            kind => {
                if let Some(v) = normalise_other_id(&ident.value) {
                    let value = if kind == IdentifierKind::InstitutionRecord {
                        format!("{}/{v}", record.institution)
                    } else {
                        v
                    };
                    other_ids.push(OtherId { kind, value });
                }
            }
        }
    }
    other_ids.sort();
    other_ids.dedup();
    phones.sort();
    phones.dedup();
    let trusted = resident_id.as_ref().filter(|r| r.trusted);
    let id_birth = trusted.and_then(|r| r.birth_date);
    let id_sex = trusted.and_then(|r| r.sex);
    if let (Some(a), Some(b)) = (record.birth_date, id_birth)
        && a != b
    {
        issues.push(DataQualityIssue::BirthDateDisagreesWithResidentId);
    }
    if let (Some(a), Some(b)) = (record.sex, id_sex)
        && a != b
    {
        issues.push(DataQualityIssue::SexDisagreesWithResidentId);
    }
    PreparedRecord {
        record_id: record.record_id,
        name,
        sex: record.sex.or(id_sex),
        birth_date: record.birth_date.or(id_birth),
        resident_id,
        other_ids,
        phones,
        address: record.address.as_deref().and_then(normalise_address),
        issues,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ids: Vec<Identifier>) -> SourceRecord {
        SourceRecord {
            record_id: RecordId(1),
            institution: "H1".into(),
            name: "张伟".into(),
            sex: None,
            birth_date: NaiveDate::from_ymd_opt(1949, 12, 30),
            identifiers: ids,
            address: None,
        }
    }

    #[test]
    fn prepare_fills_from_trusted_id_and_reports_issues() {
        let r = prepare(&record(vec![
            Identifier {
                kind: IdentifierKind::ResidentId,
                value: "11010519491231002X".into(),
            },
            Identifier {
                kind: IdentifierKind::Phone,
                value: "+86 138 1234 5678".into(),
            },
            Identifier {
                kind: IdentifierKind::Phone,
                value: "123".into(),
            },
            Identifier {
                kind: IdentifierKind::InstitutionRecord,
                value: " mr-001 ".into(),
            },
        ]));
        assert_eq!(r.sex, Some(Sex::Female));
        assert_eq!(r.phones, vec!["13812345678".to_string()]);
        assert_eq!(r.other_ids[0].value, "H1/MR001");
        assert!(r.issues.contains(&DataQualityIssue::PhoneInvalid));
        assert!(
            r.issues
                .contains(&DataQualityIssue::BirthDateDisagreesWithResidentId)
        );
    }

    #[test]
    fn untrusted_id_is_kept_as_data() {
        let r = prepare(&record(vec![Identifier {
            kind: IdentifierKind::ResidentId,
            value: "110105194912310021".into(),
        }]));
        let id = r
            .resident_id
            .as_ref()
            .map(|i| (i.number.as_str(), i.trusted));
        assert_eq!(id, Some(("110105194912310021", false)));
        assert_eq!(r.sex, None);
    }
}
