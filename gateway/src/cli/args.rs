//! The subcommands' arguments (clap).

use super::*;

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
pub(super) fn report_time(raw: &str, is_to: bool) -> Result<chrono::NaiveDateTime, Failure> {
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
