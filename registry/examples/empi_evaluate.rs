//! Evaluate EMPI linkage quality on a synthetic population.
//!
//! `cargo run --release -p yiqiao-registry --example empi_evaluate -- [records] [seed] [params.json]`
//!
//! With a third argument, the EM-estimated parameters and the thresholds are written there
//! as the JSON the identity store loads ([`StoredModel`]); this is how
//! `registry/src/empi/default_model.json` is produced.

use std::time::Instant;

use yiqiao_registry::empi::evaluate::{EvaluationConfig, evaluate};
use yiqiao_registry::empi::store::StoredModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let records: usize = args.next().map_or(Ok(100_000), |a| a.parse())?;
    let seed: u64 = args.next().map_or(Ok(1), |a| a.parse())?;
    let out = args.next();
    let config = EvaluationConfig::new(records, seed);
    let started = Instant::now();
    let report = evaluate(&config)?;
    let total = started.elapsed();
    let em = report.parameters.em.clone();
    println!("records            {}", report.records);
    println!("persons            {}", report.persons);
    println!("true pairs         {}", report.true_pairs);
    println!("candidate pairs    {}", report.candidate_pairs);
    println!("pairs per record   {:.2}", report.pairs_per_record);
    println!("blocking recall    {:.5}", report.blocking_recall);
    println!("blocking           {:?}", report.blocking);
    if let Some(em) = &em {
        println!(
            "EM                 {} iterations, converged {}, {} distinct vectors, log-likelihood {:.1}",
            em.iterations,
            em.converged,
            em.distinct_vectors,
            em.log_likelihood.last().copied().unwrap_or_default()
        );
    }
    println!("prevalence         {:.4}", report.parameters.prevalence);
    println!(
        "thresholds         auto-link {:.2}, review {:.2}",
        report.thresholds.auto_link, report.thresholds.review
    );
    println!("auto-links         {}", report.auto_links);
    println!("reviews            {}", report.reviews);
    println!("precision          {:.5}", report.precision);
    println!("recall             {:.5}", report.recall);
    println!("F1                 {:.5}", report.f1);
    println!("timings (ms)       {:?}", report.timings);
    println!("total              {:.2} s", total.as_secs_f64());
    for f in &report.parameters.fields {
        let w: Vec<String> = f
            .levels
            .iter()
            .zip(f.m.iter().zip(&f.u))
            .map(|(l, (m, u))| format!("{l:?} m={m:.4} u={u:.4}"))
            .collect();
        println!("  {:?}: {}", f.field, w.join("; "));
    }
    for (title, list) in [
        ("worst false links", &report.worst_false_links),
        ("worst missed links", &report.worst_missed_links),
    ] {
        println!("{title}:");
        for p in list {
            let fields: Vec<String> = p
                .score
                .explanation
                .iter()
                .map(|w| format!("{:?}={:?}({:+.1})", w.field, w.level, w.weight))
                .collect();
            println!(
                "  {:?} {} / {:?} {}: {:.1} [{}]",
                p.a,
                p.name_a,
                p.b,
                p.name_b,
                p.score.total,
                fields.join(" ")
            );
        }
    }
    if let Some(path) = out {
        let model = StoredModel {
            parameters: report.parameters.clone(),
            thresholds: report.thresholds,
            prior: yiqiao_registry::empi::fs::prior_from_candidates(
                report.parameters.prevalence,
                report.candidate_pairs,
                report.records,
            ),
            source: format!(
                "EM on {} synthetic records (seed {seed}), u from random pairs",
                report.records
            ),
        };
        std::fs::write(&path, model.to_json()?)?;
        println!("parameters written to {path}");
    }
    Ok(())
}
