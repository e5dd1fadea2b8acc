//! Write a synthetic population (`synth::generate`, the same generator as `yiqiao mpi
//! evaluate`: homophones, look-alikes, swapped dates, missing IDs, twins) as NDJSON of FHIR
//! Patients for `yiqiao mpi import`, plus a second file of `$match` request bodies.
//!
//! `cargo run --release -p yiqiao-registry --example empi_synth_ndjson -- RECORDS SEED SYSTEM OUT.ndjson [MATCH.ndjson [N]]`
//!
//! Every record becomes a Patient of one importing institution: `identifier` in SYSTEM
//! (`R<index>`), the resident ID in `urn:oid:2.16.156.10011.1.1` when the record has one,
//! `name.text`, `gender`, `birthDate`, phone `telecom`, `address.text`. MATCH.ndjson holds N
//! (default 200) `$match` Parameters built from records spread over the population.

use std::io::{BufWriter, Write};

use serde_json::{Value, json};
use yiqiao_registry::empi::ident::{IdentifierKind, Sex};
use yiqiao_registry::empi::record::SourceRecord;
use yiqiao_registry::empi::synth::{PopulationConfig, generate};

fn patient(r: &SourceRecord, system: Option<(&str, String)>) -> Value {
    let mut ids = Vec::new();
    if let Some((s, v)) = system {
        ids.push(json!({ "system": s, "value": v }));
    }
    let mut telecom = Vec::new();
    for i in &r.identifiers {
        match i.kind {
            IdentifierKind::ResidentId => ids.push(json!({
                "system": "urn:oid:2.16.156.10011.1.1",
                "value": i.value,
            })),
            IdentifierKind::Phone => telecom.push(json!({ "system": "phone", "value": i.value })),
            _ => {}
        }
    }
    let mut p = json!({
        "resourceType": "Patient",
        "identifier": ids,
        "name": [{ "text": r.name }],
    });
    if let Some(s) = r.sex {
        p["gender"] = json!(match s {
            Sex::Male => "male",
            Sex::Female => "female",
        });
    }
    if let Some(b) = r.birth_date {
        p["birthDate"] = json!(b.to_string());
    }
    if !telecom.is_empty() {
        p["telecom"] = json!(telecom);
    }
    if let Some(a) = &r.address {
        p["address"] = json!([{ "text": a }]);
    }
    p
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err("usage: RECORDS SEED SYSTEM OUT.ndjson [MATCH.ndjson [N]]".into());
    }
    let records: usize = args[0].parse()?;
    let seed: u64 = args[1].parse()?;
    let system = args[2].as_str();
    let population = generate(&PopulationConfig::new(records, seed));
    let mut out = BufWriter::new(std::fs::File::create(&args[3])?);
    for (i, r) in population.records.iter().enumerate() {
        serde_json::to_writer(&mut out, &patient(r, Some((system, format!("R{i}")))))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if let Some(path) = args.get(4) {
        let n: usize = args.get(5).map_or(Ok(200), |a| a.parse())?;
        let mut out = BufWriter::new(std::fs::File::create(path)?);
        let step = (population.records.len() / n.max(1)).max(1);
        for r in population.records.iter().step_by(step).take(n) {
            let body = json!({
                "resourceType": "Parameters",
                "parameter": [
                    { "name": "resource", "resource": patient(r, None) },
                    { "name": "count", "valueInteger": 5 },
                ],
            });
            serde_json::to_writer(&mut out, &body)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    eprintln!(
        "{} records of {} persons written",
        population.records.len(),
        population.persons
    );
    Ok(())
}
