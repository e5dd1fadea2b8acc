//! The authorization table, driven end to end: every row of `service::authz::TABLE`
//! (resource × operation) is sent by every kind of caller — the member that owns the item, another
//! member, an internet-hospital platform, the auditor, the admin, the steward and a caller without
//! a token — and each answer is what the table says: the operation's success where the table
//! lets the caller in, else 401 without a credential (or with one of a kind the row does not
//! take) and 403 or 404 with one. Every decision,
//! allowed or refused, must leave an audit record (found by the request's `X-Request-Id`, with a
//! success or failure outcome). Then the consent cases of issue 24: another member cannot change
//! a consent, name itself or a third institution as a permit's actor for a patient it does not
//! hold, search consents without a patient, or see consents of patients it does not hold.
//! On SQLite and PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::RunQueryDsl;
use diesel::sql_types::Text;
use reqwest::Method;
use serde_json::{Value, json};
use yiqiao_gateway::config::Secret;
use yiqiao_gateway::service::authz::{Op, Resource, Rule, TABLE, Who};
use yiqiao_gateway::staff::Role;
use yiqiao_sm::Sm2PrivateKey;

use crate::consent::{STEWARD_TOKEN, scoped_token};
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, institution};
use crate::{on_both_backends, wait};

const AUDITOR_TOKEN: &str = "test-auditor-token-0123456789";
const SCOPES: [&str; 8] = [
    "system/Patient.cruds",
    "system/Consent.cruds",
    "system/Encounter.cruds",
    "system/DocumentReference.cruds",
    "system/Practitioner.cruds",
    "system/Subscription.cruds",
    "system/AuditEvent.rs",
    "system/Observation.rs",
];

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// hosp-001: registered the patients, visit, document, roster entry, subscription and
    /// consent the item rows name.
    Owner,
    /// hosp-002, a hospital holding none of them.
    Other,
    /// hosp-003, an internet hospital without a visit of the patients.
    Platform,
    Auditor,
    Admin,
    Steward,
    Anonymous,
}

const KINDS: [Kind; 7] = [
    Kind::Owner,
    Kind::Other,
    Kind::Platform,
    Kind::Auditor,
    Kind::Admin,
    Kind::Steward,
    Kind::Anonymous,
];

/// Members that hold what they create: the member rows build each member's own item.
const EVERY_MEMBER: &[Kind] = &[Kind::Owner, Kind::Other, Kind::Platform];
const OWNER: &[Kind] = &[Kind::Owner];

impl Kind {
    /// The member institution number (`hosp-00n`).
    fn member(self) -> Option<u32> {
        match self {
            Kind::Owner => Some(1),
            Kind::Other => Some(2),
            Kind::Platform => Some(3),
            _ => None,
        }
    }

    fn role(self) -> Option<Role> {
        match self {
            Kind::Auditor => Some(Role::Auditor),
            Kind::Admin => Some(Role::Admin),
            Kind::Steward => Some(Role::Steward),
            _ => None,
        }
    }
}

fn system(n: u32) -> String {
    format!("urn:oid:2.16.156.10011.1.99.{n}")
}

fn practitioner_system(n: u32) -> String {
    format!("https://yiqiao.health/fhir/sid/practitioner/hosp-{n:03}")
}

/// A patient of member `n`; names and birth dates differ so that the EMPI links none of them.
fn patient(n: u32, mrn: &str) -> Value {
    let family = ["张", "李", "王"][(n as usize - 1) % 3];
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system(n), "value": mrn }],
        "name": [{ "text": format!("{family}{mrn}"), "family": family, "given": [mrn] }],
        "gender": "female",
        "birthDate": format!("19{}0-0{}-1{}", 5 + n, n, mrn.len() % 10),
    })
}

fn visit(n: u32, number: &str) -> Value {
    json!({ "resourceType": "Encounter",
        "identifier": [{ "system": format!("urn:visit:{n}"), "value": number }],
        "status": "in-progress",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "identifier": { "system": system(n), "value": "MR-1" } },
        "period": { "start": "2026-11-29T08:00:00+08:00" } })
}

fn practitioner(n: u32) -> Value {
    json!({ "resourceType": "Practitioner",
        "identifier": [{ "system": practitioner_system(n), "value": "D001" }],
        "active": true, "name": [{ "family": "王", "given": ["医生"] }] })
}

fn subscription() -> Value {
    json!({ "resourceType": "Subscription", "status": "requested", "reason": "authz",
        "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
        "channel": { "type": "rest-hook", "endpoint": "https://receiver.example/hook",
                     "payload": "application/fhir+json" } })
}

fn consent(record: &str, provision: Value) -> Value {
    json!({ "resourceType": "Consent", "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": format!("Patient/{record}") },
        "provision": provision })
}

fn deny(record: &str) -> Value {
    consent(record, json!({ "type": "deny" }))
}

/// A permit naming `actor` as the recipient.
fn permit_for(record: &str, actor: &str) -> Value {
    consent(
        record,
        json!({ "type": "permit", "actor": [{
            "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
            "reference": { "reference": format!("Organization/{actor}") } }] }),
    )
}

/// One request.
struct Call {
    method: Method,
    path: String,
    body: Option<Value>,
}

fn get(path: impl Into<String>) -> Call {
    Call {
        method: Method::GET,
        path: path.into(),
        body: None,
    }
}

fn send_body(method: Method, path: impl Into<String>, body: Value) -> Call {
    Call {
        method,
        path: path.into(),
        body: Some(body),
    }
}

/// The region every row runs against, and the members' access tokens.
struct Fixture {
    app: TestApp,
    tokens: HashMap<u32, String>,
    /// hosp-001's patient MR-1 (source record) and its enterprise person.
    record: String,
    person: String,
    /// hosp-001's patient MR-2, the subject of the consent rows.
    consent_record: String,
    /// hosp-002's and hosp-003's patients MR-1's enterprise persons (the second is merged into
    /// the first in the Person update row; neither is the owner's patient).
    other_person: String,
    platform_person: String,
    consent: String,
    encounter: String,
    document: String,
    practitioner: String,
    subscription: String,
    /// Any stored audit event (the AuditEvent read row).
    event: String,
}

/// (status, body, request id) of `call` made by `kind`.
async fn send(fx: &Fixture, kind: Kind, call: &Call) -> (u16, Value, String) {
    send_as(fx, kind, call, false).await
}

/// [`send`]; `malformed`: the call's body replaced by broken JSON and an `If-Match` that is
/// no ETag.
async fn send_as(fx: &Fixture, kind: Kind, call: &Call, malformed: bool) -> (u16, Value, String) {
    let request_id = uuid::Uuid::new_v4().to_string();
    let app = &fx.app;
    let mut req = app
        .client
        .request(call.method.clone(), app.url(&call.path))
        .header("X-Request-Id", &request_id);
    let credential = match kind {
        Kind::Owner | Kind::Other | Kind::Platform => kind.member().map(|n| fx.tokens[&n].as_str()),
        Kind::Auditor => Some(AUDITOR_TOKEN),
        Kind::Admin => Some(ADMIN_TOKEN),
        Kind::Steward => Some(STEWARD_TOKEN),
        Kind::Anonymous => None,
    };
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    if malformed {
        req = req
            .header("Content-Type", "application/fhir+json")
            .header("If-Match", "not-an-etag")
            .body("{\"resourceType\": ");
    } else if let Some(body) = &call.body {
        req = req.json(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null), request_id)
}

#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = Text)]
    outcome: String,
}

/// The outcomes of the audit records of request `request_id` (a UUID this test made).
async fn audit_outcomes(app: &TestApp, request_id: &str) -> Vec<String> {
    let store = app.state.store.clone();
    let sql = format!("SELECT outcome FROM audit_events WHERE request_id = '{request_id}'");
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::sql_query(sql)
            .load::<Outcome>(&mut *conn)
            .unwrap()
            .into_iter()
            .map(|o| o.outcome)
            .collect()
    })
    .await
    .unwrap()
}

/// The request's decision is in the audit trail: a success record when `success` is
/// `Some(true)`, a failure record when `Some(false)`, either when `None` (refusals are recorded
/// without delaying the answer: waited for).
async fn assert_audited(app: &TestApp, what: &str, request_id: &str, success: Option<bool>) {
    let outcomes = wait::until(
        &format!("the audit record of {what}"),
        Duration::from_secs(20),
        move || async move {
            let found = audit_outcomes(app, request_id).await;
            found
                .iter()
                .any(|o| success.is_none_or(|s| (o == "0") == s))
                .then_some(found)
        },
    )
    .await;
    assert!(!outcomes.is_empty(), "{what}: no audit record");
}

/// Send `call` as `kind`, expect it allowed (2xx, or one of `also_ok`) or refused (401 without a
/// credential, else 403 or 404), and its audit record.
async fn expect(fx: &Fixture, what: &str, kind: Kind, call: &Call, allowed: bool, also_ok: &[u16]) {
    expect_recorded(fx, what, kind, call, (allowed, also_ok), true).await;
}

/// [`expect`]; `definite`: an allowed 2xx answer is recorded as a success (false where the
/// record says how well it went, e.g. a federated search some hospitals did not answer).
async fn expect_recorded(
    fx: &Fixture,
    what: &str,
    kind: Kind,
    call: &Call,
    (allowed, also_ok): (bool, &[u16]),
    definite: bool,
) {
    let (status, body, request_id) = send(fx, kind, call).await;
    let what = format!("{what} by {kind:?} ({} {})", call.method, call.path);
    let success = (200..300).contains(&status);
    // Rows open to members release patient data through the consent engine, which may then
    // withhold it (the internet hospital here has no visit with the patient): the table let
    // the caller in; the engine's denial is its own decision, recorded with its reasons.
    let withheld =
        status == 403 && body["issue"][0]["details"]["coding"][0]["code"] == "consent-denied";
    if allowed {
        assert!(
            success || withheld || also_ok.contains(&status),
            "{what}: the table allows it, got {status}: {body}"
        );
    } else if kind == Kind::Anonymous {
        assert_eq!(status, 401, "{what}: refused without a credential: {body}");
    } else {
        // 401 when the credential is of a kind the row does not take at all (a staff
        // credential where only members may act, a member's token where only roles may).
        assert!(
            status == 401 || status == 403 || status == 404,
            "{what}: the table refuses it, got {status}: {body}"
        );
    }
    // An allowed operation that then found nothing to do is recorded as failed.
    let recorded = if withheld {
        Some(false)
    } else {
        ((success && definite) || !allowed).then_some(allowed)
    };
    assert_audited(&fx.app, &what, &request_id, recorded).await;
}

/// The request of row `(resource, op)` as `kind` makes it: members' creations are their own
/// items; every other row names the owner's item.
fn call(fx: &Fixture, resource: Resource, op: Op, kind: Kind) -> Call {
    use Method as M;
    let n = kind.member().unwrap_or(1);
    let (record, person) = (&fx.record, &fx.person);
    match (resource, op) {
        (Resource::Patient, Op::Create) => send_body(M::POST, "/fhir/Patient", patient(n, "MR-1")),
        (Resource::Patient, Op::Update) => send_body(
            M::PUT,
            format!("/fhir/Patient?identifier={}|MR-1", system(n)),
            patient(n, "MR-1"),
        ),
        (Resource::Patient, Op::Read) => get(format!("/fhir/Patient/{record}")),
        (Resource::Patient, Op::Search) => get("/fhir/Patient?family=张"),
        (Resource::Consent, Op::Create) => {
            send_body(M::POST, "/fhir/Consent", deny(&fx.consent_record))
        }
        (Resource::Consent, Op::Update) => {
            let mut body = deny(&fx.consent_record);
            body["id"] = json!(fx.consent);
            send_body(M::PUT, format!("/fhir/Consent/{}", fx.consent), body)
        }
        (Resource::Consent, Op::Read) => get(format!("/fhir/Consent/{}", fx.consent)),
        (Resource::Consent, Op::Search) => get(format!(
            "/fhir/Consent?patient=Patient/{}",
            fx.consent_record
        )),
        (Resource::Agreement, Op::Update) => send_body(
            M::PUT,
            "/admin/agreements/dsa-authz",
            json!({ "custodian": "hosp-001", "recipient": "hosp-002",
                    "purposes": ["TREAT"], "resource_types": ["Patient"], "status": "active" }),
        ),
        (Resource::Agreement, Op::Search) => get("/admin/agreements"),
        (Resource::Encounter, Op::Create) => {
            send_body(M::POST, "/fhir/Encounter", visit(n, &format!("V-{n}-2")))
        }
        (Resource::Encounter, Op::Update) => send_body(
            M::PUT,
            format!("/fhir/Encounter/{}", fx.encounter),
            visit(n, "V-1"),
        ),
        (Resource::Encounter, Op::Read) => get(format!("/fhir/Encounter/{}", fx.encounter)),
        (Resource::DocumentReference, Op::Create) => send_body(
            M::POST,
            "/fhir/DocumentReference",
            crate::documents::sample_document(n, "DOC-1", "MR-1"),
        ),
        (Resource::DocumentReference, Op::Read) => {
            get(format!("/fhir/DocumentReference/{}", fx.document))
        }
        (Resource::DocumentReference, Op::Search) => get("/fhir/DocumentReference?_count=5"),
        (Resource::Practitioner, Op::Create) => {
            send_body(M::POST, "/fhir/Practitioner", practitioner(n))
        }
        (Resource::Practitioner, Op::Update) => send_body(
            M::PUT,
            format!(
                "/fhir/Practitioner?identifier={}|D001",
                practitioner_system(n)
            ),
            practitioner(n),
        ),
        (Resource::Practitioner, Op::Read) => {
            get(format!("/fhir/Practitioner/{}", fx.practitioner))
        }
        (Resource::Practitioner, Op::Search) => get("/fhir/Practitioner"),
        (Resource::Subscription, Op::Create) => {
            send_body(M::POST, "/fhir/Subscription", subscription())
        }
        (Resource::Subscription, Op::Read) => {
            get(format!("/fhir/Subscription/{}", fx.subscription))
        }
        (Resource::Subscription, Op::Update) => send_body(
            M::POST,
            format!("/fhir/Subscription/{}/$retry-dead", fx.subscription),
            json!({}),
        ),
        (Resource::Subscription, Op::Delete) => Call {
            method: M::DELETE,
            path: format!("/fhir/Subscription/{}", fx.subscription),
            body: None,
        },
        (Resource::Subscription, Op::Search) => get("/fhir/Subscription"),
        (Resource::Person, Op::Read) => get(format!("/empi/persons/{person}")),
        (Resource::Person, Op::Update) => send_body(
            M::POST,
            format!("/empi/persons/{}/$merge", fx.other_person),
            json!({ "source": fx.platform_person }),
        ),
        (Resource::ReviewItem, Op::Search) => get("/empi/review"),
        (Resource::ReviewItem, Op::Update) => {
            send_body(M::POST, "/empi/review/999999/link", json!({}))
        }
        (Resource::AuditEvent, Op::Read) => get(format!("/fhir/AuditEvent/{}", fx.event)),
        (Resource::AuditEvent, Op::Search) => get(format!(
            "/fhir/AuditEvent?patient=Patient/{record}&_count=5"
        )),
        (Resource::AuthEvent, Op::Read) => get("/oauth2/events"),
        (Resource::Alert, Op::Search) => get("/audit/alerts"),
        (Resource::Alert, Op::Update) => send_body(
            M::POST,
            "/audit/alerts/999999/ack",
            json!({ "note": "checked" }),
        ),
        (Resource::FlaggedPatient, Op::Search) => get("/audit/flagged-patients"),
        (Resource::FlaggedPatient, Op::Update) => send_body(
            M::PUT,
            format!("/audit/flagged-patients/{person}"),
            json!({ "note": "a public figure" }),
        ),
        (Resource::FlaggedPatient, Op::Delete) => Call {
            method: M::DELETE,
            path: format!("/audit/flagged-patients/{person}"),
            body: None,
        },
        (Resource::AuditReport, Op::Read) => get("/audit/chain"),
        (Resource::ConsentPolicy, Op::Read) => send_body(
            M::POST,
            "/consent/$evaluate",
            json!({ "requester": "hosp-002", "purpose": "TREAT", "patient": person,
                    "custodian": "hosp-001" }),
        ),
        (Resource::Organization, Op::Read) => get("/fhir/Organization/hosp-001"),
        (Resource::Organization, Op::Search) => get("/fhir/Organization"),
        (Resource::Institution, Op::Create) => {
            send_body(M::POST, "/admin/institutions", institution(20))
        }
        (Resource::Institution, Op::Read) => get("/admin/institutions/hosp-001"),
        (Resource::Institution, Op::Update) => {
            send_body(M::POST, "/admin/institutions/hosp-002/activate", json!({}))
        }
        (Resource::Institution, Op::Search) => get("/admin/institutions"),
        (Resource::ClinicalData, Op::Search) => {
            get(format!("/fhir/Observation?patient={person}&_timeout=2000"))
        }
        (resource, op) => panic!(
            "the table has a row {resource:?} {op:?} this test does not drive: add its request"
        ),
    }
}

/// For which member kinds the item the row's request names is theirs (the table's
/// "custodian"): what a member creates in its own namespace, else the owner's item.
fn custodians(resource: Resource, op: Op) -> &'static [Kind] {
    match (resource, op) {
        (Resource::Patient, Op::Create | Op::Update)
        | (Resource::Encounter, Op::Create)
        | (Resource::DocumentReference, Op::Create)
        | (Resource::Practitioner, Op::Create | Op::Update | Op::Search)
        | (Resource::Subscription, Op::Create | Op::Search) => EVERY_MEMBER,
        _ => OWNER,
    }
}

/// Answers that also mean "allowed": the decision was taken and the operation then found
/// nothing to do (no such review item or alert exists in this region; the second merge of the
/// same persons; the flag already removed).
fn also_ok(resource: Resource, op: Op) -> &'static [u16] {
    match (resource, op) {
        (Resource::ReviewItem, Op::Update) | (Resource::Alert, Op::Update) => &[404],
        (Resource::FlaggedPatient, Op::Delete) => &[404],
        (Resource::Person, Op::Update) => &[404, 409],
        _ => &[],
    }
}

/// Does the table let `kind` in on `rule`? No caller here has a visit with the patients, so
/// the patient platform's way never applies (tests/api/consent.rs covers it).
fn allowed(rule: &Rule, kind: Kind) -> bool {
    rule.who.iter().any(|way| match way {
        Who::Anyone => true,
        Who::Member => kind.member().is_some(),
        Who::Custodian => custodians(rule.resource, rule.op).contains(&kind),
        Who::PatientPlatform => false,
        Who::Staff(role) => kind.role() == Some(*role),
    })
}

async fn created(fx_app: &TestApp, token: &str, path: &str, body: &Value) -> Value {
    let resp = fx_app
        .client
        .post(fx_app.url(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{path}: {v}");
    v
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn person_of(patient: &Value) -> String {
    patient["extension"][0]["valueIdentifier"]["value"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn fixture(backend: Backend) -> Fixture {
    let app = TestApp::spawn_with(backend, |s| {
        s.steward_token = Secret::new(STEWARD_TOKEN);
        s.auditor_token = Secret::new(AUDITOR_TOKEN);
        s.auth.ip_burst = 10_000;
        s.auth.institution_burst = 10_000;
        s.consent.pseudonym_key = Secret::new("00112233445566778899aabbccddeeff");
    })
    .await;
    let key = Sm2PrivateKey::generate().unwrap();
    let mut tokens = HashMap::new();
    for n in [1, 2, 3] {
        let mut inst = institution(n);
        inst["allowed_scopes"] = json!(SCOPES);
        if n == 3 {
            inst["kind"] = json!("internet_hospital");
        }
        inst["sm2_keys"] =
            json!([{ "kid": "sm2", "pem": key.public_key().to_spki_pem().unwrap() }]);
        let resp = app.admin_post("/admin/institutions", &inst).await;
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        tokens.insert(
            n,
            scoped_token(&app, &key, n, "TREAT", &SCOPES.join(" ")).await,
        );
    }
    let owner = tokens[&1].clone();
    let a = created(&app, &owner, "/fhir/Patient", &patient(1, "MR-1")).await;
    let c = created(&app, &owner, "/fhir/Patient", &patient(1, "MR-2")).await;
    let b = created(&app, &tokens[&2], "/fhir/Patient", &patient(2, "MR-1")).await;
    let p = created(&app, &tokens[&3], "/fhir/Patient", &patient(3, "MR-1")).await;
    let encounter = created(&app, &owner, "/fhir/Encounter", &visit(1, "V-1")).await;
    let document = created(
        &app,
        &owner,
        "/fhir/DocumentReference",
        &crate::documents::sample_document(1, "DOC-1", "MR-1"),
    )
    .await;
    let practitioner = created(&app, &owner, "/fhir/Practitioner", &practitioner(1)).await;
    let subscription = created(&app, &owner, "/fhir/Subscription", &subscription()).await;
    let consent = created(&app, &owner, "/fhir/Consent", &deny(&id_of(&c))).await;
    let event = audit_event_id(&app).await;
    Fixture {
        tokens,
        record: id_of(&a),
        person: person_of(&a),
        consent_record: id_of(&c),
        other_person: person_of(&b),
        platform_person: person_of(&p),
        consent: id_of(&consent),
        encounter: id_of(&encounter),
        document: id_of(&document),
        practitioner: id_of(&practitioner),
        subscription: id_of(&subscription),
        event,
        app,
    }
}

#[derive(QueryableByName)]
struct EventId {
    #[diesel(sql_type = Text)]
    event_id: String,
}

async fn audit_event_id(app: &TestApp) -> String {
    let store = app.state.store.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().unwrap();
        diesel::sql_query("SELECT event_id FROM audit_events ORDER BY seq LIMIT 1")
            .get_result::<EventId>(&mut *conn)
            .unwrap()
            .event_id
    })
    .await
    .unwrap()
}

/// Every row × every kind of caller, as the table says, each decision audited.
async fn every_row_with_every_caller(backend: Backend) {
    let fx = fixture(backend).await;
    let mut driven = 0;
    for rule in TABLE {
        for kind in KINDS {
            let call = call(&fx, rule.resource, rule.op, kind);
            let what = format!("{:?} {:?}", rule.resource, rule.op);
            // The federated search's record is a failure when a hospital did not answer
            // (none of this region's endpoints exists).
            let definite = rule.resource != Resource::ClinicalData;
            expect_recorded(
                &fx,
                &what,
                kind,
                &call,
                (allowed(rule, kind), also_ok(rule.resource, rule.op)),
                definite,
            )
            .await;
            driven += 1;
        }
    }
    assert_eq!(driven, TABLE.len() * KINDS.len());
    fx.app.stop().await;
}

/// The consent cases of issue 24, each refusal audited and nothing changed.
async fn members_cannot_act_on_consents_of_patients_they_do_not_hold(backend: Backend) {
    let fx = fixture(backend).await;
    let (other, owner) = (Kind::Other, Kind::Owner);
    let consent_path = format!("/fhir/Consent/{}", fx.consent);

    // B cannot revoke A's consent; it stays active.
    let mut revoked = deny(&fx.consent_record);
    revoked["id"] = json!(fx.consent);
    revoked["status"] = json!("inactive");
    let put = send_body(Method::PUT, consent_path.clone(), revoked);
    expect(&fx, "revoking A's consent", other, &put, false, &[]).await;
    let (status, stored, _) = send(&fx, Kind::Steward, &get(consent_path.clone())).await;
    assert_eq!(status, 200, "{stored}");
    assert_eq!(stored["status"], "active", "{stored}");
    assert_eq!(stored["meta"]["versionId"], "1", "{stored}");

    // B cannot record a permit naming itself, or a third institution, for A's patient; nor
    // can A name another institution as a permit's actor.
    for (kind, actor) in [
        (other, "hosp-002"),
        (other, "hosp-003"),
        (owner, "hosp-002"),
    ] {
        let post = send_body(
            Method::POST,
            "/fhir/Consent",
            permit_for(&fx.consent_record, actor),
        );
        expect(
            &fx,
            &format!("a permit naming {actor}"),
            kind,
            &post,
            false,
            &[],
        )
        .await;
    }
    let (_, all, _) = send(&fx, Kind::Steward, &get("/fhir/Consent")).await;
    assert_eq!(all["entry"].as_array().unwrap().len(), 1, "{all}");

    // Members search consents by a patient they hold, never the whole region.
    for kind in [owner, other] {
        expect(
            &fx,
            "consent search without a patient",
            kind,
            &get("/fhir/Consent"),
            false,
            &[],
        )
        .await;
    }
    for kind in [Kind::Steward, Kind::Auditor] {
        expect(
            &fx,
            "consent search without a patient",
            kind,
            &get("/fhir/Consent"),
            true,
            &[],
        )
        .await;
    }
    let by_patient = get(format!(
        "/fhir/Consent?patient=Patient/{}",
        fx.consent_record
    ));
    expect(
        &fx,
        "A's patient's consents",
        other,
        &by_patient,
        false,
        &[],
    )
    .await;
    let (status, found, _) = send(&fx, owner, &by_patient).await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(
        found["entry"][0]["resource"]["id"],
        json!(fx.consent),
        "{found}"
    );

    // B sees the consents of its own patient only: none of A's.
    let (status, b_patient, _) = send(
        &fx,
        other,
        &get(format!("/fhir/Patient?identifier={}|MR-1", system(2))),
    )
    .await;
    assert_eq!(status, 200, "{b_patient}");
    let b_record = b_patient["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let own = send_body(Method::POST, "/fhir/Consent", deny(&b_record));
    expect(&fx, "a consent of its own patient", other, &own, true, &[]).await;
    let (status, mine, _) = send(
        &fx,
        other,
        &get(format!("/fhir/Consent?patient=Patient/{b_record}")),
    )
    .await;
    assert_eq!(status, 200, "{mine}");
    let entries = mine["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{mine}");
    assert_ne!(entries[0]["resource"]["id"], json!(fx.consent), "{mine}");
    expect(
        &fx,
        "reading A's consent",
        other,
        &get(consent_path),
        false,
        &[],
    )
    .await;
    fx.app.stop().await;
}

/// Does the table refuse `kind` on `rule` before any item is looked at (no way of the row
/// takes a credential of its kind)? Item-level refusals (another member's consent) come after
/// the body is read: the body's checks reveal nothing of the item.
fn refused_by_the_table(rule: &Rule, kind: Kind) -> bool {
    !rule.who.iter().any(|way| match way {
        Who::Anyone => true,
        Who::Member | Who::Custodian | Who::PatientPlatform => kind.member().is_some(),
        Who::Staff(role) => kind.role() == Some(*role),
    })
}

/// A caller the table refuses hears 401/403/404, with its audit record, whatever is wrong
/// with its body or preconditions: the permit is decided first (actix extracts a handler's
/// arguments together; a bad body used to answer 400 before the refusal, unrecorded).
async fn refusals_come_before_body_errors(backend: Backend) {
    let fx = fixture(backend).await;
    let mut driven = 0;
    for rule in TABLE {
        for kind in KINDS {
            let call = call(&fx, rule.resource, rule.op, kind);
            if call.body.is_none() || !refused_by_the_table(rule, kind) {
                continue;
            }
            let what = format!("{:?} {:?} with a broken body", rule.resource, rule.op);
            let (status, body, request_id) = send_as(&fx, kind, &call, true).await;
            let what = format!("{what} by {kind:?} ({} {})", call.method, call.path);
            if kind == Kind::Anonymous {
                assert_eq!(status, 401, "{what}: {body}");
            } else {
                assert!(
                    [401, 403, 404].contains(&status),
                    "{what}: the table refuses it, got {status}: {body}"
                );
            }
            assert_audited(&fx.app, &what, &request_id, Some(false)).await;
            driven += 1;
        }
    }
    assert!(driven >= 20, "only {driven} refused calls with a body");
    // A credential refused only after a directory read (the institution was suspended, so its
    // cached entry is gone and the permit's future waits on the database): still 401, recorded.
    let suspend = fx
        .app
        .client
        .post(fx.app.url("/admin/institutions/hosp-002/suspend"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(suspend.status().as_u16(), 200);
    let post = call(&fx, Resource::Consent, Op::Create, Kind::Other);
    let (status, body, request_id) = send_as(&fx, Kind::Other, &post, true).await;
    assert_eq!(
        status, 401,
        "a suspended institution with a broken body: {body}"
    );
    assert_audited(
        &fx.app,
        "a suspended institution's broken body",
        &request_id,
        Some(false),
    )
    .await;
    // And an allowed caller still hears what is wrong with its body.
    let owner_put = call(&fx, Resource::Consent, Op::Update, Kind::Owner);
    let (status, body, _) = send_as(&fx, Kind::Owner, &owner_put, true).await;
    assert_eq!(status, 400, "{body}");
    fx.app.stop().await;
}

on_both_backends!(
    refusals_come_before_body_errors,
    every_row_with_every_caller,
    members_cannot_act_on_consents_of_patients_they_do_not_hold
);
