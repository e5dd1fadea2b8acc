//! What consent enforcement costs in a PDQm search, measured through the real server.
//!
//! cargo run --release -p yiqiao --example consent_search_bench -- [PATIENTS] [REQUESTS] [ROUNDS]
//!
//! One SQLite database (temp dir), two gateways on it: `consent.enforce = true` and `false`
//! (same code path; `false` skips the policy). Hospital 1 registers PATIENTS patients (family
//! 张); each has a permit consent for hospital 2 in an opt-in region, so every release needs the
//! patient's consents. Hospital 2 (admin credential + X-On-Behalf-Of, purpose TREAT) sends
//! `GET /fhir/Patient?family=张&_count=50` sequentially: REQUESTS per round, ROUNDS rounds
//! alternating enforced / not enforced. Every request is fully served (database search, policy,
//! durable audit record, JSON). Also times `state.policy.release` alone on the same 50
//! records, in process.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::time::Instant;

use serde_json::{Value, json};
use yiqiao_gateway::auth::{Caller, CallerVia};
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_gateway::policy::{Ask, Candidate};
use yiqiao_registry::consent::{ConsentWrite, create};

#[path = "support/mod.rs"]
mod support;

const ADMIN: &str = "bench-admin-token-0123456789";

fn stats(label: &str, mut us: Vec<f64>) -> f64 {
    us.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| us[((us.len() as f64 * p) as usize).min(us.len() - 1)];
    let mean = us.iter().sum::<f64>() / us.len() as f64;
    println!(
        "{label:<44} n={:<6} mean={mean:>9.1}us p50={:>9.1}us p90={:>9.1}us p99={:>9.1}us",
        us.len(),
        q(0.5),
        q(0.9),
        q(0.99)
    );
    mean
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let patients: usize = args.get(1).map_or(500, |s| s.parse().unwrap());
    let requests: usize = args.get(2).map_or(300, |s| s.parse().unwrap());
    let rounds: usize = args.get(3).map_or(4, |s| s.parse().unwrap());
    let dir = std::env::temp_dir().join(format!(
        "yq-consent-bench-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut settings = Settings::default();
    settings.listen = "127.0.0.1:0".parse().unwrap();
    settings.data_dir = dir.clone();
    settings.admin_token = Secret::new(ADMIN);
    settings.log.level = "warn".into();
    settings.http.workers = 2;
    settings.consent.policy.default_mode = yiqiao_consent::DefaultMode::OptIn;
    let mut plain = settings.clone();
    plain.consent.enforce = false;
    let (on, state) = support::start(settings).await;
    let (off, _) = support::start(plain).await;
    let client = reqwest::Client::new();
    for n in [1u32, 2] {
        let uscc_body = format!("91350100M{n:08}");
        let check = yiqiao_registry::directory::uscc_check_character(&uscc_body).unwrap();
        let uscc = format!("{uscc_body}{check}");
        let body = json!({
            "id": format!("hosp-{n:03}"), "name": format!("第{n}人民医院"),
            "uscc": uscc,
            "region_code": "350100", "level": "3A", "kind": "hospital",
            "patient_id_system": format!("urn:oid:2.16.156.10011.1.99.{n}"),
            "allowed_scopes": ["system/Patient.cruds", "system/Consent.cruds"],
        });
        let r = client
            .post(format!("{on}/admin/institutions"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let given = ["伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋"];
    for i in 0..patients {
        let p = json!({
            "resourceType": "Patient",
            "identifier": [{ "system": "urn:oid:2.16.156.10011.1.99.1", "value": format!("MR-{i:06}") }],
            "name": [{ "family": "张", "given": [format!("{}{}", given[i % 10], given[(i / 10) % 10])] }],
            "gender": if i % 2 == 0 { "male" } else { "female" },
            "birthDate": format!("19{:02}-0{}-1{}", 40 + i % 60, 1 + i % 9, i % 10),
            "telecom": [{ "system": "phone", "value": format!("138{:08}", i) }],
        });
        let r = client
            .post(format!("{on}/fhir/Patient"))
            .bearer_auth(ADMIN)
            .header("X-On-Behalf-Of", "hosp-001")
            .json(&p)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let body: Value = r.json().await.unwrap();
        let person = body["extension"][0]["valueIdentifier"]["value"]
            .as_str()
            .unwrap()
            .to_string();
        let id = uuid::Uuid::now_v7().to_string();
        let resource = json!({ "resourceType": "Consent", "id": id, "status": "active",
            "patient": { "reference": format!("Patient/{person}") },
            "provision": { "type": "permit", "actor": [{ "reference": { "reference": "Organization/hosp-002" } }] } });
        let store = state.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = store.conn().unwrap();
            create(
                &mut conn,
                &ConsentWrite {
                    id,
                    patient_id: person,
                    status: "active".into(),
                    provision: "permit".into(),
                    period_start: None,
                    period_end: None,
                    actor: "hosp-001".into(),
                    resource: resource.to_string(),
                },
            )
            .unwrap();
        })
        .await
        .unwrap();
    }
    println!("{patients} patients registered at hosp-001, each with a permit consent for hosp-002");
    let path = "/fhir/Patient?family=%E5%BC%A0&_count=50";
    let mut timings: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds * 2 {
        let which = round % 2;
        let base = if which == 0 { &on } else { &off };
        for i in 0..requests + 20 {
            let t = Instant::now();
            let r = client
                .get(format!("{base}{path}"))
                .bearer_auth(ADMIN)
                .header("X-On-Behalf-Of", "hosp-002")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body: Value = r.json().await.unwrap();
            let elapsed = t.elapsed().as_secs_f64() * 1e6;
            assert_eq!(body["entry"].as_array().unwrap().len(), 50.min(patients));
            if i >= 20 {
                timings[which].push(elapsed);
            }
        }
    }
    let [enforced, plain] = timings;
    let mean_on = stats("PDQm search, enforcement on (HTTP round trip)", enforced);
    let mean_off = stats("PDQm search, enforcement off (baseline)", plain);
    println!(
        "enforcement share of the search (mean): {:.1}%   ratio on/off: {:.3}",
        (mean_on - mean_off) / mean_on * 100.0,
        mean_on / mean_off
    );

    // The policy alone on the same 50 records (cache warm), in process.
    let institution =
        yiqiao_registry::directory::get(&mut state.store.conn().unwrap(), "hosp-002").unwrap();
    let caller = Caller {
        scopes: institution.allowed_scopes.clone(),
        institution,
        via: CallerVia::AdminOnBehalf,
        purpose: None,
    };
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        yiqiao_registry::empi::store::search_records(
            &mut conn,
            &yiqiao_registry::empi::store::RecordFilter {
                family: Some("张".into()),
                limit: 50,
                ..Default::default()
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    let candidates: Vec<Candidate> = found
        .iter()
        .map(|r| Candidate {
            custodian: r.institution_id.clone(),
            patient: r.link.as_ref().map(|l| l.person_id.clone()),
            resource: yiqiao_gateway::routes::patients::patient_view(r),
        })
        .collect();
    let ask = Ask {
        purpose: yiqiao_consent::Purpose::Treatment,
        break_glass_reason: None,
    };
    let mut release = Vec::new();
    for i in 0..requests * rounds + 20 {
        let batch = candidates.clone();
        let t = Instant::now();
        let released = state.policy.release(&caller, &ask, batch).await.unwrap();
        let elapsed = t.elapsed().as_secs_f64() * 1e6;
        assert_eq!(released.kept.len(), candidates.len());
        if i >= 20 {
            release.push(elapsed);
        }
    }
    let mean_release = stats("policy.release of 50 records alone", release);
    println!(
        "policy.release / enforced search (mean): {:.1}%",
        mean_release / mean_on * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
