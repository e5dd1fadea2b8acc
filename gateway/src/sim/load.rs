//! Loading a simulated region into the gateway's store: directory entries (endpoint URL and SM2
//! public key of each simulated hospital) and every hospital's EMPI registrations.

use yiqiao_registry::directory::{self, DirectoryError};
use yiqiao_registry::empi::store as empi;

use crate::service::offline::OfflineAuditor;

use super::data::Region;

/// What [`load_region`] did.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub institutions_created: usize,
    pub institutions_updated: usize,
    pub registrations: usize,
    /// Enterprise person id of each simulated person (by index), when linked.
    pub persons: Vec<Option<String>>,
    /// Persons whose records did not all land on one enterprise person.
    pub split_persons: usize,
}

/// Create or update each simulated hospital in the directory with `{base_url}/h/{id}/fhir`,
/// then register its patients with the EMPI (idempotent). Every change is made with its audit
/// record (`auditor`).
pub fn load_region(
    auditor: &OfflineAuditor,
    region: &Region,
    base_url: &str,
    resident_system: &str,
) -> Result<Loaded, String> {
    let mut conn = auditor.store().conn().map_err(|e| e.to_string())?;
    let mut loaded = Loaded::default();
    for inst in &region.institutions {
        let spec = inst.spec(&format!(
            "{}/h/{}/fhir",
            base_url.trim_end_matches('/'),
            inst.id
        ))?;
        let valid = directory::validate(&spec).map_err(|e| format!("{}: {e}", inst.id))?;
        match directory::get(&mut conn, &inst.id) {
            Ok(current) => {
                if current.endpoint_url != spec.endpoint_url || current.sm2_keys != spec.sm2_keys {
                    let event = auditor.event("update", "U", format!("Organization/{}", inst.id));
                    auditor
                        .change(event, |tx, _| directory::update(tx, &valid, None))
                        .map_err(|e| format!("{}: {e}", inst.id))?;
                    loaded.institutions_updated += 1;
                }
            }
            Err(DirectoryError::NotFound(_)) => {
                let event = auditor.event("create", "C", format!("Organization/{}", inst.id));
                auditor
                    .change(event, |tx, _| directory::create(tx, &valid))
                    .map_err(|e| format!("{}: {e}", inst.id))?;
                loaded.institutions_created += 1;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    for person in &region.persons {
        let mut ids: Vec<String> = Vec::new();
        for &n in &person.sites {
            let Some(inst) = region.institution_by_n(n) else {
                continue;
            };
            let patient = person.patient(inst);
            let reg = crate::routes::patients::registration_of(
                &patient,
                &inst.id,
                &inst.patient_id_system,
                resident_system,
            )
            .map_err(|e| format!("{} patient {}: {}", inst.id, person.index, e.message))?;
            let mut event = auditor.event("create", "C", String::new());
            event.entities.clear();
            event.agent_institution = Some(inst.id.clone());
            let done = auditor
                .change(event, |tx, event| {
                    let done = empi::register(tx, &reg, "sim-loader")?;
                    event
                        .entities
                        .push(yiqiao_registry::audit::EntityRef::resource(format!(
                            "Patient/{}",
                            done.record.id
                        )));
                    event.patient_id = done.record.link.as_ref().map(|l| l.person_id.clone());
                    Ok::<_, empi::EmpiError>(done)
                })
                .map_err(|e| format!("{} patient {}: {e}", inst.id, person.index))?;
            loaded.registrations += 1;
            if let Some(link) = done.record.link {
                ids.push(link.person_id);
            }
        }
        ids.sort();
        ids.dedup();
        if ids.len() > 1 {
            loaded.split_persons += 1;
        }
        loaded.persons.push(ids.into_iter().next());
    }
    Ok(loaded)
}
