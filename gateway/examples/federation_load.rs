//! Load generator for federated queries (scripts/bench-federation.sh).
//!
//! `federation_load BASE TOKEN ON_BEHALF_OF PERSONS_JSON CONCURRENCY REQUESTS`
//!
//! Sends REQUESTS federated `GET /fhir/{type}?patient=…` (types and persons in rotation) with
//! CONCURRENCY in flight, and prints one JSON line: client latency p50/p99, the gateway's time
//! over the slowest endpoint (client latency − `Server-Timing: upstream`) p50/p99, throughput,
//! and errors (non-200 answers, or bundles whose outcome reports an institution that failed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

fn upstream_ms(header: Option<&str>) -> Option<f64> {
    let h = header?;
    let part = h.split(',').find(|p| p.trim().starts_with("upstream"))?;
    let dur = part
        .split(';')
        .find_map(|kv| kv.trim().strip_prefix("dur="))?;
    dur.parse().ok()
}

#[tokio::main]
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
    let results: Vec<(bool, f64, Option<f64>, usize)> = futures::stream::iter(0..requests)
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
                let resp = client
                    .get(&url)
                    .bearer_auth(&token)
                    .header("X-On-Behalf-Of", &on_behalf)
                    .send()
                    .await;
                let Ok(resp) = resp else {
                    return (false, t.elapsed().as_secs_f64() * 1000.0, None, 0);
                };
                let ok_status = resp.status().as_u16() == 200;
                let upstream = upstream_ms(
                    resp.headers()
                        .get("server-timing")
                        .and_then(|v| v.to_str().ok()),
                );
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let entries = body["entry"].as_array().cloned().unwrap_or_default();
                let failed = entries
                    .iter()
                    .filter(|e| e["search"]["mode"] == "outcome")
                    .flat_map(|e| {
                        e["resource"]["issue"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                    })
                    .filter(|i| i["severity"] == "warning")
                    .count();
                let matches = entries
                    .iter()
                    .filter(|e| e["search"]["mode"] == "match")
                    .count();
                (
                    ok_status && failed == 0 && matches > 0,
                    ms,
                    upstream,
                    matches,
                )
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let errors = results.iter().filter(|r| !r.0).count();
    let mut latency: Vec<f64> = results.iter().map(|r| r.1).collect();
    let mut over: Vec<f64> = results
        .iter()
        .filter_map(|r| r.2.map(|u| r.1 - u))
        .collect();
    let mut upstream: Vec<f64> = results.iter().filter_map(|r| r.2).collect();
    latency.sort_by(f64::total_cmp);
    over.sort_by(f64::total_cmp);
    upstream.sort_by(f64::total_cmp);
    let entries: usize = results.iter().map(|r| r.3).sum();
    println!(
        "{}",
        json!({
            "requests": requests,
            "concurrency": concurrency,
            "errors": errors,
            "throughput_per_s": (requests as f64 / wall * 10.0).round() / 10.0,
            "latency_ms": { "p50": pct(&latency, 0.5), "p99": pct(&latency, 0.99) },
            "slowest_upstream_ms": { "p50": pct(&upstream, 0.5), "p99": pct(&upstream, 0.99) },
            "gateway_over_slowest_ms": { "p50": pct(&over, 0.5), "p99": pct(&over, 0.99) },
            "entries_per_answer": entries as f64 / requests.max(1) as f64,
        })
    );
}
