//! Load figures of the identity store: registration throughput (one writer, each record in its
//! own transaction, as the FHIR feed does), `$match` and PIXm-style lookup latency, and the
//! linkage quality of the online (one record at a time) matcher against the synthetic truth.
//!
//! `cargo run --release -p yiqiao-registry --example empi_store_bench -- [records] [database-url]`
//! (default 10000 records on a fresh SQLite file in the temp directory).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use yiqiao_registry::empi::evaluate::pairwise_quality;
use yiqiao_registry::empi::store::{self as empi, Registration};
use yiqiao_registry::empi::synth::{PopulationConfig, generate};
use yiqiao_registry::store::now_utc;
use yiqiao_registry::store::schema::{empi_links, institutions};
use yiqiao_registry::{Store, StoreOptions};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let records: usize = args.next().map_or(Ok(10_000), |a| a.parse())?;
    let url = args.next().unwrap_or_else(|| {
        let path = std::env::temp_dir().join(format!("empi-bench-{}.db", std::process::id()));
        path.to_string_lossy().into_owned()
    });
    let store = Store::open(&StoreOptions {
        url: url.clone(),
        pool_size: 2,
        min_idle: None,
        acquire_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(60),
        sqlite_busy_timeout: Duration::from_secs(10),
    })?;
    store.migrate()?;
    let mut conn = store.conn()?;
    let now = now_utc();
    for i in 0..100 {
        diesel::insert_into(institutions::table)
            .values((
                institutions::id.eq(format!("H{i:03}")),
                institutions::name.eq(format!("bench {i}")),
                institutions::uscc.eq(format!("BENCH{i:013}")),
                institutions::region_code.eq("350100"),
                institutions::level.eq(if i % 3 == 0 { "3A" } else { "2A" }),
                institutions::kind.eq("hospital"),
                institutions::jwks.eq("{\"keys\":[]}"),
                institutions::sm2_keys.eq("[]"),
                institutions::patient_id_system.eq(format!("urn:bench:{i}")),
                institutions::allowed_scopes.eq(""),
                institutions::require_sm_envelope.eq(false),
                institutions::status.eq("active"),
                institutions::version.eq(1i64),
                institutions::created_at.eq(now),
                institutions::updated_at.eq(now),
            ))
            .execute(&mut *conn)?;
    }
    let pop = generate(&PopulationConfig::new(records, 1));
    println!(
        "backend {}, {} records of {} persons",
        store.backend().name(),
        pop.records.len(),
        pop.persons
    );

    let started = Instant::now();
    let mut ids = Vec::with_capacity(pop.records.len());
    for r in &pop.records {
        let reg = Registration {
            institution_id: r.institution.clone(),
            id_system: format!("urn:bench:{}", r.institution),
            id_value: r.record_id.0.to_string(),
            record: r.clone(),
            family: String::new(),
            given: String::new(),
            resource: serde_json::json!({ "resourceType": "Patient" }),
        };
        let done = empi::register(&mut conn, &reg, "bench")?;
        ids.push(done.record.id);
    }
    let elapsed = started.elapsed();
    println!(
        "registration: {:.1} s, {:.0} records/s",
        elapsed.as_secs_f64(),
        pop.records.len() as f64 / elapsed.as_secs_f64()
    );

    let links: HashMap<String, String> = empi_links::table
        .select((empi_links::record_id, empi_links::person_id))
        .load::<(String, String)>(&mut *conn)?
        .into_iter()
        .collect();
    let mut person_index: HashMap<&str, usize> = HashMap::new();
    let predicted: Vec<usize> = ids
        .iter()
        .map(|id| {
            let p = links.get(id).map_or("", String::as_str);
            let n = person_index.len();
            *person_index.entry(p).or_insert(n)
        })
        .collect();
    let (precision, recall, f1) = pairwise_quality(&predicted, &pop.person_of);
    println!(
        "online linkage: persons {} (true {}), precision {precision:.5}, recall {recall:.5}, F1 {f1:.5}",
        person_index.len(),
        pop.persons
    );

    let sample: Vec<usize> = (0..1_000.min(pop.records.len()))
        .map(|i| (i * 7919) % pop.records.len())
        .collect();
    let mut match_times = Vec::with_capacity(sample.len());
    for &i in &sample {
        let t = Instant::now();
        let found = empi::match_record(&mut conn, &pop.records[i])?;
        match_times.push(t.elapsed());
        std::hint::black_box(found);
    }
    match_times.sort();
    println!(
        "$match: p50 {:?}, p99 {:?}, max {:?} ({} queries)",
        percentile(&match_times, 0.5),
        percentile(&match_times, 0.99),
        match_times.last().copied().unwrap_or_default(),
        match_times.len()
    );
    let mut pix_times = Vec::with_capacity(sample.len());
    for &i in &sample {
        let r = &pop.records[i];
        let t = Instant::now();
        let source = empi::find_by_identifier(
            &mut conn,
            &format!("urn:bench:{}", r.institution),
            &r.record_id.0.to_string(),
        )?;
        if let Some(link) = source.and_then(|s| s.link) {
            std::hint::black_box(empi::records_of_person(&mut conn, &link.person_id)?);
        }
        pix_times.push(t.elapsed());
    }
    pix_times.sort();
    println!(
        "PIXm lookup: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&pix_times, 0.5),
        percentile(&pix_times, 0.99),
        pix_times.last().copied().unwrap_or_default()
    );
    Ok(())
}
