//! Federated queries: one request fans out to every institution holding a record of the
//! enterprise patient, each answer arrives in an SM envelope sealed to the gateway and signed
//! by the hospital, and the verified answers are merged into one Bundle (docs/federation.md).
//!
//! Safety rails per call: endpoint and overall deadlines, a process-wide and a per-endpoint
//! concurrency cap (semaphores), retries with full-jitter backoff for the idempotent GETs, a
//! circuit breaker per endpoint (in-process state, [`breaker`]), one pooled keep-alive HTTP
//! client, and a size limit on every upstream body.

pub mod breaker;
pub mod policy;
pub mod routes;

use std::cell::Cell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;
use tokio::sync::Semaphore;
use yiqiao_registry::directory::Institution;
use yiqiao_sm::{
    ENVELOPE_MEDIA_TYPE, Envelope, EnvelopeError, RecipientKey, RequestBinding, SenderKeys,
    SignedRequest, Sm2PrivateKey, Sm2PublicKey, Sm2SigningKey,
};

use crate::config::{FederationSettings, Settings};
use crate::outbound::OutboundPolicy;
pub use breaker::{Admit, Breakers};
pub use policy::{PermitAll, Release, ReleasePolicy};
use yiqiao_sm::request_sig;

/// Header carrying the unique ID of one upstream request; bound into the response envelope.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header naming the requester (the gateway's `federation.gateway_id`) for the binding.
pub const REQUESTER_HEADER: &str = "x-yiqiao-requester";

/// The detail of an endpoint the outbound policy refuses (the reason is logged).
pub const OUTBOUND_REFUSED: &str =
    "outbound-refused: the endpoint is refused by the outbound policy";

/// Why an institution contributed nothing.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// Not called: no endpoint, no SM2 key, suspended.
    NotQueried(String),
    /// Its circuit is open.
    CircuitOpen { retry_in: Duration },
    /// No verified answer within the deadline.
    Timeout(String),
    /// Transport failure or a server error.
    Failed(String),
    /// The hospital refused the request (HTTP 4xx).
    Refused(String),
    /// The answer is not a well-formed envelope or Bundle.
    Garbage(String),
    /// The envelope failed signature, tag, binding or freshness checks.
    Tampered(String),
    /// The answer exceeded `federation.max_response_bytes`.
    TooLarge(usize),
}

impl Problem {
    /// Short status label (also the code in the outcome's federation-status coding).
    pub fn label(&self) -> &'static str {
        match self {
            Problem::NotQueried(_) => "not-queried",
            Problem::CircuitOpen { .. } => "circuit-open",
            Problem::Timeout(_) => "timeout",
            Problem::Failed(_) => "failed",
            Problem::Refused(_) => "refused",
            Problem::Garbage(_) => "garbage",
            Problem::Tampered(_) => "tampered",
            Problem::TooLarge(_) => "too-large",
        }
    }

    /// FHIR IssueType.
    pub fn issue_type(&self) -> &'static str {
        match self {
            Problem::NotQueried(_) => "not-found",
            Problem::CircuitOpen { .. } => "transient",
            Problem::Timeout(_) => "timeout",
            Problem::Failed(_) => "exception",
            Problem::Refused(_) => "forbidden",
            Problem::Garbage(_) => "structure",
            Problem::Tampered(_) => "security",
            Problem::TooLarge(_) => "too-costly",
        }
    }

    pub fn detail(&self) -> String {
        match self {
            Problem::NotQueried(s)
            | Problem::Timeout(s)
            | Problem::Failed(s)
            | Problem::Refused(s)
            | Problem::Garbage(s)
            | Problem::Tampered(s) => s.clone(),
            Problem::CircuitOpen { retry_in } => format!(
                "circuit open after repeated failures; next probe in {} ms",
                retry_in.as_millis()
            ),
            Problem::TooLarge(limit) => format!("answer larger than {limit} bytes"),
        }
    }
}

/// One institution to ask and the patient's identifiers there.
#[derive(Debug, Clone)]
pub struct Site {
    pub institution: Institution,
    /// (system, value) of each local record of the patient.
    pub identifiers: Vec<(String, String)>,
}

/// What one institution gave.
#[derive(Debug)]
pub struct SiteResult {
    pub institution: Institution,
    pub result: Result<Vec<Value>, Problem>,
    pub attempts: u32,
    pub elapsed: Duration,
    /// HTTP round trip (request sent → whole body received) of the successful attempt: the
    /// endpoint's own time as the gateway sees it, without verification and merging.
    pub round_trip: Option<Duration>,
}

/// The deadlines of one federated request.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub overall: Duration,
    pub endpoint: Duration,
}

struct Inner {
    settings: FederationSettings,
    /// One HTTP client (connection pool) per thread that calls hospitals: a pooled
    /// connection is driven by a task on the runtime that opened it, so a client shared by
    /// the server's per-thread runtimes would make every answer hop threads.
    clients: Mutex<HashMap<std::thread::ThreadId, reqwest::Client>>,
    key: Sm2PrivateKey,
    /// The same key bound to the default signer ID: signs every outgoing request.
    request_signer: Sm2SigningKey,
    sender: SenderKeys,
    global: Arc<Semaphore>,
    per_endpoint: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Parsed institution SM2 keys by their PEM text (parsing is not free, and a federated
    /// query checks the keys of every hospital it asks).
    keys: Mutex<HashMap<String, Option<Sm2PublicKey>>>,
    breakers: Breakers,
    policy: RwLock<Arc<dyn ReleasePolicy>>,
    /// The outbound URL policy (endpoints are checked before every call).
    outbound: OutboundPolicy,
}

/// The federation runtime shared by all requests of this process (cheap to clone).
#[derive(Clone)]
pub struct Federation {
    inner: Arc<Inner>,
}

/// Path of the gateway's SM2 key file.
pub fn key_path(settings: &Settings) -> PathBuf {
    if settings.federation.sm2_key_file.is_empty() {
        settings.data_dir.join("gateway-sm2-key.pem")
    } else {
        PathBuf::from(&settings.federation.sm2_key_file)
    }
}

/// Load the gateway's SM2 key, generating `<data_dir>/gateway-sm2-key.pem` when no file is
/// configured and none exists yet.
pub fn load_key(settings: &Settings) -> anyhow::Result<Sm2PrivateKey> {
    let path = key_path(settings);
    if path.exists() {
        let pem = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("federation.sm2_key_file {}: {e}", path.display()))?;
        return Sm2PrivateKey::from_pkcs8_pem(&pem).map_err(|e| {
            anyhow::anyhow!(
                "federation.sm2_key_file {}: not an SM2 PKCS#8 PEM key: {e}",
                path.display()
            )
        });
    }
    if !settings.federation.sm2_key_file.is_empty() {
        anyhow::bail!("federation.sm2_key_file {} does not exist", path.display());
    }
    let key = Sm2PrivateKey::generate().map_err(|e| anyhow::anyhow!("gateway key: {e}"))?;
    let pem = key
        .to_pkcs8_pem()
        .map_err(|e| anyhow::anyhow!("gateway key: {e}"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => f,
            // Another process created it first: use that one.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                return Sm2PrivateKey::from_pkcs8_pem(&pem)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
            }
            Err(e) => anyhow::bail!("cannot write {}: {e}", path.display()),
        };
        f.write_all(pem.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    tracing::warn!(path = %path.display(), "generated the gateway SM2 key; replicas must share one key (federation.sm2_key_file)");
    Ok(key)
}

/// Answers worth another attempt: the hospital timed out waiting for our request (408; it
/// was never processed, RFC 9110 §15.5.9), is busy (429) or its gateway failed (502–504).
fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 502 | 503 | 504)
}

/// A non-2xx answer as a problem: a 4xx is the hospital refusing the request, except the
/// transient 408 and 429; the rest is a failure. `(problem, retryable)`.
fn status_problem(status: u16, text: String) -> (Problem, bool) {
    match status {
        400..=499 if !retryable_status(status) => (Problem::Refused(text), false),
        _ => (Problem::Failed(text), retryable_status(status)),
    }
}

/// The OperationOutcome diagnostics of an upstream error body, shortened.
fn upstream_reason(body: &[u8]) -> String {
    let text = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v["issue"][0]["diagnostics"]
                .as_str()
                .or_else(|| v["issue"][0]["details"]["text"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    text.chars().take(200).collect()
}

/// The HTTP client for hospitals' endpoints: pooled keep-alive connections, no redirects,
/// destinations checked and pinned by the outbound policy.
fn http_client(
    settings: &FederationSettings,
    outbound: &OutboundPolicy,
) -> reqwest::Result<reqwest::Client> {
    outbound
        .client_builder()
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .pool_idle_timeout(Duration::from_secs(settings.pool_idle_timeout_secs))
        .tcp_keepalive(Duration::from_secs(60))
        .tcp_nodelay(true)
        .build()
}

impl Federation {
    pub fn new(settings: &Settings, outbound: &OutboundPolicy) -> anyhow::Result<Federation> {
        let key = load_key(settings)?;
        Federation::with_key(&settings.federation, outbound, key)
    }

    pub fn with_key(
        settings: &FederationSettings,
        outbound: &OutboundPolicy,
        key: Sm2PrivateKey,
    ) -> anyhow::Result<Federation> {
        // Fail at start-up, not on the first query, if the client cannot be built.
        let client = http_client(settings, outbound)?;
        let sender = SenderKeys::new(&settings.gateway_id, &key)
            .map_err(|e| anyhow::anyhow!("federation.gateway_id: {e}"))?;
        let request_signer = key
            .signing_key(yiqiao_sm::DEFAULT_SIGNER_ID)
            .map_err(|e| anyhow::anyhow!("gateway key: {e}"))?;
        Ok(Federation {
            inner: Arc::new(Inner {
                request_signer,
                clients: Mutex::new(HashMap::from([(std::thread::current().id(), client)])),
                sender,
                key,
                global: Arc::new(Semaphore::new(settings.max_concurrency)),
                per_endpoint: Mutex::new(HashMap::new()),
                keys: Mutex::new(HashMap::new()),
                breakers: Breakers::new(
                    settings.breaker_failure_threshold,
                    Duration::from_millis(settings.breaker_cooldown_ms),
                ),
                policy: RwLock::new(Arc::new(PermitAll)),
                outbound: outbound.clone(),
                settings: settings.clone(),
            }),
        })
    }

    pub fn settings(&self) -> &FederationSettings {
        &self.inner.settings
    }

    /// The gateway's envelope public key as hospitals address it.
    pub fn recipient_key(&self) -> RecipientKey {
        RecipientKey {
            key_id: self.inner.settings.key_id.clone(),
            public_key: self.inner.key.public_key(),
        }
    }

    pub fn public_key(&self) -> Sm2PublicKey {
        self.inner.key.public_key()
    }

    /// The gateway as an envelope sender (for sealing answers to requesters).
    pub fn sender(&self) -> &SenderKeys {
        &self.inner.sender
    }

    /// The identity headers of one outgoing request (docs/hospital-contract.md): requester,
    /// request id, timestamp, key id and the SM2 signature over them, the method, the
    /// target (path and query exactly as sent) and the SM3 of the body.
    pub fn identity_headers(
        &self,
        method: &str,
        target: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<Vec<(&'static str, String)>, yiqiao_sm::RequestSigError> {
        let settings = &self.inner.settings;
        let timestamp = chrono::Utc::now().timestamp();
        let signature = SignedRequest {
            method,
            target,
            timestamp,
            requester: &settings.gateway_id,
            request_id,
            body,
        }
        .sign(&self.inner.request_signer)?;
        Ok(vec![
            (REQUEST_ID_HEADER, request_id.to_string()),
            (REQUESTER_HEADER, settings.gateway_id.clone()),
            (request_sig::TIMESTAMP_HEADER, timestamp.to_string()),
            (request_sig::KEY_ID_HEADER, settings.key_id.clone()),
            (request_sig::SIGNATURE_HEADER, signature),
        ])
    }

    pub fn breakers(&self) -> &Breakers {
        &self.inner.breakers
    }

    /// Install the release policy (the consent engine) applied to every resource.
    pub fn set_policy(&self, policy: Arc<dyn ReleasePolicy>) {
        match self.inner.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
    }

    pub fn policy(&self) -> Arc<dyn ReleasePolicy> {
        match self.inner.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// This thread's HTTP client (built on first use; the settings were checked at start-up).
    fn client(&self) -> Result<reqwest::Client, Problem> {
        let mut clients = match self.inner.clients.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = clients.get(&std::thread::current().id()) {
            return Ok(c.clone());
        }
        let c = http_client(&self.inner.settings, &self.inner.outbound)
            .map_err(|e| Problem::Failed(format!("HTTP client: {e}")))?;
        clients.insert(std::thread::current().id(), c.clone());
        Ok(c)
    }

    fn endpoint_semaphore(&self, id: &str) -> Arc<Semaphore> {
        let mut map = match self.inner.per_endpoint.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    self.inner.settings.max_concurrency_per_endpoint,
                ))
            })
            .clone()
    }

    /// Ask every site concurrently for `resource_type` with the extra search `params`, each
    /// call bounded by the earlier of its endpoint deadline and the overall one; yields each
    /// site's result as soon as it is in (verified and decrypted, or failed), so the caller
    /// can work on the early answers while the slow ones are still on their way. Ends no
    /// later than the overall deadline (plus scheduling slack).
    pub fn fan_out_each<'a>(
        &'a self,
        resource_type: &'a str,
        sites: Vec<Site>,
        params: &'a [(String, String)],
        deadlines: Deadlines,
    ) -> impl futures::Stream<Item = SiteResult> + 'a {
        let overall_end = Instant::now() + deadlines.overall;
        sites
            .into_iter()
            .map(move |site| {
                let endpoint_end = Instant::now() + deadlines.endpoint;
                let (end, limit) = if overall_end <= endpoint_end {
                    (
                        overall_end,
                        format!("overall deadline {} ms", deadlines.overall.as_millis()),
                    )
                } else {
                    (
                        endpoint_end,
                        format!("endpoint deadline {} ms", deadlines.endpoint.as_millis()),
                    )
                };
                self.query_site(resource_type, site, params, end, limit)
            })
            .collect::<futures::stream::FuturesUnordered<_>>()
    }

    async fn query_site(
        &self,
        resource_type: &str,
        site: Site,
        params: &[(String, String)],
        end: Instant,
        limit: String,
    ) -> SiteResult {
        let start = Instant::now();
        let inst = &site.institution;
        let id = inst.id.as_str().to_string();
        let round_trip = Cell::new(None);
        let done = |result, attempts| SiteResult {
            institution: site.institution.clone(),
            result,
            attempts,
            elapsed: start.elapsed(),
            round_trip: round_trip.get(),
        };
        let Some(base) = inst.endpoint_url.clone() else {
            return done(
                Err(Problem::NotQueried("no FHIR endpoint registered".into())),
                0,
            );
        };
        if !inst.is_active() {
            return done(Err(Problem::NotQueried("institution suspended".into())), 0);
        }
        let keys = self.public_keys(inst);
        if keys.is_empty() {
            return done(
                Err(Problem::NotQueried(
                    "no usable SM2 public key registered".into(),
                )),
                0,
            );
        }
        let admit = self.inner.breakers.admit(&id);
        if let Admit::Refuse { retry_in } = admit {
            return done(Err(Problem::CircuitOpen { retry_in }), 0);
        }
        // What the call was doing when a deadline struck (for the report and the breaker).
        let phase = Cell::new("waiting for a free upstream slot");
        let attempts = Cell::new(0u32);
        let work = async {
            let _global = self
                .inner
                .global
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| Problem::Failed("gateway shutting down".into()))?;
            let _endpoint = self
                .endpoint_semaphore(&id)
                .acquire_owned()
                .await
                .map_err(|_| Problem::Failed("gateway shutting down".into()))?;
            phase.set("waiting for the answer");
            loop {
                attempts.set(attempts.get() + 1);
                match self
                    .attempt(resource_type, &base, &id, &keys, &site.identifiers, params)
                    .await
                {
                    Ok((found, rtt)) => {
                        round_trip.set(Some(rtt));
                        return Ok(found);
                    }
                    Err((problem, retry)) => {
                        let n = attempts.get();
                        if !retry || n > self.inner.settings.retries {
                            return Err(problem);
                        }
                        let cap = self
                            .inner
                            .settings
                            .retry_backoff_ms
                            .saturating_mul(1u64 << (n - 1).min(16));
                        let wait =
                            Duration::from_millis(rand::thread_rng().gen_range(0..=cap.max(1)));
                        if Instant::now() + wait >= end {
                            return Err(problem);
                        }
                        phase.set("backing off before a retry");
                        tokio::time::sleep(wait).await;
                        phase.set("waiting for the answer");
                    }
                }
            }
        };
        let result = match tokio::time::timeout_at(end.into(), work).await {
            Ok(r) => r,
            Err(_) => Err(Problem::Timeout(format!(
                "no verified answer within the {limit} ({})",
                phase.get()
            ))),
        };
        match &result {
            // An answer, even a refusal, shows the endpoint is alive.
            Ok(_) | Err(Problem::Refused(_)) => self.inner.breakers.success(&id),
            // Our own concurrency limit is not the endpoint's fault.
            Err(Problem::Timeout(_)) if phase.get() == "waiting for a free upstream slot" => {}
            Err(_) => self.inner.breakers.failure(&id),
        }
        done(result, attempts.get())
    }

    /// The usable SM2 public keys of an institution's directory entry (unparsable ones left
    /// out), parsed once per distinct PEM text.
    pub fn public_keys(&self, inst: &Institution) -> Vec<Sm2PublicKey> {
        let Ok(mut cache) = self.inner.keys.lock() else {
            return inst
                .sm2_keys
                .iter()
                .filter_map(|k| Sm2PublicKey::from_spki_pem(&k.pem).ok())
                .collect();
        };
        if cache.len() > 10_000 {
            cache.clear();
        }
        inst.sm2_keys
            .iter()
            .filter_map(|k| {
                cache
                    .entry(k.pem.clone())
                    .or_insert_with(|| Sm2PublicKey::from_spki_pem(&k.pem).ok())
                    .clone()
            })
            .collect()
    }

    /// Open an SM envelope that institution `sender` sealed to the gateway in answer to the
    /// request `binding`: sender and recipient key checked, signature verified against any of
    /// `keys` (the institution's registered SM2 keys), freshness, binding, key unwrap and GCM
    /// tag. Returns the payload and its content type. `Garbage` for what is not a well-formed
    /// envelope, `Tampered` for what fails a check, `Failed` for an envelope sealed to another
    /// key. Shared by the fan-out and document retrieval.
    pub fn open_answer(
        &self,
        body: &[u8],
        sender: &str,
        keys: &[Sm2PublicKey],
        binding: RequestBinding,
    ) -> Result<(Vec<u8>, String), Problem> {
        let settings = &self.inner.settings;
        let envelope = Envelope::from_json(body)
            .map_err(|e| Problem::Garbage(format!("not an SM envelope: {e}")))?;
        if envelope.sender_id != sender {
            return Err(Problem::Tampered(format!(
                "envelope sender_id {:?} is not the institution queried",
                envelope.sender_id
            )));
        }
        if envelope.recipient_key_id != settings.key_id {
            return Err(Problem::Failed(format!(
                "envelope sealed to key {:?}, not the gateway key {:?}",
                envelope.recipient_key_id, settings.key_id
            )));
        }
        let skew = Duration::from_secs(settings.max_skew_secs);
        // Verified, then decrypted, here on the request's own thread: ~0.5 ms of CPU, less
        // than two hand-offs to blocking threads and back cost on a busy host. Nothing is
        // decrypted for an envelope whose signature fails.
        let now = chrono::Utc::now();
        let mut verified = Err(EnvelopeError::BadSignature);
        for k in keys {
            verified = envelope.verify(k, &binding, now, skew);
            if !matches!(verified, Err(EnvelopeError::BadSignature)) {
                break;
            }
        }
        let opened = verified.and_then(|()| envelope.decrypt(&self.inner.key));
        opened.map_err(|e| match e {
            EnvelopeError::Malformed { .. }
            | EnvelopeError::TooLarge { .. }
            | EnvelopeError::Unsupported { .. } => Problem::Garbage(e.to_string()),
            other => Problem::Tampered(other.to_string()),
        })
    }

    /// One HTTP call. `Err((problem, retryable))`.
    async fn attempt(
        &self,
        resource_type: &str,
        base: &str,
        id: &str,
        keys: &[Sm2PublicKey],
        identifiers: &[(String, String)],
        params: &[(String, String)],
    ) -> Result<(Vec<Value>, Duration), (Problem, bool)> {
        let settings = &self.inner.settings;
        let ident: Vec<String> = identifiers
            .iter()
            .map(|(s, v)| format!("{s}|{v}"))
            .collect();
        let mut query = vec![("patient.identifier".to_string(), ident.join(","))];
        query.extend(params.iter().cloned());
        let qs = serde_urlencoded::to_string(&query)
            .map_err(|e| (Problem::Failed(format!("query: {e}")), false))?;
        let raw = format!("{base}/{resource_type}?{qs}");
        let url = self.inner.outbound.check_syntax(&raw).map_err(|why| {
            tracing::warn!(institution = %id, reason = %why, "federation endpoint refused by the outbound policy");
            (Problem::NotQueried(OUTBOUND_REFUSED.into()), false)
        })?;
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let request_id = uuid::Uuid::new_v4().to_string();
        let sent = Instant::now();
        let binding = RequestBinding::new("GET", &target, &settings.gateway_id, &request_id)
            .map_err(|e| (Problem::Failed(format!("request binding: {e}")), false))?;
        let client = self.client().map_err(|p| (p, false))?;
        let identity = self
            .identity_headers("GET", &target, &request_id, b"")
            .map_err(|e| (Problem::Failed(format!("request signature: {e}")), false))?;
        let mut request = client
            .get(url)
            .header(reqwest::header::ACCEPT, ENVELOPE_MEDIA_TYPE);
        for (name, value) in identity {
            request = request.header(name, value);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| {
                if let Some(why) = crate::outbound::refusal_of(&e) {
                    tracing::warn!(institution = %id, reason = %why, "federation endpoint refused by the outbound policy");
                    return (Problem::NotQueried(OUTBOUND_REFUSED.into()), false);
                }
                let why = if e.is_connect() {
                    "connection failed"
                } else if e.is_timeout() {
                    "timed out"
                } else {
                    "transport error"
                };
                (Problem::Failed(format!("{why}: {e}")), true)
            })?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let limit = settings.max_response_bytes;
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err((Problem::TooLarge(limit), false));
        }
        let mut body = Vec::new();
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err((Problem::TooLarge(limit), false));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => return Err((Problem::Failed(format!("reading the answer: {e}")), true)),
            }
        }
        let rtt = sent.elapsed();
        if !(200..300).contains(&status) {
            let reason = upstream_reason(&body);
            let text = if reason.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {reason}")
            };
            return Err(status_problem(status, text));
        }
        let media = content_type.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case(ENVELOPE_MEDIA_TYPE) {
            return Err((
                Problem::Garbage(format!(
                    "Content-Type {media:?}, expected {ENVELOPE_MEDIA_TYPE}"
                )),
                false,
            ));
        }
        let (payload, _) = self
            .open_answer(&body, id, keys, binding)
            .map_err(|p| (p, false))?;
        let bundle: Value = serde_json::from_slice(&payload)
            .map_err(|e| (Problem::Garbage(format!("payload is not JSON: {e}")), false))?;
        if bundle["resourceType"] != "Bundle" {
            return Err((Problem::Garbage("payload is not a Bundle".into()), false));
        }
        let found = bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|e| e.get("resource"))
                    .filter(|r| {
                        r["resourceType"] == resource_type
                            && r["id"].as_str().is_some_and(|s| !s.is_empty())
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Ok((found, rtt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_statuses_are_retried_and_refusals_are_not() {
        for status in [408, 429, 502, 503, 504] {
            let (problem, retry) = status_problem(status, format!("HTTP {status}"));
            assert!(retry, "{status}");
            assert_eq!(problem.label(), "failed", "{status}");
        }
        for status in [400, 401, 403, 404, 410, 422] {
            let (problem, retry) = status_problem(status, format!("HTTP {status}"));
            assert!(!retry, "{status}");
            assert_eq!(problem.label(), "refused", "{status}");
        }
        let (problem, retry) = status_problem(500, "HTTP 500".into());
        assert!(!retry);
        assert_eq!(problem.label(), "failed");
    }
}
