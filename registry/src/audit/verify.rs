//! Verification of the chain, shared by `yiqiao audit verify` (database) and the offline
//! verification of an export (records and checkpoints from the bundle).

use std::collections::HashMap;

use chrono::NaiveDateTime;
use diesel::prelude::*;
use serde::{Deserialize, Serialize};
use yiqiao_sm::Sm2PublicKey;

use super::append::{EventRow, IndexColumns};
use super::archive;
use super::{
    GENESIS_HASH, chain_hash, checkpoint_message, format_time, key_id_of, verify_hex_signature,
};
use crate::store::schema::{audit_checkpoints, audit_events};
use crate::store::{DbConn, StoreError};

/// A signed checkpoint of the chain head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRecord {
    pub seq: i64,
    pub head_hash: String,
    /// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, exactly as signed.
    pub signed_at: String,
    pub key_id: String,
    /// DER SM2 signature, lowercase hex.
    pub signature: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A record's content does not match its hash, or its columns disagree with its resource.
    Modified,
    /// Records are missing (a gap in positions, or a broken link to a record that is gone).
    Deleted,
    /// A record that is not part of the chain sits between chained records, or past the head.
    Inserted,
    /// Records are out of chain order.
    Reordered,
    /// Records a checkpoint, the chain head or a signed manifest vouches for are missing at the end.
    Truncated,
    /// A checkpoint whose signature does not verify with the gateway's key.
    BadCheckpointSignature,
    /// A validly signed checkpoint names a head hash the stored chain does not have (rewritten chain).
    CheckpointMismatch,
    /// An export's manifest signature does not verify, or the manifest disagrees with the records.
    BadManifest,
    /// An archive manifest row does not verify with the gateway key, or does not continue the
    /// previous archive.
    BadArchiveManifest,
}

impl ProblemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::Modified => "modified",
            ProblemKind::Deleted => "deleted",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Reordered => "reordered",
            ProblemKind::Truncated => "truncated",
            ProblemKind::BadCheckpointSignature => "bad-checkpoint-signature",
            ProblemKind::CheckpointMismatch => "checkpoint-mismatch",
            ProblemKind::BadManifest => "bad-manifest",
            ProblemKind::BadArchiveManifest => "bad-archive-manifest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The chain position where the problem is (0 for the manifest).
    pub seq: i64,
    pub kind: ProblemKind,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    pub records: u64,
    pub checkpoints: u64,
    /// Positions `1..=archived_through` were archived (`yiqiao audit archive`); verification
    /// continued from the last archive manifest's hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_through: Option<i64>,
    /// Archive manifests checked (signatures and continuity).
    #[serde(default)]
    pub archive_manifests: u64,
    /// Sorted by position; the first is the first broken position.
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
    pub fn first_problem(&self) -> Option<&Problem> {
        self.problems.first()
    }
}

fn decode32(hex_text: &str) -> [u8; 32] {
    let mut out = [0xffu8; 32];
    if hex_text.len() == 64 {
        let _ = hex::decode_to_slice(hex_text, &mut out);
    }
    out
}

struct Entry {
    seq: i64,
    prev: [u8; 32],
    hash: [u8; 32],
}

/// Streaming verifier: push records in position order, then [`ChainVerifier::finish`].
/// Keeps 72 bytes per record for the link analysis.
pub struct ChainVerifier {
    anchor: Option<[u8; 32]>,
    expected_first: Option<i64>,
    entries: Vec<Entry>,
    problems: Vec<Problem>,
    /// Positions with a reported gap or modification (their link problems are consequences).
    explained: std::collections::HashSet<i64>,
    stored_hash_at: HashMap<i64, String>,
}

impl ChainVerifier {
    /// `anchor`: the hash the first pushed record must link to (`GENESIS_HASH` from position 1);
    /// `None` when unknown (the first link is not checked).
    pub fn new(anchor: Option<&str>) -> ChainVerifier {
        ChainVerifier {
            anchor: anchor.map(decode32),
            expected_first: None,
            entries: Vec::new(),
            problems: Vec::new(),
            explained: Default::default(),
            stored_hash_at: HashMap::new(),
        }
    }

    /// The position the first pushed record must have: records missing before it are reported
    /// as deleted from this position on.
    pub fn expect_first(&mut self, seq: i64) {
        self.expected_first = Some(seq);
    }

    /// Record a problem found outside the chain itself (e.g. an export manifest).
    pub fn push_problem(&mut self, seq: i64, kind: ProblemKind, detail: impl Into<String>) {
        self.problem(seq, kind, detail);
    }

    fn problem(&mut self, seq: i64, kind: ProblemKind, detail: impl Into<String>) {
        self.problems.push(Problem {
            seq,
            kind,
            detail: detail.into(),
        });
    }

    /// One record as stored. `columns_match`: do the indexed columns describe the hashed
    /// resource (always true for exported records, which carry only the resource)?
    pub fn push(
        &mut self,
        seq: i64,
        prev_hash: &str,
        hash: &str,
        resource: &str,
        columns_match: bool,
    ) {
        if let Some(expected) = self.expected_first.filter(|_| self.entries.is_empty())
            && seq > expected
        {
            self.problem(
                expected,
                ProblemKind::Deleted,
                if seq == expected + 1 {
                    format!("record {expected} is missing")
                } else {
                    format!("records {expected}..{} are missing", seq - 1)
                },
            );
            self.explained.insert(seq);
        }
        if let Some(last) = self.entries.last() {
            if seq == last.seq {
                self.problem(
                    seq,
                    ProblemKind::Inserted,
                    format!("position {seq} is stored twice"),
                );
                self.explained.insert(seq);
            } else if seq < last.seq {
                self.problem(
                    seq,
                    ProblemKind::Reordered,
                    format!("position {seq} follows position {}", last.seq),
                );
            } else if seq > last.seq + 1 {
                let (a, b) = (last.seq + 1, seq - 1);
                self.problem(
                    a,
                    ProblemKind::Deleted,
                    if a == b {
                        format!("record {a} is missing")
                    } else {
                        format!("records {a}..{b} are missing")
                    },
                );
                self.explained.insert(seq);
            }
        }
        if chain_hash(prev_hash, resource) != hash {
            self.problem(
                seq,
                ProblemKind::Modified,
                "the content does not match the record's hash",
            );
            self.explained.insert(seq);
            self.explained.insert(seq + 1);
        } else if !columns_match {
            self.problem(
                seq,
                ProblemKind::Modified,
                "the indexed columns disagree with the hashed AuditEvent",
            );
            self.explained.insert(seq);
        }
        self.stored_hash_at.insert(seq, hash.to_string());
        self.entries.push(Entry {
            seq,
            prev: decode32(prev_hash),
            hash: decode32(hash),
        });
    }

    /// Link analysis, checkpoints and the expected end.
    /// `expected_end`: the last position that must be present (chain head, signed manifest).
    pub fn finish(
        mut self,
        checkpoints: &[CheckpointRecord],
        public_key: &Sm2PublicKey,
        expected_end: Option<i64>,
    ) -> Report {
        let index: HashMap<[u8; 32], usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.hash, i))
            .collect();
        let mut suppress_until: Option<usize> = None;
        for i in 0..self.entries.len() {
            let expected = if i == 0 {
                self.anchor
            } else {
                Some(self.entries[i - 1].hash)
            };
            let Some(expected) = expected else { continue };
            let e = &self.entries[i];
            if e.prev == expected {
                continue;
            }
            let seq = e.seq;
            if suppress_until.is_some_and(|u| i <= u) || self.explained.contains(&seq) {
                continue;
            }
            match index.get(&e.prev).copied() {
                Some(j) if j > i => {
                    let detail = format!(
                        "record {seq} links to record {}, which is stored after it",
                        self.entries[j].seq
                    );
                    self.problem(seq, ProblemKind::Reordered, detail);
                    suppress_until = Some(j + 1);
                }
                Some(j) if j + 1 < i => {
                    let (a, b) = (self.entries[j + 1].seq, self.entries[i - 1].seq);
                    let detail = if a == b {
                        format!(
                            "record {a} is not linked into the chain (record {seq} links to {})",
                            self.entries[j].seq
                        )
                    } else {
                        format!(
                            "records {a}..{b} are not linked into the chain (record {seq} links to {})",
                            self.entries[j].seq
                        )
                    };
                    self.problem(a, ProblemKind::Inserted, detail);
                }
                _ => {
                    let detail = if i == 0 {
                        format!("record {seq} does not link to the preceding record")
                    } else {
                        format!("the record(s) record {seq} links to are missing before it")
                    };
                    self.problem(seq, ProblemKind::Deleted, detail);
                }
            }
        }
        let last = self.entries.last().map(|e| e.seq);
        let first = self.entries.first().map(|e| e.seq);
        let want_key = key_id_of(public_key);
        for cp in checkpoints {
            let msg = checkpoint_message(cp.seq, &cp.head_hash, &cp.signed_at, &cp.key_id);
            if cp.key_id != want_key
                || !verify_hex_signature(public_key, msg.as_bytes(), &cp.signature)
            {
                self.problem(
                    cp.seq,
                    ProblemKind::BadCheckpointSignature,
                    format!(
                        "checkpoint at {} (key {}) does not verify with key {want_key}",
                        cp.seq, cp.key_id
                    ),
                );
                continue;
            }
            match self.stored_hash_at.get(&cp.seq) {
                Some(h) if *h == cp.head_hash => {}
                Some(_) => self.problem(cp.seq, ProblemKind::CheckpointMismatch, format!(
                    "the signed checkpoint at {} names another head hash: the chain up to it was rewritten", cp.seq
                )),
                None if last.is_none_or(|l| cp.seq > l) => self.problem(
                    last.map_or(cp.seq, |l| l + 1),
                    ProblemKind::Truncated,
                    format!("a signed checkpoint vouches for records up to {}, the records end at {}", cp.seq, last.map_or("nothing".into(), |l| l.to_string())),
                ),
                None if first.is_some_and(|f| cp.seq < f) => {}
                None => {} // a gap, already reported as deleted
            }
        }
        if let Some(end) = expected_end {
            match last {
                Some(l) if l > end => {
                    self.problem(
                        end + 1,
                        ProblemKind::Inserted,
                        format!("records {}..{l} lie past the chain head {end}", end + 1),
                    );
                }
                Some(l)
                    if l < end
                        && !self
                            .problems
                            .iter()
                            .any(|p| p.kind == ProblemKind::Truncated) =>
                {
                    self.problem(
                        l + 1,
                        ProblemKind::Truncated,
                        format!("the chain head is {end}, the records end at {l}"),
                    );
                }
                None if end >= self.expected_first.unwrap_or(1) => {
                    self.problem(
                        self.expected_first.unwrap_or(1),
                        ProblemKind::Truncated,
                        format!("the chain head is {end}, there are no records"),
                    );
                }
                _ => {}
            }
        }
        self.problems.sort_by_key(|p| p.seq);
        Report {
            first_seq: first,
            last_seq: last,
            records: self.entries.len() as u64,
            checkpoints: checkpoints.len() as u64,
            archived_through: None,
            archive_manifests: 0,
            problems: self.problems,
        }
    }
}

#[derive(Queryable)]
struct CheckpointDbRow {
    seq: i64,
    head_hash: String,
    signed_at: NaiveDateTime,
    key_id: String,
    signature: String,
}

impl From<CheckpointDbRow> for CheckpointRecord {
    fn from(r: CheckpointDbRow) -> CheckpointRecord {
        CheckpointRecord {
            seq: r.seq,
            head_hash: r.head_hash,
            signed_at: format_time(&r.signed_at),
            key_id: r.key_id,
            signature: r.signature,
        }
    }
}

/// Records are read in pages of this many rows.
const PAGE: i64 = 5000;

/// Does a stored row's columns describe its hashed resource?
pub(super) fn columns_match(row: &EventRow) -> bool {
    match serde_json::from_str::<serde_json::Value>(&row.resource) {
        Ok(stored) => IndexColumns::of_resource(&stored) == row.index(),
        Err(_) => false,
    }
}

/// Verify positions `from..=to` (default: the whole chain) as stored in the database.
pub fn verify_db(
    conn: &mut DbConn,
    from: Option<i64>,
    to: Option<i64>,
    public_key: &Sm2PublicKey,
) -> Result<Report, StoreError> {
    // One snapshot for the head, the records and the checkpoints: a gateway appending while
    // verification runs must not look like records inserted past the head. SQLite (WAL) keeps
    // one snapshot from the first read of a transaction; PostgreSQL needs REPEATABLE READ.
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        if let DbConn::Postgresql(pg) = conn {
            diesel::sql_query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(pg)?;
        }
        Ok(verify_snapshot(conn, from, to, public_key))
    })
    .map_err(StoreError::from_diesel)?
}

fn verify_snapshot(
    conn: &mut DbConn,
    from: Option<i64>,
    to: Option<i64>,
    public_key: &Sm2PublicKey,
) -> Result<Report, StoreError> {
    let (head_seq, _, _) = super::chain_head(conn)?;
    // Archived positions are verified from their files; the manifests say where the stored
    // records continue and with which hash.
    let (manifest_problems, archived) =
        archive::check_manifests(&archive::manifests(conn)?, public_key);
    let archived_last = archived.as_ref().map_or(0, |a| a.last_seq);
    let requested = from.unwrap_or(1).max(1);
    let at_boundary = requested <= archived_last + 1;
    let from = requested.max(archived_last + 1);
    let anchor: Option<String> = if from == 1 {
        Some(GENESIS_HASH.to_string())
    } else if from == archived_last + 1 {
        archived.as_ref().map(|a| a.last_hash.clone())
    } else {
        audit_events::table
            .filter(audit_events::seq.eq(from - 1))
            .select(audit_events::hash)
            .first(conn)
            .optional()
            .map_err(StoreError::from_diesel)?
    };
    let mut verifier = ChainVerifier::new(anchor.as_deref());
    verifier.expect_first(from);
    if at_boundary {
        for p in manifest_problems {
            verifier.push_problem(p.seq, p.kind, p.detail);
        }
    }
    let mut next = from;
    loop {
        let mut q = audit_events::table
            .filter(audit_events::seq.ge(next))
            .order(audit_events::seq.asc())
            .limit(PAGE)
            .into_boxed();
        if let Some(to) = to {
            q = q.filter(audit_events::seq.le(to));
        }
        let rows: Vec<EventRow> = q.load(conn).map_err(StoreError::from_diesel)?;
        for row in &rows {
            verifier.push(
                row.seq,
                &row.prev_hash,
                &row.hash,
                &row.resource,
                columns_match(row),
            );
        }
        match rows.last() {
            Some(last) if rows.len() as i64 == PAGE => next = last.seq + 1,
            _ => break,
        }
    }
    let mut cq = audit_checkpoints::table
        .filter(audit_checkpoints::seq.ge(from))
        .order(audit_checkpoints::seq.asc())
        .into_boxed();
    if let Some(to) = to {
        cq = cq.filter(audit_checkpoints::seq.le(to));
    }
    let checkpoints: Vec<CheckpointRecord> = cq
        .load::<CheckpointDbRow>(conn)
        .map_err(StoreError::from_diesel)?
        .into_iter()
        .map(CheckpointRecord::from)
        .collect();
    let expected_end = match to {
        Some(to) => to.min(head_seq),
        None => head_seq,
    };
    let expected_end = (expected_end >= from).then_some(expected_end);
    let mut report = verifier.finish(&checkpoints, public_key, expected_end);
    if at_boundary && let Some(a) = &archived {
        report.archived_through = Some(a.last_seq);
        report.archive_manifests = a.manifests;
    }
    Ok(report)
}

/// The first position recorded at or after `t`.
pub fn seq_at_or_after(conn: &mut DbConn, t: NaiveDateTime) -> Result<Option<i64>, StoreError> {
    audit_events::table
        .filter(audit_events::recorded_at.ge(t))
        .select(diesel::dsl::min(audit_events::seq))
        .first(conn)
        .map_err(StoreError::from_diesel)
}

/// The last position recorded at or before `t`.
pub fn seq_at_or_before(conn: &mut DbConn, t: NaiveDateTime) -> Result<Option<i64>, StoreError> {
    audit_events::table
        .filter(audit_events::recorded_at.le(t))
        .select(diesel::dsl::max(audit_events::seq))
        .first(conn)
        .map_err(StoreError::from_diesel)
}

/// Checkpoints with positions in `from..=to`, for export.
pub(super) fn load_checkpoints(
    conn: &mut DbConn,
    from: i64,
    to: i64,
) -> Result<Vec<CheckpointRecord>, StoreError> {
    Ok(audit_checkpoints::table
        .filter(audit_checkpoints::seq.ge(from))
        .filter(audit_checkpoints::seq.le(to))
        .order(audit_checkpoints::seq.asc())
        .load::<CheckpointDbRow>(conn)
        .map_err(StoreError::from_diesel)?
        .into_iter()
        .map(CheckpointRecord::from)
        .collect())
}
