//! Load figures of the document registry: registration throughput through `register_batch`
//! (the code path of `POST /fhir` transaction Bundles: validation lookups, idempotency check,
//! rows, events and delivery rows in one transaction) and search latency (p50/p99) on the
//! loaded table; each beside a baseline measured in the same run on the same database:
//! bare multi-row INSERTs of the same number of rows in the same batch size into a
//! two-column table (with one writer, and with `writers` parallel connections), and a
//! primary-key read of one document (`documents::get` of a random registered id).
//!
//! `cargo run --release -p yiqiao-registry --example documents_bench -- [documents] [database-url] [batch] [writers] [probe]`
//! (defaults: 100000 documents, a fresh SQLite file in the temp directory, 100 per
//! transaction, 1 writer, probe = documents / 10).
//!
//! Registration phases, all through `register_batch` (one transaction per batch):
//! 1. `probe` documents by one writer on the (nearly) empty table;
//! 2. the bulk (`documents − 2·probe − sample`) by `writers` parallel connections (several
//!    institutions registering at once), each taking every `writers`-th batch;
//! 3. `probe` documents by one writer with the bulk in the table;
//! 4. a sample of 20 batches by one writer with per-statement timing (diesel
//!    instrumentation: wall time of each statement as the client sees it, round trip
//!    included; not part of the throughput figures).
//!
//! Then searches (1000 of each kind, 21 rows per page as the API asks) and, on PostgreSQL,
//! `EXPLAIN (ANALYZE, BUFFERS)` of each search's id query.
//! The PostgreSQL database must be empty (the bench migrates it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::connection::{Connection, Instrumentation, InstrumentationEvent, SimpleConnection};
use diesel::prelude::*;
use diesel::sql_types::Text;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use yiqiao_registry::documents::outbox::{self, NewSubscription};
use yiqiao_registry::documents::{DocumentFilter, NewDocument, register_batch, search};
use yiqiao_registry::store::{Audited, now_utc};
use yiqiao_registry::{Store, StoreOptions};

#[path = "../tests/support/documents.rs"]
mod support;

const PATIENTS: usize = 20_000;
const HOSPITALS: usize = 20;
const TYPES: [&str; 5] = [
    "http://loinc.org|18842-5",
    "http://loinc.org|11502-2",
    "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0007",
    "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0006",
    "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0053",
];
const CATEGORIES: [&str; 5] = ["summary", "laboratory", "laboratory", "imaging", "summary"];
/// Batches of the instrumented sample.
const SAMPLE_BATCHES: usize = 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn base_date() -> chrono::NaiveDateTime {
    chrono::NaiveDate::from_ymd_opt(2020, 1, 1)
        .unwrap_or_default()
        .and_time(Default::default())
}

/// Document number `i` (random patient, type and date from `rng`).
fn make_doc(i: usize, rng: &mut ChaCha8Rng) -> NewDocument {
    let p = rng.gen_range(0..PATIENTS);
    let h = p % HOSPITALS;
    let t = rng.gen_range(0..TYPES.len());
    let mut doc = support::new_document(
        &format!("H{h:03}"),
        &format!("DOC-{i}"),
        (&format!("urn:bench:{h}"), &format!("MR-{p}")),
        (TYPES[t], CATEGORIES[t]),
        base_date() + chrono::Duration::minutes(rng.gen_range(0..3_000_000)),
    );
    doc.location = format!("https://his-{h}.example/docs/DOC-{i}");
    doc
}

/// The batches of documents `from..to`, each with its own seed (so the documents do not
/// depend on how the batches are spread over writers).
fn batches(from: usize, to: usize, batch: usize) -> Vec<(usize, usize)> {
    (from..to)
        .step_by(batch)
        .map(|a| (a, (a + batch).min(to)))
        .collect()
}

fn register_range(
    conn: &mut yiqiao_registry::store::Conn,
    (a, b): (usize, usize),
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(a as u64);
    let docs: Vec<NewDocument> = (a..b).map(|i| make_doc(i, &mut rng)).collect();
    register_batch(&mut Audited::unaudited(conn), &docs)
        .map_err(|e| format!("batch {a}..{b}: {e}"))?;
    Ok(())
}

/// Register documents `from..to` with `writers` connections (writer k takes batches
/// k, k + writers, …); returns documents per second.
fn register_phase(
    store: &Store,
    name: &str,
    from: usize,
    to: usize,
    batch: usize,
    writers: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let all = batches(from, to, batch);
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let result: Result<(), String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|k| {
                let (all, done, store) = (&all, done.clone(), store.clone());
                scope.spawn(move || -> Result<(), String> {
                    let mut conn = store.conn().map_err(|e| e.to_string())?;
                    for range in all.iter().skip(k).step_by(writers) {
                        register_range(&mut conn, *range)?;
                        done.fetch_add(range.1 - range.0, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        let mut last = Instant::now();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            if last.elapsed() > Duration::from_secs(30) {
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {name}: {n} of {} documents, {:.0}/s",
                    to - from,
                    n as f64 / t0.elapsed().as_secs_f64()
                );
                last = Instant::now();
            }
        }
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| "writer panicked".to_string())?)
    });
    result?;
    let secs = t0.elapsed().as_secs_f64();
    let rate = (to - from) as f64 / secs;
    eprintln!(
        "{name}: {} documents by {writers} writer(s) in {secs:.1} s, {rate:.0}/s",
        to - from
    );
    Ok(rate)
}

/// Bare multi-row INSERTs of `n` rows, `batch` per transaction, by `writers` connections;
/// returns rows per second.
fn bare_phase(
    store: &Store,
    prefix: &str,
    n: usize,
    batch: usize,
    writers: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let all = batches(0, n, batch);
    let t0 = Instant::now();
    let result: Result<(), String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..writers)
            .map(|k| {
                let (all, store) = (&all, store.clone());
                scope.spawn(move || -> Result<(), String> {
                    let mut conn = store.conn().map_err(|e| e.to_string())?;
                    for (a, b) in all.iter().skip(k).step_by(writers) {
                        let values: Vec<String> = (*a..*b)
                            .map(|i| format!("('{prefix}{i}', '{}')", "x".repeat(200)))
                            .collect();
                        conn.batch_execute(&format!(
                            "BEGIN; INSERT INTO bench_bare (id, body) VALUES {}; COMMIT;",
                            values.join(",")
                        ))
                        .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| "writer panicked".to_string())?)
    });
    result?;
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// Per-statement wall time as the client sees it (round trip included), keyed by the
/// statement's SQL (binds stripped, shortened).
#[derive(Default)]
struct StatementTimes {
    started: Option<Instant>,
    by_sql: HashMap<String, (u64, Duration)>,
}

struct Timer(Arc<Mutex<StatementTimes>>);

impl Instrumentation for Timer {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        let Ok(mut t) = self.0.lock() else { return };
        match event {
            InstrumentationEvent::StartQuery { .. } => t.started = Some(Instant::now()),
            InstrumentationEvent::FinishQuery { query, .. } => {
                let took = t.started.take().map(|s| s.elapsed()).unwrap_or_default();
                let text = query.to_string();
                let sql = text.split(" -- binds").next().unwrap_or("").trim();
                let key: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
                let key: String = key.chars().take(110).collect();
                let e = t.by_sql.entry(key).or_default();
                e.0 += 1;
                e.1 += took;
            }
            _ => {}
        }
    }
}

#[derive(QueryableByName)]
struct PlanLine {
    #[diesel(sql_type = Text, column_name = "QUERY PLAN")]
    line: String,
}

/// Set up the directory, EMPI and subscriptions, measure the baselines and register
/// `total` documents in the phases described at the top; returns the report lines.
fn populate(
    store: &Store,
    conn: &mut yiqiao_registry::store::Conn,
    (total, batch, writers, probe): (usize, usize, usize, usize),
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let sample = SAMPLE_BATCHES * batch;
    let mut out = Vec::new();
    let now = now_utc();
    // Hospitals and patients (one source record and person each), inserted directly.
    for h in 0..HOSPITALS {
        support::insert_institution(
            conn,
            &format!("H{h:03}"),
            &format!("BENCH{h:013}"),
            &format!("urn:bench:{h}"),
            now,
        )?;
    }
    conn.transaction(|conn| -> Result<(), diesel::result::Error> {
        for p in 0..PATIENTS {
            let h = p % HOSPITALS;
            support::insert_patient(
                conn,
                (&format!("P{p}"), &format!("R{p}"), p as u64),
                &format!("H{h:03}"),
                (&format!("urn:bench:{h}"), &format!("MR-{p}")),
                now,
            )?;
        }
        Ok(())
    })?;
    // Ten subscriptions, patient-filtered (a catch-all one would multiply the delivery rows),
    // so registration writes event rows and some deliveries.
    for p in 0..10 {
        outbox::create_subscription(
            &mut Audited::unaudited(conn),
            &NewSubscription {
                owner_id: "H000".into(),
                topic: outbox::TOPIC_DOCUMENT.into(),
                filter_person: Some(format!("P{p}")),
                filter_type: None,
                endpoint: "https://receiver.invalid/hook".into(),
                resource: json!({}),
            },
        )?;
    }
    // Baselines: bare multi-row INSERTs of the same batch size, one transaction each.
    conn.batch_execute(
        "CREATE TABLE bench_bare (id TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL)",
    )?;
    let bare_n = total.min(200_000);
    let bare_rate = bare_phase(store, "B", bare_n, batch, 1)?;
    eprintln!("bare INSERT, 1 writer: {bare_rate:.0} rows/s");
    let bare_par = if writers > 1 {
        let r = bare_phase(store, "P", bare_n, batch, writers)?;
        eprintln!("bare INSERT, {writers} writers: {r:.0} rows/s");
        Some(r)
    } else {
        None
    };
    // Registration.
    let bulk_end = total - probe - sample;
    let t_all = Instant::now();
    let start_rate = register_phase(store, "probe (start)", 0, probe, batch, 1)?;
    let bulk_rate = register_phase(store, "bulk", probe, bulk_end, batch, writers)?;
    let end_rate = register_phase(store, "probe (end)", bulk_end, bulk_end + probe, batch, 1)?;
    // Instrumented sample: where the time of one registration goes.
    let times = Arc::new(Mutex::new(StatementTimes::default()));
    conn.set_instrumentation(Timer(times.clone()));
    let t0 = Instant::now();
    for range in batches(bulk_end + probe, total, batch) {
        register_range(conn, range).map_err(|e| e.to_string())?;
    }
    let sample_secs = t0.elapsed().as_secs_f64();
    conn.set_instrumentation(|_: InstrumentationEvent<'_>| {});
    let reg_secs = t_all.elapsed().as_secs_f64();
    out.push(format!(
        "registration of {total} documents took {reg_secs:.0} s in all"
    ));
    out.push(format!(
        "| bare INSERT, {bare_n} rows, 1 writer (baseline) | {bare_rate:.0} rows/s | 1 |"
    ));
    out.push(format!(
        "| register_batch, 1 writer, documents 0–{probe} (empty table) | {start_rate:.0} documents/s | {:.3} |",
        start_rate / bare_rate
    ));
    out.push(format!(
        "| register_batch, 1 writer, documents {bulk_end}–{} (bulk in the table) | {end_rate:.0} documents/s | {:.3} |",
        bulk_end + probe,
        end_rate / bare_rate
    ));
    if let Some(par) = bare_par {
        out.push(format!(
            "| bare INSERT, {bare_n} rows, {writers} writers (baseline) | {par:.0} rows/s | 1 |"
        ));
        out.push(format!(
            "| register_batch, {writers} writers, documents {probe}–{bulk_end} | {bulk_rate:.0} documents/s | {:.3} |",
            bulk_rate / par
        ));
    } else {
        out.push(format!(
            "| register_batch, 1 writer, documents {probe}–{bulk_end} | {bulk_rate:.0} documents/s | {:.3} |",
            bulk_rate / bare_rate
        ));
    }
    // Where register_batch spends its time.
    let t = times.lock().map_err(|_| "timer poisoned")?;
    let mut rows: Vec<(&String, &(u64, Duration))> = t.by_sql.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    let in_statements: Duration = rows.iter().map(|r| r.1.1).sum();
    out.push(String::new());
    out.push(format!(
        "Instrumented sample: {sample} documents in {SAMPLE_BATCHES} batches by 1 writer, {:.0} documents/s with instrumentation; {:.1} ms per batch, of which {:.1} ms inside statements",
        sample as f64 / sample_secs,
        sample_secs * 1000.0 / SAMPLE_BATCHES as f64,
        in_statements.as_secs_f64() * 1000.0 / SAMPLE_BATCHES as f64
    ));
    out.push(String::new());
    out.push("| statement | per document | mean | share of statement time |".into());
    out.push("|---|---|---|---|".into());
    for (sql, (n, d)) in rows {
        out.push(format!(
            "| `{}` | {:.2} | {:.0} µs | {:.1} % |",
            sql.replace('|', "\\|"),
            *n as f64 / sample as f64,
            d.as_secs_f64() * 1e6 / *n as f64,
            100.0 * d.as_secs_f64() / in_statements.as_secs_f64().max(1e-9)
        ));
    }
    drop(t);
    Ok(out)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let url = args.next().unwrap_or_else(|| {
        let path = std::env::temp_dir().join(format!("docs-bench-{}.db", std::process::id()));
        path.to_string_lossy().into_owned()
    });
    let batch: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let writers: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let probe: usize = args.next().map_or(Ok(total / 10), |a| a.parse())?;
    let writers = writers.max(1);
    let sample = SAMPLE_BATCHES * batch;
    if total > 0 && total < 2 * probe + sample {
        return Err(format!("documents ({total}) must be at least 2 × probe + {sample}").into());
    }
    let store = Store::open(&StoreOptions {
        url: url.clone(),
        pool_size: writers as u32 + 2,
        min_idle: None,
        acquire_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(300),
        sqlite_busy_timeout: Duration::from_secs(10),
    })?;
    store.migrate()?;
    let mut conn = store.conn()?;
    let postgres = matches!(store.backend(), yiqiao_registry::Backend::Postgres);
    // documents = 0: searches only, on a database loaded by an earlier run.
    let report = if total > 0 {
        populate(&store, &mut conn, (total, batch, writers, probe))?
    } else {
        Vec::new()
    };
    if postgres {
        conn.batch_execute("ANALYZE")?;
    }
    // Searches: by patient (all records of the person), by type + date range, by custodian
    // + status; 21 rows per page as the API asks. Reads by id of random documents.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut by_patient = Vec::new();
    let mut by_type_date = Vec::new();
    let mut by_custodian = Vec::new();
    let mut pk = Vec::new();
    let all_ids: Vec<String> = yiqiao_registry::store::schema::doc_references::table
        .select(yiqiao_registry::store::schema::doc_references::id)
        .load(&mut conn)?;
    let ids: Vec<&String> = (0..1000)
        .map(|_| &all_ids[rng.gen_range(0..all_ids.len())])
        .collect();
    let queries: Vec<(usize, chrono::NaiveDateTime)> = (0..1000)
        .map(|_| {
            (
                rng.gen_range(0..PATIENTS),
                base_date() + chrono::Duration::minutes(rng.gen_range(0..2_900_000)),
            )
        })
        .collect();
    for (q, (p, from)) in queries.iter().enumerate() {
        let f = DocumentFilter {
            patient_records: Some(vec![format!("R{p}")]),
            limit: 21,
            ..DocumentFilter::default()
        };
        let t = Instant::now();
        search(&mut conn, &f)?;
        by_patient.push(t.elapsed());
        let f = DocumentFilter {
            type_codes: Some(vec![TYPES[q % TYPES.len()].to_string()]),
            date_from: vec![*from],
            date_before: vec![*from + chrono::Duration::days(30)],
            limit: 21,
            ..DocumentFilter::default()
        };
        let t = Instant::now();
        search(&mut conn, &f)?;
        by_type_date.push(t.elapsed());
        let f = DocumentFilter {
            custodians: Some(vec![format!("H{:03}", q % HOSPITALS)]),
            statuses: Some(vec!["current".into()]),
            limit: 21,
            ..DocumentFilter::default()
        };
        let t = Instant::now();
        search(&mut conn, &f)?;
        by_custodian.push(t.elapsed());
        let t = Instant::now();
        yiqiao_registry::documents::get(&mut conn, ids[q])?;
        pk.push(t.elapsed());
    }
    for v in [
        &mut by_patient,
        &mut by_type_date,
        &mut by_custodian,
        &mut pk,
    ] {
        v.sort();
    }
    let docs_in_table = all_ids.len();
    let deliveries: i64 = yiqiao_registry::store::schema::doc_deliveries::table
        .count()
        .get_result(&mut conn)?;
    println!("backend: {}", store.backend().name());
    println!(
        "documents: {docs_in_table} in the table, batches of {batch}; {PATIENTS} patients, {HOSPITALS} hospitals, 10 subscriptions ({deliveries} delivery rows)"
    );
    let (registration, instrumented) = match report.iter().position(String::is_empty) {
        Some(i) => report.split_at(i),
        None => (&report[..], &[][..]),
    };
    let (took, registration) = registration
        .split_first()
        .map_or((None, registration), |(t, r)| (Some(t), r));
    if let Some(took) = took {
        println!("{took}");
    }
    println!();
    println!("| measure | figure | vs baseline |");
    println!("|---|---|---|");
    for line in registration {
        println!("{line}");
    }
    let pk99 = percentile(&pk, 0.99);
    println!(
        "| read by id, random document (baseline) | p50 {} / p99 {} | 1 |",
        ms(percentile(&pk, 0.5)),
        ms(pk99)
    );
    for (name, v) in [
        ("search patient", &by_patient),
        ("search type + 30-day date range", &by_type_date),
        ("search custodian + status", &by_custodian),
    ] {
        let p99 = percentile(v, 0.99);
        println!(
            "| {name} | p50 {} / p99 {} | p99 × {:.1} |",
            ms(percentile(v, 0.5)),
            ms(p99),
            p99.as_secs_f64() / pk99.as_secs_f64().max(1e-9)
        );
    }
    for line in instrumented {
        println!("{line}");
    }
    if postgres {
        let (p, from) = queries[0];
        let to = from + chrono::Duration::days(30);
        for sql in [
            format!(
                "SELECT id FROM doc_references WHERE patient_record_id IN ('R{p}') ORDER BY doc_date DESC, id DESC LIMIT 21 OFFSET 0"
            ),
            format!(
                "SELECT id FROM doc_references WHERE type_code IN ('{}') AND doc_date >= '{from}' AND doc_date < '{to}' ORDER BY doc_date DESC, id DESC LIMIT 21 OFFSET 0",
                TYPES[0]
            ),
            "SELECT id FROM doc_references WHERE status IN ('current') AND custodian_id IN ('H000') ORDER BY doc_date DESC, id DESC LIMIT 21 OFFSET 0".to_string(),
        ] {
            println!();
            println!("EXPLAIN (ANALYZE, BUFFERS) {sql}");
            let yiqiao_registry::store::DbConn::Postgresql(pg) = &mut *conn else {
                break;
            };
            let plan: Vec<PlanLine> =
                diesel::sql_query(format!("EXPLAIN (ANALYZE, BUFFERS) {sql}")).load(pg)?;
            for l in plan {
                println!("    {}", l.line);
            }
        }
    }
    Ok(())
}
