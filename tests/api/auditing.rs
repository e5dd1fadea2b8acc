//! The auditors' workspace (issue 6): admin changes committed with their audit record,
//! refusals recorded (and a flood of them counted, not lost), AuditEvent search for auditors,
//! "who accessed my records" for institutions, anomaly alerts with acknowledgement and webhook,
//! the compliance report, and kill -9 of the real binary under load.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use serde_json::{Value, json};
use tokio::process::Child;
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_registry::Store;
use yiqiao_registry::audit::query::{self, EventFilter, StoredEvent};
use yiqiao_registry::audit::{AuditEvent, verify_db};
use yiqiao_sm::{DEFAULT_SIGNER_ID, Sm2PrivateKey, Sm2PublicKey, sign_jws};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TempDir, TestApp, TestDb, assert_outcome, institution, test_audit_key,
};
use crate::on_both_backends;
use crate::wait;

pub(crate) const AUDITOR_TOKEN: &str = "test-auditor-token-9876543210";

pub(crate) fn settings(s: &mut Settings) {
    s.auditor_token = Secret::new(AUDITOR_TOKEN);
    s.audit.alert_scan_interval_secs = 0;
    s.auth.ip_burst = 10_000;
    s.auth.institution_burst = 10_000;
    s.auth.directory_cache_ttl_ms = 0;
}

/// Every stored record, newest first.
pub(crate) async fn records(app: &TestApp) -> Vec<StoredEvent> {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        query::search(
            &mut conn,
            &EventFilter {
                limit: 1_000_000,
                ..EventFilter::default()
            },
        )
        .unwrap()
    })
    .await
    .unwrap()
}

fn resource(e: &StoredEvent) -> Value {
    serde_json::from_str(&e.resource).unwrap()
}

fn public_key() -> Sm2PublicKey {
    Sm2PublicKey::from_spki_pem(&std::fs::read_to_string(&test_audit_key().1).unwrap()).unwrap()
}

pub(crate) async fn chain_ok(app: &TestApp) {
    let store = app.state.store.clone();
    let report = tokio::task::spawn_blocking(move || {
        verify_db(&mut store.conn().unwrap(), None, None, &public_key()).unwrap()
    })
    .await
    .unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
}

/// Make every audit insert fail (a trigger), to show that nothing is answered without its record.
pub(crate) async fn break_audit(app: &TestApp, backend: Backend) {
    let deny = match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION audit_down() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit down'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit_down BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_down();"
        }
    };
    sql(app, deny).await;
}

/// Undo [`break_audit`].
pub(crate) async fn mend_audit(app: &TestApp, backend: Backend) {
    let undo = match backend {
        Backend::Sqlite => "DROP TRIGGER audit_down",
        Backend::Postgres => "DROP TRIGGER audit_down ON audit_events",
    };
    sql(app, undo).await;
}

pub(crate) async fn sql(app: &TestApp, statements: &str) {
    let store = app.state.store.clone();
    let statements = statements.to_string();
    tokio::task::spawn_blocking(move || {
        store.conn().unwrap().batch_execute(&statements).unwrap();
    })
    .await
    .unwrap()
}

async fn bearer_get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn auditor_get(app: &TestApp, path: &str) -> reqwest::Response {
    bearer_get(app, path, AUDITOR_TOKEN).await
}

fn audit_down(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => {
            "CREATE TRIGGER audit_down BEFORE INSERT ON audit_events BEGIN SELECT RAISE(ABORT, 'audit down'); END;"
        }
        Backend::Postgres => {
            "CREATE FUNCTION audit_down() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit down'; END $$ LANGUAGE plpgsql; \
             CREATE TRIGGER audit_down BEFORE INSERT ON audit_events FOR EACH ROW EXECUTE FUNCTION audit_down();"
        }
    }
}

fn audit_up(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "DROP TRIGGER audit_down;",
        Backend::Postgres => "DROP TRIGGER audit_down ON audit_events;",
    }
}

/// An admin change is stored if and only if its audit record is; a refused change is recorded
/// with a failure outcome and the reason.
async fn admin_changes_commit_with_their_record(backend: Backend) {
    let app = TestApp::spawn_with(backend, settings).await;
    assert_eq!(
        app.admin_post("/admin/institutions", &institution(1))
            .await
            .status(),
        201
    );
    let dup = app.admin_post("/admin/institutions", &institution(1)).await;
    assert_outcome(dup, 409, "conflict").await;
    let missing = app
        .admin_post("/admin/institutions/hosp-404/suspend", &Value::Null)
        .await;
    assert_outcome(missing, 404, "not-found").await;
    let all = records(&app).await;
    let summary: Vec<(String, String, String, Option<String>)> = all
        .iter()
        .rev()
        .map(|e| {
            let r = resource(e);
            (
                e.subtype_code.clone(),
                e.outcome.clone(),
                r["entity"][0]["what"]["reference"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["outcomeDesc"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(summary.len(), 3, "{summary:?}");
    assert_eq!(
        summary[0],
        (
            "create".into(),
            "0".into(),
            "Organization/hosp-001".into(),
            None
        )
    );
    assert_eq!(
        (&summary[1].0, &summary[1].1, &summary[1].2),
        (
            &"create".to_string(),
            &"4".to_string(),
            &"Organization/hosp-001".to_string()
        )
    );
    assert!(summary[1].3.as_deref().unwrap().starts_with("conflict:"));
    assert_eq!(summary[2].1, "4");
    assert!(summary[2].3.as_deref().unwrap().starts_with("not-found:"));
    // Audit down: the change is refused with 503 and NOT stored.
    sql(&app, audit_down(backend)).await;
    let resp = app.admin_post("/admin/institutions", &institution(2)).await;
    assert_outcome(resp, 503, "audit-unavailable").await;
    let resp = app
        .admin_post("/admin/institutions/hosp-001/suspend", &Value::Null)
        .await;
    assert_outcome(resp, 503, "audit-unavailable").await;
    sql(&app, audit_up(backend)).await;
    assert_eq!(app.institution_count().await, 1, "hosp-002 must not exist");
    let read: Value = app
        .admin_get("/admin/institutions/hosp-001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["status"], "active", "the suspension was rolled back");
    chain_ok(&app).await;
    app.stop().await;
}

/// 401 and 403 answers become failure records attributed to whoever authenticated; a flood
/// that overflows the refusal queue is counted in a summary record, nothing silently lost.
async fn refusals_are_recorded_and_a_flood_is_counted(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        settings(s);
        s.audit.refusal_queue_capacity = 4;
    })
    .await;
    app.admin_post("/admin/institutions", &institution(1)).await;
    // 403: hosp-001 lacks Consent scopes → a data route refused after authentication.
    let denied = bearer_get(&app, "/fhir/AuditEvent?patient=x", ADMIN_TOKEN).await;
    assert_outcome(denied, 403, "forbidden").await;
    let flood = 60;
    let started = Instant::now();
    let answers = futures::future::join_all((0..flood).map(|i| {
        let req = app
            .client
            .get(app.url(&format!("/fhir/Patient/p-{i}")))
            .bearer_auth("not-a-token");
        async move { req.send().await.unwrap().status().as_u16() }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Give the writer time to drain.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (itemised, summarised, admin_denial) = loop {
        let all = records(&app).await;
        let itemised = all
            .iter()
            .filter(|e| {
                resource(e)["entity"][0]["description"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("GET /fhir/Patient/p-"))
            })
            .count();
        let summarised: u64 = all
            .iter()
            .filter_map(|e| {
                let r = resource(e);
                let d = r["outcomeDesc"].as_str()?.to_string();
                d.strip_suffix(" refused requests not itemised: the refusal queue was full")
                    .map(|n| n.parse::<u64>().unwrap())
            })
            .sum();
        let admin_denial = all
            .iter()
            .find(|e| e.agent_user.as_deref() == Some("operator:admin"))
            .cloned();
        if let Some(denial) = admin_denial
            && itemised as u64 + summarised == flood as u64
        {
            break (itemised, summarised, denial);
        }
        assert!(
            Instant::now() < deadline,
            "refusals not accounted: {itemised} itemised + {summarised} summarised of {flood}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(itemised >= 1, "some refusals are itemised");
    assert!(
        summarised >= 1,
        "the queue of 4 overflowed: {itemised} itemised"
    );
    assert_eq!(admin_denial.outcome, "4");
    let r = resource(&admin_denial);
    assert_eq!(r["agent"][0]["role"][0]["text"], "admin");
    assert!(
        r["outcomeDesc"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 403 forbidden:"),
        "{r}"
    );
    let one = records(&app)
        .await
        .into_iter()
        .find(|e| resource(e)["entity"][0]["description"] == "GET /fhir/Patient/p-0");
    if let Some(e) = one {
        let r = resource(&e);
        assert_eq!(r["agent"][0]["network"]["address"], "127.0.0.1");
        assert_eq!(r["agent"][0]["who"]["display"], "unauthenticated");
        assert!(r["outcomeDesc"].as_str().unwrap().starts_with("HTTP 401"));
    }
    chain_ok(&app).await;
    app.stop().await;
}

/// Register hosp-001 (keys for tokens, AuditEvent scope) and hosp-002; hosp-001 registers a
/// patient; returns (source record id, enterprise person id).
pub(crate) async fn region_with_patient(app: &TestApp, key: &Sm2PrivateKey) -> (String, String) {
    for n in [1, 2, 3] {
        register_with_key(
            app,
            n,
            key,
            &["system/Patient.cruds", "system/AuditEvent.rs"],
        )
        .await;
    }
    let patient = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:2.16.156.10011.1.99.1", "value": "MR-7" }],
        "name": [{ "text": "王芳" }], "gender": "female", "birthDate": "1975-06-01",
    });
    let created: Value = app
        .client
        .post(app.url("/fhir/Patient"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .json(&patient)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let person = created["extension"][0]["valueIdentifier"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    (id, person)
}

/// Register institution `n` with `key` (kid `k1`) for client assertions and these scopes.
pub(crate) async fn register_with_key(app: &TestApp, n: u32, key: &Sm2PrivateKey, scopes: &[&str]) {
    let mut body = institution(n);
    body["sm2_keys"] = json!([{"kid": "k1", "pem": key.public_key().to_spki_pem().unwrap()}]);
    body["allowed_scopes"] = json!(scopes);
    let resp = app.admin_post("/admin/institutions", &body).await;
    assert_eq!(resp.status(), 201);
}

/// A gateway access token for `institution` through the real SMART flow (SM2SM3 assertion).
pub(crate) async fn access_token(
    app: &TestApp,
    key: &Sm2PrivateKey,
    institution: &str,
    scope: &str,
) -> String {
    access_token_for(app, key, institution, scope, "TREAT").await
}

/// [`access_token`] with a purpose of use.
pub(crate) async fn access_token_for(
    app: &TestApp,
    key: &Sm2PrivateKey,
    institution: &str,
    scope: &str,
    purpose: &str,
) -> String {
    let aud = format!("{}/oauth2/token", app.state.base_url);
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": institution, "sub": institution, "aud": aud, "iat": now,
        "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string()});
    let assertion = sign_jws(
        &json!({"typ": "JWT", "kid": "k1"}),
        &claims,
        &key.signing_key(DEFAULT_SIGNER_ID).unwrap(),
    )
    .unwrap();
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
            ("scope", scope),
            ("purpose_of_use", purpose),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// Auditor search: every filter, newest first, paging through next links, own reads audited;
/// the admin credential and institutions without the patient are kept out.
async fn auditor_search_filters_pages_and_is_audited(backend: Backend) {
    let app = TestApp::spawn_with(backend, settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    let (record, person) = region_with_patient(&app, &key).await;
    // hosp-002 reads the patient (TREAT token), hosp-003 reads it with break-the-glass.
    let t2 = access_token(&app, &key, "hosp-002", "system/Patient.rs").await;
    for _ in 0..3 {
        let r = bearer_get(&app, &format!("/fhir/Patient/{record}"), &t2).await;
        assert_eq!(r.status(), 200);
    }
    let mut e = app.state.auditor.read_event(format!("Patient/{record}"));
    e.agent_institution = Some("hosp-003".into());
    e.purpose_of_use = Some("ETREAT".into());
    e.patient_id = Some(person.clone());
    app.state.auditor.record(e).await.unwrap();

    // Credentials.
    assert_outcome(app.get("/fhir/AuditEvent").await, 401, "unauthenticated").await;
    let admin = app.admin_get("/fhir/AuditEvent").await;
    assert_outcome(admin, 403, "forbidden").await;
    assert_outcome(app.admin_get("/audit/alerts").await, 403, "forbidden").await;
    assert_outcome(
        app.admin_get("/fhir/AuditEvent/any").await,
        403,
        "forbidden",
    )
    .await;

    // By patient: the 3 reads and the break-the-glass read, newest first.
    let by_patient: Value =
        auditor_get(&app, &format!("/fhir/AuditEvent?patient=Patient/{record}"))
            .await
            .json()
            .await
            .unwrap();
    assert_eq!(by_patient["resourceType"], "Bundle");
    let entries = by_patient["entry"].as_array().unwrap();
    // registration (create) + 3 reads + ETREAT read
    assert_eq!(entries.len(), 5, "{by_patient}");
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["resource"]["recorded"].as_str().unwrap())
        .collect();
    let mut sorted = times.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first");
    assert_eq!(
        entries[0]["resource"]["agent"][0]["purposeOfUse"][0]["coding"][0]["code"],
        "ETREAT"
    );
    let same: Value = auditor_get(
        &app,
        &format!("/fhir/AuditEvent?patient=https://yiqiao.health/fhir/sid/empi|{person}"),
    )
    .await
    .json()
    .await
    .unwrap();
    // The newest is the auditor's own first search (about this patient).
    assert_eq!(ids(&same)[1..], ids(&by_patient)[..]);
    // Other filters.
    let count = |v: &Value| v["entry"].as_array().unwrap().len();
    let q = |p: &str| {
        let (p, app) = (p.to_string(), &app);
        async move { auditor_get(app, &p).await }
    };
    let agent: Value = q("/fhir/AuditEvent?agent=Organization/hosp-002")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count(&agent), 3);
    let purpose: Value = q("/fhir/AuditEvent?purpose=ETREAT")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count(&purpose), 1);
    let entity: Value = q(&format!(
        "/fhir/AuditEvent?entity=Patient/{record}&agent=hosp-002"
    ))
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(count(&entity), 3);
    let failed: Value = q("/fhir/AuditEvent?outcome=4").await.json().await.unwrap();
    assert!(count(&failed) >= 3, "the 401 and 403s above: {failed}");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let dated: Value = q(&format!("/fhir/AuditEvent?date={today}&agent=hosp-002"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count(&dated), 3);
    let none: Value = q("/fhir/AuditEvent?date=lt2000-01-01")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count(&none), 0);
    for bad in [
        "/fhir/AuditEvent?outcome=2",
        "/fhir/AuditEvent?purpose=FUN",
        "/fhir/AuditEvent?date=yesterday",
        "/fhir/AuditEvent?entity=nothing",
        "/fhir/AuditEvent?_count=0",
        "/fhir/AuditEvent?nope=1",
        "/fhir/AuditEvent?agent=a&agent=b",
    ] {
        assert_outcome(q(bad).await, 400, "invalid-parameter").await;
    }
    // Paging: everything, 2 at a time, following next links; no duplicates, nothing missed.
    let total_before = records(&app).await.len();
    let mut url = app.url("/fhir/AuditEvent?_count=2");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page: Value = app
            .client
            .get(&url)
            .bearer_auth(AUDITOR_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        seen.extend(ids(&page));
        pages += 1;
        match page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(next) => url = next["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no duplicates across pages");
    // Records appended while paging (the auditor's own reads) come after the cursor.
    assert_eq!(seen.len(), total_before, "pages {pages}");
    // Read one by id; the auditor's reads are in the trail.
    let first = &ids(&by_patient)[0];
    let one: Value = auditor_get(&app, &format!("/fhir/AuditEvent/{first}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["id"], first.as_str());
    assert_outcome(
        auditor_get(&app, "/fhir/AuditEvent/nope").await,
        404,
        "not-found",
    )
    .await;
    let own: Value = q("/fhir/AuditEvent?agent=operator:auditor&_count=500")
        .await
        .json()
        .await
        .unwrap();
    let own_queries: Vec<String> = own["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            e["resource"]["entity"]
                .as_array()?
                .iter()
                .find_map(|x| x["description"].as_str().map(str::to_string))
        })
        .collect();
    assert!(
        own_queries.iter().any(|d| d.contains("purpose=ETREAT")),
        "{own_queries:?}"
    );
    let own_read = own["entry"].as_array().unwrap().iter().any(|e| {
        e["resource"]["entity"].as_array().is_some_and(|xs| {
            xs.iter()
                .any(|x| x["what"]["reference"] == format!("AuditEvent/{first}"))
        })
    });
    assert!(own_read, "the read by id is audited");
    chain_ok(&app).await;
    app.stop().await;
}

/// "Who accessed my records": the registering institution sees the accesses to its patient,
/// trimmed to institution, purpose and time; others get 403.
async fn patients_see_who_accessed_their_records(backend: Backend) {
    let app = TestApp::spawn_with(backend, settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    let (record, person) = region_with_patient(&app, &key).await;
    // hosp-002 reads through the admin credential on its behalf (altId admin-token).
    let r = app
        .client
        .get(app.url(&format!("/fhir/Patient/{record}")))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-002")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let platform = access_token(&app, &key, "hosp-001", "system/AuditEvent.rs").await;
    let path = format!("/fhir/AuditEvent?patient=Patient/{record}");
    let resp = bearer_get(&app, &path, &platform).await;
    assert_eq!(resp.status(), 200);
    let bundle: Value = resp.json().await.unwrap();
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(
        entries.len(),
        2,
        "registration and hosp-002's read: {bundle}"
    );
    let read = &entries[0]["resource"];
    assert_eq!(read["resourceType"], "AuditEvent");
    assert_eq!(read["agent"][0]["who"]["identifier"]["value"], "hosp-002");
    assert!(read["recorded"].is_string());
    let text = bundle.to_string();
    for hidden in [
        "admin-token",
        "altId",
        "network",
        "request-id",
        "description",
    ] {
        assert!(!text.contains(hidden), "{hidden} leaked: {text}");
    }
    assert_eq!(
        read["entity"][0]["what"]["identifier"]["value"],
        person.as_str()
    );
    // The platform's own read is recorded against the patient.
    let mine = records(&app)
        .await
        .into_iter()
        .find(|e| {
            e.agent_institution.as_deref() == Some("hosp-001") && e.subtype_code == "search-type"
        })
        .expect("the platform's read is audited");
    assert_eq!(mine.patient_id.as_deref(), Some(person.as_str()));
    // Not its patient; missing patient; other filters; missing scope.
    let other = access_token(&app, &key, "hosp-003", "system/AuditEvent.rs").await;
    let resp = bearer_get(&app, &path, &other).await;
    assert_outcome(resp, 403, "forbidden").await;
    let resp = bearer_get(&app, "/fhir/AuditEvent", &platform).await;
    assert_outcome(resp, 400, "invalid-parameter").await;
    let resp = bearer_get(&app, &format!("{path}&agent=hosp-002"), &platform).await;
    assert_outcome(resp, 400, "invalid-parameter").await;
    let no_scope = access_token(&app, &key, "hosp-001", "system/Patient.rs").await;
    let resp = bearer_get(&app, &path, &no_scope).await;
    assert_outcome(resp, 403, "forbidden").await;
    chain_ok(&app).await;
    app.stop().await;
}

/// A webhook receiver that fails its first request (500), then accepts; collects bodies.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            // Read headers and the body (Content-Length).
            let body = loop {
                let k = sock.read(&mut chunk).await.unwrap();
                if k == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break Some(buf[end + 4..end + 4 + len].to_vec());
                    }
                }
            };
            n += 1;
            let status = if n == 1 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if n > 1
                && let Some(b) = body
            {
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&b).unwrap());
            }
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, got)
}

pub(crate) async fn alerts(app: &TestApp, query: &str) -> Vec<Value> {
    let resp = auditor_get(app, &format!("/audit/alerts{query}")).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["items"].as_array().unwrap().clone()
}

fn event(app: &TestApp, inst: &str, patient: &str, purpose: &str) -> AuditEvent {
    let mut e = app.state.auditor.read_event(format!("Patient/r-{patient}"));
    e.agent_institution = Some(inst.into());
    e.agent_user = Some("dr-li".into());
    e.purpose_of_use = Some(purpose.into());
    e.patient_id = Some(patient.into());
    e
}

/// Every rule raises its alert once — also across a restart and a second scanner — and alerts
/// are acknowledged with a note and delivered to the webhook (retried after a failure).
async fn anomaly_rules_raise_alerts_once(backend: Backend) {
    let (hook, delivered) = webhook_receiver().await;
    let hour = chrono::Utc::now()
        .format("%H")
        .to_string()
        .parse::<u32>()
        .unwrap();
    let db = TestDb::new(backend);
    let url = db.url.clone();
    let adjust = move |s: &mut Settings| {
        settings(s);
        s.audit.alert_many_patients_threshold = 5;
        s.audit.alert_break_glass_threshold = 2;
        s.audit.alert_denials_threshold = 3;
        // The current hour is "unusual" (UTC offset 0).
        s.audit.alert_utc_offset_hours = 0;
        s.audit.alert_off_hours_start = hour;
        s.audit.alert_off_hours_end = (hour + 1) % 24;
        s.audit.alert_webhook_url = hook.clone();
    };
    let mut s = crate::helpers::test_settings(&url);
    adjust(&mut s);
    let app = TestApp::spawn_on(db, s).await;
    let flag = app
        .client
        .put(app.url("/audit/flagged-patients/EMPI-VIP"))
        .bearer_auth(AUDITOR_TOKEN)
        .json(&json!({"note": "public figure"}))
        .send()
        .await
        .unwrap();
    assert_eq!(flag.status(), 200);
    assert_outcome(
        app.client
            .put(app.url("/audit/flagged-patients/EMPI-VIP"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"note": "x"}))
            .send()
            .await
            .unwrap(),
        403,
        "forbidden",
    )
    .await;
    for i in 0..7 {
        app.state
            .auditor
            .record(event(&app, "hosp-001", &format!("EMPI-{i}"), "TREAT"))
            .await
            .unwrap();
    }
    app.state
        .auditor
        .record(event(&app, "hosp-002", "EMPI-VIP", "TREAT"))
        .await
        .unwrap();
    for _ in 0..2 {
        app.state
            .auditor
            .record(event(&app, "hosp-003", "EMPI-9", "ETREAT"))
            .await
            .unwrap();
    }
    for _ in 0..3 {
        let r = bearer_get(&app, "/fhir/Patient/x", "bad").await;
        assert_eq!(r.status(), 401);
    }
    // Refusals are recorded asynchronously: wait until they are in the chain.
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&app)
        .await
        .iter()
        .filter(|e| e.outcome == "4" && e.resource.contains("HTTP 401"))
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the 3 refusals (HTTP 401) were not in the chain within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let raised = yiqiao_gateway::alerting::scan_all(&app.state)
        .await
        .unwrap();
    let got = alerts(&app, "?_count=500").await;
    let mut rules: Vec<(String, String)> = got
        .iter()
        .map(|a| {
            (
                a["rule"].as_str().unwrap().to_string(),
                a["agent"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    rules.sort();
    rules.dedup();
    let expected: Vec<(String, String)> = [
        ("break-the-glass", "hosp-003/dr-li"),
        ("break-the-glass-frequent", "hosp-003/dr-li"),
        ("denials", "unauthenticated"),
        ("flagged-patient", "hosp-002/dr-li"),
        ("many-patients", "hosp-001/dr-li"),
        ("off-hours", "hosp-001/dr-li"),
        ("off-hours", "hosp-002/dr-li"),
        ("off-hours", "hosp-003/dr-li"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(rules, expected, "{got:#?}");
    assert_eq!(raised, got.len());
    assert_eq!(
        got.iter()
            .filter(|a| a["rule"] == "break-the-glass")
            .count(),
        2,
        "one review alert per break-the-glass access"
    );
    // Scanning again, and from a second replica after a restart, raises nothing new.
    assert_eq!(
        yiqiao_gateway::alerting::scan_all(&app.state)
            .await
            .unwrap(),
        0
    );
    let mut s2 = crate::helpers::test_settings(&url);
    adjust(&mut s2);
    s2.audit.replica_id = "replica-b".into();
    let b = TestApp::spawn_on(TestDb::shared(&url), s2).await;
    assert_eq!(
        yiqiao_gateway::alerting::scan_all(&b.state).await.unwrap(),
        0
    );
    // New events after the cursor are still evaluated (one more VIP access).
    b.state
        .auditor
        .record(event(&b, "hosp-004", "EMPI-VIP", "TREAT"))
        .await
        .unwrap();
    assert_eq!(
        yiqiao_gateway::alerting::scan_all(&b.state).await.unwrap(),
        2,
        "flagged + off-hours for hosp-004"
    );
    b.stop().await;
    // Acknowledge with a note.
    let vip = alerts(&app, "?rule=flagged-patient").await[0].clone();
    let id = vip["id"].as_str().unwrap();
    let ack = |note: &str| {
        app.client
            .post(app.url(&format!("/audit/alerts/{id}/ack")))
            .bearer_auth(AUDITOR_TOKEN)
            .json(&json!({"note": note}))
            .send()
    };
    assert_outcome(ack("  ").await.unwrap(), 422, "validation-failed").await;
    let done: Value = ack("called the ward: treating physician")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "acknowledged");
    assert_eq!(done["ack_by"], "operator:auditor");
    assert_eq!(done["ack_note"], "called the ward: treating physician");
    assert_outcome(ack("again").await.unwrap(), 409, "conflict").await;
    let open = alerts(&app, "?status=open&_count=500").await;
    assert!(open.iter().all(|a| a["id"] != id));
    let about_alert: Vec<(String, String)> = records(&app)
        .await
        .iter()
        .rev()
        .map(resource)
        .filter(|r| {
            r["entity"]
                .to_string()
                .contains(&format!("AuditAlert/{id}"))
        })
        .map(|r| {
            (
                r["outcome"].as_str().unwrap().to_string(),
                r["outcomeDesc"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(about_alert.len(), 2, "{about_alert:?}");
    assert_eq!(
        about_alert[0],
        (
            "0".to_string(),
            "acknowledged: called the ward: treating physician".to_string()
        )
    );
    assert_eq!(about_alert[1].0, "4", "the refused second acknowledgement");
    assert!(about_alert[1].1.starts_with("conflict:"));
    // Webhook: the receiver failed the first delivery; every alert arrives, retried.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = alerts(&app, "?_count=500").await.len();
    loop {
        yiqiao_gateway::alerting::deliver(&app.state, &client)
            .await
            .unwrap();
        let ids: BTreeSet<String> = delivered
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        if ids.len() == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {} of {total}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let states = alerts(&app, "?_count=500").await;
    assert!(
        states.iter().all(|a| a["webhook_state"] == "delivered"),
        "{states:#?}"
    );
    assert!(
        states.iter().any(|a| a["webhook_attempts"] == 2),
        "one alert was retried"
    );
    chain_ok(&app).await;
    app.stop().await;
}

async fn yiqiao(app: &TestApp, args: &[&str]) -> std::process::Output {
    crate::helpers::yiqiao_cli(app, args).await
}

/// `yiqiao audit report` in CSV and HTML: the figures, the break-the-glass review status,
/// the verification result; tampering turns the result to FAILED and the exit code to 7.
async fn compliance_report(backend: Backend) {
    let app = TestApp::spawn_with(backend, settings).await;
    for (inst, purpose, n) in [
        ("hosp-001", "TREAT", 4),
        ("hosp-002", "PUBHLTH", 2),
        ("hosp-002", "ETREAT", 1),
    ] {
        for i in 0..n {
            app.state
                .auditor
                .record(event(&app, inst, &format!("EMPI-{i}"), purpose))
                .await
                .unwrap();
        }
    }
    let r = bearer_get(&app, "/fhir/Patient/x", "bad").await;
    assert_eq!(r.status(), 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&app).await.len() < 8 {
        assert!(
            Instant::now() < deadline,
            "8 records were not in the chain within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    yiqiao_gateway::alerting::scan_all(&app.state)
        .await
        .unwrap();
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let dir = TempDir::new();
    let csv_path = dir.path.join("report.csv");
    let out = yiqiao(
        &app,
        &[
            "audit",
            "report",
            "--from",
            &today,
            "--to",
            &today,
            "--format",
            "csv",
            "--out",
            csv_path.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    for line in [
        "total,,,,8",
        "access,hosp-001,TREAT,success,4",
        "access,hosp-002,PUBHLTH,success,2",
        "access,hosp-002,ETREAT,success,1",
        "access,unauthenticated,none,refused,1",
        "denials,total,,,1",
        "denials,unauthenticated,,,1",
        r#"verification,ok,,,"OK: positions 1..8 (8 records,"#,
    ] {
        assert!(csv.contains(line), "{line} missing in\n{csv}");
    }
    assert!(csv.contains(",hosp-002,EMPI-0,pending review"), "{csv}");
    // Review the break-the-glass alert, then the HTML says so.
    let btg = alerts(&app, "?rule=break-the-glass").await[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = app
        .client
        .post(app.url(&format!("/audit/alerts/{btg}/ack")))
        .bearer_auth(AUDITOR_TOKEN)
        .json(&json!({"note": "cardiac arrest, justified"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let out = yiqiao(&app, &["audit", "report", "--from", &today, "--to", &today]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = String::from_utf8(out.stdout).unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("<svg") && html.contains("Accesses by institution"));
    assert!(
        html.contains("<td>hosp-001</td><td>TREAT</td><td>success</td><td class=\"n\">4</td>"),
        "{html}"
    );
    assert!(
        html.contains("reviewed by operator:auditor</td><td>cardiac arrest, justified"),
        "{html}"
    );
    assert!(html.contains("class=\"ok\">OK: positions 1.."), "{html}");
    // Self-contained: nothing to fetch.
    for external in ["src=", "href=", "@import", "url("] {
        assert!(!html.contains(external), "{external} in report");
    }
    // Tamper with a record: the report says FAILED and the exit code is 7.
    sql(
        &app,
        "UPDATE audit_events SET agent_institution = 'hosp-999' WHERE seq = 2",
    )
    .await;
    let out = yiqiao(
        &app,
        &[
            "audit", "report", "--from", &today, "--to", &today, "--format", "csv",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(7));
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.contains("verification,failed,,,"), "{csv}");
    assert!(csv.contains("FAILED at position 2: modified"), "{csv}");
    app.stop().await;
}

on_both_backends!(
    admin_changes_commit_with_their_record,
    refusals_are_recorded_and_a_flood_is_counted,
    auditor_search_filters_pages_and_is_audited,
    patients_see_who_accessed_their_records,
    anomaly_rules_raise_alerts_once,
    compliance_report,
    kill_9_under_load_loses_no_answered_record,
);

/// The real binary, serving on `port` over `db_url` (killed when dropped).
fn serve(db_url: &str, port: u16, data_dir: &TempDir) -> Child {
    let mut cmd = wait::command(env!("CARGO_BIN_EXE_yiqiao"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("YIQIAO_DATABASE_URL", db_url)
        .env("YIQIAO_LISTEN", format!("127.0.0.1:{port}"))
        .env("YIQIAO_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("YIQIAO_DATA_DIR", &data_dir.path)
        .env("YIQIAO_AUDIT__SIGNING_KEY_FILE", &test_audit_key().0)
        .env("YIQIAO_LOG__LEVEL", "warn")
        .env("YIQIAO_HTTP__WORKERS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    wait::spawn(&mut cmd, "`yiqiao serve`")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// SIGKILL the real gateway while clients read patient data; after a restart every 2xx answer
/// the clients received has its audit record (by request id) and the chain verifies.
async fn kill_9_under_load_loses_no_answered_record(backend: Backend) {
    let db = TestDb::new(backend);
    let dir = TempDir::new();
    let client = crate::helpers::client();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = serve(&db.url, port, &dir);
    wait::ready(&client, &base, "`yiqiao serve`").await;
    let created = client
        .post(format!("{base}/admin/institutions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&institution(1))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let answered = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (client, base, answered, stop) =
            (client.clone(), base.clone(), answered.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("kill9-{t}-{i}");
                i += 1;
                // A clinical read (PDQm search for hosp-001): answered only once its record
                // is durable. (Public directory reads are recorded without waiting.)
                let sent = client
                    .get(format!("{base}/fhir/Patient?family=%E7%8E%8B"))
                    .bearer_auth(ADMIN_TOKEN)
                    .header("X-On-Behalf-Of", "hosp-001")
                    .header("X-Request-Id", &id)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        // Only a complete body counts as received.
                        if r.bytes().await.is_ok() {
                            answered.lock().unwrap().push(id);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    // Kill while requests are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.lock().unwrap().len() < 300 {
        assert!(Instant::now() < deadline, "load did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait::kill(&mut child, "`yiqiao serve`").await; // SIGKILL
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let answered = answered.lock().unwrap().clone();
    // Restart on the same database: it serves again.
    let port2 = free_port();
    let base2 = format!("http://127.0.0.1:{port2}");
    let mut child = serve(&db.url, port2, &dir);
    wait::ready(&client, &base2, "the restarted `yiqiao serve`").await;
    let again = client
        .get(format!("{base2}/fhir/Organization/hosp-001"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    wait::kill(&mut child, "the restarted `yiqiao serve`").await;
    // Every answered request has its record; the chain verifies.
    let url = db.url.clone();
    let missing = tokio::task::spawn_blocking(move || {
        let mut settings = crate::helpers::test_settings(&url);
        settings.database.pool_size = 2;
        let store = Store::open(&settings.store_options()).unwrap();
        let mut conn = store.conn().unwrap();
        let missing: Vec<String> = answered
            .iter()
            .filter(|id| !query::has_request_id(&mut conn, id).unwrap())
            .cloned()
            .collect();
        let report = verify_db(&mut conn, None, None, &public_key()).unwrap();
        assert!(report.ok(), "{:#?}", report.problems);
        (missing, answered.len(), report.records)
    })
    .await
    .unwrap();
    assert!(
        missing.0.is_empty(),
        "{} of {} answered requests have no audit record: {:?}",
        missing.0.len(),
        missing.1,
        &missing.0[..missing.0.len().min(5)]
    );
    assert!(
        missing.2 as usize > missing.1,
        "records {} ≥ answered {}",
        missing.2,
        missing.1
    );
    let out = wait::output(
        wait::command(env!("CARGO_BIN_EXE_yiqiao"))
            .args(["audit", "verify"])
            .env_remove("YIQIAO_CONFIG")
            .env("YIQIAO_DATABASE_URL", &db.url)
            .env("YIQIAO_AUDIT__SIGNING_KEY_FILE", &test_audit_key().0)
            .env("YIQIAO_DATA_DIR", &dir.path),
        "`yiqiao audit verify`",
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
