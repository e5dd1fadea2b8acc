//! The gateway's consent enforcement point (issue 5, docs/consent.md).
//!
//! [`Policy`] (at `state.policy`) wraps the pure engine of `yiqiao_consent` with the things the
//! engine leaves to its caller: the clock, the patients' consents and the data-sharing
//! agreements read from the database, a per-replica cache of them, and cache invalidation
//! across replicas.
//!
//! ## What other modules call
//!
//! ```ignore
//! let ask = state.policy.ask(&caller, &req);          // purpose + break-the-glass reason
//! // One decision:
//! let decision = state.policy.decide(&caller, &ask, "person-id", "hosp-001",
//!                                    &DataItem::resource("Patient")).await?;
//! // Filter and mask a list of (custodian, enterprise patient, FHIR resource):
//! let released = state.policy.release(&caller, &ask, candidates).await?;
//! released.annotate(&mut audit_event);                // decision + reasons into the audit
//! state.auditor.record(audit_event).await?;
//! // released.kept: (input index, masked resource); released.withheld: what and why.
//! ```
//!
//! - **Purpose of use**: the access token's `purpose_of_use` (`caller.purpose`). When the
//!   credential carries none (the admin credential with `X-On-Behalf-Of`), the configured
//!   `consent.default_purpose` (default `TREAT`).
//! - **Break-the-glass**: purpose `ETREAT` plus the header [`BREAK_GLASS_HEADER`]
//!   (`X-Break-Glass-Reason: <free text>`). Without the header the engine denies
//!   (`break-glass-reason-missing`); with it the access is permitted (for configured kinds) and
//!   flagged for review in the audit record.
//! - **Data labels**: a resource's `meta.security` codings in the v3 Confidentiality and
//!   ActCode systems become the [`DataItem`]'s confidentiality and sensitivity
//!   ([`data_item_of`]); its class is its resource type.
//! - **Encounters**: for an internet-hospital requester, the care relationships of the persons
//!   decided (registered encounters, `registry::encounters::active_for_persons`) are read on
//!   every decision, uncached, so rule 6 sees a discharge at once. Other kinds never need them.
//!
//! ## Freshness across replicas
//!
//! Every consent or agreement write increments one database counter in the same transaction
//! (`registry::consent`). A replica remembers the counter it last saw and, before deciding,
//! asks the database which patients changed since then; their cached consents are dropped.
//! - Without Redis this counter is read from the database on every request (one single-row
//!   read), so a revocation committed before the next request starts is always seen.
//! - With Redis, a writer increments the Redis key `<prefix>consent:version` after its commit
//!   and before it answers; readers compare that key (one `GET`) with the value they last saw
//!   and only read the database counter when it moved, when Redis cannot be reached, or when
//!   the last database read is older than `consent.cache_max_age_ms` (the bound on staleness if
//!   a writer could not reach Redis).
//!
//! Fail closed: a stored consent that cannot be read, or masking that cannot be done, never
//! lets data through unmasked — the request fails or the resource is withheld.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use yiqiao_consent::{
    AccessRequest, Agreement, AgreementId, AgreementStatus, AgreementStore, Confidentiality,
    Consent, ConsentId, ConsentStatus, DataClass, DataItem, Decision, Effect, Encounter,
    InstitutionId, InstitutionKind, Obligation, PatientId, Period, PolicyEngine, PseudonymKey,
    Pseudonymiser, Purpose, Requester, Sensitivity, apply_obligations, consent_from_fhir,
};
use yiqiao_registry::Store;
use yiqiao_registry::audit::AuditEvent;
use yiqiao_registry::consent::{self as store, StoredAgreement, StoredConsent};
use yiqiao_registry::directory;
use yiqiao_registry::encounters;
use yiqiao_registry::store::DbConn;

use crate::auth::Caller;
use crate::config::Settings;
use crate::error::ApiError;

/// Header stating the reason for break-the-glass access (purpose `ETREAT`).
pub const BREAK_GLASS_HEADER: &str = "x-break-glass-reason";
/// Longest break-the-glass reason kept (characters).
const MAX_REASON_CHARS: usize = 500;

/// Why a caller asks: purpose of use and, for break-the-glass, the stated reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub purpose: Purpose,
    pub break_glass_reason: Option<String>,
}

/// One resource on its way out: who holds it, whose it is, and the resource itself.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Custodian institution id (the institution that registered the data).
    pub custodian: String,
    /// Enterprise person id; `None` for data not linked to a person (no consent can name it).
    pub patient: Option<String>,
    pub resource: Value,
}

/// A resource that was not released, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Withheld {
    /// Index in the input list.
    pub index: usize,
    pub custodian: String,
    pub patient: Option<String>,
    /// Rule id (stable, see `yiqiao_consent::RuleId`), or `masking-failed`.
    pub rule: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    pub reason: String,
}

/// Consent caches brought up to date during one request ([`Policy::sync_on`]): the change
/// counter read and the agreements in force then; hand it to [`Policy::release_with`] or
/// [`Policy::prepare_on`] / [`Policy::prepare`].
pub struct Synced {
    seq: i64,
    agreements: Arc<AgreementStore>,
}

/// Everything a release decides with besides the candidates, loaded once per request
/// ([`Policy::prepare_on`] / [`Policy::prepare`]): the requester, the agreements and consents
/// as of one change counter, the care relationships, the instant. A request that releases
/// in several parts (the federated search, one hospital's answer at a time, as they arrive)
/// decides every part with the same state and reads nothing shared after the first.
pub struct Prepared {
    requester: Requester,
    /// `None`: enforcement is off (`consent.enforce = false`), everything is released.
    state: Option<PreparedState>,
}

struct PreparedState {
    agreements: Arc<AgreementStore>,
    consents: HashMap<String, Arc<Vec<Consent>>>,
    encounters: HashMap<String, Vec<Encounter>>,
    at: DateTime<Utc>,
}

/// What [`Policy::sync`] does next.
enum SyncPlan {
    /// The cache is current (Redis marker unchanged): its counter and agreements.
    Fresh(i64, Arc<AgreementStore>),
    Read(SyncRead),
}

/// A database read the cache needs: changes after `since`, agreements unless `cached`.
struct SyncRead {
    since: i64,
    cached: Option<Arc<AgreementStore>>,
    marker: Option<i64>,
}

/// The result of [`Policy::release`].
#[derive(Debug, Default)]
pub struct Released {
    /// (index in the input, resource after masking), in input order.
    pub kept: Vec<(usize, Value)>,
    pub withheld: Vec<Withheld>,
    /// One audit entry per candidate (decision and reasons).
    reasons: Vec<ReasonEntry>,
    /// Whether enforcement was switched off (`consent.enforce = false`).
    unenforced: bool,
    /// Resources released and taken out of `kept` ([`Released::take_kept`]).
    taken: usize,
}

impl Released {
    /// Move the released resources out (a release in parts hands each part's resources on
    /// as it goes); they still count as released in the summary.
    pub fn take_kept(&mut self) -> Vec<(usize, Value)> {
        self.taken += self.kept.len();
        std::mem::take(&mut self.kept)
    }

    /// Withheld counts by rule id.
    pub fn withheld_by_rule(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for w in &self.withheld {
            *out.entry(w.rule.clone()).or_insert(0) += 1;
        }
        out
    }

    /// `permit` (all released), `deny` (none), `partial`, or `none` (nothing to decide).
    pub fn summary(&self) -> &'static str {
        match (
            self.kept.is_empty() && self.taken == 0,
            self.withheld.is_empty(),
        ) {
            _ if self.unenforced => "not-enforced",
            (true, true) => "none",
            (false, true) => "permit",
            (true, false) => "deny",
            (false, false) => "partial",
        }
    }

    /// Forget every candidate at index `n` or later (read ahead but not released).
    pub fn truncate(&mut self, n: usize) {
        self.kept.retain(|(i, _)| *i < n);
        self.withheld.retain(|w| w.index < n);
        self.reasons.truncate(n);
    }

    /// Append the results of another batch of candidates that followed this one; its indices
    /// are shifted by `offset` (the number of candidates before it).
    pub fn append(&mut self, other: Released, offset: usize) {
        self.unenforced |= other.unenforced;
        self.taken += other.taken;
        self.kept
            .extend(other.kept.into_iter().map(|(i, r)| (i + offset, r)));
        self.withheld
            .extend(other.withheld.into_iter().map(|mut w| {
                w.index += offset;
                w
            }));
        self.reasons.extend(other.reasons);
    }

    /// 403 `consent-denied` naming the rule that withheld the (first) resource.
    pub fn refusal(&self) -> ApiError {
        let (rule, reason) = self
            .withheld
            .first()
            .map(|w| (w.rule.as_str(), w.reason.as_str()))
            .unwrap_or(("consent", "withheld by the access policy"));
        ApiError::new(
            crate::error::ErrorCode::ConsentDenied,
            format!("withheld by the access policy (rule {rule}): {reason}"),
        )
    }

    /// The audited reasons: one entry per distinct decision (see [`group_reasons`]).
    pub fn reasons(&self) -> Value {
        group_reasons(&self.reasons)
    }

    /// Put the decision and its reasons (rule ids, consent and agreement ids) into an audit event.
    pub fn annotate(&self, event: &mut AuditEvent) {
        event.consent_decision = Some(self.summary().to_string());
        event.consent_reasons = Some(reasons_json(&self.reasons));
    }
}

/// The audit form of one candidate's decision: what [`group_reasons`] groups and writes.
/// Typed (not a JSON tree) so that a page of results costs a few allocations per candidate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReasonEntry {
    /// `permit` or `deny`.
    pub effect: &'static str,
    /// The deciding rule's id.
    pub rule: &'static str,
    /// The engine's sentence for the auditor.
    pub reason: String,
    /// The consent the decision rests on.
    pub consent: Option<String>,
    /// The agreement the decision rests on.
    pub agreement: Option<String>,
    /// `mask`, `pseudonymise`, `flag-for-review`.
    pub obligations: Vec<&'static str>,
    /// Further rules relied on.
    pub notes: Vec<NoteEntry>,
    pub custodian: Option<String>,
    pub patient: Option<String>,
    /// `Type/id` of the resource decided on.
    pub resource: Option<String>,
    /// Why a permitted resource was withheld after all (its obligations could not be met).
    pub masking_failed: Option<String>,
}

/// A further rule a decision relied on (its sentence is not audited, its ids are).
/// Fields in name order: the audited JSON has its keys sorted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct NoteEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consent: Option<String>,
    pub rule: &'static str,
}

impl ReasonEntry {
    /// The audit form of `decision` (no custodian, patient or resource yet).
    pub fn of(decision: &Decision) -> ReasonEntry {
        ReasonEntry {
            effect: match decision.effect {
                Effect::Permit => "permit",
                Effect::Deny => "deny",
            },
            rule: decision.decided_by.rule.as_str(),
            reason: decision.decided_by.text.clone(),
            consent: decision
                .decided_by
                .consent
                .as_ref()
                .map(|c| c.as_str().to_string()),
            agreement: decision
                .decided_by
                .agreement
                .as_ref()
                .map(|a| a.as_str().to_string()),
            obligations: decision
                .obligations
                .iter()
                .map(|o| match o {
                    Obligation::Mask { .. } => "mask",
                    Obligation::Pseudonymise { .. } => "pseudonymise",
                    Obligation::FlagForReview { .. } => "flag-for-review",
                })
                .collect(),
            notes: decision
                .notes
                .iter()
                .map(|n| NoteEntry {
                    rule: n.rule.as_str(),
                    consent: n.consent.as_ref().map(|c| c.as_str().to_string()),
                    agreement: n.agreement.as_ref().map(|a| a.as_str().to_string()),
                })
                .collect(),
            ..ReasonEntry::default()
        }
    }

    /// The whole entry as one JSON object (sorted keys, absent fields left out).
    pub fn to_value(&self) -> Value {
        let mut out = serde_json::Map::new();
        out.insert("effect".into(), Value::from(self.effect));
        out.insert("rule".into(), Value::from(self.rule));
        out.insert("reason".into(), Value::from(self.reason.as_str()));
        if !self.obligations.is_empty() {
            out.insert("obligations".into(), json!(self.obligations));
        }
        if !self.notes.is_empty() {
            out.insert("notes".into(), json!(self.notes));
        }
        for (k, v) in [
            ("agreement", &self.agreement),
            ("custodian", &self.custodian),
            ("masking_failed", &self.masking_failed),
            ("consent", &self.consent),
            ("patient", &self.patient),
            ("resource", &self.resource),
        ] {
            if let Some(v) = v {
                out.insert(k.into(), Value::from(v.as_str()));
            }
        }
        Value::Object(out)
    }

    /// The reason text with this entry's consent id replaced by `{consent}`.
    fn template(&self) -> std::borrow::Cow<'_, str> {
        match &self.consent {
            Some(id) if !id.is_empty() && self.reason.contains(id.as_str()) => {
                std::borrow::Cow::Owned(self.reason.replace(id.as_str(), "{consent}"))
            }
            _ => std::borrow::Cow::Borrowed(&self.reason),
        }
    }
}

/// What entries of one group share: everything but resource, patient and consent.
#[derive(PartialEq, Eq, Hash)]
struct GroupKey<'a> {
    effect: &'static str,
    rule: &'static str,
    template: std::borrow::Cow<'a, str>,
    agreement: Option<&'a str>,
    obligations: &'a [&'static str],
    notes: &'a [NoteEntry],
    custodian: Option<&'a str>,
    masking_failed: Option<&'a str>,
}

/// Group per-candidate audit reasons into one entry per distinct decision, in order of first
/// appearance, so a page of 50 results is not 50 copies of the same rule and text (the audit
/// record's size was a visible share of a search's latency; BENCHMARKS.md, "Consent engine").
///
/// Candidates fall into one group when everything but their resource, patient and consent is
/// equal (effect, rule, custodian, agreement, obligations, notes), the reason text compared
/// with the consent's id in it replaced by `{consent}`. Each group carries `count`, and:
/// - when all its candidates share one patient and one consent: those at the group level, the
///   reason text as the engine wrote it, and `resources` (their references, in candidate order);
/// - otherwise `items`, one `{patient, consent, resources}` per distinct patient and consent
///   (in order of first appearance; absent fields left out), and the reason text with
///   `{consent}` standing for each item's consent.
///
/// Nothing an auditor reads is lost: every candidate is in exactly one group with its own
/// decision, patient, consent and resource, and each reason text can be restored exactly.
pub fn group_reasons(entries: &[ReasonEntry]) -> Value {
    serde_json::to_value(grouped(entries)).unwrap_or_else(|_| json!([]))
}

/// [`group_reasons`] as JSON text, written straight from the entries (the form audited).
pub fn reasons_json(entries: &[ReasonEntry]) -> String {
    serde_json::to_string(&grouped(entries)).unwrap_or_else(|_| "[]".to_string())
}

/// One audited entry of [`group_reasons`]. Fields in name order: the JSON is the same as a
/// `serde_json::Value` object's (sorted keys).
#[derive(Serialize)]
struct Group<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'a str>,
    count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    custodian: Option<&'a str>,
    effect: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    items: Option<Vec<Item<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    masking_failed: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    notes: &'a [NoteEntry],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    obligations: &'a [&'static str],
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    reason: std::borrow::Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resources: Option<Vec<&'a str>>,
    rule: &'static str,
}

/// The results of one patient under one consent, in a group whose results differ by patient
/// or consent.
#[derive(Serialize)]
struct Item<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<&'a str>,
    resources: Vec<&'a str>,
}

fn grouped(entries: &[ReasonEntry]) -> Vec<Group<'_>> {
    let mut groups: Vec<(std::borrow::Cow<'_, str>, Vec<&ReasonEntry>)> = Vec::new();
    let mut by_key: HashMap<GroupKey<'_>, usize> = HashMap::new();
    for entry in entries {
        let key = GroupKey {
            effect: entry.effect,
            rule: entry.rule,
            template: entry.template(),
            agreement: entry.agreement.as_deref(),
            obligations: &entry.obligations,
            notes: &entry.notes,
            custodian: entry.custodian.as_deref(),
            masking_failed: entry.masking_failed.as_deref(),
        };
        let at = match by_key.get(&key) {
            Some(&at) => at,
            None => {
                groups.push((key.template.clone(), Vec::new()));
                by_key.insert(key, groups.len() - 1);
                groups.len() - 1
            }
        };
        groups[at].1.push(entry);
    }
    drop(by_key);
    groups
        .into_iter()
        .map(|(template, items)| {
            let first = items[0];
            let uniform = items
                .iter()
                .all(|e| e.patient == first.patient && e.consent == first.consent);
            let mut g = Group {
                agreement: first.agreement.as_deref(),
                consent: None,
                count: items.len(),
                custodian: first.custodian.as_deref(),
                effect: first.effect,
                items: None,
                masking_failed: first.masking_failed.as_deref(),
                notes: &first.notes,
                obligations: &first.obligations,
                patient: None,
                reason: template,
                resources: None,
                rule: first.rule,
            };
            if uniform {
                g.reason = std::borrow::Cow::Borrowed(&first.reason);
                g.patient = first.patient.as_deref();
                g.consent = first.consent.as_deref();
                g.resources = Some(items.iter().filter_map(|e| e.resource.as_deref()).collect());
            } else {
                let mut list: Vec<Item<'_>> = Vec::new();
                let mut at: HashMap<(Option<&str>, Option<&str>), usize> = HashMap::new();
                for e in &items {
                    let key = (e.patient.as_deref(), e.consent.as_deref());
                    let i = *at.entry(key).or_insert_with(|| {
                        list.push(Item {
                            consent: key.1,
                            patient: key.0,
                            resources: Vec::new(),
                        });
                        list.len() - 1
                    });
                    list[i].resources.extend(e.resource.as_deref());
                }
                g.items = Some(list);
            }
            g
        })
        .collect()
}

/// The audit form of one decision.
pub fn decision_reasons(decision: &Decision) -> Value {
    ReasonEntry::of(decision).to_value()
}

/// Put one decision into an audit event.
pub fn annotate_decision(event: &mut AuditEvent, decision: &Decision) {
    event.consent_decision = Some(
        match decision.effect {
            Effect::Permit => "permit",
            Effect::Deny => "deny",
        }
        .to_string(),
    );
    event.consent_reasons = Some(json!([decision_reasons(decision)]).to_string());
}

/// The [`DataItem`] of a FHIR resource: its type, and the labels in `meta.security`. For a
/// `DocumentReference` also the document's own `securityLabel`s, and its `type` and
/// `category` codings as data classes (a consent's `provision.class` can name a document type
/// or category as `system|code`).
pub fn data_item_of(resource: &Value) -> DataItem {
    let ty = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    let mut item = DataItem::resource(ty);
    let mut labels: Vec<&Value> = resource
        .pointer("/meta/security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .collect();
    if ty == "DocumentReference" {
        for label in resource
            .get("securityLabel")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            labels.extend(
                label
                    .get("coding")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            );
        }
        let concepts = resource
            .get("category")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .chain(resource.get("type"));
        for concept in concepts {
            for coding in concept
                .get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(system), Some(code)) = (
                    coding.get("system").and_then(Value::as_str),
                    coding.get("code").and_then(Value::as_str),
                ) {
                    item.classes.push(DataClass::coded(system, code));
                }
            }
        }
    }
    for coding in labels {
        let system = coding.get("system").and_then(Value::as_str).unwrap_or("");
        let code = coding.get("code").and_then(Value::as_str).unwrap_or("");
        if system == yiqiao_consent::codes::CONFIDENTIALITY_SYSTEM {
            if let Some(c) = Confidentiality::from_code(code)
                && c > item.confidentiality
            {
                item.confidentiality = c;
            }
        } else if system == yiqiao_consent::codes::ACT_CODE_SYSTEM
            && let Some(s) = Sensitivity::from_code(code)
        {
            item.sensitivities.insert(s);
        }
    }
    item
}

/// The engine's kind for a directory kind.
pub fn kind_of(kind: directory::InstitutionKind) -> InstitutionKind {
    match kind {
        directory::InstitutionKind::Hospital => InstitutionKind::Hospital,
        directory::InstitutionKind::InternetHospital => InstitutionKind::InternetHospital,
        directory::InstitutionKind::PublicHealth => InstitutionKind::PublicHealth,
        directory::InstitutionKind::RegionalPlatform => InstitutionKind::RegionalPlatform,
    }
}

/// The engine's consent from a stored row: the FHIR JSON, with id, patient (enterprise id)
/// taken from the row's columns.
pub fn consent_of(row: &StoredConsent) -> Result<Consent, String> {
    let mut resource: Value = serde_json::from_str(&row.resource)
        .map_err(|e| format!("stored consent {} is not JSON: {e}", row.id))?;
    resource["id"] = json!(row.id);
    resource["patient"] = json!({ "reference": format!("Patient/{}", row.patient_id) });
    let mut consent = consent_from_fhir(&resource)
        .map_err(|e| format!("stored consent {} cannot be read: {e}", row.id))?;
    consent.id = ConsentId::new(row.id.clone());
    consent.patient = PatientId::new(row.patient_id.clone());
    Ok(consent)
}

fn to_utc(t: Option<chrono::NaiveDateTime>) -> Option<DateTime<Utc>> {
    t.map(|t| t.and_utc())
}

/// The engine's agreement from a stored row.
pub fn agreement_of(row: &StoredAgreement) -> Result<Agreement, String> {
    let purposes: Vec<String> = serde_json::from_str(&row.purposes)
        .map_err(|e| format!("agreement {}: purposes: {e}", row.id))?;
    let classes: Vec<DataClass> = serde_json::from_str(&row.classes)
        .map_err(|e| format!("agreement {}: classes: {e}", row.id))?;
    Ok(Agreement {
        id: AgreementId::new(row.id.clone()),
        custodian: InstitutionId::new(row.custodian.clone()),
        recipient: InstitutionId::new(row.recipient.clone()),
        purposes: purposes
            .iter()
            .map(|p| {
                Purpose::from_code(p).ok_or_else(|| format!("agreement {}: purpose {p}", row.id))
            })
            .collect::<Result<_, _>>()?,
        classes,
        period: Period {
            start: to_utc(row.period_start),
            end: to_utc(row.period_end),
        },
        status: match row.status.as_str() {
            "active" => AgreementStatus::Active,
            "suspended" => AgreementStatus::Suspended,
            _ => AgreementStatus::Terminated,
        },
    })
}

struct Cache {
    /// Database change counter the cache reflects.
    seq: i64,
    /// Redis counter seen at the last database read (None: not read or Redis unavailable).
    marker: Option<i64>,
    synced_at: Option<Instant>,
    patients: HashMap<String, Arc<Vec<Consent>>>,
    agreements: Option<Arc<AgreementStore>>,
}

/// The enforcement point; see the module docs.
pub struct Policy {
    engine: PolicyEngine,
    enforce: bool,
    default_purpose: Purpose,
    key: Option<PseudonymKey>,
    store: Store,
    redis: Option<redis::Client>,
    redis_conn: OnceCell<ConnectionManager>,
    version_key: String,
    timeout: Duration,
    max_age: Duration,
    max_patients: usize,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("enforce", &self.enforce)
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

impl Policy {
    pub fn new(
        settings: &Settings,
        store: Store,
        redis: Option<redis::Client>,
    ) -> anyhow::Result<Policy> {
        let c = &settings.consent;
        if !c.enforce {
            if cfg!(feature = "bench-unenforced") {
                tracing::warn!(
                    "consent enforcement is OFF: data is released unfiltered and unmasked (benchmark build, feature bench-unenforced)"
                );
            } else {
                anyhow::bail!("consent.enforce {}", crate::config::UNENFORCED_REFUSED);
            }
        }
        let engine = PolicyEngine::new(c.policy.clone())
            .map_err(|e| anyhow::anyhow!("consent.policy: {e}"))?;
        let default_purpose = Purpose::from_code(&c.default_purpose)
            .ok_or_else(|| anyhow::anyhow!("consent.default_purpose: unknown purpose"))?;
        let key = if c.pseudonym_key.is_set() {
            let bytes = hex::decode(c.pseudonym_key.expose())
                .map_err(|e| anyhow::anyhow!("consent.pseudonym_key: {e}"))?;
            Some(
                PseudonymKey::new(bytes)
                    .map_err(|e| anyhow::anyhow!("consent.pseudonym_key: {e}"))?,
            )
        } else {
            None
        };
        Ok(Policy {
            engine,
            enforce: c.enforce,
            default_purpose,
            key,
            store,
            redis,
            redis_conn: OnceCell::new(),
            version_key: format!("{}consent:version", settings.redis.key_prefix),
            timeout: Duration::from_millis(settings.redis.timeout_ms.max(1)),
            max_age: Duration::from_millis(c.cache_max_age_ms),
            max_patients: c.cache_max_patients.max(1),
            cache: Mutex::new(Cache {
                seq: -1,
                marker: None,
                synced_at: None,
                patients: HashMap::new(),
                agreements: None,
            }),
        })
    }

    pub fn engine(&self) -> &PolicyEngine {
        &self.engine
    }

    pub fn enforced(&self) -> bool {
        self.enforce
    }

    /// The purpose and break-the-glass reason of a request (see the module docs).
    pub fn ask(&self, caller: &Caller, req: &HttpRequest) -> Ask {
        let break_glass_reason = req
            .headers()
            .get(BREAK_GLASS_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().chars().take(MAX_REASON_CHARS).collect::<String>())
            .filter(|v| !v.is_empty());
        Ask {
            purpose: caller.purpose.unwrap_or(self.default_purpose),
            break_glass_reason,
        }
    }

    /// The requester for an institution of the directory (a subscriber, not a caller).
    pub fn requester_of(institution: &directory::Institution) -> Requester {
        Requester::institution(institution.id.as_str(), kind_of(institution.kind))
    }

    /// The purpose used when a credential carries none (`consent.default_purpose`).
    pub fn default_purpose(&self) -> Purpose {
        self.default_purpose
    }

    /// The engine's view of the calling institution.
    pub fn requester(caller: &Caller) -> Requester {
        Requester::institution(
            caller.institution.id.as_str(),
            kind_of(caller.institution.kind),
        )
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut yiqiao_registry::store::DbConn) -> Result<T, yiqiao_registry::StoreError>
        + Send
        + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = store.conn()?;
            work(&mut conn)
        })
        .await?
        .map_err(ApiError::from)
    }

    async fn redis(&self) -> Option<ConnectionManager> {
        let client = self.redis.as_ref()?;
        let conn = self
            .redis_conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                match tokio::time::timeout(
                    self.timeout,
                    ConnectionManager::new_with_config(client.clone(), config),
                )
                .await
                {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("redis connect timed out".to_string()),
                }
            })
            .await;
        match conn {
            Ok(c) => Some(c.clone()),
            Err(e) => {
                tracing::warn!(cause = %e, "consent cache: Redis unavailable, reading the database counter");
                None
            }
        }
    }

    /// The Redis change counter; `None` without Redis or when it cannot be read.
    async fn redis_marker(&self) -> Option<i64> {
        let mut conn = self.redis().await?;
        let mut cmd = redis::cmd("GET");
        cmd.arg(&self.version_key);
        let get = cmd.query_async::<Option<i64>>(&mut conn);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(v)) => Some(v.unwrap_or(0)),
            Ok(Err(e)) => {
                tracing::warn!(cause = %e, "consent cache: Redis GET failed");
                None
            }
            Err(_) => None,
        }
    }

    /// After a consent or agreement write has committed: tell the other replicas (Redis) and
    /// drop this replica's cached entry. Call before answering the write.
    pub async fn changed(&self, patient: Option<&str>) {
        if let Ok(mut c) = self.cache.lock() {
            match patient {
                Some(p) => {
                    c.patients.remove(p);
                }
                None => c.agreements = None,
            }
            c.synced_at = None;
        }
        if let Some(mut conn) = self.redis().await {
            let mut cmd = redis::cmd("INCR");
            cmd.arg(&self.version_key);
            let incr = cmd.query_async::<i64>(&mut conn);
            match tokio::time::timeout(self.timeout, incr).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(cause = %e, "consent change not announced in Redis; other replicas see it within consent.cache_max_age_ms")
                }
                Err(_) => tracing::error!(
                    "consent change not announced in Redis (timeout); other replicas see it within consent.cache_max_age_ms"
                ),
            }
        }
    }

    /// Bring the cache up to date with the database; returns the counter it reflects.
    async fn sync(&self) -> Result<(i64, Arc<AgreementStore>), ApiError> {
        let marker = self.redis_marker().await;
        let plan = match self.sync_plan(marker)? {
            SyncPlan::Fresh(seq, agreements) => return Ok((seq, agreements)),
            SyncPlan::Read(plan) => plan,
        };
        let (since, have) = (plan.since, plan.cached.is_some());
        let read = self
            .blocking(move |conn| Self::sync_read(conn, since, have))
            .await?;
        self.sync_apply(plan, read)
    }

    /// [`Policy::sync`] on a database connection the caller already holds (inside its own
    /// blocking call, e.g. next to its data query), so the per-request read costs no extra
    /// trip to the blocking pool. Without Redis only: with Redis the marker decides whether to
    /// read at all, and `None` leaves that to [`Policy::release`]. `None` too when enforcement
    /// is off (nothing to read).
    pub fn sync_on(&self, conn: &mut DbConn) -> Result<Option<Synced>, ApiError> {
        if !self.enforce || self.redis.is_some() {
            return Ok(None);
        }
        let plan = match self.sync_plan(None)? {
            SyncPlan::Fresh(seq, agreements) => return Ok(Some(Synced { seq, agreements })),
            SyncPlan::Read(plan) => plan,
        };
        let read = Self::sync_read(conn, plan.since, plan.cached.is_some())?;
        let (seq, agreements) = self.sync_apply(plan, read)?;
        Ok(Some(Synced { seq, agreements }))
    }

    /// Whether the cache is known fresh (the Redis marker has not moved within `max_age`), or
    /// what must be read.
    fn sync_plan(&self, marker: Option<i64>) -> Result<SyncPlan, ApiError> {
        let c = self.lock()?;
        if let (Some(m), Some(seen), Some(at), Some(agreements)) =
            (marker, c.marker, c.synced_at, &c.agreements)
            && m == seen
            && at.elapsed() < self.max_age
        {
            return Ok(SyncPlan::Fresh(c.seq, agreements.clone()));
        }
        Ok(SyncPlan::Read(SyncRead {
            since: c.seq,
            cached: c.agreements.clone(),
            marker,
        }))
    }

    /// One round trip: the counter, what changed, and the agreements only when they did.
    fn sync_read(
        conn: &mut DbConn,
        since: i64,
        have_agreements: bool,
    ) -> Result<(store::Changes, Option<Vec<StoredAgreement>>), yiqiao_registry::StoreError> {
        let changes = store::changes_since(conn, since.max(0))?;
        let reload = since < 0 || changes.agreements || !have_agreements;
        let agreements = if reload {
            Some(store::list_agreements(conn)?)
        } else {
            None
        };
        Ok((changes, agreements))
    }

    /// Drop what changed from the cache; returns the counter and agreements it now reflects.
    fn sync_apply(
        &self,
        plan: SyncRead,
        (changes, agreements): (store::Changes, Option<Vec<StoredAgreement>>),
    ) -> Result<(i64, Arc<AgreementStore>), ApiError> {
        let table = match (agreements, plan.cached) {
            (Some(rows), _) => {
                let mut table = AgreementStore::new();
                for row in &rows {
                    table.upsert(agreement_of(row).map_err(ApiError::internal)?);
                }
                Arc::new(table)
            }
            (None, Some(cached)) => cached,
            (None, None) => Arc::new(AgreementStore::new()),
        };
        let mut c = self.lock()?;
        if plan.since < 0 {
            c.patients.clear();
        }
        if changes.seq >= c.seq {
            for p in &changes.patients {
                c.patients.remove(p);
            }
            c.seq = changes.seq;
            c.agreements = Some(table.clone());
            c.marker = plan.marker;
            c.synced_at = Some(Instant::now());
        }
        Ok((changes.seq, table))
    }

    /// The care relationships (active encounters) of `patients` at `at`, for an internet-
    /// hospital requester (rule 6); empty for other kinds, which the rule does not concern.
    async fn encounters_of(
        &self,
        requester: &Requester,
        patients: Vec<String>,
        at: DateTime<Utc>,
    ) -> Result<HashMap<String, Vec<Encounter>>, ApiError> {
        if requester.kind != InstitutionKind::InternetHospital || patients.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = self
            .blocking(move |conn| encounters::active_for_persons(conn, &patients, at.naive_utc()))
            .await?;
        Ok(care_relationships(rows))
    }

    /// [`Policy::encounters_of`] on a connection the caller holds.
    fn encounters_on(
        conn: &mut DbConn,
        requester: &Requester,
        patients: &[String],
        at: DateTime<Utc>,
    ) -> Result<HashMap<String, Vec<Encounter>>, ApiError> {
        if requester.kind != InstitutionKind::InternetHospital || patients.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = encounters::active_for_persons(conn, patients, at.naive_utc())?;
        Ok(care_relationships(rows))
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Cache>, ApiError> {
        self.cache
            .lock()
            .map_err(|_| ApiError::internal("consent cache lock poisoned"))
    }

    /// The consents of these patients (cached, else read), as of counter `seq`.
    async fn consents_of(
        &self,
        patients: Vec<String>,
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let (mut out, missing) = self.cached_consents(patients)?;
        if missing.is_empty() {
            return Ok(out);
        }
        let wanted = missing.clone();
        let rows = self
            .blocking(move |conn| store::for_patients(conn, &wanted))
            .await?;
        out.extend(self.cache_consents(missing, &rows, seq)?);
        Ok(out)
    }

    /// [`Policy::consents_of`] on a connection the caller holds (inside its blocking call).
    fn consents_on(
        &self,
        conn: &mut DbConn,
        patients: Vec<String>,
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let (mut out, missing) = self.cached_consents(patients)?;
        if missing.is_empty() {
            return Ok(out);
        }
        let rows = store::for_patients(conn, &missing)?;
        out.extend(self.cache_consents(missing, &rows, seq)?);
        Ok(out)
    }

    /// The cached consent lists of `patients`, and the patients not cached.
    #[allow(clippy::type_complexity)]
    fn cached_consents(
        &self,
        patients: Vec<String>,
    ) -> Result<(HashMap<String, Arc<Vec<Consent>>>, Vec<String>), ApiError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        let c = self.lock()?;
        for p in patients {
            match c.patients.get(&p) {
                Some(list) => {
                    out.insert(p, list.clone());
                }
                None => missing.push(p),
            }
        }
        Ok((out, missing))
    }

    /// The consent lists of `missing` from the rows read for them (cached when read at the
    /// counter the cache still reflects).
    fn cache_consents(
        &self,
        missing: Vec<String>,
        rows: &[(String, store::StoredConsent)],
        seq: i64,
    ) -> Result<HashMap<String, Arc<Vec<Consent>>>, ApiError> {
        let mut loaded: HashMap<String, Vec<Consent>> =
            missing.into_iter().map(|p| (p, Vec::new())).collect();
        for (patient, row) in rows {
            let mut consent = consent_of(row).map_err(ApiError::internal)?;
            // A consent recorded for a person since merged into `patient` applies to it.
            consent.patient = PatientId::new(patient.clone());
            loaded.entry(patient.clone()).or_default().push(consent);
        }
        let mut out = HashMap::new();
        let mut c = self.lock()?;
        // Only cache what was read at the counter the cache still reflects: a sync that ran
        // meanwhile may have dropped these patients because they changed.
        let cacheable = c.seq == seq;
        for (p, list) in loaded {
            let list = Arc::new(list);
            if cacheable {
                if c.patients.len() >= self.max_patients {
                    c.patients.clear();
                }
                c.patients.insert(p.clone(), list.clone());
            }
            out.insert(p, list);
        }
        Ok(out)
    }

    /// Decide one request about `patient`'s data held by `custodian`.
    pub async fn decide(
        &self,
        caller: &Caller,
        ask: &Ask,
        patient: &str,
        custodian: &str,
        data: &DataItem,
    ) -> Result<Decision, ApiError> {
        self.decide_at(caller, ask, patient, custodian, data, Utc::now())
            .await
    }

    /// [`Policy::decide`] at a given instant (the policy simulator).
    pub async fn decide_at(
        &self,
        caller: &Caller,
        ask: &Ask,
        patient: &str,
        custodian: &str,
        data: &DataItem,
        at: DateTime<Utc>,
    ) -> Result<Decision, ApiError> {
        let requester = Self::requester(caller);
        self.decide_for(&requester, ask, patient, custodian, data, at)
            .await
    }

    /// A decision for any requester (the policy simulator names one without its credential).
    pub async fn decide_for(
        &self,
        requester: &Requester,
        ask: &Ask,
        patient: &str,
        custodian: &str,
        data: &DataItem,
        at: DateTime<Utc>,
    ) -> Result<Decision, ApiError> {
        let (seq, agreements) = self.sync().await?;
        let consents = self.consents_of(vec![patient.to_string()], seq).await?;
        let list = consents.get(patient).cloned().unwrap_or_default();
        let encounters = self
            .encounters_of(requester, vec![patient.to_string()], at)
            .await?;
        let encounters = encounters.get(patient).map_or(&[][..], Vec::as_slice);
        let patient = PatientId::new(patient);
        let custodian = InstitutionId::new(custodian);
        let request = AccessRequest {
            requester,
            purpose: ask.purpose,
            patient: &patient,
            custodian: &custodian,
            data,
            at,
            break_glass_reason: ask.break_glass_reason.as_deref(),
            encounters,
        };
        Ok(self.engine.decide(
            &request,
            &list,
            agreements.between(&custodian, &requester.institution),
        ))
    }

    /// Decide each candidate, mask the permitted ones by their obligations, and say what was
    /// withheld and why. Order is kept.
    pub async fn release(
        &self,
        caller: &Caller,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Result<Released, ApiError> {
        self.release_for(&Self::requester(caller), ask, candidates)
            .await
    }

    /// [`Policy::release`] with the caches synchronised by [`Policy::sync_on`] earlier in
    /// this request (`None`: synchronise now).
    pub async fn release_with(
        &self,
        caller: &Caller,
        ask: &Ask,
        candidates: Vec<Candidate>,
        synced: Option<Synced>,
    ) -> Result<Released, ApiError> {
        self.release_synced(&Self::requester(caller), ask, candidates, synced)
            .await
    }

    /// [`Policy::release`] for a requester that is not the caller (a subscriber).
    pub async fn release_for(
        &self,
        requester: &Requester,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Result<Released, ApiError> {
        self.release_synced(requester, ask, candidates, None).await
    }

    async fn release_synced(
        &self,
        requester: &Requester,
        ask: &Ask,
        candidates: Vec<Candidate>,
        synced: Option<Synced>,
    ) -> Result<Released, ApiError> {
        if self.enforce && candidates.is_empty() {
            return Ok(Released::default());
        }
        let own = requester.institution.as_str();
        // The custodian's own data needs no consents (rule 1); read only the others'.
        let patients: Vec<String> = candidates
            .iter()
            .filter(|c| c.custodian != own)
            .filter_map(|c| c.patient.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let prepared = self.prepare_for(requester, patients, synced).await?;
        Ok(self.release_prepared(&prepared, ask, candidates))
    }

    /// The release context of `caller` for these patients' data ([`Prepared`]), reading
    /// what the caches lack; `synced` as from [`Policy::sync_on`] (`None`: synchronise now).
    pub async fn prepare(
        &self,
        caller: &Caller,
        patients: Vec<String>,
        synced: Option<Synced>,
    ) -> Result<Prepared, ApiError> {
        self.prepare_for(&Self::requester(caller), patients, synced)
            .await
    }

    async fn prepare_for(
        &self,
        requester: &Requester,
        patients: Vec<String>,
        synced: Option<Synced>,
    ) -> Result<Prepared, ApiError> {
        if !self.enforce {
            return Ok(Prepared {
                requester: requester.clone(),
                state: None,
            });
        }
        let (seq, agreements) = match synced {
            Some(Synced { seq, agreements }) => (seq, agreements),
            None => self.sync().await?,
        };
        let at = Utc::now();
        let consents = if patients.is_empty() {
            HashMap::new()
        } else {
            self.consents_of(patients.clone(), seq).await?
        };
        let encounters = self.encounters_of(requester, patients, at).await?;
        Ok(Prepared {
            requester: requester.clone(),
            state: Some(PreparedState {
                agreements,
                consents,
                encounters,
                at,
            }),
        })
    }

    /// [`Policy::prepare`] inside a blocking call that holds `conn` and has just run
    /// [`Policy::sync_on`] on it: no further trip to the database pool. `Ok(None)` when the
    /// synchronisation was left to [`Policy::prepare`] (with Redis, `synced` is `None`).
    pub fn prepare_on(
        &self,
        conn: &mut DbConn,
        requester: Requester,
        patients: Vec<String>,
        synced: Option<&Synced>,
    ) -> Result<Option<Prepared>, ApiError> {
        if !self.enforce {
            return Ok(Some(Prepared {
                requester,
                state: None,
            }));
        }
        let Some(Synced { seq, agreements }) = synced else {
            return Ok(None);
        };
        let at = Utc::now();
        let encounters = Self::encounters_on(conn, &requester, &patients, at)?;
        let consents = if patients.is_empty() {
            HashMap::new()
        } else {
            self.consents_on(conn, patients, *seq)?
        };
        Ok(Some(Prepared {
            requester,
            state: Some(PreparedState {
                agreements: agreements.clone(),
                consents,
                encounters,
                at,
            }),
        }))
    }

    /// Decide and mask `candidates` with a prepared context (no IO): the release itself.
    /// Candidates of patients the context was not prepared for are decided without consents.
    pub fn release_prepared(
        &self,
        prepared: &Prepared,
        ask: &Ask,
        candidates: Vec<Candidate>,
    ) -> Released {
        let Some(PreparedState {
            agreements,
            consents,
            encounters,
            at,
        }) = &prepared.state
        else {
            return Released {
                kept: candidates
                    .into_iter()
                    .map(|c| c.resource)
                    .enumerate()
                    .collect(),
                unenforced: true,
                ..Released::default()
            };
        };
        let requester = &prepared.requester;
        let own = requester.institution.as_str();
        let at = *at;
        let mut released = Released::default();
        let pseudonymiser = self
            .key
            .as_ref()
            .map(|k| Pseudonymiser::new(k, InstitutionId::new(own)));
        let none: Vec<Consent> = Vec::new();
        for (index, candidate) in candidates.into_iter().enumerate() {
            let data = data_item_of(&candidate.resource);
            // Unlinked data is keyed by nothing a consent could name.
            let patient_key = candidate
                .patient
                .clone()
                .unwrap_or_else(|| "(unlinked)".to_string());
            let patient = PatientId::new(patient_key.clone());
            let custodian = InstitutionId::new(candidate.custodian.clone());
            let list = consents.get(&patient_key).map_or(&none, |l| l.as_ref());
            let request = AccessRequest {
                requester,
                purpose: ask.purpose,
                patient: &patient,
                custodian: &custodian,
                data: &data,
                at,
                break_glass_reason: ask.break_glass_reason.as_deref(),
                encounters: encounters.get(&patient_key).map_or(&[][..], Vec::as_slice),
            };
            let decision = self.engine.decide(
                &request,
                list,
                agreements.between(&custodian, &requester.institution),
            );
            let mut reasons = ReasonEntry::of(&decision);
            reasons.custodian = Some(candidate.custodian.clone());
            reasons.patient = candidate.patient.clone();
            reasons.resource = resource_ref(&candidate.resource);
            if decision.is_permit() {
                let mut resource = candidate.resource;
                match apply_obligations(
                    &mut resource,
                    &decision.obligations,
                    pseudonymiser.as_ref(),
                ) {
                    Ok(()) => released.kept.push((index, resource)),
                    Err(e) => {
                        reasons.effect = "deny";
                        reasons.masking_failed = Some(e.to_string());
                        released.withheld.push(Withheld {
                            index,
                            custodian: candidate.custodian,
                            patient: candidate.patient,
                            rule: "masking-failed".into(),
                            consent: None,
                            reason: format!(
                                "permitted with obligations that could not be met: {e}"
                            ),
                        });
                    }
                }
            } else {
                released.withheld.push(Withheld {
                    index,
                    custodian: candidate.custodian,
                    patient: candidate.patient,
                    rule: decision.decided_by.rule.as_str().to_string(),
                    consent: decision
                        .decided_by
                        .consent
                        .as_ref()
                        .map(|c| c.as_str().to_string()),
                    reason: decision.decided_by.text.clone(),
                });
            }
            released.reasons.push(reasons);
        }
        released
    }

    /// Mask one resource by a decision's obligations (for single-resource exits).
    pub fn mask(
        &self,
        caller: &Caller,
        decision: &Decision,
        resource: &mut Value,
    ) -> Result<(), ApiError> {
        let pseudonymiser = self
            .key
            .as_ref()
            .map(|k| Pseudonymiser::new(k, InstitutionId::new(caller.institution.id.as_str())));
        apply_obligations(resource, &decision.obligations, pseudonymiser.as_ref()).map_err(|e| {
            ApiError::new(
                crate::error::ErrorCode::ConsentDenied,
                format!(
                    "the data may only be released with obligations that cannot be met here: {e}"
                ),
            )
        })
    }

    /// The consents in force considered for `patient` (for the policy simulator's answer).
    pub async fn consents_for(&self, patient: &str) -> Result<Vec<Consent>, ApiError> {
        let (seq, _) = self.sync().await?;
        let map = self.consents_of(vec![patient.to_string()], seq).await?;
        Ok(map
            .get(patient)
            .map(|l| l.as_ref().clone())
            .unwrap_or_default())
    }
}

/// Active encounters as the engine's care relationships, by person.
fn care_relationships(rows: Vec<encounters::CareRelationship>) -> HashMap<String, Vec<Encounter>> {
    let mut out: HashMap<String, Vec<Encounter>> = HashMap::new();
    for (person, institution, start, end) in rows {
        out.entry(person).or_default().push(Encounter {
            institution: InstitutionId::new(institution),
            period: Period {
                start: Some(start.and_utc()),
                end: end.map(|e| e.and_utc()),
            },
        });
    }
    out
}

fn resource_ref(resource: &Value) -> Option<String> {
    let ty = resource.get("resourceType")?.as_str()?;
    let id = resource.get("id")?.as_str()?;
    Some(format!("{ty}/{id}"))
}

/// Whether a consent status counts (`active`), for documentation in answers.
pub fn status_code(status: ConsentStatus) -> &'static str {
    match status {
        ConsentStatus::Draft => "draft",
        ConsentStatus::Proposed => "proposed",
        ConsentStatus::Active => "active",
        ConsentStatus::Rejected => "rejected",
        ConsentStatus::Inactive => "inactive",
        ConsentStatus::Revoked => "revoked",
        ConsentStatus::EnteredInError => "entered-in-error",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(effect: &'static str, rule: &'static str, reason: &str) -> ReasonEntry {
        ReasonEntry {
            effect,
            rule,
            reason: reason.into(),
            ..ReasonEntry::default()
        }
    }

    fn with(base: &ReasonEntry, resource: &str) -> ReasonEntry {
        ReasonEntry {
            resource: Some(resource.into()),
            ..base.clone()
        }
    }

    #[test]
    fn reasons_are_grouped_by_decision_with_every_resource_kept() {
        let permit = ReasonEntry {
            custodian: Some("h1".into()),
            patient: Some("P1".into()),
            ..entry("permit", "custodian", "own data")
        };
        let deny = ReasonEntry {
            consent: Some("c-9".into()),
            custodian: Some("h2".into()),
            patient: Some("P1".into()),
            ..entry("deny", "consent-deny", "patient said no")
        };
        let entries = vec![
            with(&permit, "DocumentReference/a"),
            with(&deny, "DocumentReference/b"),
            with(&permit, "DocumentReference/c"),
            permit.clone(), // a candidate without a resource reference still counts
            with(&deny, "DocumentReference/d"),
        ];
        let grouped = group_reasons(&entries);
        let groups = grouped.as_array().unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0]["rule"], "custodian");
        assert_eq!(groups[0]["count"], 3);
        assert_eq!(
            groups[0]["resources"],
            json!(["DocumentReference/a", "DocumentReference/c"])
        );
        assert_eq!(groups[1]["consent"], "c-9");
        assert_eq!(groups[1]["count"], 2);
        assert_eq!(
            groups[1]["resources"],
            json!(["DocumentReference/b", "DocumentReference/d"])
        );
        // The same decision at another custodian is another entry.
        let elsewhere = ReasonEntry {
            custodian: Some("h3".into()),
            ..with(&permit, "DocumentReference/e")
        };
        let grouped = group_reasons(&[entries[0].clone(), elsewhere]);
        assert_eq!(grouped.as_array().unwrap().len(), 2);
        // So is the same decision whose obligations could not be met.
        let failed = ReasonEntry {
            effect: "deny",
            masking_failed: Some("no such field".into()),
            ..with(&permit, "DocumentReference/f")
        };
        let grouped = group_reasons(&[entries[0].clone(), failed]);
        assert_eq!(grouped[1]["masking_failed"], "no such field");
        assert_eq!(grouped[1]["effect"], "deny");
        assert_eq!(group_reasons(&[]), json!([]));
    }

    #[test]
    fn decisions_that_differ_only_by_patient_and_consent_share_an_entry_with_items() {
        let permit = |patient: &str, consent: &str, doc: &str| ReasonEntry {
            custodian: Some("h1".into()),
            consent: Some(consent.into()),
            patient: Some(patient.into()),
            resource: Some(doc.into()),
            notes: vec![NoteEntry {
                rule: "agreement-relied-on",
                consent: None,
                agreement: Some("A1".into()),
            }],
            ..entry(
                "permit",
                "consent-permit",
                &format!(
                    "The patient's consent {consent} permits Organization/h2 access for purpose TREAT."
                ),
            )
        };
        let entries = vec![
            permit("P1", "Consent/c1", "DocumentReference/a"),
            permit("P2", "Consent/c2", "DocumentReference/b"),
            permit("P2", "Consent/c2", "DocumentReference/c"),
        ];
        let grouped = group_reasons(&entries);
        let groups = grouped.as_array().unwrap();
        assert_eq!(groups.len(), 1, "{grouped}");
        let g = &groups[0];
        assert_eq!(g["count"], 3);
        assert_eq!(
            g["reason"],
            "The patient's consent {consent} permits Organization/h2 access for purpose TREAT."
        );
        assert!(g.get("patient").is_none() && g.get("consent").is_none());
        assert_eq!(
            g["items"],
            json!([
                {"patient": "P1", "consent": "Consent/c1", "resources": ["DocumentReference/a"]},
                {"patient": "P2", "consent": "Consent/c2",
                 "resources": ["DocumentReference/b", "DocumentReference/c"]},
            ])
        );
        // Every original entry can be restored exactly from its group and item.
        let items = g["items"].as_array().unwrap();
        let mut restored_all = Vec::new();
        for item in items {
            for resource in item["resources"].as_array().unwrap() {
                let mut restored = g.as_object().unwrap().clone();
                restored.remove("count");
                restored.remove("items");
                for (k, v) in item.as_object().unwrap() {
                    if k != "resources" {
                        restored.insert(k.clone(), v.clone());
                    }
                }
                restored.insert("resource".into(), resource.clone());
                let text = restored["reason"]
                    .as_str()
                    .unwrap()
                    .replace("{consent}", item["consent"].as_str().unwrap());
                restored.insert("reason".into(), json!(text));
                restored_all.push(Value::Object(restored));
            }
        }
        let originals: Vec<Value> = entries.iter().map(ReasonEntry::to_value).collect();
        assert_eq!(restored_all, originals);
        // The audited text is written straight from the entries, with sorted keys, exactly
        // as this JSON value prints.
        assert_eq!(reasons_json(&entries), grouped.to_string());
        assert_eq!(
            reasons_json(&entries[..1]),
            r#"[{"consent":"Consent/c1","count":1,"custodian":"h1","effect":"permit","notes":[{"agreement":"A1","rule":"agreement-relied-on"}],"patient":"P1","reason":"The patient's consent Consent/c1 permits Organization/h2 access for purpose TREAT.","resources":["DocumentReference/a"],"rule":"consent-permit"}]"#
        );
        // One patient and one consent: the plain form, with the text as written.
        let one = group_reasons(&entries[1..]);
        assert_eq!(one[0]["consent"], "Consent/c2");
        assert_eq!(one[0]["patient"], "P2");
        assert_eq!(entries[1].to_value()["reason"], one[0]["reason"]);
        assert_eq!(
            one[0]["notes"],
            json!([{"rule": "agreement-relied-on", "agreement": "A1"}])
        );
        assert_eq!(
            one[0]["resources"],
            json!(["DocumentReference/b", "DocumentReference/c"])
        );
    }
}
