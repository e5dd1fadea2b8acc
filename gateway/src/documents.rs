//! Document registry runtime: the code table, consent decisions for documents and
//! notifications (through `state.policy`), FHIR views of stored documents and events, and the
//! subscription delivery worker (docs/documents.md).
//!
//! The delivery worker is one tokio task per replica. It leases due deliveries from the
//! outbox (`yiqiao_registry::documents::outbox::claim`), POSTs a notification Bundle to each
//! subscriber with an `Idempotency-Key` header, and records the result fenced by its lease.
//! Every notification is audited before it leaves; an audit failure counts as a failed attempt.

use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Notify;
use yiqiao_consent::Purpose;
use yiqiao_registry::directory::{self, Institution};
use yiqiao_registry::documents::outbox::{self, AttemptResult, Claimed, StoredEvent, Subscription};
use yiqiao_registry::documents::{self as registry, CodeTable, DocumentError, StoredDocument};
use yiqiao_registry::empi::store as empi;

use crate::config::{DocumentsSettings, SubscriptionSettings};
use crate::error::ApiError;
use crate::policy::{Ask, Candidate, Policy};
use crate::state::AppState;

/// Extension on `Attachment` carrying the SM3 hash of the content (64 lowercase hex digits).
/// R4's `Attachment.hash` is SHA-1; SM3 is what the region mandates.
pub const SM3_HASH_EXT: &str = "https://yiqiao.health/fhir/StructureDefinition/attachment-sm3";
/// Canonical URLs of the subscription topics.
pub const TOPIC_DOCUMENT_URL: &str = "https://yiqiao.health/fhir/SubscriptionTopic/document";
pub const TOPIC_MERGE_URL: &str = "https://yiqiao.health/fhir/SubscriptionTopic/patient-merge";
/// Subscriptions Backport IG filter-criteria extension (on `Subscription._criteria`).
pub const FILTER_CRITERIA_EXT: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
pub const CONFIDENTIALITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
pub const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// Header carrying the stable key of a notification (same on every retry of one event).
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Extension on a stored `Subscription` recording the purpose of use its notifications are
/// decided for: the purpose of the credential that created it (or `consent.default_purpose`).
pub const PURPOSE_EXT: &str = "https://yiqiao.health/fhir/StructureDefinition/purpose-of-use";

/// The consent candidate of a stored document: its custodian, the enterprise person its
/// patient record is linked to now, and the DocumentReference as served.
pub fn candidate(base: &str, d: &StoredDocument) -> Candidate {
    Candidate {
        custodian: d.custodian_id.clone(),
        patient: Some(d.person_id.clone()),
        resource: document_view(base, d),
    }
}

/// The purpose recorded on a subscription ([`PURPOSE_EXT`]).
pub fn subscription_purpose(sub: &Subscription) -> Option<Purpose> {
    sub.resource
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(PURPOSE_EXT))
        .and_then(|e| e.get("valueCode"))
        .and_then(Value::as_str)
        .and_then(Purpose::from_code)
}

/// Whether a subscriber may be told about an event, with the audited reasons.
#[derive(Debug)]
pub struct NotifyDecision {
    pub permitted: bool,
    /// `permit`, `deny`, or `not-enforced`.
    pub summary: &'static str,
    /// One entry per decision taken (as in a search's audit record).
    pub reasons: Value,
}

/// A subscriber learns nothing it could not query. A document event is decided as a read of
/// that document by `subscriber` for `purpose` (a document that no longer exists is not
/// told). A merge event is told to an institution holding a record of either person, and to
/// others only when the policy lets them see the surviving person's Patient data held by at
/// least one custodian.
pub async fn notify_decision(
    state: &AppState,
    subscriber: &Institution,
    purpose: Purpose,
    event: &StoredEvent,
) -> Result<NotifyDecision, ApiError> {
    let ask = Ask {
        purpose,
        break_glass_reason: None,
    };
    let requester = Policy::requester_of(subscriber);
    let candidates: Vec<Candidate> = if let Some(doc_id) = event.document_id.clone() {
        let doc = state
            .db(move |conn| match registry::get(conn, &doc_id) {
                Ok(d) => Ok(Some(d)),
                Err(DocumentError::NotFound(_)) => Ok(None),
                Err(e) => Err(ApiError::from(e)),
            })
            .await?;
        doc.iter().map(|d| candidate(&state.base_url, d)).collect()
    } else {
        let persons: Vec<String> = [
            event.person_id.clone(),
            event
                .detail
                .get("source")
                .and_then(Value::as_str)
                .map(str::to_string),
        ]
        .into_iter()
        .flatten()
        .collect();
        let survivor = event.person_id.clone();
        let custodians = state
            .db(move |conn| -> Result<Vec<String>, ApiError> {
                let mut out: Vec<String> = Vec::new();
                for p in &persons {
                    for r in empi::records_of_person(conn, p)? {
                        if !out.contains(&r.institution_id) {
                            out.push(r.institution_id);
                        }
                    }
                }
                Ok(out)
            })
            .await?;
        custodians
            .into_iter()
            .map(|custodian| Candidate {
                custodian,
                patient: survivor.clone(),
                resource: json!({ "resourceType": "Patient" }),
            })
            .collect()
    };
    if candidates.is_empty() {
        return Ok(NotifyDecision {
            permitted: false,
            summary: "deny",
            reasons: json!([{ "effect": "deny", "rule": "nothing-to-tell",
                "reason": "The event's document or persons no longer exist." }]),
        });
    }
    let own = candidates
        .iter()
        .any(|c| c.custodian == subscriber.id.as_str());
    let released = state
        .policy
        .release_for(&requester, &ask, candidates)
        .await?;
    let permitted = own || !released.kept.is_empty();
    Ok(NotifyDecision {
        permitted,
        summary: match released.summary() {
            "not-enforced" => "not-enforced",
            _ if permitted => "permit",
            _ => "deny",
        },
        reasons: released.reasons(),
    })
}

/// Shared document-registry runtime of a replica.
pub struct DocumentRuntime {
    pub codes: CodeTable,
    /// Wakes the local delivery worker after a registration committed events.
    pub wake: Notify,
    /// HTTP client for notifications and retrieval from custodians.
    pub http: reqwest::Client,
    /// This process's worker id (lease owner): replica id plus a per-start nonce.
    pub worker_id: String,
}

impl std::fmt::Debug for DocumentRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocumentRuntime")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl DocumentRuntime {
    pub fn new(
        docs: &DocumentsSettings,
        subs: &SubscriptionSettings,
        outbound: &crate::outbound::OutboundPolicy,
        replica: &str,
    ) -> anyhow::Result<DocumentRuntime> {
        let table = if docs.code_file.is_empty() {
            CodeTable::shipped()
        } else {
            let text = std::fs::read_to_string(&docs.code_file)
                .map_err(|e| anyhow::anyhow!("documents.code_file {}: {e}", docs.code_file))?;
            CodeTable::from_json(&text)
        }
        .map_err(|e| anyhow::anyhow!("documents.code_file: {e}"))?;
        let codes = table
            .restrict(&docs.type_systems)
            .map_err(|e| anyhow::anyhow!("documents.type_systems: {e}"))?;
        let http = outbound
            .client_builder()
            .timeout(Duration::from_millis(subs.request_timeout_ms.max(1)))
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
        Ok(DocumentRuntime {
            codes,
            wake: Notify::new(),
            http,
            worker_id: format!("{replica}/{}", uuid::Uuid::new_v4().simple()),
        })
    }
}

fn instant(t: &chrono::NaiveDateTime) -> String {
    format!("{}Z", t.format("%Y-%m-%dT%H:%M:%S%.6f"))
}

/// The DocumentReference as served: the stored resource with registry id, meta, current
/// status, the subject's EMPI source record, and the attachment URL pointing at the gateway.
pub fn document_view(base: &str, d: &StoredDocument) -> Value {
    let mut r = d.resource.clone();
    if !r.is_object() {
        r = json!({ "resourceType": "DocumentReference" });
    }
    r["id"] = json!(d.id);
    r["meta"] =
        json!({ "versionId": d.version.to_string(), "lastUpdated": instant(&d.updated_at) });
    r["status"] = json!(d.status.as_str());
    if let Some(subject) = r.get_mut("subject").and_then(Value::as_object_mut) {
        subject.insert(
            "reference".into(),
            json!(format!("Patient/{}", d.patient_record_id)),
        );
    }
    if let Some(att) = r
        .get_mut("content")
        .and_then(|c| c.get_mut(0))
        .and_then(|c| c.get_mut("attachment"))
        .and_then(Value::as_object_mut)
    {
        att.insert("url".into(), json!(format!("{base}/fhir/Binary/{}", d.id)));
    }
    r
}

/// One event as the `Parameters` of a notification (Subscriptions Backport IG shape).
pub fn notification_bundle(
    base: &str,
    sub: &Subscription,
    events: &[StoredEvent],
    kind: &str,
    status: &outbox::SubscriptionStatus,
) -> Value {
    let topic = topic_url(&sub.topic);
    let mut params = vec![
        json!({ "name": "subscription", "valueReference": { "reference": format!("{base}/fhir/Subscription/{}", sub.id) } }),
        json!({ "name": "topic", "valueCanonical": topic }),
        json!({ "name": "status", "valueCode": if sub.status == "active" { "active" } else { "off" } }),
        json!({ "name": "type", "valueCode": kind }),
        json!({ "name": "events-since-subscription-start", "valueString": status.events_since_start.to_string() }),
    ];
    for e in events {
        let focus = match &e.document_id {
            Some(d) => format!("{base}/fhir/DocumentReference/{d}"),
            None => format!(
                "{base}/empi/persons/{}",
                e.person_id.clone().unwrap_or_default()
            ),
        };
        params.push(json!({ "name": "notification-event", "part": [
            { "name": "event-number", "valueString": e.seq.to_string() },
            { "name": "timestamp", "valueInstant": instant(&e.created_at) },
            { "name": "focus", "valueReference": { "reference": focus } },
            { "name": "additional-context", "valueString": e.kind },
        ]}));
    }
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": instant(&yiqiao_registry::store::now_utc()),
        "entry": [{
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": { "resourceType": "Parameters", "parameter": params },
            "request": { "method": "GET", "url": format!("Subscription/{}/$status", sub.id) },
            "response": { "status": "200" },
        }],
    })
}

pub fn topic_url(topic: &str) -> &'static str {
    if topic == outbox::TOPIC_PATIENT_MERGE {
        TOPIC_MERGE_URL
    } else {
        TOPIC_DOCUMENT_URL
    }
}

/// Backoff before attempt `attempts + 1`: exponential from `initial`, capped at `max`, with
/// full jitter in the upper half (so retries of many subscribers spread out).
pub fn backoff(settings: &SubscriptionSettings, attempts: i32) -> Duration {
    let exp = (attempts.max(1) - 1).min(30) as u32;
    let base = settings
        .backoff_initial_ms
        .saturating_mul(1u64 << exp.min(20))
        .min(settings.backoff_max_ms)
        .max(1);
    let jittered = rand::thread_rng().gen_range(base / 2..=base);
    Duration::from_millis(jittered.max(1))
}

/// Start the delivery worker on the current runtime (when `subscriptions.worker` is on).
pub fn start_worker(state: AppState) {
    if !state.settings.subscriptions.worker {
        return;
    }
    tokio::spawn(async move {
        tracing::info!(worker = %state.documents.worker_id, "subscription delivery worker started");
        loop {
            let busy = match run_once(&state).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(cause = %e, "subscription delivery: claim failed");
                    false
                }
            };
            if !busy {
                let poll = Duration::from_millis(state.settings.subscriptions.poll_interval_ms);
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = state.documents.wake.notified() => {}
                }
            }
        }
    });
}

/// Claim one batch and deliver it (concurrently: at most one event per subscription).
/// Returns how many attempts were made.
pub async fn run_once(state: &AppState) -> Result<usize, String> {
    let settings = state.settings.subscriptions.clone();
    let owner = state.documents.worker_id.clone();
    let store = state.store.clone();
    let lease = Duration::from_millis(settings.lease_ms);
    let batch = settings.claim_batch.max(1);
    let claimed = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        outbox::claim(&mut conn, &owner, lease, batch).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())??;
    let n = claimed.len();
    let deliveries = claimed.into_iter().map(|c| deliver(state, c));
    futures::future::join_all(deliveries).await;
    Ok(n)
}

async fn deliver(state: &AppState, c: Claimed) {
    let settings = &state.settings.subscriptions;
    let result = attempt(state, &c).await;
    if let AttemptResult::Failed { error, .. } = &result {
        tracing::info!(subscription = %c.subscription_id, event = c.event_seq, attempt = c.attempts, cause = %error, "notification attempt failed");
    }
    let store = state.store.clone();
    let owner = state.documents.worker_id.clone();
    let max = settings.max_attempts.max(1) as i32;
    let done = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        outbox::complete(&mut conn, &c, &owner, &result, max).map_err(|e| e.to_string())
    })
    .await;
    match done {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::warn!("notification lease lost before completion; another worker retries it")
        }
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, "notification result not recorded; the lease expires and it is retried")
        }
        Err(e) => tracing::warn!(cause = %e, "notification completion task failed"),
    }
}

async fn attempt(state: &AppState, c: &Claimed) -> AttemptResult {
    let settings = &state.settings.subscriptions;
    let fail = |error: String| AttemptResult::Failed {
        error,
        retry_in: backoff(settings, c.attempts),
    };
    let store = state.store.clone();
    let (sid, seq) = (c.subscription_id.clone(), c.event_seq);
    let loaded = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn().map_err(|e| e.to_string())?;
        let sub = outbox::get_subscription(&mut conn, &sid).map_err(|e| e.to_string())?;
        let event = outbox::get_event(&mut conn, seq).map_err(|e| e.to_string())?;
        let status = outbox::subscription_status(&mut conn, &sid).map_err(|e| e.to_string())?;
        let owner = directory::get(&mut conn, &sub.owner_id).map_err(|e| e.to_string())?;
        Ok::<_, String>((sub, event, status, owner))
    })
    .await;
    let (sub, event, status, owner) = match loaded {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return fail(e),
        Err(e) => return fail(e.to_string()),
    };
    let purpose = subscription_purpose(&sub).unwrap_or(state.policy.default_purpose());
    let decision = match notify_decision(state, &owner, purpose, &event).await {
        Ok(d) => d,
        Err(e) => return fail(format!("consent decision unavailable: {e}")),
    };
    // Audit before the notification leaves, and when it is withheld (fail closed).
    let mut audit = state.auditor.rest_event("notification", "E");
    audit.consent_decision = Some(decision.summary.to_string());
    audit.consent_reasons = Some(decision.reasons.to_string());
    if !decision.permitted {
        audit.outcome = yiqiao_registry::audit::outcome::MINOR_FAILURE.into();
    }
    audit.agent_institution = Some(sub.owner_id.clone());
    audit.patient_id = event.person_id.clone();
    audit
        .entities
        .push(yiqiao_registry::audit::EntityRef::resource(format!(
            "Subscription/{}",
            sub.id
        )));
    if let Some(d) = &event.document_id {
        audit
            .entities
            .push(yiqiao_registry::audit::EntityRef::resource(format!(
                "DocumentReference/{d}"
            )));
    }
    if let Err(e) = state.auditor.record(audit).await {
        return fail(format!("audit unavailable: {e}"));
    }
    if !decision.permitted {
        return AttemptResult::Withheld;
    }
    let body = notification_bundle(
        &state.base_url,
        &sub,
        std::slice::from_ref(&event),
        "event-notification",
        &status,
    );
    let endpoint = match state.outbound.check_syntax(&sub.endpoint) {
        Ok(u) => u,
        Err(why) => {
            tracing::warn!(subscription = %sub.id, reason = %why, "webhook endpoint refused by the outbound policy");
            return fail(crate::federation::OUTBOUND_REFUSED.into());
        }
    };
    let sent = state
        .documents
        .http
        .post(endpoint)
        .header("Content-Type", "application/fhir+json")
        .header(IDEMPOTENCY_KEY, format!("{}-{}", sub.id, event.seq))
        .header("X-Yiqiao-Event-Number", event.seq.to_string())
        .header("X-Yiqiao-Attempt", c.attempts.to_string())
        .body(body.to_string())
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => AttemptResult::Delivered,
        Ok(resp) => fail(format!(
            "subscriber answered HTTP {}",
            resp.status().as_u16()
        )),
        Err(e) if crate::outbound::refusal_of(&e).is_some() => {
            if let Some(why) = crate::outbound::refusal_of(&e) {
                tracing::warn!(subscription = %sub.id, reason = %why, "webhook endpoint refused by the outbound policy");
            }
            fail(crate::federation::OUTBOUND_REFUSED.into())
        }
        Err(e) if e.is_timeout() => fail("subscriber did not answer in time".into()),
        Err(e) if e.is_connect() => fail("subscriber unreachable (connection failed)".into()),
        Err(e) => fail(format!("request failed: {e}")),
    }
}
