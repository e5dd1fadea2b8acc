//! The command line: the contract scripts build on.
//!
//! Exit codes (stable):
//! - 0 success
//! - 1 runtime failure (e.g. the server stopped with an error)
//! - 2 usage error (unknown command or flag; printed by clap)
//! - 3 configuration error (unknown key, bad value, missing file)
//! - 4 database unavailable or migration failed
//! - 5 not found
//! - 6 rejected input (validation failed, duplicate, version conflict)
//! - 7 audit verification failed (the first broken position and what is wrong are printed)

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use yiqiao_registry::Store;
use yiqiao_registry::directory::{
    self, DirectoryError, InstitutionFilter, InstitutionKind, InstitutionSpec, InstitutionStatus,
    Sm2Key,
};

use crate::config::Settings;
use crate::service::offline::{OfflineAuditor, OfflineError};

pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_CONFIG: u8 = 3;
pub const EXIT_DATABASE: u8 = 4;
pub const EXIT_NOT_FOUND: u8 = 5;
pub const EXIT_REJECTED: u8 = 6;
pub const EXIT_TAMPERED: u8 = 7;

#[derive(Debug, Parser)]
#[command(
    name = "yiqiao",
    version,
    about = "Yiqiao (医桥) regional health information exchange gateway",
    long_about = "Yiqiao links a region's hospitals: institution directory, master patient index, consent, \
federated queries and a tamper-evident audit trail.\n\nExit codes: 0 ok, 1 runtime failure, 2 usage, \
3 configuration, 4 database, 5 not found, 6 rejected input, 7 audit verification failed."
)]
pub struct Cli {
    /// TOML configuration file (defaults < file < YIQIAO_* environment).
    #[arg(long, global = true, env = "YIQIAO_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway's HTTP server.
    Serve {
        /// Listen address (overrides `listen` and YIQIAO_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Run the gateway on the embedded default with a demo region registered, and print a walkthrough.
    Demo {
        /// Number of member institutions in the demo region.
        #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(3..=1000))]
        institutions: u32,
        /// Listen address (overrides `listen` and YIQIAO_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Serve a simulated region of hospital FHIR endpoints (one port, `/h/{id}/fhir`), each
    /// answer sealed in the SM envelope to the gateway key (docs/federation.md).
    Sim(Box<crate::sim::cli::SimArgs>),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage the institution directory.
    #[command(subcommand)]
    Institution(Box<InstitutionCommand>),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Master patient index: evaluation and parameter estimation.
    #[command(subcommand)]
    Mpi(MpiCommand),
    /// Verify and export the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum MpiCommand {
    /// Link a synthetic population with the engine and print precision, recall, F1 and the
    /// worst false and missed links (no database needed).
    Evaluate {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// EM over the stored candidate pairs → a new stored parameter version. Existing links
    /// (and every manual decision) are left as they are.
    Reestimate {
        /// Posterior match probability for automatic links.
        #[arg(long, default_value_t = 0.999)]
        link_posterior: f64,
        /// Posterior match probability for review.
        #[arg(long, default_value_t = 0.5)]
        review_posterior: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Bulk-register one institution's patients from a file (NDJSON of FHIR Patients, or CSV
    /// with a header row). Batched transactions; every rejected row is written with its line
    /// and reason to the rejects report; resumable from its checkpoint file. Exit 6 when rows
    /// were rejected (all others are stored).
    Import(Box<ImportArgs>),
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The file to import.
    pub file: PathBuf,
    /// Id of the registering institution (its patient_id_system namespaces the record numbers).
    #[arg(long)]
    pub institution: String,
    #[arg(long, value_enum)]
    pub format: crate::mpi_import::ImportFormat,
    /// Rows per transaction. From 256 rows on, a batch holds the EMPI writers' lock:
    /// registrations through the feeds wait for each batch's commit (about a second for
    /// 5,000 rows); below that they run alongside.
    #[arg(long, default_value_t = 5000)]
    pub batch: usize,
    /// Rejects report (CSV line,field,reason). Default: FILE.rejects.csv.
    #[arg(long)]
    pub rejects: Option<PathBuf>,
    /// Checkpoint file. Default: FILE.checkpoint.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Ignore an existing checkpoint and start from the first line.
    #[arg(long)]
    pub restart: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// CSV: read FIELD from the column named HEADER (fields: record_number, name, family,
    /// given, gender, birth_date, resident_id, phone, address). Repeatable.
    #[arg(long = "column", value_name = "FIELD=HEADER")]
    pub columns: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain and checkpoints in the database (exit 7 naming the first broken
    /// position and what is wrong).
    Verify {
        /// First position (a number) or time (RFC 3339, e.g. 2026-11-29T00:00:00Z).
        #[arg(long, value_name = "SEQ|TIME")]
        from: Option<String>,
        /// Last position or time.
        #[arg(long, value_name = "SEQ|TIME")]
        to: Option<String>,
        /// Verify checkpoints with this SM2 public key (PEM) instead of the configured key.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a signed bundle of records and checkpoints for offline verification.
    Export {
        #[arg(long, value_name = "SEQ|TIME")]
        from: Option<String>,
        #[arg(long, value_name = "SEQ|TIME")]
        to: Option<String>,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Compliance report over a period: accesses by institution, purpose and decision,
    /// refusals, break-the-glass with review status, chain verification (exit 7 when the chain
    /// of the period does not verify; the report is written anyway).
    Report {
        /// Start: a date (YYYY-MM-DD, 00:00 UTC) or an RFC 3339 time.
        #[arg(long, value_name = "DATE|TIME")]
        from: String,
        /// End: a date (that whole day is included) or an RFC 3339 time (exclusive).
        #[arg(long, value_name = "DATE|TIME")]
        to: String,
        #[arg(long, value_enum, default_value = "html")]
        format: ReportFormat,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Verify checkpoints with this SM2 public key (PEM) instead of the configured key.
        #[arg(long, value_name = "PEM")]
        public_key: Option<PathBuf>,
    },
    /// Archive whole months older than the retention window (`audit.retention_months`): each
    /// is written as a signed export bundle, read back and verified, recorded in a signed
    /// manifest row, and only then dropped (PostgreSQL partition) or deleted (SQLite).
    /// Idempotent and resumable (exit 7 when a month's records do not verify: nothing of it is
    /// dropped).
    Archive {
        /// Archive only months before this one (YYYY-MM); it may not reach into the window.
        #[arg(long, value_name = "YYYY-MM")]
        before: Option<String>,
        /// Directory for the archive files (default: `audit.archive_dir`).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Verify an exported bundle offline with only the gateway's public key (no database).
    VerifyExport {
        file: PathBuf,
        #[arg(long, value_name = "PEM")]
        public_key: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration as TOML, secrets masked.
    Show,
    /// Check the configuration (and, with --connect, that the database answers).
    Check {
        #[arg(long)]
        connect: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ReportFormat {
    Html,
    Csv,
}

/// `--from`/`--to` of a report: a date or an RFC 3339 time; a `--to` date includes that day.
fn report_time(raw: &str, is_to: bool) -> Result<chrono::NaiveDateTime, Failure> {
    crate::report::period_bound(raw, is_to).ok_or_else(|| {
        Failure::new(
            EXIT_REJECTED,
            format!("{raw}: expected a date (YYYY-MM-DD) or an RFC 3339 time"),
        )
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum InstitutionCommand {
    /// Register an institution.
    Add(Box<AddInstitution>),
    /// List institutions.
    List {
        #[arg(long, value_parser = ["active", "suspended"])]
        status: Option<String>,
        #[arg(long, value_parser = ["hospital", "internet_hospital", "public_health", "regional_platform"])]
        kind: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: OutputFormat,
    },
    /// Show one institution.
    Show {
        id: String,
        #[arg(long, value_enum, default_value = "json")]
        format: OutputFormat,
    },
    /// Suspend an institution (no tokens, not queried).
    Suspend { id: String },
    /// Reactivate a suspended institution.
    Activate { id: String },
}

#[derive(Debug, Args)]
pub struct AddInstitution {
    /// Read the whole registration from a JSON file (same shape as POST /admin/institutions).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["id", "name"])]
    pub from_json: Option<PathBuf>,
    #[arg(long, required_unless_present = "from_json")]
    pub id: Option<String>,
    #[arg(long, required_unless_present = "from_json")]
    pub name: Option<String>,
    /// Unified social credit code (GB 32100).
    #[arg(long, required_unless_present = "from_json")]
    pub uscc: Option<String>,
    /// 6-digit administrative division code.
    #[arg(long, required_unless_present = "from_json")]
    pub region_code: Option<String>,
    #[arg(long, default_value = "unrated")]
    pub level: String,
    #[arg(long, default_value = "hospital")]
    pub kind: String,
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Identifier system of the institution's patient record numbers.
    #[arg(long, required_unless_present = "from_json")]
    pub patient_id_system: Option<String>,
    /// Allowed SMART scope (repeatable).
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// SM2 public key as KID=PEMFILE (repeatable).
    #[arg(long = "sm2-key", value_name = "KID=PEMFILE")]
    pub sm2_keys: Vec<String>,
    /// JWKS file with RS/ES public keys.
    #[arg(long, value_name = "FILE")]
    pub jwks: Option<PathBuf>,
    #[arg(long)]
    pub require_sm_envelope: bool,
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<DirectoryError> for Failure {
    fn from(err: DirectoryError) -> Failure {
        match &err {
            DirectoryError::NotFound(_) => Failure::new(EXIT_NOT_FOUND, err.to_string()),
            DirectoryError::Invalid(_)
            | DirectoryError::Duplicate { .. }
            | DirectoryError::VersionMismatch { .. } => {
                Failure::new(EXIT_REJECTED, err.to_string())
            }
            DirectoryError::Store(_) => Failure::new(EXIT_DATABASE, err.to_string()),
        }
    }
}

impl From<yiqiao_registry::StoreError> for Failure {
    fn from(err: yiqiao_registry::StoreError) -> Failure {
        Failure::new(EXIT_DATABASE, err.to_string())
    }
}

/// Parse arguments and run; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("yiqiao: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn load_settings(cli: &Cli) -> Result<Settings, Failure> {
    Settings::load(cli.config.as_deref()).map_err(|e| Failure::new(EXIT_CONFIG, e.to_string()))
}

/// Options for one-shot commands: a small pool that opens no connection in the background
/// (r2d2 worker threads still connecting while the process exits can crash inside libpq/OpenSSL).
fn cli_store_options(settings: &Settings) -> yiqiao_registry::StoreOptions {
    let mut opts = settings.store_options();
    opts.pool_size = 2;
    opts.min_idle = Some(0);
    opts
}

fn open_store(settings: &Settings) -> Result<Store, Failure> {
    let store = Store::open(&cli_store_options(settings))?;
    store
        .migrate()
        .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
    Ok(store)
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    let mut settings = load_settings(&cli)?;
    match cli.command {
        Command::Serve { listen } => {
            if let Some(addr) = listen {
                settings.listen = addr;
            }
            serve(settings)
        }
        Command::Demo {
            institutions,
            listen,
        } => {
            if let Some(addr) = listen {
                settings.listen = addr;
            }
            crate::demo::run(settings, institutions)
        }
        Command::Sim(args) => crate::sim::cli::run(&settings, *args),
        Command::Migrate => {
            let store = Store::open(&cli_store_options(&settings))?;
            let applied = store
                .migrate()
                .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
            if applied.is_empty() {
                println!("database is up to date ({})", store.backend().name());
            } else {
                for version in &applied {
                    println!("applied {version}");
                }
                println!(
                    "{} migration(s) applied ({})",
                    applied.len(),
                    store.backend().name()
                );
            }
            Ok(())
        }
        Command::Config(ConfigCommand::Show) => {
            let text = settings
                .to_redacted_toml()
                .map_err(|e| Failure::new(EXIT_CONFIG, e.to_string()))?;
            print!("{text}");
            Ok(())
        }
        Command::Config(ConfigCommand::Check { connect }) => {
            if connect {
                let store = Store::open(&cli_store_options(&settings))?;
                store.ping(std::time::Duration::from_millis(
                    settings.database.acquire_timeout_ms,
                ))?;
                println!(
                    "configuration OK; {} database answers",
                    store.backend().name()
                );
            } else {
                println!("configuration OK");
            }
            Ok(())
        }
        Command::Institution(cmd) => institution(&settings, *cmd),
        Command::Mpi(cmd) => mpi(&settings, cmd),
        Command::Audit(cmd) => audit(&settings, cmd),
    }
}

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

fn audit(settings: &Settings, cmd: AuditCommand) -> Result<(), Failure> {
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
fn archive(
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

fn mpi(settings: &Settings, cmd: MpiCommand) -> Result<(), Failure> {
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

fn import(settings: &Settings, args: ImportArgs) -> Result<(), Failure> {
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

pub fn serve(settings: Settings) -> Result<(), Failure> {
    let _telemetry = crate::telemetry::init(&settings.log, &settings.telemetry)
        .map_err(|e| Failure::new(crate::cli::EXIT_CONFIG, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    runtime.block_on(async move {
        let listen = settings.listen;
        let app = crate::app::Application::build(settings).await.map_err(|e| {
            let text = format!("{e:#}");
            let code = if text.contains("migration") || text.contains("database") { EXIT_DATABASE } else { EXIT_RUNTIME };
            Failure::new(code, text)
        })?;
        tracing::info!(%listen, port = app.port(), backend = app.state().store.backend().name(), "serving");
        app.run().await.map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))
    })
}

/// The audited-change primitive of the command line (`cli:<user>`).
fn offline(settings: &Settings, store: &yiqiao_registry::Store) -> Result<OfflineAuditor, Failure> {
    OfflineAuditor::open(settings, store.clone(), OfflineAuditor::cli_operator())
        .map_err(|e| Failure::new(EXIT_CONFIG, format!("{e:#}")))
}

impl<E: Into<Failure> + std::fmt::Display> From<OfflineError<E>> for Failure {
    fn from(e: OfflineError<E>) -> Failure {
        match e {
            OfflineError::Change(e) => e.into(),
            other => Failure::new(EXIT_DATABASE, other.to_string()),
        }
    }
}

fn institution(settings: &Settings, cmd: InstitutionCommand) -> Result<(), Failure> {
    let store = open_store(settings)?;
    let mut conn = store.conn()?;
    match cmd {
        InstitutionCommand::Add(add) => {
            let spec = spec_from_args(*add)?;
            let valid = directory::validate(&spec).map_err(DirectoryError::from)?;
            let auditor = offline(settings, &store)?;
            let event = auditor.event("create", "C", format!("Organization/{}", valid.id()));
            let inst = auditor.change(event, |tx, _| directory::create(tx, &valid))?;
            println!(
                "registered {} ({}), version {}",
                inst.id, inst.name, inst.version
            );
            Ok(())
        }
        InstitutionCommand::List {
            status,
            kind,
            format,
        } => {
            let filter = InstitutionFilter {
                status: status.map(|s| {
                    if s == "active" {
                        InstitutionStatus::Active
                    } else {
                        InstitutionStatus::Suspended
                    }
                }),
                kind: kind.and_then(|k| InstitutionKind::parse(&k).ok()),
                limit: 1000,
                ..InstitutionFilter::default()
            };
            let list = directory::list(&mut conn, &filter)?;
            let mut out = std::io::stdout().lock();
            match format {
                OutputFormat::Json => {
                    let text = serde_json::to_string_pretty(&list)
                        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
                    let _ = writeln!(out, "{text}");
                }
                OutputFormat::Table => {
                    let _ = writeln!(
                        out,
                        "{:<24} {:<10} {:<18} {:<6} {:<18} NAME",
                        "ID", "STATUS", "KIND", "LEVEL", "USCC"
                    );
                    for i in &list {
                        let _ = writeln!(
                            out,
                            "{:<24} {:<10} {:<18} {:<6} {:<18} {}",
                            i.id,
                            i.status.as_str(),
                            i.kind.as_str(),
                            i.level,
                            i.uscc,
                            i.name
                        );
                    }
                    let _ = writeln!(out, "{} institution(s)", list.len());
                }
            }
            Ok(())
        }
        InstitutionCommand::Show { id, format } => {
            let inst = directory::get(&mut conn, &id)?;
            match format {
                OutputFormat::Json => {
                    let text = serde_json::to_string_pretty(&inst)
                        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
                    println!("{text}");
                }
                OutputFormat::Table => {
                    println!("id:                {}", inst.id);
                    println!("name:              {}", inst.name);
                    println!("status:            {}", inst.status.as_str());
                    println!("kind / level:      {} / {}", inst.kind.as_str(), inst.level);
                    println!("uscc:              {}", inst.uscc);
                    println!("region:            {}", inst.region_code);
                    println!(
                        "endpoint:          {}",
                        inst.endpoint_url.as_deref().unwrap_or("-")
                    );
                    println!("patient id system: {}", inst.patient_id_system);
                    println!("scopes:            {}", inst.allowed_scopes.join(" "));
                    println!("version:           {}", inst.version);
                }
            }
            Ok(())
        }
        InstitutionCommand::Suspend { id } => {
            let auditor = offline(settings, &store)?;
            let event = auditor.event("update", "U", format!("Organization/{id}"));
            let inst = auditor.change(event, |tx, _| {
                directory::set_status(tx, &id, InstitutionStatus::Suspended, None)
            })?;
            println!("{} is suspended (version {})", inst.id, inst.version);
            Ok(())
        }
        InstitutionCommand::Activate { id } => {
            let auditor = offline(settings, &store)?;
            let event = auditor.event("update", "U", format!("Organization/{id}"));
            let inst = auditor.change(event, |tx, _| {
                directory::set_status(tx, &id, InstitutionStatus::Active, None)
            })?;
            println!("{} is active (version {})", inst.id, inst.version);
            Ok(())
        }
    }
}

fn read_file(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            EXIT_REJECTED,
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

fn spec_from_args(add: AddInstitution) -> Result<InstitutionSpec, Failure> {
    if let Some(path) = &add.from_json {
        let text = read_file(path)?;
        let input: crate::routes::institutions::InstitutionInput =
            crate::extract::parse_json(text.as_bytes()).map_err(|e| {
                Failure::new(EXIT_REJECTED, format!("{}: {}", path.display(), e.message))
            })?;
        return Ok(input.into_spec());
    }
    let mut sm2_keys = Vec::new();
    for entry in &add.sm2_keys {
        let (kid, file) = entry.split_once('=').ok_or_else(|| {
            Failure::new(
                EXIT_REJECTED,
                format!("--sm2-key {entry}: expected KID=PEMFILE"),
            )
        })?;
        sm2_keys.push(Sm2Key {
            kid: kid.to_string(),
            pem: read_file(&PathBuf::from(file))?,
        });
    }
    let jwks = match &add.jwks {
        None => None,
        Some(path) => Some(serde_json::from_str(&read_file(path)?).map_err(|e| {
            Failure::new(EXIT_REJECTED, format!("{}: not JSON: {e}", path.display()))
        })?),
    };
    Ok(InstitutionSpec {
        id: add.id.unwrap_or_default(),
        name: add.name.unwrap_or_default(),
        uscc: add.uscc.unwrap_or_default(),
        region_code: add.region_code.unwrap_or_default(),
        level: add.level,
        kind: add.kind,
        endpoint_url: add.endpoint_url,
        jwks,
        sm2_keys,
        patient_id_system: add.patient_id_system.unwrap_or_default(),
        allowed_scopes: add.scopes,
        require_sm_envelope: add.require_sm_envelope,
    })
}
