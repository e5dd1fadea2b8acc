//! The audit recorder handed to handlers: `state.auditor.record(event).await?` before any data
//! leaves. Fail closed: when the record cannot be made durable the request answers 503
//! (`audit-unavailable`) and the data is not sent.
//!
//! Group commit: one writer task per process takes every pending record (up to
//! `audit.batch_max`) into one database transaction; each caller awaits its own receipt.
//! Chain positions are assigned under the chain head lock inside that transaction, so several
//! replicas can write to one PostgreSQL database.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use yiqiao_registry::Store;
use yiqiao_registry::audit::{
    AppendOptions, Appended, AuditEvent, AuditSigner, EntityRef, PreparedEvent, append_batch,
    checkpoint_due,
};
use yiqiao_sm::Sm2PrivateKey;

use crate::config::Settings;
use crate::error::{ApiError, ErrorCode};

/// Proof that an event is durable: its chain position and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReceipt {
    pub seq: i64,
    pub hash: String,
}

struct Job {
    event: PreparedEvent,
    done: oneshot::Sender<Result<Appended, String>>,
}

/// Cheap to clone; all clones feed the same writer task.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Job>,
    signer: Arc<AuditSigner>,
    replica: Arc<str>,
    timeout: Duration,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("replica", &self.replica)
            .field("key_id", &self.signer.key_id())
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Start the writer task on the current tokio runtime.
    pub fn start(store: Store, signer: Arc<AuditSigner>, settings: &Settings) -> Auditor {
        let a = &settings.audit;
        let (tx, rx) = mpsc::channel(a.queue_capacity.max(1));
        let opts = AppendOptions {
            checkpoint_every: a.checkpoint_every.max(1) as i64,
            force_checkpoint: false,
        };
        tokio::spawn(writer(
            store,
            signer.clone(),
            rx,
            opts,
            a.batch_max.max(1),
            Duration::from_secs(a.checkpoint_interval_secs.max(1)),
        ));
        Auditor {
            tx,
            signer,
            replica: replica_id(settings).into(),
            timeout: Duration::from_millis(a.write_timeout_ms.max(1)),
        }
    }

    pub fn signer(&self) -> &AuditSigner {
        &self.signer
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// A RESTful interaction event (BALP) of this replica and the current request.
    pub fn rest_event(&self, interaction: &str, action: &str) -> AuditEvent {
        let mut e = AuditEvent::rest(interaction, action, &self.replica);
        e.request_id = crate::middleware::current_request_id();
        e
    }

    /// Read of one resource (`Organization/hosp-001`).
    pub fn read_event(&self, reference: String) -> AuditEvent {
        let mut e = self.rest_event("read", "R");
        e.entities.push(EntityRef::resource(reference));
        e
    }

    /// A change made by a staff member (operator token or a person logged in).
    pub fn admin_event(
        &self,
        staff: &crate::staff::Staff,
        interaction: &str,
        action: &str,
        reference: String,
    ) -> AuditEvent {
        let mut e = self.rest_event(interaction, action);
        e.agent_user = Some(staff.subject.clone());
        e.agent_role = Some(crate::oidc::roles_text(&staff.roles));
        e.entities.push(EntityRef::resource(reference));
        e
    }

    /// A search; `query` is the path and query string.
    pub fn search_event(&self, query: String) -> AuditEvent {
        let mut e = self.rest_event("search-type", "E");
        e.entities.push(EntityRef::query(query));
        e
    }

    /// Attribute `event` to an authenticated member institution (agent, purpose of use) and,
    /// when known, to an enterprise patient.
    pub fn by_caller(
        &self,
        mut event: AuditEvent,
        caller: &crate::auth::Caller,
        patient: Option<String>,
    ) -> AuditEvent {
        event.agent_institution = Some(caller.institution.id.to_string());
        event.purpose_of_use = caller.purpose.map(|p| p.code().to_string());
        if matches!(caller.via, crate::auth::CallerVia::AdminOnBehalf) {
            event.agent_user = Some("admin-token".into());
            event.agent_role = Some("admin".into());
        }
        event.patient_id = patient;
        event
    }

    /// Record `event` durably; the caller must not send data before this returns `Ok`.
    pub async fn record(&self, event: AuditEvent) -> Result<AuditReceipt, ApiError> {
        let (done, wait) = oneshot::channel();
        let job = Job {
            event: PreparedEvent::new(event),
            done,
        };
        let outcome = tokio::time::timeout(self.timeout, async {
            self.tx
                .send(job)
                .await
                .map_err(|_| "the audit writer has stopped".to_string())?;
            wait.await
                .map_err(|_| "the audit writer dropped the record".to_string())?
        })
        .await;
        match outcome {
            Ok(Ok(a)) => Ok(AuditReceipt {
                seq: a.seq,
                hash: a.hash,
            }),
            Ok(Err(cause)) => Err(unavailable(cause)),
            Err(_) => Err(unavailable(format!(
                "no durable audit record within {:?}",
                self.timeout
            ))),
        }
    }
}

fn unavailable(cause: String) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::AuditUnavailable,
        "the audit trail is unavailable, so no data is released; retry later",
    )
    .retry_after(2);
    e.internal = Some(cause);
    e
}

async fn writer(
    store: Store,
    signer: Arc<AuditSigner>,
    mut rx: mpsc::Receiver<Job>,
    opts: AppendOptions,
    batch_max: usize,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let mut jobs = Vec::new();
        tokio::select! {
            job = rx.recv() => match job {
                Some(job) => jobs.push(job),
                None => break,
            },
            _ = tick.tick() => {}
        }
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let timed = jobs.is_empty();
        let (events, senders): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.event, j.done)).unzip();
        let store = store.clone();
        let signer = signer.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut conn = store.conn()?;
            if timed {
                if !checkpoint_due(&mut conn)? {
                    return Ok(Vec::new());
                }
                let force = AppendOptions {
                    force_checkpoint: true,
                    ..opts
                };
                return append_batch(&mut conn, &[], &signer, force);
            }
            append_batch(&mut conn, &events, &signer, opts)
        })
        .await;
        match result {
            Ok(Ok(appended)) => {
                for (done, a) in senders.into_iter().zip(appended) {
                    let _ = done.send(Ok(a));
                }
            }
            Ok(Err(e)) => {
                if !timed {
                    tracing::error!(records = senders.len(), cause = %e, "audit append failed; requests answer 503");
                }
                let cause = e.to_string();
                for done in senders {
                    let _ = done.send(Err(cause.clone()));
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "audit writer task failed");
                for done in senders {
                    let _ = done.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// `audit.replica_id`, else `$HOSTNAME`, else `gateway`.
pub fn replica_id(settings: &Settings) -> String {
    if !settings.audit.replica_id.is_empty() {
        return settings.audit.replica_id.clone();
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".into())
}

/// The checkpoint key file in effect: `audit.signing_key_file`, else `<data_dir>/audit-signing-key.pem`.
pub fn signing_key_path(settings: &Settings) -> PathBuf {
    if settings.audit.signing_key_file.is_empty() {
        settings.data_dir.join("audit-signing-key.pem")
    } else {
        PathBuf::from(&settings.audit.signing_key_file)
    }
}

/// Load the SM2 checkpoint key. With no `audit.signing_key_file` configured and no key in
/// `data_dir`, a key is generated there (single node); replicas must be configured with one
/// shared key file.
pub fn load_signing_key(settings: &Settings, generate: bool) -> anyhow::Result<Sm2PrivateKey> {
    let path = signing_key_path(settings);
    if path.exists() {
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("audit.signing_key_file {}: {e}", path.display()))?;
        return Sm2PrivateKey::from_pkcs8_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "audit.signing_key_file {}: not an SM2 PKCS#8 PEM key: {e}",
                path.display()
            )
        });
    }
    if !settings.audit.signing_key_file.is_empty() || !generate {
        anyhow::bail!("audit.signing_key_file {} does not exist", path.display());
    }
    let key = Sm2PrivateKey::generate().map_err(|e| anyhow::anyhow!("audit key: {e}"))?;
    let pem = key
        .to_pkcs8_pem()
        .map_err(|e| anyhow::anyhow!("audit key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    write_private(&path, pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    tracing::warn!(path = %path.display(), "generated the audit checkpoint signing key; replicas must share one key (audit.signing_key_file)");
    Ok(key)
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}
