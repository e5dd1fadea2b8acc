//! Archiving one month's range of chain positions: the bundle written and verified, then the
//! manifest and the removal committed in one transaction (retried when the table lock waits).

use super::*;

/// Take the exclusive lock on `audit_events` for dropping a partition, waiting at most 2 s: a
/// waiting exclusive lock holds every append queued behind it, and a request waits for its
/// audit record only `audit.write_timeout_ms` (5 s by default) before it fails closed.
pub(super) const LOCK_AUDIT_EVENTS: &str =
    "SET LOCAL lock_timeout = '2s'; LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE";

/// Attempts at a transaction that needs [`LOCK_AUDIT_EVENTS`] (a long reader, e.g. a
/// verification, holds it off), one second apart.
const LOCK_ATTEMPTS: u32 = 10;

fn lock_timed_out(e: &ArchiveError) -> bool {
    matches!(e, ArchiveError::Store(s) if s.to_string().contains("lock timeout"))
}

/// Run `work` again while it fails on the lock timeout, up to [`LOCK_ATTEMPTS`] times.
pub(super) fn with_lock_retries<T>(
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

/// Positions `first..=last` of `month`; `month_ends`: the month has no later positions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Range {
    pub(super) month: NaiveDate,
    pub(super) first: i64,
    pub(super) last: i64,
    pub(super) month_ends: bool,
}

/// Steps 1–3 for one range. `None` when another run archived an overlapping range first.
pub(super) fn archive_range(
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
