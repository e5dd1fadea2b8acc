//! The outbound URL policy and the gateway's client identity, on both backends (issue 25):
//! attachment URLs, webhooks and institution endpoints that point at loopback, link-local
//! (metadata), private or IPv6 loopback addresses, at names resolving to loopback, or use
//! plain http are refused at registration with one answer (422 `outbound-refused`); endpoints
//! that reached the directory another way are refused when called; allow-listed networks are
//! called; a failed retrieval says the same whether the port is closed or open; the simulated
//! hospitals answer 401 to requests without the gateway's SM2 signature, and an independent
//! Python implementation verifies the signature the gateway sends.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use yiqiao_gateway::config::Settings;
use yiqiao_gateway::outbound::OutboundSettings;
use yiqiao_sm::{DEFAULT_SIGNER_ID, SignedRequest, Sm2PrivateKey};

use crate::documents::{
    DISCHARGE, content_of, content_server, doc, get_as, post_as, register, search, setup,
};
use crate::federation::{Region, statuses};
use crate::helpers::{
    ADMIN_TOKEN, Backend, TempDir, assert_outcome, institution, test_gateway_key,
};
use crate::on_both_backends;
use crate::wait;

/// The policy as shipped: https only, nothing allow-listed.
fn default_policy(s: &mut Settings) {
    s.outbound = OutboundSettings::default();
}

/// URLs the default policy refuses, whatever the path.
const REFUSED: [&str; 9] = [
    "https://127.0.0.1/docs/a",
    "https://169.254.169.254/latest/meta-data/",
    "https://10.0.0.5/docs/a",
    "https://192.168.1.20/docs/a",
    "https://[::1]/docs/a",
    "https://[::ffff:127.0.0.1]/docs/a",
    "https://localhost:8443/docs/a",
    "http://his-1.example/docs/a",
    "ftp://his-1.example/docs/a",
];

/// The refusal and its text: every refusal has the same one.
async fn refusal(resp: reqwest::Response, field: &str) -> String {
    let body = assert_outcome(resp, 422, "outbound-refused").await;
    let issue = &body["issue"][0];
    assert_eq!(issue["expression"][0], field, "{body}");
    issue["details"]["text"].as_str().unwrap().to_string()
}

async fn attachment_urls_are_checked_at_registration(backend: Backend) {
    let app = setup(backend, default_policy).await;
    let mut texts = std::collections::BTreeSet::new();
    for (i, url) in REFUSED.iter().enumerate() {
        let mut d = doc(
            1,
            &format!("R{i}"),
            "MR-1",
            DISCHARGE,
            "2024-01-01T08:00:00+08:00",
        );
        d["content"][0]["attachment"]["url"] = json!(url);
        let resp = post_as(&app, 1, "/fhir/DocumentReference", &d).await;
        texts.insert(refusal(resp, "DocumentReference.content[0].attachment.url").await);
        // The same in a transaction Bundle, naming the entry.
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
            { "resource": doc(1, "OK", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00"),
              "request": { "method": "POST", "url": "DocumentReference" } },
            { "resource": d, "request": { "method": "POST", "url": "DocumentReference" } },
        ]});
        let resp = post_as(&app, 1, "/fhir", &bundle).await;
        refusal(resp, "Bundle.entry[1].resource.content[0].attachment.url").await;
    }
    assert_eq!(texts.len(), 1, "one text for every refusal: {texts:?}");
    // Nothing was stored.
    assert!(search(&app, 1, "").await.is_empty());
    // A public https location (not resolvable here) is accepted; it is checked when called.
    register(
        &app,
        1,
        &doc(1, "PUBLIC", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00"),
    )
    .await;
    app.stop().await;
}

/// Allow-listed networks are called (the test region's default: http and 127.0.0.0/8); a
/// narrower allow-list refuses the rest of loopback.
async fn allow_listed_networks_are_called(backend: Backend) {
    let app = setup(backend, |s| {
        s.outbound.allow_cidrs = vec!["127.0.0.1/32".into()];
    })
    .await;
    let mut served = BTreeMap::new();
    served.insert("GOOD".to_string(), content_of("GOOD"));
    let (base, server) = content_server(served).await;
    let mut d = doc(1, "GOOD", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
    d["content"][0]["attachment"]["url"] = json!(format!("{base}/docs/GOOD"));
    let id = register(&app, 1, &d).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = get_as(&app, 2, &format!("/fhir/Binary/{id}")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().to_vec(), content_of("GOOD"));
    let mut other = doc(1, "OTHER", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
    other["content"][0]["attachment"]["url"] = json!("http://127.0.0.2:9/docs/OTHER");
    let resp = post_as(&app, 1, "/fhir/DocumentReference", &other).await;
    refusal(resp, "DocumentReference.content[0].attachment.url").await;
    server.stop(false).await;
    app.stop().await;
}

/// A closed port and an open port that does not speak HTTP give the same answer.
async fn failed_retrievals_do_not_tell_open_from_closed(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open_port = open.local_addr().unwrap().port();
    let banner = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = open.accept().await else {
                return;
            };
            let _ = sock.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            let _ = sock.shutdown().await;
        }
    });
    let mut texts = Vec::new();
    for (name, port) in [("CLOSED", closed), ("OPEN", open_port)] {
        let mut d = doc(1, name, "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
        d["content"][0]["attachment"]["url"] =
            json!(format!("http://127.0.0.1:{port}/docs/{name}"));
        let id = register(&app, 1, &d).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let resp = get_as(&app, 2, &format!("/fhir/Binary/{id}")).await;
        let body = assert_outcome(resp, 502, "upstream-unavailable").await;
        texts.push(
            body["issue"][0]["details"]["text"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(
        texts[0], texts[1],
        "closed and open ports answered differently"
    );
    banner.abort();
    app.stop().await;
}

async fn webhooks_are_checked_at_registration(backend: Backend) {
    let app = setup(backend, default_policy).await;
    let mut texts = std::collections::BTreeSet::new();
    for url in REFUSED
        .iter()
        .chain(["https://[fe80::1]/hook", "https://100.64.0.1/hook"].iter())
    {
        let body = json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "probe",
            "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
            "channel": { "type": "rest-hook", "endpoint": url, "payload": "application/fhir+json" },
        });
        let resp = post_as(&app, 1, "/fhir/Subscription", &body).await;
        texts.insert(refusal(resp, "Subscription.channel.endpoint").await);
    }
    assert_eq!(texts.len(), 1, "{texts:?}");
    let body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "ours",
        "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
        "channel": { "type": "rest-hook", "endpoint": "https://hooks.his-1.example/notify",
                     "payload": "application/fhir+json" },
    });
    assert_eq!(
        post_as(&app, 1, "/fhir/Subscription", &body).await.status(),
        201
    );
    app.stop().await;
}

async fn institution_endpoints_are_checked_at_registration(backend: Backend) {
    let app = crate::helpers::TestApp::spawn_with(backend, default_policy).await;
    let mut inst = institution(1);
    inst["endpoint_url"] = json!("https://169.254.169.254/fhir");
    refusal(
        app.admin_post("/admin/institutions", &inst).await,
        "endpoint_url",
    )
    .await;
    inst["endpoint_url"] = json!("https://his-1.example/fhir");
    assert_eq!(
        app.admin_post("/admin/institutions", &inst).await.status(),
        201
    );
    inst["endpoint_url"] = json!("https://localhost/fhir");
    let resp = app
        .client
        .put(app.url("/admin/institutions/hosp-001"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&inst)
        .send()
        .await
        .unwrap();
    refusal(resp, "endpoint_url").await;
    app.stop().await;
}

/// Endpoints loaded into the directory without the HTTP API (here the simulator's loader)
/// are refused when the gateway would call them: the simulated hospitals are never asked.
async fn federation_endpoints_are_checked_when_called(backend: Backend) {
    let region = Region::start(backend, 2, default_policy).await;
    let person = region.person(0);
    let b = region
        .bundle(&format!("/fhir/Observation?patient={person}"))
        .await;
    assert_eq!(
        statuses(&b),
        vec![
            ("fz-004".to_string(), "not-queried".to_string()),
            ("fz-005".to_string(), "not-queried".to_string()),
        ]
    );
    assert!(b.to_string().contains("outbound-refused"), "{b}");
    assert_eq!(region.sim.hits("fz-004") + region.sim.hits("fz-005"), 0);
    region.stop().await;
}

/// The simulated hospital checks the gateway's SM2 request signature: missing, made by
/// another key, over another request, or stale is 401; the gateway's own requests pass.
async fn hospitals_refuse_unsigned_requests(backend: Backend) {
    let region = Region::start(backend, 1, |_| {}).await;
    let settings = region.app.state.settings.clone();
    let gateway_id = settings.federation.gateway_id.clone();
    let target = "/h/fz-004/fhir/Observation?patient.identifier=urn%3Aoid%3A1%7C1";
    let url = format!("{}{target}", region.sim.base_url);
    let send = |headers: Vec<(&'static str, String)>| {
        let mut req = region.app.client.get(&url);
        for (n, v) in headers {
            req = req.header(n, v);
        }
        req.send()
    };
    let unsigned = vec![
        ("x-request-id", "probe-1".to_string()),
        ("x-yiqiao-requester", gateway_id.clone()),
    ];
    assert_eq!(send(unsigned.clone()).await.unwrap().status(), 401);
    // Signed by someone else's key.
    let now = chrono::Utc::now().timestamp();
    let stranger = Sm2PrivateKey::generate().unwrap();
    let signed_by = |key: &Sm2PrivateKey, timestamp: i64, target: &str| {
        let sig = SignedRequest {
            method: "GET",
            target,
            timestamp,
            requester: &gateway_id,
            request_id: "probe-1",
            body: b"",
        }
        .sign(&key.signing_key(DEFAULT_SIGNER_ID).unwrap())
        .unwrap();
        let mut h = unsigned.clone();
        h.push(("x-yiqiao-timestamp", timestamp.to_string()));
        h.push(("x-yiqiao-signature", sig));
        h
    };
    let gateway = &test_gateway_key().1;
    assert_eq!(
        send(signed_by(&stranger, now, target))
            .await
            .unwrap()
            .status(),
        401
    );
    // The gateway's key over another request target.
    let other = "/h/fz-004/fhir/Observation?patient.identifier=urn%3Aoid%3A1%7C2";
    assert_eq!(
        send(signed_by(gateway, now, other)).await.unwrap().status(),
        401
    );
    // Stale.
    assert_eq!(
        send(signed_by(gateway, now - 3600, target))
            .await
            .unwrap()
            .status(),
        401
    );
    let resp = send(signed_by(gateway, now, target)).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The headers the gateway itself sends are accepted, and a federated query succeeds.
    let own = region
        .app
        .state
        .federation
        .identity_headers("GET", target, "probe-2", b"")
        .unwrap();
    assert_eq!(send(own).await.unwrap().status(), 200);
    let person = region.person(0);
    let b = region
        .bundle(&format!("/fhir/Observation?patient={person}"))
        .await;
    assert!(statuses(&b).is_empty(), "{b}");
    region.stop().await;
}

type Seen = Arc<Mutex<Vec<(String, String, BTreeMap<String, String>)>>>;

/// A custodian that records each request (method, target, headers) and serves nothing.
async fn recording_server() -> (String, Seen, actix_web::dev::ServerHandle) {
    let seen: Seen = Arc::default();
    let data = web::Data::new(seen.clone());
    let server = HttpServer::new(move || {
        App::new().app_data(data.clone()).default_service(web::to(
            |req: HttpRequest, seen: web::Data<Seen>| async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                let target = req.uri().path_and_query().unwrap().as_str().to_string();
                seen.lock()
                    .unwrap()
                    .push((req.method().to_string(), target, headers));
                HttpResponse::NotFound().finish()
            },
        ))
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (format!("http://127.0.0.1:{port}"), seen, handle)
}

/// The signature the gateway sends to a custodian verifies with tests/interop/
/// request_signature.py (gmssl), written from docs/hospital-contract.md alone; changing the
/// target breaks it.
async fn request_signatures_verify_independently(backend: Backend) {
    let app = setup(backend, |_| {}).await;
    let (base, seen, server) = recording_server().await;
    let mut d = doc(1, "SIGNED", "MR-1", DISCHARGE, "2024-01-01T08:00:00+08:00");
    d["content"][0]["attachment"]["url"] = json!(format!("{base}/docs/SIGNED?v=1&x=a%7Cb"));
    let id = register(&app, 1, &d).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let resp = get_as(&app, 2, &format!("/fhir/Binary/{id}")).await;
    assert_outcome(resp, 502, "upstream-unavailable").await;
    let (method, target, headers) = seen.lock().unwrap().first().cloned().expect("a request");
    assert_eq!(target, "/docs/SIGNED?v=1&x=a%7Cb");
    let dir = TempDir::new();
    let public = dir.path.join("gw.pub.pem");
    std::fs::write(
        &public,
        test_gateway_key().1.public_key().to_spki_pem().unwrap(),
    )
    .unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/interop/request_signature.py"
    );
    let verify = |target: String| {
        let mut cmd = wait::command("python3");
        cmd.args([
            script,
            "verify",
            "--gateway-pub",
            &public.display().to_string(),
        ])
        .args(["--method", &method, "--target", &target])
        .args(["--timestamp", &headers["x-yiqiao-timestamp"]])
        .args(["--requester", &headers["x-yiqiao-requester"]])
        .args(["--request-id", &headers["x-request-id"]])
        .args(["--signature", &headers["x-yiqiao-signature"]]);
        cmd
    };
    assert_eq!(
        headers["x-yiqiao-key-id"],
        app.state.settings.federation.key_id
    );
    let out = wait::output(&mut verify(target.clone()), "request_signature.py verify").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("yiqiao-request-v1\nGET\n/docs/SIGNED?v=1&x=a%7Cb\n")
    );
    let out = wait::output(
        &mut verify("/docs/SIGNED?v=2&x=a%7Cb".into()),
        "request_signature.py verify (altered)",
    )
    .await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("BadSignature"));
    server.stop(false).await;
    app.stop().await;
}

on_both_backends!(
    attachment_urls_are_checked_at_registration,
    allow_listed_networks_are_called,
    failed_retrievals_do_not_tell_open_from_closed,
    webhooks_are_checked_at_registration,
    institution_endpoints_are_checked_at_registration,
    federation_endpoints_are_checked_when_called,
    hospitals_refuse_unsigned_requests,
    request_signatures_verify_independently,
);
