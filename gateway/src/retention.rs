//! Audit retention maintenance: PostgreSQL partitions of `audit_events` made ahead at start-up
//! and periodically, and the scheduled archive (`audit.archive_dir`). See docs/audit.md
//! "Retention, partitions and archives".

use std::path::PathBuf;
use std::time::Duration;

use yiqiao_registry::Store;
use yiqiao_registry::audit::AuditSigner;
use yiqiao_registry::audit::archive::{self, ArchiveOptions, ArchiveRun};
use yiqiao_registry::store::now_utc;

use crate::config::Settings;
use crate::state::AppState;

/// Make this month's partition and the next `audit.partition_months_ahead` ones (PostgreSQL;
/// nothing on SQLite). Returns the partitions created.
pub fn ensure_partitions(store: &Store, settings: &Settings) -> anyhow::Result<Vec<String>> {
    let mut conn = store.conn()?;
    Ok(archive::ensure_partitions(
        &mut conn,
        now_utc(),
        settings.audit.partition_months_ahead,
    )?)
}

/// Archive options for `dir` from the settings, at the current time.
pub fn archive_options(
    settings: &Settings,
    dir: PathBuf,
    before: Option<chrono::NaiveDate>,
) -> ArchiveOptions {
    ArchiveOptions {
        dir,
        retention_months: settings.audit.retention_months,
        before,
        now: now_utc(),
        max_records_per_file: settings.audit.archive_file_max_records,
    }
}

/// One maintenance run: partitions ahead, then the scheduled archive when configured.
pub fn maintain(
    store: &Store,
    settings: &Settings,
    signer: &AuditSigner,
) -> anyhow::Result<Option<ArchiveRun>> {
    let created = ensure_partitions(store, settings)?;
    if !created.is_empty() {
        tracing::info!(?created, "made audit partitions ahead");
    }
    if settings.audit.archive_dir.is_empty() {
        return Ok(None);
    }
    let opts = archive_options(settings, PathBuf::from(&settings.audit.archive_dir), None);
    let mut conn = store.conn()?;
    let run = archive::archive(&mut conn, signer, &opts)?;
    for m in &run.archived {
        tracing::info!(month = %m.month, first = m.first_seq, last = m.last_seq, file = %m.file_name, "archived audit month");
    }
    if let Some(why) = &run.deferred {
        tracing::info!(reason = %why, "audit archive deferred");
    }
    Ok(Some(run))
}

/// The periodic maintenance task of this replica (`audit.maintenance_interval_secs`).
pub fn start(state: AppState) {
    let interval = state.settings.audit.maintenance_interval_secs;
    if interval == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = state.clone();
            let result = tokio::task::spawn_blocking(move || {
                maintain(&s.store, &s.settings, s.auditor.signer())
            })
            .await;
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(cause = %e, "audit maintenance failed; retried at the next interval")
                }
                Err(e) => tracing::error!(cause = %e, "audit maintenance task failed"),
            }
        }
    });
}
