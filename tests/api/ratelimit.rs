//! Rate limits on API calls (issue 25): per access token and per institution, in process (one
//! replica) and through Redis (two replicas, one budget); public directory reads per client
//! address; fail closed when Redis is configured and unreachable.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use serde_json::Value;
use yiqiao_gateway::config::{Secret, Settings};

use crate::auth::{ClientKeys, claims, register, token_with};
use crate::helpers::{
    ADMIN_TOKEN, Backend, Proxy, TestApp, TestDb, assert_outcome, institution, redis_url,
    replica_settings, socket_of, via_proxy,
};
use crate::on_both_backends;

/// One cell every 5 s: a burst spent here stays spent while the test runs on a loaded machine.
const PER_MINUTE: u32 = 12;

fn limits(s: &mut Settings) {
    s.auth.ip_burst = 10_000;
    s.auth.institution_burst = 10_000;
    s.rate_limits.token_per_minute = PER_MINUTE;
    s.rate_limits.token_burst = 4;
    s.rate_limits.institution_per_minute = PER_MINUTE;
    s.rate_limits.institution_burst = 6;
    s.rate_limits.directory_per_minute = PER_MINUTE;
    s.rate_limits.directory_burst = 3;
}

/// Register institution `n` (hosp-00n) with keys of its own.
async fn member(app: &TestApp, n: u32) -> ClientKeys {
    let prefix = format!("m{n}-");
    let keys = ClientKeys::new(&prefix).await;
    register(app, &keys.registration(n, &prefix)).await;
    keys
}

/// A fresh access token of hosp-00n.
async fn token(app: &TestApp, keys: &ClientKeys, n: u32) -> String {
    let id = format!("hosp-{n:03}");
    let assertion = keys.sign("ES256", &format!("m{n}-es256"), &claims(app, &id));
    let resp = token_with(app, &assertion, "system/Patient.rs").await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn whoami(app: &TestApp, token: &str) -> reqwest::Response {
    app.client
        .get(app.url("/oauth2/whoami"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn ok(resp: reqwest::Response) {
    let status = resp.status();
    assert_eq!(status, 200, "{}", resp.text().await.unwrap_or_default());
}

/// A 429 OperationOutcome `rate-limited` whose text has `naming`, with the rate-limit headers;
/// returns the Retry-After seconds.
async fn assert_limited(resp: reqwest::Response, burst: u32, naming: &str) -> u64 {
    let headers = resp.headers().clone();
    let body = assert_outcome(resp, 429, "rate-limited").await;
    assert_eq!(body["issue"][0]["code"], "throttled");
    let text = body["issue"][0]["details"]["text"].as_str().unwrap();
    assert!(text.contains(naming), "{text}");
    assert_eq!(headers["ratelimit-limit"], burst.to_string().as_str());
    assert_eq!(headers["ratelimit-remaining"], "0");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=5).contains(&retry), "Retry-After {retry}");
    retry
}

async fn wait_secs(secs: u64) {
    tokio::time::sleep(Duration::from_secs(secs) + Duration::from_millis(200)).await;
}

/// One replica, budgets in process: a token over its budget gets 429 with Retry-After, a second
/// token of the same institution then exhausts the institution's budget, another institution
/// and the operators' credential are unaffected, and the budget recovers.
async fn a_token_and_its_institution_are_limited(backend: Backend) {
    let app = TestApp::spawn_with(backend, limits).await;
    let (keys, other_keys) = (member(&app, 1).await, member(&app, 2).await);
    let first = token(&app, &keys, 1).await;
    for _ in 0..4 {
        ok(whoami(&app, &first).await).await;
    }
    let retry = assert_limited(whoami(&app, &first).await, 4, "with this access token").await;
    // A second token has a budget of its own; the institution's (6) is shared: 4 + 2.
    let second = token(&app, &keys, 1).await;
    for _ in 0..2 {
        ok(whoami(&app, &second).await).await;
    }
    let retry_institution =
        assert_limited(whoami(&app, &second).await, 6, "from institution hosp-001").await;
    // Every data route takes the check, not only whoami.
    let resp = app
        .client
        .get(app.url("/fhir/Patient?family=x"))
        .bearer_auth(&second)
        .send()
        .await
        .unwrap();
    assert_limited(resp, 6, "from institution hosp-001").await;
    // Another institution has its own budgets.
    let other = token(&app, &other_keys, 2).await;
    ok(whoami(&app, &other).await).await;
    // The operators' credential acting for hosp-001 is not the institution's traffic.
    let admin = app
        .client
        .get(app.url("/oauth2/whoami"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .send()
        .await
        .unwrap();
    ok(admin).await;
    // The budgets recover.
    wait_secs(retry.max(retry_institution)).await;
    ok(whoami(&app, &first).await).await;
    app.stop().await;
}

/// Public directory reads: a burst from one address gets 429 after its budget, another address
/// is unaffected, the budget recovers, and the reads are in the audit trail with the address.
async fn anonymous_directory_reads_are_limited_per_address(backend: Backend) {
    let app = TestApp::spawn_with(backend, limits).await;
    let created = app.admin_post("/admin/institutions", &institution(1)).await;
    assert_eq!(created.status(), 201);
    for path in [
        "/fhir/Organization/hosp-001",
        "/fhir/Endpoint/hosp-001",
        "/fhir/Organization?name=人民",
    ] {
        ok(app.get(path).await).await;
    }
    let retry = assert_limited(
        app.get("/fhir/Endpoint?organization=hosp-001").await,
        3,
        "public directory from this address",
    )
    .await;
    let elsewhere = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .unwrap();
    let resp = elsewhere
        .get(app.url("/fhir/Organization/hosp-001"))
        .send()
        .await
        .unwrap();
    ok(resp).await;
    wait_secs(retry).await;
    ok(app.get("/fhir/Organization/hosp-001").await).await;
    // Recorded without waiting: the records arrive shortly after the answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reads: Vec<String> = crate::auditing::records(&app)
            .await
            .into_iter()
            .filter(|e| e.subtype_code == "read" || e.subtype_code == "search-type")
            .map(|e| e.resource)
            .collect();
        if reads.len() == 5 {
            assert!(reads.iter().any(|r| r.contains("127.0.0.2")), "{reads:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of 5 reads recorded",
            reads.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crate::auditing::chain_ok(&app).await;
    app.stop().await;
}

on_both_backends!(
    a_token_and_its_institution_are_limited,
    anonymous_directory_reads_are_limited_per_address,
);

/// Two replicas over one PostgreSQL database and one Redis spend from one budget: a token over
/// its budget gets 429 with Retry-After at both, then its institution, then a directory reader's
/// address; another institution is unaffected; the budget recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_budgets_through_redis() {
    let db = TestDb::new(Backend::Postgres);
    let url = db.url.clone();
    let prefix = format!("yqtest:{}:", uuid::Uuid::new_v4().simple());
    let settings = || {
        let mut s = replica_settings(&url, &prefix);
        limits(&mut s);
        s
    };
    let a = TestApp::spawn_on(db, settings()).await;
    let b = TestApp::spawn_on(TestDb::shared(&url), settings()).await;
    let (keys, other_keys) = (member(&a, 1).await, member(&a, 2).await);
    let first = token(&a, &keys, 1).await;
    for app in [&a, &b, &a, &b] {
        ok(whoami(app, &first).await).await;
    }
    let mut retry = 0;
    for app in [&a, &b] {
        retry = assert_limited(whoami(app, &first).await, 4, "with this access token").await;
    }
    // With Redis both budgets are taken all or nothing: the refused calls spent nothing of
    // the institution's 6, so a second token gets exactly 2 more.
    let second = token(&b, &keys, 1).await;
    ok(whoami(&b, &second).await).await;
    ok(whoami(&a, &second).await).await;
    for app in [&a, &b] {
        let wait = assert_limited(whoami(app, &second).await, 6, "from institution hosp-001").await;
        retry = retry.max(wait);
    }
    let other = token(&a, &other_keys, 2).await;
    ok(whoami(&b, &other).await).await;
    // Public directory reads: one address's budget of 3 across both replicas.
    for app in [&a, &b, &a] {
        ok(app.get("/fhir/Organization/hosp-001").await).await;
    }
    for app in [&b, &a] {
        let wait = assert_limited(
            app.get("/fhir/Organization/hosp-001").await,
            3,
            "public directory",
        )
        .await;
        retry = retry.max(wait);
    }
    wait_secs(retry).await;
    ok(whoami(&b, &first).await).await;
    ok(b.get("/fhir/Organization/hosp-001").await).await;
    b.stop().await;
    a.stop().await;
}

/// With Redis configured and unreachable, limited calls fail closed (503 with Retry-After),
/// and work again when Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_closed_while_redis_is_unreachable() {
    let proxy = Proxy::start(socket_of(&redis_url())).await;
    let url = via_proxy(&redis_url(), &proxy);
    let prefix = format!("yqtest:{}:", uuid::Uuid::new_v4().simple());
    let app = TestApp::spawn_with(Backend::Sqlite, |s| {
        s.redis.url = Secret::new(url);
        s.redis.key_prefix = prefix;
        s.redis.timeout_ms = 500;
        s.auth.ip_burst = 10_000;
    })
    .await;
    let keys = member(&app, 1).await;
    let access = token(&app, &keys, 1).await;
    ok(whoami(&app, &access).await).await;
    ok(app.get("/fhir/Organization/hosp-001").await).await;
    proxy.down().await;
    for resp in [
        whoami(&app, &access).await,
        app.get("/fhir/Organization/hosp-001").await,
    ] {
        assert!(resp.headers().contains_key("retry-after"));
        assert_outcome(resp, 503, "unavailable").await;
    }
    proxy.up();
    let deadline = Instant::now() + Duration::from_secs(10);
    while whoami(&app, &access).await.status() != 200 {
        assert!(
            Instant::now() < deadline,
            "calls did not recover with Redis"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ok(app.get("/fhir/Organization/hosp-001").await).await;
    app.stop().await;
}
