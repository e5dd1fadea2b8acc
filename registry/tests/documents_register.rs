//! `register_batch` returns each created document exactly as `documents::get` reads it back
//! afterwards (it builds the result from what it inserted instead of re-reading it), on
//! SQLite and on PostgreSQL (a fresh database on the server of `YIQIAO_TEST_DATABASE_URL`,
//! default postgres://postgres@127.0.0.1:5432/test; unreachable means the test fails).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::NaiveDateTime;
use serde_json::json;
use yiqiao_registry::Backend;
use yiqiao_registry::audit::{AppendOptions, AuditEvent, AuditSigner, append_with};
use yiqiao_registry::documents::{DocStatus, NewDocument, RegisterOutcome, get, register_batch};
use yiqiao_registry::store::testdb::{TestDatabase, open_store};
use yiqiao_registry::store::{Audited, DbConn, now_utc};
use yiqiao_sm::Sm2PrivateKey;

#[path = "support/documents.rs"]
mod support;

/// Run `work` as an audited change (the only way to write), with a throw-away audit key.
fn audited<T, E>(
    conn: &mut DbConn,
    work: impl FnOnce(&mut Audited<'_>) -> Result<T, E>,
) -> Result<T, E> {
    let signer = AuditSigner::new(&Sm2PrivateKey::generate().unwrap()).unwrap();
    let opts = AppendOptions {
        checkpoint_every: 1000,
        force_checkpoint: false,
    };
    match append_with(conn, &signer, opts, |tx| {
        work(tx).map(|v| (v, AuditEvent::rest("create", "C", "test")))
    }) {
        Ok((value, _)) => Ok(value),
        Err(yiqiao_registry::audit::ChangeError::Change(e)) => Err(e),
        Err(yiqiao_registry::audit::ChangeError::Db(e)) => panic!("audit append: {e}"),
    }
}

fn date(s: &str) -> NaiveDateTime {
    chrono::DateTime::parse_from_rfc3339(s).unwrap().naive_utc()
}

fn document(doc_id: &str, when: NaiveDateTime) -> NewDocument {
    support::new_document(
        "H1",
        doc_id,
        ("urn:test:1", "MR-1"),
        ("http://loinc.org|18842-5", "summary"),
        when,
    )
}

fn check(backend: Backend) {
    let db = TestDatabase::new(backend);
    let store = open_store(&db.url, 1);
    let mut conn = store.conn().unwrap();
    let now = now_utc();
    support::insert_institution(&mut conn, "H1", "TEST0000000000001", "urn:test:1", now).unwrap();
    support::insert_patient(
        &mut conn,
        ("P1", "R1", 1),
        "H1",
        ("urn:test:1", "MR-1"),
        now,
    )
    .unwrap();
    let plain = document("D-1", date("2024-03-01T08:00:00+08:00"));
    let mut rich = document("D-2", date("2024-03-01T08:00:00.123456+08:00"));
    rich.author_id = Some("H1".into());
    rich.confidentiality = "R".into();
    rich.sensitivity = vec!["PSY".into(), "HIV".into()];
    rich.resource = json!({ "resourceType": "DocumentReference",
        "masterIdentifier": { "value": "D-2" }, "description": "出院小结 \u{1F600} \"quoted\" \\ \u{0007}",
        "extension": [{ "url": "urn:x", "valueDecimal": 0.1 }, { "url": "urn:y", "valueDecimal": 1e-7 },
                      { "url": "urn:z", "valueDecimal": 12345.678901234567 }],
        "content": [{ "attachment": { "size": 2048 } }] });
    // Sub-microsecond digits: storage keeps microseconds, so the result must be read back.
    let fine = document("D-3", date("2024-03-01T08:00:00.123456789+08:00"));
    let done = audited(&mut conn, |tx| register_batch(tx, &[plain, rich, fine])).unwrap();
    assert_eq!(done.len(), 3);
    for (outcome, d) in &done {
        assert_eq!(*outcome, RegisterOutcome::Created);
        assert_eq!(d, &get(&mut conn, &d.id).unwrap(), "{}", d.custodian_doc_id);
    }
    assert_eq!(done[1].1.sensitivity, vec!["PSY", "HIV"]);
    assert_eq!(done[1].1.author_id.as_deref(), Some("H1"));
    assert_eq!(done[0].1.person_id, "P1");
    assert_eq!(done[0].1.patient_record_id, "R1");
    // A replacement (the replaced one becomes superseded) and a re-registration.
    let mut next = document("D-4", date("2024-03-02T08:00:00Z"));
    next.replaces = Some(done[0].1.id.clone());
    let again = document("D-1", date("2024-03-01T08:00:00+08:00"));
    let done2 = audited(&mut conn, |tx| register_batch(tx, &[next, again])).unwrap();
    assert_eq!(done2[0].0, RegisterOutcome::Created);
    assert_eq!(done2[0].1, get(&mut conn, &done2[0].1.id).unwrap());
    assert_eq!(done2[0].1.replaces.as_deref(), Some(done[0].1.id.as_str()));
    assert_eq!(done2[1].0, RegisterOutcome::Unchanged);
    assert_eq!(done2[1].1, get(&mut conn, &done[0].1.id).unwrap());
    assert_eq!(done2[1].1.status, DocStatus::Superseded);
}

#[test]
fn registered_documents_are_returned_as_stored_sqlite() {
    check(Backend::Sqlite);
}

#[test]
fn registered_documents_are_returned_as_stored_postgres() {
    check(Backend::Postgres);
}
