//! The signed archive manifests: read, and checked to be validly signed and contiguous.

use super::*;

/// Every manifest, in chain order.
pub fn manifests(conn: &mut DbConn) -> Result<Vec<ArchiveManifest>, StoreError> {
    audit_archives::table
        .order(audit_archives::first_seq.asc())
        .load(conn)
        .map_err(StoreError::from_diesel)
}

/// The most recent archive (highest positions), if any.
pub fn latest(conn: &mut DbConn) -> Result<Option<ArchiveManifest>, StoreError> {
    audit_archives::table
        .order(audit_archives::first_seq.desc())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}

/// The end of the months an archive covers (the first instant of the month after its month):
/// records recorded before it may be archived rather than stored.
pub fn covered_until(m: &ArchiveManifest) -> Option<NaiveDateTime> {
    parse_month(&m.month).map(|month| start_of(next_month(month)))
}

/// What the manifests say was archived: positions `1..=last_seq`, ending with `last_hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRange {
    pub last_seq: i64,
    pub last_hash: String,
    pub month: String,
    pub manifests: u64,
}

/// Check the manifests (in chain order): each validly signed with `key`, its count equal to its
/// range, and together contiguous from position 1, each linking to the previous one's last
/// hash. A deleted row shows as positions that are neither stored nor archived; an edited row
/// as a bad signature. Returns the problems and the archived range the remaining records
/// continue (from the last manifest, even when problems were found).
pub fn check_manifests(
    manifests: &[ArchiveManifest],
    key: &Sm2PublicKey,
) -> (Vec<Problem>, Option<ArchivedRange>) {
    let want_key = key_id_of(key);
    let mut problems = Vec::new();
    let mut bad = |seq: i64, kind: ProblemKind, detail: String| {
        problems.push(Problem { seq, kind, detail });
    };
    let mut expected_first = 1i64;
    let mut expected_anchor = GENESIS_HASH.to_string();
    for m in manifests {
        let label = format!(
            "archive manifest {} ({}..{})",
            m.month, m.first_seq, m.last_seq
        );
        if m.key_id != want_key
            || !verify_hex_signature(key, archive_message(m).as_bytes(), &m.signature)
        {
            bad(
                m.first_seq,
                ProblemKind::BadArchiveManifest,
                format!("{label}: the signature does not verify with key {want_key}"),
            );
        } else if m.record_count != m.last_seq - m.first_seq + 1 {
            bad(
                m.first_seq,
                ProblemKind::BadArchiveManifest,
                format!("{label}: counts {} records", m.record_count),
            );
        }
        if m.first_seq > expected_first {
            bad(
                expected_first,
                ProblemKind::Deleted,
                format!(
                    "positions {expected_first}..{} are neither stored nor covered by an archive manifest (a manifest row was deleted?)",
                    m.first_seq - 1
                ),
            );
        } else if m.first_seq < expected_first {
            bad(
                m.first_seq,
                ProblemKind::BadArchiveManifest,
                format!("{label}: overlaps the previous archive"),
            );
        } else if m.anchor_prev_hash != expected_anchor {
            bad(
                m.first_seq,
                ProblemKind::BadArchiveManifest,
                format!("{label}: does not link to the hash before it"),
            );
        }
        expected_first = m.last_seq + 1;
        expected_anchor = m.last_hash.clone();
    }
    let range = manifests.last().map(|m| ArchivedRange {
        last_seq: m.last_seq,
        last_hash: m.last_hash.clone(),
        month: m.month.clone(),
        manifests: manifests.len() as u64,
    });
    (problems, range)
}
