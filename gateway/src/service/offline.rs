//! The audited-command primitive for adapters that run without the server: the command line
//! (`yiqiao institution ...`, `yiqiao mpi import`, `yiqiao mpi reestimate`), the demo's and the
//! simulator's loaders. The same `append_with` as the server's `Auditor::change`: the change and
//! its audit record in one transaction, signed with this data directory's audit key (made on
//! first use, as `serve` does).

use std::sync::Arc;

use yiqiao_registry::Store;
use yiqiao_registry::audit::{
    AppendOptions, AuditEvent, AuditSigner, ChangeError, EntityRef, append_many_with,
};
use yiqiao_registry::store::{Audited, DbConn};

use crate::config::Settings;

/// Signs and appends the records of changes made outside the server (module docs).
pub struct OfflineAuditor {
    store: Store,
    signer: Arc<AuditSigner>,
    opts: AppendOptions,
    replica: String,
    /// Who acts: `cli:<OS user>` for the command line, or the loader's name.
    operator: String,
}

/// Why an offline change was not made.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError<E> {
    /// The change itself was refused (nothing stored).
    #[error("{0}")]
    Change(E),
    /// The audit record could not be written (nothing stored).
    #[error("the audit record could not be written, nothing was changed: {0}")]
    Audit(String),
    #[error("cannot reach the database: {0}")]
    Store(String),
}

impl OfflineAuditor {
    /// The auditor of `settings`' data directory; `operator` names who acts (e.g. `cli:alice`).
    pub fn open(settings: &Settings, store: Store, operator: String) -> anyhow::Result<Self> {
        let key = crate::audit::load_signing_key(settings, true)?;
        let signer = AuditSigner::new(&key).map_err(|e| anyhow::anyhow!("audit key: {e}"))?;
        Ok(OfflineAuditor {
            store,
            signer: Arc::new(signer),
            opts: AppendOptions {
                checkpoint_every: settings.audit.checkpoint_every.max(1) as i64,
                force_checkpoint: false,
            },
            replica: crate::audit::replica_id(settings),
            operator,
        })
    }

    /// The command line's operator: `cli:<$USER>`.
    pub fn cli_operator() -> String {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    }

    /// An event for a change by this operator on `reference` (e.g. `Organization/h1`).
    pub fn event(&self, interaction: &str, action: &str, reference: String) -> AuditEvent {
        let mut e = AuditEvent::rest(interaction, action, &self.replica);
        e.agent_user = Some(self.operator.clone());
        e.agent_role = Some("operator".into());
        e.entities.push(EntityRef::resource(reference));
        e
    }

    /// Make a change described by one audit record (see [`OfflineAuditor::change_many`]).
    pub fn change<T, E, F>(&self, event: AuditEvent, work: F) -> Result<T, OfflineError<E>>
    where
        F: FnOnce(&mut Audited<'_>, &mut AuditEvent) -> Result<T, E>,
    {
        self.change_many(|tx| {
            let mut event = event;
            let value = work(tx, &mut event)?;
            Ok((value, vec![event]))
        })
    }

    /// Make a change and append its audit records in one transaction: both or neither.
    pub fn change_many<T, E, F>(&self, work: F) -> Result<T, OfflineError<E>>
    where
        F: FnOnce(&mut Audited<'_>) -> Result<(T, Vec<AuditEvent>), E>,
    {
        let mut conn = self
            .store
            .conn()
            .map_err(|e| OfflineError::Store(e.to_string()))?;
        self.change_many_on(&mut conn, work)
    }

    /// [`OfflineAuditor::change_many`] on a connection the caller holds (e.g. one with bulk
    /// load settings for its session).
    pub fn change_many_on<T, E, F>(&self, conn: &mut DbConn, work: F) -> Result<T, OfflineError<E>>
    where
        F: FnOnce(&mut Audited<'_>) -> Result<(T, Vec<AuditEvent>), E>,
    {
        append_many_with(conn, &self.signer, self.opts, work)
            .map(|(value, _)| value)
            .map_err(|e| match e {
                ChangeError::Change(e) => OfflineError::Change(e),
                ChangeError::Db(db) => OfflineError::Audit(db.to_string()),
            })
    }

    /// The store, for reads.
    pub fn store(&self) -> &Store {
        &self.store
    }
}
