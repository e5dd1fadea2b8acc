#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn at(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
}

#[test]
fn cutoff_keeps_whole_months_of_the_window() {
    // 30 Nov minus 6 months is 30 May: months ending by 1 May (April and earlier) may go.
    let cutoff = retention_cutoff(at("2026-11-30 10:00:00"), 6);
    assert_eq!(month_label(cutoff), "2026-05");
    // On the first of a month, exactly six months back is the start of that month.
    let cutoff = retention_cutoff(at("2026-11-01 00:00:00"), 6);
    assert_eq!(month_label(cutoff), "2026-05");
    assert_eq!(parse_month("2025-02"), NaiveDate::from_ymd_opt(2025, 2, 1));
    assert_eq!(parse_month("2025-2"), None);
    assert_eq!(parse_month("2025-13"), None);
    assert_eq!(
        partition_name(parse_month("2025-02").unwrap()),
        "audit_events_p202502"
    );
}

#[test]
fn manifest_chain_problems_are_named() {
    let key = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    let signer = AuditSigner::new(&key).unwrap();
    let make = |first: i64, last: i64, anchor: &str, last_hash: &str| {
        let mut m = ArchiveManifest {
            first_seq: first,
            month: "2025-01".into(),
            last_seq: last,
            record_count: last - first + 1,
            anchor_prev_hash: anchor.into(),
            last_hash: last_hash.into(),
            file_name: "f.json".into(),
            file_sm3: "00".into(),
            archived_at: at("2026-11-30 10:00:00"),
            key_id: signer.key_id().into(),
            signature: String::new(),
        };
        m.signature = signer.sign_hex(archive_message(&m).as_bytes()).unwrap();
        m
    };
    let a = make(1, 10, GENESIS_HASH, "aa");
    let b = make(11, 20, "aa", "bb");
    let (problems, range) = check_manifests(&[a.clone(), b.clone()], signer.public_key());
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(range.unwrap().last_seq, 20);
    // A deleted first row.
    let (problems, _) = check_manifests(std::slice::from_ref(&b), signer.public_key());
    assert_eq!(problems[0].kind, ProblemKind::Deleted);
    assert_eq!(problems[0].seq, 1);
    // An edited row.
    let mut edited = b.clone();
    edited.last_seq = 25;
    edited.record_count = 15;
    let (problems, _) = check_manifests(&[a, edited], signer.public_key());
    assert_eq!(problems[0].kind, ProblemKind::BadArchiveManifest);
    assert_eq!(problems[0].seq, 11);
}

// ---- against real databases (both backends) ----

use crate::Backend;
use crate::audit::{AppendOptions, AuditEvent, PreparedEvent, append_batch, verify_db};
use crate::store::testdb::TestStore;
use diesel::connection::SimpleConnection;

const NOW: &str = "2026-11-30 10:00:00";

fn signer() -> AuditSigner {
    AuditSigner::new(&yiqiao_sm::Sm2PrivateKey::generate().unwrap()).unwrap()
}

/// Append one record per time, in this order (positions 1, 2, …), checkpoints every 3.
fn append_at(conn: &mut DbConn, signer: &AuditSigner, times: &[&str]) {
    let batch: Vec<PreparedEvent> = times
        .iter()
        .map(|t| {
            let mut e = AuditEvent::rest("read", "R", "test");
            e.recorded_at = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").unwrap();
            e.agent_institution = Some("hosp-001".into());
            PreparedEvent::new(e)
        })
        .collect();
    let opts = AppendOptions {
        checkpoint_every: 3,
        force_checkpoint: false,
    };
    for one in batch.chunks(1) {
        append_batch(conn, one, signer, opts).unwrap();
    }
}

fn opts(dir: &Path) -> ArchiveOptions {
    ArchiveOptions {
        dir: dir.to_path_buf(),
        retention_months: 6,
        before: None,
        now: at(NOW),
        max_records_per_file: DEFAULT_FILE_MAX_RECORDS,
    }
}

fn stored_positions(conn: &mut DbConn) -> Vec<i64> {
    audit_events::table
        .select(audit_events::seq)
        .order(audit_events::seq.asc())
        .load(conn)
        .unwrap()
}

/// (month, first, last) of each manifest a run wrote.
fn ranges(run: &ArchiveRun) -> Vec<(String, i64, i64)> {
    run.archived
        .iter()
        .map(|m| (m.month.clone(), m.first_seq, m.last_seq))
        .collect()
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "yiqiao-archive-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A month larger than `max_records_per_file` goes in consecutive files of at most that
/// many records, each verifiable alone; the month's partition is dropped with its last
/// file only, and what remains verifies across all the manifests.
fn archives_a_large_month_in_several_files(backend: Backend) {
    let db = TestStore::new(backend);
    let mut pooled = db.store.conn().unwrap();
    let conn = &mut *pooled;
    let signer = signer();
    let key = signer.public_key().clone();
    let jan = parse_month("2025-01").unwrap();
    ensure_partition(conn, jan).unwrap();
    let times: Vec<String> = (1..=7)
        .map(|d| format!("2025-01-{d:02} 08:00:00"))
        .chain([
            "2025-02-03 10:00:00".to_string(),
            "2026-11-29 10:00:00".to_string(),
        ])
        .collect();
    append_at(
        conn,
        &signer,
        &times.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let dir = scratch_dir();
    let mut small = opts(&dir);
    small.max_records_per_file = 3;
    let run = archive(conn, &signer, &small).unwrap();
    assert_eq!(
        ranges(&run),
        vec![
            ("2025-01".to_string(), 1, 3),
            ("2025-01".to_string(), 4, 6),
            ("2025-01".to_string(), 7, 7),
            ("2025-02".to_string(), 8, 8),
        ]
    );
    let mut anchor = GENESIS_HASH.to_string();
    for m in &run.archived {
        assert_eq!(m.anchor_prev_hash, anchor, "files chain on");
        let path = dir.join(&m.file_name);
        check_file(&path, &key, m.first_seq, m.last_seq, &m.anchor_prev_hash).unwrap();
        let bundle: Bundle = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(bundle.records.len() <= 3);
        assert!(verify_bundle(&bundle, &key).ok());
        anchor = m.last_hash.clone();
    }
    assert_eq!(stored_positions(conn), vec![9]);
    if backend == Backend::Postgres {
        let parts = partitions(conn).unwrap();
        assert!(
            !parts.contains(&"audit_events_p202501".to_string()),
            "{parts:?}"
        );
    }
    let report = verify_db(conn, None, None, &key).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!(report.archive_manifests, 4);
    assert_eq!((report.first_seq, report.last_seq), (Some(9), Some(9)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Old months (one with a record of the next month appended before its last record, one
/// whose month has no partition on PostgreSQL) are archived, verified and dropped; what is
/// inside the retention window stays; the remaining chain verifies from the last manifest;
/// tampering with what remains, with a manifest row or deleting one is detected.
fn archives_old_months_and_verifies_across_them(backend: Backend) {
    let db = TestStore::new(backend);
    let mut pooled = db.store.conn().unwrap();
    let conn = &mut *pooled;
    let signer = signer();
    let key = signer.public_key().clone();
    let jan = parse_month("2025-01").unwrap();
    let feb = parse_month("2025-02").unwrap();
    // 2025-01 and 2025-02 get partitions; 2025-03 lands in the DEFAULT partition.
    let pg = backend == Backend::Postgres;
    assert_eq!(ensure_partition(conn, jan).unwrap(), pg);
    assert_eq!(ensure_partition(conn, feb).unwrap(), pg);
    assert!(!ensure_partition(conn, feb).unwrap());
    append_at(
        conn,
        &signer,
        &[
            "2025-01-05 08:00:00",
            "2025-01-20 09:00:00",
            "2025-01-31 23:59:59",
            "2025-02-01 00:00:01",
            "2025-01-31 23:59:59.500",
            "2025-02-10 12:00:00",
            "2025-03-15 12:00:00",
            "2026-05-02 00:00:00",
            "2026-11-29 10:00:00",
        ],
    );
    assert!(verify_db(conn, None, None, &key).unwrap().ok());
    let dir = scratch_dir();
    // --before may not reach into the window.
    let mut inside = opts(&dir);
    inside.before = parse_month("2026-06");
    assert!(matches!(
        archive(conn, &signer, &inside),
        Err(ArchiveError::Refused(_))
    ));

    let run = archive(conn, &signer, &opts(&dir)).unwrap();
    assert_eq!(
        ranges(&run),
        vec![
            ("2025-01".to_string(), 1, 5),
            ("2025-02".to_string(), 6, 6),
            ("2025-03".to_string(), 7, 7)
        ]
    );
    assert!(run.deferred.is_none(), "{:?}", run.deferred);
    // Nothing inside the window (May 2026 on) was touched.
    assert_eq!(stored_positions(conn), vec![8, 9]);
    // Every file verifies with the public key alone, as an export does.
    for m in &run.archived {
        let path = dir.join(&m.file_name);
        let (sm3, last_hash) =
            check_file(&path, &key, m.first_seq, m.last_seq, &m.anchor_prev_hash).unwrap();
        assert_eq!((sm3, last_hash), (m.file_sm3.clone(), m.last_hash.clone()));
        let bundle: Bundle = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(verify_bundle(&bundle, &key).ok());
    }
    assert_eq!(manifests(conn).unwrap(), run.archived);
    if backend == Backend::Postgres {
        let parts = partitions(conn).unwrap();
        assert!(
            !parts.contains(&"audit_events_p202501".to_string()),
            "{parts:?}"
        );
        assert!(
            !parts.contains(&"audit_events_p202502".to_string()),
            "{parts:?}"
        );
        assert!(
            parts.contains(&"audit_events_default".to_string()),
            "{parts:?}"
        );
    }
    // What remains verifies, continuing from the last manifest's hash.
    let report = verify_db(conn, None, None, &key).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    assert_eq!((report.first_seq, report.last_seq), (Some(8), Some(9)));
    assert_eq!(
        (report.archived_through, report.archive_manifests),
        (Some(7), 3)
    );
    // A range starting inside the archive is verified from where the records continue.
    assert!(verify_db(conn, Some(2), None, &key).unwrap().ok());
    // Idempotent: a second run has nothing to do.
    let again = archive(conn, &signer, &opts(&dir)).unwrap();
    assert!(again.archived.is_empty() && again.reused_files.is_empty());
    // An export now starts after the archive.
    let bundle = export(conn, None, None, &signer).unwrap();
    assert!(verify_bundle(&bundle, &key).ok());
    assert_eq!(bundle.records.first().map(|r| r.seq), Some(8));
    assert!(matches!(
        export(conn, Some(3), None, &signer),
        Err(ExportError::Archived(7))
    ));

    // Tampering with a remaining record is still detected.
    conn.batch_execute(
        "UPDATE audit_events SET resource = replace(resource, 'hosp-001', 'hosp-002') WHERE seq = 9",
    )
    .unwrap();
    let report = verify_db(conn, None, None, &key).unwrap();
    assert_eq!(
        report.first_problem().map(|p| (p.seq, p.kind)),
        Some((9, ProblemKind::Modified))
    );
    conn.batch_execute(
        "UPDATE audit_events SET resource = replace(resource, 'hosp-002', 'hosp-001') WHERE seq = 9",
    )
    .unwrap();
    assert!(verify_db(conn, None, None, &key).unwrap().ok());
    // An edited manifest row.
    conn.batch_execute(
        "UPDATE audit_archives SET last_seq = 8, record_count = 2 WHERE first_seq = 7",
    )
    .unwrap();
    let report = verify_db(conn, None, None, &key).unwrap();
    let first = report.first_problem().unwrap();
    assert_eq!(
        (first.seq, first.kind),
        (7, ProblemKind::BadArchiveManifest),
        "{:#?}",
        report.problems
    );
    conn.batch_execute(
        "UPDATE audit_archives SET last_seq = 7, record_count = 1 WHERE first_seq = 7",
    )
    .unwrap();
    assert!(verify_db(conn, None, None, &key).unwrap().ok());
    // A deleted manifest row: the last one, then a middle one.
    for victim in [7i64, 6] {
        let saved: ArchiveManifest = audit_archives::table.find(victim).first(conn).unwrap();
        diesel::delete(audit_archives::table.find(victim))
            .execute(conn)
            .unwrap();
        let report = verify_db(conn, None, None, &key).unwrap();
        let first = report.first_problem().unwrap();
        assert_eq!(
            (first.seq, first.kind),
            (victim, ProblemKind::Deleted),
            "{:#?}",
            report.problems
        );
        diesel::insert_into(audit_archives::table)
            .values(&saved)
            .execute(conn)
            .unwrap();
    }
    assert!(verify_db(conn, None, None, &key).unwrap().ok());
    // Deleting the record right after the archive.
    conn.batch_execute("DELETE FROM audit_events WHERE seq = 8")
        .unwrap();
    let report = verify_db(conn, None, None, &key).unwrap();
    assert_eq!(
        report.first_problem().map(|p| (p.seq, p.kind)),
        Some((8, ProblemKind::Deleted))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run that wrote its file and died before the drop: the next run verifies the file,
/// reuses it (a half-written file beside it is ignored) and completes. A month whose
/// records do not verify is not dropped.
fn resumes_after_a_crash_and_never_drops_unverified(backend: Backend) {
    let db = TestStore::new(backend);
    let mut pooled = db.store.conn().unwrap();
    let conn = &mut *pooled;
    let signer = signer();
    let key = signer.public_key().clone();
    append_at(
        conn,
        &signer,
        &[
            "2025-01-05 08:00:00",
            "2025-01-06 08:00:00",
            "2025-01-07 08:00:00",
            "2025-02-07 08:00:00",
            "2025-02-08 08:00:00",
            "2026-11-29 10:00:00",
        ],
    );
    let dir = scratch_dir();
    // What the interrupted run left: its verified file, and a torn one of another attempt.
    let bundle = export(conn, Some(1), Some(3), &signer).unwrap();
    let left = "yiqiao-audit-2025-01-1-3-deadbeef.json";
    std::fs::write(dir.join(left), serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
    std::fs::write(
        dir.join("yiqiao-audit-2025-01-1-3-00000000.json"),
        b"{\"manifest\":",
    )
    .unwrap();
    // February's records were tampered with: it must not be dropped.
    conn.batch_execute(
        "UPDATE audit_events SET resource = replace(resource, 'hosp-001', 'hosp-009') WHERE seq = 5",
    )
    .unwrap();
    let err = archive(conn, &signer, &opts(&dir)).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Unverified { month, .. } if month == "2025-02"),
        "{err}"
    );
    // January was completed from the file left behind; February is all still there.
    let done = manifests(conn).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].file_name, left);
    assert_eq!(stored_positions(conn), vec![4, 5, 6]);
    // Restored, February goes too.
    conn.batch_execute(
        "UPDATE audit_events SET resource = replace(resource, 'hosp-009', 'hosp-001') WHERE seq = 5",
    )
    .unwrap();
    let run = archive(conn, &signer, &opts(&dir)).unwrap();
    assert_eq!(run.archived.len(), 1);
    assert_eq!(stored_positions(conn), vec![6]);
    let report = verify_db(conn, None, None, &key).unwrap();
    assert!(report.ok(), "{:#?}", report.problems);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A record of the first month inside the window appended before the last record of the
/// month before it: that month waits (nothing inside the window is removed).
fn late_record_inside_the_window_defers_its_month(backend: Backend) {
    let db = TestStore::new(backend);
    let mut pooled = db.store.conn().unwrap();
    let conn = &mut *pooled;
    let signer = signer();
    append_at(
        conn,
        &signer,
        &[
            "2026-04-30 23:59:00",
            "2026-05-01 00:00:01",
            "2026-04-30 23:59:59",
        ],
    );
    let dir = scratch_dir();
    let run = archive(conn, &signer, &opts(&dir)).unwrap();
    assert!(run.archived.is_empty());
    assert!(
        run.deferred
            .as_deref()
            .is_some_and(|d| d.starts_with("2026-04")),
        "{:?}",
        run.deferred
    );
    assert_eq!(stored_positions(conn), vec![1, 2, 3]);
    // A month later the whole range is out of the window.
    let mut later = opts(&dir);
    later.now = at("2026-12-01 00:00:00");
    let run = archive(conn, &signer, &later).unwrap();
    assert_eq!(run.archived.len(), 1);
    assert_eq!(
        (run.archived[0].first_seq, run.archived[0].last_seq),
        (1, 3)
    );
    assert!(stored_positions(conn).is_empty());
    assert!(
        verify_db(conn, None, None, signer.public_key())
            .unwrap()
            .ok()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgreSQL: partitions exist ahead for this month and the next ones; rows in the DEFAULT
/// partition move into a month's partition when it is created.
#[test]
fn postgres_partitions_are_made_ahead() {
    let db = TestStore::new(Backend::Postgres);
    let mut pooled = db.store.conn().unwrap();
    let conn = &mut *pooled;
    let now = at("2031-12-15 00:00:00");
    let created = ensure_partitions(conn, now, 3).unwrap();
    assert_eq!(
        created,
        vec![
            "audit_events_p203112",
            "audit_events_p203201",
            "audit_events_p203202",
            "audit_events_p203203"
        ]
    );
    assert!(ensure_partitions(conn, now, 3).unwrap().is_empty());
    // The migration made this month's and the next three's.
    let this_month = month_of(now_utc());
    let parts = partitions(conn).unwrap();
    for i in 0..4 {
        let m = this_month.checked_add_months(Months::new(i)).unwrap();
        assert!(parts.contains(&partition_name(m)), "{parts:?}");
    }
    // A record of a month without a partition lands in DEFAULT and moves when it comes.
    let signer = signer();
    append_at(conn, &signer, &["2019-07-04 00:00:00"]);
    let place = |conn: &mut DbConn| -> String {
        let DbConn::Postgresql(pg) = conn else {
            unreachable!()
        };
        diesel::sql_query("SELECT tableoid::regclass::text AS name FROM audit_events WHERE seq = 1")
            .get_result::<Name>(pg)
            .unwrap()
            .name
    };
    assert_eq!(place(conn), "audit_events_default");
    assert!(ensure_partition(conn, parse_month("2019-07").unwrap()).unwrap());
    assert_eq!(place(conn), "audit_events_p201907");
    assert!(
        verify_db(conn, None, None, signer.public_key())
            .unwrap()
            .ok()
    );
}

/// Two runs at once (replicas with the scheduled archive) into one directory: every month
/// is archived once, and no file is left that no manifest names.
fn concurrent_runs_archive_each_month_once(backend: Backend) {
    let db = TestStore::new(backend);
    let signer = std::sync::Arc::new(signer());
    {
        let mut pooled = db.store.conn().unwrap();
        append_at(
            &mut pooled,
            &signer,
            &[
                "2025-01-05 08:00:00",
                "2025-02-05 08:00:00",
                "2025-03-05 08:00:00",
                "2025-04-05 08:00:00",
                "2026-11-29 10:00:00",
            ],
        );
    }
    let dir = scratch_dir();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (store, signer, dir) = (db.store.clone(), signer.clone(), dir.clone());
            std::thread::spawn(move || {
                let mut conn = store.conn().unwrap();
                archive(&mut conn, &signer, &opts(&dir))
                    .unwrap()
                    .archived
                    .len()
            })
        })
        .collect();
    let archived: usize = runs.into_iter().map(|r| r.join().unwrap()).sum();
    assert_eq!(archived, 4);
    let mut pooled = db.store.conn().unwrap();
    let rows = manifests(&mut pooled).unwrap();
    let mut named: Vec<String> = rows.iter().map(|m| m.file_name.clone()).collect();
    named.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(on_disk, named);
    assert_eq!(stored_positions(&mut pooled), vec![5]);
    assert!(
        verify_db(&mut pooled, None, None, signer.public_key())
            .unwrap()
            .ok()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PostgreSQL: a long reader holding `audit_events` (a verification) delays the drop
/// beyond one lock timeout; the archive waits and retries instead of failing, and appends
/// are never held longer than the lock timeout.
#[test]
fn postgres_archive_waits_out_a_long_reader() {
    let db = TestStore::new(Backend::Postgres);
    let signer = signer();
    let mut pooled = db.store.conn().unwrap();
    append_at(
        &mut pooled,
        &signer,
        &["2025-01-05 08:00:00", "2026-11-29 10:00:00"],
    );
    let reader_store = db.store.clone();
    let (held, release) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut conn = reader_store.conn().unwrap();
        conn.batch_execute("BEGIN; SELECT count(*) FROM audit_events")
            .unwrap();
        held.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        conn.batch_execute("COMMIT").unwrap();
    });
    release.recv().unwrap();
    let dir = scratch_dir();
    let started = std::time::Instant::now();
    let run = archive(&mut pooled, &signer, &opts(&dir)).unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    assert_eq!(run.archived.len(), 1);
    assert_eq!(stored_positions(&mut pooled), vec![2]);
    reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

use crate::store::testdb::on_both_backends;

on_both_backends!(
    archives_old_months_and_verifies_across_them,
    archives_a_large_month_in_several_files,
    resumes_after_a_crash_and_never_drops_unverified,
    late_record_inside_the_window_defers_its_month,
    concurrent_runs_archive_each_month_once,
);
