//! EMPI over HTTP on both backends: the FHIR Patient feed, PDQm, PIXm, `$match`, persons,
//! merge/unmerge, the review queue and the registration race.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use yiqiao_registry::empi::ident::check_character;
use yiqiao_registry::empi::store as empi;

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, institution};
use crate::on_both_backends;

const RID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

/// A valid 18-character resident ID for a birth date and a sequence number.
fn rid(birth: &str, seq: u32) -> String {
    let first17 = format!("350102{}{seq:03}", birth.replace('-', ""));
    let check = check_character(&first17).unwrap();
    format!("{first17}{check}")
}

struct Person<'a> {
    family: &'a str,
    given: &'a str,
    gender: &'a str,
    birth: &'a str,
    rid: Option<String>,
    phone: Option<&'a str>,
}

fn patient(inst: u32, local: &str, p: &Person) -> Value {
    let mut identifiers = vec![json!({ "system": system(inst), "value": local })];
    if let Some(r) = &p.rid {
        identifiers.push(json!({ "system": RID_SYSTEM, "value": r }));
    }
    let mut body = json!({
        "resourceType": "Patient",
        "identifier": identifiers,
        "name": [{ "use": "official", "family": p.family, "given": [p.given] }],
        "gender": p.gender,
        "birthDate": p.birth,
    });
    if let Some(phone) = p.phone {
        body["telecom"] = json!([{ "system": "phone", "value": phone }]);
    }
    body
}

async fn app_with_institutions(backend: Backend, n: u32) -> TestApp {
    let app = TestApp::spawn_with(backend, |s| {
        s.database.pool_size = 12;
        s.database.acquire_timeout_ms = 20_000;
    })
    .await;
    for i in 1..=n {
        let mut inst = institution(i);
        inst["allowed_scopes"] = json!(["system/Patient.cruds"]);
        let resp = app.admin_post("/admin/institutions", &inst).await;
        assert_eq!(resp.status(), 201);
    }
    app
}

fn inst_id(n: u32) -> String {
    format!("hosp-{n:03}")
}

async fn post_as(app: &TestApp, inst: u32, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn put_as(app: &TestApp, inst: u32, path: &str, body: &Value) -> reqwest::Response {
    app.client
        .put(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get_as(app: &TestApp, inst: u32, path: &str) -> reqwest::Response {
    app.client
        .get(app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", inst_id(inst))
        .send()
        .await
        .unwrap()
}

/// The enterprise person of a registered Patient (its extension).
pub(crate) fn person_of(p: &Value) -> String {
    p["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "https://yiqiao.health/fhir/StructureDefinition/enterprise-person")
        .map(|e| e["valueIdentifier"]["value"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no enterprise person on {p}"))
}

async fn register(app: &TestApp, inst: u32, local: &str, p: &Person<'_>) -> Value {
    let resp = post_as(app, inst, "/fhir/Patient", &patient(inst, local, p)).await;
    assert!(
        resp.status() == 201 || resp.status() == 200,
        "{}",
        resp.status()
    );
    resp.json().await.unwrap()
}

fn wang(rid: Option<String>) -> Person<'static> {
    Person {
        family: "王",
        given: "秀英",
        gender: "female",
        birth: "1980-03-15",
        rid,
        phone: Some("13812345678"),
    }
}

async fn search_count(app: &TestApp, query: &str) -> usize {
    let resp = get_as(app, 1, &format!("/fhir/Patient?{query}")).await;
    assert_eq!(resp.status(), 200, "{query}");
    let b: Value = resp.json().await.unwrap();
    assert_eq!(b["type"], "searchset");
    b["entry"].as_array().map_or(0, Vec::len)
}

async fn registration_is_idempotent_and_validated(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    let body = patient(1, "MR-001", &wang(Some(rid("1980-03-15", 12))));
    let resp = post_as(&app, 1, "/fhir/Patient", &body).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().contains_key("location"));
    let first: Value = resp.json().await.unwrap();
    assert_eq!(first["resourceType"], "Patient");
    assert_eq!(first["meta"]["versionId"], "1");
    let person = person_of(&first);

    // Same content again: nothing new.
    let resp = post_as(&app, 1, "/fhir/Patient", &body).await;
    assert_eq!(resp.status(), 200);
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["meta"]["versionId"], "1");
    assert_eq!(search_count(&app, "identifier=MR-001").await, 1);

    // Changed content through the conditional update: same record, new version, re-matched.
    let mut changed = body.clone();
    changed["telecom"] = json!([{ "system": "phone", "value": "13900000000" }]);
    let path = format!("/fhir/Patient?identifier={}|MR-001", system(1));
    let resp = put_as(&app, 1, &path, &changed).await;
    assert_eq!(resp.status(), 200);
    let updated: Value = resp.json().await.unwrap();
    assert_eq!(updated["id"], first["id"]);
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(person_of(&updated), person);
    assert_eq!(search_count(&app, "telecom=13900000000").await, 1);
    assert_eq!(search_count(&app, "telecom=13812345678").await, 0);

    // Conditional update of an unknown identifier creates.
    let path2 = format!("/fhir/Patient?identifier={}|MR-002", system(1));
    let other = patient(1, "MR-002", &wang(None));
    assert_eq!(put_as(&app, 1, &path2, &other).await.status(), 201);

    // Validation: each names its field; nothing is stored.
    let mut no_own = body.clone();
    no_own["identifier"] = json!([{ "system": system(2), "value": "X1" }]);
    let out = assert_outcome(
        post_as(&app, 1, "/fhir/Patient", &no_own).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(out["issue"][0]["expression"][0], "Patient.identifier");
    for (field, value, expr) in [
        ("gender", json!("f"), "Patient.gender"),
        ("birthDate", json!("15/03/1980"), "Patient.birthDate"),
        ("name", json!([]), "Patient.name"),
        ("resourceType", json!("Person"), "Patient.resourceType"),
    ] {
        let mut bad = patient(1, "MR-BAD", &wang(None));
        bad[field] = value;
        let out = assert_outcome(
            post_as(&app, 1, "/fhir/Patient", &bad).await,
            422,
            "validation-failed",
        )
        .await;
        assert_eq!(out["issue"][0]["expression"][0], expr);
    }
    // URL and body identifiers must agree.
    let out = assert_outcome(
        put_as(&app, 1, &path, &other).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(out["issue"][0]["expression"][0], "Patient.identifier");
    assert_eq!(search_count(&app, "identifier=MR-BAD").await, 0);

    // Credentials and scopes.
    let resp = app
        .client
        .post(app.url("/fhir/Patient"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    let mut read_only = institution(3);
    read_only["allowed_scopes"] = json!(["system/Patient.rs"]);
    assert_eq!(
        app.admin_post("/admin/institutions", &read_only)
            .await
            .status(),
        201
    );
    assert_outcome(
        post_as(&app, 3, "/fhir/Patient", &patient(3, "A", &wang(None))).await,
        403,
        "forbidden",
    )
    .await;
    app.stop().await;
}

async fn variants_of_one_person_link_and_others_stay_apart(backend: Backend) {
    let app = app_with_institutions(backend, 3).await;
    let id = rid("1980-03-15", 12);
    let a = register(&app, 1, "A1", &wang(Some(id.clone()))).await;
    // Homophone given name (英 → 瑛), same resident ID, other institution.
    let b = register(
        &app,
        2,
        "B1",
        &Person {
            given: "秀瑛",
            ..wang(Some(id.clone()))
        },
    )
    .await;
    // Typo in the resident ID's check character (untrusted), same name, phone and birth date.
    let mut typo = id.clone();
    typo.pop();
    typo.push(if id.ends_with('1') { '2' } else { '1' });
    let c = register(&app, 3, "C1", &wang(Some(typo))).await;
    let p = person_of(&a);
    assert_eq!(person_of(&b), p, "homophone linked");
    assert_eq!(person_of(&c), p, "typo linked");

    // Same common name, different birth date, ID and phone: a different person.
    let d = register(
        &app,
        2,
        "B2",
        &Person {
            birth: "1975-07-02",
            rid: Some(rid("1975-07-02", 31)),
            phone: Some("13700001111"),
            ..wang(None)
        },
    )
    .await;
    assert_ne!(person_of(&d), p);
    // A different name entirely.
    let e = register(
        &app,
        1,
        "A2",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: Some(rid("1962-10-01", 51)),
            phone: None,
        },
    )
    .await;
    assert_ne!(person_of(&e), p);
    assert_ne!(person_of(&e), person_of(&d));

    // The person's golden record and link evidence.
    let resp = app.admin_get(&format!("/empi/persons/{p}")).await;
    assert_eq!(resp.status(), 200);
    let person: Value = resp.json().await.unwrap();
    assert_eq!(person["records"].as_array().unwrap().len(), 3);
    assert_eq!(person["golden"]["resident_id"], id);
    assert_eq!(person["golden"]["birth_date"], "1980-03-15");
    let auto: Vec<&Value> = person["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["link"]["score"].is_number())
        .collect();
    assert_eq!(auto.len(), 2, "two records linked by score: {person}");
    for r in auto {
        assert_eq!(r["link"]["decided_by"], "auto");
        assert_eq!(r["link"]["explanation"].as_array().unwrap().len(), 7);
    }
    app.stop().await;
}

async fn pdqm_filters(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    let id = rid("1980-03-15", 12);
    register(&app, 1, "A1", &wang(Some(id.clone()))).await;
    register(
        &app,
        2,
        "B1",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: None,
            phone: Some("13700001111"),
        },
    )
    .await;
    for (query, expected) in [
        ("family=王", 1),
        ("family=李&given=建", 1),
        ("given=秀英", 1),
        ("name=wang", 1),
        ("name=jianguo", 1),
        ("name=zhou", 0),
        ("birthdate=1980-03-15", 1),
        ("birthdate=1980-03-16", 0),
        ("gender=male&name=jianguo", 1),
        ("gender=female&name=jianguo", 0),
        ("gender=female&family=李", 0),
        ("identifier=A1", 1),
        (&format!("identifier={}|B1", system(2)), 1),
        (&format!("identifier={}|B1", system(1)), 0),
        (&format!("identifier={RID_SYSTEM}|{id}"), 1),
        ("telecom=13700001111", 1),
        ("telecom=+86%20137%200000%201111", 1),
        ("name=i", 2),
    ] {
        assert_eq!(search_count(&app, query).await, expected, "{query}");
    }
    // A search must name whom it looks for: no criterion, or only gender, is refused.
    for query in ["", "gender=male", "_count=1"] {
        assert_outcome(
            get_as(&app, 1, &format!("/fhir/Patient?{query}")).await,
            400,
            "invalid-parameter",
        )
        .await;
    }
    // Paging.
    let b: Value = get_as(&app, 1, "/fhir/Patient?name=i&_count=1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(b["entry"].as_array().unwrap().len(), 1);
    assert!(
        b["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next")
    );
    assert_outcome(
        get_as(&app, 1, "/fhir/Patient?surname=x").await,
        400,
        "invalid-parameter",
    )
    .await;
    assert_outcome(
        get_as(&app, 1, "/fhir/Patient?birthdate=1980").await,
        400,
        "invalid-parameter",
    )
    .await;
    app.stop().await;
}

async fn pixm_cross_references(backend: Backend) {
    let app = app_with_institutions(backend, 3).await;
    let id = rid("1980-03-15", 12);
    let a = register(&app, 1, "A1", &wang(Some(id.clone()))).await;
    let b = register(&app, 2, "B1", &wang(Some(id.clone()))).await;
    register(
        &app,
        3,
        "C1",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: None,
            phone: None,
        },
    )
    .await;
    let path = format!("/fhir/Patient/$ihe-pix?sourceIdentifier={}|A1", system(1));
    let resp = get_as(&app, 3, &path).await;
    assert_eq!(resp.status(), 200);
    let params: Value = resp.json().await.unwrap();
    assert_eq!(params["resourceType"], "Parameters");
    let p = params["parameter"].as_array().unwrap();
    let idents: BTreeSet<(String, String)> = p
        .iter()
        .filter(|x| x["name"] == "targetIdentifier")
        .map(|x| {
            (
                x["valueIdentifier"]["system"].as_str().unwrap().to_string(),
                x["valueIdentifier"]["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        idents,
        BTreeSet::from([
            (system(2), "B1".to_string()),
            (
                "https://yiqiao.health/fhir/sid/empi".to_string(),
                person_of(&a)
            ),
        ])
    );
    let target_ids: Vec<&str> = p
        .iter()
        .filter(|x| x["name"] == "targetId")
        .map(|x| x["valueReference"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        target_ids,
        vec![format!("Patient/{}", b["id"].as_str().unwrap())]
    );
    // By resident ID, restricted to institution 1's system.
    let path = format!(
        "/fhir/Patient/$ihe-pix?sourceIdentifier={RID_SYSTEM}|{id}&targetSystem={}",
        system(1)
    );
    let params: Value = get_as(&app, 3, &path).await.json().await.unwrap();
    let p = params["parameter"].as_array().unwrap();
    let values: Vec<&str> = p
        .iter()
        .filter(|x| x["name"] == "targetIdentifier")
        .map(|x| x["valueIdentifier"]["value"].as_str().unwrap())
        .collect();
    assert!(values == vec!["A1"] || values.is_empty(), "{params}");
    // The lonely patient has no cross-references but its enterprise id.
    let path = format!("/fhir/Patient/$ihe-pix?sourceIdentifier={}|C1", system(3));
    let params: Value = get_as(&app, 1, &path).await.json().await.unwrap();
    assert_eq!(params["parameter"].as_array().unwrap().len(), 1);
    // Unknown identifier → 404; missing parameter → 400.
    let path = format!("/fhir/Patient/$ihe-pix?sourceIdentifier={}|NONE", system(3));
    assert_outcome(get_as(&app, 1, &path).await, 404, "not-found").await;
    assert_outcome(
        get_as(&app, 1, "/fhir/Patient/$ihe-pix").await,
        400,
        "invalid-parameter",
    )
    .await;
    app.stop().await;
}

fn match_params(patient: Value, extra: Vec<Value>) -> Value {
    let mut p = vec![json!({ "name": "resource", "resource": patient })];
    p.extend(extra);
    json!({ "resourceType": "Parameters", "parameter": p })
}

fn grade_of(entry: &Value) -> &str {
    entry["search"]["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "http://hl7.org/fhir/StructureDefinition/match-grade")
        .and_then(|e| e["valueCode"].as_str())
        .unwrap()
}

async fn match_scores_and_grades(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    let id = rid("1980-03-15", 12);
    let a = register(&app, 1, "A1", &wang(Some(id.clone()))).await;
    register(&app, 2, "B1", &wang(Some(id.clone()))).await;
    register(
        &app,
        2,
        "B2",
        &Person {
            given: "秀兰",
            birth: "1980-03-16",
            rid: None,
            phone: None,
            ..wang(None)
        },
    )
    .await;
    // The full demographics: a certain match, one entry per enterprise person.
    let query = json!({
        "resourceType": "Patient",
        "identifier": [{ "system": RID_SYSTEM, "value": id }],
        "name": [{ "text": "王秀英" }],
        "gender": "female",
        "birthDate": "1980-03-15",
    });
    let resp = post_as(
        &app,
        2,
        "/fhir/Patient/$match",
        &match_params(query.clone(), vec![]),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let bundle: Value = resp.json().await.unwrap();
    let entries = bundle["entry"].as_array().unwrap();
    assert!(!entries.is_empty());
    let best = &entries[0];
    assert_eq!(grade_of(best), "certain");
    assert!(best["search"]["score"].as_f64().unwrap() > 0.99, "{best}");
    assert_eq!(person_of(&best["resource"]), person_of(&a));
    let persons: BTreeSet<String> = entries.iter().map(|e| person_of(&e["resource"])).collect();
    assert_eq!(persons.len(), entries.len());
    let explanation = best["search"]["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == "https://yiqiao.health/fhir/StructureDefinition/match-explanation")
        .unwrap();
    let fields: Vec<&str> = explanation["extension"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        vec![
            "Name",
            "BirthDate",
            "Sex",
            "ResidentId",
            "OtherId",
            "Phone",
            "Address"
        ]
    );
    // Scores are ordered; grades weaken with the score.
    let scores: Vec<f64> = entries
        .iter()
        .map(|e| e["search"]["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // A weak query: name only; onlyCertainMatches drops everything uncertain.
    let weak = json!({ "resourceType": "Patient", "name": [{ "text": "王秀英" }], "birthDate": "1980-03-15" });
    let all: Value = post_as(
        &app,
        1,
        "/fhir/Patient/$match",
        &match_params(weak.clone(), vec![]),
    )
    .await
    .json()
    .await
    .unwrap();
    let certain: Value = post_as(
        &app,
        1,
        "/fhir/Patient/$match",
        &match_params(
            weak,
            vec![json!({ "name": "onlyCertainMatches", "valueBoolean": true })],
        ),
    )
    .await
    .json()
    .await
    .unwrap();
    let all = all["entry"].as_array().unwrap();
    assert!(!all.is_empty());
    let certain = certain["entry"].as_array().unwrap();
    assert!(certain.iter().all(|e| grade_of(e) == "certain"));
    assert!(certain.len() <= all.len());
    // count.
    let one: Value = post_as(
        &app,
        1,
        "/fhir/Patient/$match",
        &match_params(
            query.clone(),
            vec![json!({ "name": "count", "valueInteger": 1 })],
        ),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(one["entry"].as_array().unwrap().len(), 1);
    // Nothing was stored by $match.
    let store = app.state.store.clone();
    let stored: i64 = tokio::task::spawn_blocking(move || {
        use diesel::prelude::*;
        use yiqiao_registry::store::schema::empi_source_records as records;
        let mut conn = store.conn().unwrap();
        records::table.count().get_result(&mut *conn).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(stored, 3);
    // Invalid input names the parameter.
    let out = assert_outcome(
        post_as(
            &app,
            1,
            "/fhir/Patient/$match",
            &match_params(query, vec![json!({ "name": "count", "valueInteger": 0 })]),
        )
        .await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(
        out["issue"][0]["expression"][0],
        "Parameters.parameter[1].valueInteger"
    );
    assert_outcome(
        post_as(
            &app,
            1,
            "/fhir/Patient/$match",
            &json!({ "resourceType": "Parameters", "parameter": [] }),
        )
        .await,
        422,
        "validation-failed",
    )
    .await;
    app.stop().await;
}

/// The person view without volatile fields (events, version), for round-trip comparison.
async fn person_state(app: &TestApp, id: &str) -> Value {
    let mut p: Value = app
        .admin_get(&format!("/empi/persons/{id}"))
        .await
        .json()
        .await
        .unwrap();
    p.as_object_mut().unwrap().remove("events");
    p.as_object_mut().unwrap().remove("version");
    p
}

async fn merge_unmerge_round_trip(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    let a = register(&app, 1, "A1", &wang(Some(rid("1980-03-15", 12)))).await;
    let a2 = register(&app, 2, "B1", &wang(Some(rid("1980-03-15", 12)))).await;
    let b = register(
        &app,
        2,
        "B2",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: None,
            phone: None,
        },
    )
    .await;
    let (pa, pb) = (person_of(&a), person_of(&b));
    assert_eq!(person_of(&a2), pa);
    assert_ne!(pa, pb);
    let before = (person_state(&app, &pa).await, person_state(&app, &pb).await);

    let resp = app
        .admin_post(
            &format!("/empi/persons/{pa}/$merge"),
            &json!({ "source": pb }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let merged = person_state(&app, &pa).await;
    assert_eq!(merged["records"].as_array().unwrap().len(), 3);
    let gone = person_state(&app, &pb).await;
    assert_eq!(gone["status"], "merged");
    assert_eq!(gone["merged_into"], pa);
    // PIXm follows the merge.
    let path = format!("/fhir/Patient/$ihe-pix?sourceIdentifier={}|A1", system(1));
    let params: Value = get_as(&app, 1, &path).await.json().await.unwrap();
    assert!(params.to_string().contains("\"B2\""), "{params}");
    // A merged-away person cannot be merged again.
    assert_outcome(
        app.admin_post(
            &format!("/empi/persons/{pa}/$merge"),
            &json!({ "source": pb }),
        )
        .await,
        409,
        "conflict",
    )
    .await;

    let resp = app
        .admin_post(
            &format!("/empi/persons/{pa}/$unmerge"),
            &json!({ "source": pb }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let after = (person_state(&app, &pa).await, person_state(&app, &pb).await);
    assert_eq!(after, before, "unmerge restores exactly the state before");
    // Undone once only.
    assert_outcome(
        app.admin_post(
            &format!("/empi/persons/{pa}/$unmerge"),
            &json!({ "source": pb }),
        )
        .await,
        409,
        "conflict",
    )
    .await;
    // The event log has the lineage.
    let events: Value = app
        .admin_get(&format!("/empi/persons/{pa}"))
        .await
        .json()
        .await
        .unwrap();
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.ends_with(&["merge", "unmerge"]), "{kinds:?}");
    assert_outcome(
        app.admin_post(
            &format!("/empi/persons/{pa}/$merge"),
            &json!({ "source": "nope" }),
        )
        .await,
        404,
        "not-found",
    )
    .await;
    assert_outcome(app.admin_get("/empi/persons/nope").await, 404, "not-found").await;
    app.stop().await;
}

/// 2 institutions × 20 persons registered all at once: exactly 20 enterprise persons.
async fn concurrent_registrations_make_one_person_each(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    const GIVEN: [&str; 20] = [
        "建国", "建军", "国庆", "志强", "秀兰", "桂英", "丽娟", "海燕", "振华", "文斌", "春梅",
        "晓明", "红霞", "玉兰", "德明", "永红", "立新", "淑珍", "雪梅", "俊杰",
    ];
    let mut futures = Vec::new();
    for (i, given) in GIVEN.iter().enumerate() {
        let birth = format!("19{:02}-0{}-1{}", 50 + i, 1 + i % 9, i % 10);
        for inst in [1u32, 2] {
            let p = Person {
                family: "陈",
                given,
                gender: if i % 2 == 0 { "male" } else { "female" },
                birth: &birth,
                rid: Some(rid(&birth, i as u32 + 1)),
                phone: None,
            };
            let body = patient(inst, &format!("P{i}"), &p);
            let app = &app;
            futures.push(async move {
                let resp = post_as(app, inst, "/fhir/Patient", &body).await;
                assert_eq!(resp.status(), 201);
                let v: Value = resp.json().await.unwrap();
                (i, v["id"].as_str().unwrap().to_string())
            });
        }
    }
    let created = futures::future::join_all(futures).await;
    let mut persons: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for (i, id) in created {
        let p: Value = get_as(&app, 1, &format!("/fhir/Patient/{id}"))
            .await
            .json()
            .await
            .unwrap();
        persons.entry(i).or_default().insert(person_of(&p));
    }
    let all: BTreeSet<&String> = persons.values().flatten().collect();
    assert_eq!(all.len(), 20, "{persons:?}");
    assert!(persons.values().all(|p| p.len() == 1));
    app.stop().await;
}

/// A steward's decisions survive re-estimation and re-registration.
async fn manual_decisions_survive_reestimate(backend: Backend) {
    let app = app_with_institutions(backend, 2).await;
    // Same name and birth date, nothing else: the matcher may not link them automatically;
    // the steward decides they are the same person (via merge) …
    let a = register(
        &app,
        1,
        "A1",
        &Person {
            rid: None,
            phone: None,
            ..wang(None)
        },
    )
    .await;
    let b = register(
        &app,
        2,
        "B1",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: None,
            phone: None,
        },
    )
    .await;
    let (pa, pb) = (person_of(&a), person_of(&b));
    assert_ne!(pa, pb);
    let resp = app
        .admin_post(
            &format!("/empi/persons/{pa}/$merge"),
            &json!({ "source": pb }),
        )
        .await;
    assert_eq!(resp.status(), 200);
    // … and a review item between two near-identical records is kept separate.
    register(
        &app,
        1,
        "T1",
        &Person {
            given: "建军",
            birth: "1990-01-01",
            ..wang(Some(rid("1990-01-01", 7)))
        },
    )
    .await;
    let twin = register(
        &app,
        2,
        "T2",
        &Person {
            given: "建军",
            birth: "1990-01-01",
            ..wang(Some(rid("1990-01-01", 9)))
        },
    )
    .await;
    let review: Value = app.admin_get("/empi/review").await.json().await.unwrap();
    let items = review["items"].as_array().unwrap().clone();

    // Re-estimate from the stored pairs (what `yiqiao mpi reestimate` runs).
    let auditor = yiqiao_gateway::service::offline::OfflineAuditor::open(
        &app.state.settings,
        app.state.store.clone(),
        "cli:test".into(),
    )
    .unwrap();
    let done = tokio::task::spawn_blocking(move || {
        let event = auditor.event("update", "U", "EmpiModel/current".into());
        auditor
            .change(event, |tx, _| empi::reestimate(tx, 0.999, 0.5, 1))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let done = done.unwrap();
    assert_eq!(done.version, 1);

    // Re-register B1 with a changed phone: the merge decision holds.
    let mut changed = patient(
        2,
        "B1",
        &Person {
            family: "李",
            given: "建国",
            gender: "male",
            birth: "1962-10-01",
            rid: None,
            phone: Some("13600000000"),
        },
    );
    changed["address"] = json!([{ "text": "福建省福州市鼓楼区五四路1号" }]);
    let resp = post_as(&app, 2, "/fhir/Patient", &changed).await;
    assert_eq!(resp.status(), 200);
    let b_again: Value = resp.json().await.unwrap();
    assert_eq!(person_of(&b_again), pa, "merge decision kept");
    let person = person_state(&app, &pa).await;
    let b_link = person["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == b["id"])
        .unwrap();
    assert_eq!(b_link["link"]["decided_by"], "merge");

    // Review decisions: keep the pair separate, then re-register the twin: still separate.
    if let Some(item) = items.first() {
        let id = item["id"].as_str().unwrap();
        let resp = app
            .admin_post(
                &format!("/empi/review/{id}/keep-separate"),
                &json!({ "note": "twins" }),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let resolved: Value = resp.json().await.unwrap();
        assert_eq!(resolved["status"], "kept-separate");
        assert_eq!(resolved["resolver"], "operator:admin");
        let mut again = patient(
            2,
            "T2",
            &Person {
                given: "建军",
                birth: "1990-01-01",
                ..wang(Some(rid("1990-01-01", 9)))
            },
        );
        again["telecom"] = json!([{ "system": "phone", "value": "13812340000" }]);
        let t2: Value = post_as(&app, 2, "/fhir/Patient", &again)
            .await
            .json()
            .await
            .unwrap();
        let (ra, rb) = (
            item["record_a"].as_str().unwrap(),
            item["record_b"].as_str().unwrap(),
        );
        let other = if ra == t2["id"].as_str().unwrap() {
            rb
        } else {
            ra
        };
        let other: Value = get_as(&app, 1, &format!("/fhir/Patient/{other}"))
            .await
            .json()
            .await
            .unwrap();
        assert_ne!(person_of(&t2), person_of(&other), "kept separate");
        assert_outcome(
            app.admin_post(&format!("/empi/review/{id}/link"), &json!({}))
                .await,
            409,
            "conflict",
        )
        .await;
    } else {
        panic!("expected a review item for the near-identical pair, twin {twin}");
    }
    app.stop().await;
}

on_both_backends!(
    registration_is_idempotent_and_validated,
    variants_of_one_person_link_and_others_stay_apart,
    pdqm_filters,
    pixm_cross_references,
    match_scores_and_grades,
    merge_unmerge_round_trip,
    concurrent_registrations_make_one_person_each,
    manual_decisions_survive_reestimate,
    patient_data_exits_are_audited,
);

#[derive(diesel::QueryableByName)]
struct AuditRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    subtype_code: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    patient_id: Option<String>,
}

/// Every Patient exit (registration, read, PDQm, PIXm, `$match`) leaves an audit record naming
/// the requesting institution, before the data is sent.
async fn patient_data_exits_are_audited(backend: Backend) {
    use diesel::RunQueryDsl;
    let app = app_with_institutions(backend, 2).await;
    let stored = register(&app, 1, "MRN-A1", &wang(Some(rid("1980-03-15", 12)))).await;
    let person = person_of(&stored);
    let id = stored["id"].as_str().unwrap().to_string();
    assert_eq!(
        get_as(&app, 2, &format!("/fhir/Patient/{id}"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get_as(&app, 2, "/fhir/Patient?family=%E7%8E%8B")
            .await
            .status(),
        200
    );
    let pix = format!(
        "/fhir/Patient/$ihe-pix?sourceIdentifier={}|MRN-A1",
        system(1)
    );
    assert_eq!(get_as(&app, 2, &pix).await.status(), 200);
    let m = match_params(patient(2, "MRN-B1", &wang(None)), vec![]);
    assert_eq!(
        post_as(&app, 2, "/fhir/Patient/$match", &m).await.status(),
        200
    );

    let store = app.state.store.clone();
    let by_inst2 = inst_id(2);
    let rows: Vec<AuditRow> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::sql_query(format!(
            "SELECT subtype_code, patient_id FROM audit_events WHERE agent_institution = '{by_inst2}' ORDER BY seq"
        ))
        .load(&mut *conn)
        .unwrap()
    })
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.subtype_code.as_str()).collect();
    assert_eq!(
        kinds,
        ["read", "search-type", "operation", "search-type"],
        "{kinds:?}"
    );
    assert_eq!(rows[0].patient_id.as_deref(), Some(person.as_str()));
    assert_eq!(rows[2].patient_id.as_deref(), Some(person.as_str()));
    app.stop().await;
}
