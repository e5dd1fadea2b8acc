//! `yiqiao demo`: the gateway on the embedded default with a demo region registered.
//!
//! Registers (idempotently) a demo region of member institutions — hospitals of several grades,
//! an internet-hospital platform, a public-health body — each with its own SM2 key pair (private
//! keys under `<data_dir>/demo/keys/`, for signing client assertions in the walkthrough), then
//! serves and prints a short walkthrough.

use std::path::Path;

use yiqiao_registry::Store;
use yiqiao_registry::directory::{self, InstitutionSpec, Sm2Key};

use crate::cli::{EXIT_DATABASE, EXIT_REJECTED, EXIT_RUNTIME, Failure};
use crate::config::{Secret, Settings};

/// The demo region: Fuzhou (福州, administrative division 350100).
const REGION: &str = "350100";
const DISTRICTS: [&str; 6] = ["鼓楼区", "台江区", "仓山区", "晋安区", "马尾区", "长乐区"];

/// One demo member (deterministic from its index).
pub fn demo_institution(n: u32) -> (InstitutionSpec, &'static str) {
    let (kind, level, name, scopes): (&str, &str, String, &[&str]) = match n {
        1 => (
            "regional_platform",
            "unrated",
            "福州市全民健康信息平台".into(),
            &["system/*.rs"],
        ),
        2 => (
            "public_health",
            "unrated",
            "福州市疾病预防控制中心".into(),
            &[
                "system/Patient.rs",
                "system/Observation.rs",
                "system/Condition.rs",
            ],
        ),
        3 => (
            "internet_hospital",
            "unrated",
            "榕城互联网医院".into(),
            &[
                "system/Patient.rs",
                "system/Observation.rs",
                "system/DocumentReference.rs",
            ],
        ),
        _ => {
            let level = ["3A", "3B", "2A", "2B", "1A"][(n as usize) % 5];
            let district = DISTRICTS[(n as usize) % DISTRICTS.len()];
            (
                "hospital",
                level,
                format!("福州市{district}第{n}医院"),
                &[
                    "system/Patient.cruds",
                    "system/Observation.rs",
                    "system/Encounter.rs",
                    "system/Condition.rs",
                    "system/MedicationRequest.rs",
                    "system/DiagnosticReport.rs",
                    "system/DocumentReference.cruds",
                    "system/Consent.cruds",
                ],
            )
        }
    };
    let spec = InstitutionSpec {
        id: format!("fz-{n:03}"),
        name,
        uscc: demo_uscc(n),
        region_code: REGION.into(),
        level: level.into(),
        kind: kind.into(),
        endpoint_url: None,
        jwks: None,
        sm2_keys: Vec::new(),
        patient_id_system: format!("urn:oid:2.16.156.10011.1.99.350100.{n}"),
        allowed_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        require_sm_envelope: false,
    };
    (spec, kind)
}

/// A unified social credit code with a valid GB 32100 check character.
fn demo_uscc(n: u32) -> String {
    let body = format!("12350100M{n:08}");
    let check = directory::uscc_check_character(&body).unwrap_or('0');
    format!("{body}{check}")
}

/// Register the demo region (skipping members already present). Returns (registered, existing).
pub fn register_region(
    auditor: &crate::service::offline::OfflineAuditor,
    keys_dir: &Path,
    count: u32,
) -> Result<(u32, u32), Failure> {
    std::fs::create_dir_all(keys_dir).map_err(|e| {
        Failure::new(
            EXIT_RUNTIME,
            format!("cannot create {}: {e}", keys_dir.display()),
        )
    })?;
    let mut conn = auditor.store().conn()?;
    let (mut added, mut existing) = (0, 0);
    for n in 1..=count {
        let (mut spec, _) = demo_institution(n);
        match directory::get(&mut conn, &spec.id) {
            Ok(_) => {
                existing += 1;
                continue;
            }
            Err(directory::DirectoryError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let key = yiqiao_sm::Sm2PrivateKey::generate()
            .map_err(|e| Failure::new(EXIT_RUNTIME, format!("SM2 key generation failed: {e}")))?;
        let private_pem = key
            .to_pkcs8_pem()
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
        let public_pem = key
            .public_key()
            .to_spki_pem()
            .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
        let path = keys_dir.join(format!("{}.sm2.pem", spec.id));
        std::fs::write(&path, private_pem.as_bytes()).map_err(|e| {
            Failure::new(
                EXIT_RUNTIME,
                format!("cannot write {}: {e}", path.display()),
            )
        })?;
        spec.sm2_keys = vec![Sm2Key {
            kid: format!("{}-sm2-1", spec.id),
            pem: public_pem,
        }];
        let valid = directory::validate(&spec).map_err(|e| {
            Failure::new(EXIT_REJECTED, format!("demo institution {}: {e}", spec.id))
        })?;
        let event = auditor.event("create", "C", format!("Organization/{}", spec.id));
        auditor
            .change(event, |tx, _| directory::create(tx, &valid))
            .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
        added += 1;
    }
    Ok((added, existing))
}

fn random_token() -> Result<String, Failure> {
    let key = yiqiao_sm::random_sm4_key().map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

/// The address the demo's simulated hospitals listen on: a loopback address of their own, so
/// that the demo's outbound policy admits them and nothing else on the machine (127.0.0.1's
/// PostgreSQL, Redis, the gateway itself stay refused, as an attacker would find them).
pub const DEMO_SIM_ADDRESS: &str = "127.0.0.2";

/// The demo's defaults: the embedded database under the data directory, a fresh admin token
/// unless one is set, and an outbound policy that admits the simulated hospitals (plain HTTP
/// at [`DEMO_SIM_ADDRESS`]) and nothing more.
fn demo_settings(settings: &mut Settings) -> Result<(), Failure> {
    if settings.database.url.expose().is_empty() {
        let path = settings.data_dir.join("demo").join("yiqiao-demo.db");
        settings.database.url = Secret::new(format!("sqlite://{}", path.display()));
    }
    if !settings.admin_token.is_set() {
        settings.admin_token = Secret::new(random_token()?);
    }
    settings.outbound.allow_http = true;
    let sim_network = format!("{DEMO_SIM_ADDRESS}/32");
    if !settings.outbound.allow_cidrs.contains(&sim_network) {
        settings.outbound.allow_cidrs.push(sim_network);
    }
    Ok(())
}

pub fn run(mut settings: Settings, institutions: u32) -> Result<(), Failure> {
    demo_settings(&mut settings)?;
    let store = Store::open(&settings.store_options())?;
    store
        .migrate()
        .map_err(|e| Failure::new(EXIT_DATABASE, e.to_string()))?;
    let keys_dir = settings.data_dir.join("demo").join("keys");
    // fz-001..fz-003 (platform, public health, internet hospital) get fresh keys on disk; the
    // hospitals fz-004.. are the simulated region, with keys derived from the demo seed.
    let operator = crate::service::offline::OfflineAuditor::open(
        &settings,
        store.clone(),
        "demo-loader".into(),
    )
    .map_err(|e| Failure::new(EXIT_RUNTIME, format!("{e:#}")))?;
    let (added, existing) = register_region(&operator, &keys_dir, institutions.min(3))?;
    let hospitals = institutions.saturating_sub(3).max(1);
    let gateway_key = crate::federation::load_key(&settings)
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?;
    let (_telemetry, runtime) = crate::cli::serving_runtime(&settings)?;
    runtime.block_on(async move {
        let config = crate::sim::SimConfig {
            seed: DEMO_SEED,
            shape: crate::sim::RegionShape {
                institutions: hospitals,
                persons: 30,
                min_sites: 2.min(hospitals),
                max_sites: 5.min(hospitals),
            },
            knobs: crate::sim::Knobs::default()
                .with_overrides("latency_min_ms=5,latency_max_ms=40")
                .map_err(|e| Failure::new(EXIT_RUNTIME, e))?,
            overrides: Default::default(),
            gateway_key: yiqiao_sm::RecipientKey {
                key_id: settings.federation.key_id.clone(),
                public_key: gateway_key.public_key(),
            },
            gateway_id: Some(settings.federation.gateway_id.clone()),
            workers: 1,
        };
        let listener = std::net::TcpListener::bind((DEMO_SIM_ADDRESS, 0))
            .map_err(|e| Failure::new(EXIT_RUNTIME, format!("simulator: {e}")))?;
        let mut sim = crate::sim::SimServer::start(config, listener)
            .map_err(|e| Failure::new(EXIT_RUNTIME, format!("simulator: {e}")))?;
        sim.spawn();
        for inst in &sim.region().institutions {
            let path = keys_dir.join(format!("{}.sm2.pem", inst.id));
            if let Ok(pem) = inst.key.to_pkcs8_pem() {
                let _ = std::fs::write(&path, pem.as_bytes());
            }
        }
        let region = sim.region().clone();
        let sim_base = sim.base_url.clone();
        let resident = settings.empi.resident_id_system.clone();
        let loading = crate::service::offline::OfflineAuditor::open(
            &settings,
            store.clone(),
            "demo-loader".into(),
        )
        .map_err(|e| Failure::new(EXIT_RUNTIME, format!("{e:#}")))?;
        let loaded = tokio::task::spawn_blocking(move || {
            crate::sim::load::load_region(&loading, &region, &sim_base, &resident)
        })
        .await
        .map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))?
        .map_err(|e| Failure::new(EXIT_DATABASE, e))?;
        let (person_index, person) = sim
            .region()
            .persons
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.sites.len())
            .and_then(|(i, _)| loaded.persons.get(i).cloned().flatten().map(|id| (i, id)))
            .ok_or_else(|| Failure::new(EXIT_RUNTIME, "no simulated person was linked"))?;
        let sites: Vec<String> = sim.region().persons[person_index]
            .sites
            .iter()
            .filter_map(|n| sim.region().institution_by_n(*n).map(|i| i.id.clone()))
            .collect();

        let app = crate::app::Application::build(settings.clone())
            .await
            .map_err(|e| Failure::new(EXIT_RUNTIME, format!("{e:#}")))?;
        let base = settings.public_base_url();
        let token = settings.admin_token.expose().to_string();
        let simu = &sim.base_url;
        println!(
            "Yiqiao demo region: {} member institutions ({added} registered now, {existing} already present, {} simulated hospitals with FHIR endpoints)",
            added + existing + sim.region().institutions.len() as u32,
            sim.region().institutions.len()
        );
        println!(
            "  database:      {} ({})",
            yiqiao_registry::store::redact_url(&settings.database_url()),
            store.backend().name()
        );
        println!(
            "  SM2 keys:      {}/<institution>.sm2.pem (demo only: private keys on disk)",
            keys_dir.display()
        );
        println!(
            "  simulator:     {simu}/h/<id>/fhir ({} EMPI registrations of {} persons)",
            loaded.registrations,
            loaded.persons.len()
        );
        println!();
        println!("Walkthrough (in another terminal):");
        println!("  TOKEN={token}");
        println!("  curl -s {base}/readyz");
        println!("  curl -s '{base}/fhir/Organization?_count=5'            # the directory as FHIR");
        println!("  curl -s -H \"Authorization: Bearer $TOKEN\" {base}/empi/persons/{person}   # person at {}", sites.join(", "));
        // A hospital that treats the person asks (purpose TREAT): the regional platform fz-001
        // may not ask for treatment under the default policy (docs/consent.md).
        let asker = sites.last().cloned().unwrap_or_else(|| "fz-004".into());
        println!("  # Federated query: hospital {asker}, which treats the person, asks every hospital holding records of the person");
        println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'X-On-Behalf-Of: {asker}' '{base}/fhir/Observation?patient={person}&_count=5'");
        println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'X-On-Behalf-Of: {asker}' '{base}/fhir/DiagnosticReport?patient={person}'");
        println!("  # Make one hospital fail, then look at the OperationOutcome entry (search.mode = outcome)");
        println!("  curl -s -X PUT -H 'Content-Type: application/json' -d '{{\"error_rate\":1.0}}' {simu}/_sim/knobs/{}", sites[0]);
        println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'X-On-Behalf-Of: {asker}' '{base}/fhir/Encounter?patient={person}&_timeout=1500'");
        println!("  curl -s -X PUT -H 'Content-Type: application/json' -d 'null' {simu}/_sim/knobs/{}   # heal it", sites[0]);
        println!("  # The same answer sealed in an SM envelope to {asker}'s SM2 key (docs/sm-envelope.md)");
        println!("  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'X-On-Behalf-Of: {asker}' -H 'Accept: application/yiqiao-sm-envelope+json' -H 'X-Request-Id: demo-1' '{base}/fhir/Condition?patient={person}'");
        println!("  open {base}/docs for the API reference; {base}/metrics for Prometheus");
        println!();
        println!("Admin token for this run: {token}   (set YIQIAO_ADMIN_TOKEN to choose one)");
        println!("Stop with Ctrl-C.");
        let result = app.run().await;
        sim.stop().await;
        result.map_err(|e| Failure::new(EXIT_RUNTIME, e.to_string()))
    })
}

/// Seed of the demo's simulated region (keys and data are derived from it).
pub const DEMO_SEED: u64 = 350_100;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn demo_institutions_are_valid() {
        for n in 1..=40 {
            let (spec, _) = demo_institution(n);
            directory::validate(&spec).unwrap_or_else(|e| panic!("fz-{n:03}: {e}"));
        }
    }
}
