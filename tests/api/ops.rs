//! Health, readiness (with a dependency going away and coming back), metrics, metadata, OpenAPI.

use serde_json::Value;

use crate::helpers::{
    Backend, Proxy, TestApp, TestDb, assert_outcome, institution, redis_url, socket_of,
    test_settings, via_proxy,
};
use crate::on_both_backends;

on_both_backends!(health_metrics_and_capability_statement);

/// Send a create request; the id of what it created.
async fn created_id(request: reqwest::RequestBuilder) -> String {
    let created: Value = request.send().await.unwrap().json().await.unwrap();
    created["id"].as_str().unwrap().to_string()
}

async fn health_metrics_and_capability_statement(backend: Backend) {
    const AUDITOR: &str = "test-auditor-token-0123";
    let app = TestApp::spawn_with(backend, |s| {
        s.auditor_token = yiqiao_gateway::config::Secret::new(AUDITOR)
    })
    .await;
    let health: Value = app.get("/healthz").await.json().await.unwrap();
    assert_eq!(health["status"], "alive");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["database"]["status"], "ok");
    assert_eq!(
        ready["checks"]["database"]["backend"],
        if backend == Backend::Sqlite {
            "sqlite"
        } else {
            "postgres"
        }
    );
    assert_eq!(ready["checks"]["redis"]["status"], "not configured");

    app.admin_post("/admin/institutions", &institution(1)).await;
    app.get("/fhir/Organization/hosp-001").await;
    app.get("/fhir/Organization/none").await;
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("yiqiao_http_requests_total{method=\"GET\",route=\"/fhir/Organization/{id}\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("yiqiao_http_requests_total{method=\"GET\",route=\"/fhir/Organization/{id}\",status=\"404\"} 1"));
    assert!(metrics.contains(
        "yiqiao_http_requests_total{method=\"POST\",route=\"/admin/institutions\",status=\"201\"} 1"
    ));
    assert!(metrics.contains("yiqiao_http_request_duration_seconds_bucket{method=\"GET\",route=\"/fhir/Organization/{id}\""));
    assert!(metrics.contains("yiqiao_db_pool_connections{state=\"in_use\"}"));

    // The CapabilityStatement lists only what is served: every listed interaction answers.
    let cap: Value = app.get("/metadata").await.json().await.unwrap();
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.0.1");
    let resources = cap["rest"][0]["resource"].as_array().unwrap();
    assert!(!resources.is_empty());
    // Patient needs a caller with Patient scopes and a registered patient.
    let mut member = institution(2);
    member["allowed_scopes"] = serde_json::json!([
        "system/Patient.cruds",
        "system/Consent.cruds",
        "system/DocumentReference.cruds",
        "system/Subscription.cruds",
        "system/Encounter.cruds",
        "system/Practitioner.cruds"
    ]);
    app.admin_post("/admin/institutions", &member).await;
    let patient = serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": "urn:oid:2.16.156.10011.1.99.2", "value": "MR-1" }],
        "name": [{ "text": "张伟" }],
        "gender": "male",
        "birthDate": "1980-03-15",
    });
    let as_member = |req: reqwest::RequestBuilder| {
        req.bearer_auth(crate::helpers::ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "hosp-002")
    };
    let created: Value = as_member(app.client.post(app.url("/fhir/Patient")))
        .json(&patient)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let patient_id = created["id"].as_str().unwrap().to_string();
    // Consent needs a recorded consent about that patient.
    let consent = serde_json::json!({
        "resourceType": "Consent",
        "status": "active",
        "patient": { "reference": format!("Patient/{patient_id}") },
        "provision": { "type": "permit" },
    });
    let recorded: Value = as_member(app.client.post(app.url("/fhir/Consent")))
        .json(&consent)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let consent_id = recorded["id"].as_str().unwrap().to_string();
    let mut consent_update = recorded.clone();
    consent_update["status"] = serde_json::json!("inactive");
    // AuditEvent is for the auditor role (the admin credential is refused there).
    let latest: Value = app
        .client
        .get(app.url("/fhir/AuditEvent?_count=1"))
        .bearer_auth(AUDITOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let audit_event_id = latest["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let as_member = |req: reqwest::RequestBuilder, ty: &str| {
        if ty == "AuditEvent" {
            req.bearer_auth(AUDITOR)
        } else {
            as_member(req)
        }
    };
    let document = crate::documents::sample_document(2, "CAP-1", "MR-1");
    let created: Value = as_member(
        app.client.post(app.url("/fhir/DocumentReference")),
        "DocumentReference",
    )
    .json(&document)
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let document_id = created["id"].as_str().unwrap().to_string();
    let subscription = serde_json::json!({ "resourceType": "Subscription",
        "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
        "channel": { "type": "rest-hook", "endpoint": "https://receiver.example.invalid/hook" } });
    let created: Value = as_member(
        app.client.post(app.url("/fhir/Subscription")),
        "Subscription",
    )
    .json(&subscription)
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let subscription_id = created["id"].as_str().unwrap().to_string();
    // Encounter needs a registered visit of that patient.
    let encounter = |visit: &str| {
        serde_json::json!({ "resourceType": "Encounter",
            "identifier": [{ "value": visit }], "status": "in-progress",
            "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
            "subject": { "identifier": { "system": "urn:oid:2.16.156.10011.1.99.2", "value": "MR-1" } },
            "period": { "start": "2026-11-29T08:00:00+08:00" } })
    };
    let created: Value = as_member(app.client.post(app.url("/fhir/Encounter")), "Encounter")
        .json(&encounter("CAP-V1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let encounter_id = created["id"].as_str().unwrap().to_string();
    let mut encounter_update = encounter("CAP-V1");
    encounter_update["status"] = serde_json::json!("finished");
    encounter_update["period"]["end"] = serde_json::json!("2026-11-29T09:00:00+08:00");
    // Practitioner needs a roster entry of hosp-002.
    let practitioner_system = "https://yiqiao.health/fhir/sid/practitioner/hosp-002";
    let practitioner = |staff: &str| {
        serde_json::json!({ "resourceType": "Practitioner",
            "identifier": [{ "system": practitioner_system, "value": staff }],
            "name": [{ "family": "李", "given": ["明"] }] })
    };
    let request = as_member(
        app.client.post(app.url("/fhir/Practitioner")),
        "Practitioner",
    );
    let practitioner_id = created_id(request.json(&practitioner("CAP-D1"))).await;
    for res in resources {
        let ty = res["type"].as_str().unwrap();
        let read_id = match ty {
            "Patient" => patient_id.as_str(),
            "Consent" => consent_id.as_str(),
            "AuditEvent" => audit_event_id.as_str(),
            "DocumentReference" => document_id.as_str(),
            "Subscription" => subscription_id.as_str(),
            "Encounter" => encounter_id.as_str(),
            "Practitioner" => practitioner_id.as_str(),
            _ => "hosp-001",
        };
        let body = match ty {
            "DocumentReference" => crate::documents::sample_document(2, "CAP-2", "MR-1"),
            "Subscription" => subscription.clone(),
            "Encounter" => encounter("CAP-V2"),
            "Practitioner" => practitioner("CAP-D2"),
            _ => patient.clone(),
        };
        for interaction in res["interaction"].as_array().unwrap() {
            let code = interaction["code"].as_str().unwrap();
            let req = match code {
                "read" => app.client.get(app.url(&format!("/fhir/{ty}/{read_id}"))),
                // Searches name a criterion: a patient search needs a demographic one, and a
                // member searches consents by a patient it holds.
                "search-type" if ty == "Patient" => {
                    app.client.get(app.url("/fhir/Patient?family=x"))
                }
                "search-type" if ty == "Consent" => app
                    .client
                    .get(app.url(&format!("/fhir/Consent?patient=Patient/{patient_id}"))),
                "search-type" => app.client.get(app.url(&format!("/fhir/{ty}"))),
                "create" if ty == "Consent" => {
                    app.client.post(app.url("/fhir/Consent")).json(&consent)
                }
                "update" if ty == "Consent" => app
                    .client
                    .put(app.url(&format!("/fhir/Consent/{consent_id}")))
                    .json(&consent_update),
                "update" if ty == "Encounter" => app
                    .client
                    .put(app.url(&format!("/fhir/Encounter/{encounter_id}")))
                    .json(&encounter_update),
                "update" if ty == "Practitioner" => app
                    .client
                    .put(app.url(&format!(
                        "/fhir/Practitioner?identifier={practitioner_system}|CAP-D1"
                    )))
                    .json(&practitioner("CAP-D1")),
                "create" => app.client.post(app.url(&format!("/fhir/{ty}"))).json(&body),
                "delete" => app.client.delete(app.url(&format!("/fhir/{ty}/{read_id}"))),
                "update" => app
                    .client
                    .put(app.url(&format!(
                        "/fhir/{ty}?identifier=urn:oid:2.16.156.10011.1.99.2|MR-1"
                    )))
                    .json(&patient),
                other => panic!("interaction {other} listed but not tested"),
            };
            let resp = as_member(req, ty).send().await.unwrap();
            assert!(
                resp.status().is_success(),
                "{code} on {ty} listed in CapabilityStatement: {}",
                resp.status()
            );
        }
        for op in res["operation"].as_array().into_iter().flatten() {
            let req = match op["name"].as_str().unwrap() {
                "ihe-pix" => app.client.get(app.url(
                    "/fhir/Patient/$ihe-pix?sourceIdentifier=urn:oid:2.16.156.10011.1.99.2|MR-1",
                )),
                "match" => app
                    .client
                    .post(app.url("/fhir/Patient/$match"))
                    .json(&serde_json::json!({ "resourceType": "Parameters",
                        "parameter": [{ "name": "resource", "resource": patient }] })),
                other => panic!("operation {other} listed but not tested"),
            };
            let resp = as_member(req, ty).send().await.unwrap();
            assert_eq!(resp.status(), 200, "operation {op} listed but rejected");
        }
        for param in res["searchParam"].as_array().into_iter().flatten() {
            let name = param["name"].as_str().unwrap();
            let value = match param["type"].as_str().unwrap() {
                "number" => "5",
                "reference" if name == "patient" => &format!("Patient/{patient_id}"),
                _ if ty == "DocumentReference" && name == "patient" => "Patient/x",
                "reference" => "Organization/hosp-001",
                "date" => "1980-03-15",
                _ if name == "patient.identifier" => "urn:oid:2.16.156.10011.1.99.2|MR-1",
                _ if ty == "DocumentReference" && name == "status" => "current",
                _ if name == "_sort" => "date",
                _ if name == "active" => "true",
                _ if name == "type" => "hospital",
                _ if name == "status" => "active",
                _ if name == "gender" => "male",
                _ if name == "outcome" => "0",
                _ if name == "purpose" => "TREAT",
                _ => "x",
            };
            // Gender alone is not a criterion a patient search accepts; a member searches
            // consents by a patient it holds.
            let extra = match (ty, name) {
                ("Patient", "gender" | "_count" | "_offset") => "&family=x".to_string(),
                ("Consent", n) if n != "patient" => format!("&patient=Patient/{patient_id}"),
                _ => String::new(),
            };
            let resp = as_member(
                app.client
                    .get(app.url(&format!("/fhir/{ty}?{name}={value}{extra}"))),
                ty,
            )
            .send()
            .await
            .unwrap();
            assert_eq!(
                resp.status(),
                200,
                "searchParam {name} of {ty} listed but rejected"
            );
        }
    }
    let fhir_meta: Value = app.get("/fhir/metadata").await.json().await.unwrap();
    assert_eq!(fhir_meta, cap);
    app.stop().await;
}

/// `/readyz` turns 503 when PostgreSQL becomes unreachable and 200 again when it returns,
/// without a restart. The database is reached through a proxy the test cuts and restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_postgres_down_and_back() {
    let db = TestDb::new(Backend::Postgres);
    let proxy = Proxy::start(socket_of(&db.url)).await;
    let url = via_proxy(&db.url, &proxy);
    let mut settings = test_settings(&url);
    settings.database.acquire_timeout_ms = 500;
    let app = TestApp::spawn_on(db, settings).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(app.get("/fhir/Organization").await.status(), 200);

    proxy.down().await;
    let resp = app.get("/readyz").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["checks"]["database"]["status"], "unreachable");
    // Data requests fail clearly too, not hang.
    let started = std::time::Instant::now();
    let resp = app.get("/fhir/Organization").await;
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert_outcome(resp, 503, "unavailable").await;

    proxy.up();
    let mut ready = false;
    for _ in 0..50 {
        if app.get("/readyz").await.status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ready, "/readyz did not recover after PostgreSQL returned");
    assert_eq!(app.get("/fhir/Organization").await.status(), 200);
    app.stop().await;
}

/// With Redis configured, `/readyz` also needs Redis, and recovers when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_redis_down_and_back() {
    let proxy = Proxy::start(socket_of(&redis_url())).await;
    let url = via_proxy(&redis_url(), &proxy);
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.redis.url = yiqiao_gateway::config::Secret::new(url);
        s.redis.timeout_ms = 500;
    })
    .await;
    let body: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(body["checks"]["redis"]["status"], "ok", "{body}");
    proxy.down().await;
    let resp = app.get("/readyz").await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["checks"]["redis"]["status"], "unreachable");
    proxy.up();
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.stop().await;
}

/// The committed OpenAPI document matches what the binary serves. Regenerate with
/// `UPDATE_OPENAPI=1 cargo test -p yiqiao --test api openapi`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_is_committed_and_served() {
    let generated = yiqiao_gateway::routes::docs::openapi_json();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi/yiqiao.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, format!("{generated}\n")).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        committed.trim_end(),
        generated,
        "openapi/yiqiao.json is stale: rerun with UPDATE_OPENAPI=1"
    );
    let app = TestApp::spawn(Backend::Sqlite).await;
    let served: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(served, serde_json::from_str::<Value>(&generated).unwrap());
    for path in ["/admin/institutions", "/fhir/Organization/{id}", "/readyz"] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} missing from OpenAPI"
        );
    }
    let page = app.get("/docs").await.text().await.unwrap();
    assert!(
        page.contains("/docs/redoc.standalone.js") && !page.contains("https://"),
        "docs page must not load from the internet"
    );
    let js = app.get("/docs/redoc.standalone.js").await;
    assert_eq!(js.status(), 200);
    assert!(js.bytes().await.unwrap().len() > 500_000);
    app.stop().await;
}
