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

/// The first day of `t`'s month.
pub fn month_of(t: NaiveDateTime) -> NaiveDate {
    t.date().with_day(1).unwrap_or(t.date())
}

fn next_month(m: NaiveDate) -> NaiveDate {
    m.checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX)
}

fn start_of(m: NaiveDate) -> NaiveDateTime {
    m.and_time(NaiveTime::MIN)
}

/// `YYYY-MM`.
pub fn month_label(m: NaiveDate) -> String {
    m.format("%Y-%m").to_string()
}

/// Parse `YYYY-MM` to the first day of that month.
pub fn parse_month(text: &str) -> Option<NaiveDate> {
    if text.len() != 7 {
        return None;
    }
    NaiveDate::parse_from_str(&format!("{text}-01"), "%Y-%m-%d").ok()
}

/// The first month that must be kept at `now`: every month that ends on or before the start
/// of this one is older than `retention_months` months.
pub fn retention_cutoff(now: NaiveDateTime, retention_months: u32) -> NaiveDate {
    month_of(
        now.checked_sub_months(Months::new(retention_months))
            .unwrap_or(NaiveDateTime::MIN),
    )
}

/// PostgreSQL partition of a month: `audit_events_pYYYYMM`.
pub fn partition_name(m: NaiveDate) -> String {
    format!("audit_events_p{}", m.format("%Y%m"))
}

#[derive(QueryableByName)]
struct Created {
    #[diesel(sql_type = Bool)]
    created: bool,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Create the partition of `month` unless it exists (moving rows of that month out of the
/// DEFAULT partition). True when created. No-op on SQLite.
pub fn ensure_partition(conn: &mut DbConn, month: NaiveDate) -> Result<bool, StoreError> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(false);
    };
    let row: Created = diesel::sql_query("SELECT yiqiao_audit_ensure_partition($1) AS created")
        .bind::<Date, _>(month)
        .get_result(pg)
        .map_err(StoreError::from_diesel)?;
    Ok(row.created)
}

/// Make sure partitions exist for the month of `now` and the `months_ahead` following ones, so
/// an insert never lands in the DEFAULT partition for want of one. Returns the partitions it
/// created. No-op on SQLite.
pub fn ensure_partitions(
    conn: &mut DbConn,
    now: NaiveDateTime,
    months_ahead: u32,
) -> Result<Vec<String>, StoreError> {
    let mut created = Vec::new();
    let mut month = month_of(now);
    for _ in 0..=months_ahead {
        if ensure_partition(conn, month)? {
            created.push(partition_name(month));
        }
        month = next_month(month);
    }
    Ok(created)
}

/// The partitions of `audit_events` (PostgreSQL), sorted; empty on SQLite.
pub fn partitions(conn: &mut DbConn) -> Result<Vec<String>, StoreError> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(Vec::new());
    };
    let rows: Vec<Name> = diesel::sql_query(
        "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'audit_events'::regclass ORDER BY 1",
    )
    .load(pg)
    .map_err(StoreError::from_diesel)?;
    Ok(rows.into_iter().map(|r| r.name).collect())
}

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

/// Archive files already in `dir` for exactly this range (an interrupted run's).
fn candidates(dir: &Path, prefix: &str) -> Result<Vec<String>, ArchiveError> {
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

/// Take the exclusive lock on `audit_events` for dropping a partition, waiting at most 2 s: a
/// waiting exclusive lock holds every append queued behind it, and a request waits for its
/// audit record only `audit.write_timeout_ms` (5 s by default) before it fails closed.
const LOCK_AUDIT_EVENTS: &str =
    "SET LOCAL lock_timeout = '2s'; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE";

/// Attempts at a transaction that needs [`LOCK_AUDIT_EVENTS`] (a long reader, e.g. a
/// verification, holds it off), one second apart.
const LOCK_ATTEMPTS: u32 = 10;

fn lock_timed_out(e: &ArchiveError) -> bool {
    matches!(e, ArchiveError::Store(s) if s.to_string().contains("lock timeout"))
}

/// Run `work` again while it fails on the lock timeout, up to [`LOCK_ATTEMPTS`] times.
fn with_lock_retries<T>(
    mut work: impl FnMut() -> Result<T, ArchiveError>,
) -> Result<T, ArchiveError> {
    let mut attempt = 1;
    loop {
        match work() {
            Err(e) if lock_timed_out(&e) && attempt < LOCK_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Steps 1–2 with a new file: export, write durably, read back and verify. Returns the file
/// name and what [`check_file`] found.
fn write_archive_file(
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

/// Positions `first..=last` of `month`; `month_ends`: the month has no later positions.
#[derive(Debug, Clone, Copy)]
struct Range {
    month: NaiveDate,
    first: i64,
    last: i64,
    month_ends: bool,
}

/// Steps 1–3 for one range. `None` when another run archived an overlapping range first.
fn archive_range(
    conn: &mut DbConn,
    signer: &AuditSigner,
    dir: &Path,
    range: Range,
    anchor: &str,
    run: &mut ArchiveRun,
) -> Result<Option<ArchiveManifest>, ArchiveError> {
    let Range {
        month, first, last, ..
    } = range;
    let key = signer.public_key();
    let label = month_label(month);
    let prefix = format!("{FILE_PREFIX}{label}-{first}-{last}-");
    let mut chosen = None;
    for name in candidates(dir, &prefix)? {
        if let Ok(checked) = check_file(&dir.join(&name), key, first, last, anchor) {
            run.reused_files.push(name.clone());
            chosen = Some((name, checked));
            break;
        }
    }
    let mut created = None;
    let prepared = match chosen {
        Some(c) => Ok(c),
        None => write_archive_file(conn, signer, dir, &prefix, first, last, anchor).map(
            |(name, checked)| {
                created = Some(dir.join(&name));
                (name, checked)
            },
        ),
    };
    let (file_name, (file_sm3, last_hash)) = match prepared {
        Ok(p) => p,
        // Another run archived the range meanwhile (its rows are gone): look again.
        Err(_) if latest(conn)?.is_some_and(|m| m.last_seq >= first) => return Ok(None),
        Err(ArchiveError::Unverified { reason, .. }) => {
            return Err(ArchiveError::Unverified {
                month: label,
                reason,
            });
        }
        Err(e) => return Err(e),
    };
    let mut manifest = ArchiveManifest {
        first_seq: first,
        month: label.clone(),
        last_seq: last,
        record_count: last - first + 1,
        anchor_prev_hash: anchor.to_string(),
        last_hash,
        file_name,
        file_sm3,
        archived_at: now_utc(),
        key_id: signer.key_id().to_string(),
        signature: String::new(),
    };
    manifest.signature = signer
        .sign_hex(archive_message(&manifest).as_bytes())
        .map_err(|e| ArchiveError::Sign(e.to_string()))?;
    if with_lock_retries(|| commit(conn, &manifest, range))? {
        Ok(Some(manifest))
    } else {
        // Lost to a concurrent run: remove the file we wrote unless that run took it (it may
        // have found and verified it as an interrupted run's file).
        if let Some(path) = created {
            let ours = manifest.file_name.clone();
            let taken: i64 = audit_archives::table
                .filter(audit_archives::file_name.eq(ours))
                .count()
                .get_result(conn)?;
            if taken == 0 {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(None)
    }
}

/// Step 3: in one transaction, check the range is unchanged, record the manifest, drop the
/// month's partition (PostgreSQL) and delete the range's remaining rows. False when an
/// overlapping manifest exists (another run won).
fn commit(conn: &mut DbConn, m: &ArchiveManifest, range: Range) -> Result<bool, ArchiveError> {
    let month = range.month;
    let changed = |why: String| ArchiveError::Unverified {
        month: m.month.clone(),
        reason: why,
    };
    write_tx::<_, ArchiveError>(conn, |tx| {
        if let DbConn::Postgresql(pg) = tx {
            // Appends wait while the month goes: nothing can be added to it between the checks
            // below and the drop.
            pg.batch_execute(LOCK_AUDIT_EVENTS)?;
        }
        let overlapping: i64 = audit_archives::table
            .filter(audit_archives::first_seq.le(m.last_seq))
            .filter(audit_archives::last_seq.ge(m.first_seq))
            .count()
            .get_result(tx)?;
        if overlapping > 0 {
            return Ok(false);
        }
        let previous: Option<i64> = audit_archives::table
            .select(diesel::dsl::max(audit_archives::last_seq))
            .first(tx)?;
        if previous.unwrap_or(0) + 1 != m.first_seq {
            return Err(changed(format!(
                "the previous archive ends at {}, not {}",
                previous.unwrap_or(0),
                m.first_seq - 1
            )));
        }
        let stored: i64 = audit_events::table
            .filter(audit_events::seq.between(m.first_seq, m.last_seq))
            .count()
            .get_result(tx)?;
        let last_hash: Option<String> = audit_events::table
            .filter(audit_events::seq.eq(m.last_seq))
            .select(audit_events::hash)
            .first(tx)
            .optional()?;
        if stored != m.record_count || last_hash.as_deref() != Some(m.last_hash.as_str()) {
            return Err(changed(format!(
                "positions {}..{} changed in the database since they were exported",
                m.first_seq, m.last_seq
            )));
        }
        diesel::insert_into(audit_archives::table)
            .values(m)
            .execute(tx)?;
        let mut removed = 0i64;
        // The month's partition goes with its last range; earlier ranges delete their rows.
        if range.month_ends
            && let DbConn::Postgresql(pg) = tx
        {
            let part = partition_name(month);
            let exists: Count = diesel::sql_query(
                "SELECT count(*) AS n FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'audit_events'::regclass AND c.relname = $1",
            )
            .bind::<Text, _>(&part)
            .get_result(pg)?;
            if exists.n > 0 {
                let outside: Count = diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM {part} WHERE seq < $1 OR seq > $2"
                ))
                .bind::<BigInt, _>(m.first_seq)
                .bind::<BigInt, _>(m.last_seq)
                .get_result(pg)?;
                if outside.n > 0 {
                    return Err(changed(format!(
                        "{} record(s) of the month lie outside positions {}..{} (appended meanwhile?); run again",
                        outside.n, m.first_seq, m.last_seq
                    )));
                }
                let inside: Count = diesel::sql_query(format!("SELECT count(*) AS n FROM {part}"))
                    .get_result(pg)?;
                diesel::sql_query(format!("DROP TABLE {part}")).execute(pg)?;
                removed += inside.n;
            }
        }
        removed += diesel::delete(
            audit_events::table.filter(audit_events::seq.between(m.first_seq, m.last_seq)),
        )
        .execute(tx)? as i64;
        if removed != m.record_count {
            return Err(changed(format!(
                "removing positions {}..{} would remove {removed} records, the archive holds {}",
                m.first_seq, m.last_seq, m.record_count
            )));
        }
        Ok(true)
    })
}

/// Drop the empty partitions of months before `cutoff` (PostgreSQL); nothing on SQLite.
fn drop_empty_partitions(
    conn: &mut DbConn,
    cutoff: NaiveDate,
) -> Result<Vec<String>, ArchiveError> {
    let mut dropped = Vec::new();
    for part in partitions(conn)? {
        let Some(month) = part
            .strip_prefix("audit_events_p")
            .and_then(|d| NaiveDate::parse_from_str(&format!("{d}01"), "%Y%m%d").ok())
        else {
            continue;
        };
        if next_month(month) > cutoff {
            continue;
        }
        let DbConn::Postgresql(pg) = &mut *conn else {
            break;
        };
        let gone = with_lock_retries(|| {
            Ok(pg.transaction::<_, diesel::result::Error, _>(|pg| {
                pg.batch_execute(LOCK_AUDIT_EVENTS)?;
                let rows: Count = diesel::sql_query(format!(
                    "SELECT count(*) AS n FROM (SELECT 1 FROM {part} LIMIT 1) AS any_row"
                ))
                .get_result(pg)?;
                if rows.n == 0 {
                    diesel::sql_query(format!("DROP TABLE {part}")).execute(pg)?;
                }
                Ok(rows.n == 0)
            })?)
        })?;
        if gone {
            dropped.push(part);
        }
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn at(text: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").unwrap()
    }

    #[test]
    fn cutoff_keeps_whole_months_of_the_window() {
        // 30 Nov minus 6 months is 30 May: months ending by 1 May (April and earlier) may go.
        let cutoff = retention_cutoff(at("2026-11-30 10:00:00"), 6);
        assert_eq!(month_label(cutoff), "2026-05");
        // On the first of a month, exactly six months back is the start of that month.
        let cutoff = retention_cutoff(at("2026-11-01 00:00:00"), 6);
        assert_eq!(month_label(cutoff), "2026-05");
        assert_eq!(parse_month("2025-02"), NaiveDate::from_ymd_opt(2025, 2, 1));
        assert_eq!(parse_month("2025-2"), None);
        assert_eq!(parse_month("2025-13"), None);
        assert_eq!(
            partition_name(parse_month("2025-02").unwrap()),
            "audit_events_p202502"
        );
    }

    #[test]
    fn manifest_chain_problems_are_named() {
        let key = yiqiao_sm::Sm2PrivateKey::generate().unwrap();
        let signer = AuditSigner::new(&key).unwrap();
        let make = |first: i64, last: i64, anchor: &str, last_hash: &str| {
            let mut m = ArchiveManifest {
                first_seq: first,
                month: "2025-01".into(),
                last_seq: last,
                record_count: last - first + 1,
                anchor_prev_hash: anchor.into(),
                last_hash: last_hash.into(),
                file_name: "f.json".into(),
                file_sm3: "00".into(),
                archived_at: at("2026-11-30 10:00:00"),
                key_id: signer.key_id().into(),
                signature: String::new(),
            };
            m.signature = signer.sign_hex(archive_message(&m).as_bytes()).unwrap();
            m
        };
        let a = make(1, 10, GENESIS_HASH, "aa");
        let b = make(11, 20, "aa", "bb");
        let (problems, range) = check_manifests(&[a.clone(), b.clone()], signer.public_key());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(range.unwrap().last_seq, 20);
        // A deleted first row.
        let (problems, _) = check_manifests(std::slice::from_ref(&b), signer.public_key());
        assert_eq!(problems[0].kind, ProblemKind::Deleted);
        assert_eq!(problems[0].seq, 1);
        // An edited row.
        let mut edited = b.clone();
        edited.last_seq = 25;
        edited.record_count = 15;
        let (problems, _) = check_manifests(&[a, edited], signer.public_key());
        assert_eq!(problems[0].kind, ProblemKind::BadArchiveManifest);
        assert_eq!(problems[0].seq, 11);
    }

    // ---- against real databases (both backends) ----

    use crate::Backend;
    use crate::audit::{AppendOptions, AuditEvent, PreparedEvent, append_batch, verify_db};
    use crate::store::testdb::TestStore;
    use diesel::connection::SimpleConnection;

    const NOW: &str = "2026-11-30 10:00:00";

    fn signer() -> AuditSigner {
        AuditSigner::new(&yiqiao_sm::Sm2PrivateKey::generate().unwrap()).unwrap()
    }

    /// Append one record per time, in this order (positions 1, 2, …), checkpoints every 3.
    fn append_at(conn: &mut DbConn, signer: &AuditSigner, times: &[&str]) {
        let batch: Vec<PreparedEvent> = times
            .iter()
            .map(|t| {
                let mut e = AuditEvent::rest("read", "R", "test");
                e.recorded_at = NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").unwrap();
                e.agent_institution = Some("hosp-001".into());
                PreparedEvent::new(e)
            })
            .collect();
        let opts = AppendOptions {
            checkpoint_every: 3,
            force_checkpoint: false,
        };
        for one in batch.chunks(1) {
            append_batch(conn, one, signer, opts).unwrap();
        }
    }

    fn opts(dir: &Path) -> ArchiveOptions {
        ArchiveOptions {
            dir: dir.to_path_buf(),
            retention_months: 6,
            before: None,
            now: at(NOW),
            max_records_per_file: DEFAULT_FILE_MAX_RECORDS,
        }
    }

    fn stored_positions(conn: &mut DbConn) -> Vec<i64> {
        audit_events::table
            .select(audit_events::seq)
            .order(audit_events::seq.asc())
            .load(conn)
            .unwrap()
    }

    /// (month, first, last) of each manifest a run wrote.
    fn ranges(run: &ArchiveRun) -> Vec<(String, i64, i64)> {
        run.archived
            .iter()
            .map(|m| (m.month.clone(), m.first_seq, m.last_seq))
            .collect()
    }

    fn scratch_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "yiqiao-archive-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A month larger than `max_records_per_file` goes in consecutive files of at most that
    /// many records, each verifiable alone; the month's partition is dropped with its last
    /// file only, and what remains verifies across all the manifests.
    fn archives_a_large_month_in_several_files(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        let signer = signer();
        let key = signer.public_key().clone();
        let jan = parse_month("2025-01").unwrap();
        ensure_partition(conn, jan).unwrap();
        let times: Vec<String> = (1..=7)
            .map(|d| format!("2025-01-{d:02} 08:00:00"))
            .chain([
                "2025-02-03 10:00:00".to_string(),
                "2026-11-29 10:00:00".to_string(),
            ])
            .collect();
        append_at(
            conn,
            &signer,
            &times.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let dir = scratch_dir();
        let mut small = opts(&dir);
        small.max_records_per_file = 3;
        let run = archive(conn, &signer, &small).unwrap();
        assert_eq!(
            ranges(&run),
            vec![
                ("2025-01".to_string(), 1, 3),
                ("2025-01".to_string(), 4, 6),
                ("2025-01".to_string(), 7, 7),
                ("2025-02".to_string(), 8, 8),
            ]
        );
        let mut anchor = GENESIS_HASH.to_string();
        for m in &run.archived {
            assert_eq!(m.anchor_prev_hash, anchor, "files chain on");
            let path = dir.join(&m.file_name);
            check_file(&path, &key, m.first_seq, m.last_seq, &m.anchor_prev_hash).unwrap();
            let bundle: Bundle = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert!(bundle.records.len() <= 3);
            assert!(verify_bundle(&bundle, &key).ok());
            anchor = m.last_hash.clone();
        }
        assert_eq!(stored_positions(conn), vec![9]);
        if backend == Backend::Postgres {
            let parts = partitions(conn).unwrap();
            assert!(
                !parts.contains(&"audit_events_p202501".to_string()),
                "{parts:?}"
            );
        }
        let report = verify_db(conn, None, None, &key).unwrap();
        assert!(report.ok(), "{:#?}", report.problems);
        assert_eq!(report.archive_manifests, 4);
        assert_eq!((report.first_seq, report.last_seq), (Some(9), Some(9)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Old months (one with a record of the next month appended before its last record, one
    /// whose month has no partition on PostgreSQL) are archived, verified and dropped; what is
    /// inside the retention window stays; the remaining chain verifies from the last manifest;
    /// tampering with what remains, with a manifest row or deleting one is detected.
    fn archives_old_months_and_verifies_across_them(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        let signer = signer();
        let key = signer.public_key().clone();
        let jan = parse_month("2025-01").unwrap();
        let feb = parse_month("2025-02").unwrap();
        // 2025-01 and 2025-02 get partitions; 2025-03 lands in the DEFAULT partition.
        let pg = backend == Backend::Postgres;
        assert_eq!(ensure_partition(conn, jan).unwrap(), pg);
        assert_eq!(ensure_partition(conn, feb).unwrap(), pg);
        assert!(!ensure_partition(conn, feb).unwrap());
        append_at(
            conn,
            &signer,
            &[
                "2025-01-05 08:00:00",
                "2025-01-20 09:00:00",
                "2025-01-31 23:59:59",
                "2025-02-01 00:00:01",
                "2025-01-31 23:59:59.500",
                "2025-02-10 12:00:00",
                "2025-03-15 12:00:00",
                "2026-05-02 00:00:00",
                "2026-11-29 10:00:00",
            ],
        );
        assert!(verify_db(conn, None, None, &key).unwrap().ok());
        let dir = scratch_dir();
        // --before may not reach into the window.
        let mut inside = opts(&dir);
        inside.before = parse_month("2026-06");
        assert!(matches!(
            archive(conn, &signer, &inside),
            Err(ArchiveError::Refused(_))
        ));

        let run = archive(conn, &signer, &opts(&dir)).unwrap();
        assert_eq!(
            ranges(&run),
            vec![
                ("2025-01".to_string(), 1, 5),
                ("2025-02".to_string(), 6, 6),
                ("2025-03".to_string(), 7, 7)
            ]
        );
        assert!(run.deferred.is_none(), "{:?}", run.deferred);
        // Nothing inside the window (May 2026 on) was touched.
        assert_eq!(stored_positions(conn), vec![8, 9]);
        // Every file verifies with the public key alone, as an export does.
        for m in &run.archived {
            let path = dir.join(&m.file_name);
            let (sm3, last_hash) =
                check_file(&path, &key, m.first_seq, m.last_seq, &m.anchor_prev_hash).unwrap();
            assert_eq!((sm3, last_hash), (m.file_sm3.clone(), m.last_hash.clone()));
            let bundle: Bundle = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert!(verify_bundle(&bundle, &key).ok());
        }
        assert_eq!(manifests(conn).unwrap(), run.archived);
        if backend == Backend::Postgres {
            let parts = partitions(conn).unwrap();
            assert!(
                !parts.contains(&"audit_events_p202501".to_string()),
                "{parts:?}"
            );
            assert!(
                !parts.contains(&"audit_events_p202502".to_string()),
                "{parts:?}"
            );
            assert!(
                parts.contains(&"audit_events_default".to_string()),
                "{parts:?}"
            );
        }
        // What remains verifies, continuing from the last manifest's hash.
        let report = verify_db(conn, None, None, &key).unwrap();
        assert!(report.ok(), "{:#?}", report.problems);
        assert_eq!((report.first_seq, report.last_seq), (Some(8), Some(9)));
        assert_eq!(
            (report.archived_through, report.archive_manifests),
            (Some(7), 3)
        );
        // A range starting inside the archive is verified from where the records continue.
        assert!(verify_db(conn, Some(2), None, &key).unwrap().ok());
        // Idempotent: a second run has nothing to do.
        let again = archive(conn, &signer, &opts(&dir)).unwrap();
        assert!(again.archived.is_empty() && again.reused_files.is_empty());
        // An export now starts after the archive.
        let bundle = export(conn, None, None, &signer).unwrap();
        assert!(verify_bundle(&bundle, &key).ok());
        assert_eq!(bundle.records.first().map(|r| r.seq), Some(8));
        assert!(matches!(
            export(conn, Some(3), None, &signer),
            Err(ExportError::Archived(7))
        ));

        // Tampering with a remaining record is still detected.
        conn.batch_execute(
            "UPDATE audit_events SET resource = replace(resource, 'hosp-001', 'hosp-002') WHERE seq = 9",
        )
        .unwrap();
        let report = verify_db(conn, None, None, &key).unwrap();
        assert_eq!(
            report.first_problem().map(|p| (p.seq, p.kind)),
            Some((9, ProblemKind::Modified))
        );
        conn.batch_execute(
            "UPDATE audit_events SET resource = replace(resource, 'hosp-002', 'hosp-001') WHERE seq = 9",
        )
        .unwrap();
        assert!(verify_db(conn, None, None, &key).unwrap().ok());
        // An edited manifest row.
        conn.batch_execute(
            "UPDATE audit_archives SET last_seq = 8, record_count = 2 WHERE first_seq = 7",
        )
        .unwrap();
        let report = verify_db(conn, None, None, &key).unwrap();
        let first = report.first_problem().unwrap();
        assert_eq!(
            (first.seq, first.kind),
            (7, ProblemKind::BadArchiveManifest),
            "{:#?}",
            report.problems
        );
        conn.batch_execute(
            "UPDATE audit_archives SET last_seq = 7, record_count = 1 WHERE first_seq = 7",
        )
        .unwrap();
        assert!(verify_db(conn, None, None, &key).unwrap().ok());
        // A deleted manifest row: the last one, then a middle one.
        for victim in [7i64, 6] {
            let saved: ArchiveManifest = audit_archives::table.find(victim).first(conn).unwrap();
            diesel::delete(audit_archives::table.find(victim))
                .execute(conn)
                .unwrap();
            let report = verify_db(conn, None, None, &key).unwrap();
            let first = report.first_problem().unwrap();
            assert_eq!(
                (first.seq, first.kind),
                (victim, ProblemKind::Deleted),
                "{:#?}",
                report.problems
            );
            diesel::insert_into(audit_archives::table)
                .values(&saved)
                .execute(conn)
                .unwrap();
        }
        assert!(verify_db(conn, None, None, &key).unwrap().ok());
        // Deleting the record right after the archive.
        conn.batch_execute("DELETE FROM audit_events WHERE seq = 8")
            .unwrap();
        let report = verify_db(conn, None, None, &key).unwrap();
        assert_eq!(
            report.first_problem().map(|p| (p.seq, p.kind)),
            Some((8, ProblemKind::Deleted))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A run that wrote its file and died before the drop: the next run verifies the file,
    /// reuses it (a half-written file beside it is ignored) and completes. A month whose
    /// records do not verify is not dropped.
    fn resumes_after_a_crash_and_never_drops_unverified(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        let signer = signer();
        let key = signer.public_key().clone();
        append_at(
            conn,
            &signer,
            &[
                "2025-01-05 08:00:00",
                "2025-01-06 08:00:00",
                "2025-01-07 08:00:00",
                "2025-02-07 08:00:00",
                "2025-02-08 08:00:00",
                "2026-11-29 10:00:00",
            ],
        );
        let dir = scratch_dir();
        // What the interrupted run left: its verified file, and a torn one of another attempt.
        let bundle = export(conn, Some(1), Some(3), &signer).unwrap();
        let left = "yiqiao-audit-2025-01-1-3-deadbeef.json";
        std::fs::write(dir.join(left), serde_json::to_vec_pretty(&bundle).unwrap()).unwrap();
        std::fs::write(
            dir.join("yiqiao-audit-2025-01-1-3-00000000.json"),
            b"{\"manifest\":",
        )
        .unwrap();
        // February's records were tampered with: it must not be dropped.
        conn.batch_execute(
            "UPDATE audit_events SET resource = replace(resource, 'hosp-001', 'hosp-009') WHERE seq = 5",
        )
        .unwrap();
        let err = archive(conn, &signer, &opts(&dir)).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Unverified { month, .. } if month == "2025-02"),
            "{err}"
        );
        // January was completed from the file left behind; February is all still there.
        let done = manifests(conn).unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].file_name, left);
        assert_eq!(stored_positions(conn), vec![4, 5, 6]);
        // Restored, February goes too.
        conn.batch_execute(
            "UPDATE audit_events SET resource = replace(resource, 'hosp-009', 'hosp-001') WHERE seq = 5",
        )
        .unwrap();
        let run = archive(conn, &signer, &opts(&dir)).unwrap();
        assert_eq!(run.archived.len(), 1);
        assert_eq!(stored_positions(conn), vec![6]);
        let report = verify_db(conn, None, None, &key).unwrap();
        assert!(report.ok(), "{:#?}", report.problems);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A record of the first month inside the window appended before the last record of the
    /// month before it: that month waits (nothing inside the window is removed).
    fn late_record_inside_the_window_defers_its_month(backend: Backend) {
        let db = TestStore::new(backend);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        let signer = signer();
        append_at(
            conn,
            &signer,
            &[
                "2026-04-30 23:59:00",
                "2026-05-01 00:00:01",
                "2026-04-30 23:59:59",
            ],
        );
        let dir = scratch_dir();
        let run = archive(conn, &signer, &opts(&dir)).unwrap();
        assert!(run.archived.is_empty());
        assert!(
            run.deferred
                .as_deref()
                .is_some_and(|d| d.starts_with("2026-04")),
            "{:?}",
            run.deferred
        );
        assert_eq!(stored_positions(conn), vec![1, 2, 3]);
        // A month later the whole range is out of the window.
        let mut later = opts(&dir);
        later.now = at("2026-12-01 00:00:00");
        let run = archive(conn, &signer, &later).unwrap();
        assert_eq!(run.archived.len(), 1);
        assert_eq!(
            (run.archived[0].first_seq, run.archived[0].last_seq),
            (1, 3)
        );
        assert!(stored_positions(conn).is_empty());
        assert!(
            verify_db(conn, None, None, signer.public_key())
                .unwrap()
                .ok()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// PostgreSQL: partitions exist ahead for this month and the next ones; rows in the DEFAULT
    /// partition move into a month's partition when it is created.
    #[test]
    fn postgres_partitions_are_made_ahead() {
        let db = TestStore::new(Backend::Postgres);
        let mut pooled = db.store.conn().unwrap();
        let conn = &mut *pooled;
        let now = at("2031-12-15 00:00:00");
        let created = ensure_partitions(conn, now, 3).unwrap();
        assert_eq!(
            created,
            vec![
                "audit_events_p203112",
                "audit_events_p203201",
                "audit_events_p203202",
                "audit_events_p203203"
            ]
        );
        assert!(ensure_partitions(conn, now, 3).unwrap().is_empty());
        // The migration made this month's and the next three's.
        let this_month = month_of(now_utc());
        let parts = partitions(conn).unwrap();
        for i in 0..4 {
            let m = this_month.checked_add_months(Months::new(i)).unwrap();
            assert!(parts.contains(&partition_name(m)), "{parts:?}");
        }
        // A record of a month without a partition lands in DEFAULT and moves when it comes.
        let signer = signer();
        append_at(conn, &signer, &["2019-07-04 00:00:00"]);
        let place = |conn: &mut DbConn| -> String {
            let DbConn::Postgresql(pg) = conn else {
                unreachable!()
            };
            diesel::sql_query(
                "SELECT tableoid::regclass::text AS name FROM audit_events WHERE seq = 1",
            )
            .get_result::<Name>(pg)
            .unwrap()
            .name
        };
        assert_eq!(place(conn), "audit_events_default");
        assert!(ensure_partition(conn, parse_month("2019-07").unwrap()).unwrap());
        assert_eq!(place(conn), "audit_events_p201907");
        assert!(
            verify_db(conn, None, None, signer.public_key())
                .unwrap()
                .ok()
        );
    }

    /// Two runs at once (replicas with the scheduled archive) into one directory: every month
    /// is archived once, and no file is left that no manifest names.
    fn concurrent_runs_archive_each_month_once(backend: Backend) {
        let db = TestStore::new(backend);
        let signer = std::sync::Arc::new(signer());
        {
            let mut pooled = db.store.conn().unwrap();
            append_at(
                &mut pooled,
                &signer,
                &[
                    "2025-01-05 08:00:00",
                    "2025-02-05 08:00:00",
                    "2025-03-05 08:00:00",
                    "2025-04-05 08:00:00",
                    "2026-11-29 10:00:00",
                ],
            );
        }
        let dir = scratch_dir();
        let runs: Vec<_> = (0..2)
            .map(|_| {
                let (store, signer, dir) = (db.store.clone(), signer.clone(), dir.clone());
                std::thread::spawn(move || {
                    let mut conn = store.conn().unwrap();
                    archive(&mut conn, &signer, &opts(&dir))
                        .unwrap()
                        .archived
                        .len()
                })
            })
            .collect();
        let archived: usize = runs.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(archived, 4);
        let mut pooled = db.store.conn().unwrap();
        let rows = manifests(&mut pooled).unwrap();
        let mut named: Vec<String> = rows.iter().map(|m| m.file_name.clone()).collect();
        named.sort();
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        assert_eq!(on_disk, named);
        assert_eq!(stored_positions(&mut pooled), vec![5]);
        assert!(
            verify_db(&mut pooled, None, None, signer.public_key())
                .unwrap()
                .ok()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// PostgreSQL: a long reader holding `audit_events` (a verification) delays the drop
    /// beyond one lock timeout; the archive waits and retries instead of failing, and appends
    /// are never held longer than the lock timeout.
    #[test]
    fn postgres_archive_waits_out_a_long_reader() {
        let db = TestStore::new(Backend::Postgres);
        let signer = signer();
        let mut pooled = db.store.conn().unwrap();
        append_at(
            &mut pooled,
            &signer,
            &["2025-01-05 08:00:00", "2026-11-29 10:00:00"],
        );
        let reader_store = db.store.clone();
        let (held, release) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut conn = reader_store.conn().unwrap();
            conn.batch_execute("BEGIN; SELECT count(*) FROM audit_events")
                .unwrap();
            held.send(()).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(3));
            conn.batch_execute("COMMIT").unwrap();
        });
        release.recv().unwrap();
        let dir = scratch_dir();
        let started = std::time::Instant::now();
        let run = archive(&mut pooled, &signer, &opts(&dir)).unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_secs(2));
        assert_eq!(run.archived.len(), 1);
        assert_eq!(stored_positions(&mut pooled), vec![2]);
        reader.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    use crate::store::testdb::on_both_backends;

    on_both_backends!(
        archives_old_months_and_verifies_across_them,
        archives_a_large_month_in_several_files,
        resumes_after_a_crash_and_never_drops_unverified,
        late_record_inside_the_window_defers_its_month,
        concurrent_runs_archive_each_month_once,
    );
}
