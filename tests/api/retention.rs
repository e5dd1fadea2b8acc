//! Audit retention (issue 6): `yiqiao audit archive` on both backends — old months (records
//! spanning a month boundary, one appended late) leave as verified signed files, `yiqiao audit
//! verify` passes over what remains and catches a tampered manifest, archived files verify
//! offline, the auditors' search says older months are archived, nothing inside the retention
//! window is touched, and PostgreSQL has partitions ahead.

use chrono::{Duration, NaiveDateTime};
use diesel::connection::SimpleConnection;
use serde_json::Value;
use yiqiao_registry::audit::archive;
use yiqiao_registry::audit::{AppendOptions, AuditEvent, AuditSigner, PreparedEvent, append_batch};
use yiqiao_registry::store::now_utc;
use yiqiao_sm::Sm2PrivateKey;

use crate::helpers::{Backend, TempDir, TestApp, test_audit_key};
use crate::on_both_backends;
use crate::wait;

const AUDITOR_TOKEN: &str = "test-auditor-token-9876543210";

fn signer() -> AuditSigner {
    let pem = std::fs::read_to_string(&test_audit_key().0).unwrap();
    AuditSigner::new(&Sm2PrivateKey::from_pkcs8_pem(&pem).unwrap()).unwrap()
}

async fn yiqiao(app: &TestApp, args: &[&str]) -> (Option<i32>, String, String) {
    let out = crate::helpers::yiqiao_cli(app, args).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Append records recorded at these times (in this order) straight into the chain, as the
/// gateway would have years ago.
async fn append_past(app: &TestApp, times: &[&str]) {
    let store = app.state.store.clone();
    let events: Vec<PreparedEvent> = times
        .iter()
        .map(|t| {
            let mut e = AuditEvent::rest("read", "R", "past-replica");
            e.recorded_at = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").unwrap();
            e.agent_institution = Some("hosp-001".into());
            e.patient_id = Some("EMPI-OLD".into());
            PreparedEvent::new(e)
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        let opts = AppendOptions {
            checkpoint_every: 2,
            force_checkpoint: false,
        };
        for one in events.chunks(1) {
            append_batch(&mut conn, one, &signer(), opts).unwrap();
        }
    })
    .await
    .unwrap();
}

async fn search(app: &TestApp, query: &str) -> Value {
    let resp = app
        .client
        .get(app.url(&format!("/fhir/AuditEvent{query}")))
        .bearer_auth(AUDITOR_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn archive_note(bundle: &Value) -> Option<String> {
    bundle["entry"].as_array()?.iter().find_map(|e| {
        (e["resource"]["resourceType"] == "OperationOutcome").then(|| {
            e["resource"]["issue"][0]["details"]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
    })
}

async fn archive_through_the_cli(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.auditor_token = yiqiao_gateway::config::Secret::new(AUDITOR_TOKEN);
    })
    .await;
    // January and February of last year, a February record appended before January's last one;
    // then one record five months ago (inside the six-month window) and today's traffic.
    append_past(
        &app,
        &[
            "2025-01-10 08:00:00",
            "2025-01-31 23:59:59.900",
            "2025-02-01 00:00:00.100",
            "2025-01-31 23:59:59.950",
            "2025-02-15 12:00:00",
        ],
    )
    .await;
    let recent = (now_utc() - Duration::days(150))
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    append_past(&app, &[&recent]).await;
    let bundle = search(&app, "").await;
    assert!(archive_note(&bundle).is_none());

    let dir = TempDir::new();
    let out_dir = dir.path.to_str().unwrap();
    // --before may not reach into the retention window.
    let this_month = format!("{}", now_utc().format("%Y-%m"));
    let (code, _, stderr) = yiqiao(
        &app,
        &[
            "audit",
            "archive",
            "--before",
            &this_month,
            "--out",
            out_dir,
        ],
    )
    .await;
    assert_eq!(code, Some(6), "{stderr}");
    let (code, stdout, stderr) = yiqiao(&app, &["audit", "archive", "--out", out_dir]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("archived 2025-01: positions 1..4 (4 records)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("archived 2025-02: positions 5..5 (1 records)"),
        "{stdout}"
    );
    // Every archive file verifies offline with only the public key.
    let files: Vec<_> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    // ...with the binary and with the independent Python (gmssl) verifier.
    let python = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/verify_audit_export.py"
    );
    for file in &files {
        for (program, first_args) in [
            (
                env!("CARGO_BIN_EXE_yiqiao"),
                &["audit", "verify-export"][..],
            ),
            ("python3", &[python][..]),
        ] {
            let out = wait::output(
                wait::command(program)
                    .args(first_args)
                    .arg(file)
                    .arg("--public-key")
                    .arg(&test_audit_key().1),
                &format!("{program} {}", first_args.join(" ")),
            )
            .await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{program}: {stderr}");
        }
    }
    // What remains (the recent record and the auditor's own searches) verifies from the
    // last manifest.
    let (code, stdout, stderr) = yiqiao(&app, &["audit", "verify"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("positions 1..5 archived (2 signed manifests verified)"),
        "{stdout}"
    );
    // Nothing inside the window was touched.
    let store = app.state.store.clone();
    let (remaining, parts) = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::audit_events::dsl as a;
        let mut conn = store.conn().unwrap();
        let remaining: Vec<(i64, String)> = a::audit_events
            .select((a::seq, a::source_replica))
            .order(a::seq.asc())
            .load(&mut conn)
            .unwrap();
        (remaining, archive::partitions(&mut conn).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(
        remaining.first(),
        Some(&(6, "past-replica".to_string())),
        "{remaining:?}"
    );
    if backend == Backend::Postgres {
        // This month's partition and the next three exist; January's and February's are gone.
        let mut month = archive::month_of(now_utc());
        for _ in 0..4 {
            assert!(parts.contains(&archive::partition_name(month)), "{parts:?}");
            month = month.checked_add_months(chrono::Months::new(1)).unwrap();
        }
        assert!(
            !parts.iter().any(|p| p.starts_with("audit_events_p2025")),
            "{parts:?}"
        );
    }
    // The auditors' search returns what remains and says older months are archived.
    let bundle = search(&app, "?patient=EMPI-OLD").await;
    let note = archive_note(&bundle).expect("an archive note");
    assert!(note.contains("up to 2025-02"), "{note}");
    let matches = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "match")
        .count();
    assert_eq!(matches, 1);
    let after = search(&app, "?date=ge2025-03-01").await;
    assert!(archive_note(&after).is_none());
    // A second run has nothing to do.
    let (code, stdout, _) = yiqiao(&app, &["audit", "archive", "--out", out_dir]).await;
    assert_eq!(code, Some(0));
    assert!(stdout.contains("nothing to archive"), "{stdout}");
    // A tampered manifest row fails verification.
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        conn.batch_execute("UPDATE audit_archives SET file_sm3 = 'ff' WHERE first_seq = 5")
            .unwrap();
    })
    .await
    .unwrap();
    let (code, _, stderr) = yiqiao(&app, &["audit", "verify"]).await;
    assert_eq!(code, Some(7), "{stderr}");
    assert!(
        stderr.contains("position 5: bad-archive-manifest"),
        "{stderr}"
    );
    app.stop().await;
}

/// The maintenance run (every second here) archives eligible months into `audit.archive_dir`
/// and, on PostgreSQL, remakes a partition ahead that went missing.
async fn scheduled_maintenance(backend: Backend) {
    let dir = TempDir::new();
    let archive_dir = dir.path.to_str().unwrap().to_string();
    let app = TestApp::spawn_with(backend, move |s| {
        s.audit.archive_dir = archive_dir;
        s.audit.maintenance_interval_secs = 1;
    })
    .await;
    let ahead = archive::partition_name(
        archive::month_of(now_utc())
            .checked_add_months(chrono::Months::new(3))
            .unwrap(),
    );
    let store = app.state.store.clone();
    let dropped = ahead.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        if backend == Backend::Postgres {
            conn.batch_execute(&format!("DROP TABLE {dropped}"))
                .unwrap();
        }
    })
    .await
    .unwrap();
    append_past(&app, &["2024-03-01 00:00:00", "2024-03-02 00:00:00"]).await;
    let mut state = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let store = app.state.store.clone();
        state = tokio::task::spawn_blocking(move || {
            let mut conn = store.conn().unwrap();
            (
                archive::manifests(&mut conn).unwrap(),
                archive::partitions(&mut conn).unwrap(),
            )
        })
        .await
        .unwrap();
        let partitions_ok = backend == Backend::Sqlite || state.1.contains(&ahead);
        if !state.0.is_empty() && partitions_ok {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (manifests, parts) = state;
    assert_eq!(manifests.len(), 1, "no scheduled archive within 10 s");
    assert_eq!((manifests[0].first_seq, manifests[0].last_seq), (1, 2));
    assert!(dir.path.join(&manifests[0].file_name).exists());
    if backend == Backend::Postgres {
        assert!(parts.contains(&ahead), "{parts:?}");
    }
    let (code, _, stderr) = yiqiao(&app, &["audit", "verify"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    app.stop().await;
}

on_both_backends!(archive_through_the_cli, scheduled_maintenance);
