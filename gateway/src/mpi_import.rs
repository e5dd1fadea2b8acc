//! `yiqiao mpi import`: bulk registration of one institution's patients from a file
//! (docs/empi.md, "Bulk import").
//!
//! - Formats: NDJSON of FHIR Patients (one per line, as `POST /fhir/Patient` takes them) and
//!   CSV with a header row ([`CSV_FIELDS`], header names mappable with `--column`).
//! - Rows are registered in batches, one database transaction per batch; a row the store
//!   refuses (invalid, identifier of another institution) is refused before it writes
//!   anything and reported, never half-stored. After the first batch and whenever the rows
//!   loaded have doubled, the planner statistics of the EMPI tables are refreshed.
//! - The rejects report (CSV: `line,field,reason`) names every row not stored.
//! - Resumable: after each committed batch a checkpoint file records the last committed line
//!   and the length of the rejects report; a re-run continues after that line (and truncates
//!   the report to that length, so a crash between the two writes leaves no duplicate).
//!   Registration is idempotent on the record number anyway.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use yiqiao_registry::audit::EntityRef;
use yiqiao_registry::directory::Institution;
use yiqiao_registry::empi::store::{self as empi, Registration, RegistrationOutcome};
use yiqiao_registry::store::DbConn;

use crate::service::offline::OfflineAuditor;

use crate::routes::patients::registration;

/// CSV fields (the header names unless `--column FIELD=HEADER` maps them). `record_number`
/// is required; a name is required as `name` or `family`/`given`.
pub const CSV_FIELDS: [&str; 9] = [
    "record_number",
    "name",
    "family",
    "given",
    "gender",
    "birth_date",
    "resident_id",
    "phone",
    "address",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    Ndjson,
    Csv,
}

#[derive(Debug)]
pub struct ImportOptions {
    pub file: PathBuf,
    pub format: ImportFormat,
    pub batch: usize,
    pub rejects: PathBuf,
    pub checkpoint: PathBuf,
    /// Ignore an existing checkpoint (start from the first line, empty rejects report).
    pub restart: bool,
    pub progress: bool,
    /// `FIELD` → header name (CSV).
    pub columns: BTreeMap<String, String>,
    pub resident_system: String,
}

#[derive(Debug, Default, Serialize)]
pub struct ImportSummary {
    pub rows: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// Line the run started after (0: from the start).
    pub resumed_after: u64,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Input that cannot be imported at all (unreadable file, bad header, other file).
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Io(String),
    #[error("database: {0}")]
    Database(String),
}

fn io(path: &Path, e: std::io::Error) -> ImportError {
    ImportError::Io(format!("{}: {e}", path.display()))
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    /// Fingerprint of the file's first 64 KiB (FNV-1a) and its name: a checkpoint of another
    /// file is refused.
    fingerprint: String,
    /// Last line whose batch is committed.
    line: u64,
    rejects_len: u64,
    created: u64,
    updated: u64,
    unchanged: u64,
    rejected: u64,
}

fn fingerprint(path: &Path) -> Result<String, ImportError> {
    let mut head = vec![0u8; 64 * 1024];
    let mut f = File::open(path).map_err(|e| io(path, e))?;
    let mut n = 0;
    loop {
        let got = f.read(&mut head[n..]).map_err(|e| io(path, e))?;
        if got == 0 || n + got == head.len() {
            n += got;
            break;
        }
        n += got;
    }
    let h = head[..n].iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    Ok(format!("{h:016x}"))
}

/// A row read from the file: its line and either a Patient or why it is not one.
struct Row {
    line: u64,
    /// Byte offset after the row (progress).
    offset: u64,
    patient: Result<Value, (String, String)>,
}

/// Reads rows of either format.
enum Reader {
    Ndjson {
        lines: BufReader<File>,
        line: u64,
        offset: u64,
        buf: String,
    },
    Csv {
        records: csv::Reader<BufReader<File>>,
        columns: BTreeMap<&'static str, usize>,
    },
}

impl Reader {
    fn open(opts: &ImportOptions) -> Result<Reader, ImportError> {
        let file = File::open(&opts.file).map_err(|e| io(&opts.file, e))?;
        let buffered = BufReader::with_capacity(256 * 1024, file);
        match opts.format {
            ImportFormat::Ndjson => Ok(Reader::Ndjson {
                lines: buffered,
                line: 0,
                offset: 0,
                buf: String::new(),
            }),
            ImportFormat::Csv => {
                let mut records = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .flexible(false)
                    .from_reader(buffered);
                let headers = records
                    .headers()
                    .map_err(|e| ImportError::Rejected(format!("CSV header: {e}")))?
                    .clone();
                for field in opts.columns.keys() {
                    if !CSV_FIELDS.contains(&field.as_str()) {
                        return Err(ImportError::Rejected(format!(
                            "--column {field}=…: unknown field (fields: {})",
                            CSV_FIELDS.join(", ")
                        )));
                    }
                }
                let mut columns = BTreeMap::new();
                for field in CSV_FIELDS {
                    let name = opts.columns.get(field).map(String::as_str).unwrap_or(field);
                    if let Some(i) = headers.iter().position(|h| h.trim() == name) {
                        columns.insert(field, i);
                    } else if opts.columns.contains_key(field) {
                        return Err(ImportError::Rejected(format!(
                            "CSV header has no column {name:?} (mapped to {field})"
                        )));
                    }
                }
                let known: Vec<&str> = CSV_FIELDS
                    .iter()
                    .map(|f| opts.columns.get(*f).map(String::as_str).unwrap_or(f))
                    .collect();
                if let Some(unknown) = headers.iter().find(|h| !known.contains(&h.trim())) {
                    return Err(ImportError::Rejected(format!(
                        "CSV header: unknown column {unknown:?} (fields: {}; map others with --column FIELD=HEADER)",
                        CSV_FIELDS.join(", ")
                    )));
                }
                if !columns.contains_key("record_number") {
                    return Err(ImportError::Rejected(
                        "CSV header: the column record_number is required".into(),
                    ));
                }
                if !columns.contains_key("name") && !columns.contains_key("family") {
                    return Err(ImportError::Rejected(
                        "CSV header: a name column is required (name, or family and given)".into(),
                    ));
                }
                Ok(Reader::Csv { records, columns })
            }
        }
    }

    fn next(
        &mut self,
        institution: &Institution,
        resident_system: &str,
    ) -> Result<Option<Row>, ImportError> {
        match self {
            Reader::Ndjson {
                lines,
                line,
                offset,
                buf,
            } => loop {
                buf.clear();
                let n = match lines.read_line(buf) {
                    Ok(n) => n,
                    // Not UTF-8: report the line, go on with the next.
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        *line += 1;
                        let mut skip = Vec::new();
                        let n = lines
                            .read_until(b'\n', &mut skip)
                            .map_err(|e| ImportError::Io(e.to_string()))?;
                        *offset += n as u64;
                        return Ok(Some(Row {
                            line: *line,
                            offset: *offset,
                            patient: Err(("".into(), "the line is not UTF-8".into())),
                        }));
                    }
                    Err(e) => return Err(ImportError::Io(e.to_string())),
                };
                if n == 0 {
                    return Ok(None);
                }
                *line += 1;
                *offset += n as u64;
                let text = buf.trim();
                if text.is_empty() {
                    continue;
                }
                let patient = serde_json::from_str::<Value>(text)
                    .map_err(|e| ("".to_string(), format!("not JSON: {e}")));
                return Ok(Some(Row {
                    line: *line,
                    offset: *offset,
                    patient,
                }));
            },
            Reader::Csv { records, columns } => {
                let mut record = csv::StringRecord::new();
                match records.read_record(&mut record) {
                    Ok(false) => Ok(None),
                    Ok(true) => {
                        let line = record.position().map_or(0, |p| p.line());
                        Ok(Some(Row {
                            line,
                            offset: records.position().byte(),
                            patient: csv_patient(&record, columns, institution, resident_system),
                        }))
                    }
                    Err(e) => {
                        let line = e.position().map_or(0, |p| p.line());
                        if matches!(
                            e.kind(),
                            csv::ErrorKind::Io(_)
                                | csv::ErrorKind::Seek
                                | csv::ErrorKind::Serialize(_)
                        ) {
                            return Err(ImportError::Io(e.to_string()));
                        }
                        Ok(Some(Row {
                            line,
                            offset: records.position().byte(),
                            patient: Err(("".into(), format!("CSV: {e}"))),
                        }))
                    }
                }
            }
        }
    }
}

/// A CSV row → FHIR Patient (so CSV and NDJSON take the same mapping and validation).
fn csv_patient(
    record: &csv::StringRecord,
    columns: &BTreeMap<&'static str, usize>,
    institution: &Institution,
    resident_system: &str,
) -> Result<Value, (String, String)> {
    let get = |f: &str| {
        columns
            .get(f)
            .and_then(|i| record.get(*i))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let bad = |f: &str, m: String| (f.to_string(), m);
    let number = get("record_number")
        .ok_or_else(|| bad("record_number", "the record number is required".to_string()))?;
    let mut identifiers = vec![json!({ "system": institution.patient_id_system, "value": number })];
    if let Some(r) = get("resident_id") {
        identifiers.push(json!({ "system": resident_system, "value": r }));
    }
    let mut name = json!({ "use": "official" });
    if let Some(t) = get("name") {
        name["text"] = json!(t);
    }
    if let Some(f) = get("family") {
        name["family"] = json!(f);
    }
    if let Some(g) = get("given") {
        name["given"] = json!(g.split_whitespace().collect::<Vec<_>>());
    }
    let mut p = json!({
        "resourceType": "Patient",
        "identifier": identifiers,
        "name": [name],
    });
    if let Some(g) = get("gender") {
        let gender = match g.to_ascii_lowercase().as_str() {
            "m" | "male" | "男" | "1" => "male",
            "f" | "female" | "女" | "2" => "female",
            "o" | "other" => "other",
            "u" | "unknown" | "0" | "9" => "unknown",
            _ => {
                return Err(bad(
                    "gender",
                    format!("gender {g:?} is not male, female, other or unknown (M/F/男/女/1/2)"),
                ));
            }
        };
        p["gender"] = json!(gender);
    }
    if let Some(b) = get("birth_date") {
        let iso = if b.len() == 8 && b.bytes().all(|c| c.is_ascii_digit()) {
            format!("{}-{}-{}", &b[..4], &b[4..6], &b[6..])
        } else {
            b.to_string()
        };
        p["birthDate"] = json!(iso);
    }
    if let Some(ph) = get("phone") {
        p["telecom"] = json!([{ "system": "phone", "value": ph }]);
    }
    if let Some(a) = get("address") {
        p["address"] = json!([{ "text": a }]);
    }
    Ok(p)
}

/// CSV field named by a FHIR path of the registration's validation.
fn csv_field(fhir: &str) -> &'static str {
    if fhir.starts_with("Patient.name") {
        "name"
    } else if fhir.starts_with("Patient.birthDate") {
        "birth_date"
    } else if fhir.starts_with("Patient.gender") {
        "gender"
    } else if fhir.starts_with("Patient.identifier") {
        "record_number"
    } else {
        ""
    }
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A row's line and its registration, or the (field, reason) it is refused for.
pub type CheckedRow = (u64, Result<Registration, (String, String)>);

/// Every row of an import file as the registration it would make, or the (field, reason) it
/// would be refused for: the reading, mapping and validation of [`import`] without the
/// registry (the fuzz target `fuzz/fuzz_targets/mpi_csv.rs` runs hostile files through it).
pub fn check_rows(
    opts: &ImportOptions,
    institution: &Institution,
) -> Result<Vec<CheckedRow>, ImportError> {
    let mut reader = Reader::open(opts)?;
    let mut rows = Vec::new();
    while let Some(row) = reader.next(institution, &opts.resident_system)? {
        rows.push((
            row.line,
            registration_of_row(row.patient, institution, opts),
        ));
    }
    Ok(rows)
}

/// A row's patient as a registration, or the (field, reason) it is refused for; CSV rows name
/// the CSV column.
fn registration_of_row(
    patient: Result<Value, (String, String)>,
    institution: &Institution,
    opts: &ImportOptions,
) -> Result<Registration, (String, String)> {
    patient.and_then(|p| {
        registration(institution, p, None, &opts.resident_system).map_err(|e| {
            let field = e.field.clone().unwrap_or_default();
            let field = match opts.format {
                ImportFormat::Csv => csv_field(&field).to_string(),
                ImportFormat::Ndjson => field,
            };
            (field, e.message)
        })
    })
}

/// The checkpoint of an earlier run of this import, unless `--restart`: refused when it
/// belongs to another file (by fingerprint) or cannot be read.
fn previous_checkpoint(
    opts: &ImportOptions,
    print: &str,
) -> Result<Option<Checkpoint>, ImportError> {
    let previous: Option<Checkpoint> = if opts.restart {
        None
    } else {
        match std::fs::read_to_string(&opts.checkpoint) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                ImportError::Rejected(format!(
                    "checkpoint {} is not readable ({e}); use --restart to start over",
                    opts.checkpoint.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&opts.checkpoint, e)),
        }
    };
    if let Some(cp) = &previous
        && cp.fingerprint != *print
    {
        return Err(ImportError::Rejected(format!(
            "checkpoint {} belongs to another file; use --restart to start over",
            opts.checkpoint.display()
        )));
    }
    Ok(previous)
}

/// Import the file; `institution` must be active.
pub fn import(
    auditor: &OfflineAuditor,
    institution: &Institution,
    opts: &ImportOptions,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let print = fingerprint(&opts.file)?;
    let total_bytes = std::fs::metadata(&opts.file)
        .map_err(|e| io(&opts.file, e))?
        .len();
    let previous = previous_checkpoint(opts, &print)?;
    let mut rejects = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&opts.rejects)
        .map_err(|e| io(&opts.rejects, e))?;
    let rejects_start = previous.as_ref().map_or(0, |c| c.rejects_len);
    rejects
        .set_len(rejects_start)
        .map_err(|e| io(&opts.rejects, e))?;
    rejects
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| io(&opts.rejects, e))?;
    if rejects_start == 0 {
        rejects
            .write_all(b"line,field,reason\n")
            .map_err(|e| io(&opts.rejects, e))?;
    }
    let mut summary = ImportSummary {
        resumed_after: previous.as_ref().map_or(0, |c| c.line),
        created: previous.as_ref().map_or(0, |c| c.created),
        updated: previous.as_ref().map_or(0, |c| c.updated),
        unchanged: previous.as_ref().map_or(0, |c| c.unchanged),
        rejected: previous.as_ref().map_or(0, |c| c.rejected),
        ..ImportSummary::default()
    };
    let skip_to = summary.resumed_after;

    let bar = if opts.progress {
        ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {percent:>3}% {bytes}/{total_bytes} {msg}",
        )
        .map_err(|e| ImportError::Io(e.to_string()))?,
    );
    bar.enable_steady_tick(Duration::from_millis(250));

    let mut conn = auditor
        .store()
        .conn()
        .map_err(|e| ImportError::Database(e.to_string()))?;
    empi::bulk_load_session(&mut conn).map_err(|e| ImportError::Database(e.to_string()))?;
    let mut reader = Reader::open(opts)?;
    let actor = format!("import:{}", institution.id);
    let batch_size = opts.batch.max(1);
    let mut done_rows = 0u64;
    let mut statistics = empi::StatisticsSchedule::default();
    let run_started = Instant::now();
    loop {
        // Read one batch.
        let mut batch: Vec<ParsedRow> = Vec::new();
        let mut last_line = 0;
        let mut last_offset = 0;
        while batch.len() < batch_size {
            let Some(row) = reader.next(institution, &opts.resident_system)? else {
                break;
            };
            last_line = row.line;
            last_offset = row.offset;
            if row.line <= skip_to {
                continue;
            }
            batch.push((
                row.line,
                registration_of_row(row.patient, institution, opts),
            ));
        }
        bar.set_position(last_offset);
        if batch.is_empty() {
            if last_line == 0 {
                break;
            }
            continue;
        }
        let outcomes = commit_batch(auditor, &mut conn, institution, &batch, &actor)?;
        let mut report = String::new();
        for ((line, _), outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok(RegistrationOutcome::Created) => summary.created += 1,
                Ok(RegistrationOutcome::Updated) => summary.updated += 1,
                Ok(RegistrationOutcome::Unchanged) => summary.unchanged += 1,
                Err((field, reason)) => {
                    summary.rejected += 1;
                    report.push_str(&format!(
                        "{line},{},{}\n",
                        csv_escape(&field),
                        csv_escape(&reason)
                    ));
                }
            }
        }
        done_rows += batch.len() as u64;
        statistics
            .after_batch(&mut conn, done_rows)
            .map_err(|e| ImportError::Database(e.to_string()))?;
        rejects
            .write_all(report.as_bytes())
            .map_err(|e| io(&opts.rejects, e))?;
        rejects.sync_data().map_err(|e| io(&opts.rejects, e))?;
        let rejects_len = rejects
            .stream_position()
            .map_err(|e| io(&opts.rejects, e))?;
        let cp = Checkpoint {
            fingerprint: print.clone(),
            line: last_line,
            rejects_len,
            created: summary.created,
            updated: summary.updated,
            unchanged: summary.unchanged,
            rejected: summary.rejected,
        };
        write_checkpoint(&opts.checkpoint, &cp)?;
        let secs = run_started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{done_rows} rows, {:.0} rows/s, {} rejected",
            done_rows as f64 / secs,
            summary.rejected
        ));
    }
    bar.finish_and_clear();
    summary.rows = done_rows;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Write the checkpoint atomically (temp file + rename).
fn write_checkpoint(path: &Path, cp: &Checkpoint) -> Result<(), ImportError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(cp).map_err(|e| ImportError::Io(e.to_string()))?;
    let mut f = File::create(&tmp).map_err(|e| io(&tmp, e))?;
    f.write_all(&text).map_err(|e| io(&tmp, e))?;
    f.sync_data().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

type RowOutcome = Result<RegistrationOutcome, (String, String)>;
/// A row's line and its registration, or (field, reason) why it has none.
type ParsedRow = (u64, Result<Registration, (String, String)>);

/// One transaction for the batch (`empi::register_batch`) with its audit record: the
/// institution, the lines and what they did (one record per batch, not per row, so that a
/// million-row import is not a million audit records; the registry's links and events keep
/// the per-record detail).
fn commit_batch(
    auditor: &OfflineAuditor,
    conn: &mut DbConn,
    institution: &Institution,
    batch: &[ParsedRow],
    actor: &str,
) -> Result<Vec<RowOutcome>, ImportError> {
    let valid: Vec<&Registration> = batch.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    let (first, last) = (
        batch.first().map_or(0, |(l, _)| *l),
        batch.last().map_or(0, |(l, _)| *l),
    );
    let mut event = auditor.event("batch", "C", format!("Organization/{}", institution.id));
    event.agent_institution = Some(institution.id.to_string());
    let mut stored = auditor
        .change_many_on(conn, |tx| {
            let stored = empi::register_batch(tx, &valid, actor)?;
            let registered = stored.iter().filter(|r| r.is_ok()).count();
            event.entities.push(EntityRef::query(format!(
                "mpi import lines {first}-{last}: {registered} of {} rows registered",
                batch.len()
            )));
            Ok::<_, empi::EmpiError>((stored, vec![event]))
        })
        .map_err(|e| ImportError::Database(e.to_string()))?
        .into_iter();
    Ok(batch
        .iter()
        .map(|(_, reg)| match reg {
            Err(e) => Err(e.clone()),
            Ok(_) => match stored.next() {
                Some(Ok(outcome)) => Ok(outcome),
                Some(Err(empi::EmpiError::Invalid { field, message })) => {
                    Err((field.to_string(), message))
                }
                Some(Err(e)) => Err(("record_number".to_string(), e.to_string())),
                None => Err((String::new(), "not processed".to_string())),
            },
        })
        .collect())
}
