//! The auditors' web console (issue 6) end to end in headless Chromium: Debian's `chromium`
//! driven by npm `playwright-core` (tests/console, installed by scripts/test.sh with `npm ci`),
//! logging in through the real OpenID provider of the login tests (tests/oidc).
//!
//! This test builds the situation (institutions, a patient registered, real FHIR reads with
//! access tokens: three TREAT reads, a break-the-glass read, a refused read; the anomaly scan),
//! runs tests/console/console.mjs, which does what a person would and checks what they see,
//! and then checks the gateway's side: the acknowledgement stored with its note, every console
//! read in the audit trail under the person's name, the non-auditor's refusal recorded, the
//! chain still verifying. Missing chromium, node or playwright-core fails the test: never skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use yiqiao_registry::audit::alerts;
use yiqiao_registry::audit::query::{self, EventFilter};
use yiqiao_sm::Sm2PrivateKey;

use crate::auditing::{access_token_for, chain_ok, region_with_patient};
use crate::helpers::{Backend, TempDir, TestApp, assert_outcome};
use crate::on_both_backends;
use crate::wait;

const ACK_NOTE: &str = "checked with the emergency department: admission at night";

/// Chromium: `$CHROMIUM`, else `chromium` on the PATH. Panics (never skips) when missing.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("chromium is not installed: apt-get install chromium (scripts/test.sh does)")
    })
}

fn console_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/console");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci --prefix tests/console` (scripts/test.sh does)"
    );
    dir
}

/// The longest the browser script may run before it is killed (it takes about 10 s).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

/// Run tests/console/console.mjs against the gateway at `base`; panics unless it passes (under
/// [`SCRIPT_DEADLINE`]), returns its RESULT.
async fn run_console_script(
    dir: &Path,
    base: &str,
    expect: &Value,
    out: &Path,
    chromium: &Path,
) -> Value {
    let (stdout_path, stderr_path) = (out.join("node.stdout"), out.join("node.stderr"));
    let mut child = wait::spawn(
        wait::command("node")
            .arg(dir.join("console.mjs"))
            .current_dir(dir)
            .env("CONSOLE_BASE", base)
            .env("CONSOLE_EXPECT", expect.to_string())
            .env("CONSOLE_OUT", out)
            .env("CHROMIUM", chromium)
            .stdout(std::fs::File::create(&stdout_path).unwrap())
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
        "node tests/console/console.mjs (is Node.js installed?)",
    );
    let status = wait::try_exit(&mut child, "tests/console/console.mjs", SCRIPT_DEADLINE).await;
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "the console test failed ({status:?}):\n{stdout}\n{stderr}"
    );
    let result: Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no RESULT line:\n{stdout}\n{stderr}"));
    eprintln!("{stderr}console test result: {result}");
    result
}

async fn get_with(app: &TestApp, path: &str, token: &str, reason: Option<&str>) -> u16 {
    let mut req = app.client.get(app.url(path)).bearer_auth(token);
    if let Some(reason) = reason {
        req = req.header("X-Break-Glass-Reason", reason);
    }
    req.send().await.unwrap().status().as_u16()
}

/// Every stored record about `patient`, by `agent`, with `outcome` (each when given), newest
/// first.
async fn records_where(
    app: &TestApp,
    patient: Option<&str>,
    agent: Option<&str>,
    outcome: Option<&str>,
) -> Vec<query::StoredEvent> {
    let store = app.state.store.clone();
    let filter = EventFilter {
        patient: patient.map(str::to_string),
        agent: agent.map(str::to_string),
        outcome: outcome.map(str::to_string),
        limit: 1_000_000,
        ..EventFilter::default()
    };
    tokio::task::spawn_blocking(move || query::search(&mut store.conn().unwrap(), &filter).unwrap())
        .await
        .unwrap()
}

async fn console_in_headless_chromium(backend: Backend) {
    let chromium = chromium();
    let dir = console_dir();
    let (provider, app) = crate::oidc::spawn(backend, crate::auditing::settings).await;

    // The situation an auditor looks into: real FHIR reads with institutions' access tokens.
    let key = Sm2PrivateKey::generate().unwrap();
    let (record, person) = region_with_patient(&app, &key).await;
    let patient_path = format!("/fhir/Patient/{record}");
    let treat = access_token_for(&app, &key, "hosp-002", "system/Patient.rs", "TREAT").await;
    for _ in 0..3 {
        assert_eq!(get_with(&app, &patient_path, &treat, None).await, 200);
    }
    let etreat = access_token_for(&app, &key, "hosp-003", "system/Patient.rs", "ETREAT").await;
    let reason = Some("unconscious patient in the emergency department");
    assert_eq!(get_with(&app, &patient_path, &etreat, reason).await, 200);
    // hosp-002 without the Patient scope: refused (403) and recorded against hosp-002.
    let no_scope = access_token_for(&app, &key, "hosp-002", "system/AuditEvent.s", "TREAT").await;
    assert_eq!(get_with(&app, &patient_path, &no_scope, None).await, 403);

    // What the page must show, from the database (the console's own reads add none of these:
    // they are counted before the first console search and belong to `staff`).
    let about_patient = records_where(&app, Some(&person), None, None).await;
    // Registration + 3 reads + the break-the-glass read.
    assert_eq!(about_patient.len(), 5);
    // A refusal's record is written without delaying the 403 (its own queue): wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let refused_by_hosp2 = loop {
        let found = records_where(&app, None, Some("hosp-002"), Some("4")).await;
        if !found.is_empty() || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(refused_by_hosp2.len(), 1, "the refused read");
    yiqiao_gateway::alerting::scan_all(&app.state)
        .await
        .unwrap();
    let store = app.state.store.clone();
    let daily = tokio::task::spawn_blocking(move || {
        let from = chrono::NaiveDate::from_ymd_opt(2000, 1, 1)
            .unwrap()
            .and_time(chrono::NaiveTime::MIN);
        let to = yiqiao_registry::store::now_utc() + chrono::Duration::days(1);
        query::daily_by_requester(&mut store.conn().unwrap(), from, to).unwrap()
    })
    .await
    .unwrap();
    let mut chart = serde_json::Map::new();
    for inst in ["hosp-001", "hosp-002", "hosp-003"] {
        let (a, d) = daily
            .iter()
            .filter(|c| c.requester == inst)
            .fold((0, 0), |(a, d), c| (a + c.accesses, d + c.denials));
        chart.insert(inst.into(), json!([a, d]));
    }
    assert!(chart["hosp-002"][0].as_u64().unwrap() >= 3 && chart["hosp-002"][1] == 1);
    let open = {
        let store = app.state.store.clone();
        tokio::task::spawn_blocking(move || {
            alerts::list(
                &mut store.conn().unwrap(),
                Some("open"),
                Some("break-the-glass"),
                10,
                0,
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(open.len(), 1, "one break-the-glass alert to review");

    let expect = json!({
        "issuer": provider.issuer.clone(),
        "auditor": "bob",
        "auditor_name": "Bob Auditor",
        "non_auditor": "alice",
        "non_auditor_roles": "admin",
        "patient": format!("Patient/{record}"),
        "patient_events": about_patient.len(),
        "patient_institutions": ["hosp-001", "hosp-002", "hosp-003"],
        "refused_institution": "hosp-002",
        "refused_count": refused_by_hosp2.len(),
        // The (UTC) day of the records, for the date filters and the chart bars.
        "day": refused_by_hosp2[0].recorded_at.format("%Y-%m-%d").to_string(),
        "alert_rule": "break-the-glass",
        "ack_note": ACK_NOTE,
        "chart": chart,
    });
    let out = TempDir::new();
    let result = run_console_script(&dir, &app.base, &expect, &out.path, &chromium).await;

    // The acknowledgement is stored, by the person, with the note.
    let bob = format!("{}#bob", provider.issuer);
    let acked_id = result["acknowledged_alert"].as_str().unwrap().to_string();
    assert_eq!(acked_id, open[0].id);
    let acked = {
        let store = app.state.store.clone();
        tokio::task::spawn_blocking(move || {
            alerts::list(
                &mut store.conn().unwrap(),
                Some("acknowledged"),
                None,
                10,
                0,
            )
            .unwrap()
        })
        .await
        .unwrap()
    };
    let acked = acked
        .iter()
        .find(|a| a.id == acked_id)
        .expect("acknowledged");
    assert_eq!(acked.ack_by.as_deref(), Some(bob.as_str()));
    assert_eq!(acked.ack_note.as_deref(), Some(ACK_NOTE));
    // The downloaded reports are the gateway's compliance report.
    let html = std::fs::read_to_string(result["reports"]["html"].as_str().unwrap()).unwrap();
    assert!(html.contains("<h1>Audit compliance report</h1>"), "{html}");
    let csv = std::fs::read_to_string(result["reports"]["csv"].as_str().unwrap()).unwrap();
    assert!(csv.contains("access,hosp-003,ETREAT,"), "{csv}");

    // Every read the console made is in the trail under the person's name.
    let by_bob = records_where(&app, None, Some(&bob), None).await;
    let queries: Vec<String> = by_bob
        .iter()
        .filter_map(|e| {
            let r: Value = serde_json::from_str(&e.resource).unwrap();
            r["entity"]
                .as_array()?
                .iter()
                .find_map(|x| x["description"].as_str().map(str::to_string))
        })
        .collect();
    for path in [
        "/fhir/AuditEvent?patient=",
        "/audit/alerts?",
        "/audit/chain?",
        "/audit/stats/daily?",
        "/audit/report?",
    ] {
        assert!(
            queries.iter().any(|q| q.starts_with(path)),
            "{path} not audited: {queries:?}"
        );
    }
    assert!(
        by_bob
            .iter()
            .any(|e| e.patient_id.as_deref() == Some(person.as_str())),
        "the patient search is recorded against the patient"
    );
    let ack_records: Vec<_> = by_bob
        .iter()
        .filter(|e| e.resource.contains(&format!("AuditAlert/{acked_id}")))
        .collect();
    assert_eq!(ack_records.len(), 1, "the acknowledgement is in the chain");
    // The forged acknowledgement (no CSRF token) and alice's visit were refused and recorded.
    assert!(
        by_bob.iter().any(|e| e.outcome == "4"
            && e.resource
                .contains(&format!("POST /audit/alerts/{acked_id}/ack"))),
        "the refused acknowledgement without the CSRF token is recorded"
    );
    let alice = format!("{}#alice", provider.issuer);
    let by_alice = records_where(&app, None, Some(&alice), Some("4")).await;
    assert!(
        by_alice.iter().any(|e| e.resource.contains("GET /console")
            && e.resource
                .contains("the audit console needs the auditor role")),
        "the refusal of the non-auditor is recorded"
    );
    chain_ok(&app).await;

    // A record edited behind the gateway's back: the chain view says where.
    crate::auditing::sql(
        &app,
        "UPDATE audit_events SET agent_user = 'forged' WHERE seq = 3",
    )
    .await;
    let mut expect = expect;
    expect["broken_at"] = json!(3);
    let broken = run_console_script(&dir, &app.base, &expect, &out.path, &chromium).await;
    assert!(
        broken["chain_summary"]
            .as_str()
            .unwrap()
            .starts_with("audit verification FAILED at position 3"),
        "{broken}"
    );
    app.stop().await;
}

/// The console's assets come from the binary with the security headers, and a visit without a
/// session is sent to the login (no browser needed).
async fn console_assets_and_redirect(backend: Backend) {
    let app = TestApp::spawn_with(backend, crate::auditing::settings).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(crate::wait::REQUEST)
        .build()
        .unwrap();
    let resp = client.get(app.url("/console")).send().await.unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/login?return_to=/console");
    for (path, kind) in [
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let resp = client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        let text = resp.text().await.unwrap();
        assert!(
            !text.contains("https://"),
            "{path} loads nothing from elsewhere"
        );
    }
    // The auditor credential sees the page, with its policy.
    let page = client
        .get(app.url("/console"))
        .bearer_auth(crate::auditing::AUDITOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    assert!(html.contains("/console/console.js") && html.contains("id=\"event-table\""));
    // The admin credential is refused, with the page saying why.
    let admin = client
        .get(app.url("/console"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 403);
    assert!(admin.text().await.unwrap().contains("Access refused"));
    app.stop().await;
}

/// The JSON endpoints the console added: chain status (verified, then failed at the tampered
/// position), per-day counts and the report download, with their parameter checks.
async fn chain_status_stats_and_report_api(backend: Backend) {
    let app = TestApp::spawn_with(backend, crate::auditing::settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    region_with_patient(&app, &key).await;
    let get = |path: &str| {
        app.client
            .get(app.url(path))
            .bearer_auth(crate::auditing::AUDITOR_TOKEN)
            .send()
    };
    let get_json = |path: String| {
        let sent = get(&path);
        async move { sent.await.unwrap().json::<Value>().await.unwrap() }
    };
    let chain = get_json("/audit/chain".into()).await;
    assert_eq!(chain["status"], "verified", "{chain}");
    assert!(chain["records"].as_u64().unwrap() >= 4, "{chain}");
    assert!(chain["broken_at"].is_null() && chain["problems"] == json!([]));
    let part = get_json("/audit/chain?from=2&to=3".into()).await;
    assert_eq!(
        (part["first_seq"].clone(), part["records"].clone()),
        (json!(2), json!(2))
    );

    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let stats = get_json(format!("/audit/stats/daily?from={today}&to={today}")).await;
    assert_eq!(stats["days"], json!([today]));
    let hosp1 = stats["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["requester"] == "hosp-001")
        .unwrap_or_else(|| panic!("{stats}"));
    assert_eq!(hosp1["accesses"], json!([1]), "the registration: {stats}");
    assert!(
        stats["rows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["requester"] == "staff")
    );

    let csv = get(&format!("/audit/report?from={today}&to={today}&format=csv"))
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert_eq!(csv.headers()["x-audit-chain"], "verified");
    let disposition = csv.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        disposition.starts_with("attachment; filename=\"yiqiao-audit-report-"),
        "{disposition}"
    );
    assert!(csv.text().await.unwrap().contains("access,hosp-001,"));
    let html = get(&format!("/audit/report?from={today}&to={today}"))
        .await
        .unwrap();
    assert!(
        html.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        html.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("sandbox")
    );

    for bad in [
        "/audit/chain?from=0",
        "/audit/chain?to=x",
        "/audit/chain?nope=1",
        "/audit/stats/daily?from=2026-02-01&to=2026-01-01",
        "/audit/stats/daily?from=2024-01-01&to=2026-01-01",
        "/audit/stats/daily?to=yesterday",
        "/audit/report?to=2026-01-01",
        "/audit/report?from=2026-01-02&to=2026-01-01",
        "/audit/report?from=2026-01-01&to=2026-01-02&format=pdf",
    ] {
        assert_outcome(get(bad).await.unwrap(), 400, "invalid-parameter").await;
    }
    for path in [
        "/audit/chain",
        "/audit/stats/daily",
        "/audit/report?from=2026-01-01&to=2026-01-02",
    ] {
        let admin = app.admin_get(path).await;
        assert_outcome(admin, 403, "forbidden").await;
    }

    // Edit a column of position 2: the chain status names it.
    crate::auditing::sql(
        &app,
        "UPDATE audit_events SET agent_user = 'forged' WHERE seq = 2",
    )
    .await;
    let broken = get_json("/audit/chain".into()).await;
    assert_eq!(broken["status"], "failed", "{broken}");
    assert_eq!(broken["broken_at"], 2, "{broken}");
    assert_eq!(broken["problems"][0]["kind"], "modified", "{broken}");
    assert!(
        broken["summary"]
            .as_str()
            .unwrap()
            .starts_with("audit verification FAILED at position 2: modified"),
        "{broken}"
    );
    let report = get(&format!("/audit/report?from={today}&to={today}"))
        .await
        .unwrap();
    assert_eq!(report.headers()["x-audit-chain"], "failed");
    app.stop().await;
}

on_both_backends!(
    console_in_headless_chromium,
    console_assets_and_redirect,
    chain_status_stats_and_report_api
);
