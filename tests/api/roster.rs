//! The staff roster (FHIR Practitioner), the acting user (`X-Yiqiao-User`) and the anomaly rule
//! `same-surname-address` (docs/audit.md): a user on the roster reading a patient who shares
//! their surname and address raises one alert; another address does not; a malformed user
//! header is refused with 400 naming it.

use reqwest::Method;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};
use yiqiao_sm::Sm2PrivateKey;

use crate::auditing::{access_token, alerts, chain_ok, records, register_with_key, settings};
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome};
use crate::on_both_backends;

const SYSTEM: &str = "https://yiqiao.health/fhir/sid/practitioner/hosp-001";
const USER: &str = "x-yiqiao-user";

fn practitioner(staff: &str, family: &str, home: &str) -> Value {
    json!({
        "resourceType": "Practitioner",
        "identifier": [
            { "system": SYSTEM, "value": staff },
            { "system": "urn:oid:2.16.156.10011.1.4", "value": "110350100000042" },
        ],
        "active": true,
        "name": [{ "use": "official", "family": family, "given": ["建国"] }],
        "address": [
            { "use": "work", "text": "福州市鼓楼区 第一人民医院" },
            { "use": "home", "text": home },
        ],
    })
}

fn patient(mrn: &str, name: &str, birth: &str, address: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:2.16.156.10011.1.99.1", "value": mrn }],
        "name": [{ "text": name }], "gender": "female", "birthDate": birth,
        "address": [{ "text": address }],
    })
}

/// `method path` with a bearer token and an optional JSON body.
async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path)).bearer_auth(token);
    if let Some(body) = body {
        req = req.json(body);
    }
    req.send().await.unwrap()
}

/// Register a patient as hosp-001; returns (source record id, enterprise person id).
async fn register(app: &TestApp, token: &str, body: &Value) -> (String, String) {
    let resp = call(
        app,
        reqwest::Method::POST,
        "/fhir/Patient",
        token,
        Some(body),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    (
        created["id"].as_str().unwrap().to_string(),
        created["extension"][0]["valueIdentifier"]["value"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

async fn read_as(app: &TestApp, token: &str, record: &str, user: HeaderValue) -> reqwest::Response {
    app.client
        .get(app.url(&format!("/fhir/Patient/{record}")))
        .bearer_auth(token)
        .header(USER, user)
        .send()
        .await
        .unwrap()
}

async fn roster_and_same_surname_address(backend: Backend) {
    let app = TestApp::spawn_with(backend, settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_with_key(
        &app,
        1,
        &key,
        &["system/Patient.cruds", "system/Practitioner.cruds"],
    )
    .await;
    let token = access_token(
        &app,
        &key,
        "hosp-001",
        "system/Patient.cruds system/Practitioner.cruds",
    )
    .await;

    // The roster: conditional update creates, a repeat stores nothing, read and search.
    let home = "福建省福州市鼓楼区 五四路８８号－３０１室";
    let by_identifier =
        |identifier: &str| format!("/fhir/Practitioner?identifier={SYSTEM}|{identifier}");
    let (a, t) = (&app, token.as_str());
    let put = move |body: Value, path: String| async move {
        call(a, Method::PUT, &path, t, Some(&body)).await
    };
    let resp = put(practitioner("D001", "王", home), by_identifier("D001")).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().contains_key("location"));
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["meta"]["versionId"], "1");
    let resp = put(practitioner("D001", "王", home), by_identifier("D001")).await;
    assert_eq!(resp.status(), 200);
    let again: Value = resp.json().await.unwrap();
    assert_eq!(
        (again["id"].as_str(), again["meta"]["versionId"].as_str()),
        (Some(id.as_str()), Some("1"))
    );
    // POST of the same identifier is idempotent too.
    let body = practitioner("D001", "王", home);
    let resp = call(
        &app,
        Method::POST,
        "/fhir/Practitioner",
        &token,
        Some(&body),
    )
    .await;
    assert_eq!(resp.status(), 200);
    // A body that does not match the URL, another institution's system, a missing name.
    let resp = put(practitioner("D001", "王", home), by_identifier("D002")).await;
    assert_outcome(resp, 422, "validation-failed").await;
    let foreign =
        "/fhir/Practitioner?identifier=https://yiqiao.health/fhir/sid/practitioner/hosp-002|D001";
    let resp = put(practitioner("D001", "王", home), foreign.to_string()).await;
    assert_outcome(resp, 400, "invalid-parameter").await;
    let mut nameless = practitioner("D003", "王", home);
    nameless["name"] = json!([]);
    let resp = put(nameless, by_identifier("D003")).await;
    let body = assert_outcome(resp, 422, "validation-failed").await;
    assert!(body.to_string().contains("Practitioner.name"), "{body}");
    let path = format!("/fhir/Practitioner/{id}");
    let read: Value = call(&app, Method::GET, &path, &token, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["name"][0]["family"], "王");
    let found: Value = call(&app, Method::GET, &by_identifier("D001"), &token, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(found["entry"].as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found["entry"][0]["resource"]["id"], id.as_str());
    // Without the Practitioner scopes: 403.
    let patient_only = access_token(&app, &key, "hosp-001", "system/Patient.cruds").await;
    let body = practitioner("D001", "王", home);
    let resp = call(
        &app,
        Method::PUT,
        &by_identifier("D001"),
        &patient_only,
        Some(&body),
    )
    .await;
    assert_outcome(resp, 403, "forbidden").await;

    // Patients: one shares surname and (normalised) address, one lives elsewhere.
    let (same, same_person) = register(
        &app,
        &token,
        &patient(
            "MR-1",
            "王芳",
            "1975-06-01",
            "福建省福州市鼓楼区五四路88号301室",
        ),
    )
    .await;
    let (elsewhere, elsewhere_person) = register(
        &app,
        &token,
        &patient(
            "MR-2",
            "王强",
            "1988-02-11",
            "福建省福州市台江区八一七中路1号",
        ),
    )
    .await;
    assert_ne!(same_person, elsewhere_person);

    // Bad user headers: 400 naming the header (too long, a control character); the admin
    // credential on behalf of an institution cannot name a user.
    let long = HeaderValue::from_str(&"D".repeat(129)).unwrap();
    let tab = HeaderValue::from_bytes(b"D0\t01").unwrap();
    for bad in [long, tab] {
        let resp = read_as(&app, &token, &same, bad).await;
        let body = assert_outcome(resp, 400, "invalid-parameter").await;
        assert!(body.to_string().contains("X-Yiqiao-User"), "{body}");
    }
    let resp = app
        .client
        .get(app.url(&format!("/fhir/Patient/{same}")))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .header(USER, "D001")
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 400, "invalid-parameter").await;

    // D001 reads both patients (twice the one at home: one alert per day).
    for record in [&same, &same, &elsewhere] {
        let resp = read_as(&app, &token, record, HeaderValue::from_static("D001")).await;
        assert_eq!(resp.status(), 200);
    }
    // The records name the user (agent_user, BALP agent.altId).
    let by_d001: Vec<_> = records(&app)
        .await
        .into_iter()
        .filter(|e| e.agent_user.as_deref() == Some("D001"))
        .collect();
    assert_eq!(by_d001.len(), 3);
    let resource: Value = serde_json::from_str(&by_d001[0].resource).unwrap();
    assert_eq!(resource["agent"][0]["altId"], "D001");
    // The roster changes were audited (the create, then the two unchanged repeats as updates).
    let changes = records(&app)
        .await
        .into_iter()
        .filter(|e| {
            e.resource
                .contains(&format!("Practitioner/{id}/_history/1"))
        })
        .count();
    assert_eq!(changes, 3);

    yiqiao_gateway::alerting::scan_all(&app.state)
        .await
        .unwrap();
    let raised = alerts(&app, "?rule=same-surname-address").await;
    assert_eq!(raised.len(), 1, "{raised:#?}");
    assert_eq!(raised[0]["agent"], "hosp-001/D001");
    assert_eq!(raised[0]["patient_id"], same_person.as_str());
    assert!(
        !raised
            .iter()
            .any(|a| a["patient_id"] == elsewhere_person.as_str()),
        "a different address raises nothing"
    );
    // Scanning again raises nothing new.
    assert_eq!(
        yiqiao_gateway::alerting::scan_all(&app.state)
            .await
            .unwrap(),
        0
    );
    chain_ok(&app).await;
    app.stop().await;
}

on_both_backends!(roster_and_same_surname_address);
