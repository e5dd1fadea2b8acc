//! Retention: whole months older than the retention window leave the database as signed export
//! bundles, each recorded by a signed archive manifest row, and only then are dropped (the
//! month's PostgreSQL partition) or deleted (SQLite), in the manifest's transaction.
//!
//! An archive holds a contiguous range of chain positions: from the position after the previous
//! archive to the last position recorded (by `recorded_at`) before the end of its month. Records
//! of the next month appended before that one (clocks of replicas, queued events) travel with it;
//! a range that would hold a record inside the retention window is deferred (kept a while
//! longer), so nothing inside the window is ever removed.
//!
//! Steps per month, each safe to repeat after a crash:
//! 1. write the bundle (`export`) to `<dir>/yiqiao-audit-<YYYY-MM>-<first>-<last>-<run>.json`
//!    through a temporary file, fsync, rename — or reuse a file an interrupted run left for
//!    exactly this range;
//! 2. read the file back and verify it (signature, chain, range, anchor) with the public key;
//! 3. one transaction: check the range is still what was archived (count, last hash, nothing
//!    else in the month's partition), insert the signed manifest, drop the partition / delete.
//!
//! Verification of what remains starts from the last manifest's `last_hash`; the manifests
//! themselves must be validly signed and contiguous from position 1 (see [`check_manifests`]).

use std::path::{Path, PathBuf};

use chrono::{Datelike, Months, NaiveDate, NaiveDateTime, NaiveTime};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Date, Text};
use serde::{Deserialize, Serialize};
use yiqiao_sm::Sm2PublicKey;

use super::export::{Bundle, ExportError, Manifest as ExportManifest, export, verify_bundle};
use super::{
    AuditSigner, GENESIS_HASH, Problem, ProblemKind, format_time, key_id_of, verify_hex_signature,
};
use crate::store::schema::{audit_archives, audit_events};
use crate::store::{DbConn, StoreError, now_utc, write_tx};

mod files;
mod manifests;
mod months;
mod partitions;
mod range;

pub use files::*;
pub use manifests::*;
pub use months::*;
pub use partitions::*;
use range::*;

/// First line of an archive manifest's signed message.
pub const ARCHIVE_DOMAIN: &str = "yiqiao-audit-archive-v1";
/// The Cybersecurity Law (Art. 21) wants network logs kept at least six months.
pub const MIN_RETENTION_MONTHS: u32 = 6;
/// Archive file names start with this.
pub const FILE_PREFIX: &str = "yiqiao-audit-";

/// One archive: a row of `audit_archives`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Queryable, Insertable)]
#[diesel(table_name = audit_archives)]
pub struct ArchiveManifest {
    pub first_seq: i64,
    /// `YYYY-MM`: the month whose end bounds the range.
    pub month: String,
    pub last_seq: i64,
    pub record_count: i64,
    /// `prev_hash` of record `first_seq` (the previous archive's `last_hash`, or 64 zeros).
    pub anchor_prev_hash: String,
    pub last_hash: String,
    /// The file's name in the archive directory.
    pub file_name: String,
    /// SM3 of the file's bytes, lowercase hex.
    pub file_sm3: String,
    pub archived_at: NaiveDateTime,
    pub key_id: String,
    /// SM2 (signer id 1234567812345678) over [`archive_message`], DER, lowercase hex.
    pub signature: String,
}

/// The bytes a manifest signature covers.
pub fn archive_message(m: &ArchiveManifest) -> String {
    format!(
        "{ARCHIVE_DOMAIN}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
        m.month,
        m.first_seq,
        m.last_seq,
        m.record_count,
        m.anchor_prev_hash,
        m.last_hash,
        m.file_name,
        m.file_sm3,
        format_time(&m.archived_at),
        m.key_id
    )
}

#[derive(Debug, Clone)]
pub struct ArchiveOptions {
    /// Where archive files are written (created if missing).
    pub dir: PathBuf,
    pub retention_months: u32,
    /// Archive only months before this one (first day of a month); it may not reach into the
    /// retention window.
    pub before: Option<NaiveDate>,
    /// The current time (a parameter so tests are deterministic).
    pub now: NaiveDateTime,
    /// Most records in one archive file ([`DEFAULT_FILE_MAX_RECORDS`]); a month with more is
    /// archived as several consecutive ranges, each its own signed file and manifest.
    pub max_records_per_file: i64,
}

/// Default of [`ArchiveOptions::max_records_per_file`]: about 200 MB of records, a few times
/// that in memory while a file is written and checked.
pub const DEFAULT_FILE_MAX_RECORDS: i64 = 100_000;

/// What one run did.
#[derive(Debug, Default)]
pub struct ArchiveRun {
    /// Months before this one were eligible.
    pub cutoff: Option<NaiveDate>,
    pub archived: Vec<ArchiveManifest>,
    /// Files an interrupted earlier run had written, verified and used instead of new ones.
    pub reused_files: Vec<String>,
    /// Empty PostgreSQL partitions of eligible months that were dropped.
    pub dropped_empty: Vec<String>,
    /// Why archiving stopped early (a range holding a record inside the retention window).
    pub deferred: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The request itself is not allowed (e.g. `--before` inside the retention window).
    #[error("{0}")]
    Refused(String),
    /// The month could not be archived and verified; nothing of it was dropped.
    #[error("cannot archive {month}: {reason}; nothing of it was dropped")]
    Unverified { month: String, reason: String },
    #[error("archive file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] ExportError),
    #[error("signing failed: {0}")]
    Sign(String),
}

impl From<diesel::result::Error> for ArchiveError {
    fn from(e: diesel::result::Error) -> ArchiveError {
        ArchiveError::Store(StoreError::from_diesel(e))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ArchiveError + '_ {
    move |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Archive every whole month older than the retention window (and before `opts.before`), oldest
/// first. Idempotent: archived months are gone from the database, and a file an interrupted run
/// wrote for the same range is verified and reused.
pub fn archive(
    conn: &mut DbConn,
    signer: &AuditSigner,
    opts: &ArchiveOptions,
) -> Result<ArchiveRun, ArchiveError> {
    let mut cutoff = retention_cutoff(opts.now, opts.retention_months);
    if let Some(before) = opts.before {
        if before > cutoff {
            return Err(ArchiveError::Refused(format!(
                "--before {} reaches into the retention window of {} months: the latest allowed is {}",
                month_label(before),
                opts.retention_months,
                month_label(cutoff)
            )));
        }
        cutoff = before;
    }
    std::fs::create_dir_all(&opts.dir).map_err(io_error(&opts.dir))?;
    let cutoff_at = start_of(cutoff);
    let mut run = ArchiveRun {
        cutoff: Some(cutoff),
        ..ArchiveRun::default()
    };
    loop {
        let (archived_last, anchor) = match latest(conn)? {
            Some(m) => (m.last_seq, m.last_hash),
            None => (0, GENESIS_HASH.to_string()),
        };
        let oldest: Option<NaiveDateTime> = audit_events::table
            .filter(audit_events::seq.gt(archived_last))
            .select(diesel::dsl::min(audit_events::recorded_at))
            .first(conn)?;
        let Some(oldest) = oldest else { break };
        let month = month_of(oldest);
        let end = start_of(next_month(month));
        if end > cutoff_at {
            break;
        }
        let last: Option<i64> = audit_events::table
            .filter(audit_events::seq.gt(archived_last))
            .filter(audit_events::recorded_at.lt(end))
            .select(diesel::dsl::max(audit_events::seq))
            .first(conn)?;
        let Some(last) = last else { break };
        let first = archived_last + 1;
        let newest: Option<NaiveDateTime> = audit_events::table
            .filter(audit_events::seq.between(first, last))
            .select(diesel::dsl::max(audit_events::recorded_at))
            .first(conn)?;
        if newest.is_some_and(|t| t >= cutoff_at) {
            run.deferred = Some(format!(
                "{} not archived: its positions {first}..{last} hold records recorded on or after {} (appended late), which must be kept; it will be archived when they leave the window",
                month_label(month),
                month_label(cutoff)
            ));
            break;
        }
        // A large month goes in consecutive files of at most `max_records_per_file` records;
        // only the month's last one drops its partition.
        let chunk_last = last.min(first + opts.max_records_per_file.max(1) - 1);
        let range = Range {
            month,
            first,
            last: chunk_last,
            month_ends: chunk_last == last,
        };
        match archive_range(conn, signer, &opts.dir, range, &anchor, &mut run)? {
            Some(m) => run.archived.push(m),
            // Another run archived it meanwhile: look again.
            None => continue,
        }
    }
    run.dropped_empty = drop_empty_partitions(conn, cutoff)?;
    Ok(run)
}

#[cfg(test)]
mod tests;
