//! Machine authentication (issue 3): the SMART Backend Services token endpoint, gateway access
//! tokens on routes, rate limits, the audit trail — on SQLite and PostgreSQL, plus two replicas
//! sharing PostgreSQL and Redis, and SM2 assertions produced by gmssl and the OpenSSL CLI.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, KeyPair,
};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use yiqiao_gateway::config::{RateLimit, Settings};
use yiqiao_registry::auth::{AuthEvent, list_events};
use yiqiao_sm::{DEFAULT_SIGNER_ID, Sm2PrivateKey, sign_jws};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TempDir, TestApp, TestDb, assert_outcome, institution, replica_settings,
};
use crate::wait;

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

struct RsaKey {
    private_pem: String,
    public_pem: String,
    jwk: Value,
}

async fn openssl(args: &[&str]) -> Vec<u8> {
    let out = wait::output(
        wait::command("openssl").args(args),
        &format!("`openssl {}`", args.join(" ")),
    )
    .await;
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// One RSA key for the whole test binary (generation is slow), made by the OpenSSL CLI.
async fn rsa_key() -> &'static RsaKey {
    static KEY: OnceCell<RsaKey> = OnceCell::const_new();
    KEY.get_or_init(|| async {
        let dir = TempDir::new();
        let path = dir.path.join("rsa.pem");
        let path = path.to_str().unwrap();
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            path,
        ])
        .await;
        let private_pem = std::fs::read_to_string(path).unwrap();
        let public_pem =
            String::from_utf8(openssl(&["pkey", "-in", path, "-pubout"]).await).unwrap();
        let modulus =
            String::from_utf8(openssl(&["rsa", "-in", path, "-noout", "-modulus"]).await).unwrap();
        let n = hex::decode(modulus.trim().trim_start_matches("Modulus=")).unwrap();
        let jwk = json!({"kty": "RSA", "kid": "rs", "use": "sig", "n": B64.encode(n), "e": "AQAB"});
        RsaKey {
            private_pem,
            public_pem,
            jwk,
        }
    })
    .await
}

struct EcKey {
    pkcs8: Vec<u8>,
    jwk: Value,
}

fn ec_key(alg: &'static EcdsaSigningAlgorithm, crv: &str, kid: &str) -> EcKey {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    let half = (point.len() - 1) / 2;
    EcKey {
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk: json!({"kty": "EC", "crv": crv, "kid": kid,
                    "x": B64.encode(&point[1..=half]), "y": B64.encode(&point[half + 1..])}),
    }
}

/// An institution's keys: RSA (kid rs), P-256 (es256), P-384 (es384), SM2 (sm2).
pub(crate) struct ClientKeys {
    rsa: &'static RsaKey,
    es256: EcKey,
    es384: EcKey,
    sm2: Sm2PrivateKey,
}

impl ClientKeys {
    pub(crate) async fn new(prefix: &str) -> ClientKeys {
        ClientKeys {
            rsa: rsa_key().await,
            es256: ec_key(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                "P-256",
                &format!("{prefix}es256"),
            ),
            es384: ec_key(
                &ECDSA_P384_SHA384_FIXED_SIGNING,
                "P-384",
                &format!("{prefix}es384"),
            ),
            sm2: Sm2PrivateKey::generate().unwrap(),
        }
    }

    /// Registration JSON for institution `n` with these keys (kids prefixed).
    pub(crate) fn registration(&self, n: u32, prefix: &str) -> Value {
        let mut body = institution(n);
        let mut rsa = self.rsa.jwk.clone();
        rsa["kid"] = json!(format!("{prefix}rs"));
        body["jwks"] = json!({"keys": [rsa, self.es256.jwk, self.es384.jwk]});
        body["sm2_keys"] = json!([{"kid": format!("{prefix}sm2"),
                                   "pem": self.sm2.public_key().to_spki_pem().unwrap()}]);
        body["allowed_scopes"] = json!([
            "system/Patient.rs",
            "system/Observation.rs",
            "system/Consent.cruds",
            "system/AuditEvent.rs"
        ]);
        body
    }

    /// A signed assertion. `alg` picks the key; `kid` is put in the header as given.
    pub(crate) fn sign(&self, alg: &str, kid: &str, claims: &Value) -> String {
        let encoding = match alg {
            "RS256" | "RS384" => EncodingKey::from_rsa_pem(self.rsa.private_pem.as_bytes()),
            "ES256" => Ok(EncodingKey::from_ec_der(&self.es256.pkcs8)),
            "ES384" => Ok(EncodingKey::from_ec_der(&self.es384.pkcs8)),
            "SM2SM3" => {
                return sign_jws(
                    &json!({"typ": "JWT", "kid": kid}),
                    claims,
                    &self.sm2.signing_key(DEFAULT_SIGNER_ID).unwrap(),
                )
                .unwrap();
            }
            other => panic!("no key for {other}"),
        }
        .unwrap();
        let algorithm: Algorithm = alg.parse().unwrap();
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.to_string());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &encoding).unwrap()
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn token_url(app: &TestApp) -> String {
    format!("{}/oauth2/token", app.state.base_url)
}

pub(crate) fn claims(app: &TestApp, iss: &str) -> Value {
    let now = now();
    json!({"iss": iss, "sub": iss, "aud": token_url(app), "iat": now, "exp": now + 240,
           "jti": uuid::Uuid::new_v4().to_string()})
}

async fn request_token(app: &TestApp, form: &[(&str, &str)]) -> reqwest::Response {
    app.client
        .post(app.url("/oauth2/token"))
        .form(form)
        .send()
        .await
        .unwrap()
}

pub(crate) async fn token_with(app: &TestApp, assertion: &str, scope: &str) -> reqwest::Response {
    request_token(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("scope", scope),
            ("purpose_of_use", "TREAT"),
        ],
    )
    .await
}

/// An RFC 6749 error body with the status and error code; returns the body.
async fn assert_oauth_error(resp: reqwest::Response, status: u16, error: &str) -> Value {
    let got = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    );
    assert_eq!(headers["cache-control"], "no-store");
    if error == "invalid_client" {
        assert!(headers.contains_key("www-authenticate"));
    }
    body
}

fn events(app: &TestApp) -> Vec<AuthEvent> {
    let mut conn = app.state.store.conn().unwrap();
    list_events(&mut conn, None, 10_000).unwrap()
}

pub(crate) async fn register(app: &TestApp, body: &Value) {
    let resp = app.admin_post("/admin/institutions", body).await;
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
}

fn generous(s: &mut Settings) {
    s.auth.ip_burst = 10_000;
    s.auth.institution_burst = 10_000;
    s.auth.directory_cache_ttl_ms = 0;
}

async fn access_token(app: &TestApp, keys: &ClientKeys, scope: &str) -> String {
    let assertion = keys.sign("ES256", "es256", &claims(app, "hosp-001"));
    let resp = token_with(app, &assertion, scope).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

async fn tokens_for_every_algorithm(backend: Backend) {
    let app = TestApp::spawn_with(backend, generous).await;
    let keys = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;

    let config: Value = app
        .get("/.well-known/smart-configuration")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(config["token_endpoint"], token_url(&app));
    assert_eq!(
        config["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    for alg in ["RS256", "RS384", "ES256", "ES384", "SM2SM3"] {
        assert!(
            config["token_endpoint_auth_signing_alg_values_supported"]
                .as_array()
                .unwrap()
                .contains(&json!(alg))
        );
    }
    let jwks: Value = app
        .get("/.well-known/jwks.json")
        .await
        .json()
        .await
        .unwrap();
    let gateway_key = &jwks["keys"][0];
    assert_eq!(gateway_key["alg"], "ES256");
    assert!(gateway_key.get("d").is_none(), "private part published");

    for (alg, kid) in [
        ("RS256", "rs"),
        ("RS384", "rs"),
        ("ES256", "es256"),
        ("ES384", "es384"),
        ("SM2SM3", "sm2"),
    ] {
        let assertion = keys.sign(alg, kid, &claims(&app, "hosp-001"));
        let resp = token_with(
            &app,
            &assertion,
            "system/Patient.cruds system/AuditEvent.rs system/DocumentReference.rs",
        )
        .await;
        assert_eq!(resp.status(), 200, "{alg}: {}", resp.text().await.unwrap());
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["expires_in"], 300);
        // Only the intersection of request and directory.
        assert_eq!(body["scope"], "system/Patient.rs system/AuditEvent.rs");
        assert_eq!(body["purpose_of_use"], "TREAT");
        let token = body["access_token"].as_str().unwrap();

        // The token verifies independently with the published key.
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.kid.as_deref(), gateway_key["kid"].as_str());
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(gateway_key.clone()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.set_audience(&[app.state.base_url.as_ref()]);
        let data = jsonwebtoken::decode::<Value>(
            token,
            &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "hosp-001");
        assert!(data.claims["exp"].as_i64().unwrap() - now() <= 300);

        let resp = app
            .client
            .get(app.url("/oauth2/events"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{alg}");
        let mine: Value = resp.json().await.unwrap();
        assert_eq!(mine[0]["outcome"], "success", "{mine}");
        let me: Value = app
            .client
            .get(app.url("/oauth2/whoami"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            me,
            json!({"institution": "hosp-001", "via": "access_token", "purpose_of_use": "TREAT",
                   "scopes": ["system/Patient.rs", "system/AuditEvent.rs"]})
        );
    }
    let recorded = events(&app);
    assert_eq!(recorded.len(), 5);
    assert!(recorded.iter().all(|e| e.outcome == "success"
        && e.client_id.as_deref() == Some("hosp-001")
        && e.jti.is_some()
        && e.client_ip.as_deref() == Some("127.0.0.1")
        && e.request_id.is_some()));
    app.stop().await;
}

async fn rejected_assertions_yield_oauth_errors_and_audit_records(backend: Backend) {
    let app = TestApp::spawn_with(backend, generous).await;
    let keys = ClientKeys::new("").await;
    let other = ClientKeys::new("b-").await;
    let suspended = ClientKeys::new("c-").await;
    register(&app, &keys.registration(1, "")).await;
    register(&app, &other.registration(2, "b-")).await;
    register(&app, &suspended.registration(3, "c-")).await;
    let resp = app
        .admin_post("/admin/institutions/hosp-003/suspend", &json!({}))
        .await;
    assert!(resp.status().is_success());
    let scope = "system/Patient.rs";
    let good = |c: &Value| keys.sign("ES256", "es256", c);
    let base = || claims(&app, "hosp-001");
    let with = |k: &str, v: Value| {
        let mut c = base();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = base();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let unsigned = {
        let header = B64.encode(br#"{"alg":"none","typ":"JWT","kid":"es256"}"#);
        let payload = B64.encode(base().to_string());
        format!("{header}.{payload}.")
    };
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rs".into());
        jsonwebtoken::encode(
            &header,
            &base(),
            &EncodingKey::from_secret(keys.rsa.public_pem.as_bytes()),
        )
        .unwrap()
    };
    let rsa_key_under_es256_header = {
        // Signed with the RSA key but claiming ES256 for the RSA kid: alg/key-type mismatch.
        let token = keys.sign("RS256", "rs", &base());
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        parts[0] = B64.encode(br#"{"alg":"ES256","typ":"JWT","kid":"rs"}"#);
        parts.join(".")
    };
    let other_signer_id = sign_jws(
        &json!({"typ": "JWT", "kid": "sm2"}),
        &base(),
        &keys.sm2.signing_key("another-signer-id").unwrap(),
    )
    .unwrap();
    let oversized = good(&with("padding", json!("x".repeat(9000))));
    let replayed = good(&base());
    assert_eq!(token_with(&app, &replayed, scope).await.status(), 200);

    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        ("alg none", unsigned, scope, 401, "invalid_client"),
        (
            "HS256 with the public key",
            hs256_with_public_key,
            scope,
            401,
            "invalid_client",
        ),
        (
            "alg not matching the key type",
            rsa_key_under_es256_header,
            scope,
            401,
            "invalid_client",
        ),
        (
            "expired",
            good(&with("exp", json!(now() - 3600))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "exp too far ahead",
            good(&with("exp", json!(now() + 3600))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "future nbf",
            good(&with("nbf", json!(now() + 600))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "future iat",
            good(&with("iat", json!(now() + 600))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "wrong aud",
            good(&with("aud", json!("https://elsewhere.example/token"))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "sub differs from iss",
            good(&with("sub", json!("hosp-002"))),
            scope,
            400,
            "invalid_grant",
        ),
        (
            "missing jti",
            good(&without("jti")),
            scope,
            400,
            "invalid_grant",
        ),
        ("replayed jti", replayed, scope, 400, "invalid_grant"),
        (
            "unknown kid",
            keys.sign("ES256", "nope", &base()),
            scope,
            401,
            "invalid_client",
        ),
        (
            "key of another institution",
            other.sign("ES256", "b-es256", &base()),
            scope,
            401,
            "invalid_client",
        ),
        (
            "unknown client",
            good(&with("iss", json!("nobody"))),
            scope,
            401,
            "invalid_client",
        ),
        (
            "suspended institution",
            suspended.sign("ES256", "c-es256", &claims(&app, "hosp-003")),
            scope,
            401,
            "invalid_client",
        ),
        (
            "oversized assertion",
            oversized,
            scope,
            400,
            "invalid_request",
        ),
        (
            "non-base64 assertion",
            "e30.!!!not-base64!!!.e30".into(),
            scope,
            400,
            "invalid_request",
        ),
        (
            "not a JWS",
            "just-a-string".into(),
            scope,
            400,
            "invalid_request",
        ),
        (
            "SM2 with another signer ID",
            other_signer_id,
            scope,
            401,
            "invalid_client",
        ),
        (
            "scope not granted",
            good(&base()),
            "system/DocumentReference.rs",
            400,
            "invalid_scope",
        ),
    ];
    let mut expected_events = events(&app).len();
    for (name, assertion, scope, status, error) in cases {
        let resp = token_with(&app, &assertion, scope).await;
        let body = assert_oauth_error(resp, status, error).await;
        expected_events += 1;
        let recorded = events(&app);
        assert_eq!(recorded.len(), expected_events, "{name}: one audit record");
        let last = &recorded[0];
        assert_eq!(last.outcome, "failure", "{name}");
        assert_eq!(last.oauth_error.as_deref(), Some(error), "{name}");
        assert_eq!(
            last.reason,
            body["error_description"].as_str().unwrap(),
            "{name}"
        );
    }

    // Bad requests around the assertion.
    let assertion = good(&base());
    let form = |purpose: Option<&str>, grant: &str| {
        let mut f = vec![
            ("grant_type", grant.to_string()),
            ("client_assertion_type", ASSERTION_TYPE.to_string()),
            ("client_assertion", assertion.clone()),
            ("scope", scope.to_string()),
        ];
        if let Some(p) = purpose {
            f.push(("purpose_of_use", p.to_string()));
        }
        f
    };
    for (f, status, error) in [
        (
            form(Some("FUN"), "client_credentials"),
            400,
            "invalid_request",
        ),
        (
            form(Some("TREAT"), "password"),
            400,
            "unsupported_grant_type",
        ),
    ] {
        let refs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_oauth_error(request_token(&app, &refs).await, status, error).await;
    }
    let resp = app
        .client
        .post(app.url("/oauth2/token"))
        .json(&json!({"grant_type": "client_credentials"}))
        .send()
        .await
        .unwrap();
    assert_oauth_error(resp, 400, "invalid_request").await;
    // A stock SMART Backend Services client sends no purpose_of_use: its token carries the
    // configured default (consent.default_purpose, TREAT) instead of being refused.
    let f = form(None, "client_credentials");
    let refs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let resp = request_token(&app, &refs).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["purpose_of_use"], "TREAT", "{body}");
    assert_eq!(events(&app).len(), expected_events + 4);
    app.stop().await;
}

async fn access_tokens_guard_routes(backend: Backend) {
    let app = TestApp::spawn_with(backend, generous).await;
    let keys = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;

    let resp = app.get("/oauth2/events").await;
    assert!(resp.headers().contains_key("www-authenticate"));
    assert_outcome(resp, 401, "unauthenticated").await;

    let resp = app
        .client
        .get(app.url("/oauth2/events"))
        .bearer_auth("not.a.token")
        .send()
        .await
        .unwrap();
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert_outcome(resp, 401, "unauthenticated").await;

    // A valid token without system/AuditEvent.rs: 403 naming the scope.
    let patient_only = access_token(&app, &keys, "system/Patient.rs").await;
    let resp = app
        .client
        .get(app.url("/oauth2/events"))
        .bearer_auth(&patient_only)
        .send()
        .await
        .unwrap();
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    let body = assert_outcome(resp, 403, "forbidden").await;
    assert!(body.to_string().contains("system/AuditEvent.r"), "{body}");

    // A tampered token.
    let audit = access_token(&app, &keys, "system/AuditEvent.rs").await;
    let mut tampered = audit.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let resp = app
        .client
        .get(app.url("/oauth2/events"))
        .bearer_auth(&tampered)
        .send()
        .await
        .unwrap();
    assert_outcome(resp, 401, "unauthenticated").await;

    // The admin-on-behalf path still works.
    let resp = app
        .client
        .get(app.url("/oauth2/events"))
        .bearer_auth(ADMIN_TOKEN)
        .header("X-On-Behalf-Of", "hosp-001")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Valid token; then the institution is suspended: the token stops working at once
    // (directory cache disabled here).
    let get = || {
        app.client
            .get(app.url("/oauth2/events"))
            .bearer_auth(&audit)
            .send()
    };
    assert_eq!(get().await.unwrap().status(), 200);
    let resp = app
        .admin_post("/admin/institutions/hosp-001/suspend", &json!({}))
        .await;
    assert!(resp.status().is_success());
    assert_outcome(get().await.unwrap(), 401, "unauthenticated").await;
    app.stop().await;
}

async fn token_endpoint_rate_limits(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.auth.ip_per_minute = 1;
        s.auth.ip_burst = 5;
        s.auth.institution_limits.insert(
            "hosp-001".into(),
            RateLimit {
                per_minute: 1,
                burst: 2,
            },
        );
    })
    .await;
    let keys = ClientKeys::new("").await;
    let other = ClientKeys::new("b-").await;
    register(&app, &keys.registration(1, "")).await;
    register(&app, &other.registration(2, "b-")).await;
    for _ in 0..2 {
        let a = keys.sign("ES256", "es256", &claims(&app, "hosp-001"));
        let resp = token_with(&app, &a, "system/Patient.rs").await;
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().contains_key("ratelimit-remaining"));
    }
    let a = keys.sign("ES256", "es256", &claims(&app, "hosp-001"));
    let resp = token_with(&app, &a, "system/Patient.rs").await;
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(resp.headers()["ratelimit-limit"], "2");
    assert_eq!(resp.headers()["ratelimit-remaining"], "0");
    assert_oauth_error(resp, 429, "rate_limited").await;
    // Another institution is not affected by hosp-001's limit…
    for _ in 0..2 {
        let a = other.sign("ES256", "b-es256", &claims(&app, "hosp-002"));
        assert_eq!(
            token_with(&app, &a, "system/Patient.rs").await.status(),
            200
        );
    }
    // …but the address is now over its burst of 5.
    let a = other.sign("ES256", "b-es256", &claims(&app, "hosp-002"));
    let resp = token_with(&app, &a, "system/Patient.rs").await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_oauth_error(resp, 429, "rate_limited").await;
    let limited = events(&app)
        .into_iter()
        .filter(|e| e.oauth_error.as_deref() == Some("rate_limited"))
        .count();
    assert_eq!(limited, 2);
    app.stop().await;
}

fn interop_script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/interop")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The SM2 assertion is produced by third-party code: PyPI gmssl, and the OpenSSL 3 CLI.
async fn sm2_assertion_signed_by_gmssl_and_openssl(backend: Backend) {
    let app = TestApp::spawn_with(backend, generous).await;
    let dir = TempDir::new();
    let private = dir.path.join("client.pem");
    let private = private.to_str().unwrap();
    openssl(&["genpkey", "-algorithm", "SM2", "-out", private]).await;
    let public = String::from_utf8(openssl(&["pkey", "-in", private, "-pubout"]).await).unwrap();
    let mut body = institution(1);
    body["sm2_keys"] = json!([{"kid": "py-sm2", "pem": public}]);
    register(&app, &body).await;
    for signer in ["gmssl", "openssl"] {
        let out = wait::output(
            wait::command("python3")
                .arg(interop_script("jws_assertion.py"))
                .args(["sign", "--key", private, "--iss", "hosp-001", "--aud"])
                .arg(token_url(&app))
                .args(["--kid", "py-sm2", "--signer", signer]),
            &format!("jws_assertion.py sign --signer {signer}"),
        )
        .await;
        assert!(
            out.status.success(),
            "{signer}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let assertion = String::from_utf8(out.stdout).unwrap();
        let resp = token_with(&app, assertion.trim(), "system/Patient.rs").await;
        assert_eq!(
            resp.status(),
            200,
            "{signer}: {}",
            resp.text().await.unwrap()
        );
    }
    let recorded = events(&app);
    assert!(recorded.iter().all(|e| e.alg.as_deref() == Some("SM2SM3")));
    app.stop().await;
}

async fn sm2_registration_must_be_an_sm2_key(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut body = institution(1);
    // Valid PEM and base64, but a P-256 key, not SM2.
    let p256 = String::from_utf8(
        openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .await,
    )
    .unwrap();
    let dir = TempDir::new();
    let path = dir.path.join("p256.pem");
    std::fs::write(&path, p256).unwrap();
    let public =
        String::from_utf8(openssl(&["pkey", "-in", path.to_str().unwrap(), "-pubout"]).await)
            .unwrap();
    body["sm2_keys"] = json!([{"kid": "k", "pem": public}]);
    let resp = app.admin_post("/admin/institutions", &body).await;
    let out = assert_outcome(resp, 422, "validation-failed").await;
    assert_eq!(out["issue"][0]["expression"][0], "sm2_keys[0].pem");
    app.stop().await;
}

/// The per-institution limit counts only requests signed by the institution: assertions that
/// merely claim `iss` = hosp-001 (signed with another key) cannot spend hosp-001's budget.
async fn forged_assertions_do_not_spend_an_institutions_limit(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.auth.ip_burst = 10_000;
        s.auth.institution_limits.insert(
            "hosp-001".into(),
            RateLimit {
                per_minute: 1,
                burst: 2,
            },
        );
    })
    .await;
    let keys = ClientKeys::new("").await;
    let attacker = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;
    for _ in 0..5 {
        let forged = attacker.sign("ES256", "es256", &claims(&app, "hosp-001"));
        let resp = token_with(&app, &forged, "system/Patient.rs").await;
        assert_oauth_error(resp, 401, "invalid_client").await;
    }
    // hosp-001 still has its whole burst…
    for _ in 0..2 {
        let a = keys.sign("ES256", "es256", &claims(&app, "hosp-001"));
        assert_eq!(
            token_with(&app, &a, "system/Patient.rs").await.status(),
            200
        );
    }
    // …and its limit still holds.
    let a = keys.sign("ES256", "es256", &claims(&app, "hosp-001"));
    let resp = token_with(&app, &a, "system/Patient.rs").await;
    assert_oauth_error(resp, 429, "rate_limited").await;
    app.stop().await;
}

/// API calls with a bad, expired or forged access token are written to auth_events, at most
/// `auth.failure_log_per_minute` per replica and minute; the rest are counted and the next
/// row says how many were left out, so every refusal is accounted for.
async fn refused_api_calls_are_logged_within_a_budget(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        generous(s);
        s.auth.failure_log_per_minute = 30;
    })
    .await;
    let keys = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;
    let call = |token: String| {
        app.client
            .get(app.url("/oauth2/events"))
            .bearer_auth(token)
            .send()
    };
    // Expired (signed by the gateway itself), forged (signature altered), garbage.
    let now = now();
    let expired = app
        .state
        .auth
        .keys
        .sign(&yiqiao_gateway::oauth::keys::AccessClaims {
            iss: app.state.base_url.to_string(),
            sub: "hosp-001".into(),
            aud: app.state.base_url.to_string(),
            client_id: "hosp-001".into(),
            exp: now - 120,
            iat: now - 420,
            jti: "expired-1".into(),
            scope: "system/AuditEvent.rs".into(),
            purpose_of_use: "TREAT".into(),
            cnf: None,
        })
        .unwrap();
    assert_outcome(call(expired).await.unwrap(), 401, "unauthenticated").await;
    let mut forged = access_token(&app, &keys, "system/AuditEvent.rs").await;
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    assert_outcome(call(forged).await.unwrap(), 401, "unauthenticated").await;
    let refused_rows = |app: &TestApp| -> Vec<AuthEvent> {
        events(app)
            .into_iter()
            .filter(|e| e.oauth_error.as_deref() == Some("invalid_token"))
            .collect()
    };
    let rows = refused_rows(&app);
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .any(|e| e.reason.contains("expired") && e.reason.contains("hosp-001"))
    );
    assert!(rows.iter().any(|e| e.reason.contains("does not verify")));
    assert!(
        rows.iter()
            .all(|e| e.client_ip.is_some() && e.outcome == "failure")
    );
    // A flood: 40 more; the budget (30 a minute) is spent, the rest only counted.
    for i in 0..40 {
        assert_eq!(call(format!("garbage-{i}")).await.unwrap().status(), 401);
    }
    assert!(refused_rows(&app).len() < 42, "the flood was written whole");
    assert!(app.state.auth.failures.suppressed() > 0);
    // After the budget refills (one row per 2 s), the next row reports what was left out.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(call("garbage-last".into()).await.unwrap().status(), 401);
    let rows = refused_rows(&app);
    let left_out: u64 = rows
        .iter()
        .filter_map(|e| e.reason.split("(+").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .map(|n| n.parse::<u64>().unwrap())
        .sum();
    assert!(left_out > 0, "{rows:?}");
    assert_eq!(
        rows.len() as u64 + left_out,
        43,
        "every refusal accounted for"
    );
    app.stop().await;
}

/// A CA, the gateway's TLS server certificate and two client certificates (rcgen), as PEM
/// files in `dir`: (ca.pem, server.pem, server.key, [(client cert PEM, key PEM, SHA-256 hex)]).
pub(crate) fn tls_material(dir: &Path) -> Vec<(String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Yiqiao test institutions CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    (0..2)
        .map(|i| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, format!("hosp-00{} client {i}", i + 1));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, &issuer).unwrap();
            let fingerprint: String = ring::digest::digest(&ring::digest::SHA256, cert.der())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            (cert.pem(), key.serialize_pem(), fingerprint)
        })
        .collect()
}

/// Mutual TLS with real certificates: an institution bound to its client certificate gets a
/// token only over the mTLS listener with that certificate; the token is bound to it (RFC 8705)
/// and refused on other connections.
async fn mutual_tls_binds_an_institution_to_its_certificate(backend: Backend) {
    let dir = TempDir::new();
    let clients = tls_material(&dir.path);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = TestApp::spawn_with(backend, |s| {
        generous(s);
        s.mtls.listen = format!("127.0.0.1:{tls_port}");
        s.mtls.cert_file = dir.path.join("server.pem").display().to_string();
        s.mtls.key_file = dir.path.join("server.key").display().to_string();
        s.mtls.client_ca_file = dir.path.join("ca.pem").display().to_string();
    })
    .await;
    let keys = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(dir.path.join("ca.pem")).unwrap()).unwrap();
    let tls_client = |client: Option<&(String, String, String)>| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
            .timeout(crate::wait::REQUEST);
        if let Some((cert, key, _)) = client {
            b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
        }
        b.build().unwrap()
    };
    let tls_base = format!("https://127.0.0.1:{tls_port}");
    let (own, other) = (tls_client(Some(&clients[0])), tls_client(Some(&clients[1])));
    let token_over = |client: reqwest::Client, base: String| {
        let assertion = keys.sign("ES256", "es256", &claims(&app, "hosp-001"));
        async move {
            client
                .post(format!("{base}/oauth2/token"))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", assertion.as_str()),
                    ("scope", "system/AuditEvent.rs"),
                    ("purpose_of_use", "TREAT"),
                ])
                .send()
                .await
                .unwrap()
        }
    };

    // Not bound yet: both listeners serve it, and its tokens carry no cnf.
    let resp = token_over(own.clone(), tls_base.clone()).await;
    assert_eq!(resp.status(), 200);
    // Without a client certificate the TLS handshake fails.
    let anonymous = tls_client(None);
    assert!(
        anonymous
            .get(format!("{tls_base}/healthz"))
            .send()
            .await
            .is_err()
    );

    // Bind hosp-001 to its certificate (fingerprint with colons, upper case).
    let colons: Vec<String> = clients[0]
        .2
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let resp = app
        .admin_put(
            "/admin/institutions/hosp-001/client-certificate",
            &json!({"sha256": colons.join(":")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["sha256"], clients[0].2);
    let resp = app
        .admin_put(
            "/admin/institutions/hosp-001/client-certificate",
            &json!({"sha256": "abc"}),
        )
        .await;
    assert_outcome(resp, 422, "validation-failed").await;
    let resp = app
        .admin_put(
            "/admin/institutions/hosp-999/client-certificate",
            &json!({"sha256": clients[0].2}),
        )
        .await;
    assert_outcome(resp, 404, "not-found").await;

    // Plain HTTP, or TLS with another (valid, same-CA) certificate: invalid_client.
    let body = assert_oauth_error(
        token_over(app.client.clone(), app.base.clone()).await,
        401,
        "invalid_client",
    )
    .await;
    assert!(body.to_string().contains("requires mutual TLS"), "{body}");
    let body = assert_oauth_error(
        token_over(other.clone(), tls_base.clone()).await,
        401,
        "invalid_client",
    )
    .await;
    assert!(
        body.to_string().contains("registered client certificate"),
        "{body}"
    );

    // Its own certificate: a token bound to the certificate.
    let resp = token_over(own.clone(), tls_base.clone()).await;
    assert_eq!(resp.status(), 200);
    let token = resp.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let payload: Value =
        serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    let digest = hex::decode(&clients[0].2).unwrap();
    assert_eq!(payload["cnf"]["x5t#S256"], B64.encode(digest));
    let events_via = |client: reqwest::Client, base: String| {
        let token = token.clone();
        async move {
            client
                .get(format!("{base}/oauth2/events"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(
        events_via(own.clone(), tls_base.clone()).await.status(),
        200
    );
    assert_outcome(
        events_via(app.client.clone(), app.base.clone()).await,
        401,
        "unauthenticated",
    )
    .await;
    assert_outcome(
        events_via(other.clone(), tls_base.clone()).await,
        401,
        "unauthenticated",
    )
    .await;

    // Unbound again: plain HTTP works for new tokens.
    let resp = app
        .client
        .delete(app.url("/admin/institutions/hosp-001/client-certificate"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        token_over(app.client.clone(), app.base.clone())
            .await
            .status(),
        200
    );
    app.stop().await;
}

/// Issue 25: a control character in the token request's query string, a form parameter or the
/// assertion's iss, kid or jti is refused with an OAuth error before anything is looked up, and
/// every refusal has its auth_events row, the values escaped (PostgreSQL cannot store U+0000):
/// a validly signed assertion with a NUL in its jti is a 401, not a 503 without a record.
async fn control_characters_in_token_requests_are_refused_and_recorded(backend: Backend) {
    let app = TestApp::spawn_with(backend, generous).await;
    let keys = ClientKeys::new("").await;
    register(&app, &keys.registration(1, "")).await;
    let scope = "system/Patient.rs";
    let with = |k: &str, v: &str| {
        let mut c = claims(&app, "hosp-001");
        c[k] = json!(v);
        c
    };
    let before = events(&app).len();
    let signed = |c: &Value| keys.sign("ES256", "es256", c);
    let resp = token_with(&app, &signed(&with("jti", "j\u{0}1")), scope).await;
    let out = assert_oauth_error(resp, 401, "invalid_client").await;
    assert!(
        out["error_description"].as_str().unwrap().contains("jti"),
        "{out}"
    );
    let resp = token_with(&app, &signed(&with("iss", "hosp-001\u{0}")), scope).await;
    assert_oauth_error(resp, 401, "invalid_client").await;
    let bad_kid = keys.sign("ES256", "es256\u{0}", &claims(&app, "hosp-001"));
    assert_oauth_error(
        token_with(&app, &bad_kid, scope).await,
        401,
        "invalid_client",
    )
    .await;
    let resp = token_with(
        &app,
        &signed(&claims(&app, "hosp-001")),
        "system/Patient.rs\u{0}",
    )
    .await;
    let out = assert_oauth_error(resp, 400, "invalid_request").await;
    assert!(
        out["error_description"].as_str().unwrap().contains("scope"),
        "{out}"
    );
    let resp = app
        .client
        .post(app.url("/oauth2/token?state=a%00"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &signed(&claims(&app, "hosp-001"))),
            ("scope", scope),
            ("purpose_of_use", "TREAT"),
        ])
        .send()
        .await
        .unwrap();
    assert_oauth_error(resp, 400, "invalid_request").await;
    let recorded = events(&app);
    assert_eq!(
        recorded.len(),
        before + 5,
        "one auth_events row per refusal"
    );
    let failures: Vec<&AuthEvent> = recorded.iter().filter(|e| e.outcome == "failure").collect();
    assert!(
        failures
            .iter()
            .any(|e| e.jti.as_deref() == Some("j\\u{0}1"))
    );
    assert!(
        failures
            .iter()
            .any(|e| e.client_id.as_deref() == Some("hosp-001\\u{0}"))
    );
    assert!(
        failures
            .iter()
            .any(|e| e.kid.as_deref() == Some("es256\\u{0}"))
    );
    // A clean request still gets its token afterwards.
    let resp = token_with(&app, &signed(&claims(&app, "hosp-001")), scope).await;
    assert_eq!(resp.status(), 200);
    app.stop().await;
}

crate::on_both_backends!(
    tokens_for_every_algorithm,
    rejected_assertions_yield_oauth_errors_and_audit_records,
    access_tokens_guard_routes,
    token_endpoint_rate_limits,
    sm2_assertion_signed_by_gmssl_and_openssl,
    sm2_registration_must_be_an_sm2_key,
    forged_assertions_do_not_spend_an_institutions_limit,
    refused_api_calls_are_logged_within_a_budget,
    mutual_tls_binds_an_institution_to_its_certificate,
    control_characters_in_token_requests_are_refused_and_recorded,
);

/// Two gateway replicas over one PostgreSQL database and one Redis: same signing key, a token
/// from one is accepted by the other, a jti used at one is refused at the other, and one rate
/// limit counts the requests of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_keys_replay_cache_and_rate_limit() {
    let db = TestDb::new(Backend::Postgres);
    let url = db.url.clone();
    let prefix = format!("yqtest:{}:", uuid::Uuid::new_v4().simple());
    let settings = || {
        let mut s = replica_settings(&url, &prefix);
        s.auth.ip_burst = 1000;
        s.auth.institution_limits.insert(
            "hosp-001".into(),
            RateLimit {
                per_minute: 1,
                burst: 3,
            },
        );
        s
    };
    let a = TestApp::spawn_on(db, settings()).await;
    let b = TestApp::spawn_on(TestDb::shared(&url), settings()).await;
    let jwks_a: Value = a.get("/.well-known/jwks.json").await.json().await.unwrap();
    let jwks_b: Value = b.get("/.well-known/jwks.json").await.json().await.unwrap();
    assert_eq!(jwks_a, jwks_b, "replicas must publish the same keys");

    let keys = ClientKeys::new("").await;
    register(&a, &keys.registration(1, "")).await;
    let claims = claims(&a, "hosp-001");
    assert_eq!(claims["aud"], "http://gateway.test/oauth2/token");
    let assertion = keys.sign("ES256", "es256", &claims);
    let resp = token_with(&a, &assertion, "system/AuditEvent.rs").await;
    assert_eq!(resp.status(), 200);
    let token: Value = resp.json().await.unwrap();
    // Replay at the other replica.
    let resp = token_with(&b, &assertion, "system/AuditEvent.rs").await;
    let body = assert_oauth_error(resp, 400, "invalid_grant").await;
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("used before")
    );
    // A token from replica a works at replica b.
    let resp = b
        .client
        .get(b.url("/oauth2/events"))
        .bearer_auth(token["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen: Value = resp.json().await.unwrap();
    assert_eq!(
        seen.as_array().unwrap().len(),
        2,
        "both replicas audit to one table"
    );
    // Burst 3 for hosp-001 across both replicas: two used above, one more, then 429.
    let fresh = keys.sign("ES256", "es256", &crate::auth::claims(&a, "hosp-001"));
    assert_eq!(
        token_with(&a, &fresh, "system/Patient.rs").await.status(),
        200
    );
    let fresh = keys.sign("ES256", "es256", &crate::auth::claims(&a, "hosp-001"));
    let resp = token_with(&b, &fresh, "system/Patient.rs").await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_oauth_error(resp, 429, "rate_limited").await;
    b.stop().await;
    a.stop().await;
}
