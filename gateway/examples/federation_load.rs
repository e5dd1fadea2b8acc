//! Load generator for federated queries (scripts/bench-federation.sh).
//!
//! `federation_load BASE TOKEN ON_BEHALF_OF PERSONS_JSON CONCURRENCY REQUESTS`
//!
//! Sends REQUESTS federated `GET /fhir/{type}?patient=…` (types and persons in rotation) with
//! CONCURRENCY in flight, and prints one JSON line: client latency p50/p99, the gateway's time
//! over the slowest endpoint (client latency − `Server-Timing: upstream`) p50/p99, the
//! gateway's own stages from `Server-Timing` (resolve, release, audit, encode, the fan-out
//! beyond its slowest round trip, and the time outside the handler) p50/p99, throughput, and
//! errors (non-200 answers, or bundles whose outcome reports an institution that failed; the
//! first ten are printed to stderr with their reason).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

const TYPES: [&str; 5] = [
    "Observation",
    "Encounter",
    "Condition",
    "MedicationRequest",
    "DiagnosticReport",
];

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// The `dur` of every metric of a `Server-Timing` header, by name.
fn timings(header: Option<&str>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for part in header.unwrap_or("").split(',') {
        let mut fields = part.split(';').map(str::trim);
        let Some(name) = fields.next().filter(|n| !n.is_empty()) else {
            continue;
        };
        if let Some(dur) = fields.find_map(|kv| kv.strip_prefix("dur="))
            && let Ok(v) = dur.parse()
        {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// One answer: client latency (ms, until the whole body arrived), the gateway's stages,
/// merged entries, and why it counts as an error (`None`: a good answer).
struct Answer {
    ms: f64,
    bytes: usize,
    stages: BTreeMap<String, f64>,
    matches: usize,
    error: Option<String>,
}

// One thread: the client's own hand-offs between runtime threads (a body chunk read on one,
// awaited on another) would otherwise be counted as the gateway's time.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 7 {
        eprintln!(
            "usage: federation_load BASE TOKEN ON_BEHALF_OF PERSONS_JSON CONCURRENCY REQUESTS"
        );
        std::process::exit(2);
    }
    let base = args[1].clone();
    let token = args[2].clone();
    let on_behalf = args[3].clone();
    let persons: Vec<Option<String>> =
        serde_json::from_str(&std::fs::read_to_string(&args[4]).unwrap()).unwrap();
    let persons: Arc<Vec<String>> = Arc::new(persons.into_iter().flatten().collect());
    let concurrency: usize = args[5].parse().unwrap();
    let requests: usize = args[6].parse().unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let started = Instant::now();
    let results: Vec<Answer> = futures::stream::iter(0..requests)
        .map(|i| {
            let client = client.clone();
            let persons = persons.clone();
            let url = format!(
                "{base}/fhir/{}?patient={}",
                TYPES[i % TYPES.len()],
                persons[(i / TYPES.len()) % persons.len()]
            );
            let (token, on_behalf) = (token.clone(), on_behalf.clone());
            async move {
                let t = Instant::now();
                let failed = |error: String| Answer {
                    ms: t.elapsed().as_secs_f64() * 1000.0,
                    bytes: 0,
                    stages: BTreeMap::new(),
                    matches: 0,
                    error: Some(error),
                };
                let resp = match client
                    .get(&url)
                    .bearer_auth(&token)
                    .header("X-On-Behalf-Of", &on_behalf)
                    .send()
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return failed(format!("transport: {e}")),
                };
                let status = resp.status().as_u16();
                let stages = timings(
                    resp.headers()
                        .get("server-timing")
                        .and_then(|v| v.to_str().ok()),
                );
                let bytes = match resp.bytes().await {
                    Ok(b) => b,
                    Err(e) => return failed(format!("reading the body: {e}")),
                };
                // The client's latency ends when the whole answer has arrived.
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let entries = body["entry"].as_array().cloned().unwrap_or_default();
                let warnings: Vec<String> = entries
                    .iter()
                    .filter(|e| e["search"]["mode"] == "outcome")
                    .flat_map(|e| {
                        e["resource"]["issue"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .filter(|i| i["severity"] == "warning")
                    .map(|i| {
                        i["diagnostics"]
                            .as_str()
                            .or_else(|| i["details"]["text"].as_str())
                            .unwrap_or("?")
                            .to_string()
                    })
                    .collect();
                let matches = entries
                    .iter()
                    .filter(|e| e["search"]["mode"] == "match")
                    .count();
                let error = if status != 200 {
                    Some(format!(
                        "HTTP {status}: {}",
                        String::from_utf8_lossy(&bytes)
                            .chars()
                            .take(300)
                            .collect::<String>()
                    ))
                } else if !warnings.is_empty() {
                    Some(format!("institution(s) failed: {}", warnings.join(" | ")))
                } else if matches == 0 {
                    Some("no entries".to_string())
                } else {
                    None
                };
                Answer {
                    ms,
                    bytes: bytes.len(),
                    stages,
                    matches,
                    error,
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let errors: Vec<&str> = results.iter().filter_map(|r| r.error.as_deref()).collect();
    for e in errors.iter().take(10) {
        eprintln!("error: {e}");
    }
    let sorted = |values: Vec<f64>| {
        let mut v = values;
        v.sort_by(f64::total_cmp);
        v
    };
    let latency = sorted(results.iter().map(|r| r.ms).collect());
    let over = sorted(
        results
            .iter()
            .filter_map(|r| r.stages.get("upstream").map(|u| r.ms - u))
            .collect(),
    );
    // Time outside the handler: authentication, routing, middleware, transport.
    let outside = sorted(
        results
            .iter()
            .filter_map(|r| r.stages.get("handler").map(|h| r.ms - h))
            .collect(),
    );
    // The fan-out beyond its slowest round trip: opening the last envelope(s), scheduling.
    let fanout_extra = sorted(
        results
            .iter()
            .filter_map(|r| Some(r.stages.get("fanout")? - r.stages.get("upstream")?))
            .collect(),
    );
    let mut stages = serde_json::Map::new();
    for name in [
        "upstream",
        "resolve",
        "release-each",
        "release",
        "audit",
        "encode",
        "before",
        "handler",
        "app",
    ] {
        let v = sorted(
            results
                .iter()
                .filter_map(|r| r.stages.get(name).copied())
                .collect(),
        );
        stages.insert(
            name.to_string(),
            json!({ "p50": pct(&v, 0.5), "p99": pct(&v, 0.99) }),
        );
    }
    stages.insert(
        "fanout_over_upstream".into(),
        json!({ "p50": pct(&fanout_extra, 0.5), "p99": pct(&fanout_extra, 0.99) }),
    );
    stages.insert(
        "outside_handler".into(),
        json!({ "p50": pct(&outside, 0.5), "p99": pct(&outside, 0.99) }),
    );
    // Every answer's latency and stages, one JSON line each, for a look at the tail.
    if let Ok(path) = std::env::var("LOAD_DUMP") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        for r in &results {
            writeln!(f, "{}", json!({ "concurrency": concurrency, "ms": r.ms, "bytes": r.bytes, "matches": r.matches, "stages": r.stages })).unwrap();
        }
    }
    let entries: usize = results.iter().map(|r| r.matches).sum();
    println!(
        "{}",
        json!({
            "requests": requests,
            "concurrency": concurrency,
            "errors": errors.len(),
            "throughput_per_s": (requests as f64 / wall * 10.0).round() / 10.0,
            "latency_ms": { "p50": pct(&latency, 0.5), "p99": pct(&latency, 0.99) },
            "gateway_over_slowest_ms": { "p50": pct(&over, 0.5), "p99": pct(&over, 0.99) },
            "stages_ms": stages,
            "entries_per_answer": entries as f64 / requests.max(1) as f64,
        })
    );
}
