//! Signed export bundles, verifiable offline with only the gateway's public key.
//!
//! A bundle is one JSON object: `manifest` (a JSON text, signed byte for byte),
//! `manifest_signature` (hex DER SM2 over the manifest text), `public_key_pem`, `records`
//! (position, prev hash, hash and the exact hashed resource text) and `checkpoints`.

use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use yiqiao_sm::Sm2PublicKey;

use super::append::EventRow;
use super::verify::load_checkpoints;
use super::{
    AuditSigner, ChainVerifier, CheckpointRecord, GENESIS_HASH, Problem, ProblemKind, Report,
    format_time, key_id_of, verify_hex_signature,
};
use crate::store::schema::audit_events;
use crate::store::{DbConn, StoreError, now_utc};

pub const EXPORT_FORMAT: &str = "yiqiao-audit-export-v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    pub seq: i64,
    pub prev_hash: String,
    pub hash: String,
    /// The stored AuditEvent JSON text, exactly as hashed.
    pub resource: String,
}

/// What the manifest signature vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub from: i64,
    pub to: i64,
    pub count: i64,
    /// `prev_hash` of record `from` (the hash of record `from - 1`, or 64 zeros).
    pub anchor_prev_hash: String,
    /// Hash of record `to`.
    pub last_hash: String,
    pub checkpoints: i64,
    pub exported_at: String,
    pub key_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    pub manifest: String,
    pub manifest_signature: String,
    pub public_key_pem: String,
    pub records: Vec<ExportRecord>,
    pub checkpoints: Vec<CheckpointRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no audit records in positions {0}..{1}")]
    Empty(i64, i64),
    #[error(
        "positions 1..{0} are archived (yiqiao audit archive): verify their archive files instead; the database holds the later positions"
    )]
    Archived(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Build a signed bundle of positions `from..=to` (default: the whole chain).
pub fn export(
    conn: &mut DbConn,
    from: Option<i64>,
    to: Option<i64>,
    signer: &AuditSigner,
) -> Result<Bundle, ExportError> {
    // Archived positions are no longer stored: by default the export starts after them.
    let archived_last = super::archive::latest(conn)?.map_or(0, |m| m.last_seq);
    let from = match from {
        Some(f) if f <= archived_last => return Err(ExportError::Archived(archived_last)),
        Some(f) => f.max(1),
        None => archived_last + 1,
    };
    let (head, _, _) = super::chain_head(conn)?;
    let to = to.unwrap_or(head).min(head);
    if to < from {
        return Err(ExportError::Empty(from, to));
    }
    let rows: Vec<EventRow> = audit_events::table
        .filter(audit_events::seq.ge(from))
        .filter(audit_events::seq.le(to))
        .order(audit_events::seq.asc())
        .load(conn)
        .map_err(StoreError::from_diesel)?;
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return Err(ExportError::Empty(from, to));
    };
    let anchor = if from == 1 {
        GENESIS_HASH.to_string()
    } else {
        first.prev_hash.clone()
    };
    let checkpoints = load_checkpoints(conn, from, to)?;
    let manifest = Manifest {
        format: EXPORT_FORMAT.into(),
        from,
        to,
        count: rows.len() as i64,
        anchor_prev_hash: anchor,
        last_hash: last.hash.clone(),
        checkpoints: checkpoints.len() as i64,
        exported_at: format_time(&now_utc()),
        key_id: signer.key_id().to_string(),
    };
    let manifest_text =
        serde_json::to_string(&manifest).map_err(|e| ExportError::Sign(e.to_string()))?;
    let manifest_signature = signer
        .sign_hex(manifest_text.as_bytes())
        .map_err(|e| ExportError::Sign(e.to_string()))?;
    let public_key_pem = signer
        .public_key()
        .to_spki_pem()
        .map_err(|e| ExportError::Sign(e.to_string()))?;
    Ok(Bundle {
        manifest: manifest_text,
        manifest_signature,
        public_key_pem,
        records: rows
            .into_iter()
            .map(|r| ExportRecord {
                seq: r.seq,
                prev_hash: r.prev_hash,
                hash: r.hash,
                resource: r.resource,
            })
            .collect(),
        checkpoints,
    })
}

/// Verify a bundle with the auditor's copy of the gateway public key (never the one inside
/// the bundle).
pub fn verify_bundle(bundle: &Bundle, public_key: &Sm2PublicKey) -> Report {
    let bad = |detail: String| Report {
        records: bundle.records.len() as u64,
        problems: vec![Problem {
            seq: 0,
            kind: ProblemKind::BadManifest,
            detail,
        }],
        ..Report::default()
    };
    if !verify_hex_signature(
        public_key,
        bundle.manifest.as_bytes(),
        &bundle.manifest_signature,
    ) {
        return bad(format!(
            "the manifest signature does not verify with key {}",
            key_id_of(public_key)
        ));
    }
    let manifest: Manifest = match serde_json::from_str(&bundle.manifest) {
        Ok(m) => m,
        Err(e) => return bad(format!("the manifest does not parse: {e}")),
    };
    if manifest.format != EXPORT_FORMAT {
        return bad(format!("unknown format {}", manifest.format));
    }
    let mut verifier = ChainVerifier::new(Some(&manifest.anchor_prev_hash));
    if let Some(first) = bundle.records.first()
        && first.seq != manifest.from
    {
        verifier.push_problem(
            manifest.from,
            ProblemKind::Deleted,
            format!(
                "the manifest starts at {}, the records at {}",
                manifest.from, first.seq
            ),
        );
    }
    for r in &bundle.records {
        verifier.push(r.seq, &r.prev_hash, &r.hash, &r.resource, true);
    }
    let mut report = verifier.finish(&bundle.checkpoints, public_key, Some(manifest.to));
    if let Some(last) = bundle.records.last()
        && last.seq == manifest.to
        && last.hash != manifest.last_hash
    {
        report.problems.push(Problem {
            seq: last.seq,
            kind: ProblemKind::Modified,
            detail: "the last record's hash differs from the signed manifest".into(),
        });
    }
    if report.problems.is_empty() && report.records as i64 != manifest.count {
        report.problems.push(Problem {
            seq: manifest.to,
            kind: ProblemKind::BadManifest,
            detail: format!(
                "the manifest counts {}, the bundle has {}",
                manifest.count, report.records
            ),
        });
    }
    if report.checkpoints as i64 != manifest.checkpoints {
        report.problems.push(Problem {
            seq: manifest.to,
            kind: ProblemKind::BadCheckpointSignature,
            detail: format!(
                "the manifest lists {} checkpoints, the bundle has {}",
                manifest.checkpoints, report.checkpoints
            ),
        });
    }
    report.problems.sort_by_key(|p| p.seq);
    report
}
