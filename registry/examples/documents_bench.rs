//! Load figures of the document registry: registration throughput through `register_batch`
//! (the code path of `POST /fhir` transaction Bundles: validation lookups, idempotency check,
//! rows, events and delivery rows in one transaction) and search latency (p50/p99) on the
//! loaded table; each beside a baseline measured in the same run on the same database:
//! a bare multi-row INSERT of the same number of rows into a one-column table, and a
//! primary-key read of one document.
//!
//! `cargo run --release -p yiqiao-registry --example documents_bench -- [documents] [database-url] [batch]`
//! (defaults: 100000 documents, a fresh SQLite file in the temp directory, 100 per transaction).
//! The PostgreSQL database must be empty (the bench migrates it).

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use rand::{Rng, SeedableRng};
use serde_json::json;
use yiqiao_registry::documents::outbox::{self, NewSubscription};
use yiqiao_registry::documents::{DocStatus, DocumentFilter, NewDocument, register_batch, search};
use yiqiao_registry::empi::record::{RecordId, SourceRecord};
use yiqiao_registry::store::now_utc;
use yiqiao_registry::store::schema::{
    empi_links, empi_persons, empi_source_records as records, institutions,
};
use yiqiao_registry::{Store, StoreOptions};

const PATIENTS: usize = 20_000;
const HOSPITALS: usize = 20;

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let url = args.next().unwrap_or_else(|| {
        let path = std::env::temp_dir().join(format!("docs-bench-{}.db", std::process::id()));
        path.to_string_lossy().into_owned()
    });
    let batch: usize = args.next().map_or(Ok(100), |a| a.parse())?;
    let store = Store::open(&StoreOptions {
        url: url.clone(),
        pool_size: 2,
        min_idle: None,
        acquire_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(300),
        sqlite_busy_timeout: Duration::from_secs(10),
    })?;
    store.migrate()?;
    let mut conn = store.conn()?;
    let now = now_utc();
    // Hospitals and patients (one source record and person each), inserted directly.
    for h in 0..HOSPITALS {
        diesel::insert_into(institutions::table)
            .values((
                institutions::id.eq(format!("H{h:03}")),
                institutions::name.eq(format!("bench {h}")),
                institutions::uscc.eq(format!("BENCH{h:013}")),
                institutions::region_code.eq("350100"),
                institutions::level.eq("3A"),
                institutions::kind.eq("hospital"),
                institutions::jwks.eq("{\"keys\":[]}"),
                institutions::sm2_keys.eq("[]"),
                institutions::patient_id_system.eq(format!("urn:bench:{h}")),
                institutions::allowed_scopes.eq(""),
                institutions::require_sm_envelope.eq(false),
                institutions::status.eq("active"),
                institutions::version.eq(1_i64),
                institutions::created_at.eq(now),
                institutions::updated_at.eq(now),
            ))
            .execute(&mut conn)?;
    }
    conn.transaction(|conn| -> Result<(), diesel::result::Error> {
        for p in 0..PATIENTS {
            let h = p % HOSPITALS;
            let (rid, pid) = (format!("R{p}"), format!("P{p}"));
            diesel::insert_into(empi_persons::table)
                .values((
                    empi_persons::id.eq(&pid),
                    empi_persons::status.eq("active"),
                    empi_persons::version.eq(1_i64),
                    empi_persons::created_at.eq(now),
                    empi_persons::updated_at.eq(now),
                ))
                .execute(conn)?;
            diesel::insert_into(records::table)
                .values((
                    records::id.eq(&rid),
                    records::institution_id.eq(format!("H{h:03}")),
                    records::id_system.eq(format!("urn:bench:{h}")),
                    records::id_value.eq(format!("MR-{p}")),
                    records::name_search.eq("x"),
                    records::family.eq("x"),
                    records::given.eq("x"),
                    records::record_json.eq(serde_json::to_string(&SourceRecord {
                        record_id: RecordId(p as u64),
                        institution: format!("H{h:03}"),
                        name: "x".into(),
                        sex: None,
                        birth_date: None,
                        identifiers: Vec::new(),
                        address: None,
                    })
                    .unwrap_or_default()),
                    records::resource.eq("{}"),
                    records::version.eq(1_i64),
                    records::created_at.eq(now),
                    records::updated_at.eq(now),
                ))
                .execute(conn)?;
            diesel::insert_into(empi_links::table)
                .values((
                    empi_links::record_id.eq(&rid),
                    empi_links::person_id.eq(&pid),
                    empi_links::decided_by.eq("auto"),
                    empi_links::actor.eq("bench"),
                    empi_links::decided_at.eq(now),
                ))
                .execute(conn)?;
        }
        Ok(())
    })?;
    // Ten subscriptions (one per type filter + five catch-all would multiply rows; keep it
    // realistic: 10 patient-filtered), so registration writes event rows and some deliveries.
    for p in 0..10 {
        outbox::create_subscription(
            &mut conn,
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
    let types = [
        "http://loinc.org|18842-5",
        "http://loinc.org|11502-2",
        "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0007",
        "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0006",
        "https://yiqiao.health/fhir/CodeSystem/wst500-document|C0053",
    ];
    let categories = ["summary", "laboratory", "laboratory", "imaging", "summary"];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    let base_date = chrono::NaiveDate::from_ymd_opt(2020, 1, 1)
        .unwrap_or_default()
        .and_time(Default::default());
    let make = |i: usize, rng: &mut rand_chacha::ChaCha8Rng| {
        let p = rng.gen_range(0..PATIENTS);
        let h = p % HOSPITALS;
        let t = rng.gen_range(0..types.len());
        NewDocument {
            custodian_id: format!("H{h:03}"),
            custodian_doc_id: format!("DOC-{i}"),
            patient_system: format!("urn:bench:{h}"),
            patient_value: format!("MR-{p}"),
            type_code: types[t].into(),
            category_code: categories[t].into(),
            date: base_date + chrono::Duration::minutes(rng.gen_range(0..3_000_000)),
            author_id: None,
            confidentiality: "N".into(),
            sensitivity: Vec::new(),
            content_type: "application/xml".into(),
            content_size: 2048,
            sm3_hash: "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0".into(),
            location: format!("https://his-{h}.example/docs/DOC-{i}"),
            status: DocStatus::Current,
            replaces: None,
            resource: json!({ "resourceType": "DocumentReference", "masterIdentifier": { "value": format!("DOC-{i}") } }),
        }
    };
    // Baseline: bare multi-row INSERTs of the same count, same batch size, one transaction each.
    conn.batch_execute(
        "CREATE TABLE bench_bare (id TEXT PRIMARY KEY NOT NULL, body TEXT NOT NULL)",
    )?;
    let bare_n = total.min(200_000);
    let t0 = Instant::now();
    for chunk in 0..bare_n.div_ceil(batch) {
        let values: Vec<String> = (chunk * batch..((chunk + 1) * batch).min(bare_n))
            .map(|i| format!("('B{i}', '{}')", "x".repeat(200)))
            .collect();
        conn.batch_execute(&format!(
            "BEGIN; INSERT INTO bench_bare (id, body) VALUES {}; COMMIT;",
            values.join(",")
        ))?;
    }
    let bare_rate = bare_n as f64 / t0.elapsed().as_secs_f64();
    // Registration.
    let t0 = Instant::now();
    let mut done = 0;
    let mut last_report = Instant::now();
    while done < total {
        let n = batch.min(total - done);
        let docs: Vec<NewDocument> = (done..done + n).map(|i| make(i, &mut rng)).collect();
        register_batch(&mut conn, &docs)?;
        done += n;
        if last_report.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "{done} documents, {:.0}/s",
                done as f64 / t0.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    let reg_rate = total as f64 / reg_secs;
    if matches!(store.backend(), yiqiao_registry::Backend::Postgres) {
        conn.batch_execute("ANALYZE")?;
    }
    // Searches: by patient (all records of the person), by type + date range, by custodian
    // + status; 20 per page as the API asks for 21.
    let mut by_patient = Vec::new();
    let mut by_type_date = Vec::new();
    let mut by_custodian = Vec::new();
    let mut pk = Vec::new();
    let ids: Vec<String> = yiqiao_registry::store::schema::doc_references::table
        .select(yiqiao_registry::store::schema::doc_references::id)
        .limit(1000)
        .load(&mut conn)?;
    for q in 0..1000 {
        let p = rng.gen_range(0..PATIENTS);
        let f = DocumentFilter {
            patient_records: Some(vec![format!("R{p}")]),
            limit: 21,
            ..DocumentFilter::default()
        };
        let t = Instant::now();
        search(&mut conn, &f)?;
        by_patient.push(t.elapsed());
        let from = base_date + chrono::Duration::minutes(rng.gen_range(0..2_900_000));
        let f = DocumentFilter {
            type_codes: Some(vec![types[q % types.len()].to_string()]),
            date_from: vec![from],
            date_before: vec![from + chrono::Duration::days(30)],
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
        yiqiao_registry::documents::get(&mut conn, &ids[q % ids.len()])?;
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
    let deliveries: i64 = yiqiao_registry::store::schema::doc_deliveries::table
        .count()
        .get_result(&mut conn)?;
    println!("backend: {}", store.backend().name());
    println!(
        "documents: {total} in batches of {batch}; {PATIENTS} patients, {HOSPITALS} hospitals, 10 subscriptions ({deliveries} delivery rows)"
    );
    println!("| measure | figure | vs baseline |");
    println!("|---|---|---|");
    println!("| bare INSERT, {bare_n} rows (baseline) | {bare_rate:.0} rows/s | 1 |");
    println!(
        "| register_batch | {reg_rate:.0} documents/s ({reg_secs:.0} s) | {:.3} |",
        reg_rate / bare_rate
    );
    let pk99 = percentile(&pk, 0.99);
    println!(
        "| read by id (baseline) | p50 {} / p99 {} | 1 |",
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
    Ok(())
}
