//! Archive files: written durably (temporary file, fsync, rename), found again after an
//! interrupted run, and verified.

use super::*;

/// Archive files already in `dir` for exactly this range (an interrupted run's).
pub(super) fn candidates(dir: &Path, prefix: &str) -> Result<Vec<String>, ArchiveError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        if let Some(name) = entry.file_name().to_str()
            && name.starts_with(prefix)
            && name.ends_with(".json")
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Write `bytes` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("archive")
    ));
    let mut file = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    file.write_all(bytes).map_err(io_error(&tmp))?;
    file.sync_all().map_err(io_error(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io_error(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    Ok(())
}

/// Read an archive file back and verify it: the bundle verifies with `key` and holds exactly
/// positions `first..=last` linked to `anchor`. Returns (SM3 of the file, its last hash).
pub fn check_file(
    path: &Path,
    key: &Sm2PublicKey,
    first: i64,
    last: i64,
    anchor: &str,
) -> Result<(String, String), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bundle: Bundle = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not an export bundle: {e}", path.display()))?;
    let report = verify_bundle(&bundle, key);
    if let Some(p) = report.first_problem() {
        return Err(format!(
            "{} does not verify: position {}: {}: {}",
            path.display(),
            p.seq,
            p.kind.as_str(),
            p.detail
        ));
    }
    let m: ExportManifest = serde_json::from_str(&bundle.manifest)
        .map_err(|e| format!("{}: manifest: {e}", path.display()))?;
    if m.from != first || m.to != last || m.count != last - first + 1 {
        return Err(format!(
            "{} holds positions {}..{} ({} records), expected {first}..{last}",
            path.display(),
            m.from,
            m.to,
            m.count
        ));
    }
    if m.anchor_prev_hash != anchor {
        return Err(format!(
            "{} does not continue the previous archive",
            path.display()
        ));
    }
    Ok((yiqiao_sm::sm3_hex(&bytes), m.last_hash))
}

/// Steps 1–2 with a new file: export, write durably, read back and verify. Returns the file
/// name and what [`check_file`] found.
pub(super) fn write_archive_file(
    conn: &mut DbConn,
    signer: &AuditSigner,
    dir: &Path,
    prefix: &str,
    first: i64,
    last: i64,
    anchor: &str,
) -> Result<(String, (String, String)), ArchiveError> {
    let bundle = export(conn, Some(first), Some(last), signer)?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let name = format!("{prefix}{}.json", &run_id[..8]);
    let path = dir.join(&name);
    let bytes =
        serde_json::to_vec_pretty(&bundle).map_err(|e| ArchiveError::Sign(e.to_string()))?;
    write_durably(&path, &bytes)?;
    let checked =
        check_file(&path, signer.public_key(), first, last, anchor).map_err(|reason| {
            ArchiveError::Unverified {
                month: String::new(),
                reason,
            }
        })?;
    Ok((name, checked))
}
