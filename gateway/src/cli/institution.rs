//! `yiqiao institution …`: the institution directory from the command line.

use super::*;

pub(super) fn institution(settings: &Settings, cmd: InstitutionCommand) -> Result<(), Failure> {
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
