//! Deterministic synthetic region: institutions with SM2 keys derived from the seed, persons
//! present at several institutions, and the clinical resources each institution holds.
//!
//! Everything is a pure function of (seed, institution number, person index), so the simulator
//! and a loader (`yiqiao sim --emit`, the demo) agree without sharing files.

use std::collections::HashMap;

use chrono::{Duration, NaiveDate};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use yiqiao_registry::directory::{InstitutionSpec, Sm2Key};
use yiqiao_sm::Sm2PrivateKey;

use crate::demo::demo_institution;

/// Identifier system of resident ID numbers (居民身份证号码).
pub const RESIDENT_ID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";
/// Identifier system of the regional laboratory's report numbers: the same report is filed at
/// every hospital of the patient, so a federated search sees duplicates to collapse.
pub const REGIONAL_LAB_SYSTEM: &str = "urn:oid:2.16.156.10011.1.99.350100.lab";
/// The clinical resource types a simulated hospital serves.
pub const RESOURCE_TYPES: [&str; 5] = [
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "DiagnosticReport",
];
/// The first institution number of the simulated hospitals (fz-001..fz-003 are the demo's
/// platform, public-health body and internet hospital).
pub const FIRST_HOSPITAL: u32 = 4;

/// A 64-bit value derived from the seed and some labels (SM3, first 8 bytes).
pub fn mix(seed: u64, parts: &[&[u8]]) -> u64 {
    let mut data = seed.to_be_bytes().to_vec();
    for p in parts {
        data.extend_from_slice(&(p.len() as u32).to_be_bytes());
        data.extend_from_slice(p);
    }
    let h = yiqiao_sm::sm3_hash(&data);
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// The SM2 key of a simulated institution, derived from the seed (demo and test use only).
pub fn institution_key(seed: u64, id: &str) -> Result<Sm2PrivateKey, String> {
    for counter in 0u32..16 {
        let mut data = b"yiqiao-sim-key".to_vec();
        data.extend_from_slice(&seed.to_be_bytes());
        data.extend_from_slice(id.as_bytes());
        data.extend_from_slice(&counter.to_be_bytes());
        let d = yiqiao_sm::sm3_hash(&data);
        if let Ok(key) = Sm2PrivateKey::from_scalar_bytes(&d) {
            return Ok(key);
        }
    }
    Err(format!("no valid SM2 scalar for {id}"))
}

/// A simulated hospital.
#[derive(Debug, Clone)]
pub struct SimInstitution {
    pub n: u32,
    pub id: String,
    pub name: String,
    pub patient_id_system: String,
    pub key: Sm2PrivateKey,
    /// Local patient identifier → person index.
    pub patients: HashMap<String, u32>,
}

impl SimInstitution {
    /// The directory entry, pointing at `endpoint_url`, with its SM2 public key.
    pub fn spec(&self, endpoint_url: &str) -> Result<InstitutionSpec, String> {
        let (mut spec, _) = demo_institution(self.n);
        spec.endpoint_url = Some(endpoint_url.to_string());
        spec.sm2_keys = vec![Sm2Key {
            kid: format!("{}-sm2-1", self.id),
            pem: self
                .key
                .public_key()
                .to_spki_pem()
                .map_err(|e| e.to_string())?,
        }];
        Ok(spec)
    }
}

/// A simulated person.
#[derive(Debug, Clone)]
pub struct SimPerson {
    pub index: u32,
    pub family: &'static str,
    pub given: &'static str,
    pub gender: &'static str,
    pub birth: NaiveDate,
    pub resident_id: String,
    pub phone: String,
    /// Institution numbers holding a record, ascending.
    pub sites: Vec<u32>,
}

impl SimPerson {
    /// This person's local identifier at institution `n`.
    pub fn local_id(&self, n: u32) -> String {
        format!("H{n:03}P{:05}", self.index)
    }

    /// The FHIR Patient institution `inst` registers with the EMPI.
    pub fn patient(&self, inst: &SimInstitution) -> Value {
        json!({
            "resourceType": "Patient",
            "identifier": [
                { "system": inst.patient_id_system, "value": self.local_id(inst.n) },
                { "system": RESIDENT_ID_SYSTEM, "value": self.resident_id },
            ],
            "name": [{ "use": "official", "family": self.family, "given": [self.given] }],
            "gender": self.gender,
            "birthDate": self.birth.format("%Y-%m-%d").to_string(),
            "telecom": [{ "system": "phone", "value": self.phone }],
        })
    }
}

/// The whole simulated region.
#[derive(Debug, Clone)]
pub struct Region {
    pub seed: u64,
    pub institutions: Vec<SimInstitution>,
    pub persons: Vec<SimPerson>,
}

/// Shape of a generated region.
#[derive(Debug, Clone, Copy)]
pub struct RegionShape {
    pub institutions: u32,
    pub persons: u32,
    pub min_sites: u32,
    pub max_sites: u32,
}

const FAMILY: [&str; 20] = [
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "林", "罗", "高",
];
const GIVEN: [&str; 24] = [
    "秀英", "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "涛",
    "明", "超", "秀兰", "霞", "平", "建华", "志强", "丽华", "俊",
];

impl Region {
    pub fn generate(seed: u64, shape: RegionShape) -> Result<Region, String> {
        let n_inst = shape.institutions.max(1);
        let mut institutions = Vec::with_capacity(n_inst as usize);
        for n in FIRST_HOSPITAL..FIRST_HOSPITAL + n_inst {
            let (spec, _) = demo_institution(n);
            institutions.push(SimInstitution {
                n,
                key: institution_key(seed, &spec.id)?,
                id: spec.id,
                name: spec.name,
                patient_id_system: spec.patient_id_system,
                patients: HashMap::new(),
            });
        }
        let mut persons = Vec::with_capacity(shape.persons as usize);
        let min = shape.min_sites.clamp(1, n_inst);
        let max = shape.max_sites.clamp(min, n_inst);
        for p in 0..shape.persons {
            let mut rng = StdRng::seed_from_u64(mix(seed, &[b"person", &p.to_be_bytes()]));
            let male = rng.gen_bool(0.5);
            let birth = NaiveDate::from_ymd_opt(1940, 1, 1)
                .unwrap_or_default()
                .checked_add_signed(Duration::days(rng.gen_range(0..27_000)))
                .unwrap_or_default();
            // Unique per person: area code and sequence number from the index.
            let area = 350102 + (p / 500) % 8;
            let seq = (p % 500) * 2 + u32::from(male);
            let first17 = format!("{area}{}{seq:03}", birth.format("%Y%m%d"));
            let check = yiqiao_registry::empi::ident::check_character(&first17).unwrap_or('0');
            let k = rng.gen_range(min..=max);
            let mut pool: Vec<u32> = (0..n_inst).collect();
            let mut sites = Vec::with_capacity(k as usize);
            for i in 0..k as usize {
                let j = rng.gen_range(i..pool.len());
                pool.swap(i, j);
                sites.push(FIRST_HOSPITAL + pool[i]);
            }
            sites.sort_unstable();
            let person = SimPerson {
                index: p,
                family: FAMILY[rng.gen_range(0..FAMILY.len())],
                given: GIVEN[rng.gen_range(0..GIVEN.len())],
                gender: if male { "male" } else { "female" },
                birth,
                resident_id: format!("{first17}{check}"),
                phone: format!(
                    "138{:08}",
                    mix(seed, &[b"phone", &p.to_be_bytes()]) % 100_000_000
                ),
                sites,
            };
            for &n in &person.sites {
                let inst = &mut institutions[(n - FIRST_HOSPITAL) as usize];
                inst.patients.insert(person.local_id(n), p);
            }
            persons.push(person);
        }
        Ok(Region {
            seed,
            institutions,
            persons,
        })
    }

    pub fn institution(&self, id: &str) -> Option<&SimInstitution> {
        self.institutions.iter().find(|i| i.id == id)
    }

    pub fn institution_by_n(&self, n: u32) -> Option<&SimInstitution> {
        n.checked_sub(FIRST_HOSPITAL)
            .and_then(|i| self.institutions.get(i as usize))
    }
}

struct Code {
    system: &'static str,
    code: &'static str,
    display: &'static str,
}

const LOINC: &str = "http://loinc.org";
const ICD10: &str = "http://hl7.org/fhir/sid/icd-10";
const UCUM: &str = "http://unitsofmeasure.org";
const DRUG: &str = "urn:oid:2.16.156.10011.2.3.3.20";

/// (code, unit, low, high, category)
const OBSERVATIONS: [(Code, &str, f64, f64, &str); 6] = [
    (
        Code {
            system: LOINC,
            code: "8867-4",
            display: "Heart rate",
        },
        "/min",
        55.0,
        110.0,
        "vital-signs",
    ),
    (
        Code {
            system: LOINC,
            code: "8480-6",
            display: "Systolic blood pressure",
        },
        "mm[Hg]",
        95.0,
        175.0,
        "vital-signs",
    ),
    (
        Code {
            system: LOINC,
            code: "29463-7",
            display: "Body weight",
        },
        "kg",
        40.0,
        95.0,
        "vital-signs",
    ),
    (
        Code {
            system: LOINC,
            code: "2339-0",
            display: "Glucose [Mass/volume] in Blood",
        },
        "mmol/L",
        3.8,
        12.5,
        "laboratory",
    ),
    (
        Code {
            system: LOINC,
            code: "718-7",
            display: "Hemoglobin [Mass/volume] in Blood",
        },
        "g/L",
        95.0,
        170.0,
        "laboratory",
    ),
    (
        Code {
            system: LOINC,
            code: "2160-0",
            display: "Creatinine [Mass/volume] in Serum or Plasma",
        },
        "umol/L",
        45.0,
        160.0,
        "laboratory",
    ),
];

const CONDITIONS: [Code; 6] = [
    Code {
        system: ICD10,
        code: "I10",
        display: "原发性高血压",
    },
    Code {
        system: ICD10,
        code: "E11.9",
        display: "2型糖尿病",
    },
    Code {
        system: ICD10,
        code: "J18.9",
        display: "肺炎",
    },
    Code {
        system: ICD10,
        code: "K29.7",
        display: "胃炎",
    },
    Code {
        system: ICD10,
        code: "M54.5",
        display: "腰痛",
    },
    Code {
        system: ICD10,
        code: "J45.9",
        display: "哮喘",
    },
];

const MEDICATIONS: [(Code, &str); 5] = [
    (
        Code {
            system: DRUG,
            code: "86900135000139",
            display: "苯磺酸氨氯地平片 5mg",
        },
        "5 mg 口服 每日一次",
    ),
    (
        Code {
            system: DRUG,
            code: "86902314000076",
            display: "盐酸二甲双胍片 0.5g",
        },
        "0.5 g 口服 每日三次",
    ),
    (
        Code {
            system: DRUG,
            code: "86979480000035",
            display: "阿莫西林胶囊 0.25g",
        },
        "0.5 g 口服 每日三次",
    ),
    (
        Code {
            system: DRUG,
            code: "86901234000158",
            display: "奥美拉唑肠溶胶囊 20mg",
        },
        "20 mg 口服 每日一次",
    ),
    (
        Code {
            system: DRUG,
            code: "86903341000012",
            display: "沙丁胺醇气雾剂",
        },
        "每次 1-2 揿 按需",
    ),
];

const REPORTS: [Code; 3] = [
    Code {
        system: LOINC,
        code: "58410-2",
        display: "CBC panel - Blood by Automated count",
    },
    Code {
        system: LOINC,
        code: "24323-8",
        display: "Comprehensive metabolic panel",
    },
    Code {
        system: LOINC,
        code: "24627-2",
        display: "Chest CT",
    },
];

fn coding(c: &Code) -> Value {
    json!({ "coding": [{ "system": c.system, "code": c.code, "display": c.display }], "text": c.display })
}

fn datetime(day: NaiveDate, minutes: u32) -> String {
    format!(
        "{}T{:02}:{:02}:00+08:00",
        day.format("%Y-%m-%d"),
        8 + (minutes / 60) % 10,
        minutes % 60
    )
}

/// Every resource of `resource_type` institution `inst` holds for person `person`.
pub fn resources(
    seed: u64,
    inst: &SimInstitution,
    person: &SimPerson,
    resource_type: &str,
) -> Vec<Value> {
    let n = inst.n;
    let p = person.index;
    let mut rng = StdRng::seed_from_u64(mix(seed, &[b"chart", &n.to_be_bytes(), &p.to_be_bytes()]));
    let local = person.local_id(n);
    let subject = json!({
        "reference": format!("Patient/{local}"),
        "identifier": { "system": inst.patient_id_system, "value": local },
    });
    let id_system = format!("urn:yiqiao:sim:{}", inst.id);
    let ident = |id: &str| json!([{ "system": id_system, "value": id }]);
    let first_day = NaiveDate::from_ymd_opt(2019, 1, 1).unwrap_or_default();
    let mut out = Vec::new();
    let encounters = rng.gen_range(1..=4u32);
    for e in 0..encounters {
        let day = first_day + Duration::days(rng.gen_range(0..2500));
        let minutes = rng.gen_range(0..600);
        let enc_id = format!("h{n:03}-enc-{p}-{e}");
        let (class, class_display) = match rng.gen_range(0..3) {
            0 => ("IMP", "inpatient encounter"),
            1 => ("EMER", "emergency"),
            _ => ("AMB", "ambulatory"),
        };
        if resource_type == "Encounter" {
            out.push(json!({
                "resourceType": "Encounter",
                "id": enc_id,
                "identifier": ident(&enc_id),
                "status": "finished",
                "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class, "display": class_display },
                "subject": subject,
                "period": { "start": datetime(day, minutes), "end": datetime(day, minutes + 45) },
                "serviceProvider": { "reference": format!("Organization/{}", inst.id), "display": inst.name },
            }));
        }
        let observations = rng.gen_range(1..=3u32);
        for o in 0..observations {
            let (code, unit, low, high, category) =
                &OBSERVATIONS[rng.gen_range(0..OBSERVATIONS.len())];
            let value = (rng.gen_range(*low..*high) * 10.0f64).round() / 10.0;
            let id = format!("h{n:03}-obs-{p}-{e}-{o}");
            if resource_type == "Observation" {
                out.push(json!({
                    "resourceType": "Observation",
                    "id": id,
                    "identifier": ident(&id),
                    "status": "final",
                    "category": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category }] }],
                    "code": coding(code),
                    "subject": subject,
                    "encounter": { "reference": format!("Encounter/{enc_id}") },
                    "effectiveDateTime": datetime(day, minutes + 10 + o),
                    "valueQuantity": { "value": value, "unit": unit, "system": UCUM, "code": unit },
                }));
            }
        }
    }
    let conditions = rng.gen_range(0..=2u32);
    for c in 0..conditions {
        let day = first_day + Duration::days(rng.gen_range(0..2500));
        let code = &CONDITIONS[rng.gen_range(0..CONDITIONS.len())];
        let id = format!("h{n:03}-cond-{p}-{c}");
        if resource_type == "Condition" {
            out.push(json!({
                "resourceType": "Condition",
                "id": id,
                "identifier": ident(&id),
                "clinicalStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active" }] },
                "verificationStatus": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed" }] },
                "code": coding(code),
                "subject": subject,
                "recordedDate": datetime(day, 30),
            }));
        }
    }
    let meds = rng.gen_range(0..=3u32);
    for m in 0..meds {
        let day = first_day + Duration::days(rng.gen_range(0..2500));
        let (code, dosage) = &MEDICATIONS[rng.gen_range(0..MEDICATIONS.len())];
        let id = format!("h{n:03}-med-{p}-{m}");
        if resource_type == "MedicationRequest" {
            out.push(json!({
                "resourceType": "MedicationRequest",
                "id": id,
                "identifier": ident(&id),
                "status": "completed",
                "intent": "order",
                "medicationCodeableConcept": coding(code),
                "subject": subject,
                "authoredOn": datetime(day, 90),
                "dosageInstruction": [{ "text": dosage }],
            }));
        }
    }
    let reports = rng.gen_range(0..=2u32);
    for r in 0..reports {
        let day = first_day + Duration::days(rng.gen_range(0..2500));
        let code = &REPORTS[rng.gen_range(0..REPORTS.len())];
        let id = format!("h{n:03}-dr-{p}-{r}");
        if resource_type == "DiagnosticReport" {
            out.push(json!({
                "resourceType": "DiagnosticReport",
                "id": id,
                "identifier": ident(&id),
                "status": "final",
                "code": coding(code),
                "subject": subject,
                "effectiveDateTime": datetime(day, 120),
                "issued": format!("{}T16:00:00+08:00", day.format("%Y-%m-%d")),
                "conclusion": "未见明显异常",
            }));
        }
    }
    if resource_type == "DiagnosticReport" {
        // The regional laboratory's report, filed at every hospital of the person.
        let mut lab = StdRng::seed_from_u64(mix(seed, &[b"lab", &p.to_be_bytes()]));
        let day = first_day + Duration::days(lab.gen_range(0..2500));
        out.push(json!({
            "resourceType": "DiagnosticReport",
            "id": format!("h{n:03}-dr-{p}-lab"),
            "identifier": [{ "system": REGIONAL_LAB_SYSTEM, "value": format!("LAB-{p:05}") }],
            "status": "final",
            "code": coding(&REPORTS[0]),
            "subject": subject,
            "effectiveDateTime": datetime(day, 60),
            "issued": format!("{}T12:00:00+08:00", day.format("%Y-%m-%d")),
            "conclusion": "区域检验中心报告",
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn regions_are_deterministic_and_consistent() {
        let shape = RegionShape {
            institutions: 30,
            persons: 40,
            min_sites: 5,
            max_sites: 20,
        };
        let a = Region::generate(7, shape).unwrap();
        let b = Region::generate(7, shape).unwrap();
        assert_eq!(a.persons.len(), 40);
        for (pa, pb) in a.persons.iter().zip(&b.persons) {
            assert_eq!(pa.resident_id, pb.resident_id);
            assert_eq!(pa.sites, pb.sites);
            assert!((5..=20).contains(&pa.sites.len()), "{:?}", pa.sites);
            let check = yiqiao_registry::empi::ident::check_character(&pa.resident_id[..17]);
            assert_eq!(check, pa.resident_id.chars().nth(17));
        }
        let ids: std::collections::BTreeSet<_> = a.persons.iter().map(|p| &p.resident_id).collect();
        assert_eq!(ids.len(), 40, "resident ids are unique");
        let i = &a.institutions[0];
        assert_eq!(
            i.key.public_key().to_spki_pem().unwrap(),
            b.institutions[0].key.public_key().to_spki_pem().unwrap()
        );
        let person = &a.persons[0];
        let inst = a.institution_by_n(person.sites[0]).unwrap();
        for t in RESOURCE_TYPES {
            let x = resources(7, inst, person, t);
            assert_eq!(x, resources(7, inst, person, t));
            assert!(x.iter().all(|r| r["resourceType"] == t));
        }
        assert!(!resources(7, inst, person, "Encounter").is_empty());
        assert!(!resources(7, inst, person, "DiagnosticReport").is_empty());
    }
}
