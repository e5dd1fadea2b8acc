//! Load figures of the identity store: registration throughput (one writer; batch 1: each
//! record in its own transaction, as the FHIR feed does; batch N: `register_batch` of N records
//! per transaction, as `yiqiao mpi import` does), `$match` and PIXm-style lookup latency, the
//! linkage quality of the online (one record at a time) matcher against the synthetic truth,
//! and same-run baselines: a bare multi-row INSERT of the same rows into a scratch table and a
//! read of a source record by id. The connection is set up as `yiqiao mpi import` sets up its
//! own (`bulk_load_session`).
//!
//! `cargo run --release -p yiqiao-registry --example empi_store_bench -- [records] [database-url] [batch] [reads]`
//! (default 10000 records on a fresh SQLite file in the temp directory, batch 1; `reads`: the
//! database holds the population from a previous run, measure the reads only). Both modes end
//! with 1,000 single registrations (each its own transaction, as the FHIR and HL7 feeds
//! register) of already registered people under new record numbers, p50/p99. Planner
//! statistics are refreshed on the import's schedule (`StatisticsSchedule`) in both modes:
//! autovacuum, which would do it for the FHIR feed, is off on the test server.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use diesel::prelude::*;
use yiqiao_registry::empi::evaluate::pairwise_quality;
use yiqiao_registry::empi::store::{self as empi, Registration};
use yiqiao_registry::empi::synth::{Population, PopulationConfig, generate};
use yiqiao_registry::store::Audited;
use yiqiao_registry::store::DbConn;
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
    let url = args.next().filter(|u| !u.is_empty()).unwrap_or_else(|| {
        let path = std::env::temp_dir().join(format!("empi-bench-{}.db", std::process::id()));
        path.to_string_lossy().into_owned()
    });
    let batch: usize = args.next().map_or(Ok(1), |a| a.parse())?;
    let batch = batch.max(1);
    // `reads`: the database already holds this population (a previous run of the same size
    // and seed): measure `$match`, reads and PIXm only.
    let reads_only = args.next().as_deref() == Some("reads");
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
    empi::bulk_load_session(&mut conn)?;
    let now = now_utc();
    for i in 0..if reads_only { 0 } else { 100 } {
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

    if reads_only {
        return measure_reads(&mut conn, &pop, None);
    }
    let regs: Vec<Registration> = pop
        .records
        .iter()
        .map(|r| Registration {
            institution_id: r.institution.clone(),
            id_system: format!("urn:bench:{}", r.institution),
            id_value: r.record_id.0.to_string(),
            record: r.clone(),
            family: String::new(),
            given: String::new(),
            resource: serde_json::json!({ "resourceType": "Patient" }),
        })
        .collect();
    let mut statistics = empi::StatisticsSchedule::default();
    let started = Instant::now();
    let mut done = 0u64;
    for chunk in regs.chunks(batch) {
        if batch == 1 {
            empi::register(&mut Audited::unaudited(&mut conn), &chunk[0], "bench")?;
        } else {
            let refs: Vec<&Registration> = chunk.iter().collect();
            for outcome in empi::register_batch(&mut Audited::unaudited(&mut conn), &refs, "bench")?
            {
                outcome?;
            }
        }
        done += chunk.len() as u64;
        statistics.after_batch(&mut conn, done)?;
    }
    let elapsed = started.elapsed();
    println!(
        "registration (batch {batch}): {:.1} s, {:.0} records/s",
        elapsed.as_secs_f64(),
        pop.records.len() as f64 / elapsed.as_secs_f64()
    );
    let ids: Vec<String> = regs
        .iter()
        .map(|r| -> Result<String, Box<dyn std::error::Error>> {
            empi::find_by_identifier(&mut conn, &r.id_system, &r.id_value)?
                .map(|s| s.id)
                .ok_or_else(|| "registered record not found".into())
        })
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;

    // Baseline: the same rows (columns of empi_source_records) inserted bare, in batches of
    // the same size, one transaction each, into a scratch table.
    diesel::sql_query("DROP TABLE IF EXISTS bench_bare_records").execute(&mut *conn)?;
    diesel::sql_query(
        "CREATE TABLE bench_bare_records (id TEXT PRIMARY KEY NOT NULL, id_system TEXT NOT NULL, \
         id_value TEXT NOT NULL, record_json TEXT NOT NULL, UNIQUE (id_system, id_value))",
    )
    .execute(&mut *conn)?;
    diesel::table! {
        bench_bare_records (id) {
            id -> Text,
            id_system -> Text,
            id_value -> Text,
            record_json -> Text,
        }
    }
    let bare: Vec<(String, String, String, String)> = regs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok((
                format!("{i:012}"),
                r.id_system.clone(),
                r.id_value.clone(),
                serde_json::to_string(&r.record)?,
            ))
        })
        .collect::<Result<_, serde_json::Error>>()?;
    let started = Instant::now();
    // 4 binds a row; stay under SQLite's 32766 bound parameters per statement.
    for chunk in bare.chunks(batch.min(5_000)) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(id, s, v, j)| {
                (
                    bench_bare_records::id.eq(id),
                    bench_bare_records::id_system.eq(s),
                    bench_bare_records::id_value.eq(v),
                    bench_bare_records::record_json.eq(j),
                )
            })
            .collect();
        conn.transaction(|c| match &mut **c {
            DbConn::Postgresql(pg) => diesel::insert_into(bench_bare_records::table)
                .values(&rows)
                .execute(pg),
            DbConn::Sqlite(lite) => diesel::insert_into(bench_bare_records::table)
                .values(&rows)
                .execute(lite),
        })?;
    }
    let bare_elapsed = started.elapsed();
    println!(
        "baseline bare INSERT (batch {}): {:.1} s, {:.0} rows/s; registration / bare = {:.3}",
        batch.min(5_000),
        bare_elapsed.as_secs_f64(),
        bare.len() as f64 / bare_elapsed.as_secs_f64(),
        (pop.records.len() as f64 / elapsed.as_secs_f64())
            / (bare.len() as f64 / bare_elapsed.as_secs_f64())
    );
    diesel::sql_query("DROP TABLE bench_bare_records").execute(&mut *conn)?;

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

    measure_reads(&mut conn, &pop, Some(&ids))
}

/// `$match`, read by id (the baseline) and PIXm lookup latency over 1,000 sampled records.
/// `ids`: the stored id of every record, when known.
fn measure_reads(
    conn: &mut DbConn,
    pop: &Population,
    ids: Option<&[String]>,
) -> Result<(), Box<dyn std::error::Error>> {
    let sample: Vec<usize> = (0..1_000.min(pop.records.len()))
        .map(|i| (i * 7919) % pop.records.len())
        .collect();
    let sample_ids: Vec<String> = sample
        .iter()
        .map(|&i| -> Result<String, Box<dyn std::error::Error>> {
            if let Some(ids) = ids {
                return Ok(ids[i].clone());
            }
            let r = &pop.records[i];
            empi::find_by_identifier(
                conn,
                &format!("urn:bench:{}", r.institution),
                &r.record_id.0.to_string(),
            )?
            .map(|s| s.id)
            .ok_or_else(|| "record not found: load the population first".into())
        })
        .collect::<Result<_, _>>()?;
    let mut match_times = Vec::with_capacity(sample.len());
    for &i in &sample {
        let t = Instant::now();
        let found = empi::match_record(conn, &pop.records[i])?;
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
    let mut read_times = Vec::with_capacity(sample.len());
    for id in &sample_ids {
        let t = Instant::now();
        std::hint::black_box(empi::get_record(conn, id)?);
        read_times.push(t.elapsed());
    }
    read_times.sort();
    println!(
        "baseline read by id: p50 {:?}, p99 {:?}; $match p50 / read p50 = {:.1}, p99 / p99 = {:.1}",
        percentile(&read_times, 0.5),
        percentile(&read_times, 0.99),
        percentile(&match_times, 0.5).as_secs_f64()
            / percentile(&read_times, 0.5).as_secs_f64().max(1e-9),
        percentile(&match_times, 0.99).as_secs_f64()
            / percentile(&read_times, 0.99).as_secs_f64().max(1e-9)
    );
    let mut pix_times = Vec::with_capacity(sample.len());
    for &i in &sample {
        let r = &pop.records[i];
        let t = Instant::now();
        let source = empi::find_by_identifier(
            conn,
            &format!("urn:bench:{}", r.institution),
            &r.record_id.0.to_string(),
        )?;
        if let Some(link) = source.and_then(|s| s.link) {
            std::hint::black_box(empi::records_of_person(conn, &link.person_id)?);
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

    // Single registrations into the loaded index, each in its own transaction through
    // `empi::register` (what `POST /fhir/Patient` and the HL7 feed call): the sampled people
    // again under a new record number at the same hospital (a duplicate registration, which
    // the matcher must link), numbered by this run so that every one is new.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let mut reg_times = Vec::with_capacity(sample.len());
    let mut linked = 0usize;
    for (n, &i) in sample.iter().enumerate() {
        let r = &pop.records[i];
        let reg = Registration {
            institution_id: r.institution.clone(),
            id_system: format!("urn:bench:{}", r.institution),
            id_value: format!("single-{run}-{n}"),
            record: r.clone(),
            family: String::new(),
            given: String::new(),
            resource: serde_json::json!({ "resourceType": "Patient" }),
        };
        let t = Instant::now();
        let done = empi::register(&mut Audited::unaudited(conn), &reg, "bench")?;
        reg_times.push(t.elapsed());
        if done.record.link.is_some_and(|l| l.score.is_some()) {
            linked += 1;
        }
    }
    reg_times.sort();
    println!(
        "single registration (own transaction each, {} people already registered, {linked} linked by the matcher): p50 {:?}, p99 {:?}, max {:?}",
        reg_times.len(),
        percentile(&reg_times, 0.5),
        percentile(&reg_times, 0.99),
        reg_times.last().copied().unwrap_or_default()
    );
    Ok(())
}
