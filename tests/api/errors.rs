//! Bad input at the HTTP edge: each gets a clear OperationOutcome and stores nothing.

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp, assert_outcome, institution};
use crate::on_both_backends;

on_both_backends!(
    bad_bodies_are_rejected_and_store_nothing,
    pool_exhaustion_answers_503_with_retry_after
);

async fn bad_bodies_are_rejected_and_store_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let post = |body: reqwest::Body, ct: Option<&str>| {
        let mut req = app
            .client
            .post(app.url("/admin/institutions"))
            .bearer_auth(ADMIN_TOKEN)
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        req.send()
    };

    // Not JSON at all.
    let out = assert_outcome(
        post("{\"id\": ".into(), Some("application/json"))
            .await
            .unwrap(),
        400,
        "malformed-json",
    )
    .await;
    assert!(
        out["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // Empty body.
    assert_outcome(
        post("".into(), Some("application/json")).await.unwrap(),
        400,
        "malformed-json",
    )
    .await;
    // Unknown field, named with its path.
    let mut unknown = institution(1);
    unknown["colour"] = json!("blue");
    let out = assert_outcome(
        post(unknown.to_string().into(), Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid-body",
    )
    .await;
    assert!(
        out["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{out}"
    );
    // Unknown nested field.
    let mut nested = institution(1);
    nested["sm2_keys"] = json!([{"kid": "a", "pem": "x", "usage": "sig"}]);
    let out = assert_outcome(
        post(nested.to_string().into(), Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid-body",
    )
    .await;
    assert_eq!(
        out["issue"][0]["expression"][0], "sm2_keys[0].usage",
        "{out}"
    );
    // Wrong type, named.
    let mut wrong_type = institution(1);
    wrong_type["require_sm_envelope"] = json!("yes");
    let out = assert_outcome(
        post(wrong_type.to_string().into(), Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid-body",
    )
    .await;
    assert_eq!(out["issue"][0]["expression"][0], "require_sm_envelope");
    // Missing required field.
    let mut missing = institution(1);
    missing.as_object_mut().unwrap().remove("uscc");
    let out = assert_outcome(
        post(missing.to_string().into(), Some("application/json"))
            .await
            .unwrap(),
        400,
        "invalid-body",
    )
    .await;
    assert!(
        out["issue"][0]["details"]["text"]
            .as_str()
            .unwrap()
            .contains("uscc"),
        "{out}"
    );
    // Wrong content types.
    assert_outcome(
        post(institution(1).to_string().into(), Some("text/plain"))
            .await
            .unwrap(),
        415,
        "unsupported-media-type",
    )
    .await;
    assert_outcome(
        post(institution(1).to_string().into(), None).await.unwrap(),
        415,
        "unsupported-media-type",
    )
    .await;
    // application/fhir+json is accepted like application/json.
    let ok = post(
        institution(9).to_string().into(),
        Some("application/fhir+json; charset=utf-8"),
    )
    .await
    .unwrap();
    assert_eq!(ok.status(), 201);
    // Oversized, with a Content-Length …
    let mut big = institution(2);
    big["name"] = json!("医".repeat(40_000));
    assert_outcome(
        post(big.to_string().into(), Some("application/json"))
            .await
            .unwrap(),
        413,
        "payload-too-large",
    )
    .await;
    // … and streamed without one.
    let chunks: Vec<Result<String, std::io::Error>> =
        (0..100).map(|_| Ok("x".repeat(1024))).collect();
    let stream = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    assert_outcome(
        post(stream, Some("application/json")).await.unwrap(),
        413,
        "payload-too-large",
    )
    .await;

    assert_eq!(
        app.institution_count().await,
        1,
        "only the one valid registration is stored"
    );

    // Unknown routes and methods answer OperationOutcome too.
    assert_outcome(app.get("/fhir/Nothing").await, 404, "unknown-route").await;
    assert_outcome(app.get("/no/such/path").await, 404, "unknown-route").await;
    let del = app
        .client
        .delete(app.url("/fhir/Organization/hosp-009"))
        .send()
        .await
        .unwrap();
    assert_outcome(del, 405, "method-not-allowed").await;
    let patch = app.client.patch(app.url("/healthz")).send().await.unwrap();
    assert_outcome(patch, 405, "method-not-allowed").await;
    app.stop().await;
}

async fn pool_exhaustion_answers_503_with_retry_after(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.database.pool_size = 1;
        s.database.acquire_timeout_ms = 300;
    })
    .await;
    assert_eq!(app.get("/fhir/Organization").await.status(), 200);
    // Hold the only connection, as a long transaction would.
    let store = app.state.store.clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = store.conn().unwrap();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop(conn);
    });
    tokio::task::spawn_blocking(move || held_rx.recv_timeout(std::time::Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("the holder thread did not check out the only pooled connection within 10 s");
    let started = std::time::Instant::now();
    let resp = app.get("/fhir/Organization").await;
    let waited = started.elapsed();
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_outcome(resp, 503, "pool-exhausted").await;
    assert!(
        waited < std::time::Duration::from_secs(3),
        "waited {waited:?}: must not hang"
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    assert_eq!(app.get("/fhir/Organization").await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("yiqiao_db_pool_connections{state=\"max\"} 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_accepted_or_generated() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let resp = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "abc-123.x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "abc-123.x");
    let resp = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(generated, "bad id with spaces");
    assert_eq!(generated.len(), 36, "a UUID");
    let resp = app
        .client
        .get(app.url("/fhir/Organization/x"))
        .header("X-Request-Id", "trace-me-7")
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["issue"][0]["diagnostics"], "request id trace-me-7");
    app.stop().await;
}
