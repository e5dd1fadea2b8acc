//! `yiqiao audit …`: verify, report, export and archive the audit trail offline.

use super::*;

fn read_public_key(path: &PathBuf) -> Result<yiqiao_sm::Sm2PublicKey, Failure> {
    yiqiao_sm::Sm2PublicKey::from_spki_pem(&read_file(path)?).map_err(|e| {
        Failure::new(
            EXIT_REJECTED,
            format!("{}: not an SM2 public key PEM: {e}", path.display()),
        )
    })
}

fn audit_signer(settings: &Settings) -> Result<yiqiao_registry::audit::AuditSigner, Failure> {
    let key = crate::audit::load_signing_key(settings, false)
        .map_err(|e| Failure::new(EXIT_CONFIG, e.to_string()))?;
    yiqiao_registry::audit::AuditSigner::new(&key)
        .map_err(|e| Failure::new(EXIT_CONFIG, format!("audit key: {e}")))
}

/// A position, or a time resolved to the first (`from`) or last (`to`) position recorded then.
fn audit_position(
    conn: &mut yiqiao_registry::store::DbConn,
    raw: Option<&str>,
    is_from: bool,
) -> Result<Option<i64>, Failure> {
    let Some(raw) = raw else { return Ok(None) };
    if let Ok(seq) = raw.parse::<i64>() {
        return Ok(Some(seq));
    }
    let t = chrono::DateTime::parse_from_rfc3339(raw)
        .map_err(|_| {
            Failure::new(
                EXIT_REJECTED,
                format!("{raw}: expected a position or an RFC 3339 time"),
            )
        })?
        .naive_utc();
    let found = if is_from {
        yiqiao_registry::audit::seq_at_or_after(conn, t)?
    } else {
        yiqiao_registry::audit::seq_at_or_before(conn, t)?
    };
    // Nothing recorded in range: an empty range.
    Ok(Some(found.unwrap_or(if is_from { i64::MAX } else { 0 })))
}

fn print_report(report: &yiqiao_registry::audit::Report, json: bool) -> Result<(), Failure> {
    if json {
        let text = serde_json::to_string_pretty(report)
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
        println!("{text}");
    }
    match report.first_problem() {
        None => {
            if !json {
                println!(
                    "audit chain OK: positions {}..{} ({} records, {} checkpoints verified){}",
                    report.first_seq.map_or("-".into(), |s| s.to_string()),
                    report.last_seq.map_or("-".into(), |s| s.to_string()),
                    report.records,
                    report.checkpoints,
                    report.archived_through.map_or(String::new(), |a| format!(
                        "; positions 1..{a} archived ({} signed manifests verified)",
                        report.archive_manifests
                    ))
                );
            }
            Ok(())
        }
        Some(first) => {
            for p in report.problems.iter().skip(1).take(20) {
                eprintln!("  also at {}: {}: {}", p.seq, p.kind.as_str(), p.detail);
            }
            Err(Failure::new(
                EXIT_TAMPERED,
                format!(
                    "audit verification FAILED at position {}: {}: {} ({} problem(s))",
                    first.seq,
                    first.kind.as_str(),
                    first.detail,
                    report.problems.len()
                ),
            ))
        }
    }
}

pub(super) fn audit(settings: &Settings, cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::VerifyExport {
            file,
            public_key,
            json,
        } => {
            let key = read_public_key(&public_key)?;
            let bundle: yiqiao_registry::audit::export::Bundle =
                serde_json::from_str(&read_file(&file)?).map_err(|e| {
                    Failure::new(
                        EXIT_TAMPERED,
                        format!("{}: not an audit export bundle: {e}", file.display()),
                    )
                })?;
            print_report(
                &yiqiao_registry::audit::export::verify_bundle(&bundle, &key),
                json,
            )
        }
        AuditCommand::Verify {
            from,
            to,
            public_key,
            json,
        } => {
            let key = match &public_key {
                Some(path) => read_public_key(path)?,
                None => audit_signer(settings)?.public_key().clone(),
            };
            let store = open_store(settings)?;
            let mut conn = store.conn()?;
            let from = audit_position(&mut conn, from.as_deref(), true)?;
            let to = audit_position(&mut conn, to.as_deref(), false)?;
            let report = yiqiao_registry::audit::verify_db(&mut conn, from, to, &key)?;
            print_report(&report, json)
        }
        AuditCommand::Report {
            from,
            to,
            format,
            out,
            public_key,
        } => {
            let (from, to) = (report_time(&from, false)?, report_time(&to, true)?);
            if from >= to {
                return Err(Failure::new(EXIT_REJECTED, "--from must be before --to"));
            }
            let key = match &public_key {
                Some(path) => read_public_key(path)?,
                None => audit_signer(settings)?.public_key().clone(),
            };
            let store = open_store(settings)?;
            let mut conn = store.conn()?;
            let data = crate::report::gather(&mut conn, from, to, &key)?;
            let text = match format {
                ReportFormat::Html => crate::report::html(&data),
                ReportFormat::Csv => crate::report::csv(&data),
            };
            match &out {
                Some(path) => std::fs::write(path, &text).map_err(|e| {
                    Failure::new(
                        EXIT_RUNTIME,
                        format!("cannot write {}: {e}", path.display()),
                    )
                })?,
                None => print!("{text}"),
            }
            if data.verified() {
                if let Some(path) = &out {
                    println!(
                        "report written to {}; chain {}",
                        path.display(),
                        data.verification_text()
                    );
                }
                Ok(())
            } else {
                Err(Failure::new(
                    EXIT_TAMPERED,
                    format!("audit verification {}", data.verification_text()),
                ))
            }
        }
        AuditCommand::Archive { before, out } => archive(settings, before, out),
        AuditCommand::Export { from, to, out } => {
            let signer = audit_signer(settings)?;
            let store = open_store(settings)?;
            let mut conn = store.conn()?;
            let from = audit_position(&mut conn, from.as_deref(), true)?;
            let to = audit_position(&mut conn, to.as_deref(), false)?;
            let bundle = yiqiao_registry::audit::export::export(&mut conn, from, to, &signer)
                .map_err(|e| match e {
                    yiqiao_registry::audit::export::ExportError::Empty(..)
                    | yiqiao_registry::audit::export::ExportError::Archived(..) => {
                        Failure::new(EXIT_NOT_FOUND, e.to_string())
                    }
                    yiqiao_registry::audit::export::ExportError::Store(s) => s.into(),
                    other => Failure::new(EXIT_RUNTIME, other.to_string()),
                })?;
            let text = serde_json::to_string_pretty(&bundle)
                .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
            std::fs::write(&out, text).map_err(|e| {
                Failure::new(EXIT_RUNTIME, format!("cannot write {}: {e}", out.display()))
            })?;
            println!(
                "exported positions {}..{} ({} records, {} checkpoints) to {}",
                bundle.records.first().map_or(0, |r| r.seq),
                bundle.records.last().map_or(0, |r| r.seq),
                bundle.records.len(),
                bundle.checkpoints.len(),
                out.display()
            );
            Ok(())
        }
    }
}

/// `yiqiao audit archive`.
pub(super) fn archive(
    settings: &Settings,
    before: Option<String>,
    out: Option<PathBuf>,
) -> Result<(), Failure> {
    use yiqiao_registry::audit::archive::{self as arc, ArchiveError};
    let before = match before.as_deref() {
        None => None,
        Some(text) => Some(arc::parse_month(text).ok_or_else(|| {
            Failure::new(EXIT_REJECTED, format!("--before {text}: expected YYYY-MM"))
        })?),
    };
    let dir = match out {
        Some(dir) => dir,
        None if !settings.audit.archive_dir.is_empty() => {
            PathBuf::from(&settings.audit.archive_dir)
        }
        None => {
            return Err(Failure::new(
                EXIT_REJECTED,
                "--out DIR is required (or configure audit.archive_dir)",
            ));
        }
    };
    let signer = audit_signer(settings)?;
    let store = open_store(settings)?;
    let created = crate::retention::ensure_partitions(&store, settings)
        .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
    for p in &created {
        println!("made partition {p}");
    }
    let opts = crate::retention::archive_options(settings, dir.clone(), before);
    let mut conn = store.conn()?;
    let run = arc::archive(&mut conn, &signer, &opts).map_err(|e| match e {
        ArchiveError::Refused(_) => Failure::new(EXIT_REJECTED, e.to_string()),
        ArchiveError::Unverified { .. } => Failure::new(EXIT_TAMPERED, e.to_string()),
        ArchiveError::Store(s) => s.into(),
        other => Failure::new(EXIT_RUNTIME, other.to_string()),
    })?;
    for name in &run.reused_files {
        println!("reused {name} (written by an interrupted run, verified)");
    }
    for m in &run.archived {
        println!(
            "archived {}: positions {}..{} ({} records) to {} (sm3 {})",
            m.month,
            m.first_seq,
            m.last_seq,
            m.record_count,
            dir.join(&m.file_name).display(),
            m.file_sm3
        );
    }
    for p in &run.dropped_empty {
        println!("dropped empty partition {p}");
    }
    if let Some(why) = &run.deferred {
        println!("deferred: {why}");
    }
    if run.archived.is_empty() && run.deferred.is_none() {
        println!(
            "nothing to archive: no records before {} (retention {} months)",
            run.cutoff.map_or("-".into(), arc::month_label),
            settings.audit.retention_months
        );
    }
    Ok(())
}
