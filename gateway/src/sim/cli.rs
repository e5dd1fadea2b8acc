//! `yiqiao sim`: arguments and runner.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use clap::Args;
use yiqiao_sm::{RecipientKey, Sm2PrivateKey, Sm2PublicKey};

use super::{Knobs, RegionShape, SimConfig, SimServer, load, region_json};
use crate::cli::{EXIT_CONFIG, EXIT_DATABASE, EXIT_RUNTIME, Failure};
use crate::config::Settings;

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Number of simulated hospitals (fz-004, fz-005, …).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub institutions: u32,
    /// Seed of the synthetic data and of the hospitals' SM2 keys.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of synthetic persons.
    #[arg(long, default_value_t = 100)]
    pub patients: u32,
    /// Each person has records at between --min-sites and --max-sites hospitals.
    #[arg(long, default_value_t = 2)]
    pub min_sites: u32,
    #[arg(long, default_value_t = 5)]
    pub max_sites: u32,
    /// Listen address (one port for every hospital).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Base URL the gateway reaches the simulator at (default: http://<listen>).
    #[arg(long)]
    pub public_url: Option<String>,
    /// The gateway's SM2 key (public SPKI PEM or private PKCS#8 PEM). Default: the configured
    /// `federation.sm2_key_file` (or `<data_dir>/gateway-sm2-key.pem`).
    #[arg(long, value_name = "PEM")]
    pub gateway_key: Option<PathBuf>,
    /// Answer latency, uniform in [min, max] milliseconds.
    #[arg(long, default_value_t = 5)]
    pub latency_min_ms: u64,
    #[arg(long, default_value_t = 50)]
    pub latency_max_ms: u64,
    /// Shares of requests answered 503, hanging, with garbage, with a tampered envelope.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub garbage_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    pub tampered_rate: f64,
    /// How long a hanging request hangs, milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub hang_ms: u64,
    /// Per-institution knobs: ID:key=value,key=value (repeatable), e.g.
    /// `--override fz-005:error_rate=1.0 --override fz-006:latency_min_ms=3000,latency_max_ms=3000`.
    #[arg(long = "override", value_name = "ID:KNOBS")]
    pub overrides: Vec<String>,
    /// Write the region (directory entries with keys and endpoints, patients to register)
    /// as JSON to FILE ("-" for standard output).
    #[arg(long, value_name = "FILE")]
    pub emit: Option<PathBuf>,
    /// Register the hospitals and their patients in the configured database before serving.
    #[arg(long)]
    pub register: bool,
    /// With --register: write the enterprise person id of every simulated person (JSON array,
    /// by person index) to FILE.
    #[arg(long, value_name = "FILE", requires = "register")]
    pub persons_out: Option<PathBuf>,
    /// Exit after --emit / --register instead of serving.
    #[arg(long)]
    pub no_serve: bool,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
}

fn gateway_key(settings: &Settings, path: Option<&PathBuf>) -> Result<Sm2PublicKey, Failure> {
    let Some(path) = path else {
        return crate::federation::load_key(settings)
            .map(|k| k.public_key())
            .map_err(|e| Failure::new(EXIT_CONFIG, e.to_string()));
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Failure::new(EXIT_CONFIG, format!("{}: {e}", path.display())))?;
    Sm2PublicKey::from_spki_pem(&pem)
        .or_else(|_| Sm2PrivateKey::from_pkcs8_pem(&pem).map(|k| k.public_key()))
        .map_err(|_| {
            Failure::new(
                EXIT_CONFIG,
                format!("{}: not an SM2 public or private key PEM", path.display()),
            )
        })
}

/// The simulator configuration from the arguments.
pub fn config(settings: &Settings, args: &SimArgs) -> Result<SimConfig, Failure> {
    let knobs = Knobs {
        latency_min_ms: args.latency_min_ms,
        latency_max_ms: args.latency_max_ms,
        error_rate: args.error_rate,
        timeout_rate: args.timeout_rate,
        garbage_rate: args.garbage_rate,
        tampered_rate: args.tampered_rate,
        hang_ms: args.hang_ms,
    };
    knobs
        .check()
        .map_err(|e| Failure::new(EXIT_CONFIG, format!("knobs: {e}")))?;
    let mut overrides = HashMap::new();
    for o in &args.overrides {
        let (id, text) = o.split_once(':').ok_or_else(|| {
            Failure::new(
                EXIT_CONFIG,
                format!("--override {o}: expected ID:key=value,…"),
            )
        })?;
        let k = knobs
            .with_overrides(text)
            .map_err(|e| Failure::new(EXIT_CONFIG, format!("--override {id}: {e}")))?;
        overrides.insert(id.to_string(), k);
    }
    Ok(SimConfig {
        seed: args.seed,
        shape: RegionShape {
            institutions: args.institutions,
            persons: args.patients,
            min_sites: args.min_sites,
            max_sites: args.max_sites,
        },
        knobs,
        overrides,
        gateway_key: RecipientKey {
            key_id: settings.federation.key_id.clone(),
            public_key: gateway_key(settings, args.gateway_key.as_ref())?,
        },
        gateway_id: Some(settings.federation.gateway_id.clone()),
        workers: args.workers,
    })
}

pub fn run(settings: &Settings, args: SimArgs) -> Result<(), Failure> {
    let _telemetry = crate::telemetry::init(&settings.log, &settings.telemetry)
        .map_err(|e| Failure::new(EXIT_CONFIG, e))?;
    let config = config(settings, &args)?;
    let listener = TcpListener::bind(args.listen).map_err(|e| {
        Failure::new(
            EXIT_RUNTIME,
            format!("cannot listen on {}: {e}", args.listen),
        )
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    let base = args
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    runtime.block_on(async move {
        let sim = SimServer::start(config, listener)
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
        if let Some(path) = &args.emit {
            let json = region_json(sim.region(), &base).map_err(|e| Failure::new(EXIT_RUNTIME, e))?;
            let text = serde_json::to_string_pretty(&json)
                .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
            if path.as_os_str() == "-" {
                println!("{text}");
            } else {
                std::fs::write(path, text).map_err(|e| {
                    Failure::new(EXIT_RUNTIME, format!("{}: {e}", path.display()))
                })?;
            }
        }
        if args.register {
            let store = yiqiao_registry::Store::open(&settings.store_options())?;
            store
                .migrate()
                .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
            let region = sim.region().clone();
            let resident = settings.empi.resident_id_system.clone();
            let base_url = base.clone();
            let auditor = crate::service::offline::OfflineAuditor::open(
                settings,
                store,
                crate::service::offline::OfflineAuditor::cli_operator(),
            )
            .map_err(|e| Failure::new(EXIT_RUNTIME, format!("{e:#}")))?;
            let loaded = tokio::task::spawn_blocking(move || {
                load::load_region(&auditor, &region, &base_url, &resident)
            })
            .await
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?
            .map_err(|e| Failure::new(EXIT_DATABASE, e))?;
            eprintln!(
                "registered: {} institutions created, {} updated, {} patient registrations, {} persons split",
                loaded.institutions_created,
                loaded.institutions_updated,
                loaded.registrations,
                loaded.split_persons
            );
            if let Some(path) = &args.persons_out {
                let text = serde_json::to_string(&loaded.persons)
                    .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
                std::fs::write(path, text).map_err(|e| {
                    Failure::new(EXIT_RUNTIME, format!("{}: {e}", path.display()))
                })?;
            }
            for (i, p) in loaded.persons.iter().enumerate().take(5) {
                if let Some(id) = p {
                    eprintln!("  person {i}: enterprise id {id}");
                }
            }
        }
        if args.no_serve {
            return Ok(());
        }
        eprintln!(
            "simulating {} hospitals at {base}/h/<id>/fhir (knobs: PUT {base}/_sim/knobs/<id|*>, stats: GET {base}/_sim/stats)",
            sim.region().institutions.len()
        );
        sim.run()
            .await
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))
    })
}
