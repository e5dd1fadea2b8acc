//! Every write path commits its change and its audit record in one transaction: with the audit
//! table made to refuse inserts, each write answers 503 `audit-unavailable` and the change is
//! absent afterwards (rows counted in the table it writes); once the audit table works again,
//! the very same request succeeds — so the refusal was the audit's, not the input's. On SQLite
//! and PostgreSQL.

use diesel::QueryableByName;
use diesel::RunQueryDsl;
use diesel::sql_types::BigInt;
use serde_json::{Value, json};

use crate::auditing::{break_audit, mend_audit};
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, institution};
use crate::on_both_backends;

const STEWARD: &str = "test-steward-token-0123456789";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    let store = app.state.store.clone();
    let sql = sql.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::sql_query(sql)
            .get_result::<Count>(&mut *conn)
            .unwrap()
            .n
    })
    .await
    .unwrap()
}

fn system() -> String {
    "urn:oid:2.16.156.10011.1.99.1".to_string()
}

fn patient(mrn: &str, name: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system(), "value": mrn }],
        "name": [{ "text": name }],
        "gender": "female",
        "birthDate": "1980-01-02",
    })
}

/// One write path: what it sends, and the query that counts what it would store.
struct WritePath {
    name: &'static str,
    method: reqwest::Method,
    path: String,
    body: Value,
    /// Member (hosp-001 through the admin credential), admin, or steward.
    credential: &'static str,
    /// Counts the rows the change would add or alter.
    probe: String,
}

fn paths(record: &str) -> Vec<WritePath> {
    use reqwest::Method;
    let member = "member";
    vec![
        WritePath {
            name: "Patient create",
            method: Method::POST,
            path: "/fhir/Patient".into(),
            body: patient("MR-2", "李四"),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM empi_source_records".into(),
        },
        WritePath {
            name: "Patient conditional update",
            method: Method::PUT,
            path: format!("/fhir/Patient?identifier={}|MR-1", system()),
            body: patient("MR-1", "张三改"),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM empi_source_records WHERE version > 1".into(),
        },
        WritePath {
            name: "Consent create",
            method: Method::POST,
            path: "/fhir/Consent".into(),
            body: json!({ "resourceType": "Consent", "status": "active",
                "patient": { "reference": format!("Patient/{record}") },
                "provision": { "type": "deny" } }),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM consents".into(),
        },
        WritePath {
            name: "Encounter create",
            method: Method::POST,
            path: "/fhir/Encounter".into(),
            body: json!({ "resourceType": "Encounter",
                "identifier": [{ "system": "urn:visit:1", "value": "V-1" }],
                "status": "in-progress",
                "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
                "subject": { "identifier": { "system": system(), "value": "MR-1" } },
                "period": { "start": "2026-11-29T08:00:00+08:00" } }),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM encounters".into(),
        },
        WritePath {
            name: "DocumentReference create",
            method: Method::POST,
            path: "/fhir/DocumentReference".into(),
            body: crate::documents::sample_document(1, "DOC-1", "MR-1"),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM doc_references".into(),
        },
        WritePath {
            name: "Subscription create",
            method: Method::POST,
            path: "/fhir/Subscription".into(),
            body: json!({ "resourceType": "Subscription", "status": "requested",
                "reason": "ours", "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
                "channel": { "type": "rest-hook", "endpoint": "https://receiver.example/hook",
                             "payload": "application/fhir+json" } }),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM doc_subscriptions".into(),
        },
        WritePath {
            name: "Practitioner create",
            method: Method::POST,
            path: "/fhir/Practitioner".into(),
            body: json!({ "resourceType": "Practitioner",
                "identifier": [{ "system": "https://yiqiao.health/fhir/sid/practitioner/hosp-001", "value": "D001" }],
                "active": true, "name": [{ "family": "王", "given": ["医生"] }] }),
            credential: member,
            probe: "SELECT COUNT(*) AS n FROM practitioners".into(),
        },
        WritePath {
            name: "Institution create (admin)",
            method: Method::POST,
            path: "/admin/institutions".into(),
            body: institution(7),
            credential: "admin",
            probe: "SELECT COUNT(*) AS n FROM institutions".into(),
        },
        WritePath {
            name: "Agreement put (steward)",
            method: Method::PUT,
            path: "/admin/agreements/agr-1".into(),
            body: json!({ "custodian": "hosp-001", "recipient": "hosp-002",
                "purposes": ["TREAT"], "status": "active" }),
            credential: "steward",
            probe: "SELECT COUNT(*) AS n FROM data_sharing_agreements".into(),
        },
    ]
}

async fn send(app: &TestApp, w: &WritePath) -> reqwest::Response {
    let req = app.client.request(w.method.clone(), app.url(&w.path));
    let req = match w.credential {
        "admin" => req.bearer_auth(ADMIN_TOKEN),
        "steward" => req.bearer_auth(STEWARD),
        _ => req
            .bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "hosp-001"),
    };
    req.json(&w.body).send().await.unwrap()
}

async fn a_failed_audit_write_leaves_no_change(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.steward_token = yiqiao_gateway::config::Secret::new(STEWARD);
    })
    .await;
    for n in [1, 2] {
        let mut inst = institution(n);
        inst["allowed_scopes"] = json!([
            "system/Patient.cruds",
            "system/Consent.cruds",
            "system/Encounter.cruds",
            "system/DocumentReference.cruds",
            "system/Subscription.cruds",
            "system/Practitioner.cruds",
        ]);
        let resp = app.admin_post("/admin/institutions", &inst).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
    let resp = app
        .client
        .post(app.url("/fhir/Patient"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .json(&patient("MR-1", "张三"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let record = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let writes = paths(&record);
    break_audit(&app, backend).await;
    let audited_before = count(&app, "SELECT COUNT(*) AS n FROM audit_events").await;
    for w in &writes {
        let before = count(&app, &w.probe).await;
        let resp = send(&app, w).await;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!(status, 503, "{}: {body}", w.name);
        assert!(body.contains("audit-unavailable"), "{}: {body}", w.name);
        assert_eq!(
            count(&app, &w.probe).await,
            before,
            "{}: the change was stored without its audit record",
            w.name
        );
    }
    assert_eq!(
        count(&app, "SELECT COUNT(*) AS n FROM audit_events").await,
        audited_before
    );
    mend_audit(&app, backend).await;
    for w in &writes {
        let before = count(&app, &w.probe).await;
        let resp = send(&app, w).await;
        let status = resp.status().as_u16();
        assert!(
            (200..300).contains(&status),
            "{}: {status} {}",
            w.name,
            resp.text().await.unwrap()
        );
        assert_eq!(count(&app, &w.probe).await, before + 1, "{}", w.name);
    }
    app.stop().await;
}

on_both_backends!(a_failed_audit_write_leaves_no_change);
