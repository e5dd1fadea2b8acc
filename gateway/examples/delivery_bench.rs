//! Notification delivery through the real outbox and delivery worker: rate and end-to-end
//! latency, each beside a baseline measured in the same run.
//!
//! cargo run --release -p yiqiao --example delivery_bench -- URL [BACKLOG] [SUBSCRIBERS] [RATE] [SECONDS]
//!
//! URL: an empty PostgreSQL database (postgres://…) or sqlite://PATH (a new file).
//! Defaults: BACKLOG 1000 documents, 10 subscribers, RATE 5 documents/s for 30 SECONDS.
//!
//! Two gateways in this process share the database: R (delivery worker off) and W (worker
//! on, default subscription settings; `[outbound]` allows http to 127.0.0.0/8). A webhook receiver (actix-web,
//! 2 workers, answers 200) records every notification: its subscription and event number
//! (from `Idempotency-Key`), the event's `timestamp` (the event row's `created_at`, written
//! in the registration's transaction just before it commits) and the arrival time.
//! SUBSCRIBERS subscriptions of one institution, no filters (each receives every event).
//!
//! 1. Delivery rate (backlog drain): BACKLOG documents are registered through R
//!    (`POST /fhir` transaction Bundles of 50) while no worker runs, so BACKLOG ×
//!    SUBSCRIBERS deliveries are pending; then W starts and its worker delivers them
//!    (claim with lease, load, audit record, POST, fenced completion; at most one event in
//!    flight per subscriber). Rate = notifications between the first and the last arrival.
//!    On PostgreSQL the bench runs `ANALYZE` after registering the backlog (what autovacuum
//!    would do; without statistics the claim query plans far worse). The drain gives up
//!    after 15 minutes and reports what arrived.
//! 2. Baseline: bare POSTs of a real notification body (captured in phase 1) with the same
//!    headers to the same receiver, SUBSCRIBERS concurrent streams, each sequential (the
//!    best per-subscriber ordering allows), BACKLOG POSTs per stream. Run before and after
//!    phase 3.
//! 3. End-to-end latency: single `POST /fhir/DocumentReference` to W, open loop at RATE
//!    documents/s for SECONDS; per notification, arrival − event timestamp (≈ commit → receipt;
//!    the same machine's wall clock on both sides), and arrival − when the client sent the
//!    registration request. Baseline: the round trip of one bare POST to the receiver
//!    (sequential, 1000 times). Component beside it: the durable audit record the worker
//!    awaits before each notification, timed through W's auditor (one at a time, and
//!    SUBSCRIBERS at once as in one worker round).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_gateway::state::AppState;
use yiqiao_registry::audit::EntityRef;

#[path = "support/mod.rs"]
mod support;

const ADMIN: &str = "bench-admin-token-0123456789";
const TOPIC: &str = "https://yiqiao.health/fhir/SubscriptionTopic/document";

/// One notification as the receiver saw it.
#[derive(Clone, Debug)]
struct Arrival {
    /// Idempotency-Key (`<subscription>-<event number>`), empty for baseline POSTs.
    key: String,
    /// DocumentReference id from the notification's focus.
    doc: String,
    /// The event's timestamp, µs since the epoch (0 when absent).
    event_us: i64,
    /// Arrival, µs since the epoch, and as an Instant.
    at_us: i64,
    at: Instant,
}

#[derive(Default)]
struct Received {
    arrivals: Vec<Arrival>,
    /// The first real notification: body and headers, replayed by the baseline.
    sample: Option<(String, Vec<(String, String)>)>,
}

type Shared = Arc<Mutex<Received>>;

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

fn parse_instant_us(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .unwrap_or(0)
}

async fn hook(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let (at, at_us) = (Instant::now(), now_us());
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let event = v["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|p| p.iter().find(|x| x["name"] == "notification-event"))
        .cloned()
        .unwrap_or(Value::Null);
    let part = |name: &str| {
        event["part"]
            .as_array()
            .and_then(|p| p.iter().find(|x| x["name"] == name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let doc = part("focus")["valueReference"]["reference"]
        .as_str()
        .and_then(|r| r.rsplit('/').next())
        .unwrap_or("")
        .to_string();
    let event_us = part("timestamp")["valueInstant"]
        .as_str()
        .map_or(0, parse_instant_us);
    let key = req
        .headers()
        .get("Idempotency-Key")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut r = shared.lock().unwrap();
    if r.sample.is_none() && !key.is_empty() && !key.starts_with("baseline") {
        let headers = req
            .headers()
            .iter()
            .filter(|(n, _)| n.as_str().starts_with("x-yiqiao") || *n == "content-type")
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        r.sample = Some((String::from_utf8_lossy(&body).into_owned(), headers));
    }
    r.arrivals.push(Arrival {
        key,
        doc,
        event_us,
        at_us,
        at,
    });
    HttpResponse::Ok().finish()
}

async fn receiver() -> (String, Shared) {
    let shared: Shared = Arc::default();
    let data = web::Data::new(shared.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(1 << 20))
            .default_service(web::to(hook))
    })
    .workers(2)
    .bind("127.0.0.1:0")
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    (format!("http://127.0.0.1:{port}/hook"), shared)
}

/// One durable audit record of the shape the delivery worker writes before each
/// notification; milliseconds until it is committed.
async fn audit_once(state: &AppState, k: usize) -> f64 {
    let t = Instant::now();
    let mut e = state.auditor.rest_event("notification", "E");
    e.agent_institution = Some("hosp-001".into());
    e.patient_id = Some("bench".into());
    e.entities
        .push(EntityRef::resource(format!("Subscription/bench-{k}")));
    state.auditor.record(e).await.unwrap();
    t.elapsed().as_secs_f64() * 1000.0
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn document(i: usize, hash: &str) -> Value {
    json!({ "resourceType": "DocumentReference",
        "masterIdentifier": { "system": "urn:oid:1.2.156.1", "value": format!("D-{i}") },
        "status": "current", "type": { "coding": [{ "system": "http://loinc.org", "code": "11502-2" }] },
        "subject": { "identifier": { "system": "urn:bench:1", "value": "MR-1" } },
        "date": "2024-01-01T08:00:00+08:00", "custodian": { "reference": "Organization/hosp-001" },
        "content": [{ "attachment": { "contentType": "application/xml", "url": format!("https://his.example/{i}"),
            "size": 5, "extension": [{ "url": "https://yiqiao.health/fhir/StructureDefinition/attachment-sm3", "valueString": hash }] } }] })
}

/// One bare POST of the captured notification (body and headers) to the receiver.
async fn bare_post(
    client: &reqwest::Client,
    hook: &str,
    sample: &(String, Vec<(String, String)>),
    key: String,
) {
    let mut r = client
        .post(hook)
        .header("Idempotency-Key", key)
        .body(sample.0.clone());
    for (n, v) in &sample.1 {
        r = r.header(n, v);
    }
    assert!(r.send().await.unwrap().status().is_success());
}

/// SUBSCRIBERS concurrent sequential streams of `per_stream` bare POSTs; POSTs per second.
async fn baseline_rate(
    client: &reqwest::Client,
    hook: &str,
    sample: &(String, Vec<(String, String)>),
    subs: usize,
    per_stream: usize,
) -> f64 {
    let t0 = Instant::now();
    let streams = (0..subs).map(|s| {
        let (client, hook, sample) = (client.clone(), hook.to_string(), sample.clone());
        tokio::spawn(async move {
            for i in 0..per_stream {
                bare_post(&client, &hook, &sample, format!("baseline-{s}-{i}")).await;
            }
        })
    });
    for s in futures::future::join_all(streams).await {
        s.unwrap();
    }
    (subs * per_stream) as f64 / t0.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .expect("usage: delivery_bench URL [BACKLOG] [SUBSCRIBERS] [RATE] [SECONDS]")
        .clone();
    let backlog: usize = args.get(2).map_or(1000, |s| s.parse().unwrap());
    let subs: usize = args.get(3).map_or(10, |s| s.parse().unwrap());
    let rate: f64 = args.get(4).map_or(5.0, |s| s.parse().unwrap());
    let seconds: f64 = args.get(5).map_or(30.0, |s| s.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("delivery-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = Settings::default();
    s.listen = "127.0.0.1:0".parse().unwrap();
    s.data_dir = dir.clone();
    s.admin_token = Secret::new(ADMIN);
    s.database.url = Secret::new(url.clone());
    s.database.pool_size = 8;
    s.http.workers = 2;
    s.outbound.allow_http = true;
    s.outbound.allow_cidrs = vec!["127.0.0.0/8".into()];
    let mut reg_settings = s.clone();
    reg_settings.subscriptions.worker = false;
    let (reg, _) = support::start(reg_settings).await;
    let client = reqwest::Client::new();
    let body = "91350100M00000001";
    let check = yiqiao_registry::directory::uscc_check_character(body).unwrap();
    let inst = json!({ "id": "hosp-001", "name": "基准医院", "uscc": format!("{body}{check}"),
        "region_code": "350100", "level": "3A", "kind": "hospital",
        "patient_id_system": "urn:bench:1",
        "allowed_scopes": ["system/Patient.cruds", "system/DocumentReference.cruds", "system/Subscription.cruds"] });
    let r = client
        .post(format!("{reg}/admin/institutions"))
        .bearer_auth(ADMIN)
        .json(&inst)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let as_hosp =
        |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN).header("X-On-Behalf-Of", "hosp-001");
    let patient = json!({ "resourceType": "Patient", "identifier": [{ "system": "urn:bench:1", "value": "MR-1" }],
        "name": [{ "text": "张伟" }], "gender": "male", "birthDate": "1980-03-15" });
    let r = as_hosp(client.post(format!("{reg}/fhir/Patient")))
        .json(&patient)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let (hook, shared) = receiver().await;
    for _ in 0..subs {
        let sub = json!({ "resourceType": "Subscription", "status": "requested",
            "reason": "delivery bench", "criteria": TOPIC,
            "channel": { "type": "rest-hook", "endpoint": hook, "payload": "application/fhir+json" } });
        let r = as_hosp(client.post(format!("{reg}/fhir/Subscription")))
            .json(&sub)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let hash = yiqiao_sm::sm3_hex(b"bench");

    // Phase 1: backlog registered with no worker running, then drained by W's worker.
    let load_start = load_average();
    let t0 = Instant::now();
    for chunk in 0..backlog.div_ceil(50) {
        let entries: Vec<Value> = (chunk * 50..((chunk + 1) * 50).min(backlog))
            .map(|i| json!({ "request": { "method": "POST", "url": "DocumentReference" }, "resource": document(i, &hash) }))
            .collect();
        let r = as_hosp(client.post(format!("{reg}/fhir")))
            .json(&json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    assert!(shared.lock().unwrap().arrivals.is_empty());
    if url.starts_with("postgres") {
        // Planner statistics for the backlog, as autovacuum's autoanalyze would gather them
        // (this development server runs with autovacuum off).
        use diesel::{Connection, RunQueryDsl};
        let mut pg = diesel::PgConnection::establish(&url).unwrap();
        diesel::sql_query("ANALYZE").execute(&mut pg).unwrap();
    }
    let want = backlog * subs;
    let (worker, worker_state) = support::start(s.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut last_report = Instant::now();
    loop {
        let n = shared.lock().unwrap().arrivals.len();
        if n >= want || Instant::now() > deadline {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!("  drain: {n} of {want} notifications");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained: Vec<Arrival> = std::mem::take(&mut shared.lock().unwrap().arrivals);
    let first = drained.iter().map(|a| a.at).min().unwrap();
    let last = drained.iter().map(|a| a.at).max().unwrap();
    let drain_secs = (last - first).as_secs_f64();
    let drain_rate = (drained.len() - 1) as f64 / drain_secs;
    let distinct = drained
        .iter()
        .map(|a| &a.key)
        .collect::<BTreeSet<_>>()
        .len();
    let load_drain = load_average();

    // Phase 2: baseline rate with a real notification body.
    let sample = shared.lock().unwrap().sample.clone().unwrap();
    let bare_before = baseline_rate(&client, &hook, &sample, subs, backlog).await;
    let bare_received = std::mem::take(&mut shared.lock().unwrap().arrivals).len();
    assert_eq!(bare_received, subs * backlog, "baseline POSTs received");

    // Phase 3: end-to-end latency at a steady registration rate through W.
    let load_paced = load_average();
    let n_paced = (rate * seconds).round() as usize;
    let sent: Arc<Mutex<HashMap<String, (i64, i64)>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n_paced);
    for k in 0..n_paced {
        tick.tick().await;
        let (client, worker, sent, body) = (
            client.clone(),
            worker.clone(),
            sent.clone(),
            document(backlog + k, &hash),
        );
        tasks.push(tokio::spawn(async move {
            let start = now_us();
            let r = client
                .post(format!("{worker}/fhir/DocumentReference"))
                .bearer_auth(ADMIN)
                .header("X-On-Behalf-Of", "hosp-001")
                .json(&body)
                .send()
                .await
                .unwrap();
            let done = now_us();
            assert_eq!(r.status(), 201);
            let v: Value = r.json().await.unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            sent.lock().unwrap().insert(id, (start, done));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want_paced = n_paced * subs;
    let deadline = Instant::now() + Duration::from_secs(300);
    while shared.lock().unwrap().arrivals.len() < want_paced && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let paced: Vec<Arrival> = std::mem::take(&mut shared.lock().unwrap().arrivals);
    let sent = sent.lock().unwrap().clone();
    let mut from_event: Vec<f64> = paced
        .iter()
        .map(|a| (a.at_us - a.event_us) as f64 / 1000.0)
        .collect();
    let mut from_request: Vec<f64> = paced
        .iter()
        .filter_map(|a| sent.get(&a.doc).map(|s| (a.at_us - s.0) as f64 / 1000.0))
        .collect();
    let mut from_response: Vec<f64> = paced
        .iter()
        .filter_map(|a| sent.get(&a.doc).map(|s| (a.at_us - s.1) as f64 / 1000.0))
        .collect();
    let mut register_rtt: Vec<f64> = sent
        .values()
        .map(|(a, b)| (b - a) as f64 / 1000.0)
        .collect();
    let before_response = from_response.iter().filter(|x| **x < 0.0).count();
    for v in [
        &mut from_event,
        &mut from_request,
        &mut from_response,
        &mut register_rtt,
    ] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    // Baseline latency: one bare POST round trip to the receiver, sequential.
    let mut bare_rtt = Vec::with_capacity(1000);
    for i in 0..1000 {
        let start = Instant::now();
        bare_post(&client, &hook, &sample, format!("baseline-rtt-{i}")).await;
        bare_rtt.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    bare_rtt.sort_by(|a, b| a.partial_cmp(b).unwrap());
    // Component: the durable audit record the worker awaits before each notification, alone
    // (sequential), and SUBSCRIBERS at once (one worker round).
    let mut audit_one: Vec<f64> = Vec::with_capacity(300);
    for k in 0..300 {
        audit_one.push(audit_once(&worker_state, k).await);
    }
    let mut audit_round: Vec<f64> = Vec::with_capacity(100);
    for _ in 0..100 {
        let t = Instant::now();
        futures::future::join_all((0..subs).map(|k| audit_once(&worker_state, k))).await;
        audit_round.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    for v in [&mut audit_one, &mut audit_round] {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    }
    let bare_after = baseline_rate(&client, &hook, &sample, subs, backlog).await;
    let bare_received = shared.lock().unwrap().arrivals.len();
    assert_eq!(
        bare_received,
        1000 + subs * backlog,
        "baseline POSTs received"
    );
    let load_end = load_average();

    let backend = if url.starts_with("postgres") {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!(
        "backend: {backend}; {subs} subscribers (no filters, one institution); load average: start {load_start}, after drain {load_drain}, before paced {load_paced}, end {load_end}"
    );
    println!(
        "phase 1: {backlog} documents registered in Bundles of 50 in {reg_secs:.1} s ({:.0} documents/s, worker off); {} notifications received of {want} ({distinct} distinct), drained in {drain_secs:.1} s",
        backlog as f64 / reg_secs,
        drained.len()
    );
    println!(
        "phase 3: {n_paced} documents at {rate} /s for {seconds} s; {} notifications received of {want_paced}; {before_response} arrived before the registration's HTTP response",
        paced.len()
    );
    println!();
    println!("| measure | figure | vs baseline |");
    println!("|---|---|---|");
    println!(
        "| bare POST of a notification body, {subs} sequential streams (baseline, before) | {bare_before:.0} /s | 1 |"
    );
    println!(
        "| notifications delivered (backlog drain: claim, load, audit, POST, complete) | {drain_rate:.0} /s | {:.3} |",
        drain_rate / bare_before
    );
    println!(
        "| bare POST, {subs} streams (baseline, after) | {bare_after:.0} /s | {:.3} |",
        bare_after / bare_before
    );
    let row = |name: &str, v: &[f64], base: &[f64]| {
        println!(
            "| {name} | p50 {:.1} ms / p99 {:.1} ms | p50 × {:.0} / p99 × {:.0} |",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 0.5) / pct(base, 0.5),
            pct(v, 0.99) / pct(base, 0.99)
        );
    };
    println!(
        "| bare POST round trip to the receiver (baseline) | p50 {:.2} ms / p99 {:.2} ms | 1 |",
        pct(&bare_rtt, 0.5),
        pct(&bare_rtt, 0.99)
    );
    row(
        "end to end: event written (commit) → notification received",
        &from_event,
        &bare_rtt,
    );
    row(
        "end to end: registration request sent → notification received",
        &from_request,
        &bare_rtt,
    );
    row(
        "registration request → response (POST /fhir/DocumentReference)",
        &register_rtt,
        &bare_rtt,
    );
    println!(
        "| registration response → notification received | p50 {:.1} ms / p99 {:.1} ms | — |",
        pct(&from_response, 0.5),
        pct(&from_response, 0.99)
    );
    println!(
        "| component: one durable audit record (sequential) | p50 {:.1} ms / p99 {:.1} ms | — |",
        pct(&audit_one, 0.5),
        pct(&audit_one, 0.99)
    );
    println!(
        "| component: {subs} audit records at once (one worker round) | p50 {:.1} ms / p99 {:.1} ms | — |",
        pct(&audit_round, 0.5),
        pct(&audit_round, 0.99)
    );
    let _ = std::fs::remove_dir_all(dir);
    std::process::exit(0);
}
