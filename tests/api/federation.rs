//! Federated queries against the real simulator (in-process, its own HTTP port) on both
//! backends: full fan-out, misbehaving endpoints reported and excluded, the circuit breaker,
//! deadlines, the release policy, paging and the requester's SM envelope.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use yiqiao_gateway::auth::Caller;
use yiqiao_gateway::config::Settings;
use yiqiao_gateway::federation::{Release, ReleasePolicy};
use yiqiao_gateway::service::offline::OfflineAuditor;
use yiqiao_gateway::sim::data::{REGIONAL_LAB_SYSTEM, resources};
use yiqiao_gateway::sim::load::{Loaded, load_region};
use yiqiao_gateway::sim::{Knobs, RegionShape, SimConfig, SimServer};
use yiqiao_sm::{ENVELOPE_MEDIA_TYPE, Envelope, RecipientKey, RequestBinding};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, test_gateway_key};
use crate::on_both_backends;
use crate::wait;

pub(crate) const SEED: u64 = 7;

pub(crate) struct Region {
    pub(crate) app: TestApp,
    pub(crate) sim: SimServer,
    loaded: Loaded,
}

impl Region {
    /// `n` hospitals (fz-004 …), every person present at all of them.
    pub(crate) async fn start(
        backend: Backend,
        n: u32,
        adjust: impl FnOnce(&mut Settings),
    ) -> Region {
        let app = TestApp::spawn_with(backend, |s| {
            s.database.pool_size = 8;
            s.database.acquire_timeout_ms = 10_000;
            adjust(s);
        })
        .await;
        let settings = app.state.settings.clone();
        let config = SimConfig {
            seed: SEED,
            shape: RegionShape {
                institutions: n,
                persons: 3,
                min_sites: n,
                max_sites: n,
            },
            knobs: Knobs::default(),
            overrides: Default::default(),
            gateway_key: RecipientKey {
                key_id: settings.federation.key_id.clone(),
                public_key: test_gateway_key().1.public_key(),
            },
            gateway_id: Some(settings.federation.gateway_id.clone()),
            workers: 2,
        };
        let mut sim = SimServer::start(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        sim.spawn();
        let auditor =
            OfflineAuditor::open(&settings, app.state.store.clone(), "sim-loader".into()).unwrap();
        let region = sim.region().clone();
        let base = sim.base_url.clone();
        let resident = settings.empi.resident_id_system.clone();
        let loaded =
            tokio::task::spawn_blocking(move || load_region(&auditor, &region, &base, &resident))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(
            loaded.split_persons, 0,
            "every person is one enterprise person"
        );
        Region { app, sim, loaded }
    }

    pub(crate) fn person(&self, index: usize) -> String {
        self.loaded.persons[index].clone().expect("person linked")
    }

    /// GET as institution `inst` (admin credential on its behalf).
    async fn get_as(&self, inst: &str, path: &str) -> reqwest::Response {
        self.app
            .client
            .get(self.app.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", inst)
            .send()
            .await
            .unwrap()
    }

    pub(crate) async fn bundle(&self, path: &str) -> Value {
        let resp = self.get_as("fz-004", path).await;
        assert_eq!(resp.status(), 200, "{path}");
        resp.json().await.unwrap()
    }

    /// Total entries the hospitals hold for person 0 (the simulator's own data).
    fn held(&self, resource_type: &str, sites: &[&str]) -> usize {
        let region = self.sim.region();
        let person = &region.persons[0];
        sites
            .iter()
            .map(|id| resources(SEED, region.institution(id).unwrap(), person, resource_type).len())
            .sum()
    }

    pub(crate) async fn stop(self) {
        self.sim.stop().await;
        self.app.stop().await;
    }
}

fn matches(bundle: &Value) -> Vec<&Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| &e["resource"])
        .collect()
}

pub(crate) fn sources(bundle: &Value) -> BTreeSet<String> {
    matches(bundle)
        .iter()
        .map(|r| {
            let src = r["meta"]["source"].as_str().unwrap();
            src.rsplit('/').next().unwrap().to_string()
        })
        .collect()
}

pub(crate) fn outcome_issues(bundle: &Value) -> Vec<Value> {
    let outcomes: Vec<&Value> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "outcome")
        .collect();
    assert_eq!(outcomes.len(), 1, "one outcome entry");
    assert_eq!(outcomes[0]["resource"]["resourceType"], "OperationOutcome");
    outcomes[0]["resource"]["issue"].as_array().unwrap().clone()
}

/// (institution, status) of each per-institution issue.
pub(crate) fn statuses(bundle: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = outcome_issues(bundle)
        .iter()
        .filter_map(|i| {
            let codings = i["details"]["coding"].as_array()?;
            let inst = codings.get(1)?["code"].as_str()?.to_string();
            Some((inst, codings[0]["code"].as_str()?.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The Bundle passes an independent FHIR validator (Python `fhir.resources`, R4B models):
/// the gateway assembles it from the hospitals' serialised resources, not from one tree.
/// `body` is the answer's bytes as sent.
async fn fhir_valid(body: &[u8]) {
    let dir = crate::helpers::TempDir::new();
    let file = dir.path.join("bundle.json");
    std::fs::write(&file, body).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/validate_fhir.py"
    );
    let out = wait::output(
        wait::command("python3").arg(script).arg(&file),
        "validate_fhir.py",
    )
    .await;
    assert!(
        out.status.success(),
        "fhir.resources rejected the Bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sorted_newest_first(bundle: &Value) -> bool {
    let dates: Vec<chrono::DateTime<chrono::FixedOffset>> = matches(bundle)
        .iter()
        .map(|r| {
            let d = r["effectiveDateTime"]
                .as_str()
                .or(r["period"]["start"].as_str())
                .or(r["recordedDate"].as_str())
                .or(r["authoredOn"].as_str())
                .unwrap();
            chrono::DateTime::parse_from_rfc3339(d).unwrap()
        })
        .collect();
    dates.windows(2).all(|w| w[0] >= w[1])
}

struct WithholdConditionsOf(&'static str);

impl ReleasePolicy for WithholdConditionsOf {
    fn release(&self, _: &Caller, _: &str, custodian: &str, resource: Value) -> Release {
        if custodian == self.0 && resource["resourceType"] == "Condition" {
            Release::Withhold {
                reason: "sensitive diagnosis (test policy)".into(),
            }
        } else {
            Release::Keep(resource)
        }
    }
}

async fn full_fan_out_merges_tags_pages_and_audits(backend: Backend) {
    let region = Region::start(backend, 4, |_| {}).await;
    let person = region.person(0);
    let all = ["fz-004", "fz-005", "fz-006", "fz-007"];

    for t in ["Observation", "Encounter", "Condition", "MedicationRequest"] {
        let b = region.bundle(&format!("/fhir/{t}?patient={person}")).await;
        assert_eq!(b["type"], "searchset");
        let found = matches(&b);
        assert_eq!(found.len(), region.held(t, &all), "{t}");
        assert_eq!(b["total"], json!(found.len()));
        assert!(found.iter().all(|r| r["resourceType"] == t));
        if !found.is_empty() {
            assert!(sorted_newest_first(&b), "{t} sorted by date, newest first");
        }
        assert!(statuses(&b).is_empty(), "{t}: {:?}", outcome_issues(&b));
    }
    let obs = region
        .bundle(&format!("/fhir/Observation?patient={person}"))
        .await;
    assert_eq!(sources(&obs), all.iter().map(|s| s.to_string()).collect());
    let raw = region
        .get_as("fz-004", &format!("/fhir/Observation?patient={person}"))
        .await
        .bytes()
        .await
        .unwrap();
    fhir_valid(&raw).await;
    let summary = outcome_issues(&obs)[0]["details"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(summary.contains("4 answered, 0 did not"), "{summary}");

    // The regional lab report filed at every hospital appears once.
    let reports = region
        .bundle(&format!("/fhir/DiagnosticReport?patient=Patient/{person}"))
        .await;
    let lab: Vec<_> = matches(&reports)
        .into_iter()
        .filter(|r| r["identifier"][0]["system"] == REGIONAL_LAB_SYSTEM)
        .collect();
    assert_eq!(lab.len(), 1, "duplicates collapsed");
    assert_eq!(
        matches(&reports).len(),
        region.held("DiagnosticReport", &all) - 3
    );

    // code filter, forwarded to the hospitals.
    let hr = region
        .bundle(&format!(
            "/fhir/Observation?patient={person}&code=http://loinc.org|8867-4"
        ))
        .await;
    assert!(
        matches(&hr)
            .iter()
            .all(|r| r["code"]["coding"][0]["code"] == "8867-4")
    );
    assert!(matches(&hr).len() < matches(&obs).len());

    // Paging: pages of 2 cover everything once, in order.
    let mut seen = Vec::new();
    let mut next = Some(
        region
            .app
            .url(&format!("/fhir/Observation?patient={person}&_count=2")),
    );
    while let Some(url) = next.take() {
        let resp = region
            .app
            .client
            .get(&url)
            .bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "fz-004")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let page: Value = resp.json().await.unwrap();
        let ids: Vec<String> = matches(&page)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        assert!(ids.len() <= 2);
        seen.extend(ids);
        next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    let all_ids: Vec<String> = matches(&obs)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen, all_ids);

    // The release policy decides per institution and resource; withheld items are counted.
    region
        .app
        .state
        .federation
        .set_policy(Arc::new(WithholdConditionsOf("fz-005")));
    let conds = region
        .bundle(&format!("/fhir/Condition?patient={person}"))
        .await;
    let at_005 = region.held("Condition", &["fz-005"]);
    assert_eq!(
        matches(&conds).len(),
        region.held("Condition", &all) - at_005
    );
    assert!(!sources(&conds).contains("fz-005"));
    if at_005 > 0 {
        let withheld = outcome_issues(&conds)
            .into_iter()
            .find(|i| i["details"]["coding"][0]["code"] == "withheld")
            .expect("withheld issue");
        let text = withheld["details"]["text"].as_str().unwrap();
        assert!(
            text.contains(&format!("{at_005} resource(s) withheld")),
            "{text}"
        );
    }
    region
        .app
        .state
        .federation
        .set_policy(Arc::new(yiqiao_gateway::federation::PermitAll));

    // Bad requests name the parameter; unknown persons are 404; scopes are enforced.
    assert_outcome(
        region.get_as("fz-004", "/fhir/Observation").await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        region
            .get_as(
                "fz-004",
                &format!("/fhir/Observation?patient={person}&colour=red"),
            )
            .await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        region
            .get_as(
                "fz-004",
                &format!("/fhir/Encounter?patient={person}&code=x"),
            )
            .await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        region
            .get_as(
                "fz-004",
                &format!("/fhir/Observation?patient={person}&_timeout=0"),
            )
            .await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        region
            .get_as("fz-004", "/fhir/Observation?patient=no-such-person")
            .await,
        404,
        "not-found",
    )
    .await;
    let (mut narrow, _) = yiqiao_gateway::demo::demo_institution(3);
    narrow.allowed_scopes = vec!["system/Observation.rs".into()];
    let auditor = OfflineAuditor::open(
        &region.app.state.settings,
        region.app.state.store.clone(),
        "cli:test".into(),
    )
    .unwrap();
    tokio::task::spawn_blocking(move || {
        let valid = yiqiao_registry::directory::validate(&narrow).unwrap();
        let event = auditor.event("create", "C", "Organization/fz-003".into());
        auditor
            .change(event, |tx, _| {
                yiqiao_registry::directory::create(tx, &valid)
            })
            .unwrap();
    })
    .await
    .unwrap();
    assert_outcome(
        region
            .get_as("fz-003", &format!("/fhir/Encounter?patient={person}"))
            .await,
        403,
        "forbidden",
    )
    .await;

    // Every federated answer has its audit record: caller, patient, institutions queried.
    let store = region.app.state.store.clone();
    let rows: Vec<(String, Option<String>, String)> = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::audit_events::dsl as a;
        let mut conn = store.conn().unwrap();
        a::audit_events
            .filter(a::agent_institution.eq("fz-004"))
            .filter(a::subtype_code.eq("search-type"))
            .select((a::outcome, a::patient_id, a::resource))
            .load(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    assert!(rows.len() >= 8, "{} audit records", rows.len());
    for (_, patient, resource) in &rows {
        assert_eq!(patient.as_deref(), Some(person.as_str()));
        for id in all {
            assert!(
                resource.contains(&format!("Organization/{id}")),
                "{resource}"
            );
        }
    }
    region.stop().await;
}

/// The consent engine decides each hospital's answer as it arrives: in an opt-in region
/// without a consent, the requester gets only its own records; the other hospitals' resources
/// are withheld and counted per hospital with the rule, and the audit record says `partial`.
/// On PostgreSQL with Redis, where the engine synchronises its caches itself (not on the
/// resolve trip), the same.
async fn consent_engine_decides_each_answer(backend: Backend) {
    let prefix = format!("yq-fed-consent-{}:", uuid::Uuid::new_v4().simple());
    let region = Region::start(backend, 4, |s| {
        s.consent.policy.default_mode = yiqiao_consent::DefaultMode::OptIn;
        if backend == Backend::Postgres {
            s.redis.url = yiqiao_gateway::config::Secret::new(crate::helpers::redis_url());
            s.redis.key_prefix = prefix.clone();
        }
    })
    .await;
    let person = region.person(0);
    let others = ["fz-005", "fz-006", "fz-007"];
    for t in ["Observation", "Condition"] {
        let raw = region
            .get_as("fz-004", &format!("/fhir/{t}?patient={person}"))
            .await
            .bytes()
            .await
            .unwrap();
        let b: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            matches(&b).len(),
            region.held(t, &["fz-004"]),
            "{t}: own records only"
        );
        assert!(sources(&b).iter().all(|s| s == "fz-004"), "{t}");
        let withheld: Vec<Value> = outcome_issues(&b)
            .into_iter()
            .filter(|i| i["details"]["coding"][0]["code"] == "withheld")
            .collect();
        for id in others {
            let held = region.held(t, &[id]);
            if held == 0 {
                continue;
            }
            let issue = withheld
                .iter()
                .find(|i| i["details"]["coding"][1]["code"] == id)
                .unwrap_or_else(|| panic!("{t}: no withheld issue for {id}: {withheld:?}"));
            let text = issue["details"]["text"].as_str().unwrap();
            assert!(
                text.contains(&format!("{held} resource(s) withheld"))
                    && text.contains("consent policy: "),
                "{text}"
            );
        }
        fhir_valid(&raw).await;
    }
    let store = region.app.state.store.clone();
    let decisions: Vec<Option<String>> = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::audit_events::dsl as a;
        let mut conn = store.conn().unwrap();
        a::audit_events
            .filter(a::agent_institution.eq("fz-004"))
            .filter(a::subtype_code.eq("search-type"))
            .select(a::consent_decision)
            .load(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(decisions.len(), 2);
    assert!(
        decisions.iter().all(|d| d.as_deref() == Some("partial")),
        "{decisions:?}"
    );
    region.stop().await;
}

async fn requester_envelope_is_sealed_to_its_key_and_bound(backend: Backend) {
    let region = Region::start(backend, 2, |_| {}).await;
    let person = region.person(0);
    let path = format!("/fhir/Observation?patient={person}");
    let plain = region.bundle(&path).await;

    let resp = region
        .app
        .client
        .get(region.app.url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "fz-004")
        .header("Accept", ENVELOPE_MEDIA_TYPE)
        .header("X-Request-Id", "req-federation-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        ENVELOPE_MEDIA_TYPE
    );
    let envelope = Envelope::from_json(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(envelope.sender_id, "yiqiao-gateway");
    assert_eq!(envelope.recipient_key_id, "fz-004-sm2-1");
    let my_key = &region.sim.region().institution("fz-004").unwrap().key;
    let gateway = test_gateway_key().1.public_key();
    let binding = RequestBinding::new("GET", &path, "fz-004", "req-federation-1").unwrap();
    let (payload, content_type) = envelope
        .open(
            my_key,
            &gateway,
            &binding,
            chrono::Utc::now(),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(content_type, "application/fhir+json");
    let sealed: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(matches(&sealed).len(), matches(&plain).len());
    // An independent implementation (Python gmssl + cryptography) opens it too.
    let dir = crate::helpers::TempDir::new();
    let file = |name: &str| dir.path.join(name).display().to_string();
    std::fs::write(file("env.json"), envelope.to_json().unwrap()).unwrap();
    std::fs::write(file("me.pem"), my_key.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
    std::fs::write(file("gw.pub.pem"), gateway.to_spki_pem().unwrap()).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/envelope.py");
    let out = wait::output(
        wait::command("python3")
            .args([script, "open", "--method", "GET", "--path", &path])
            .args([
                "--requester-id",
                "fz-004",
                "--request-id",
                "req-federation-1",
            ])
            .args([
                "--in",
                &file("env.json"),
                "--recipient-key",
                &file("me.pem"),
            ])
            .args([
                "--sender-pub",
                &file("gw.pub.pem"),
                "--out",
                &file("out.json"),
            ]),
        "envelope.py open",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(file("out.json")).unwrap(), payload);
    // Bound to this request: another request id does not open it.
    let other = RequestBinding::new("GET", &path, "fz-004", "req-federation-2").unwrap();
    assert!(
        envelope
            .open(
                my_key,
                &gateway,
                &other,
                chrono::Utc::now(),
                Duration::from_secs(60)
            )
            .is_err()
    );
    // Asking for an envelope without a request id to bind is refused.
    let resp = region
        .app
        .client
        .get(region.app.url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "fz-004")
        .header("Accept", ENVELOPE_MEDIA_TYPE)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 400, "invalid-parameter").await;
    // The gateway publishes the key hospitals seal to.
    let key: Value = region
        .app
        .get("/federation/key")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(key["key_id"], "gateway-sm2-1");
    assert_eq!(key["public_key_pem"], json!(gateway.to_spki_pem().unwrap()));
    region.stop().await;
}

async fn misbehaving_endpoints_are_reported_and_excluded(backend: Backend) {
    let region = Region::start(backend, 6, |s| {
        s.federation.endpoint_timeout_ms = 800;
        s.federation.retries = 1;
        s.federation.breaker_failure_threshold = 100;
    })
    .await;
    let sick = |k: &str| Some(Knobs::default().with_overrides(k).unwrap());
    region.sim.set_knobs("fz-005", sick("error_rate=1.0"));
    region
        .sim
        .set_knobs("fz-006", sick("latency_min_ms=5000,latency_max_ms=5000"));
    region.sim.set_knobs("fz-007", sick("garbage_rate=1.0"));
    region.sim.set_knobs("fz-008", sick("tampered_rate=1.0"));
    let person = region.person(0);
    let b = region
        .bundle(&format!("/fhir/Observation?patient={person}"))
        .await;
    assert_eq!(
        statuses(&b),
        vec![
            ("fz-005".to_string(), "failed".to_string()),
            ("fz-006".to_string(), "timeout".to_string()),
            ("fz-007".to_string(), "garbage".to_string()),
            ("fz-008".to_string(), "tampered".to_string()),
        ]
    );
    assert_eq!(
        sources(&b),
        ["fz-004", "fz-009"].iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(
        matches(&b).len(),
        region.held("Observation", &["fz-004", "fz-009"])
    );
    let texts: Vec<String> = outcome_issues(&b)
        .iter()
        .map(|i| i["details"]["text"].as_str().unwrap().to_string())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("fz-005") && t.contains("HTTP 503")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("fz-008") && t.contains("signature")),
        "{texts:?}"
    );
    // 503 is retried once; garbage and tampered answers are not retried.
    assert_eq!(region.sim.hits("fz-005"), 2);
    // With its warnings the Bundle is still valid FHIR (checked independently).
    fhir_valid(&serde_json::to_vec(&b).unwrap()).await;
    assert_eq!(region.sim.hits("fz-007"), 1);
    assert_eq!(region.sim.hits("fz-008"), 1);
    region.stop().await;
}

async fn circuit_breaker_opens_and_recovers(backend: Backend) {
    let region = Region::start(backend, 2, |s| {
        s.federation.retries = 0;
        s.federation.breaker_failure_threshold = 2;
        s.federation.breaker_cooldown_ms = 600;
    })
    .await;
    let person = region.person(0);
    let path = format!("/fhir/Encounter?patient={person}");
    region.sim.set_knobs(
        "fz-005",
        Some(Knobs::default().with_overrides("error_rate=1.0").unwrap()),
    );
    for _ in 0..2 {
        let b = region.bundle(&path).await;
        assert_eq!(statuses(&b), vec![("fz-005".into(), "failed".into())]);
    }
    assert_eq!(
        region.app.state.federation.breakers().state("fz-005"),
        "open"
    );
    let b = region.bundle(&path).await;
    assert_eq!(statuses(&b), vec![("fz-005".into(), "circuit-open".into())]);
    assert_eq!(
        region.sim.hits("fz-005"),
        2,
        "an open circuit sends nothing"
    );
    assert_eq!(sources(&b), BTreeSet::from(["fz-004".to_string()]));

    // The hospital recovers; after the cooldown one probe closes the circuit.
    region.sim.set_knobs("fz-005", None);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = region.bundle(&path).await;
    assert!(statuses(&b).is_empty(), "{:?}", outcome_issues(&b));
    assert_eq!(
        region.app.state.federation.breakers().state("fz-005"),
        "closed"
    );
    assert_eq!(region.sim.hits("fz-005"), 3);
    region.stop().await;
}

async fn overall_deadline_is_honoured(backend: Backend) {
    let region = Region::start(backend, 3, |_| {}).await;
    region.sim.set_knobs(
        "fz-005",
        Some(
            Knobs::default()
                .with_overrides("timeout_rate=1.0,hang_ms=20000")
                .unwrap(),
        ),
    );
    let person = region.person(0);
    let started = Instant::now();
    let b = region
        .bundle(&format!(
            "/fhir/Observation?patient={person}&_timeout=700&_endpointTimeout=20000"
        ))
        .await;
    let took = started.elapsed();
    // Generous upper bound: the deadline plus scheduling and audit slack, far below the hang.
    assert!(took < Duration::from_millis(700 + 2500), "took {took:?}");
    assert_eq!(statuses(&b), vec![("fz-005".into(), "timeout".into())]);
    let text = outcome_issues(&b)[1]["details"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("overall deadline 700 ms"), "{text}");
    assert_eq!(
        sources(&b),
        ["fz-004", "fz-006"].iter().map(|s| s.to_string()).collect()
    );
    region.stop().await;
}

on_both_backends!(
    full_fan_out_merges_tags_pages_and_audits,
    consent_engine_decides_each_answer,
    requester_envelope_is_sealed_to_its_key_and_bound,
    misbehaving_endpoints_are_reported_and_excluded,
    circuit_breaker_opens_and_recovers,
    overall_deadline_is_honoured,
);
