//! What consent enforcement costs in a PDQm or document search, measured through the real
//! server.
//!
//! cargo run --release -p yiqiao --features bench-unenforced --example consent_search_bench -- [PATIENTS] [REQUESTS] [ROUNDS] [patient|document] [DATABASE_URL]
//!
//! DATABASE_URL: an empty PostgreSQL database for both gateways (default: SQLite in a temp dir).
//!
//! `document` mode: hospital 1 also registers two DocumentReferences per patient (a discharge
//! summary and a WS/T 500 lab report), and the timed request is
//! `GET /fhir/DocumentReference?_count=50` (newest first, across all patients); the in-process
//! figure is `state.policy.release` on the 50 newest documents.
//!
//! One SQLite database (temp dir), two gateways on it: `consent.enforce = true` and `false`
//! (same code path; `false` skips the policy, and is set here in code: only a build with the
//! feature `bench-unenforced` accepts it, and no configuration can ask for it). Hospital 1 registers PATIENTS patients (family
//! 张); each has a permit consent for hospital 2 in an opt-in region, so every release needs the
//! patient's consents. Hospital 2 (admin credential + X-On-Behalf-Of, purpose TREAT) sends
//! `GET /fhir/Patient?family=张&_count=50` sequentially: REQUESTS pairs per round (one request
//! to each gateway, interleaved so both see the same load), ROUNDS rounds. Every request is fully served (database search, policy,
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
    let documents = match args.get(4).map(String::as_str) {
        None | Some("patient") => false,
        Some("document") => true,
        Some(other) => panic!("mode must be patient or document, not {other}"),
    };
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
    if let Some(url) = args.get(5) {
        settings.database.url = Secret::new(url.clone());
    }
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
            "allowed_scopes": ["system/Patient.cruds", "system/Consent.cruds", "system/DocumentReference.cruds"],
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
        if documents {
            for (k, (system, code)) in [
                ("http://loinc.org", "18842-5"),
                (
                    "https://yiqiao.health/fhir/CodeSystem/wst500-document",
                    "C0007",
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let content = format!("<ClinicalDocument id=\"D-{i}-{k}\"/>");
                let doc = json!({
                    "resourceType": "DocumentReference",
                    "masterIdentifier": { "system": "urn:oid:1.2.156.1", "value": format!("D-{i}-{k}") },
                    "status": "current",
                    "type": { "coding": [{ "system": system, "code": code }] },
                    "subject": { "identifier": { "system": "urn:oid:2.16.156.10011.1.99.1", "value": format!("MR-{i:06}") } },
                    "date": format!("2024-{:02}-{:02}T08:00:00+08:00", 1 + i % 12, 1 + (i + k) % 28),
                    "custodian": { "reference": "Organization/hosp-001" },
                    "content": [{ "attachment": {
                        "contentType": "application/xml",
                        "url": format!("https://his-1.example/docs/D-{i}-{k}"),
                        "size": content.len(),
                        "extension": [{ "url": yiqiao_gateway::documents::SM3_HASH_EXT,
                                        "valueString": yiqiao_sm::sm3_hex(content.as_bytes()) }],
                    }}],
                });
                let r = client
                    .post(format!("{on}/fhir/DocumentReference"))
                    .bearer_auth(ADMIN)
                    .header("X-On-Behalf-Of", "hosp-001")
                    .json(&doc)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
            }
        }
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
    println!(
        "{patients} patients registered at hosp-001{}, each with a permit consent for hosp-002",
        if documents {
            " with 2 documents each"
        } else {
            ""
        }
    );
    let (path, what) = if documents {
        ("/fhir/DocumentReference?_count=50", "document search")
    } else {
        ("/fhir/Patient?family=%E5%BC%A0&_count=50", "PDQm search")
    };
    let expected = if documents {
        50.min(2 * patients)
    } else {
        50.min(patients)
    };
    let mut timings: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // The gateway's own stages (`Server-Timing`, document search), summed per side.
    let mut stages: [std::collections::BTreeMap<String, f64>; 2] = Default::default();
    // Pairs of requests, enforced then not (order swapped every other pair), so both sides see
    // the same machine load; the first 20 pairs of each round warm up.
    for _round in 0..rounds {
        for i in 0..2 * (requests + 20) {
            let which = (i + i / 2) % 2;
            let base = if which == 0 { &on } else { &off };
            let t = Instant::now();
            let r = client
                .get(format!("{base}{path}"))
                .bearer_auth(ADMIN)
                .header("X-On-Behalf-Of", "hosp-002")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let timing = r
                .headers()
                .get("server-timing")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = r.bytes().await.unwrap();
            let elapsed = t.elapsed().as_secs_f64() * 1e6;
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["entry"].as_array().unwrap().len(), expected);
            if i >= 40 {
                timings[which].push(elapsed);
                for part in timing.split(',') {
                    let mut fields = part.split(';').map(str::trim);
                    let (Some(name), Some(dur)) =
                        (fields.next(), fields.find_map(|f| f.strip_prefix("dur=")))
                    else {
                        continue;
                    };
                    if let Ok(ms) = dur.parse::<f64>() {
                        *stages[which].entry(name.to_string()).or_default() += ms * 1000.0;
                    }
                }
            }
        }
    }
    let [enforced, plain] = timings;
    if !stages[0].is_empty() {
        let n = [enforced.len() as f64, plain.len() as f64];
        println!("gateway stages (Server-Timing), mean per search: on / off / difference");
        for (name, on_sum) in &stages[0] {
            let on_mean = on_sum / n[0];
            let off_mean = stages[1].get(name).copied().unwrap_or(0.0) / n[1];
            println!(
                "  {name:<10} {on_mean:>9.1}us {off_mean:>9.1}us {:>+9.1}us",
                on_mean - off_mean
            );
        }
    }
    let mean_on = stats(
        &format!("{what}, enforcement on (HTTP round trip)"),
        enforced,
    );
    let mean_off = stats(&format!("{what}, enforcement off (baseline)"), plain);
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
        user: None,
        token_id: None,
    };
    let store = state.store.clone();
    let candidates: Vec<Candidate> = if documents {
        let base = state.base_url.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = store.conn().unwrap();
            yiqiao_registry::documents::search(
                &mut conn,
                &yiqiao_registry::documents::DocumentFilter {
                    limit: 50,
                    ..Default::default()
                },
            )
            .unwrap()
            .iter()
            .map(|d| yiqiao_gateway::documents::candidate(&base, d))
            .collect()
        })
        .await
        .unwrap()
    } else {
        patient_candidates(&state).await
    };
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
    let mean_release = stats(
        &format!("policy.release of {} results alone", candidates.len()),
        release,
    );
    println!(
        "policy.release / enforced search (mean): {:.1}%",
        mean_release / mean_on * 100.0
    );

    // The durable audit record of such a search, with and without the per-result decision
    // reasons that enforcement adds (alternating).
    let released = state
        .policy
        .release(&caller, &ask, candidates.clone())
        .await
        .unwrap();
    let mut audit: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for i in 0..2 * (requests * rounds + 20) {
        let with_reasons = i % 2 == 0;
        let mut event = state.auditor.search_event(path.to_string());
        if with_reasons {
            released.annotate(&mut event);
        }
        let event = state.auditor.by_caller(event, &caller, None);
        let t = Instant::now();
        state.auditor.record(event).await.unwrap();
        let elapsed = t.elapsed().as_secs_f64() * 1e6;
        if i >= 40 {
            audit[usize::from(!with_reasons)].push(elapsed);
        }
    }
    let [with, without] = audit;
    let mean_with = stats("audit record with decision reasons", with);
    let mean_without = stats("audit record without (baseline)", without);
    println!(
        "audit reasons / enforced search (mean): {:.1}%",
        (mean_with - mean_without) / mean_on * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The 50 first PDQm results as release candidates.
async fn patient_candidates(state: &yiqiao_gateway::state::AppState) -> Vec<Candidate> {
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
    found
        .iter()
        .map(|r| Candidate {
            custodian: r.institution_id.clone(),
            patient: r.link.as_ref().map(|l| l.person_id.clone()),
            resource: yiqiao_gateway::routes::patients::patient_view(r),
        })
        .collect()
}
