//! PostgreSQL monthly partitions of `audit_events`: made ahead, listed, and dropped once empty.

use super::*;

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
pub(super) struct Name {
    #[diesel(sql_type = Text)]
    pub(super) name: String,
}

#[derive(QueryableByName)]
pub(super) struct Count {
    #[diesel(sql_type = BigInt)]
    pub(super) n: i64,
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

/// Drop the empty partitions of months before `cutoff` (PostgreSQL); nothing on SQLite.
pub(super) fn drop_empty_partitions(
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
