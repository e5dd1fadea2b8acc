//! Sustained audit throughput through the group-commit writer, and verify speed.
//!
//! cargo run --release -p yiqiao --example audit_bench -- URL [SECONDS] [CONCURRENCY]
//! URL: postgres://… (a scratch database: its audit tables are appended to) or sqlite://PATH.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use yiqiao_gateway::audit::Auditor;
use yiqiao_gateway::config::{Secret, Settings};
use yiqiao_registry::Store;
use yiqiao_registry::audit::{AuditSigner, verify_db};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .expect("usage: audit_bench URL [SECONDS] [CONCURRENCY]")
        .clone();
    let secs: u64 = args.get(2).map_or(10, |s| s.parse().unwrap());
    let concurrency: usize = args.get(3).map_or(2000, |s| s.parse().unwrap());
    let mut settings = Settings::default();
    settings.database.url = Secret::new(url.clone());
    settings.database.pool_size = 4;
    settings.audit.replica_id = "bench".into();
    let store = Store::open(&settings.store_options()).unwrap();
    store.migrate().unwrap();
    let key = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
    let signer = Arc::new(AuditSigner::new(&key).unwrap());
    let auditor = Auditor::start(store.clone(), signer.clone(), &settings);
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (auditor, done) = (auditor.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let mut e = auditor.read_event(format!("Organization/hosp-{t:04}-{i}"));
                e.agent_institution = Some(format!("hosp-{:03}", t % 50));
                e.patient_id = Some(format!("EMPI-{t:06}"));
                auditor.record(e).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{}: {n} durable audit events in {elapsed:.2}s = {:.0} events/s (concurrency {concurrency})",
        store.backend().name(),
        n as f64 / elapsed
    );
    let public = signer.public_key().clone();
    let verifying = store.clone();
    let t0 = Instant::now();
    let report = tokio::task::spawn_blocking(move || {
        let mut conn = verifying.conn().unwrap();
        verify_db(&mut conn, None, None, &public).unwrap()
    })
    .await
    .unwrap();
    let vt = t0.elapsed().as_secs_f64();
    println!(
        "verify: {} records, {} checkpoints in {vt:.2}s = {:.0} records/s; problems: {}",
        report.records,
        report.checkpoints,
        report.records as f64 / vt,
        report.problems.len()
    );
}
