//! Institution directory: CRUD, suspension, FHIR views, validation — on both backends.

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, institution};
use crate::on_both_backends;

on_both_backends!(
    create_read_update_suspend,
    duplicates_are_conflicts_and_store_nothing,
    validation_names_the_field_and_stores_nothing,
    fhir_organization_and_endpoint_views,
    fhir_search_paging_and_filters,
    admin_api_requires_the_admin_credential,
    optimistic_concurrency_with_if_match,
);

async fn create_read_update_suspend(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let body = institution(1);
    let resp = app.admin_post("/admin/institutions", &body).await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["location"], "/admin/institutions/hosp-001");
    assert_eq!(resp.headers()["etag"], "W/\"1\"");
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["status"], "active");
    assert_eq!(created["version"], 1);
    assert_eq!(created["endpoint_url"], "https://his-1.example/fhir");
    assert_eq!(created["jwks"], json!({"keys": []}));

    let read: Value = app
        .admin_get("/admin/institutions/hosp-001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read, created);

    let mut changed = body.clone();
    changed["name"] = json!("第一人民医院（新院区）");
    changed["allowed_scopes"] = json!(["system/Patient.rs"]);
    let resp = app
        .admin_put("/admin/institutions/hosp-001", &changed)
        .await;
    assert_eq!(resp.status(), 200);
    let updated: Value = resp.json().await.unwrap();
    assert_eq!(updated["name"], "第一人民医院（新院区）");
    assert_eq!(updated["allowed_scopes"], json!(["system/Patient.rs"]));
    assert_eq!(updated["version"], 2);
    assert_eq!(updated["created_at"], created["created_at"]);

    // The admin credential acting for the institution reads the directory through the
    // replica's cache (filled here); a suspension made through this replica drops the cached
    // entry, so it takes effect at once.
    let on_behalf = || {
        app.client
            .get(app.url("/fhir/Patient?family=nobody"))
            .bearer_auth(ADMIN_TOKEN)
            .header("X-On-Behalf-Of", "hosp-001")
            .send()
    };
    assert_eq!(on_behalf().await.unwrap().status(), 200);
    let resp = app
        .admin_post("/admin/institutions/hosp-001/suspend", &json!({}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_outcome(on_behalf().await.unwrap(), 403, "forbidden").await;
    let suspended: Value = resp.json().await.unwrap();
    assert_eq!(suspended["status"], "suspended");
    assert_eq!(suspended["version"], 3);
    // Suspending again is idempotent.
    let again: Value = app
        .admin_post("/admin/institutions/hosp-001/suspend", &json!({}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["version"], 3);

    let list: Value = app
        .admin_get("/admin/institutions?status=suspended")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let list: Value = app
        .admin_get("/admin/institutions?status=active")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 0);

    let org: Value = app
        .get("/fhir/Organization/hosp-001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(org["active"], false);

    let resp = app
        .admin_post("/admin/institutions/hosp-001/activate", &json!({}))
        .await;
    let active: Value = resp.json().await.unwrap();
    assert_eq!(active["status"], "active");

    assert_outcome(
        app.admin_get("/admin/institutions/nope-404").await,
        404,
        "not-found",
    )
    .await;
    assert_outcome(
        app.admin_post("/admin/institutions/nope-404/suspend", &json!({}))
            .await,
        404,
        "not-found",
    )
    .await;
    app.stop().await;
}

async fn duplicates_are_conflicts_and_store_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    assert_eq!(
        app.admin_post("/admin/institutions", &institution(1))
            .await
            .status(),
        201
    );

    let same_id = institution(1);
    let body = assert_outcome(
        app.admin_post("/admin/institutions", &same_id).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(body["issue"][0]["expression"][0], "id");

    let mut same_uscc = institution(2);
    same_uscc["uscc"] = institution(1)["uscc"].clone();
    let body = assert_outcome(
        app.admin_post("/admin/institutions", &same_uscc).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(body["issue"][0]["expression"][0], "uscc");

    let mut same_system = institution(3);
    same_system["patient_id_system"] = institution(1)["patient_id_system"].clone();
    let body = assert_outcome(
        app.admin_post("/admin/institutions", &same_system).await,
        409,
        "conflict",
    )
    .await;
    assert_eq!(body["issue"][0]["expression"][0], "patient_id_system");

    // An update may not steal another institution's unique values either.
    assert_eq!(
        app.admin_post("/admin/institutions", &institution(4))
            .await
            .status(),
        201
    );
    let mut steal = institution(4);
    steal["uscc"] = institution(1)["uscc"].clone();
    assert_outcome(
        app.admin_put("/admin/institutions/hosp-004", &steal).await,
        409,
        "conflict",
    )
    .await;
    let kept: Value = app
        .admin_get("/admin/institutions/hosp-004")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(kept["uscc"], institution(4)["uscc"]);
    assert_eq!(kept["version"], 1);

    assert_eq!(app.institution_count().await, 2);
    app.stop().await;
}

async fn validation_names_the_field_and_stores_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let cases: Vec<(&str, Value)> = vec![
        ("id", json!("Has Spaces")),
        ("name", json!("   ")),
        ("uscc", json!("91350100M000100Y44")),
        ("region_code", json!("35")),
        ("level", json!("4A")),
        ("kind", json!("pharmacy")),
        ("endpoint_url", json!("https://user:pw@his.example/fhir")),
        ("patient_id_system", json!("urn:oid:1..2")),
        (
            "allowed_scopes[1]",
            json!(["system/Patient.rs", "all-the-things"]),
        ),
        (
            "jwks.keys[0].d",
            json!({"keys": [{"kty": "EC", "kid": "k1", "crv": "P-256", "x": "AA", "y": "AA", "d": "private"}]}),
        ),
        (
            "jwks.keys[0].crv",
            json!({"keys": [{"kty": "EC", "kid": "k1", "crv": "P-521", "x": "AA", "y": "AA"}]}),
        ),
        (
            "sm2_keys[0].pem",
            json!([{"kid": "s1", "pem": "-----BEGIN PUBLIC KEY-----\n!!!\n-----END PUBLIC KEY-----"}]),
        ),
    ];
    for (field, value) in cases {
        let mut body = institution(7);
        let key = field.split(['[', '.']).next().unwrap();
        body[key] = value;
        let resp = app.admin_post("/admin/institutions", &body).await;
        let outcome = assert_outcome(resp, 422, "validation-failed").await;
        assert_eq!(outcome["issue"][0]["expression"][0], field, "{outcome}");
    }
    assert_eq!(
        app.institution_count().await,
        0,
        "a rejected registration left a row behind"
    );
    app.stop().await;
}

async fn fhir_organization_and_endpoint_views(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.admin_post("/admin/institutions", &institution(1)).await;
    let mut no_endpoint = institution(2);
    no_endpoint["endpoint_url"] = Value::Null;
    no_endpoint["kind"] = json!("public_health");
    no_endpoint["level"] = json!("unrated");
    app.admin_post("/admin/institutions", &no_endpoint).await;

    let resp = app.get("/fhir/Organization/hosp-001").await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let org: Value = resp.json().await.unwrap();
    assert_eq!(org["resourceType"], "Organization");
    assert_eq!(org["id"], "hosp-001");
    assert_eq!(org["name"], "第1人民医院");
    assert_eq!(org["active"], true);
    assert_eq!(org["identifier"][0]["value"], institution(1)["uscc"]);
    assert_eq!(org["endpoint"][0]["reference"], "Endpoint/hosp-001");
    assert_eq!(org["type"][0]["coding"][1]["code"], "hospital");

    let ep: Value = app
        .get("/fhir/Endpoint/hosp-001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ep["resourceType"], "Endpoint");
    assert_eq!(ep["address"], "https://his-1.example/fhir");
    assert_eq!(ep["status"], "active");
    assert_eq!(
        ep["managingOrganization"]["reference"],
        "Organization/hosp-001"
    );
    assert_eq!(ep["connectionType"]["code"], "hl7-fhir-rest");

    let org2: Value = app
        .get("/fhir/Organization/hosp-002")
        .await
        .json()
        .await
        .unwrap();
    assert!(org2.get("endpoint").is_none());
    assert_outcome(app.get("/fhir/Endpoint/hosp-002").await, 404, "not-found").await;
    assert_outcome(app.get("/fhir/Organization/none").await, 404, "not-found").await;
    app.stop().await;
}

async fn fhir_search_paging_and_filters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    for n in 1..=5 {
        assert_eq!(
            app.admin_post("/admin/institutions", &institution(n))
                .await
                .status(),
            201
        );
    }
    app.admin_post("/admin/institutions/hosp-005/suspend", &json!({}))
        .await;

    let page1: Value = app
        .get("/fhir/Organization?_count=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page1["type"], "searchset");
    let ids: Vec<&str> = page1["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hosp-001", "hosp-002"]);
    let next = page1["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let page2: Value = app
        .client
        .get(&next)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = page2["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["hosp-003", "hosp-004"]);
    let page3_url = page2["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let page3: Value = app
        .client
        .get(&page3_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page3["entry"].as_array().unwrap().len(), 1);
    assert!(
        page3["link"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["relation"] != "next")
    );

    let active: Value = app
        .get("/fhir/Organization?active=true")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(active["entry"].as_array().unwrap().len(), 4);
    let by_name: Value = app
        .get("/fhir/Organization?name=%E7%AC%AC3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_name["entry"][0]["resource"]["id"], "hosp-003");
    assert_eq!(by_name["entry"].as_array().unwrap().len(), 1);
    let uscc = institution(2)["uscc"].as_str().unwrap().to_string();
    let by_uscc: Value = app
        .get(&format!(
            "/fhir/Organization?identifier=https://yiqiao.health/fhir/sid/uscc|{uscc}"
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_uscc["entry"].as_array().unwrap().len(), 1);
    assert_eq!(by_uscc["entry"][0]["resource"]["id"], "hosp-002");
    let eps: Value = app
        .get("/fhir/Endpoint?organization=Organization/hosp-004")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        eps["entry"][0]["resource"]["address"],
        "https://his-4.example/fhir"
    );
    let suspended: Value = app
        .get("/fhir/Endpoint?status=suspended")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(suspended["entry"].as_array().unwrap().len(), 1);

    let bad = assert_outcome(
        app.get("/fhir/Organization?nmae=x").await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_eq!(bad["issue"][0]["expression"][0], "nmae");
    assert_outcome(
        app.get("/fhir/Organization?_count=0").await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        app.get("/fhir/Organization?active=maybe").await,
        400,
        "invalid-parameter",
    )
    .await;
    app.stop().await;
}

async fn admin_api_requires_the_admin_credential(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app
        .client
        .post(app.url("/admin/institutions"))
        .json(&institution(1))
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_outcome(resp, 401, "unauthenticated").await;
    let resp = app
        .client
        .get(app.url("/admin/institutions"))
        .bearer_auth("wrong-token")
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    assert_eq!(app.institution_count().await, 0);
    app.stop().await;

    // With no admin token configured, no bearer value (not even an empty one) is the admin
    // credential; the admin API stays reachable only by people with the admin role (OIDC).
    let app = TestApp::spawn_with(backend, |s| s.admin_token = Default::default()).await;
    for presented in ["", ADMIN_TOKEN] {
        let resp = app
            .client
            .get(app.url("/admin/institutions"))
            .bearer_auth(presented)
            .send()
            .await
            .unwrap();
        assert_outcome(resp, 401, "unauthenticated").await;
    }
    app.stop().await;
}

async fn optimistic_concurrency_with_if_match(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    app.admin_post("/admin/institutions", &institution(1)).await;
    let mut body = institution(1);
    body["name"] = json!("改名一");
    let resp = app
        .client
        .put(app.url("/admin/institutions/hosp-001"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .header("If-Match", "W/\"1\"")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    body["name"] = json!("改名二");
    let stale = app
        .client
        .put(app.url("/admin/institutions/hosp-001"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .header("If-Match", "W/\"1\"")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_outcome(stale, 412, "version-conflict").await;
    let read: Value = app
        .admin_get("/admin/institutions/hosp-001")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["name"], "改名一");
    let mismatch = assert_outcome(
        app.admin_put("/admin/institutions/hosp-002", &institution(1))
            .await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(mismatch["issue"][0]["expression"][0], "id");
    app.stop().await;
}
