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

mod cache;
mod conversion;
mod reasons;
mod release;

pub use cache::*;
pub use conversion::*;
pub use reasons::*;
pub use release::*;

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
}

impl Policy {
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
