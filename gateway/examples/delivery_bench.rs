//! Notification delivery rate and end-to-end latency through the transactional outbox: an
//! in-process gateway registers documents (transaction Bundles over HTTP) while S
//! subscriptions without filters receive every event at a local webhook receiver. Latency is
//! from the registration response to the notification's arrival. Baseline in the same run: the
//! same number of bare POSTs of the same body to the same receiver, one sequential stream per
//! subscriber (what per-subscriber ordering allows at best).
//!
//! cargo run --release -p yiqiao --example delivery_bench -- URL [DOCUMENTS] [SUBSCRIBERS]
//! URL: an empty PostgreSQL database (postgres://…) or sqlite://PATH.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use yiqiao_gateway::Application;
use yiqiao_gateway::config::{Secret, Settings};

const ADMIN: &str = "bench-admin-token-0123456789";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

type Arrivals = Arc<Mutex<Vec<(String, Instant)>>>;

async fn receiver() -> (String, Arrivals) {
    let arrivals: Arrivals = Arc::default();
    let a2 = arrivals.clone();
    let server = HttpServer::new(move || {
        let arrivals = a2.clone();
        App::new().default_service(web::to(move |body: web::Bytes| {
            let arrivals = arrivals.clone();
            async move {
                let now = Instant::now();
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let focus = v["entry"][0]["resource"]["parameter"]
                    .as_array()
                    .and_then(|p| p.iter().find(|x| x["name"] == "notification-event"))
                    .and_then(|e| e["part"][2]["valueReference"]["reference"].as_str())
                    .and_then(|r| r.rsplit('/').next())
                    .unwrap_or("")
                    .to_string();
                arrivals.lock().unwrap().push((focus, now));
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    (format!("http://127.0.0.1:{port}/hook"), arrivals)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .expect("usage: delivery_bench URL [DOCUMENTS] [SUBSCRIBERS]")
        .clone();
    let docs: usize = args.get(2).map_or(1000, |s| s.parse().unwrap());
    let subs: usize = args.get(3).map_or(10, |s| s.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("delivery-bench-{}", std::process::id()));
    let mut s = Settings::default();
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.data_dir = dir.clone();
    s.admin_token = Secret::new(ADMIN);
    s.database.url = Secret::new(url);
    s.database.pool_size = 8;
    s.log.level = "warn".into();
    s.subscriptions.allow_http = true;
    s.subscriptions.poll_interval_ms = 50;
    s.subscriptions.claim_batch = 64;
    let listener = TcpListener::bind(s.listen).unwrap();
    let app = Application::build_with_listener(s, listener).await.unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.into_server());
    let client = reqwest::Client::new();
    let body = "91350100M00000001";
    let check = yiqiao_registry::directory::uscc_check_character(body).unwrap();
    let inst = json!({ "id": "hosp-001", "name": "基准医院", "uscc": format!("{body}{check}"),
        "region_code": "350100", "level": "3A", "kind": "hospital",
        "patient_id_system": "urn:bench:1",
        "allowed_scopes": ["system/Patient.cruds", "system/DocumentReference.cruds", "system/Subscription.cruds"] });
    let r = client
        .post(format!("{base}/admin/institutions"))
        .bearer_auth(ADMIN)
        .json(&inst)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let as_hosp =
        |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN).header("X-On-Behalf-Of", "hosp-001");
    let patient = json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:bench:1", "value": "MR-1" }],
        "name": [{ "text": "张伟" }], "gender": "male", "birthDate": "1980-03-15" });
    let r = as_hosp(client.post(format!("{base}/fhir/Patient")))
        .json(&patient)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let (hook, arrivals) = receiver().await;

    // Baseline: bare POSTs of a notification-sized body, one sequential stream per subscriber.
    let sample = json!({ "resourceType": "Bundle", "type": "history", "entry": [{ "resource": {
        "resourceType": "Parameters", "parameter": [{ "name": "notification-event", "part": [
            { "name": "event-number", "valueString": "1" }, { "name": "timestamp", "valueInstant": "2024-01-01T00:00:00Z" },
            { "name": "focus", "valueReference": { "reference": format!("{base}/fhir/DocumentReference/x") } }] }] } }] })
    .to_string();
    let t0 = Instant::now();
    let streams = (0..subs).map(|_| {
        let (client, hook, sample) = (client.clone(), hook.clone(), sample.clone());
        tokio::spawn(async move {
            for _ in 0..docs {
                client
                    .post(&hook)
                    .header("Idempotency-Key", "x")
                    .body(sample.clone())
                    .send()
                    .await
                    .unwrap();
            }
        })
    });
    futures::future::join_all(streams).await;
    let bare_rate = (docs * subs) as f64 / t0.elapsed().as_secs_f64();
    arrivals.lock().unwrap().clear();

    for _ in 0..subs {
        let sub = json!({ "resourceType": "Subscription",
            "criteria": "https://yiqiao.health/fhir/SubscriptionTopic/document",
            "channel": { "type": "rest-hook", "endpoint": hook } });
        let r = as_hosp(client.post(format!("{base}/fhir/Subscription")))
            .json(&sub)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let hash = yiqiao_sm::sm3_hex(b"bench");
    let mut registered: HashMap<String, Instant> = HashMap::new();
    let t0 = Instant::now();
    for chunk in 0..docs.div_ceil(50) {
        let entries: Vec<Value> = (chunk * 50..((chunk + 1) * 50).min(docs))
            .map(|i| json!({ "request": { "method": "POST", "url": "DocumentReference" }, "resource": {
                "resourceType": "DocumentReference", "masterIdentifier": { "value": format!("D-{i}") },
                "status": "current", "type": { "coding": [{ "system": "http://loinc.org", "code": "11502-2" }] },
                "subject": { "identifier": { "system": "urn:bench:1", "value": "MR-1" } },
                "date": "2024-01-01T08:00:00+08:00", "custodian": { "reference": "Organization/hosp-001" },
                "content": [{ "attachment": { "contentType": "application/xml", "url": format!("https://his.example/{i}"),
                    "size": 5, "extension": [{ "url": "https://yiqiao.health/fhir/StructureDefinition/attachment-sm3", "valueString": hash }] } }] } }))
            .collect();
        let r = as_hosp(client.post(format!("{base}/fhir")))
            .json(&json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }))
            .send()
            .await
            .unwrap();
        let done = Instant::now();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        for e in v["entry"].as_array().unwrap() {
            registered.insert(e["resource"]["id"].as_str().unwrap().to_string(), done);
        }
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    let want = docs * subs;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while arrivals.lock().unwrap().len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let arrived = arrivals.lock().unwrap().clone();
    let last = arrived.iter().map(|a| a.1).max().unwrap();
    let rate = arrived.len() as f64 / (last - t0).as_secs_f64();
    let mut lat: Vec<Duration> = arrived
        .iter()
        .filter_map(|(id, at)| registered.get(id).map(|r| at.saturating_duration_since(*r)))
        .collect();
    lat.sort();
    println!(
        "documents: {docs} (Bundles of 50, registered in {reg_secs:.1} s), subscribers: {subs}, notifications received: {} of {want}",
        arrived.len()
    );
    println!("| measure | figure | vs baseline |");
    println!("|---|---|---|");
    println!(
        "| bare POST to the receiver, {subs} sequential streams (baseline) | {bare_rate:.0} /s | 1 |"
    );
    println!(
        "| notifications delivered (outbox → webhook, audited) | {rate:.0} /s | {:.3} |",
        rate / bare_rate
    );
    println!(
        "| end-to-end latency (registration response → arrival) | p50 {:.0} ms / p99 {:.0} ms | — |",
        percentile(&lat, 0.5).as_secs_f64() * 1000.0,
        percentile(&lat, 0.99).as_secs_f64() * 1000.0
    );
    let _ = std::fs::remove_dir_all(dir);
}
