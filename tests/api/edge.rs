//! Input sanitation at the edge (issue 25, gateway/src/sanitize.rs): a control character in a
//! path segment, a query parameter, a JSON body or a header the gateway reads is refused with
//! 400 naming the field before anything is stored, on both backends — never a 5xx.
//!
//! The route table comes from the committed OpenAPI document, so a new route or parameter is
//! covered without editing this file; a new route with a JSON body needs a sample body below.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use yiqiao_gateway::config::Secret;

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, institution};
use crate::on_both_backends;

const AUDITOR_TOKEN: &str = "test-auditor-token-0123456789";
const RID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";

fn own_system() -> String {
    "urn:oid:2.16.156.10011.1.99.1".to_string()
}

/// A route of the committed OpenAPI document.
struct Route {
    method: String,
    template: String,
    /// (name, in): `path`, `query` or `header`.
    params: Vec<(String, String)>,
    json_body: bool,
}

/// One request carrying a control character.
struct Case {
    what: String,
    path: String,
    query: Vec<(String, String)>,
    body: Option<Value>,
}

fn routes() -> Vec<Route> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/yiqiao.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut out = Vec::new();
    for (template, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let params = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_string(),
                        p["in"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            let json_body = op["requestBody"]["content"]
                .as_object()
                .is_some_and(|c| c.contains_key("application/json"));
            out.push(Route {
                method: method.to_uppercase(),
                template: template.clone(),
                params,
                json_body,
            });
        }
    }
    out
}

/// A credential that gets a request of `path` past authentication.
fn authorise(path: &str, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    if path.starts_with("/audit") || path.starts_with("/fhir/AuditEvent") {
        req.bearer_auth(AUDITOR_TOKEN)
    } else if path.starts_with("/fhir") {
        req.bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "hosp-001")
    } else {
        req.bearer_auth(ADMIN_TOKEN)
    }
}

/// A valid value for a path parameter (an existing resource where that matters).
fn path_value(template: &str, name: &str) -> &'static str {
    match (template, name) {
        (t, "id") if t.starts_with("/admin/institutions") => "hosp-001",
        _ => "x1",
    }
}

/// Query parameters a request with a body needs besides its body.
fn base_query(method: &str, template: &str) -> Vec<(String, String)> {
    match (method, template) {
        ("PUT", "/fhir/Patient") => vec![("identifier".into(), format!("{}|P9", own_system()))],
        ("PUT", "/fhir/Practitioner") => vec![(
            "identifier".into(),
            "https://yiqiao.health/fhir/sid/practitioner/hosp-001|S9".into(),
        )],
        _ => Vec::new(),
    }
}

/// Institution `n` with every scope (a sample body too: an update must not narrow them).
fn member(n: u32) -> Value {
    let mut inst = institution(n);
    inst["allowed_scopes"] = json!(["system/*.cruds"]);
    inst
}

fn patient(local: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [
            { "system": own_system(), "value": local },
            { "system": RID_SYSTEM, "value": "11010519491231002X" },
        ],
        "name": [{ "use": "official", "family": "王", "given": ["秀英"] }],
        "gender": "female",
        "birthDate": "1949-12-31",
        "telecom": [{ "system": "phone", "value": "13800001111" }],
        "address": [{ "text": "福州市鼓楼区五四路1号" }],
    })
}

/// A body that the route would accept (or nearly): the values a NUL is put into.
fn sample_body(method: &str, template: &str, record: &str) -> Option<Value> {
    let consent = json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{record}") },
        "provision": { "type": "permit", "actor": [{
            "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
            "reference": { "reference": "Organization/hosp-001" } }] },
    });
    let encounter = json!({
        "resourceType": "Encounter",
        "identifier": [{ "system": "urn:visit:1", "value": "V-1" }],
        "status": "in-progress",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "identifier": { "system": own_system(), "value": "P1" } },
        "period": { "start": "2026-11-29T08:00:00+08:00" },
    });
    let practitioner = json!({
        "resourceType": "Practitioner",
        "identifier": [{ "system": "https://yiqiao.health/fhir/sid/practitioner/hosp-001", "value": "S9" }],
        "active": true,
        "name": [{ "use": "official", "family": "李", "given": ["建国"] }],
        "address": [{ "use": "home", "text": "福州市鼓楼区" }],
    });
    let document = crate::documents::sample_document(1, "doc-9", "P1");
    Some(match (method, template) {
        ("PUT", "/admin/agreements/{id}") => json!({
            "custodian": "hosp-001", "recipient": "hosp-002", "purposes": ["TREAT"],
            "resource_types": ["Observation"], "status": "active",
            "start": "2026-01-01T00:00:00Z" }),
        ("POST", "/admin/institutions") => member(3),
        ("PUT", "/admin/institutions/{id}") => member(1),
        ("PUT", "/admin/institutions/{id}/client-certificate") => {
            json!({ "sha256": "ab".repeat(32) })
        }
        ("POST", "/audit/alerts/{id}/ack") | ("PUT", "/audit/flagged-patients/{patient}") => {
            json!({ "note": "checked with the ward" })
        }
        ("POST", "/consent/$evaluate") => json!({
            "requester": "hosp-002", "purpose": "TREAT", "patient": record,
            "custodian": "hosp-001", "resource_type": "Observation", "security": ["N"] }),
        ("POST", "/empi/persons/{id}/$merge" | "/empi/persons/{id}/$unmerge") => {
            json!({ "source": "p2" })
        }
        ("POST", "/empi/review/{id}/link" | "/empi/review/{id}/keep-separate") => {
            json!({ "note": "same person" })
        }
        ("POST", "/fhir") => json!({
            "resourceType": "Bundle", "type": "transaction",
            "entry": [{ "resource": document, "request": { "method": "POST", "url": "DocumentReference" } }] }),
        ("POST", "/fhir/Consent") | ("PUT", "/fhir/Consent/{id}") => consent,
        ("POST", "/fhir/DocumentReference") => document,
        ("POST", "/fhir/Encounter") | ("PUT", "/fhir/Encounter/{id}") => encounter,
        ("POST", "/fhir/Patient") => patient("P8"),
        ("PUT", "/fhir/Patient") => patient("P9"),
        ("POST", "/fhir/Patient/$match") => json!({
            "resourceType": "Parameters",
            "parameter": [{ "name": "resource", "resource": patient("P7") }] }),
        ("POST" | "PUT", "/fhir/Practitioner") => practitioner,
        ("POST", "/fhir/Subscription") => json!({
            "resourceType": "Subscription", "status": "requested", "reason": "documents",
            "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
            "channel": { "type": "rest-hook", "endpoint": "https://his-1.example/notify",
                         "payload": "application/fhir+json" } }),
        _ => return None,
    })
}

/// JSON pointers of every string in `v`.
fn string_pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::String(_) => out.push(at),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                string_pointers(item, format!("{at}/{i}"), out);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                string_pointers(item, format!("{at}/{k}"), out);
            }
        }
        _ => {}
    }
}

fn fill(template: &str, values: &BTreeMap<&str, String>) -> String {
    let mut path = template.to_string();
    for (name, value) in values {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    path
}

async fn setup(backend: Backend) -> (TestApp, String) {
    let app = TestApp::spawn_with(backend, |s| {
        s.auditor_token = Secret::new(AUDITOR_TOKEN);
    })
    .await;
    for n in [1, 2] {
        let resp = app.admin_post("/admin/institutions", &member(n)).await;
        assert_eq!(resp.status(), 201);
    }
    let resp = authorise("/fhir/Patient", app.client.post(app.url("/fhir/Patient")))
        .json(&patient("P1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let record: Value = resp.json().await.unwrap();
    let record = record["id"].as_str().unwrap().to_string();
    (app, record)
}

/// Every route of the OpenAPI document, with a NUL (or another control character) in each path
/// parameter, each query parameter and each string of its JSON body in turn: 400 every time.
/// Before the edge checks, PostgreSQL answered 500 (or 503) to many of these.
async fn control_characters_are_refused_on_every_route(backend: Backend) {
    let (app, record) = setup(backend).await;
    let mut failures: Vec<String> = Vec::new();
    let mut sent = 0;
    for Route {
        method,
        template,
        params,
        json_body,
    } in routes()
    {
        // The token endpoint and the login callback refuse for themselves and record the
        // refusals (tests/api/auth.rs, tests/api/oidc.rs).
        if template == "/oauth2/token" || template == "/login/callback" {
            continue;
        }
        let valid: BTreeMap<&str, String> = params
            .iter()
            .filter(|(_, place)| place == "path")
            .map(|(name, _)| (name.as_str(), path_value(&template, name).to_string()))
            .collect();
        let m: reqwest::Method = method.parse().unwrap();
        let body = if json_body {
            let b = sample_body(&method, &template, &record);
            assert!(b.is_some(), "add a sample body for {method} {template}");
            b
        } else {
            None
        };
        let mut cases: Vec<Case> = Vec::new();
        for (name, place) in &params {
            match place.as_str() {
                "path" => {
                    let mut values = valid.clone();
                    values.insert(name.as_str(), "a%00".into());
                    cases.push(Case {
                        what: format!("path {name}"),
                        path: fill(&template, &values),
                        query: base_query(&method, &template),
                        body: body.clone(),
                    });
                }
                "query" => {
                    let mut query = base_query(&method, &template);
                    query.retain(|(n, _)| n != name);
                    query.push((name.clone(), "a\u{0}".into()));
                    cases.push(Case {
                        what: format!("query {name}"),
                        path: fill(&template, &valid),
                        query,
                        body: body.clone(),
                    });
                }
                _ => {}
            }
        }
        if let Some(b) = &body {
            let mut pointers = Vec::new();
            string_pointers(b, String::new(), &mut pointers);
            for (i, pointer) in pointers.iter().enumerate() {
                let mut bad = b.clone();
                let s = bad.pointer_mut(pointer).unwrap();
                // Mostly NUL; every third an escape (ESC) or a C1 control.
                let c = ['\u{0}', '\u{1b}', '\u{85}'][i % 3];
                *s = json!(format!("{}{c}", s.as_str().unwrap()));
                cases.push(Case {
                    what: format!("body {pointer}"),
                    path: fill(&template, &valid),
                    query: base_query(&method, &template),
                    body: Some(bad),
                });
            }
        }
        for Case {
            what,
            path,
            query,
            body,
        } in cases
        {
            let mut req = authorise(&path, app.client.request(m.clone(), app.url(&path)));
            if !query.is_empty() {
                req = req.query(&query);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req.send().await.unwrap();
            sent += 1;
            let status = resp.status().as_u16();
            let out: Value = resp.json().await.unwrap_or(Value::Null);
            let code = out["issue"][0]["details"]["coding"][0]["code"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let expected = if what.starts_with("body") {
                "invalid-body"
            } else {
                "invalid-parameter"
            };
            if status != 400 || code != expected {
                let text = out["issue"][0]["details"]["text"].as_str().unwrap_or("");
                let text: String = text.chars().take(90).collect();
                failures.push(format!(
                    "{status} {method} {template} ({what}): {code} {text}"
                ));
            }
        }
    }
    failures.sort_by_key(|f| !f.starts_with('5'));
    assert!(
        failures.is_empty(),
        "{} of {sent} requests not refused with 400:\n{}",
        failures.len(),
        failures.join("\n")
    );
    app.stop().await;
}

/// The refusal names the field; text fields keep tab and line breaks; headers we read are checked.
async fn refusals_name_the_field_and_free_text_keeps_line_breaks(backend: Backend) {
    let (app, record) = setup(backend).await;
    let mut consent = sample_body("POST", "/fhir/Consent", &record).unwrap();
    consent["provision"]["actor"][0]["reference"]["reference"] = json!("Organization/hosp\u{0}");
    let resp = authorise("/fhir", app.client.post(app.url("/fhir/Consent")))
        .json(&consent)
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 400, "invalid-body").await;
    assert_eq!(
        out["issue"][0]["expression"][0],
        "Consent.provision.actor[0].reference.reference"
    );

    let resp = authorise("/fhir", app.client.get(app.url("/fhir/Organization/a%00")))
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 400, "invalid-parameter").await;
    assert_eq!(out["issue"][0]["expression"][0], "id");
    let resp = authorise("/fhir", app.client.get(app.url("/fhir/Patient")))
        .query(&[("family", "王\u{0}")])
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 400, "invalid-parameter").await;
    assert_eq!(out["issue"][0]["expression"][0], "family");
    // A tab is refused in a header the gateway reads (NUL, CR and LF never get past HTTP).
    let resp = authorise("/fhir", app.client.get(app.url("/fhir/Patient")))
        .header("X-Break-Glass-Reason", "unconscious\tpatient")
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 400, "invalid-parameter").await;
    assert_eq!(out["issue"][0]["expression"][0], "X-Break-Glass-Reason");

    // Tab, line feed and carriage return are text; they are kept.
    let note = "first line\r\nsecond\tline";
    let resp = app
        .client
        .put(app.url("/audit/flagged-patients/p1"))
        .bearer_auth(AUDITOR_TOKEN)
        .json(&json!({ "note": note }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert!(status.is_success(), "{body}");
    assert_eq!(body["note"], note, "{body}");
    app.stop().await;
}

/// HL7 v2: a control character, raw or decoded from an escape (`\X00\`), is refused with AE
/// naming the field and nothing is stored; the bulk import refuses the row, naming the column.
async fn control_characters_in_hl7_and_imports_are_refused(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.mllp.enabled = true;
        s.mllp.listen = "127.0.0.1:0".parse().unwrap();
        s.mllp.allow = crate::mllp::allow(&[("127.0.0.1", "hosp-001"), ("127.0.0.1", "hosp-002")]);
    })
    .await;
    let mut inst = institution(1);
    inst["allowed_scopes"] = json!(["system/Patient.cruds"]);
    assert_eq!(
        app.admin_post("/admin/institutions", &inst).await.status(),
        201
    );
    let message = |control: &str, name: &str| {
        format!(
            "MSH|^~\\&|HIS|hosp-001|YIQIAO|YIQIAO|20261129120000||ADT^A04^ADT_A01|{control}|P|2.5\r\
             EVN|A04|20261129120000\r\
             PID|1||M1^^^hosp-001^MR||{name}||19800102|M"
        )
    };
    let acks = crate::mllp::send_async(
        app.mllp.unwrap(),
        vec![
            message("C1", "张\\X00\\^伟^^^^^L"),
            message("C2", "张\u{1}^伟^^^^^L"),
            message("C3", "张^伟^^^^^L"),
            // The sending facility (looked up before any field is read): MSH-4.
            message("C4", "张^伟^^^^^L").replace("|hosp-001|YIQIAO", "|hosp\\X01\\001|YIQIAO"),
        ],
    )
    .await;
    for ack in &acks[..2] {
        assert_eq!(ack["code"], "AE", "{ack}");
        assert_eq!(ack["err_code"], "102", "{ack}");
        assert_eq!(ack["err_location"], "PID^1^5", "{ack}");
        assert!(ack["text"].as_str().unwrap().contains("U+000"), "{ack}");
    }
    assert_eq!(acks[2]["code"], "AA", "{}", acks[2]);
    assert_eq!(acks[3]["code"], "AE", "{}", acks[3]);
    assert_eq!(acks[3]["err_location"], "MSH^1^4", "{}", acks[3]);
    // Only the clean message registered a patient.
    let resp = app
        .client
        .get(app.url("/fhir/Patient?family=张"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .send()
        .await
        .unwrap();
    let found: Value = resp.json().await.unwrap();
    assert_eq!(found["entry"].as_array().unwrap().len(), 1, "{found}");

    let dir = crate::helpers::TempDir::new();
    let csv = dir.path.join("patients.csv");
    std::fs::write(
        &csv,
        "record_number,name,gender,birth_date\nI1,郑\u{0}三,F,1949-12-31\nI2,郑四,F,1949-12-31\n",
    )
    .unwrap();
    let rejects = dir.path.join("rejects.csv");
    let out = crate::helpers::yiqiao_cli(
        &app,
        &[
            "mpi",
            "import",
            csv.to_str().unwrap(),
            "--institution",
            "hosp-001",
            "--format",
            "csv",
            "--no-progress",
            "--rejects",
            rejects.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = std::fs::read_to_string(&rejects).unwrap();
    assert!(report.contains("2,name,"), "{report}");
    assert!(report.contains("U+0000"), "{report}");
    app.stop().await;
}

on_both_backends!(
    control_characters_are_refused_on_every_route,
    refusals_name_the_field_and_free_text_keeps_line_breaks,
    control_characters_in_hl7_and_imports_are_refused,
);
