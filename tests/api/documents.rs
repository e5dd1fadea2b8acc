//! Document registry and subscriptions on both backends: registration validation,
//! idempotency, replace chains, search filters and paging, retrieval with the SM3 check, and
//! outbox delivery to a real HTTP receiver that fails, is slow, or is down; two replicas;
//! kill -9 of the real gateway process mid-delivery. Consent at every document exit (search
//! with pages filled past withheld documents, read, retrieval, notifications, `$events`), and
//! EMPI merges: merge notifications, consents following the merged person.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use yiqiao_gateway::config::Settings;

use crate::helpers::{
    ADMIN_TOKEN, Backend, Proxy, TempDir, TestApp, TestDb, assert_outcome, institution,
    test_settings,
};
use crate::on_both_backends;
use crate::wait;

const LOINC: &str = "http://loinc.org";
const WST500: &str = "https://yiqiao.health/fhir/CodeSystem/wst500-document";
const SM3_EXT: &str = "https://yiqiao.health/fhir/StructureDefinition/attachment-sm3";
const TOPIC_DOC: &str = "https://yiqiao.health/fhir/SubscriptionTopic/document";
const FILTER: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const RID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

pub(crate) fn inst_id(n: u32) -> String {
    format!("hosp-{n:03}")
}

fn rid(seq: u32) -> String {
    let first17 = format!("35010219800315{seq:03}");
    let check = yiqiao_registry::empi::ident::check_character(&first17).unwrap();
    format!("{first17}{check}")
}

fn delivery_settings(s: &mut Settings) {
    s.database.pool_size = 8;
    s.database.acquire_timeout_ms = 10_000;
    s.subscriptions.poll_interval_ms = 100;
    s.subscriptions.backoff_initial_ms = 100;
    s.subscriptions.backoff_max_ms = 400;
    s.subscriptions.request_timeout_ms = 2000;
    s.subscriptions.lease_ms = 5000;
}

async fn add_institutions(app: &TestApp, n: u32) {
    for i in 1..=n {
        let mut inst = institution(i);
        inst["allowed_scopes"] = json!([
            "system/Patient.cruds",
            "system/DocumentReference.cruds",
            "system/Subscription.cruds",
            "system/Consent.cruds"
        ]);
        let resp = app.admin_post("/admin/institutions", &inst).await;
        assert_eq!(resp.status(), 201);
    }
}

/// Gateway with three hospitals; 张伟 is registered at hosp-001 (MR-1) and hosp-002 (MR-9)
/// with one resident ID (one enterprise person), 李娜 at hosp-001 (MR-2).
pub(crate) async fn setup(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| {
        delivery_settings(s);
        s.steward_token = yiqiao_gateway::config::Secret::new(crate::consent::STEWARD_TOKEN);
        adjust(s);
    })
    .await;
    add_institutions(&app, 3).await;
    for (inst, local, name, seq) in [
        (1, "MR-1", "张伟", 11),
        (2, "MR-9", "张伟", 11),
        (1, "MR-2", "李娜", 22),
    ] {
        let patient = json!({
            "resourceType": "Patient",
            "identifier": [
                { "system": system(inst), "value": local },
                { "system": RID_SYSTEM, "value": rid(seq) },
            ],
            "name": [{ "text": name }],
            "gender": if seq == 11 { "male" } else { "female" },
            "birthDate": "1980-03-15",
        });
        let resp = post_as(&app, inst, "/fhir/Patient", &patient).await;
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    app
}

pub(crate) async fn post_as(
    app: &TestApp,
    inst: u32,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst))
        .json(body)
        .send()
        .await
        .unwrap()
}

pub(crate) async fn get_as(app: &TestApp, inst: u32, path: &str) -> reqwest::Response {
    get_url_as(app, inst, &app.url(path)).await
}

async fn get_url_as(app: &TestApp, inst: u32, url: &str) -> reqwest::Response {
    app.client
        .get(url)
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst))
        .send()
        .await
        .unwrap()
}

pub(crate) fn content_of(doc_id: &str) -> Vec<u8> {
    format!("<ClinicalDocument id=\"{doc_id}\"/>").into_bytes()
}

/// A DocumentReference of hospital `inst` about its patient `local`.
pub(crate) fn doc(
    inst: u32,
    doc_id: &str,
    local: &str,
    (ts, code): (&str, &str),
    date: &str,
) -> Value {
    let content = content_of(doc_id);
    json!({
        "resourceType": "DocumentReference",
        "masterIdentifier": { "system": format!("urn:oid:1.2.156.{inst}"), "value": doc_id },
        "status": "current",
        "type": { "coding": [{ "system": ts, "code": code }] },
        "subject": { "identifier": { "system": system(inst), "value": local } },
        "date": date,
        "author": [{ "reference": format!("Organization/{}", inst_id(inst)) }],
        "custodian": { "reference": format!("Organization/{}", inst_id(inst)) },
        "securityLabel": [{ "coding": [
            { "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N" }
        ]}],
        "content": [{ "attachment": {
            "contentType": "application/xml",
            "url": format!("https://his-{inst}.example/docs/{doc_id}"),
            "size": content.len(),
            "extension": [{ "url": SM3_EXT, "valueString": yiqiao_sm::sm3_hex(&content) }],
        }}],
    })
}

/// A valid DocumentReference of hospital `inst` (for other test modules).
pub fn sample_document(inst: u32, doc_id: &str, local: &str) -> Value {
    doc(inst, doc_id, local, DISCHARGE, "2024-03-01T08:00:00+08:00")
}

pub(crate) const DISCHARGE: (&str, &str) = (LOINC, "18842-5");
const LAB: (&str, &str) = (WST500, "C0007");

pub(crate) async fn register(app: &TestApp, inst: u32, body: &Value) -> Value {
    let resp = post_as(app, inst, "/fhir/DocumentReference", body).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v
}

pub(crate) async fn search(app: &TestApp, inst: u32, query: &str) -> Vec<Value> {
    let resp = get_as(app, inst, &format!("/fhir/DocumentReference?{query}")).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{query}: {v}");
    v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

async fn registration_is_validated(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let good = doc(1, "D-1", "MR-1", DISCHARGE, "2024-03-01T08:00:00+08:00");
    type Mutation = fn(&mut Value);
    let cases: Vec<(&str, Mutation, u16, &str, &str)> = vec![
        (
            "unknown patient",
            |d| d["subject"]["identifier"]["value"] = json!("MR-404"),
            422,
            "validation-failed",
            "DocumentReference.subject.identifier",
        ),
        (
            "unknown type code",
            |d| d["type"]["coding"][0]["code"] = json!("99999-9"),
            422,
            "validation-failed",
            "DocumentReference.type.coding[0].code",
        ),
        (
            "type system not accepted",
            |d| d["type"]["coding"][0]["system"] = json!("http://snomed.info/sct"),
            422,
            "validation-failed",
            "DocumentReference.type.coding",
        ),
        (
            "custodian is another institution",
            |d| d["custodian"]["reference"] = json!("Organization/hosp-002"),
            422,
            "validation-failed",
            "DocumentReference.custodian",
        ),
        (
            "bad hash format",
            |d| d["content"][0]["attachment"]["extension"][0]["valueString"] = json!("abc"),
            422,
            "validation-failed",
            "DocumentReference.content[0].attachment.extension",
        ),
        (
            "missing hash",
            |d| d["content"][0]["attachment"]["extension"] = json!([]),
            422,
            "validation-failed",
            "DocumentReference.content[0].attachment.extension",
        ),
        (
            "date without zone",
            |d| d["date"] = json!("2024-03-01"),
            422,
            "validation-failed",
            "DocumentReference.date",
        ),
        (
            "unknown sensitivity",
            |d| {
                d["securityLabel"][0]["coding"][0] = json!({
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "XYZ" })
            },
            422,
            "validation-failed",
            "DocumentReference.securityLabel[0].coding[0]",
        ),
        (
            "unknown category",
            |d| {
                d["category"] = json!([{ "coding": [{
                    "system": "https://yiqiao.health/fhir/CodeSystem/document-category", "code": "x" }] }])
            },
            422,
            "validation-failed",
            "DocumentReference.category[0].coding[0]",
        ),
        (
            "negative size",
            |d| d["content"][0]["attachment"]["size"] = json!(-1),
            422,
            "validation-failed",
            "DocumentReference.content[0].attachment.size",
        ),
        (
            "relative location",
            |d| d["content"][0]["attachment"]["url"] = json!("/docs/1"),
            422,
            "validation-failed",
            "DocumentReference.content[0].attachment.url",
        ),
        (
            "no masterIdentifier",
            |d| {
                d.as_object_mut()
                    .unwrap()
                    .remove("masterIdentifier")
                    .map(drop)
                    .unwrap_or(())
            },
            422,
            "validation-failed",
            "DocumentReference.masterIdentifier.value",
        ),
        (
            "replaces an unknown document",
            |d| d["relatesTo"] = json!([{ "code": "replaces", "target": { "reference": "DocumentReference/nope" } }]),
            422,
            "validation-failed",
            "DocumentReference.relatesTo.target",
        ),
        (
            "unknown author institution",
            |d| d["author"] = json!([{ "reference": "Organization/hosp-404" }]),
            422,
            "validation-failed",
            "DocumentReference.author",
        ),
    ];
    for (what, mutate, status, code, field) in cases {
        let mut body = good.clone();
        mutate(&mut body);
        let resp = post_as(&app, 1, "/fhir/DocumentReference", &body).await;
        let outcome = assert_outcome(resp, status, code).await;
        assert_eq!(
            outcome["issue"][0]["expression"][0], field,
            "{what}: {outcome}"
        );
    }
    // No scope, no registration.
    let mut weak = institution(4);
    weak["allowed_scopes"] = json!(["system/Patient.rs"]);
    app.admin_post("/admin/institutions", &weak).await;
    assert_outcome(
        post_as(&app, 4, "/fhir/DocumentReference", &good).await,
        403,
        "forbidden",
    )
    .await;
    // Nothing was stored by any rejected request.
    assert!(search(&app, 1, "").await.is_empty());
    // The good one is accepted, with the enterprise patient and a gateway content URL.
    let stored = register(&app, 1, &good).await;
    assert_eq!(stored["status"], "current");
    let url = stored["content"][0]["attachment"]["url"].as_str().unwrap();
    assert_eq!(
        url,
        format!(
            "{}/fhir/Binary/{}",
            app.base,
            stored["id"].as_str().unwrap()
        )
    );
    assert!(
        stored["subject"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("Patient/")
    );
    let read = get_as(
        &app,
        2,
        &format!("/fhir/DocumentReference/{}", stored["id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(read.status(), 200);
    assert_outcome(
        get_as(&app, 2, "/fhir/DocumentReference/nope").await,
        404,
        "not-found",
    )
    .await;
    app.stop().await;
}

/// A search's answer is encoded while its audit record is written, and never sent without it:
/// with audit inserts failing, the custodian's own search answers 503 and the body holds no
/// document; once audit works again the same search answers with it.
async fn search_fails_closed_without_its_audit_record(backend: Backend) {
    let app = setup(backend, |s| s.audit.write_timeout_ms = 3000).await;
    register(
        &app,
        1,
        &doc(
            1,
            "D-CLOSED",
            "MR-1",
            DISCHARGE,
            "2024-03-01T08:00:00+08:00",
        ),
    )
    .await;
    crate::auditing::break_audit(&app, backend).await;
    let resp = get_as(&app, 1, "/fhir/DocumentReference?_count=5").await;
    let body = assert_outcome(resp, 503, "audit-unavailable").await;
    assert!(!body.to_string().contains("D-CLOSED"), "{body}");
    crate::auditing::mend_audit(&app, backend).await;
    let resp = get_as(&app, 1, "/fhir/DocumentReference?_count=5").await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("D-CLOSED"));
    app.stop().await;
}

async fn registration_is_idempotent_and_bundles_all_or_nothing(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let d1 = doc(1, "D-1", "MR-1", DISCHARGE, "2024-03-01T08:00:00+08:00");
    let first = register(&app, 1, &d1).await;
    let again = post_as(&app, 1, "/fhir/DocumentReference", &d1).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // Same custodian document id with other metadata: conflict, nothing changed.
    let mut changed = d1.clone();
    changed["date"] = json!("2024-03-02T08:00:00+08:00");
    let out = assert_outcome(
        post_as(&app, 1, "/fhir/DocumentReference", &changed).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(
        out["issue"][0]["expression"][0],
        "DocumentReference.masterIdentifier"
    );
    // The same document id at another custodian is another document.
    register(
        &app,
        2,
        &doc(2, "D-1", "MR-9", DISCHARGE, "2024-03-01T09:00:00+08:00"),
    )
    .await;
    assert_eq!(search(&app, 3, "").await.len(), 2);

    // A transaction with one bad entry stores nothing.
    let entry = |r: Value| json!({ "resource": r, "request": { "method": "POST", "url": "DocumentReference" } });
    let mut bad = doc(1, "D-3", "MR-404", LAB, "2024-03-03T08:00:00+08:00");
    bad["subject"]["identifier"]["value"] = json!("MR-404");
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        entry(doc(1, "D-2", "MR-1", LAB, "2024-03-02T08:00:00+08:00")),
        entry(bad),
    ]});
    let out = assert_outcome(
        post_as(&app, 1, "/fhir", &bundle).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(
        out["issue"][0]["expression"][0], "Bundle.entry[1].resource.subject.identifier",
        "{out}"
    );
    assert_eq!(
        search(&app, 3, "").await.len(),
        2,
        "nothing of the failed Bundle is stored"
    );
    // A conflict found inside the transaction (second entry re-uses D-1 with other data).
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        entry(doc(1, "D-2", "MR-1", LAB, "2024-03-02T08:00:00+08:00")),
        entry(changed.clone()),
    ]});
    let out = assert_outcome(post_as(&app, 1, "/fhir", &bundle).await, 409, "conflict").await;
    assert_eq!(
        out["issue"][0]["expression"][0],
        "Bundle.entry[1].resource.masterIdentifier"
    );
    assert_eq!(search(&app, 3, "").await.len(), 2);
    // A good transaction: both stored; replaying it is idempotent.
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        entry(doc(1, "D-2", "MR-1", LAB, "2024-03-02T08:00:00+08:00")),
        entry(doc(1, "D-3", "MR-2", LAB, "2024-03-03T08:00:00+08:00")),
    ]});
    let resp = post_as(&app, 1, "/fhir", &bundle).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "transaction-response");
    assert_eq!(v["entry"][0]["response"]["status"], "201 Created");
    let replay: Value = post_as(&app, 1, "/fhir", &bundle)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(replay["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(
        replay["entry"][1]["resource"]["id"],
        v["entry"][1]["resource"]["id"]
    );
    assert_eq!(search(&app, 3, "").await.len(), 4);
    app.stop().await;
}

async fn replace_chains_supersede(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let a = register(
        &app,
        1,
        &doc(1, "A", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    let a_id = a["id"].as_str().unwrap().to_string();
    let replacing = |doc_id: &str, old: &str| {
        let mut d = doc(1, doc_id, "MR-1", DISCHARGE, "2024-01-02T08:00:00+08:00");
        d["relatesTo"] = json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{old}") } }]);
        d
    };
    let b = register(&app, 1, &replacing("B", &a_id)).await;
    let b_id = b["id"].as_str().unwrap().to_string();
    let c = register(&app, 1, &replacing("C", &b_id)).await;
    let c_id = c["id"].as_str().unwrap().to_string();
    let status_of = |v: &[Value], id: &str| {
        v.iter()
            .find(|d| d["id"] == id)
            .map(|d| d["status"].clone())
            .unwrap()
    };
    let all = search(&app, 2, "").await;
    assert_eq!(status_of(&all, &a_id), "superseded");
    assert_eq!(status_of(&all, &b_id), "superseded");
    assert_eq!(status_of(&all, &c_id), "current");
    let current = search(&app, 2, "status=current").await;
    assert_eq!(current.len(), 1);
    assert_eq!(
        current[0]["relatesTo"][0]["target"]["reference"],
        format!("DocumentReference/{b_id}")
    );
    assert_eq!(
        search(&app, 2, "status=superseded,entered-in-error")
            .await
            .len(),
        2
    );
    // A superseded document cannot be replaced again.
    let out = assert_outcome(
        post_as(&app, 1, "/fhir/DocumentReference", &replacing("D", &a_id)).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(
        out["issue"][0]["expression"][0],
        "DocumentReference.relatesTo.target"
    );
    // Only the custodian can replace.
    let mut foreign = doc(2, "X", "MR-9", DISCHARGE, "2024-01-03T08:00:00+08:00");
    foreign["relatesTo"] = json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{c_id}") } }]);
    assert_outcome(
        post_as(&app, 2, "/fhir/DocumentReference", &foreign).await,
        422,
        "validation-failed",
    )
    .await;
    // Withdrawal: the same document with status entered-in-error.
    let mut withdraw = replacing("C", &b_id);
    withdraw["status"] = json!("entered-in-error");
    let resp = post_as(&app, 1, "/fhir/DocumentReference", &withdraw).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "entered-in-error");
    assert!(search(&app, 2, "status=current").await.is_empty());
    app.stop().await;
}

async fn search_filters_and_paging(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    // 12 documents of 张伟 at hosp-001, 8 at hosp-002, 5 of 李娜 at hosp-001.
    let mut bundle_entries = Vec::new();
    for i in 0..12 {
        let ty = if i % 2 == 0 { DISCHARGE } else { LAB };
        let d = doc(
            1,
            &format!("Z1-{i}"),
            "MR-1",
            ty,
            &format!("2024-01-{:02}T08:00:00+08:00", i + 1),
        );
        bundle_entries.push(
            json!({ "resource": d, "request": { "method": "POST", "url": "DocumentReference" } }),
        );
    }
    for i in 0..5 {
        let d = doc(
            1,
            &format!("L-{i}"),
            "MR-2",
            LAB,
            &format!("2024-02-{:02}T08:00:00+08:00", i + 1),
        );
        bundle_entries.push(
            json!({ "resource": d, "request": { "method": "POST", "url": "DocumentReference" } }),
        );
    }
    let resp = post_as(
        &app,
        1,
        "/fhir",
        &json!({ "resourceType": "Bundle", "type": "transaction", "entry": bundle_entries }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    for i in 0..8 {
        register(
            &app,
            2,
            &doc(
                2,
                &format!("Z2-{i}"),
                "MR-9",
                LAB,
                &format!("2024-03-{:02}T08:00:00+08:00", i + 1),
            ),
        )
        .await;
    }
    // The patient's source record at hosp-001; its documents at both hospitals are found.
    let pix: Value = get_as(
        &app,
        1,
        &format!("/fhir/Patient?identifier={}|MR-1", system(1)),
    )
    .await
    .json()
    .await
    .unwrap();
    let record = pix["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        search(&app, 3, &format!("patient=Patient/{record}&_count=100"))
            .await
            .len(),
        20
    );
    assert_eq!(
        search(
            &app,
            3,
            &format!("patient.identifier={}|MR-9&_count=100", system(2))
        )
        .await
        .len(),
        20
    );
    assert_eq!(
        search(
            &app,
            3,
            &format!("patient.identifier={}|MR-2&_count=100", system(1))
        )
        .await
        .len(),
        5
    );
    assert!(search(&app, 3, "patient=Patient/unknown").await.is_empty());
    // type (with and without system), category, custodian, date.
    assert_eq!(
        search(&app, 3, &format!("type={LOINC}|18842-5&_count=100"))
            .await
            .len(),
        6
    );
    assert_eq!(search(&app, 3, "type=C0007&_count=100").await.len(), 19);
    assert_eq!(
        search(&app, 3, "category=laboratory&_count=100")
            .await
            .len(),
        19
    );
    assert_eq!(
        search(&app, 3, "category=summary&_count=100").await.len(),
        6
    );
    assert_eq!(
        search(&app, 3, "custodian=Organization/hosp-002&_count=100")
            .await
            .len(),
        8
    );
    assert_eq!(search(&app, 3, "date=2024-02&_count=100").await.len(), 5);
    assert_eq!(
        search(&app, 3, "date=ge2024-01-05&date=lt2024-02-01&_count=100")
            .await
            .len(),
        8
    );
    assert_eq!(search(&app, 3, "date=2024-01-03&_count=100").await.len(), 1);
    assert_eq!(
        search(
            &app,
            3,
            &format!(
                "patient=Patient/{record}&type={LOINC}|18842-5&custodian=Organization/hosp-001"
            )
        )
        .await
        .len(),
        6
    );
    // Bad parameters are named.
    for (q, param) in [
        ("date=yesterday", "date"),
        ("status=active", "status"),
        ("_sort=name", "_sort"),
        ("foo=1", "foo"),
        ("_count=0", "_count"),
    ] {
        let out = assert_outcome(
            get_as(&app, 3, &format!("/fhir/DocumentReference?{q}")).await,
            400,
            "invalid-parameter",
        )
        .await;
        assert_eq!(out["issue"][0]["expression"][0], param);
    }
    // Paging: follow next links; every document once, newest first.
    let mut url = app.url("/fhir/DocumentReference?_count=7");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page: Value = get_url_as(&app, 3, &url).await.json().await.unwrap();
        pages += 1;
        for e in page["entry"].as_array().unwrap() {
            seen.push((
                e["resource"]["date"].as_str().unwrap().to_string(),
                e["resource"]["id"].as_str().unwrap().to_string(),
            ));
        }
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
    assert_eq!(pages, 4);
    assert_eq!(seen.len(), 25);
    assert_eq!(seen.iter().map(|s| &s.1).collect::<BTreeSet<_>>().len(), 25);
    let first_date = &seen[0].0;
    assert!(
        first_date.starts_with("2024-03-08"),
        "newest first: {first_date}"
    );
    let asc = search(&app, 3, "_sort=date&_count=1").await;
    assert!(asc[0]["date"].as_str().unwrap().starts_with("2024-01-01"));
    app.stop().await;
}

/// A small content server standing in for a custodian's document endpoint: plain content
/// at `/docs/{id}`.
pub(crate) async fn content_server(
    docs: BTreeMap<String, Vec<u8>>,
) -> (String, actix_web::dev::ServerHandle) {
    content_server_sealing(docs, None).await
}

type Sealing = Option<(yiqiao_sm::Sm2PrivateKey, String)>;

/// [`content_server`], and with `sealing` = (signer, gateway key id) also `/sealed/{id}`: the
/// content in an SM envelope sealed to the gateway key and bound to the request it answers
/// (path, `X-Yiqiao-Requester`, `X-Request-Id`), signed by the signer as hosp-001.
async fn content_server_sealing(
    docs: BTreeMap<String, Vec<u8>>,
    sealing: Sealing,
) -> (String, actix_web::dev::ServerHandle) {
    let state = web::Data::new((docs, sealing));
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route(
                "/docs/{id}",
                web::get().to(
                    |id: web::Path<String>,
                     state: web::Data<(BTreeMap<String, Vec<u8>>, Sealing)>| async move {
                        match state.0.get(id.as_str()) {
                            Some(b) => HttpResponse::Ok()
                                .content_type("application/xml")
                                .body(b.clone()),
                            None => HttpResponse::NotFound().finish(),
                        }
                    },
                ),
            )
            .route("/sealed/{id}", web::get().to(sealed_content))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), handle)
}

async fn sealed_content(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<(BTreeMap<String, Vec<u8>>, Sealing)>,
) -> HttpResponse {
    let (docs, sealing) = state.get_ref();
    let (Some(content), Some((signer, key_id))) = (docs.get(id.as_str()), sealing) else {
        return HttpResponse::NotFound().finish();
    };
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let binding = yiqiao_sm::RequestBinding::new(
        "GET",
        req.uri().path_and_query().unwrap().as_str(),
        &h("x-yiqiao-requester"),
        &h("x-request-id"),
    )
    .unwrap();
    let sender = yiqiao_sm::SenderKeys::new("hosp-001", signer).unwrap();
    let recipient = yiqiao_sm::RecipientKey {
        key_id: key_id.clone(),
        public_key: crate::helpers::test_gateway_key().1.public_key(),
    };
    let sealed = yiqiao_sm::Envelope::seal(
        content,
        "application/xml",
        &sender,
        &recipient,
        &binding,
        chrono::Utc::now(),
    )
    .unwrap();
    HttpResponse::Ok()
        .content_type(yiqiao_sm::ENVELOPE_MEDIA_TYPE)
        .body(sealed.to_json().unwrap())
}

/// hosp-002 retrieves document `id` and gets the content of "GOOD", as registered.
async fn retrieves_good(app: &TestApp, id: &str) {
    let resp = get_as(app, 2, &format!("/fhir/Binary/{id}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/xml");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), content_of("GOOD"));
}

async fn retrieval_checks_the_sm3_hash(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let mut served = BTreeMap::new();
    served.insert("GOOD".to_string(), content_of("GOOD"));
    served.insert(
        "TAMPERED".to_string(),
        b"<ClinicalDocument id=\"EVIL\"/>".to_vec(),
    );
    let (base, server) = content_server(served).await;
    let mut ids = BTreeMap::new();
    for name in ["GOOD", "TAMPERED", "MISSING"] {
        let mut d = doc(1, name, "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
        d["content"][0]["attachment"]["url"] = json!(format!("{base}/docs/{name}"));
        let v = register(&app, 1, &d).await;
        ids.insert(name, v["id"].as_str().unwrap().to_string());
    }
    retrieves_good(&app, &ids["GOOD"]).await;
    assert_outcome(
        get_as(&app, 2, &format!("/fhir/Binary/{}", ids["TAMPERED"])).await,
        502,
        "upstream-integrity",
    )
    .await;
    assert_outcome(
        get_as(&app, 2, &format!("/fhir/Binary/{}", ids["MISSING"])).await,
        502,
        "upstream-unavailable",
    )
    .await;
    server.stop(false).await;
    assert_outcome(
        get_as(&app, 2, &format!("/fhir/Binary/{}", ids["GOOD"])).await,
        502,
        "upstream-unavailable",
    )
    .await;
    assert_outcome(get_as(&app, 2, "/fhir/Binary/nope").await, 404, "not-found").await;
    app.stop().await;
}

/// Retrieval under the federation issue's envelope rules: a custodian's sealed answer is
/// verified against its registered SM2 key and opened before the SM3 check; an answer signed
/// by any other key is refused (502 upstream-integrity) and the refusal is in the audit trail;
/// a requester that asks for an envelope gets the content sealed to its own key, signed by
/// the gateway and bound to its request.
async fn retrieval_in_sm_envelopes(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let custodian = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    let requester = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    for (n, key) in [(1, &custodian), (2, &requester)] {
        let mut inst = institution(n);
        inst["allowed_scopes"] = json!([
            "system/Patient.cruds",
            "system/DocumentReference.cruds",
            "system/Subscription.cruds",
            "system/Consent.cruds"
        ]);
        inst["sm2_keys"] = json!([{ "kid": format!("hosp-{n}-sm2"), "pem": key.public_key().to_spki_pem().unwrap() }]);
        let resp = app
            .admin_put(&format!("/admin/institutions/{}", inst_id(n)), &inst)
            .await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    }
    let key_id = app.state.settings.federation.key_id.clone();
    let served = BTreeMap::from([("GOOD".to_string(), content_of("GOOD"))]);
    let (good_base, good) =
        content_server_sealing(served.clone(), Some((custodian.clone(), key_id.clone()))).await;
    let forger = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    let (forged_base, forged) = content_server_sealing(served, Some((forger, key_id))).await;
    let mut ids = BTreeMap::new();
    for (name, base) in [("GOOD", &good_base), ("FORGED", &forged_base)] {
        let mut d = doc(1, name, "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
        d["content"][0]["attachment"]["url"] = json!(format!("{base}/sealed/GOOD"));
        d["content"][0]["attachment"]["size"] = json!(content_of("GOOD").len());
        d["content"][0]["attachment"]["extension"][0]["valueString"] =
            json!(yiqiao_sm::sm3_hex(&content_of("GOOD")));
        let v = register(&app, 1, &d).await;
        ids.insert(name, v["id"].as_str().unwrap().to_string());
    }

    // Sealed by the custodian: opened, checked, relayed plain to a plain requester.
    retrieves_good(&app, &ids["GOOD"]).await;

    // Signed by a key the directory does not hold: refused and audited.
    let out = assert_outcome(
        get_as(&app, 2, &format!("/fhir/Binary/{}", ids["FORGED"])).await,
        502,
        "upstream-integrity",
    )
    .await;
    assert!(out.to_string().contains("tampered"), "{out}");
    let refusals: Vec<Value> = crate::helpers::audit_rows(&app)
        .into_iter()
        .map(|(_, v)| v)
        .filter(|v| v["outcome"] == "8")
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "the refused content is in the audit trail"
    );
    assert!(
        refusals[0]["outcomeDesc"]
            .as_str()
            .unwrap()
            .contains("hosp-001"),
        "{}",
        refusals[0]
    );

    // The requester asks for an envelope: sealed to its key, bound to its request.
    let path = format!("/fhir/Binary/{}", ids["GOOD"]);
    let resp = app
        .client
        .get(app.url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(2))
        .header("Accept", yiqiao_sm::ENVELOPE_MEDIA_TYPE)
        .header("X-Request-Id", "req-binary-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        yiqiao_sm::ENVELOPE_MEDIA_TYPE
    );
    let envelope = yiqiao_sm::Envelope::from_json(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(envelope.recipient_key_id, "hosp-2-sm2");
    let gateway = crate::helpers::test_gateway_key().1.public_key();
    let binding =
        yiqiao_sm::RequestBinding::new("GET", &path, &inst_id(2), "req-binary-1").unwrap();
    let (payload, content_type) = envelope
        .open(
            &requester,
            &gateway,
            &binding,
            chrono::Utc::now(),
            Duration::from_secs(60),
        )
        .unwrap();
    assert_eq!(content_type, "application/xml");
    assert_eq!(payload, content_of("GOOD"));
    // Bound to that request: the same envelope does not open for another request id.
    let other = yiqiao_sm::RequestBinding::new("GET", &path, &inst_id(2), "req-binary-2").unwrap();
    assert!(
        envelope
            .open(
                &requester,
                &gateway,
                &other,
                chrono::Utc::now(),
                Duration::from_secs(60)
            )
            .is_err()
    );
    good.stop(false).await;
    forged.stop(false).await;
    app.stop().await;
}

/// What the test webhook receiver saw: (idempotency key, event number, attempt, answered 2xx).
#[derive(Default)]
struct Received {
    calls: Vec<(String, i64, i32, bool)>,
    /// Event numbers as requests arrive (before they are answered).
    arrived: Vec<i64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Ok,
    /// Answer 500 to the first `n` attempts of each event.
    FailFirst(i32),
    Always500,
    /// Take this long before answering 200.
    Slow(u64),
}

struct Receiver {
    url: String,
    seen: Arc<Mutex<Received>>,
    behaviour: Arc<Mutex<Behaviour>>,
    handle: actix_web::dev::ServerHandle,
    port: u16,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        Self::start_on(0, behaviour).await
    }

    async fn start_on(port: u16, behaviour: Behaviour) -> Receiver {
        let seen: Arc<Mutex<Received>> = Arc::default();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (s2, b2) = (seen.clone(), behaviour.clone());
        let server = HttpServer::new(move || {
            let (seen, behaviour) = (s2.clone(), b2.clone());
            App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                let (seen, behaviour) = (seen.clone(), behaviour.clone());
                async move {
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    let key = h("idempotency-key");
                    let seq: i64 = h("x-yiqiao-event-number").parse().unwrap_or(-1);
                    let attempt: i32 = h("x-yiqiao-attempt").parse().unwrap_or(-1);
                    let bundle: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    assert_eq!(bundle["type"], "history");
                    seen.lock().unwrap().arrived.push(seq);
                    let b = *behaviour.lock().unwrap();
                    let ok = match b {
                        Behaviour::Ok => true,
                        Behaviour::FailFirst(n) => attempt > n,
                        Behaviour::Always500 => false,
                        Behaviour::Slow(ms) => {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            true
                        }
                    };
                    seen.lock().unwrap().calls.push((key, seq, attempt, ok));
                    if ok {
                        HttpResponse::Ok().finish()
                    } else {
                        HttpResponse::InternalServerError().finish()
                    }
                }
            }))
        })
        .workers(2)
        .bind(("127.0.0.1", port))
        .unwrap();
        let port = server.addrs()[0].port();
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            seen,
            behaviour,
            handle,
            port,
        }
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    /// Event numbers acknowledged (2xx), in arrival order.
    fn acked(&self) -> Vec<i64> {
        self.seen
            .lock()
            .unwrap()
            .calls
            .iter()
            .filter(|c| c.3)
            .map(|c| c.1)
            .collect()
    }

    fn calls(&self) -> Vec<(String, i64, i32, bool)> {
        self.seen.lock().unwrap().calls.clone()
    }

    /// Wait until `n` distinct events were acknowledged; returns every acknowledgement.
    async fn wait_acked(&self, n: usize, within: Duration) -> Vec<i64> {
        let start = Instant::now();
        loop {
            let acked = self.acked();
            let distinct = acked.iter().collect::<BTreeSet<_>>().len();
            if distinct >= n || start.elapsed() > within {
                return acked;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `n` distinct deliveries (idempotency keys: subscription and event) were
    /// acknowledged, for several subscribers receiving the same events.
    async fn wait_acked_keys(&self, n: usize, within: Duration) -> BTreeSet<String> {
        let start = Instant::now();
        loop {
            let keys: BTreeSet<String> = self
                .calls()
                .into_iter()
                .filter(|c| c.3)
                .map(|c| c.0)
                .collect();
            if keys.len() >= n || start.elapsed() > within {
                return keys;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) async fn subscribe(
    app: &TestApp,
    inst: u32,
    endpoint: &str,
    filter: Option<&str>,
) -> String {
    let mut body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "documents of our patients",
        "criteria": TOPIC_DOC,
        "channel": { "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json" },
    });
    if let Some(f) = filter {
        body["_criteria"] = json!({ "extension": [{ "url": FILTER, "valueString": f }] });
    }
    let resp = post_as(app, inst, "/fhir/Subscription", &body).await;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["status"], "active");
    v["id"].as_str().unwrap().to_string()
}

fn param<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .unwrap()
}

/// Poll `$status` until parameter `name` has `value` (or 20 s pass); returns the last status.
async fn wait_status(app: &TestApp, sub: &str, name: &str, value: Value) -> Value {
    let start = Instant::now();
    loop {
        let st: Value = get_as(app, 3, &format!("/fhir/Subscription/{sub}/$status"))
            .await
            .json()
            .await
            .unwrap();
        let p = param(&st, name);
        if p["valueInteger"] == value
            || p["valueString"] == value
            || start.elapsed() > Duration::from_secs(20)
        {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn strictly_increasing(v: &[i64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

async fn deliveries_retry_in_order(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let rx = Receiver::start(Behaviour::FailFirst(2)).await;
    // hosp-003 follows 张伟 (through hosp-002's identifier); a LOINC-only filter gets nothing of lab.
    let sub = subscribe(
        &app,
        3,
        &rx.url,
        Some(&format!(
            "DocumentReference?patient.identifier={}|MR-9",
            system(2)
        )),
    )
    .await;
    let typed = subscribe(
        &app,
        3,
        &rx.url,
        Some(&format!("DocumentReference?type={LOINC}|18842-5")),
    )
    .await;
    // Subscription validation names the field.
    let bad = json!({ "resourceType": "Subscription", "criteria": "Patient?name=x",
        "channel": { "type": "rest-hook", "endpoint": rx.url } });
    let out = assert_outcome(
        post_as(&app, 3, "/fhir/Subscription", &bad).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(out["issue"][0]["expression"][0], "Subscription.criteria");
    for i in 0..4 {
        register(
            &app,
            1,
            &doc(
                1,
                &format!("E-{i}"),
                "MR-1",
                LAB,
                "2024-01-01T08:00:00+08:00",
            ),
        )
        .await;
    }
    register(
        &app,
        1,
        &doc(1, "OTHER", "MR-2", LAB, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    let acked = rx.wait_acked(4, Duration::from_secs(30)).await;
    assert_eq!(acked.len(), 4, "calls {:?}", rx.calls());
    assert!(
        strictly_increasing(&acked),
        "per-subscriber order: {acked:?}"
    );
    let calls = rx.calls();
    for seq in &acked {
        let attempts: Vec<i32> = calls.iter().filter(|c| c.1 == *seq).map(|c| c.2).collect();
        assert_eq!(
            attempts,
            vec![1, 2, 3],
            "event {seq}: two failures, then delivered"
        );
        let keys: BTreeSet<&String> = calls.iter().filter(|c| c.1 == *seq).map(|c| &c.0).collect();
        assert_eq!(
            keys.len(),
            1,
            "one idempotency key per event across retries"
        );
        assert_eq!(**keys.iter().next().unwrap(), format!("{sub}-{seq}"));
    }
    // Never event n+1 before n is acknowledged.
    let mut last_acked = 0;
    for c in &calls {
        assert!(
            c.1 > last_acked,
            "event {} attempted before {} was acknowledged",
            c.1,
            last_acked
        );
        if c.3 {
            last_acked = c.1;
        }
    }
    // The worker records the acknowledgement just after the receiver answered.
    let st = wait_status(&app, &sub, "delivered", json!(4)).await;
    assert_eq!(param(&st, "delivered")["valueInteger"], 4);
    assert_eq!(
        param(&st, "last-acknowledged-event")["valueString"],
        acked[3].to_string()
    );
    let st: Value = get_as(&app, 3, &format!("/fhir/Subscription/{typed}/$status"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        param(&st, "events-since-subscription-start")["valueString"],
        "0"
    );
    // Another institution cannot see the subscription.
    assert_outcome(
        get_as(&app, 1, &format!("/fhir/Subscription/{sub}")).await,
        404,
        "not-found",
    )
    .await;
    app.stop().await;
}

async fn dead_letters_are_visible_and_retryable(backend: Backend) {
    let app = setup(backend, |s| s.subscriptions.max_attempts = 3).await;
    let rx = Receiver::start(Behaviour::Always500).await;
    let sub = subscribe(&app, 3, &rx.url, None).await;
    register(
        &app,
        1,
        &doc(1, "E-1", "MR-1", LAB, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    register(
        &app,
        1,
        &doc(1, "E-2", "MR-1", LAB, "2024-01-02T08:00:00+08:00"),
    )
    .await;
    let start = Instant::now();
    let st = loop {
        let st: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$status"))
            .await
            .json()
            .await
            .unwrap();
        if param(&st, "dead-lettered")["valueInteger"] == 2
            || start.elapsed() > Duration::from_secs(30)
        {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(param(&st, "dead-lettered")["valueInteger"], 2, "{st}");
    let dead = param(&st, "dead-letters")["extension"].as_array().unwrap();
    assert_eq!(dead[0]["extension"][1]["valueInteger"], 3);
    assert!(
        dead[0]["extension"][2]["valueString"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    assert_eq!(rx.calls().len(), 6, "three attempts per event, no more");
    // Catch-up lists both events after the last acknowledged (none).
    let ev: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$events"))
        .await
        .json()
        .await
        .unwrap();
    let events = ev["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .count();
    assert_eq!(events, 2);
    // The receiver is fixed; an operator requeues the dead letters.
    rx.set(Behaviour::Ok);
    let resp = post_as(
        &app,
        3,
        &format!("/fhir/Subscription/{sub}/$retry-dead"),
        &json!({}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let acked = rx.wait_acked(2, Duration::from_secs(20)).await;
    assert_eq!(acked.len(), 2);
    assert!(strictly_increasing(&acked));
    app.stop().await;
}

async fn receiver_down_then_up_and_slow(backend: Backend) {
    let app = setup(backend, |s| s.subscriptions.request_timeout_ms = 500).await;
    let rx = Receiver::start(Behaviour::Slow(1500)).await;
    let proxy = Proxy::start(([127, 0, 0, 1], rx.port).into()).await;
    let endpoint = format!("http://127.0.0.1:{}/hook", proxy.addr.port());
    let sub = subscribe(&app, 3, &endpoint, None).await;
    proxy.down().await;
    for i in 0..3 {
        register(
            &app,
            1,
            &doc(
                1,
                &format!("E-{i}"),
                "MR-1",
                LAB,
                "2024-01-01T08:00:00+08:00",
            ),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(rx.acked().is_empty());
    // The subscriber catches up through the API while its endpoint is down.
    let ev: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$events"))
        .await
        .json()
        .await
        .unwrap();
    let numbers: Vec<String> = ev["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| p["part"][0]["valueString"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(numbers.len(), 3);
    // Up again, but slower than the request timeout: attempts time out and are retried.
    proxy.up();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.acked().is_empty() || rx.calls().iter().any(|c| c.2 > 1));
    rx.set(Behaviour::Ok);
    let acked = rx.wait_acked(3, Duration::from_secs(30)).await;
    // The slow receiver may have answered 200 to a timed-out attempt: at least once, in order.
    let distinct: BTreeSet<i64> = acked.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "{acked:?}");
    let mut sorted = acked.clone();
    sorted.sort();
    assert_eq!(acked, sorted, "in order: {acked:?}");
    let st: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$status"))
        .await
        .json()
        .await
        .unwrap();
    let start = Instant::now();
    let mut delivered = param(&st, "delivered")["valueInteger"].clone();
    while delivered != 3 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$status"))
            .await
            .json()
            .await
            .unwrap();
        delivered = param(&st, "delivered")["valueInteger"].clone();
    }
    assert_eq!(delivered, 3);
    // Caught up: nothing after the last acknowledged event.
    let ev: Value = get_as(&app, 3, &format!("/fhir/Subscription/{sub}/$events"))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        !ev["entry"][0]["resource"]["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "notification-event")
    );
    app.stop().await;
}

async fn two_replicas_never_deliver_the_same_attempt(backend: Backend) {
    let first = setup(backend, |s| s.subscriptions.claim_batch = 4).await;
    let db_url = first.state.settings.database.url.expose().to_string();
    let mut settings = test_settings(&db_url);
    delivery_settings(&mut settings);
    settings.subscriptions.claim_batch = 4;
    let second = TestApp::spawn_on(TestDb::shared(&db_url), settings).await;
    let rx = Receiver::start(Behaviour::Ok).await;
    let mut subs = Vec::new();
    for _ in 0..4 {
        subs.push(subscribe(&first, 3, &rx.url, None).await);
    }
    let bodies: Vec<(usize, Value)> = (0..2)
        .flat_map(|k| {
            (0..10).map(move |i| {
                let d = doc(
                    1,
                    &format!("R{k}-{i}"),
                    "MR-1",
                    LAB,
                    "2024-01-01T08:00:00+08:00",
                );
                (k, d)
            })
        })
        .collect();
    let apps = [&first, &second];
    let tasks: Vec<_> = bodies
        .iter()
        .map(|(k, d)| post_as(apps[*k], 1, "/fhir/DocumentReference", d))
        .collect();
    for resp in futures::future::join_all(tasks).await {
        assert_eq!(resp.status(), 201);
    }
    // 4 subscribers × the same 20 events: count deliveries, not event numbers.
    let acked = rx.wait_acked_keys(80, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = rx.calls();
    assert_eq!(acked.len(), 80, "4 subscribers × 20 events");
    let mut pairs = BTreeSet::new();
    for (key, _, attempt, _) in &calls {
        assert!(
            pairs.insert((key.clone(), *attempt)),
            "attempt {attempt} of {key} delivered twice"
        );
    }
    assert_eq!(
        calls.len(),
        80,
        "every event delivered exactly once with fast acks"
    );
    for sub in &subs {
        let mine: Vec<i64> = calls
            .iter()
            .filter(|c| c.0.starts_with(sub.as_str()))
            .map(|c| c.1)
            .collect();
        assert_eq!(mine.len(), 20);
        assert!(
            strictly_increasing(&mine),
            "per-subscriber order across replicas: {mine:?}"
        );
    }
    second.stop().await;
    first.stop().await;
}

fn opt_in(s: &mut Settings) {
    s.consent.policy.default_mode = yiqiao_consent::DefaultMode::OptIn;
}

/// The EMPI source record id of hospital `inst`'s patient `local`.
async fn record_id(app: &TestApp, inst: u32, local: &str) -> String {
    let v: Value = get_as(
        app,
        inst,
        &format!("/fhir/Patient?identifier={}|{local}", system(inst)),
    )
    .await
    .json()
    .await
    .unwrap();
    v["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no record for {local}: {v}"))
        .to_string()
}

/// A consent of the patient with source record `record`, recorded by hosp-001, for hosp-003.
fn consent_for_hosp3(record: &str, kind: &str, class: Option<(&str, &str)>) -> Value {
    let mut c = json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{record}") },
        "provision": {
            "type": kind,
            "actor": [{
                "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
                "reference": { "reference": "Organization/hosp-003" },
            }],
        },
    });
    if let Some((system, code)) = class {
        c["provision"]["class"] = json!([{ "system": system, "code": code }]);
    }
    c
}

/// A steward records the consent: a member may not name another institution as a permit's
/// actor (docs/consent.md).
async fn record_consent(app: &TestApp, body: &Value) -> Value {
    let resp = app
        .client
        .post(app.url("/fhir/Consent"))
        .bearer_auth(crate::consent::STEWARD_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{v}");
    v
}

/// Every page of a search as `inst`: (ids per page, next-link `_offset`s).
async fn pages(app: &TestApp, inst: u32, query: &str) -> (Vec<Vec<String>>, Vec<String>) {
    let mut url = app.url(&format!("/fhir/DocumentReference?{query}"));
    let (mut out, mut offsets) = (Vec::new(), Vec::new());
    loop {
        let v: Value = get_url_as(app, inst, &url).await.json().await.unwrap();
        let ids: Vec<String> = v["entry"]
            .as_array()
            .unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|e| {
                e["resource"]["masterIdentifier"]["value"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        out.push(ids);
        let next = v["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(n) => {
                let at = n
                    .split("_offset=")
                    .nth(1)
                    .unwrap()
                    .split('&')
                    .next()
                    .unwrap();
                offsets.push(at.to_string());
                url = n;
            }
            None => return (out, offsets),
        }
        assert!(out.len() < 20, "paging does not end");
    }
}

/// (consent_decision, outcome, entities as JSON text) of the audit records, oldest first.
fn audit_decisions(app: &TestApp) -> Vec<(Option<String>, String, String)> {
    crate::helpers::audit_rows(app)
        .into_iter()
        .map(|(d, v)| {
            (
                d,
                v["outcome"].as_str().unwrap_or("").to_string(),
                v["entity"].to_string(),
            )
        })
        .collect()
}

/// Opt-in region. hosp-003 treats nobody here: without a consent it sees none of hosp-001's
/// documents (search, read, content), the custodian sees all of its own; a permit opens 张伟's
/// documents and pages are filled past 李娜's withheld ones; a deny for one document type
/// overrides the permit for that type; revocation closes them again on the next request.
async fn documents_obey_consent(backend: Backend) {
    let app = setup(backend, opt_in).await;
    // Interleaved by date: even = 李娜 (lab), odd = 张伟 (discharge; the last one a lab report).
    for i in 0..8 {
        let (local, ty) = match i {
            7 => ("MR-1", LAB),
            i if i % 2 == 1 => ("MR-1", DISCHARGE),
            _ => ("MR-2", LAB),
        };
        let d = doc(
            1,
            &format!("C-{i}"),
            local,
            ty,
            &format!("2024-01-0{}T08:00:00+08:00", i + 1),
        );
        register(&app, 1, &d).await;
    }
    let mine = search(&app, 1, "_count=50").await;
    assert_eq!(mine.len(), 8, "the custodian sees its own documents");
    assert!(search(&app, 3, "_count=50").await.is_empty());
    let zhang_doc = mine
        .iter()
        .find(|d| d["masterIdentifier"]["value"] == "C-1")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = assert_outcome(
        get_as(&app, 3, &format!("/fhir/DocumentReference/{zhang_doc}")).await,
        403,
        "consent-denied",
    )
    .await;
    assert!(out.to_string().contains("opt-in"), "names the rule: {out}");
    assert_outcome(
        get_as(&app, 3, &format!("/fhir/Binary/{zhang_doc}")).await,
        403,
        "consent-denied",
    )
    .await;
    // Every refusal is audited with its decision, before the answer.
    let rows = audit_decisions(&app);
    let refused: Vec<_> = rows
        .iter()
        .filter(|(d, o, _)| d.as_deref() == Some("deny") && o == "4")
        .map(|(_, _, w)| w.clone())
        .collect();
    for what in [
        format!("DocumentReference/{zhang_doc}"),
        format!("Binary/{zhang_doc}"),
    ] {
        assert!(
            refused.iter().any(|e| e.contains(&what)),
            "{what}: {rows:?}"
        );
    }

    let zhang = record_id(&app, 1, "MR-1").await;
    let permit = record_consent(&app, &consent_for_hosp3(&zhang, "permit", None)).await;
    let (pages_seen, offsets) = pages(&app, 3, "_count=2&_sort=date").await;
    assert_eq!(
        pages_seen,
        vec![vec!["C-1", "C-3"], vec!["C-5", "C-7"]],
        "full pages of 张伟's documents only"
    );
    assert_eq!(
        offsets,
        vec!["4"],
        "the next page starts after the last document read"
    );
    let resp = get_as(&app, 3, &format!("/fhir/DocumentReference/{zhang_doc}")).await;
    assert_eq!(resp.status(), 200);

    // A deny for lab reports overrides the permit for that type only.
    let deny = record_consent(
        &app,
        &consent_for_hosp3(&zhang, "deny", Some((WST500, "C0007"))),
    )
    .await;
    let seen: Vec<Value> = search(&app, 3, "_count=50").await;
    let ids: BTreeSet<&str> = seen
        .iter()
        .map(|d| d["masterIdentifier"]["value"].as_str().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from(["C-1", "C-3", "C-5"]));
    assert!(deny["id"].is_string());

    // Revocation of the permit: nothing on the next request.
    let mut revoked = permit.clone();
    revoked["status"] = json!("inactive");
    let resp = app
        .client
        .put(app.url(&format!("/fhir/Consent/{}", permit["id"].as_str().unwrap())))
        .bearer_auth(crate::consent::STEWARD_TOKEN)
        .header("If-Match", "W/\"1\"")
        .json(&revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(search(&app, 3, "_count=50").await.is_empty());
    app.stop().await;
}

/// A subscriber learns nothing it could not query: hosp-003's subscription to every document
/// gets only the documents a consent lets it see; the withheld event is audited as denied,
/// counted in `$status` and absent from `$events`.
async fn notifications_obey_consent(backend: Backend) {
    let app = setup(backend, opt_in).await;
    let rx = Receiver::start(Behaviour::Ok).await;
    let sub = subscribe(&app, 3, &rx.url, None).await;
    register(
        &app,
        1,
        &doc(1, "N-0", "MR-1", LAB, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    // N-0 is decided (withheld) before any consent exists.
    let st = wait_status(&app, &sub, "withheld", json!(1)).await;
    assert_eq!(param(&st, "withheld")["valueInteger"], 1, "{st}");
    let zhang = record_id(&app, 1, "MR-1").await;
    record_consent(&app, &consent_for_hosp3(&zhang, "permit", None)).await;
    register(
        &app,
        1,
        &doc(1, "N-1", "MR-1", LAB, "2024-01-02T08:00:00+08:00"),
    )
    .await;
    let acked = rx.wait_acked(1, Duration::from_secs(30)).await;
    assert_eq!(acked.len(), 1, "{:?}", rx.calls());
    let st = wait_status(
        &app,
        &sub,
        "last-acknowledged-event",
        json!(acked[0].to_string()),
    )
    .await;
    assert_eq!(param(&st, "withheld")["valueInteger"], 1, "{st}");
    let events: Value = get_as(
        &app,
        3,
        &format!("/fhir/Subscription/{sub}/$events?eventsSinceNumber=0"),
    )
    .await
    .json()
    .await
    .unwrap();
    let listed = events["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .count();
    assert_eq!(listed, 1, "only the permitted event is listed: {events}");
    let rows = audit_decisions(&app);
    assert!(
        rows.iter().any(|(d, o, w)| d.as_deref() == Some("deny")
            && o == "4"
            && w.contains(&format!("Subscription/{sub}"))),
        "the withheld notification is audited: {rows:?}"
    );
    rx.handle.stop(false).await;
    app.stop().await;
}

/// An EMPI merge notifies subscribers to the patient-merge topic (stored with the merge in one
/// transaction) and makes the merged-away person's consents apply to the survivor; unmerge
/// takes them back.
async fn merges_notify_and_move_consents(backend: Backend) {
    let app = setup(backend, opt_in).await;
    // 王芳 at hosp-002 with no resident ID: a separate person from 张伟 until merged.
    let wang = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system(2), "value": "MR-W" }],
        "name": [{ "text": "王芳" }],
        "gender": "female",
        "birthDate": "1990-07-01",
    });
    let resp = post_as(&app, 2, "/fhir/Patient", &wang).await;
    assert!(resp.status().is_success());
    register(
        &app,
        1,
        &doc(1, "M-0", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    let rx = Receiver::start(Behaviour::Ok).await;
    let merge_sub = {
        let body = json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "merges of our patients",
            "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/patient-merge",
            "channel": { "type": "rest-hook", "endpoint": rx.url, "payload": "application/fhir+json" },
        });
        let resp = post_as(&app, 2, "/fhir/Subscription", &body).await;
        let v: Value = resp.json().await.unwrap();
        v["id"].as_str().unwrap().to_string()
    };
    let wang_record = record_id(&app, 2, "MR-W").await;
    let zhang_record = record_id(&app, 1, "MR-1").await;
    let person_of = |v: Value| {
        v["extension"][0]["valueIdentifier"]["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let wang_person = person_of(
        get_as(&app, 2, &format!("/fhir/Patient/{wang_record}"))
            .await
            .json()
            .await
            .unwrap(),
    );
    let zhang_person = person_of(
        get_as(&app, 1, &format!("/fhir/Patient/{zhang_record}"))
            .await
            .json()
            .await
            .unwrap(),
    );
    assert_ne!(wang_person, zhang_person);
    // A permit recorded for 王芳 (by hosp-002's record) does not open 张伟's documents ...
    let permit = consent_for_hosp3(&wang_record, "permit", None);
    record_consent(&app, &permit).await;
    assert!(search(&app, 3, "_count=50").await.is_empty());
    // ... until 王芳 is merged into 张伟: then it applies to the survivor.
    let resp = app
        .admin_post(
            &format!("/empi/persons/{zhang_person}/$merge"),
            &json!({ "source": wang_person }),
        )
        .await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let seen = search(&app, 3, "_count=50").await;
    assert_eq!(seen.len(), 1, "the merged person's consent applies");
    // hosp-002 holds a record of the merged person: notified.
    let acked = rx.wait_acked(1, Duration::from_secs(30)).await;
    assert_eq!(acked.len(), 1, "{:?}", rx.calls());
    assert!(rx.calls()[0].0.starts_with(&merge_sub), "{:?}", rx.calls());
    let resp = app
        .admin_post(
            &format!("/empi/persons/{zhang_person}/$unmerge"),
            &json!({ "source": wang_person }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(
        search(&app, 3, "_count=50").await.is_empty(),
        "unmerge takes the consent back"
    );
    let acked = rx.wait_acked(2, Duration::from_secs(30)).await;
    assert_eq!(
        acked.iter().collect::<BTreeSet<_>>().len(),
        2,
        "unmerge notified too"
    );
    rx.handle.stop(false).await;
    app.stop().await;
}

/// Rule 6 at the document exits: an internet hospital sees another hospital's documents about
/// a patient only while it has a consent naming it or an active encounter with the patient
/// (registered through `POST /fhir/Encounter`); once the visit is finished, no longer.
async fn internet_hospital_needs_a_care_relationship(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let mut ih = institution(4);
    ih["kind"] = json!("internet_hospital");
    ih["allowed_scopes"] = json!([
        "system/Patient.cruds",
        "system/DocumentReference.cruds",
        "system/Encounter.cruds"
    ]);
    let resp = app.admin_post("/admin/institutions", &ih).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    // The platform's own record of 张伟 (same resident ID: the same enterprise person).
    let patient = json!({
        "resourceType": "Patient",
        "identifier": [
            { "system": system(4), "value": "IH-1" },
            { "system": RID_SYSTEM, "value": rid(11) },
        ],
        "name": [{ "text": "张伟" }],
        "gender": "male",
        "birthDate": "1980-03-15",
    });
    assert!(
        post_as(&app, 4, "/fhir/Patient", &patient)
            .await
            .status()
            .is_success()
    );
    register(
        &app,
        1,
        &doc(1, "IH-DOC", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    let query = format!("patient.identifier={}|IH-1", system(4));
    assert!(
        search(&app, 4, &query).await.is_empty(),
        "no relationship, nothing"
    );
    // An online consultation in progress.
    let start = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let mut visit = json!({
        "resourceType": "Encounter",
        "identifier": [{ "system": "urn:visit:4", "value": "V-1" }],
        "status": "in-progress",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR" },
        "subject": { "identifier": { "system": system(4), "value": "IH-1" } },
        "period": { "start": start },
    });
    let resp = post_as(&app, 4, "/fhir/Encounter", &visit).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    let seen = search(&app, 4, &query).await;
    assert_eq!(seen.len(), 1, "an active encounter is a care relationship");
    // Finished a minute ago: the relationship is over.
    visit["status"] = json!("finished");
    visit["period"]["end"] =
        json!((chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339());
    let resp = post_as(&app, 4, "/fhir/Encounter", &visit).await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    assert!(
        search(&app, 4, &query).await.is_empty(),
        "finished visit, nothing"
    );
    app.stop().await;
}

on_both_backends!(
    search_fails_closed_without_its_audit_record,
    registration_is_validated,
    retrieval_in_sm_envelopes,
    internet_hospital_needs_a_care_relationship,
    documents_obey_consent,
    notifications_obey_consent,
    merges_notify_and_move_consents,
    registration_is_idempotent_and_bundles_all_or_nothing,
    replace_chains_supersede,
    search_filters_and_paging,
    retrieval_checks_the_sm3_hash,
    deliveries_retry_in_order,
    dead_letters_are_visible_and_retryable,
    receiver_down_then_up_and_slow,
    two_replicas_never_deliver_the_same_attempt,
    kill_minus_nine_mid_delivery_loses_nothing,
);

/// The real binary serving on `port` (killed when dropped).
fn spawn_gateway(dir: &TempDir, db_url: &str, port: u16) -> tokio::process::Child {
    let mut cmd = wait::command(env!("CARGO_BIN_EXE_yiqiao"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("YIQIAO_DATA_DIR", &dir.path)
        .env("YIQIAO_DATABASE_URL", db_url)
        .env("YIQIAO_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("YIQIAO_LOG__LEVEL", "warn")
        .env("YIQIAO_OUTBOUND__ALLOW_HTTP", "true")
        .env("YIQIAO_OUTBOUND__ALLOW_CIDRS", r#"["127.0.0.0/8"]"#)
        .env("YIQIAO_SUBSCRIPTIONS__LEASE_MS", "3000")
        .env("YIQIAO_SUBSCRIPTIONS__REQUEST_TIMEOUT_MS", "2500")
        .env("YIQIAO_SUBSCRIPTIONS__POLL_INTERVAL_MS", "100")
        .env("YIQIAO_SUBSCRIPTIONS__BACKOFF_INITIAL_MS", "100")
        .env("YIQIAO_SUBSCRIPTIONS__BACKOFF_MAX_MS", "300")
        .current_dir(&dir.path)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    wait::spawn(&mut cmd, "`yiqiao serve`")
}

/// The real binary is killed with SIGKILL while a notification is in flight; after a restart
/// every event reaches the subscriber, in order.
async fn kill_minus_nine_mid_delivery_loses_nothing(backend: Backend) {
    let dir = TempDir::new();
    let db = TestDb::new(backend);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = spawn_gateway(&dir, &db.url, port);
    let client = crate::helpers::client();
    let base = format!("http://127.0.0.1:{port}");
    wait::ready(&client, &base, "`yiqiao serve`").await;
    let as_inst = |req: reqwest::RequestBuilder, n: u32| {
        req.bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", inst_id(n))
    };
    for i in 1..=3 {
        let mut inst = institution(i);
        inst["allowed_scopes"] = json!([
            "system/Patient.cruds",
            "system/DocumentReference.cruds",
            "system/Subscription.cruds",
            "system/Consent.cruds"
        ]);
        let r = client
            .post(format!("{base}/admin/institutions"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&inst)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let patient = json!({ "resourceType": "Patient", "identifier": [{ "system": system(1), "value": "MR-1" }],
        "name": [{ "text": "张伟" }], "gender": "male", "birthDate": "1980-03-15" });
    let r = as_inst(client.post(format!("{base}/fhir/Patient")), 1)
        .json(&patient)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Slow subscriber: each notification takes 1.5 s to acknowledge.
    let rx = Receiver::start(Behaviour::Slow(1500)).await;
    let sub = json!({ "resourceType": "Subscription", "criteria": TOPIC_DOC,
        "channel": { "type": "rest-hook", "endpoint": rx.url } });
    let r = as_inst(client.post(format!("{base}/fhir/Subscription")), 3)
        .json(&sub)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for i in 0..5 {
        let r = as_inst(client.post(format!("{base}/fhir/DocumentReference")), 1)
            .json(&doc(
                1,
                &format!("K-{i}"),
                "MR-1",
                LAB,
                "2024-01-01T08:00:00+08:00",
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // Wait until the first notification is in flight (arrived, not yet answered), then kill -9.
    let start = Instant::now();
    while rx.seen.lock().unwrap().arrived.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no notification arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        rx.acked().is_empty(),
        "the first notification is still in flight"
    );
    wait::kill(&mut child, "`yiqiao serve`").await; // SIGKILL
    let before = rx.acked();
    assert!(
        before.len() < 5,
        "killed before everything was delivered: {before:?}"
    );
    // Restart: the orphaned lease expires and the new process delivers the rest.
    let mut child = spawn_gateway(&dir, &db.url, port);
    wait::ready(&client, &base, "the restarted `yiqiao serve`").await;
    rx.set(Behaviour::Ok);
    let acked = rx.wait_acked(5, Duration::from_secs(40)).await;
    let distinct: BTreeSet<i64> = acked.iter().copied().collect();
    assert_eq!(
        distinct,
        (1..=5).collect::<BTreeSet<i64>>(),
        "no event lost: {acked:?}"
    );
    let mut sorted = acked.clone();
    sorted.sort();
    assert_eq!(acked, sorted, "order kept across the crash: {acked:?}");
    wait::kill(&mut child, "the restarted `yiqiao serve`").await;
    rx.handle.stop(false).await;
}
