//! The audit recorder handed to handlers: `state.auditor.record(event).await?` before any data
//! leaves. Fail closed: when the record cannot be made durable the request answers 503
//! (`audit-unavailable`) and the data is not sent. A handler with a large answer may instead
//! `submit` the record, encode its answer while the record is written, and await
//! `PendingAudit::durable` before sending (searches do).
//!
//! Group commit: one writer task per process takes every pending record (up to
//! `audit.batch_max`) into one database transaction; each caller awaits its own receipt.
//! Chain positions are assigned under the chain head lock inside that transaction, so several
//! replicas can write to one PostgreSQL database.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{HttpMessage, web};
use tokio::sync::{mpsc, oneshot};
use yiqiao_registry::Store;
use yiqiao_registry::audit::{
    AppendOptions, Appended, AuditEvent, AuditSigner, ChangeError, EntityRef, PreparedEvent,
    append_batch, append_many_with, checkpoint_due, outcome,
};
use yiqiao_registry::store::Audited;
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
    /// Refused requests: recorded without delaying their answer (see [`Auditor::record_refusal`]).
    refusals: mpsc::Sender<PreparedEvent>,
    /// Refusals that found the queue full since the last batch (recorded as one summary record).
    not_itemised: Arc<AtomicU64>,
    /// Public directory reads: recorded without delaying their answer
    /// (see [`Auditor::record_public`]); its own queue, so they cannot crowd out refusals.
    public: mpsc::Sender<PreparedEvent>,
    /// Public reads that found their queue full since the last batch (one summary record).
    public_not_itemised: Arc<AtomicU64>,
    store: Store,
    opts: AppendOptions,
    signer: Arc<AuditSigner>,
    replica: Arc<str>,
    timeout: Duration,
    /// The writer's thread, stopped and joined when the last clone is dropped (held for that).
    _writer: Arc<WriterThread>,
}

/// The writer's thread: when the last [`Auditor`] clone goes, the writer commits what is
/// queued (refusals) and ends, and the dropping thread waits for it — so no commit, and no
/// database connection, outlives the application (e.g. running on into process exit).
struct WriterThread {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the audit writer thread panicked");
        }
    }
}

/// Who made a request, as far as authentication got: put into the request's extensions by the
/// `Caller` and `Staff` extractors so a refusal can be attributed.
#[derive(Debug, Clone, Default)]
pub struct AuditAgent {
    pub institution: Option<String>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub purpose: Option<String>,
}

/// The error code and message of an error response (put into the response's extensions by
/// `ApiError`), so a refusal's audit record says why.
#[derive(Debug, Clone)]
pub struct RefusalInfo {
    pub code: &'static str,
    pub message: String,
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
    /// Start the writer (a thread of its own).
    pub fn start(store: Store, signer: Arc<AuditSigner>, settings: &Settings) -> Auditor {
        let a = &settings.audit;
        let (tx, rx) = mpsc::channel(a.queue_capacity.max(1));
        let (refusals, refusal_rx) = mpsc::channel(a.refusal_queue_capacity.max(1));
        let not_itemised = Arc::new(AtomicU64::new(0));
        let (public, public_rx) = mpsc::channel(a.refusal_queue_capacity.max(1));
        let public_not_itemised = Arc::new(AtomicU64::new(0));
        let opts = AppendOptions {
            checkpoint_every: a.checkpoint_every.max(1) as i64,
            force_checkpoint: false,
        };
        let replica: Arc<str> = replica_id(settings).into();
        let w = Writer {
            store: store.clone(),
            signer: signer.clone(),
            opts,
            batch_max: a.batch_max.max(1),
            interval: Duration::from_secs(a.checkpoint_interval_secs.max(1)),
            not_itemised: not_itemised.clone(),
            public_not_itemised: public_not_itemised.clone(),
            replica: replica.clone(),
        };
        // The writer has a thread of its own and commits there: a record costs two
        // wake-ups (the writer's, then the waiting request's) instead of four through a task
        // on the server's runtime and a blocking-pool thread. It ends when the last clone of
        // this Auditor is dropped (see WriterThread).
        let (stop, stopped) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(writer(
                        w,
                        rx,
                        Unawaited {
                            refusals: refusal_rx,
                            public: public_rx,
                        },
                        stopped,
                    )),
                    Err(e) => tracing::error!(cause = %e, "audit writer runtime; data requests answer 503"),
                }
            });
        let thread = match spawned {
            Ok(t) => Some(t),
            Err(e) => {
                // Without a writer every data request answers 503 audit-unavailable (fail closed).
                tracing::error!(cause = %e, "cannot start the audit writer thread");
                None
            }
        };
        Auditor {
            tx,
            refusals,
            not_itemised,
            public,
            public_not_itemised,
            store,
            opts,
            signer,
            replica,
            timeout: Duration::from_millis(a.write_timeout_ms.max(1)),
            _writer: Arc::new(WriterThread {
                stop: Some(stop),
                thread,
            }),
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

    /// An event of a staff member's request (operator token or a person logged in), its
    /// roles space-separated as everywhere else.
    pub fn staff_rest_event(
        &self,
        staff: &crate::staff::Staff,
        interaction: &str,
        action: &str,
    ) -> AuditEvent {
        let mut e = self.rest_event(interaction, action);
        e.agent_user = Some(staff.subject.clone());
        e.agent_role = Some(crate::oidc::roles_text(&staff.roles));
        e
    }

    /// A search; `query` is the path and query string.
    pub fn search_event(&self, query: String) -> AuditEvent {
        let mut e = self.rest_event("search-type", "E");
        e.entities.push(EntityRef::query(query));
        e
    }

    /// Attribute `event` to an authenticated member institution (agent, purpose of use, the
    /// end user it named with `X-Yiqiao-User` as `agent_user` / BALP `altId`) and, when known,
    /// to an enterprise patient.
    pub fn by_caller(
        &self,
        mut event: AuditEvent,
        caller: &crate::auth::Caller,
        patient: Option<String>,
    ) -> AuditEvent {
        event.agent_institution = Some(caller.institution.id.to_string());
        event.purpose_of_use = caller.purpose.map(|p| p.code().to_string());
        if matches!(caller.via, crate::auth::CallerVia::AdminOnBehalf) {
            event.agent_user = Some(yiqiao_registry::audit::ADMIN_ON_BEHALF_USER.into());
            event.agent_role = Some("admin".into());
        } else if let Some(user) = &caller.user {
            event.agent_user = Some(user.clone());
        }
        event.patient_id = patient;
        event
    }

    /// Record `event` durably; the caller must not send data before this returns `Ok`.
    pub async fn record(&self, event: AuditEvent) -> Result<AuditReceipt, ApiError> {
        self.submit(event).await?.durable().await
    }

    /// Hand `event` to the writer and return at once; the caller may prepare its answer while
    /// the record is being made durable, and must not send it before
    /// [`PendingAudit::durable`] returns `Ok`. The write timeout counts from this call.
    pub async fn submit(&self, event: AuditEvent) -> Result<PendingAudit, ApiError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (done, wait) = oneshot::channel();
        let job = Job {
            event: PreparedEvent::new(event),
            done,
        };
        match tokio::time::timeout_at(deadline, self.tx.send(job)).await {
            Ok(Ok(())) => Ok(PendingAudit {
                wait,
                deadline,
                timeout: self.timeout,
            }),
            Ok(Err(_)) => Err(unavailable("the audit writer has stopped".to_string())),
            Err(_) => Err(unavailable(format!(
                "no durable audit record within {:?}",
                self.timeout
            ))),
        }
    }
}

/// An audit record handed to the writer ([`Auditor::submit`]) and not yet known durable.
#[must_use = "data must not be sent before the audit record is durable"]
pub struct PendingAudit {
    wait: oneshot::Receiver<Result<Appended, String>>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl PendingAudit {
    /// Wait until the record is durable (fail closed: 503 `audit-unavailable` otherwise).
    pub async fn durable(self) -> Result<AuditReceipt, ApiError> {
        match tokio::time::timeout_at(self.deadline, self.wait).await {
            Ok(Ok(Ok(a))) => Ok(AuditReceipt {
                seq: a.seq,
                hash: a.hash,
            }),
            Ok(Ok(Err(cause))) => Err(unavailable(cause)),
            Ok(Err(_)) => Err(unavailable(
                "the audit writer dropped the record".to_string(),
            )),
            Err(_) => Err(unavailable(format!(
                "no durable audit record within {:?}",
                self.timeout
            ))),
        }
    }
}

impl Auditor {
    /// Record a refused request (401/403: no data leaves) WITHOUT waiting for durability, so a
    /// flood of bad requests can neither slow their answers nor crowd out the records of data
    /// requests: refusals have their own bounded queue and take at most a quarter of each
    /// group-commit batch. When the queue is full the refusal is counted, and the count is
    /// recorded as one summary record (`outcomeDesc`: "N refused requests not itemised").
    pub fn record_refusal(&self, mut event: AuditEvent) {
        if event.outcome == outcome::SUCCESS {
            event.outcome = outcome::MINOR_FAILURE.into();
        }
        if self.refusals.try_send(PreparedEvent::new(event)).is_err() {
            self.not_itemised.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Record a public directory read (`/fhir/Organization`, `/fhir/Endpoint`: no credential,
    /// no patient data) WITHOUT waiting for durability, so anonymous readers cannot load the
    /// group commit that data requests wait on, nor be held up by it. Like refusals: a bounded
    /// queue of its own (`audit.refusal_queue_capacity`), and public reads take only what
    /// refusals leave of a quarter of each batch. When the queue is full the read is counted
    /// and the count recorded as one summary record ("N public directory reads not itemised").
    pub fn record_public(&self, event: AuditEvent) {
        if self.public.try_send(PreparedEvent::new(event)).is_err() {
            self.public_not_itemised.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An audited change: `work` makes the change inside a transaction and may complete
    /// `event` (e.g. with the id it created); the event is appended to the chain in the SAME
    /// transaction, so the change is stored if and only if its audit record is, and both are
    /// durable before the response. When `work` refuses the change (404, 409, 422 …) nothing
    /// is stored and `event` is recorded with a failure outcome and the reason; the refusal is
    /// returned. A failing audit append answers 503 `audit-unavailable` and stores nothing.
    pub async fn change<T, F>(&self, event: AuditEvent, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&mut Audited<'_>, &mut AuditEvent) -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let failed = event.clone();
        self.change_many(failed, move |tx| {
            let mut event = event;
            let value = work(tx, &mut event)?;
            Ok((value, vec![event]))
        })
        .await
    }

    /// [`Auditor::change`] for a change described by several audit records (a batch: one per
    /// item), all appended in the change's transaction. `failed` is recorded, with the reason,
    /// when `work` refuses the change.
    pub async fn change_many<T, F>(&self, failed: AuditEvent, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&mut Audited<'_>) -> Result<(T, Vec<AuditEvent>), ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let (store, signer, opts) = (self.store.clone(), self.signer.clone(), self.opts);
        let span = tracing::Span::current();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let mut conn = store.conn().map_err(|e| Box::new(Err(ApiError::from(e))))?;
            append_many_with(&mut conn, &signer, opts, work)
                .map(|(value, _)| value)
                // Ok(refusal of the change) / Err(the audit append failed), boxed (large).
                .map_err(|e: ChangeError<ApiError>| {
                    Box::new(match e {
                        ChangeError::Change(refused) => Ok(refused),
                        ChangeError::Db(db) => Err(unavailable(db.to_string())),
                    })
                })
        })
        .await
        .map_err(ApiError::from)?;
        match result.map_err(|boxed| *boxed) {
            Ok(value) => Ok(value),
            Err(Err(unavailable)) => Err(unavailable),
            Err(Ok(refused)) => {
                let mut event = failed;
                event.outcome = if refused.code.status().is_server_error() {
                    outcome::SERIOUS_FAILURE
                } else {
                    outcome::MINOR_FAILURE
                }
                .into();
                event.outcome_desc = Some(format!("{}: {}", refused.code.code(), refused.message));
                if let Err(e) = self.record(event).await {
                    tracing::error!(cause = ?e.internal, "cannot record a refused change");
                }
                Err(refused)
            }
        }
    }

    /// The event of a change a staff member made to `reference`.
    pub fn staff_event(
        &self,
        staff: &crate::staff::Staff,
        interaction: &str,
        action: &str,
        reference: String,
    ) -> AuditEvent {
        let mut e = self.staff_rest_event(staff, interaction, action);
        e.entities.push(EntityRef::resource(reference));
        e
    }
}

/// Middleware: every 401/403 answer (except the token endpoint, which keeps its own
/// `auth_events`) becomes an audit record with a failure outcome, attributed to whoever the
/// extractors authenticated ([`AuditAgent`]) and the peer address, via
/// [`Auditor::record_refusal`].
pub async fn record_refusals(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let path = req.path().to_string();
    let method = req.method().clone();
    let address = req.peer_addr().map(|a| a.ip().to_string());
    let state = req.app_data::<web::Data<crate::state::AppState>>().cloned();
    let res = next.call(req).await?;
    let status = res.status().as_u16();
    if matches!(status, 401 | 403)
        && path != "/oauth2/token"
        && let Some(state) = state
    {
        let agent = res
            .request()
            .extensions()
            .get::<AuditAgent>()
            .cloned()
            .unwrap_or_default();
        let why = res.response().extensions().get::<RefusalInfo>().cloned();
        // A consent denial was recorded by its handler, with the decision and its reasons,
        // before the answer was built: recording it again would count one access twice.
        if why.as_ref().is_some_and(|w| w.code == "consent-denied") {
            return Ok(res);
        }
        let (interaction, action) = match method {
            Method::GET | Method::HEAD => ("read", "R"),
            Method::POST => ("create", "C"),
            Method::PUT | Method::PATCH => ("update", "U"),
            Method::DELETE => ("delete", "D"),
            _ => ("operation", "E"),
        };
        let mut e = state.auditor.rest_event(interaction, action);
        e.outcome = outcome::MINOR_FAILURE.into();
        e.outcome_desc = Some(match why {
            Some(w) => format!("HTTP {status} {}: {}", w.code, w.message),
            None => format!("HTTP {status}"),
        });
        e.agent_institution = agent.institution;
        e.agent_user = agent.user;
        e.agent_role = agent.role;
        e.purpose_of_use = agent.purpose;
        e.agent_address = address;
        e.entities
            .push(EntityRef::query(format!("{method} {path}")));
        state.auditor.record_refusal(e);
    }
    Ok(res)
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

struct Writer {
    store: Store,
    signer: Arc<AuditSigner>,
    opts: AppendOptions,
    batch_max: usize,
    interval: Duration,
    not_itemised: Arc<AtomicU64>,
    public_not_itemised: Arc<AtomicU64>,
    replica: Arc<str>,
}

/// The queues of records nobody waits for.
struct Unawaited {
    refusals: mpsc::Receiver<PreparedEvent>,
    public: mpsc::Receiver<PreparedEvent>,
}

/// Unawaited records taken into one batch, and how many refusals and public reads the batch
/// accounts for (itemised or in a summary): counted again if the batch fails to commit.
#[derive(Default)]
struct Taken {
    events: Vec<PreparedEvent>,
    refusals: u64,
    public: u64,
}

impl Taken {
    /// Refusals first, then public reads, at most `room` records in all; then one summary
    /// record for each kind counted (not itemised) since the last batch.
    fn take(&mut self, q: &mut Unawaited, room: usize, w: &Writer) {
        while self.events.len() < room {
            match q.refusals.try_recv() {
                Ok(r) => {
                    self.events.push(r);
                    self.refusals += 1;
                }
                Err(_) => break,
            }
        }
        while self.events.len() < room {
            match q.public.try_recv() {
                Ok(r) => {
                    self.events.push(r);
                    self.public += 1;
                }
                Err(_) => break,
            }
        }
        let dropped = w.not_itemised.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let mut e = AuditEvent::rest("110113", "E", &w.replica);
            e.type_code = "110113".into();
            e.outcome = outcome::MINOR_FAILURE.into();
            e.outcome_desc = Some(format!(
                "{dropped} refused requests not itemised: the refusal queue was full"
            ));
            self.events.push(PreparedEvent::new(e));
            self.refusals += dropped;
        }
        let dropped = w.public_not_itemised.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let mut e = AuditEvent::rest("read", "R", &w.replica);
            e.entities
                .push(EntityRef::query("/fhir/Organization, /fhir/Endpoint"));
            e.outcome_desc = Some(format!(
                "{dropped} public directory reads not itemised: their queue was full or their batch failed to commit"
            ));
            self.events.push(PreparedEvent::new(e));
            self.public += dropped;
        }
    }
}

/// Committed batches between two WAL checkpoints by the writer (SQLite): a federated search's
/// record dirties ~15 pages, so 32 of them stay well below the 1,000 pages at which a
/// committing connection would checkpoint inside its commit.
const WAL_CHECKPOINT_COMMITS: u32 = 32;

async fn writer(
    w: Writer,
    mut rx: mpsc::Receiver<Job>,
    mut unawaited: Unawaited,
    mut stop: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(w.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Unawaited records (refusals, then public reads) never take more than a quarter of a
    // batch: data requests' records come first.
    let room = (w.batch_max / 4).max(1);
    let mut commits = 0u32;
    let mut stopping = false;
    loop {
        if stopping {
            break;
        }
        let mut jobs = Vec::new();
        let mut taken = Taken::default();
        tokio::select! {
            // The last Auditor is going (its senders closed, or the stop): commit what is
            // queued, then end.
            job = rx.recv() => match job {
                Some(job) => jobs.push(job),
                None => stopping = true,
            },
            Some(refusal) = unawaited.refusals.recv() => {
                taken.events.push(refusal);
                taken.refusals += 1;
            }
            Some(read) = unawaited.public.recv() => {
                taken.events.push(read);
                taken.public += 1;
            }
            _ = &mut stop, if !stopping => stopping = true,
            _ = tick.tick() => {}
        }
        while jobs.len() < w.batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        taken.take(&mut unawaited, room, &w);
        let timed = jobs.is_empty() && taken.events.is_empty();
        if stopping && timed {
            // Nothing left to record; no timed checkpoint on the way out.
            break;
        }
        let (mut events, senders): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.event, j.done)).unzip();
        let (refusals, public) = (taken.refusals, taken.public);
        events.extend(taken.events);
        // Committed here, on the writer's own thread (nothing else runs on its runtime).
        let result = (|| {
            let mut conn = w.store.conn()?;
            if timed {
                if !checkpoint_due(&mut conn)? {
                    return Ok(Vec::new());
                }
                let force = AppendOptions {
                    force_checkpoint: true,
                    ..w.opts
                };
                return append_batch(&mut conn, &[], &w.signer, force);
            }
            append_batch(&mut conn, &events, &w.signer, w.opts)
        })();
        let failure = match result {
            Ok(appended) => {
                for (done, a) in senders.into_iter().zip(appended) {
                    let _ = done.send(Ok(a));
                }
                // SQLite: the log is checkpointed here, after the answers and while nothing
                // waits, rather than inside some request's commit (see checkpoint_wal).
                if !timed {
                    commits += 1;
                }
                if commits >= WAL_CHECKPOINT_COMMITS
                    && rx.is_empty()
                    && w.store.backend() == yiqiao_registry::Backend::Sqlite
                {
                    commits = 0;
                    let checkpointed = w
                        .store
                        .conn()
                        .and_then(|mut c| yiqiao_registry::store::checkpoint_wal(&mut c));
                    if let Err(e) = checkpointed {
                        tracing::warn!(cause = %e, "audit writer: WAL checkpoint failed (the next commits will do it)");
                    }
                }
                continue;
            }
            Err(e) => e.to_string(),
        };
        if !timed {
            tracing::error!(records = senders.len(), refusals, public_reads = public, cause = %failure, "audit append failed; requests answer 503");
        }
        // Unawaited records that could not be written are counted into the next summaries.
        w.not_itemised.fetch_add(refusals, Ordering::Relaxed);
        w.public_not_itemised.fetch_add(public, Ordering::Relaxed);
        for done in senders {
            let _ = done.send(Err(failure.clone()));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use diesel::{Connection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    /// Audit records in the SQLite database FILE alone (as if the write-ahead log were lost):
    /// what a checkpoint has copied there.
    fn records_in_main_file(db: &std::path::Path, scratch: &std::path::Path) -> i64 {
        let copy = scratch.join("copy.db");
        std::fs::copy(db, &copy).unwrap();
        let mut conn = diesel::SqliteConnection::establish(copy.to_str().unwrap()).unwrap();
        diesel::sql_query("SELECT COUNT(*) AS n FROM audit_events")
            .get_result::<Count>(&mut conn)
            .map(|c| c.n)
            .unwrap_or(0)
    }

    /// An Auditor on the embedded default (`<data_dir>/yiqiao.db`) in a fresh directory: the
    /// directory, the store and the Auditor.
    fn embedded_auditor(tag: &str) -> (std::path::PathBuf, Store, Auditor) {
        let dir = std::env::temp_dir().join(format!("yiqiao-audit-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let settings = Settings {
            data_dir: dir.clone(),
            ..Settings::default()
        };
        let store = Store::open(&settings.store_options()).unwrap();
        store.migrate().unwrap();
        let signer = Arc::new(AuditSigner::new(&Sm2PrivateKey::generate().unwrap()).unwrap());
        let auditor = Auditor::start(store.clone(), signer, &settings);
        (dir, store, auditor)
    }

    /// The writer checkpoints SQLite's log itself, after answering and while idle, so no
    /// request's commit has to (that copy and the file's sync were a request's p99): after
    /// `WAL_CHECKPOINT_COMMITS` records the database file holds them although the log is far
    /// below the 1,000 pages at which a commit would have checkpointed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_checkpoints_the_sqlite_log_while_idle() {
        let (dir, store, auditor) = embedded_auditor("wal");
        drop(store);
        let db = dir.join("yiqiao.db");
        let before = WAL_CHECKPOINT_COMMITS as usize - 1;
        for i in 0..before {
            auditor
                .record(auditor.read_event(format!("Organization/h{i}")))
                .await
                .unwrap();
        }
        assert_eq!(
            records_in_main_file(&db, &dir),
            0,
            "nothing checkpointed before the writer's turn (else this test shows nothing)"
        );
        auditor
            .record(auditor.read_event("Organization/last".into()))
            .await
            .unwrap();
        // The checkpoint follows the answer; give it a moment.
        let mut found = 0;
        for _ in 0..100 {
            found = records_in_main_file(&db, &dir);
            if found >= WAL_CHECKPOINT_COMMITS as i64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(found, WAL_CHECKPOINT_COMMITS as i64);
        drop(auditor);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Dropping the last Auditor stops the writer after it has committed what was queued (a
    /// refusal is recorded without waiting for it) and waits for it: nothing queued is lost
    /// and no commit runs on past the application.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_auditor_commits_what_is_queued_and_joins_the_writer() {
        let (dir, store, auditor) = embedded_auditor("stop");
        auditor.record_refusal(auditor.read_event("Organization/refused".into()));
        drop(auditor);
        // Joined: the refusal is in the database now, with no waiting.
        let mut conn = store.conn().unwrap();
        let n = diesel::sql_query("SELECT COUNT(*) AS n FROM audit_events")
            .get_result::<Count>(&mut *conn)
            .unwrap()
            .n;
        assert_eq!(n, 1);
        drop(conn);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
