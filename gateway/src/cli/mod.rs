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

mod args;
mod audit;
mod institution;
mod mpi;

pub use args::*;
use audit::*;
use institution::*;
use mpi::*;

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

/// Logging and tracing as configured (keep the guard while serving), and the multi-threaded
/// runtime a serving command runs on.
pub fn serving_runtime(
    settings: &Settings,
) -> Result<(crate::telemetry::TelemetryGuard, tokio::runtime::Runtime), Failure> {
    let telemetry = crate::telemetry::init(&settings.log, &settings.telemetry)
        .map_err(|e| Failure::new(crate::cli::EXIT_CONFIG, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    Ok((telemetry, runtime))
}

pub fn serve(settings: Settings) -> Result<(), Failure> {
    let (_telemetry, runtime) = serving_runtime(&settings)?;
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

fn read_file(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            EXIT_REJECTED,
            format!("cannot read {}: {e}", path.display()),
        )
    })
}
