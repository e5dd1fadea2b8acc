//! Audit trail (issue 6): chain + verify on both backends, every tamper kind detected and
//! located by `verify` and by offline verification of an export (Rust, the CLI, the
//! independent Python verifier and the documented OpenSSL steps), replicas writing
//! concurrently, fail closed.

use diesel::connection::SimpleConnection;
use serde_json::Value;
use yiqiao_registry::audit::export::{Bundle, export, verify_bundle};
use yiqiao_registry::audit::{
    AuditEvent, AuditSigner, EntityRef, ProblemKind, Report, chain_hash, verify_db,
};
use yiqiao_sm::{Sm2PrivateKey, Sm2PublicKey};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TempDir, TestApp, TestDb, assert_outcome, institution, test_audit_key,
    test_settings,
};
use crate::on_both_backends;
use crate::wait;

fn public_key() -> Sm2PublicKey {
    Sm2PublicKey::from_spki_pem(&std::fs::read_to_string(&test_audit_key().1).unwrap()).unwrap()
}

fn signer() -> AuditSigner {
    let pem = std::fs::read_to_string(&test_audit_key().0).unwrap();
    AuditSigner::new(&Sm2PrivateKey::from_pkcs8_pem(&pem).unwrap()).unwrap()
}

async fn verify(app: &TestApp) -> Report {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        verify_db(&mut conn, None, None, &public_key()).unwrap()
    })
    .await
    .unwrap()
}

/// Wait until the chain holds `n` records (public directory reads are recorded without
/// waiting, so they may land shortly after their answers); the verification report then.
async fn verify_once(app: &TestApp, n: u64) -> Report {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let report = verify(app).await;
        if report.records >= n || std::time::Instant::now() > deadline {
            return report;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn export_bundle(app: &TestApp) -> Bundle {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        export(&mut conn, None, None, &signer()).unwrap()
    })
    .await
    .unwrap()
}

async fn sql(app: &TestApp, statements: String) {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        conn.batch_execute(&statements).unwrap();
    })
    .await
    .unwrap()
}

fn assert_first(report: &Report, seq: i64, kind: ProblemKind) {
    let first = report
        .first_problem()
        .unwrap_or_else(|| panic!("no problem found; expected {kind:?} at {seq}"));
    assert_eq!(
        (first.seq, first.kind),
        (seq, kind),
        "{:#?}",
        report.problems
    );
}

/// An app whose chain holds `n` events recorded one by one, checkpoints every 10.
async fn chain_of(backend: Backend, n: usize) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| s.audit.checkpoint_every = 10).await;
    for i in 0..n {
        let mut e = app
            .state
            .auditor
            .read_event(format!("Organization/hosp-{i:03}"));
        e.agent_institution = Some(format!("hosp-{:03}", i % 3));
        app.state.auditor.record(e).await.unwrap();
    }
    app
}

async fn chain_verifies_after_traffic(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let created = app.admin_post("/admin/institutions", &institution(1)).await;
    assert_eq!(created.status(), 201);
    assert_eq!(app.get("/fhir/Organization/hosp-001").await.status(), 200);
    assert_eq!(app.get("/fhir/Endpoint/hosp-001").await.status(), 200);
    assert_eq!(app.get("/fhir/Organization?name=人民").await.status(), 200);
    // The public reads' records are not awaited: let them land before the change.
    assert_eq!(verify_once(&app, 4).await.records, 4);
    let suspended = app
        .admin_post("/admin/institutions/hosp-001/suspend", &Value::Null)
        .await;
    assert_eq!(suspended.status(), 200);
    let report = verify(&app).await;
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.records, 5);
    assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(5)));
    let bundle = export_bundle(&app).await;
    let kinds: Vec<(String, String)> = bundle
        .records
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_str(&r.resource).unwrap();
            assert_eq!(v["resourceType"], "AuditEvent");
            assert_eq!(chain_hash(&r.prev_hash, &r.resource), r.hash);
            (
                v["subtype"][0]["code"].as_str().unwrap().to_string(),
                v["entity"][0]["what"]["reference"]
                    .as_str()
                    .or(v["entity"][0]["description"].as_str())
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("create", "Organization/hosp-001"),
            ("read", "Organization/hosp-001"),
            ("read", "Endpoint/hosp-001"),
            ("search-type", "/fhir/Organization?name=%E4%BA%BA%E6%B0%91"),
            ("update", "Organization/hosp-001"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert!(verify_bundle(&bundle, &public_key()).ok());
    app.stop().await;
}

/// Timed and counted checkpoints are signed and verified.
async fn checkpoints_are_signed(backend: Backend) {
    let app = chain_of(backend, 25).await;
    let report = verify(&app).await;
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.checkpoints, 2, "checkpoints at 10 and 20");
    app.stop().await;
}

/// Verify, export, verify the export offline: the first problem must be `kind` at `seq`
/// both times.
async fn detected_both_ways(app: &TestApp, seq: i64, kind: ProblemKind) -> Bundle {
    let report = verify(app).await;
    assert_first(&report, seq, kind);
    let bundle = export_bundle(app).await;
    let offline = verify_bundle(&bundle, &public_key());
    assert_first(&offline, seq, kind);
    bundle
}

async fn tamper_modify(backend: Backend) {
    let app = chain_of(backend, 30).await;
    assert!(verify(&app).await.ok());
    sql(&app, "UPDATE audit_events SET resource = replace(resource, 'hosp-012', 'hosp-099') WHERE seq = 13; \
               UPDATE audit_events SET agent_institution = 'hosp-777' WHERE seq = 20;".into()).await;
    let report = verify(&app).await;
    assert_first(&report, 13, ProblemKind::Modified);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.seq == 20 && p.kind == ProblemKind::Modified),
        "a column-only change is caught: {:#?}",
        report.problems
    );
    let bundle = detected_both_ways(&app, 13, ProblemKind::Modified).await;
    // The CLI and the independent verifiers agree.
    cli_verify_fails(&app, "position 13: modified").await;
    offline_tools_reject(&bundle, "13").await;
    app.stop().await;
}

async fn tamper_delete(backend: Backend) {
    let app = chain_of(backend, 30).await;
    sql(&app, "DELETE FROM audit_events WHERE seq = 15".into()).await;
    let bundle = detected_both_ways(&app, 15, ProblemKind::Deleted).await;
    offline_tools_reject(&bundle, "15").await;
    app.stop().await;
}

/// Delete one record and renumber the rest so positions stay dense.
async fn tamper_delete_and_renumber(backend: Backend) {
    let app = chain_of(backend, 30).await;
    sql(
        &app,
        "DELETE FROM audit_events WHERE seq = 15; \
         UPDATE audit_events SET seq = seq + 1000 WHERE seq > 15; \
         UPDATE audit_events SET seq = seq - 1001 WHERE seq > 1000;"
            .into(),
    )
    .await;
    detected_both_ways(&app, 15, ProblemKind::Deleted).await;
    app.stop().await;
}

async fn tamper_insert(backend: Backend) {
    let app = chain_of(backend, 30).await;
    // A forged record with a correct hash linked to record 15, the rest renumbered.
    let mut forged = AuditEvent::rest("read", "R", "forger");
    forged
        .entities
        .push(EntityRef::resource("Organization/hosp-500"));
    let resource = forged.canonical_resource();
    let store = app.state.store.clone();
    let prev: String = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::audit_events::dsl::*;
        let mut conn = store.conn().unwrap();
        audit_events
            .find(15i64)
            .select(hash)
            .first(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    let h = chain_hash(&prev, &resource);
    sql(
        &app,
        format!(
            "UPDATE audit_events SET seq = seq + 1000 WHERE seq > 15; \
             UPDATE audit_events SET seq = seq - 999 WHERE seq > 1000; \
             INSERT INTO audit_events (seq, event_id, recorded_at, type_code, subtype_code, outcome, \
               source_replica, resource, prev_hash, hash) \
             VALUES (16, '{}', '{}', 'rest', 'read', '0', 'forger', '{}', '{prev}', '{h}');",
            forged.event_id,
            forged.recorded_at.format("%Y-%m-%d %H:%M:%S%.6f"),
            resource.replace('\'', "''")
        ),
    )
    .await;
    let report = verify(&app).await;
    assert_first(&report, 16, ProblemKind::Inserted);
    let bundle = detected_both_ways(&app, 16, ProblemKind::Inserted).await;
    offline_tools_reject(&bundle, "16").await;
    app.stop().await;
}

async fn tamper_reorder(backend: Backend) {
    let app = chain_of(backend, 30).await;
    sql(
        &app,
        "UPDATE audit_events SET seq = 1000 WHERE seq = 17; \
         UPDATE audit_events SET seq = 17 WHERE seq = 18; \
         UPDATE audit_events SET seq = 18 WHERE seq = 1000;"
            .into(),
    )
    .await;
    let bundle = detected_both_ways(&app, 17, ProblemKind::Reordered).await;
    offline_tools_reject(&bundle, "17").await;
    app.stop().await;
}

async fn tamper_truncate(backend: Backend) {
    let app = chain_of(backend, 30).await;
    sql(&app, "DELETE FROM audit_events WHERE seq > 25".into()).await;
    detected_both_ways(&app, 26, ProblemKind::Truncated).await;
    // Also with the chain head moved back: the signed checkpoint at 30 still vouches for 26..30.
    sql(&app, "UPDATE audit_chain_head SET head_seq = 25".into()).await;
    let report = verify(&app).await;
    assert_first(&report, 26, ProblemKind::Truncated);
    cli_verify_fails(&app, "position 26: truncated").await;
    app.stop().await;
}

async fn tamper_forged_checkpoint(backend: Backend) {
    let app = chain_of(backend, 30).await;
    // A checkpoint signed by another key but claiming ours, at position 15.
    let other = AuditSigner::new(&Sm2PrivateKey::generate().unwrap()).unwrap();
    let store = app.state.store.clone();
    let h15: String = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::audit_events::dsl::*;
        let mut conn = store.conn().unwrap();
        audit_events
            .find(15i64)
            .select(hash)
            .first(&mut conn)
            .unwrap()
    })
    .await
    .unwrap();
    let cp = other
        .checkpoint(15, &h15, yiqiao_registry::store::now_utc())
        .unwrap();
    sql(
        &app,
        format!(
            "INSERT INTO audit_checkpoints (seq, head_hash, signed_at, key_id, signature) \
             VALUES (15, '{h15}', '2026-11-29 10:00:00', '{}', '{}')",
            signer().key_id(),
            cp.signature
        ),
    )
    .await;
    let bundle = detected_both_ways(&app, 15, ProblemKind::BadCheckpointSignature).await;
    offline_tools_reject(&bundle, "15").await;
    app.stop().await;
}

/// An attacker who rewrites the chain consistently from record 12 on is caught by the signed
/// checkpoint at 20.
async fn rewritten_chain_is_caught_by_checkpoint(backend: Backend) {
    let app = chain_of(backend, 30).await;
    let mut bundle = export_bundle(&app).await;
    let mut prev = bundle.records[10].hash.clone();
    let mut statements = String::new();
    for r in bundle.records.iter_mut().skip(11) {
        if r.seq == 12 {
            r.resource = r.resource.replace("hosp-011", "hosp-099");
        }
        r.prev_hash = prev.clone();
        r.hash = chain_hash(&prev, &r.resource);
        prev = r.hash.clone();
        statements.push_str(&format!(
            "UPDATE audit_events SET resource = '{}', prev_hash = '{}', hash = '{}' WHERE seq = {};\n",
            r.resource.replace('\'', "''"),
            r.prev_hash,
            r.hash,
            r.seq
        ));
    }
    statements.push_str(&format!(
        "UPDATE audit_chain_head SET head_hash = '{prev}';"
    ));
    sql(&app, statements).await;
    let report = verify(&app).await;
    // Every hash and link is consistent again; only the signed checkpoint at 20 tells.
    assert_first(&report, 20, ProblemKind::CheckpointMismatch);
    let offline = verify_bundle(&export_bundle(&app).await, &public_key());
    assert_first(&offline, 20, ProblemKind::CheckpointMismatch);
    app.stop().await;
}

/// Two gateway processes' worth of replicas on one database, writing at once.
async fn two_replicas_write_concurrently(backend: Backend) {
    let a = TestApp::spawn_with(backend, |s| s.audit.replica_id = "replica-a".into()).await;
    let mut settings = test_settings(&a.state.settings.database_url());
    settings.audit.replica_id = "replica-b".into();
    let b = TestApp::spawn_on(TestDb::shared(&a.state.settings.database_url()), settings).await;
    assert_eq!(
        a.admin_post("/admin/institutions", &institution(1))
            .await
            .status(),
        201
    );
    let per_replica = 400;
    let mut tasks = Vec::new();
    for app in [&a, &b] {
        for i in 0..per_replica {
            let auditor = app.state.auditor.clone();
            tasks.push(tokio::spawn(async move {
                let e = auditor.read_event(format!("Organization/hosp-{i:03}"));
                auditor.record(e).await.unwrap().seq
            }));
        }
        for _ in 0..20 {
            let (client, url) = (app.client.clone(), app.url("/fhir/Organization/hosp-001"));
            tasks.push(tokio::spawn(async move {
                assert_eq!(client.get(url).send().await.unwrap().status(), 200);
                0
            }));
        }
    }
    let mut seqs: Vec<i64> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .filter(|s| *s > 0)
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        2 * per_replica,
        "every receipt has its own position"
    );
    let total = 1 + 2 * per_replica as u64 + 40;
    // The 40 public directory reads are recorded without waiting.
    let report = verify_once(&a, total).await;
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.records, total, "no gap, nothing lost");
    assert_eq!(report.last_seq, Some(total as i64));
    let bundle = export_bundle(&a).await;
    let replicas: std::collections::BTreeSet<String> = bundle
        .records
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(&r.resource).unwrap()["source"]["observer"]["display"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        replicas.into_iter().collect::<Vec<_>>(),
        ["replica-a", "replica-b"]
    );
    b.stop().await;
    a.stop().await;
}

/// No durable audit record, no data: with audit inserts failing, a clinical read (a PDQm
/// search that finds a registered patient) answers 503 and the patient is not in the body;
/// public directory reads do not wait for the audit writer and still answer. Once audit works
/// again the search succeeds, and the directory reads lost with the failing batches are
/// counted in a summary record (docs/audit.md).
async fn fail_closed(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.audit.write_timeout_ms = 3000).await;
    let mut member = institution(1);
    member["allowed_scopes"] = serde_json::json!(["system/Patient.cruds"]);
    assert_eq!(
        app.admin_post("/admin/institutions", &member)
            .await
            .status(),
        201
    );
    let as_member = |req: reqwest::RequestBuilder| {
        req.bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "hosp-001")
    };
    let patient = serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:2.16.156.10011.1.99.1", "value": "MR-1" }],
        "name": [{ "family": "王", "given": ["秀英"], "text": "王秀英" }],
        "gender": "female",
        "birthDate": "1975-06-01",
    });
    let created = as_member(app.client.post(app.url("/fhir/Patient")))
        .json(&patient)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let search = || as_member(app.client.get(app.url("/fhir/Patient?family=%E7%8E%8B"))).send();
    let found = search().await.unwrap().text().await.unwrap();
    assert!(found.contains("秀英"), "{found}");
    crate::auditing::break_audit(&app, backend).await;
    let resp = search().await.unwrap();
    let body = assert_outcome(resp, 503, "audit-unavailable").await;
    assert!(!body.to_string().contains("秀英"), "{body}");
    let directory = [
        "/fhir/Organization/hosp-001",
        "/fhir/Endpoint/hosp-001",
        "/fhir/Organization?name=人民",
    ];
    for path in directory {
        let resp = app.get(path).await;
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.text().await.unwrap().contains("hosp-001"));
    }
    // The writer has failed the batches that held them (the search's record comes first).
    assert_outcome(search().await.unwrap(), 503, "audit-unavailable").await;
    crate::auditing::mend_audit(&app, backend).await;
    assert!(
        search()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("秀英")
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let counted: u64 = crate::auditing::records(&app)
            .await
            .iter()
            .filter_map(|e| {
                let r: Value = serde_json::from_str(&e.resource).ok()?;
                r["outcomeDesc"]
                    .as_str()?
                    .split_once(" public directory reads not itemised")
                    .map(|(n, _)| n.parse::<u64>().unwrap())
            })
            .sum();
        if counted == directory.len() as u64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{counted} of {} lost directory reads counted",
            directory.len()
        );
        // The summary rides with the next batch.
        assert_eq!(app.get("/fhir/Organization/hosp-001").await.status(), 200);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(verify(&app).await.ok());
    app.stop().await;
}

on_both_backends!(
    chain_verifies_after_traffic,
    checkpoints_are_signed,
    tamper_modify,
    tamper_delete,
    tamper_delete_and_renumber,
    tamper_insert,
    tamper_reorder,
    tamper_truncate,
    tamper_forged_checkpoint,
    rewritten_chain_is_caught_by_checkpoint,
    two_replicas_write_concurrently,
    fail_closed,
);

/// With the database cut off (PostgreSQL behind a proxy), a directory read answers 503 and no
/// data leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_cut_answers_503_without_data() {
    use crate::helpers::{Proxy, socket_of, via_proxy};
    let db = TestDb::new(Backend::Postgres);
    let proxy = Proxy::start(socket_of(&db.url)).await;
    let settings = test_settings(&via_proxy(&db.url, &proxy));
    let app = TestApp::spawn_on(db, settings).await;
    assert_eq!(
        app.admin_post("/admin/institutions", &institution(1))
            .await
            .status(),
        201
    );
    assert_eq!(app.get("/fhir/Organization/hosp-001").await.status(), 200);
    proxy.down().await;
    let resp = app.get("/fhir/Organization/hosp-001").await;
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("第1人民医院"), "{text}");
    proxy.up();
    app.stop().await;
}

async fn yiqiao(app: &TestApp, args: &[&str]) -> std::process::Output {
    crate::helpers::yiqiao_cli(app, args).await
}

async fn cli_verify_fails(app: &TestApp, expected: &str) {
    let out = yiqiao(app, &["audit", "verify"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
}

/// `yiqiao audit verify-export` and tests/interop/verify_audit_export.py both reject the bundle
/// and name the position.
async fn offline_tools_reject(bundle: &Bundle, seq: &str) {
    let dir = TempDir::new();
    let file = dir.path.join("bundle.json");
    std::fs::write(&file, serde_json::to_string(bundle).unwrap()).unwrap();
    let out = wait::output(
        wait::command(env!("CARGO_BIN_EXE_yiqiao"))
            .args(["audit", "verify-export"])
            .arg(&file)
            .arg("--public-key")
            .arg(&test_audit_key().1),
        "`yiqiao audit verify-export`",
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    assert!(stderr.contains(&format!("position {seq}:")), "{stderr}");
    let out = python_verifier(&file).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "python accepted a tampered bundle");
    assert!(stderr.contains(&format!("position {seq}")), "{stderr}");
}

async fn python_verifier(file: &std::path::Path) -> std::process::Output {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/verify_audit_export.py"
    );
    wait::output(
        wait::command("python3")
            .arg(script)
            .arg(file)
            .arg("--public-key")
            .arg(&test_audit_key().1),
        "verify_audit_export.py",
    )
    .await
}

/// A clean export verifies with the CLI, with Python (gmssl) and with the documented OpenSSL
/// steps; the CLI verifies the database; export + verify round trip through the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_export_verifies_everywhere() {
    let app = chain_of(Backend::Sqlite, 12).await;
    let out = yiqiao(&app, &["audit", "verify", "--from", "3", "--to", "11"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("positions 3..11"));
    let dir = TempDir::new();
    let file = dir.path.join("bundle.json");
    let out = yiqiao(&app, &["audit", "export", "--out", file.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = yiqiao(
        &app,
        &[
            "audit",
            "verify-export",
            file.to_str().unwrap(),
            "--public-key",
            test_audit_key().1.to_str().unwrap(),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = python_verifier(&file).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // docs/audit.md, "Verifying with OpenSSL only".
    let bundle: Bundle = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let r = &bundle.records[4];
    let input = dir.path.join("record.in");
    std::fs::write(
        &input,
        format!("yiqiao-audit-v1\n{}\n{}", r.prev_hash, r.resource),
    )
    .unwrap();
    let dgst = wait::output(
        wait::command("openssl")
            .args(["dgst", "-sm3", "-r"])
            .arg(&input),
        "`openssl dgst -sm3`",
    )
    .await;
    let text = String::from_utf8_lossy(&dgst.stdout);
    assert_eq!(
        text.split_whitespace().next(),
        Some(r.hash.as_str()),
        "{text}"
    );
    let manifest = dir.path.join("manifest.json");
    std::fs::write(&manifest, &bundle.manifest).unwrap();
    let sig = dir.path.join("manifest.sig");
    std::fs::write(&sig, hex_decode(&bundle.manifest_signature)).unwrap();
    let verified = wait::output(
        wait::command("openssl")
            .args([
                "pkeyutl",
                "-verify",
                "-rawin",
                "-digest",
                "sm3",
                "-pkeyopt",
                "distid:1234567812345678",
                "-pubin",
                "-inkey",
            ])
            .arg(&test_audit_key().1)
            .arg("-in")
            .arg(&manifest)
            .arg("-sigfile")
            .arg(&sig),
        "`openssl pkeyutl -verify`",
    )
    .await;
    assert!(
        String::from_utf8_lossy(&verified.stdout).contains("Verified Successfully"),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let _ = ADMIN_TOKEN;
    app.stop().await;
}

fn hex_decode(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
