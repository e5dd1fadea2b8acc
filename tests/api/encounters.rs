//! Care relationships (registered encounters) on both backends: FHIR registration, idempotency,
//! validation, updates, scopes and audit; the HL7 v2 A01/A04 → A03/A11 lifecycle through
//! python-hl7's MLLP client; and `active_for_persons` after an EMPI merge.

use chrono::NaiveDateTime;
use serde_json::{Value, json};
use yiqiao_registry::empi::store as empi;
use yiqiao_registry::encounters::{self, CareRelationship, EncounterClass, EncounterStatus};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, institution};
use crate::mllp::{allow, assert_ack, assert_nak, send_async};
use crate::on_both_backends;

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

fn inst_id(n: u32) -> String {
    format!("hosp-{n:03}")
}

fn t(s: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap()
}

/// Institutions 1..=3 (2 is an internet hospital); 3 may create encounters but not update them.
async fn setup(backend: Backend, adjust: impl FnOnce(&mut yiqiao_gateway::Settings)) -> TestApp {
    let app = TestApp::spawn_with(backend, adjust).await;
    for n in 1..=3 {
        let mut inst = institution(n);
        inst["allowed_scopes"] = if n == 3 {
            json!(["system/Patient.cruds", "system/Encounter.c"])
        } else {
            json!(["system/Patient.cruds", "system/Encounter.cruds"])
        };
        if n == 2 {
            inst["kind"] = json!("internet_hospital");
        }
        assert_eq!(
            app.admin_post("/admin/institutions", &inst).await.status(),
            201
        );
    }
    app
}

async fn send_as(
    app: &TestApp,
    inst: u32,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut req = app
        .client
        .request(method, app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst));
    if let Some(b) = body {
        req = req.json(b);
    }
    req.send().await.unwrap()
}

async fn post(app: &TestApp, inst: u32, path: &str, body: &Value) -> reqwest::Response {
    send_as(app, inst, reqwest::Method::POST, path, Some(body)).await
}

async fn register_patient(app: &TestApp, inst: u32, mrn: &str, name: &str, birth: &str) {
    let patient = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system(inst), "value": mrn }],
        "name": [{ "text": name }],
        "gender": "female",
        "birthDate": birth,
    });
    let resp = post(app, inst, "/fhir/Patient", &patient).await;
    assert!(resp.status().is_success(), "{}", resp.status());
}

/// The enterprise person of a registered patient identifier.
async fn person(app: &TestApp, inst: u32, mrn: &str) -> String {
    let store = app.state.store.clone();
    let mrn = mrn.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        empi::find_by_identifier(&mut conn, &system(inst), &mrn)
            .unwrap()
            .unwrap()
            .link
            .unwrap()
            .person_id
    })
    .await
    .unwrap()
}

async fn active(app: &TestApp, persons: &[&str], at: NaiveDateTime) -> Vec<CareRelationship> {
    let store = app.state.store.clone();
    let persons: Vec<String> = persons.iter().map(|p| p.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        encounters::active_for_persons(&mut conn, &persons, at).unwrap()
    })
    .await
    .unwrap()
}

async fn stored(app: &TestApp, inst: u32, visit: &str) -> Option<encounters::StoredEncounter> {
    let store = app.state.store.clone();
    let visit = visit.to_string();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        encounters::find(&mut conn, &inst_id(inst), &visit).unwrap()
    })
    .await
    .unwrap()
}

async fn encounter_count(app: &TestApp) -> i64 {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::encounters as enc_t;
        let mut conn = store.conn().unwrap();
        enc_t::table.count().get_result(&mut *conn).unwrap()
    })
    .await
    .unwrap()
}

fn encounter(inst: u32, visit: &str, mrn: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "identifier": [{ "system": format!("urn:visit:{inst}"), "value": visit }],
        "status": "in-progress",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR" },
        "subject": { "identifier": { "system": system(inst), "value": mrn } },
        "period": { "start": "2026-11-29T08:00:00+08:00" },
    })
}

async fn registration_idempotency_validation_and_updates(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    register_patient(&app, 2, "IH-1", "王芳", "1990-01-02").await;
    register_patient(&app, 1, "MR-1", "赵丽", "1971-07-09").await;
    register_patient(&app, 3, "C-1", "孙敏", "1965-03-04").await;
    let p = person(&app, 2, "IH-1").await;

    // Registration: 201 with id, version 1, Location; serviceProvider set to the caller.
    let body = encounter(2, "V-1", "IH-1");
    let resp = post(&app, 2, "/fhir/Encounter", &body).await;
    assert_eq!(resp.status(), 201);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(location.ends_with(&format!("/fhir/Encounter/{id}")));
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(
        created["serviceProvider"]["reference"],
        "Organization/hosp-002"
    );
    assert_eq!(created["status"], "in-progress");
    assert!(
        created["subject"]["reference"]
            .as_str()
            .unwrap()
            .starts_with("Patient/")
    );
    assert_eq!(created["subject"]["identifier"]["value"], "IH-1");

    // Idempotent: the same again (also with serviceProvider given) stores nothing new.
    let mut same = body.clone();
    same["serviceProvider"] = json!({ "reference": "Organization/hosp-002" });
    for b in [&body, &same] {
        let resp = post(&app, 2, "/fhir/Encounter", b).await;
        assert_eq!(resp.status(), 200);
        let again: Value = resp.json().await.unwrap();
        assert_eq!(again["id"], id.as_str());
        assert_eq!(again["meta"]["versionId"], "1");
    }
    assert_eq!(encounter_count(&app).await, 1);

    // Read: the registering institution only.
    let resp = send_as(
        &app,
        2,
        reqwest::Method::GET,
        &format!("/fhir/Encounter/{id}"),
        None,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let read: Value = resp.json().await.unwrap();
    assert_eq!(read, created);
    let other = send_as(
        &app,
        1,
        reqwest::Method::GET,
        &format!("/fhir/Encounter/{id}"),
        None,
    )
    .await;
    assert_outcome(other, 404, "not-found").await;
    // GET on the type is still the federated search (it needs patient), not a 405.
    let fed = send_as(&app, 2, reqwest::Method::GET, "/fhir/Encounter", None).await;
    let out = assert_outcome(fed, 400, "invalid-parameter").await;
    assert!(out.to_string().contains("patient"), "{out}");

    // Validation errors name the field; nothing is stored. Each case: one edit of a valid body
    // (a JSON pointer and its new value; null removes the element).
    let edits: [(&str, Value, &str); 15] = [
        ("/identifier", Value::Null, "Encounter.identifier"),
        (
            "/identifier",
            json!([{ "system": "urn:x" }]),
            "Encounter.identifier",
        ),
        ("/period", Value::Null, "Encounter.period"),
        ("/period/start", Value::Null, "Encounter.period.start"),
        (
            "/period/start",
            json!("2026-11-29T08:00:00"),
            "Encounter.period.start",
        ),
        (
            "/period/end",
            json!("2026-11-29T07:00:00+08:00"),
            "Encounter.period.end",
        ),
        ("/status", json!("finished"), "Encounter.period.end"),
        (
            "/subject/identifier/value",
            json!("NOBODY"),
            "Encounter.subject.identifier",
        ),
        (
            "/subject/identifier/system",
            json!(system(1)),
            "Encounter.subject.identifier.system",
        ),
        ("/subject", Value::Null, "Encounter.subject.identifier"),
        (
            "/serviceProvider",
            json!({ "reference": "Organization/hosp-001" }),
            "Encounter.serviceProvider",
        ),
        ("/status", json!("triaged"), "Encounter.status"),
        ("/class/code", json!("HH"), "Encounter.class.code"),
        (
            "/class/system",
            json!("urn:other"),
            "Encounter.class.system",
        ),
        (
            "/resourceType",
            json!("Observation"),
            "Encounter.resourceType",
        ),
    ];
    let mut cases: Vec<(Value, &str)> = Vec::new();
    for (pointer, value, field) in edits {
        let mut b = encounter(2, "V-2", "IH-1");
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        let target = b.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        if value.is_null() {
            target.remove(key);
        } else {
            target.insert(key.to_string(), value);
        }
        cases.push((b, field));
    }
    for (bad, field) in cases {
        let resp = post(&app, 2, "/fhir/Encounter", &bad).await;
        let out = assert_outcome(resp, 422, "validation-failed").await;
        assert_eq!(out["issue"][0]["expression"][0], field, "{bad}");
    }
    assert_eq!(encounter_count(&app).await, 1);
    // No Encounter scope: 403.
    let mut no_scope = institution(4);
    no_scope["allowed_scopes"] = json!(["system/Patient.cruds"]);
    app.admin_post("/admin/institutions", &no_scope).await;
    let resp = post(&app, 4, "/fhir/Encounter", &encounter(4, "V-1", "X")).await;
    assert_outcome(resp, 403, "forbidden").await;

    // The care relationship counts while it is in progress.
    assert_eq!(
        active(&app, &[&p], t("2026-11-29 01:00:00")).await,
        vec![(p.clone(), "hosp-002".into(), t("2026-11-29 00:00:00"), None)]
    );
    assert!(
        active(&app, &[&p], t("2026-11-28 23:59:59"))
            .await
            .is_empty()
    );

    // Update to finished: a new version, the relationship ends with the period.
    let mut finished = read.clone();
    finished["status"] = json!("finished");
    finished["period"]["end"] = json!("2026-11-29T09:30:00+08:00");
    let path = format!("/fhir/Encounter/{id}");
    let resp = send_as(&app, 2, reqwest::Method::PUT, &path, Some(&finished)).await;
    assert_eq!(resp.status(), 200);
    let updated: Value = resp.json().await.unwrap();
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["status"], "finished");
    assert_eq!(updated["period"]["end"], "2026-11-29T09:30:00+08:00");
    // The same PUT again changes nothing.
    let resp = send_as(&app, 2, reqwest::Method::PUT, &path, Some(&finished)).await;
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["meta"]["versionId"], "2");
    assert_eq!(
        active(&app, &[&p], t("2026-11-29 01:30:00")).await,
        vec![(
            p.clone(),
            "hosp-002".into(),
            t("2026-11-29 00:00:00"),
            Some(t("2026-11-29 01:30:00"))
        )]
    );
    assert!(
        active(&app, &[&p], t("2026-11-29 01:30:01"))
            .await
            .is_empty()
    );
    // If-Match with a stale version: 412; a changed visit number or id: 422; others': 404.
    let mut reopened = finished.clone();
    reopened["status"] = json!("in-progress");
    let resp = app
        .client
        .put(app.url(&path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-002")
        .header("If-Match", "W/\"1\"")
        .json(&reopened)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 412, "version-conflict").await;
    let mut renumbered = finished.clone();
    renumbered["identifier"][0]["value"] = json!("V-9");
    let resp = send_as(&app, 2, reqwest::Method::PUT, &path, Some(&renumbered)).await;
    let out = assert_outcome(resp, 422, "validation-failed").await;
    assert_eq!(out["issue"][0]["expression"][0], "Encounter.identifier");
    let mut wrong_id = finished.clone();
    wrong_id["id"] = json!("another");
    let resp = send_as(&app, 2, reqwest::Method::PUT, &path, Some(&wrong_id)).await;
    let out = assert_outcome(resp, 422, "validation-failed").await;
    assert_eq!(out["issue"][0]["expression"][0], "Encounter.id");
    let resp = send_as(&app, 1, reqwest::Method::PUT, &path, Some(&finished)).await;
    assert_outcome(resp, 404, "not-found").await;
    let mut no_id = finished.clone();
    no_id.as_object_mut().unwrap().remove("id");
    let resp = send_as(
        &app,
        2,
        reqwest::Method::PUT,
        "/fhir/Encounter/nope",
        Some(&no_id),
    )
    .await;
    assert_outcome(resp, 404, "not-found").await;
    assert_eq!(stored(&app, 2, "V-1").await.unwrap().version, 2);

    // A caller with create but not update scope: a repeat is fine, a change is refused.
    let c_only = encounter(3, "C-V1", "C-1");
    assert_eq!(
        post(&app, 3, "/fhir/Encounter", &c_only).await.status(),
        201
    );
    assert_eq!(
        post(&app, 3, "/fhir/Encounter", &c_only).await.status(),
        200
    );
    let mut changed = c_only.clone();
    changed["status"] = json!("onleave");
    let resp = post(&app, 3, "/fhir/Encounter", &changed).await;
    assert_outcome(resp, 403, "forbidden").await;
    assert_eq!(
        stored(&app, 3, "C-V1").await.unwrap().status,
        EncounterStatus::InProgress
    );
    // With update scope, a POST of a changed visit records its new state.
    let mut moved = body.clone();
    moved["status"] = json!("entered-in-error");
    let resp = post(&app, 2, "/fhir/Encounter", &moved).await;
    assert_eq!(resp.status(), 200);
    let v3: Value = resp.json().await.unwrap();
    assert_eq!(v3["meta"]["versionId"], "3");
    assert!(
        active(&app, &[&p], t("2026-11-29 01:00:00"))
            .await
            .is_empty()
    );

    // Every write and read was audited, attributed to the institution and the person.
    let store = app.state.store.clone();
    let rows: Vec<AuditRow> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT subtype_code, agent_institution, patient_id FROM audit_events \
                 WHERE resource LIKE '%Encounter/%' AND outcome = '0' ORDER BY seq",
            ),
            &mut *conn,
        )
        .unwrap()
    })
    .await
    .unwrap();
    let of_p: Vec<&str> = rows
        .iter()
        .filter(|r| r.patient_id.as_deref() == Some(p.as_str()))
        .map(|r| r.subtype_code.as_str())
        .collect();
    assert_eq!(
        of_p,
        [
            "create", "update", "update", "read", "update", "update", "update"
        ],
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .filter(|r| r.patient_id.as_deref() == Some(p.as_str()))
            .all(|r| r.agent_institution == "hosp-002")
    );
    app.stop().await;
}

#[derive(Debug, diesel::QueryableByName)]
struct AuditRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    subtype_code: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    agent_institution: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    patient_id: Option<String>,
}

/// The ACK's text (MSA-3) contains `part`.
fn assert_text(ack: &Value, part: &str) {
    assert!(ack["text"].as_str().unwrap().contains(part), "{ack}");
}

/// An AA for `control` whose text contains `part`.
fn assert_aa(ack: &Value, control: &str, part: &str) {
    assert_ack(ack, "AA", control);
    assert_text(ack, part);
}

/// An ADT message from hosp-001; `pv1` is the PV1 segment (or empty for none).
fn adt(event: &str, control: &str, mrn: &str, name: &str, pv1: &str) -> String {
    let mut m = format!(
        "MSH|^~\\&|HIS|hosp-001|YIQIAO|YIQIAO|20261129120000||ADT^{event}^ADT_A01|{control}|P|2.5\r\
         EVN|{event}|20261129120000\r\
         PID|1||{mrn}^^^hosp-001^MR||{name}||19800102|M"
    );
    if !pv1.is_empty() {
        m.push('\r');
        m.push_str(pv1);
    }
    m
}

/// PV1 with class (PV1-2), visit number (PV1-19), admit (PV1-44) and discharge (PV1-45) times.
fn pv1(class: &str, visit: &str, admit: &str, discharge: &str) -> String {
    let mut fields = vec![String::new(); 46];
    fields[0] = "PV1".into();
    fields[1] = "1".into();
    fields[2] = class.into();
    fields[19] = visit.into();
    fields[44] = admit.into();
    fields[45] = discharge.into();
    let mut s = fields.join("|");
    while s.ends_with('|') {
        s.pop();
    }
    s
}

async fn hl7_admit_discharge_cancel(backend: Backend) {
    let app = setup(backend, |s| {
        s.mllp.enabled = true;
        s.mllp.listen = "127.0.0.1:0".parse().unwrap();
        s.mllp.allow = allow(&[("127.0.0.1", "hosp-001")]);
    })
    .await;
    let addr = app.mllp.unwrap();

    // A01 with PV1: the patient and the visit, in one go. Admit time without offset: UTC+8.
    let admit = adt(
        "A01",
        "a1",
        "MRN-1",
        "张^伟",
        &pv1("I", "V100^^^hosp-001^VN", "202611290800", ""),
    );
    let acks = send_async(addr, vec![admit.clone(), admit.replace("|a1|", "|a2|")]).await;
    assert_aa(&acks[0], "a1", "created Patient/");
    assert_text(&acks[0], "; opened Encounter/");
    assert_aa(&acks[1], "a2", "; unchanged Encounter/");
    let e = stored(&app, 1, "V100").await.unwrap();
    assert_eq!(e.status, EncounterStatus::InProgress);
    assert_eq!(e.class, EncounterClass::Inpatient);
    assert_eq!(e.period_start, t("2026-11-29 00:00:00"));
    assert_eq!(e.period_end, None);
    assert_eq!(e.version, 1);
    let p = person(&app, 1, "MRN-1").await;
    assert_eq!(e.person_id.as_deref(), Some(p.as_str()));
    assert_eq!(active(&app, &[&p], t("2026-11-30 00:00:00")).await.len(), 1);

    // A04 outpatient without PV1-44: the visit starts at the message time MSH-7.
    let outpatient = adt("A04", "o1", "MRN-2", "李^娜", &pv1("O", "OP-7", "", ""));
    // A01 with PV1 but no visit number: only the patient (as before encounters were kept).
    let no_visit = adt("A01", "n1", "MRN-3", "周^杰", "PV1|1|I");
    // Failures name the field and store nothing (not even the patient).
    let bad_class = adt("A01", "e1", "MRN-4", "吴^刚", &pv1("X", "V-X", "", ""));
    let no_class = adt("A01", "e2", "MRN-4", "吴^刚", &pv1("", "V-X", "", ""));
    let bad_time = adt(
        "A01",
        "e3",
        "MRN-4",
        "吴^刚",
        &pv1("E", "V-X", "2026-11-29", ""),
    );
    let acks = send_async(
        addr,
        vec![outpatient, no_visit, bad_class, no_class, bad_time],
    )
    .await;
    assert_aa(&acks[0], "o1", "; opened Encounter/");
    assert_ack(&acks[1], "AA", "n1");
    assert!(
        !acks[1]["text"].as_str().unwrap().contains("Encounter"),
        "{}",
        acks[1]
    );
    assert_nak(&acks[2], "AE", "PV1^1^2", "103");
    assert_nak(&acks[3], "AE", "PV1^1^2", "101");
    assert_nak(&acks[4], "AE", "PV1^1^44", "102");
    let op = stored(&app, 1, "OP-7").await.unwrap();
    assert_eq!(op.status, EncounterStatus::Arrived);
    assert_eq!(op.class, EncounterClass::Ambulatory);
    assert_eq!(op.period_start, t("2026-11-29 04:00:00"));
    assert!(stored(&app, 1, "V-X").await.is_none());
    assert_eq!(encounter_count(&app).await, 2);
    let store = app.state.store.clone();
    let mrn4 = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        empi::find_by_identifier(&mut conn, &system(1), "MRN-4").unwrap()
    })
    .await
    .unwrap();
    assert!(mrn4.is_none(), "a refused A01 registered its patient");

    // A03: finished at PV1-45 (with an offset); the relationship ends there.
    let discharge = adt(
        "A03",
        "d1",
        "MRN-1",
        "张^伟",
        &pv1("I", "V100", "", "20261130100000+0800"),
    );
    let unknown = adt("A03", "d2", "MRN-1", "张^伟", &pv1("I", "V404", "", ""));
    let no_number = adt("A03", "d3", "MRN-1", "张^伟", "PV1|1|I");
    let wrong_patient = adt("A11", "d4", "MRN-2", "李^娜", &pv1("I", "V100", "", ""));
    let before_admit = adt(
        "A03",
        "d5",
        "MRN-2",
        "李^娜",
        &pv1("O", "OP-7", "", "20261101000000"),
    );
    let acks = send_async(
        addr,
        vec![
            discharge.clone(),
            discharge.replace("|d1|", "|d6|"),
            unknown,
            no_number,
            wrong_patient,
            before_admit,
        ],
    )
    .await;
    assert_aa(&acks[0], "d1", "finished Encounter/");
    assert_aa(&acks[1], "d6", "unchanged Encounter/");
    assert_nak(&acks[2], "AE", "PV1^1^19", "204");
    assert_text(&acks[2], "V404");
    assert_nak(&acks[3], "AE", "PV1^1^19", "101");
    assert_nak(&acks[4], "AE", "PID^1^3", "205");
    assert_nak(&acks[5], "AE", "PV1^1^45", "102");
    let e = stored(&app, 1, "V100").await.unwrap();
    assert_eq!(e.status, EncounterStatus::Finished);
    assert_eq!(e.period_end, Some(t("2026-11-30 02:00:00")));
    assert_eq!(e.version, 2);
    assert_eq!(e.resource["period"]["end"], "2026-11-30T02:00:00.000000Z");
    assert_eq!(active(&app, &[&p], t("2026-11-30 02:00:00")).await.len(), 1);
    assert!(
        active(&app, &[&p], t("2026-11-30 02:00:01"))
            .await
            .is_empty()
    );
    assert_eq!(
        stored(&app, 1, "OP-7").await.unwrap().status,
        EncounterStatus::Arrived
    );
    // A replayed admit does not reopen the finished visit (nor update the patient).
    let acks = send_async(addr, vec![admit.replace("|a1|", "|a3|")]).await;
    assert_nak(&acks[0], "AE", "PV1^1^19", "205");
    assert_text(&acks[0], "already finished");
    assert_eq!(stored(&app, 1, "V100").await.unwrap(), e);

    // A11: the outpatient visit is cancelled and no longer a relationship.
    let p2 = person(&app, 1, "MRN-2").await;
    assert_eq!(
        active(&app, &[&p2], t("2026-11-29 05:00:00")).await.len(),
        1
    );
    let cancel = adt("A11", "c1", "MRN-2", "李^娜", &pv1("O", "OP-7", "", ""));
    let acks = send_async(addr, vec![cancel]).await;
    assert_aa(&acks[0], "c1", "cancelled Encounter/");
    assert_eq!(
        stored(&app, 1, "OP-7").await.unwrap().status,
        EncounterStatus::Cancelled
    );
    assert!(
        active(&app, &[&p2], t("2026-11-29 05:00:00"))
            .await
            .is_empty()
    );

    // The hospital reads the visit the feed opened over FHIR, and it is audited.
    let resp = send_as(
        &app,
        1,
        reqwest::Method::GET,
        &format!("/fhir/Encounter/{}", e.id),
        None,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "finished");
    assert_eq!(v["class"]["code"], "IMP");
    assert_eq!(v["identifier"][0]["value"], "V100");
    assert_eq!(v["serviceProvider"]["reference"], "Organization/hosp-001");
    let store = app.state.store.clone();
    let rows: Vec<AuditRow> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::RunQueryDsl::load(
            diesel::sql_query(
                "SELECT subtype_code, agent_institution, patient_id FROM audit_events \
                 WHERE agent_user LIKE 'mllp:%' AND resource LIKE '%Encounter/%' \
                 AND outcome = '0' ORDER BY seq",
            ),
            &mut *conn,
        )
        .unwrap()
    })
    .await
    .unwrap();
    let seen: Vec<&str> = rows.iter().map(|r| r.subtype_code.as_str()).collect();
    // a1, a2, o1, d1, d6, c1
    assert_eq!(
        seen,
        ["create", "update", "create", "update", "update", "update"],
        "{rows:?}"
    );
    app.stop().await;
}

async fn active_relationships_follow_merges(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    // Two people, at an internet hospital and at a hospital, each with a current visit.
    register_patient(&app, 2, "IH-1", "王芳", "1990-01-02").await;
    register_patient(&app, 1, "MR-7", "钱红", "1955-12-30").await;
    let a = person(&app, 2, "IH-1").await;
    let b = person(&app, 1, "MR-7").await;
    assert_ne!(a, b);
    assert_eq!(
        post(&app, 2, "/fhir/Encounter", &encounter(2, "IH-V1", "IH-1"))
            .await
            .status(),
        201
    );
    let mut inpatient = encounter(1, "H-V1", "MR-7");
    inpatient["class"]["code"] = json!("IMP");
    inpatient["period"]["start"] = json!("2026-11-28T10:00:00Z");
    assert_eq!(
        post(&app, 1, "/fhir/Encounter", &inpatient).await.status(),
        201
    );
    let at = t("2026-11-29 06:00:00");
    let rel_a = (
        a.clone(),
        "hosp-002".to_string(),
        t("2026-11-29 00:00:00"),
        None,
    );
    let rel_b = (
        b.clone(),
        "hosp-001".to_string(),
        t("2026-11-28 10:00:00"),
        None,
    );
    assert_eq!(active(&app, &[&a], at).await, vec![rel_a.clone()]);
    assert_eq!(active(&app, &[&b], at).await, vec![rel_b.clone()]);

    // A data steward merges b into a: the survivor has both care relationships.
    let resp = app
        .admin_post(
            &format!("/empi/persons/{a}/$merge"),
            &json!({ "source": b }),
        )
        .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    let survivor = active(&app, &[&a], at).await;
    assert_eq!(
        survivor,
        vec![
            (
                a.clone(),
                "hosp-001".to_string(),
                t("2026-11-28 10:00:00"),
                None
            ),
            rel_a.clone(),
        ]
    );
    assert!(active(&app, &[&b], at).await.is_empty());
    assert_eq!(
        stored(&app, 1, "H-V1").await.unwrap().person_id.as_deref(),
        Some(a.as_str())
    );
    // Undone: each person has its own again.
    let resp = app
        .admin_post(
            &format!("/empi/persons/{a}/$unmerge"),
            &json!({ "source": b }),
        )
        .await;
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(active(&app, &[&a], at).await, vec![rel_a]);
    assert_eq!(active(&app, &[&b], at).await, vec![rel_b]);
    app.stop().await;
}

on_both_backends!(
    registration_idempotency_validation_and_updates,
    hl7_admit_discharge_cancel,
    active_relationships_follow_merges,
);
