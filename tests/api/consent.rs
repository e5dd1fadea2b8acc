//! Consent and access policy (issue 5) end to end: the FHIR Consent API, enforcement at the
//! Patient exits (read, PDQm, PIXm, $match) with masking, revocation seen at once by a second
//! replica sharing the database (and Redis on PostgreSQL), the policy simulator, and the audit
//! record of every decision — on SQLite and PostgreSQL.

use serde_json::{Value, json};
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_registry::empi::ident::check_character;
use yiqiao_sm::{DEFAULT_SIGNER_ID, Sm2PrivateKey, sign_jws};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TestApp, TestDb, assert_outcome, audit_rows, institution, redis_url,
    test_settings,
};
use crate::on_both_backends;

const RID_SYSTEM: &str = "urn:oid:2.16.156.10011.1.1";
const PSEUDONYM_KEY: &str = "00112233445566778899aabbccddeeff";
/// The steward credential: records permits that name a third institution (a member may not).
pub const STEWARD_TOKEN: &str = "test-steward-token-0123456789";

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

fn rid() -> String {
    let first17 = "35010219800315123";
    format!("{first17}{}", check_character(first17).unwrap())
}

/// 张三丰 as hospital 1 registers him.
fn zhang(security: Option<Value>) -> Value {
    let mut p = json!({
        "resourceType": "Patient",
        "identifier": [
            { "system": system(1), "value": "MR-0001" },
            { "system": RID_SYSTEM, "value": rid() },
        ],
        "name": [{ "use": "official", "text": "张三丰", "family": "张", "given": ["三丰"] }],
        "telecom": [{ "system": "phone", "value": "13812345678" }],
        "gender": "male",
        "birthDate": "1980-03-15",
        "address": [{ "text": "福建省福州市鼓楼区五四路100号", "city": "福州市", "district": "鼓楼区" }],
    });
    if let Some(s) = security {
        p["meta"] = json!({ "security": s });
    }
    p
}

fn base_settings(s: &mut Settings) {
    s.steward_token = Secret::new(STEWARD_TOKEN);
    s.auth.ip_burst = 10_000;
    s.auth.institution_burst = 10_000;
    s.consent.pseudonym_key = Secret::new(PSEUDONYM_KEY);
}

fn opt_in(s: &mut Settings) {
    base_settings(s);
    s.consent.policy.default_mode = yiqiao_consent::DefaultMode::OptIn;
}

/// Hospitals 1 (custodian) and 2 (requester) with Patient and Consent scopes and SM2 keys.
async fn register_hospitals(app: &TestApp, key: &Sm2PrivateKey) {
    for n in [1, 2] {
        let mut inst = institution(n);
        inst["allowed_scopes"] = json!(["system/Patient.cruds", "system/Consent.cruds"]);
        inst["sm2_keys"] =
            json!([{ "kid": "sm2", "pem": key.public_key().to_spki_pem().unwrap() }]);
        let resp = app.admin_post("/admin/institutions", &inst).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
}

/// An access token of hospital `n` with a purpose of use (SM2SM3 client assertion).
async fn token(app: &TestApp, key: &Sm2PrivateKey, n: u32, purpose: &str) -> String {
    scoped_token(
        app,
        key,
        n,
        purpose,
        "system/Patient.rs system/Consent.cruds",
    )
    .await
}

/// An access token of hospital `n` (registered with `key` as kid `sm2`) for `scope`.
pub async fn scoped_token(
    app: &TestApp,
    key: &Sm2PrivateKey,
    n: u32,
    purpose: &str,
    scope: &str,
) -> String {
    let inst = format!("hosp-{n:03}");
    let now = chrono::Utc::now().timestamp();
    let aud = format!("{}/oauth2/token", app.state.base_url);
    let claims = json!({ "iss": inst, "sub": inst, "aud": aud, "iat": now, "exp": now + 240,
                         "jti": uuid::Uuid::new_v4().to_string() });
    let assertion = sign_jws(
        &json!({ "typ": "JWT", "kid": "sm2" }),
        &claims,
        &key.signing_key(DEFAULT_SIGNER_ID).unwrap(),
    )
    .unwrap();
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
            ("scope", scope),
            ("purpose_of_use", purpose),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no token: {body}"))
        .to_string()
}

/// A request as hospital `n` through the admin credential (purpose: the default, TREAT).
fn as_hosp(app: &TestApp, n: u32, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    let _ = app;
    req.bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", format!("hosp-{n:03}"))
}

async fn register_patient(app: &TestApp, patient: &Value) -> (String, String) {
    let resp = as_hosp(app, 1, app.client.post(app.url("/fhir/Patient")))
        .json(patient)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    let person = body["extension"][0]["valueIdentifier"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    (body["id"].as_str().unwrap().to_string(), person)
}

fn permit_for_hosp2(record: &str) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{record}") },
        "provision": {
            "type": "permit",
            "actor": [{
                "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
                "reference": { "reference": "Organization/hosp-002" },
            }],
        },
    })
}

/// A steward records the patient's consent (a permit naming hospital 2 cannot be recorded by
/// hospital 1: docs/consent.md, "Who may record, change, read and search a consent").
async fn record_consent(app: &TestApp, body: &Value) -> Value {
    let resp = app
        .client
        .post(app.url("/fhir/Consent"))
        .bearer_auth(STEWARD_TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

async fn read_as(app: &TestApp, req: reqwest::RequestBuilder) -> (u16, Value) {
    let _ = app;
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// The consent-decision extension's reasons of an audit resource.
fn reasons_of(resource: &Value) -> String {
    resource["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["url"]
                .as_str()
                .unwrap_or("")
                .ends_with("audit-consent-decision")
        })
        .flat_map(|e| e["extension"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["url"] == "reasons")
        .map(|e| e["valueString"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Opt-in region: without consent hospital 2 sees nothing of hospital 1's patient at any exit;
/// with a permit it does; after revocation through replica A, replica B (same database, and on
/// PostgreSQL the same Redis) refuses on the very next request.
async fn consent_permits_and_revocation_reaches_the_other_replica(backend: Backend) {
    let db = TestDb::new(backend);
    let url = db.url.clone();
    let prefix = format!("yq-consent-{}:", uuid::Uuid::new_v4().simple());
    let configure = |s: &mut Settings| {
        opt_in(s);
        if backend == Backend::Postgres {
            s.redis.url = Secret::new(redis_url());
            s.redis.key_prefix = prefix.clone();
        }
    };
    let mut settings_a = test_settings(&url);
    configure(&mut settings_a);
    let a = TestApp::spawn_on(db, settings_a).await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_hospitals(&a, &key).await;
    let (record, person) = register_patient(&a, &zhang(None)).await;

    let mut settings_b = test_settings(&url);
    configure(&mut settings_b);
    settings_b.audit.replica_id = "replica-b".into();
    let b = TestApp::spawn_on(TestDb::shared(&url), settings_b).await;

    // Hospital 1 always sees its own record.
    let (status, own) = read_as(
        &a,
        as_hosp(
            &a,
            1,
            a.client.get(a.url(&format!("/fhir/Patient/{record}"))),
        ),
    )
    .await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["name"][0]["text"], "张三丰");

    // No consent: nothing at any exit, on either replica.
    for app in [&a, &b] {
        let resp = as_hosp(
            app,
            2,
            app.client.get(app.url(&format!("/fhir/Patient/{record}"))),
        )
        .send()
        .await
        .unwrap();
        let outcome = assert_outcome(resp, 403, "consent-denied").await;
        assert!(outcome.to_string().contains("default-opt-in"), "{outcome}");
        let (status, bundle) = read_as(
            app,
            as_hosp(app, 2, app.client.get(app.url("/fhir/Patient?family=张"))),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 0, "{bundle}");
    }
    let pix = format!(
        "/fhir/Patient/$ihe-pix?sourceIdentifier={}|MR-0001",
        system(1)
    );
    let (status, params) = read_as(&a, as_hosp(&a, 2, a.client.get(a.url(&pix)))).await;
    assert_eq!(status, 200);
    assert_eq!(params["parameter"].as_array().unwrap().len(), 0, "{params}");
    let match_body = json!({ "resourceType": "Parameters",
        "parameter": [{ "name": "resource", "resource": zhang(None) }] });
    let (status, matched) = read_as(
        &a,
        as_hosp(&a, 2, a.client.post(a.url("/fhir/Patient/$match"))).json(&match_body),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(matched["entry"].as_array().unwrap().len(), 0, "{matched}");

    // Hospital 1 records the patient's permit for hospital 2.
    let consent = record_consent(&a, &permit_for_hosp2(&record)).await;
    let consent_id = consent["id"].as_str().unwrap().to_string();
    assert_eq!(consent["meta"]["versionId"], "1");
    assert_eq!(consent["patient"]["identifier"]["value"], person);

    // Now hospital 2 sees the patient at every exit, on both replicas.
    for app in [&a, &b] {
        let (status, p) = read_as(
            app,
            as_hosp(
                app,
                2,
                app.client.get(app.url(&format!("/fhir/Patient/{record}"))),
            ),
        )
        .await;
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["name"][0]["text"], "张三丰", "treatment is not masked");
        let (_, bundle) = read_as(
            app,
            as_hosp(app, 2, app.client.get(app.url("/fhir/Patient?family=张"))),
        )
        .await;
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 1, "{bundle}");
    }
    let (_, params) = read_as(&a, as_hosp(&a, 2, a.client.get(a.url(&pix)))).await;
    assert!(params.to_string().contains(&person), "{params}");
    let (_, matched) = read_as(
        &a,
        as_hosp(&a, 2, a.client.post(a.url("/fhir/Patient/$match"))).json(&match_body),
    )
    .await;
    assert_eq!(matched["entry"].as_array().unwrap().len(), 1, "{matched}");

    // Revoke through replica A ...
    let mut revoked = consent.clone();
    revoked["status"] = json!("inactive");
    let resp = a
        .client
        .put(a.url(&format!("/fhir/Consent/{consent_id}")))
        .bearer_auth(STEWARD_TOKEN)
        .header("If-Match", "W/\"1\"")
        .json(&revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let updated: Value = resp.json().await.unwrap();
    assert_eq!(updated["meta"]["versionId"], "2");
    assert_eq!(updated["status"], "inactive");
    // ... and the very next request, to replica B (whose cache held the permit), is refused.
    let resp = as_hosp(
        &b,
        2,
        b.client.get(b.url(&format!("/fhir/Patient/{record}"))),
    )
    .send()
    .await
    .unwrap();
    assert_outcome(resp, 403, "consent-denied").await;
    let (_, bundle) = read_as(
        &b,
        as_hosp(&b, 2, b.client.get(b.url("/fhir/Patient?family=张"))),
    )
    .await;
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 0, "{bundle}");

    // A stale If-Match is refused.
    let resp = a
        .client
        .put(a.url(&format!("/fhir/Consent/{consent_id}")))
        .bearer_auth(STEWARD_TOKEN)
        .header("If-Match", "W/\"1\"")
        .json(&revoked)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 412, "version-conflict").await;

    // The audit trail records each decision with its rule and consent.
    let rows = audit_rows(&a);
    let reads: Vec<&(Option<String>, Value)> = rows
        .iter()
        .filter(|(_, r)| r["subtype"][0]["code"] == "read")
        .filter(|(_, r)| {
            r["entity"]
                .to_string()
                .contains(&format!("Patient/{record}"))
        })
        .filter(|(_, r)| r["agent"][0]["who"]["identifier"]["value"] == "hosp-002")
        .collect();
    assert_eq!(
        reads.len(),
        5,
        "two denied, two permitted, one denied: {reads:?}"
    );
    assert_eq!(reads[0].0.as_deref(), Some("deny"));
    assert!(reasons_of(&reads[0].1).contains("default-opt-in"));
    assert_eq!(reads[2].0.as_deref(), Some("permit"));
    assert!(reasons_of(&reads[2].1).contains("consent-permit"));
    assert!(reasons_of(&reads[2].1).contains(&consent_id));
    assert_eq!(reads[4].0.as_deref(), Some("deny"));
    assert_eq!(reads[4].1["source"]["observer"]["display"], "replica-b");
    let changes: Vec<&(Option<String>, Value)> = rows
        .iter()
        .filter(|(_, r)| {
            r["entity"]
                .to_string()
                .contains(&format!("Consent/{consent_id}"))
        })
        .collect();
    assert!(changes.iter().any(
        |(d, r)| r["subtype"][0]["code"] == "create" && d.as_deref() == Some("recorded-active")
    ));
    assert!(
        changes
            .iter()
            .any(|(d, r)| r["subtype"][0]["code"] == "update"
                && d.as_deref() == Some("recorded-inactive"))
    );
    b.stop().await;
    a.stop().await;
}

/// Payment gets masked identifiers (张**), research gets pseudonyms and no name; both need a
/// permit in an opt-out region, since neither is a default purpose.
async fn masking_by_purpose(backend: Backend) {
    let app = TestApp::spawn_with(backend, base_settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_hospitals(&app, &key).await;
    let (record, _) = register_patient(&app, &zhang(None)).await;
    let path = format!("/fhir/Patient/{record}");
    let payment = token(&app, &key, 2, "HPAYMT").await;
    let research = token(&app, &key, 2, "HRESCH").await;

    let resp = app
        .client
        .get(app.url(&path))
        .bearer_auth(&payment)
        .send()
        .await
        .unwrap();
    let outcome = assert_outcome(resp, 403, "consent-denied").await;
    assert!(
        outcome
            .to_string()
            .contains("default-purpose-needs-consent"),
        "{outcome}"
    );

    record_consent(&app, &permit_for_hosp2(&record)).await;
    let (status, p) = read_as(&app, app.client.get(app.url(&path)).bearer_auth(&payment)).await;
    assert_eq!(status, 200, "{p}");
    let text = p.to_string();
    assert_eq!(p["name"][0]["text"], "张**", "{p}");
    assert_eq!(p["telecom"][0]["value"], "138****5678", "{p}");
    assert!(
        text.contains("350102********123"),
        "resident id keeps 6 + 4: {p}"
    );
    assert!(
        !text.contains("三丰") && !text.contains("13812345678") && !text.contains(&rid()),
        "{p}"
    );
    assert!(
        !text.contains("五四路"),
        "address generalised to the district: {p}"
    );
    assert_eq!(p["birthDate"], "1980");

    let (status, r) = read_as(&app, app.client.get(app.url(&path)).bearer_auth(&research)).await;
    assert_eq!(status, 200, "{r}");
    let text = r.to_string();
    assert!(r.get("name").is_none(), "{r}");
    assert!(
        !text.contains(&record) && !text.contains("MR-0001") && !text.contains(&rid()),
        "{r}"
    );
    assert!(text.contains(yiqiao_consent::mask::PSEUDONYM_SYSTEM), "{r}");
    // Stable per requester: the same pseudonym twice.
    let (_, again) = read_as(&app, app.client.get(app.url(&path)).bearer_auth(&research)).await;
    assert_eq!(r["id"], again["id"]);
    // The custodian itself is not masked.
    let (_, own) = read_as(&app, as_hosp(&app, 1, app.client.get(app.url(&path)))).await;
    assert_eq!(own["name"][0]["text"], "张三丰");
    app.stop().await;
}

/// Sensitive data needs a permit naming its label, even for treatment; a deny overrides a
/// permit; break-the-glass needs a stated reason and is flagged for review.
async fn sensitive_labels_deny_and_break_glass(backend: Backend) {
    let app = TestApp::spawn_with(backend, base_settings).await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_hospitals(&app, &key).await;
    let psy =
        json!([{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY" }]);
    let (record, _) = register_patient(&app, &zhang(Some(psy))).await;
    let path = format!("/fhir/Patient/{record}");
    let get2 = || as_hosp(&app, 2, app.client.get(app.url(&path)));

    let outcome = assert_outcome(get2().send().await.unwrap(), 403, "consent-denied").await;
    assert!(
        outcome
            .to_string()
            .contains("sensitive-needs-explicit-permit"),
        "{outcome}"
    );
    // A general permit does not cover PSY data ...
    record_consent(&app, &permit_for_hosp2(&record)).await;
    assert_outcome(get2().send().await.unwrap(), 403, "consent-denied").await;
    // ... a permit naming PSY does.
    let mut explicit = permit_for_hosp2(&record);
    explicit["provision"]["securityLabel"] =
        json!([{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY" }]);
    record_consent(&app, &explicit).await;
    let (status, p) = read_as(&app, get2()).await;
    assert_eq!(status, 200, "{p}");
    // A deny for hospital 2 overrides both permits.
    let mut deny = permit_for_hosp2(&record);
    deny["provision"]["type"] = json!("deny");
    let deny = record_consent(&app, &deny).await;
    let outcome = assert_outcome(get2().send().await.unwrap(), 403, "consent-denied").await;
    assert!(outcome.to_string().contains("consent-deny"), "{outcome}");
    // Break-the-glass: ETREAT without a reason is refused, with one it is released and flagged.
    let emergency = token(&app, &key, 2, "ETREAT").await;
    let resp = app
        .client
        .get(app.url(&path))
        .bearer_auth(&emergency)
        .send()
        .await
        .unwrap();
    let outcome = assert_outcome(resp, 403, "consent-denied").await;
    assert!(
        outcome.to_string().contains("break-glass-reason-missing"),
        "{outcome}"
    );
    let (status, p) = read_as(
        &app,
        app.client
            .get(app.url(&path))
            .bearer_auth(&emergency)
            .header("X-Break-Glass-Reason", "unconscious patient in ER"),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    let rows = audit_rows(&app);
    let last_read = rows
        .iter()
        .rev()
        .find(|(_, r)| r["subtype"][0]["code"] == "read")
        .unwrap();
    assert_eq!(last_read.0.as_deref(), Some("permit"));
    let reasons = reasons_of(&last_read.1);
    assert!(
        reasons.contains("break-glass") && reasons.contains("flag-for-review"),
        "{reasons}"
    );
    assert!(
        reasons.contains(deny["id"].as_str().unwrap()),
        "overridden deny named: {reasons}"
    );
    assert_eq!(
        last_read.1["agent"][0]["purposeOfUse"][0]["coding"][0]["code"],
        "ETREAT"
    );
    app.stop().await;
}

/// The Consent API: validation errors name the field, scopes are enforced, search by patient
/// and status, If-Match, and the policy simulator for staff.
async fn consent_api_and_simulator(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        base_settings(s);
        s.auditor_token = Secret::new("test-auditor-token-0123456789");
    })
    .await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_hospitals(&app, &key).await;
    let (record, person) = register_patient(&app, &zhang(None)).await;
    let post =
        |body: &Value| as_hosp(&app, 1, app.client.post(app.url("/fhir/Consent"))).json(body);
    // Validation names the field.
    let mut bad = permit_for_hosp2(&record);
    bad["provision"] = json!({});
    let o = assert_outcome(post(&bad).send().await.unwrap(), 422, "validation-failed").await;
    assert_eq!(
        o["issue"][0]["expression"][0], "Consent.provision.type",
        "{o}"
    );
    let mut bad = permit_for_hosp2(&record);
    bad["patient"] = json!({ "reference": "Patient/nobody" });
    let o = assert_outcome(post(&bad).send().await.unwrap(), 422, "validation-failed").await;
    assert_eq!(o["issue"][0]["expression"][0], "Consent.patient", "{o}");
    let mut bad = permit_for_hosp2(&record);
    bad["provision"]["purpose"] = json!([{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "SHOPPING" }]);
    let o = assert_outcome(post(&bad).send().await.unwrap(), 422, "validation-failed").await;
    assert!(
        o["issue"][0]["expression"][0]
            .as_str()
            .unwrap()
            .starts_with("Consent.provision.purpose"),
        "{o}"
    );
    let mut bad = permit_for_hosp2(&record);
    bad["status"] = json!("maybe");
    let o = assert_outcome(post(&bad).send().await.unwrap(), 422, "validation-failed").await;
    assert_eq!(o["issue"][0]["expression"][0], "Consent.status", "{o}");
    // By enterprise id, as identifier.
    let mut by_person = permit_for_hosp2(&record);
    by_person["patient"] = json!({ "identifier": { "system": "https://yiqiao.health/fhir/sid/empi", "value": person } });
    let c1 = record_consent(&app, &by_person).await;
    let c2 = record_consent(&app, &permit_for_hosp2(&person)).await;
    // Scope: Patient-only institution may not record consents.
    let mut inst3 = institution(3);
    inst3["allowed_scopes"] = json!(["system/Patient.rs"]);
    app.admin_post("/admin/institutions", &inst3).await;
    let resp = as_hosp(&app, 3, app.client.post(app.url("/fhir/Consent")))
        .json(&permit_for_hosp2(&record))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 403, "forbidden").await;
    // A member may not grant a third institution access: the permit naming hospital 2 is the
    // patient's or a steward's to record.
    let resp = post(&permit_for_hosp2(&record)).send().await.unwrap();
    let o = assert_outcome(resp, 403, "forbidden").await;
    assert_eq!(
        o["issue"][0]["expression"][0], "Consent.provision.actor",
        "{o}"
    );
    // Read, search: hospital 1 holds the patient; hospital 2 does not and is told nothing.
    let c1_path = format!("/fhir/Consent/{}", c1["id"].as_str().unwrap());
    let (status, read) = read_as(&app, as_hosp(&app, 1, app.client.get(app.url(&c1_path)))).await;
    assert_eq!(status, 200);
    assert_eq!(read["provision"]["type"], "permit");
    let resp = as_hosp(&app, 2, app.client.get(app.url(&c1_path)))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 404, "not-found").await;
    let resp = as_hosp(&app, 2, app.client.get(app.url("/fhir/Consent/none")))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 404, "not-found").await;
    let search = |q: String| {
        as_hosp(
            &app,
            1,
            app.client.get(app.url(&format!("/fhir/Consent?{q}"))),
        )
    };
    // Hospital 2 holds no record of the patient: its search is refused, as is a member's
    // search without a patient.
    let resp = as_hosp(
        &app,
        2,
        app.client
            .get(app.url(&format!("/fhir/Consent?patient=Patient/{record}"))),
    )
    .send()
    .await
    .unwrap();
    assert_outcome(resp, 403, "forbidden").await;
    let resp = search("status=active".into()).send().await.unwrap();
    assert_outcome(resp, 403, "forbidden").await;
    let (_, b) = read_as(&app, search(format!("patient=Patient/{record}"))).await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 2, "{b}");
    let (_, b) = read_as(&app, search(format!("patient={person}&status=active"))).await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 2, "{b}");
    let mut revoked = c2.clone();
    revoked["status"] = json!("inactive");
    let c2_path = format!("/fhir/Consent/{}", c2["id"].as_str().unwrap());
    // Hospital 1 holds the patient but did not record this consent: it may not revoke it.
    let resp = as_hosp(&app, 1, app.client.put(app.url(&c2_path)))
        .json(&revoked)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 403, "forbidden").await;
    let resp = app
        .client
        .put(app.url(&c2_path))
        .bearer_auth(STEWARD_TOKEN)
        .json(&revoked)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (_, b) = read_as(&app, search(format!("patient={person}&status=inactive"))).await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b["entry"][0]["resource"]["id"], c2["id"]);
    let (_, b) = read_as(&app, search("patient=Patient/unknown".into())).await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 0);
    let resp = search("status=bogus".into()).send().await.unwrap();
    assert_outcome(resp, 400, "invalid-parameter").await;
    // PUT with a body id that differs from the URL.
    let resp = as_hosp(&app, 1, app.client.put(app.url("/fhir/Consent/other-id")))
        .json(&revoked)
        .send()
        .await
        .unwrap();
    let o = assert_outcome(resp, 422, "validation-failed").await;
    assert_eq!(o["issue"][0]["expression"][0], "Consent.id");

    // Policy simulator.
    let ask = json!({ "requester": "hosp-002", "purpose": "HPAYMT", "patient": person, "custodian": "hosp-001" });
    let resp = app.admin_post("/consent/$evaluate", &ask).await;
    assert_eq!(resp.status(), 200);
    let d: Value = resp.json().await.unwrap();
    assert_eq!(d["effect"], "permit", "{d}");
    assert_eq!(d["decision"]["decided_by"]["rule"], "consent-permit");
    assert_eq!(d["decision"]["decided_by"]["consent"], c1["id"]);
    assert_eq!(d["decision"]["obligations"][0]["type"], "mask");
    assert_eq!(d["consents"].as_array().unwrap().len(), 2);
    let mut sensitive = ask.clone();
    sensitive["security"] = json!(["HIV"]);
    sensitive["purpose"] = json!("TREAT");
    let d: Value = app
        .client
        .post(app.url("/consent/$evaluate"))
        .bearer_auth("test-auditor-token-0123456789")
        .json(&sensitive)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(d["effect"], "deny");
    assert_eq!(
        d["decision"]["decided_by"]["rule"],
        "sensitive-needs-explicit-permit"
    );
    let mut bad = ask.clone();
    bad["purpose"] = json!("FUN");
    let o = assert_outcome(
        app.admin_post("/consent/$evaluate", &bad).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(o["issue"][0]["expression"][0], "purpose");
    let resp = app
        .client
        .post(app.url("/consent/$evaluate"))
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    let member = token(&app, &key, 2, "TREAT").await;
    let resp = app
        .client
        .post(app.url("/consent/$evaluate"))
        .bearer_auth(member)
        .json(&ask)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    app.stop().await;
}

/// Where hospitals need a data-sharing agreement, none means nothing is released; an agreement
/// releases, and suspending it withholds again on the next request.
async fn agreements_gate_hospitals(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        base_settings(s);
        s.consent
            .policy
            .agreement_required_for
            .insert(yiqiao_consent::InstitutionKind::Hospital);
    })
    .await;
    let key = Sm2PrivateKey::generate().unwrap();
    register_hospitals(&app, &key).await;
    let (record, _) = register_patient(&app, &zhang(None)).await;
    let get2 = || {
        as_hosp(
            &app,
            2,
            app.client.get(app.url(&format!("/fhir/Patient/{record}"))),
        )
    };
    let o = assert_outcome(get2().send().await.unwrap(), 403, "consent-denied").await;
    assert!(o.to_string().contains("agreement-required"), "{o}");
    let mut agreement = json!({ "custodian": "hosp-001", "recipient": "hosp-002",
        "purposes": ["TREAT"], "resource_types": ["Patient"], "status": "active" });
    let resp = app.admin_put("/admin/agreements/dsa-1", &agreement).await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let (status, p) = read_as(&app, get2()).await;
    assert_eq!(status, 200, "{p}");
    agreement["status"] = json!("suspended");
    let resp = app.admin_put("/admin/agreements/dsa-1", &agreement).await;
    let view: Value = resp.json().await.unwrap();
    assert_eq!(view["version"], 2);
    assert_outcome(get2().send().await.unwrap(), 403, "consent-denied").await;
    let list: Value = app
        .admin_get("/admin/agreements")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["status"], "suspended");
    agreement["recipient"] = json!("hosp-999");
    let o = assert_outcome(
        app.admin_put("/admin/agreements/dsa-2", &agreement).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(o["issue"][0]["expression"][0], "recipient");
    agreement["recipient"] = json!("hosp-002");
    agreement["purposes"] = json!(["NOPE"]);
    let o = assert_outcome(
        app.admin_put("/admin/agreements/dsa-2", &agreement).await,
        422,
        "validation-failed",
    )
    .await;
    assert_eq!(o["issue"][0]["expression"][0], "purposes[0]");
    let resp = app
        .client
        .get(app.url("/admin/agreements"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    app.stop().await;
}

on_both_backends!(
    agreements_gate_hospitals,
    consent_permits_and_revocation_reaches_the_other_replica,
    masking_by_purpose,
    sensitive_labels_deny_and_break_glass,
    consent_api_and_simulator,
);
