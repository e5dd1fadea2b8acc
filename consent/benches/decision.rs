//! Decision latency with 100k consents over 50k patients, and masking cost of a Patient.
//!
//! Before the criterion groups, a plain harness times 100k individual decisions with
//! `Instant` and prints p50/p90/p99/p99.9/max, next to the same for a bare `HashMap` lookup of
//! the patient's consents (the baseline).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, TimeZone, Utc};
use criterion::{Criterion, black_box, criterion_group};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use yiqiao_consent::*;

const PATIENTS: usize = 50_000;
const CONSENTS: usize = 100_000;
const SAMPLES: usize = 100_000;

fn at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 8, 0, 0).unwrap()
}

fn patient_id(i: usize) -> PatientId {
    PatientId::new(format!("e{i:08}"))
}

/// 100k consents: two per patient, a mix of permits and denies with actors, purposes,
/// classes, labels and periods, so that decisions walk every rule.
fn load() -> (ConsentStore, AgreementStore) {
    let mut store = ConsentStore::new();
    for n in 0..CONSENTS {
        let p = n % PATIENTS;
        let mut scope = Scope::default();
        let provision = if n % 7 == 0 {
            ProvisionType::Deny
        } else {
            ProvisionType::Permit
        };
        scope
            .actors
            .push(InstitutionId::new(format!("h{}", n % 20)));
        if n % 3 == 0 {
            scope.purposes.insert(Purpose::Research);
        }
        if n % 5 == 0 {
            scope
                .labels
                .push(SecurityLabel::Sensitivity(Sensitivity::Psy));
        }
        if n % 11 == 0 {
            scope.classes.push(DataClass::resource_type("Condition"));
        }
        let start = at() - chrono::Duration::days(365);
        let end = at() + chrono::Duration::days(((n % 3) as i64 - 1) * 30);
        store.upsert(Consent {
            id: ConsentId::new(format!("c{n:08}")),
            patient: patient_id(p),
            status: if n % 13 == 0 {
                ConsentStatus::Revoked
            } else {
                ConsentStatus::Active
            },
            provision,
            scope,
            period: Period::between(start, end),
        });
    }
    let mut agreements = AgreementStore::new();
    for h in 0..20 {
        agreements.upsert(Agreement {
            id: AgreementId::new(format!("a{h}")),
            custodian: InstitutionId::new("h0"),
            recipient: InstitutionId::new(format!("h{h}")),
            purposes: Purpose::ALL.into_iter().collect(),
            classes: Vec::new(),
            period: Period::ALWAYS,
            status: AgreementStatus::Active,
        });
    }
    (store, agreements)
}

struct Workload {
    requesters: Vec<Requester>,
    data: Vec<DataItem>,
    patients: Vec<PatientId>,
    custodian: InstitutionId,
    encounters: Vec<Encounter>,
}

impl Workload {
    fn new() -> Self {
        let mut requesters: Vec<Requester> = (1..20)
            .map(|h| Requester::institution(format!("h{h}").as_str(), InstitutionKind::Hospital))
            .collect();
        requesters.push(Requester::institution(
            "h7",
            InstitutionKind::InternetHospital,
        ));
        Self {
            requesters,
            data: vec![
                DataItem::resource("Observation"),
                DataItem::resource("Condition"),
                DataItem::resource("Observation").with_sensitivity(Sensitivity::Psy),
                DataItem::resource("DocumentReference").with_confidentiality(Confidentiality::V),
            ],
            patients: (0..PATIENTS).map(patient_id).collect(),
            custodian: InstitutionId::new("h0"),
            encounters: vec![Encounter {
                institution: InstitutionId::new("h7"),
                period: Period::ALWAYS,
            }],
        }
    }

    /// The i-th request of a deterministic mix (patients spread over the whole store).
    fn request(&self, i: usize) -> AccessRequest<'_> {
        let purposes = [
            Purpose::Treatment,
            Purpose::Research,
            Purpose::Treatment,
            Purpose::Payment,
        ];
        AccessRequest {
            requester: &self.requesters[i % self.requesters.len()],
            purpose: purposes[(i / 3) % purposes.len()],
            patient: &self.patients[(i.wrapping_mul(7919)) % PATIENTS],
            custodian: &self.custodian,
            data: &self.data[(i / 5) % self.data.len()],
            at: at(),
            break_glass_reason: None,
            encounters: &self.encounters,
        }
    }
}

fn engine() -> PolicyEngine {
    let mut config = PolicyConfig::default();
    config
        .agreement_required_for
        .insert(InstitutionKind::Hospital);
    PolicyEngine::new(config).unwrap()
}

fn percentiles(label: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let q = |p: f64| ns[((ns.len() as f64 * p) as usize).min(ns.len() - 1)];
    let mean = ns.iter().sum::<u64>() as f64 / ns.len() as f64;
    println!(
        "{label:<34} n={} mean={mean:.0}ns p50={}ns p90={}ns p99={}ns p99.9={}ns max={}ns",
        ns.len(),
        q(0.50),
        q(0.90),
        q(0.99),
        q(0.999),
        ns[ns.len() - 1]
    );
}

fn p99_report() {
    let (store, agreements) = load();
    let engine = engine();
    let work = Workload::new();
    println!("loaded {} consents over {} patients", store.len(), PATIENTS);
    // Warm-up.
    for i in 0..SAMPLES {
        black_box(engine.decide_with(&work.request(i), &store, &agreements));
    }
    let mut decide = Vec::with_capacity(SAMPLES);
    let mut permits = 0usize;
    for i in 0..SAMPLES {
        let request = work.request(i);
        let t = Instant::now();
        let d = engine.decide_with(&request, &store, &agreements);
        let elapsed = t.elapsed();
        permits += usize::from(d.is_permit());
        black_box(d);
        decide.push(elapsed.as_nanos() as u64);
    }
    let mut lookup = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let request = work.request(i);
        let t = Instant::now();
        let c = store.consents_for(request.patient);
        black_box(c);
        lookup.push(t.elapsed().as_nanos() as u64);
    }
    let mut timer = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        timer.push(black_box(t.elapsed()).as_nanos() as u64);
    }
    println!(
        "decisions: {permits} permits / {} denies",
        SAMPLES - permits
    );
    percentiles("decide (store lookup + decision)", decide);
    percentiles("baseline: consents_for lookup", lookup);
    percentiles("timer overhead (Instant pair)", timer);
}

fn typical_patient() -> Value {
    json!({
        "resourceType": "Patient",
        "id": "e00000042",
        "meta": {"profile": ["http://example.org/fhir/StructureDefinition/cn-patient"]},
        "text": {"status": "generated", "div": "<div>张三丰 11010519491231002X</div>"},
        "identifier": [
            {"system": "urn:oid:2.16.156.10011.1.1", "value": "11010519491231002X"},
            {"system": "urn:example:mrn", "value": "MRN0012345678"}
        ],
        "active": true,
        "name": [{"use": "official", "text": "张三丰", "family": "张", "given": ["三丰"]}],
        "telecom": [
            {"system": "phone", "value": "13812345678", "use": "mobile"},
            {"system": "email", "value": "zhangsanfeng@example.com"}
        ],
        "gender": "male",
        "birthDate": "1949-12-31",
        "address": [{"use": "home", "text": "北京市海淀区中关村大街27号", "line": ["中关村大街27号"],
                     "city": "北京市", "district": "海淀区", "state": "北京市", "postalCode": "100080"}],
        "contact": [{"relationship": [{"text": "子女"}], "name": {"text": "张翠山"},
                     "telecom": [{"system": "phone", "value": "13900001111"}]}]
    })
}

fn benches(c: &mut Criterion) {
    let (store, agreements) = load();
    let engine = engine();
    let work = Workload::new();

    let mut g = c.benchmark_group("consent");
    g.measurement_time(Duration::from_secs(4)).sample_size(50);
    let mut i = 0usize;
    g.bench_function("decide_100k_consents", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            black_box(engine.decide_with(&work.request(i), &store, &agreements))
        })
    });
    let mut j = 0usize;
    g.bench_function("baseline_consents_for_lookup", |b| {
        b.iter(|| {
            j = j.wrapping_add(1);
            black_box(store.consents_for(work.request(j).patient).len())
        })
    });
    let decision = engine.decide_with(&work.request(2), &store, &agreements);
    g.bench_function("baseline_serialize_decision_json", |b| {
        b.iter(|| black_box(serde_json::to_string(black_box(&decision)).unwrap()))
    });

    let patient = typical_patient();
    let payment_rules = MaskingConfig::default()
        .assignments
        .into_iter()
        .find(|a| a.purposes.contains(&Purpose::Payment))
        .unwrap()
        .rules;
    let research_rules = MaskingConfig::default().research;
    let key = PseudonymKey::new(b"bench-key-0123456789".to_vec()).unwrap();
    let ps = Pseudonymiser::new(&key, InstitutionId::new("research-1"));
    g.bench_function("mask_patient_payment_profile", |b| {
        b.iter(|| {
            let mut p = patient.clone();
            apply_rules(&mut p, &payment_rules, None).unwrap();
            black_box(p)
        })
    });
    g.bench_function("mask_patient_research_pseudonymise", |b| {
        b.iter(|| {
            let mut p = patient.clone();
            apply_rules(&mut p, &research_rules, Some(&ps)).unwrap();
            black_box(p)
        })
    });
    g.bench_function("baseline_clone_patient", |b| {
        b.iter(|| black_box(patient.clone()))
    });
    g.bench_function("baseline_serialize_patient_json", |b| {
        b.iter(|| black_box(serde_json::to_string(&patient).unwrap()))
    });
    g.finish();
}

criterion_group!(criterion_benches, benches);

fn main() {
    // `cargo test --benches` runs this binary with `--test`; keep that quick.
    if std::env::args().any(|a| a == "--test") {
        let (store, agreements) = load();
        let work = Workload::new();
        black_box(engine().decide_with(&work.request(1), &store, &agreements));
        return;
    }
    p99_report();
    criterion_benches();
    Criterion::default().configure_from_args().final_summary();
}
