//! `yiqiao mpi …`: the identity index from the command line (import, re-estimation, …).

use super::*;

pub(super) fn mpi(settings: &Settings, cmd: MpiCommand) -> Result<(), Failure> {
    use yiqiao_registry::empi::evaluate::{EvaluationConfig, evaluate};
    use yiqiao_registry::empi::store as empi;
    match cmd {
        MpiCommand::Evaluate { records, seed } => {
            if records < 2 {
                return Err(Failure::new(EXIT_REJECTED, "--records must be at least 2"));
            }
            let report = evaluate(&EvaluationConfig::new(records, seed))
                .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
            println!(
                "records {}  persons {}  candidate pairs {}  blocking recall {:.5}",
                report.records, report.persons, report.candidate_pairs, report.blocking_recall
            );
            println!(
                "auto-links {}  reviews {}  thresholds auto-link {:.2} review {:.2}",
                report.auto_links,
                report.reviews,
                report.thresholds.auto_link,
                report.thresholds.review
            );
            println!(
                "precision {:.5}  recall {:.5}  F1 {:.5}",
                report.precision, report.recall, report.f1
            );
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
                        "  {} / {}: {:.1} [{}]",
                        p.name_a,
                        p.name_b,
                        p.score.total,
                        fields.join(" ")
                    );
                }
            }
            Ok(())
        }
        MpiCommand::Import(args) => import(settings, *args),
        MpiCommand::Reestimate {
            link_posterior,
            review_posterior,
            seed,
        } => {
            let ok = |p: f64| p > 0.0 && p < 1.0;
            if !ok(link_posterior) || !ok(review_posterior) || review_posterior > link_posterior {
                return Err(Failure::new(
                    EXIT_REJECTED,
                    "posteriors must be in (0, 1) with review ≤ link",
                ));
            }
            let store = open_store(settings)?;
            let auditor = offline(settings, &store)?;
            let event = auditor.event("update", "U", "EmpiModel/current".into());
            let done = auditor
                .change(event, |tx, _| {
                    empi::reestimate(tx, link_posterior, review_posterior, seed)
                })
                .map_err(|e| match e {
                    OfflineError::Change(empi::EmpiError::Model(m)) => {
                        Failure::new(EXIT_REJECTED, m.to_string())
                    }
                    other => Failure::new(EXIT_DATABASE, other.to_string()),
                })?;
            println!(
                "stored match parameters version {} (EM on {} candidate pairs of {} records); \
                 thresholds auto-link {:.2} review {:.2}",
                done.version,
                done.candidate_pairs,
                done.records,
                done.model.thresholds.auto_link,
                done.model.thresholds.review
            );
            Ok(())
        }
    }
}

pub(super) fn import(settings: &Settings, args: ImportArgs) -> Result<(), Failure> {
    use crate::mpi_import::{ImportError, ImportOptions};
    let suffixed = |ext: &str| {
        let mut p = args.file.clone().into_os_string();
        p.push(ext);
        PathBuf::from(p)
    };
    let mut columns = std::collections::BTreeMap::new();
    for c in &args.columns {
        let (field, header) = c.split_once('=').ok_or_else(|| {
            Failure::new(
                EXIT_REJECTED,
                format!("--column {c}: expected FIELD=HEADER"),
            )
        })?;
        columns.insert(field.trim().to_string(), header.trim().to_string());
    }
    let opts = ImportOptions {
        format: args.format,
        batch: args.batch,
        rejects: args.rejects.unwrap_or_else(|| suffixed(".rejects.csv")),
        checkpoint: args.checkpoint.unwrap_or_else(|| suffixed(".checkpoint")),
        restart: args.restart,
        progress: !args.no_progress,
        columns,
        resident_system: settings.empi.resident_id_system.clone(),
        file: args.file,
    };
    let store = open_store(settings)?;
    let institution = {
        let mut conn = store.conn()?;
        directory::get(&mut conn, &args.institution)?
    };
    if !institution.is_active() {
        return Err(Failure::new(
            EXIT_REJECTED,
            format!("institution {} is not active", institution.id),
        ));
    }
    let auditor = offline(settings, &store)?;
    let summary =
        crate::mpi_import::import(&auditor, &institution, &opts).map_err(|e| match e {
            ImportError::Rejected(m) => Failure::new(EXIT_REJECTED, m),
            ImportError::Io(m) => Failure::new(EXIT_RUNTIME, m),
            ImportError::Database(m) => Failure::new(
                EXIT_DATABASE,
                format!("{m} (committed batches are kept; re-run to resume)"),
            ),
        })?;
    let rate = summary.rows as f64 / summary.seconds.max(1e-3);
    println!(
        "imported {} rows in {:.1} s ({rate:.0} rows/s){}: created {}, updated {}, unchanged {}, rejected {}",
        summary.rows,
        summary.seconds,
        if summary.resumed_after > 0 {
            format!(", resumed after line {}", summary.resumed_after)
        } else {
            String::new()
        },
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.rejected
    );
    if summary.rejected > 0 {
        return Err(Failure::new(
            EXIT_REJECTED,
            format!(
                "{} rows rejected; see {}",
                summary.rejected,
                opts.rejects.display()
            ),
        ));
    }
    Ok(())
}
