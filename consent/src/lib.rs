//! # Yiqiao consent engine
//!
//! A pure policy library: it decides whether a requester may see a patient's data, and how the
//! data must be masked on the way out. It does no IO and has no clock: the caller passes the
//! time, the patient's consents, the agreements between institutions and the patient's
//! encounters. It knows nothing of HTTP, databases or caches.
//!
//! ## The decision, in plain words
//!
//! A request says: *who* asks (institution, its kind, and the user when known), *why* (purpose
//! of use, an HL7 v3 ActReason code such as `TREAT`), *whose* data (the patient's enterprise
//! id), *which* institution holds the data (the custodian), *what* data (resource type or
//! document category, confidentiality and sensitivity labels) and *when*.
//!
//! Only consents that are **in force** count: status `active` and the request time inside the
//! consent's period (both ends inclusive). A consent **applies** to a request when each of its
//! lists is empty or contains the request's value: actors (institutions), purposes, data
//! classes, and security labels (a listed label matches data carrying it).
//!
//! The rules are checked in this order; the first one that decides, decides:
//!
//! 1. **Custodian's own data** (`custodian-own-data`): an institution always sees the data it
//!    holds itself. Permit. Nothing below can deny it.
//! 2. **Purpose allowed for the kind** (`purpose-not-allowed-for-kind`): each kind of
//!    institution may only ask for configured purposes (a CDC may not ask for payment). Deny.
//! 3. **Break-the-glass** (`ETREAT`): only configured kinds (default: hospitals) may use it
//!    (`break-glass-kind-not-allowed`, deny), and only with a stated, non-empty reason
//!    (`break-glass-reason-missing`, deny). Otherwise permit (`break-glass`), always with a
//!    flag-for-review obligation. Break-the-glass overrides rules 4–9, including patient
//!    denies; the overridden deny consents are listed in the decision's notes for the reviewer.
//! 4. **Patient deny** (`consent-deny`): a deny consent that applies decides Deny, whatever
//!    permits, agreements or encounters exist. Deny overrides permit.
//! 5. **Data-sharing agreement** (`agreement-required`): for requester kinds that the
//!    configuration names, an agreement in force between the custodian and the requester,
//!    covering the purpose and the data, must exist. Otherwise deny.
//! 6. **Internet hospitals** (`internet-hospital-no-relationship`): an internet hospital sees a
//!    patient only while the patient has an applicable permit consent naming that hospital, or
//!    an active encounter with it. Otherwise deny.
//! 7. **Sensitive data** (`sensitive-needs-explicit-permit`): data labelled with a configured
//!    sensitivity category (mental health `PSY`/`MH`/`BH`, substance use `ETH`/`SUD`, `HIV`,
//!    `STD`, genetics `GDIS`, reproductive health `SEX`, abuse/violence `SDV`, `SCA`) or with a
//!    configured confidentiality (default `V`) needs, for **each** such label, an applicable
//!    permit consent that names that label explicitly — even for treatment. Otherwise deny;
//!    if all are present, permit by those consents (`consent-permit`).
//! 8. **Patient permit** (`consent-permit`): an applicable permit consent decides Permit.
//! 9. **Regional default**: in an opt-out region the configured default purposes (default
//!    `TREAT`, `PATRQT`, `PUBHLTH`) are permitted (`default-opt-out`) and other purposes are
//!    denied (`default-purpose-needs-consent`); in an opt-in region the request is denied
//!    (`default-opt-in`).
//!
//! Where several consents or agreements could decide, the one with the smallest id is named,
//! so the decision never depends on load order.
//!
//! ## Obligations on a permit
//!
//! * The masking rules configured for the requester kind and purpose (`masking-profile`) —
//!   not for the custodian itself (rule 1).
//! * Research (`HRESCH`) always receives pseudonymised data only (`research-pseudonymised`),
//!   even from rule 1: the rule is about the purpose, not about access.
//! * Break-the-glass adds a review flag.
//!
//! [`mask::apply_obligations`] carries out the masking obligations on a FHIR resource or Bundle.
//!
//! ## Always a reason
//!
//! Every [`Decision`] names the rule that decided (a stable id, see [`RuleId`]), the consent or
//! agreement it rested on, and a sentence an auditor can read; further notes list the
//! agreements and relationships relied on and the obligations added. Decisions serialise with
//! serde.
//!
//! ## Integration sketch
//!
//! ```
//! use yiqiao_consent::*;
//! let engine = PolicyEngine::new(PolicyConfig::default())?;
//! let mut consents = ConsentStore::new();
//! let agreements = AgreementStore::new();
//! let requester = Requester::institution("h2", InstitutionKind::Hospital);
//! let (patient, custodian) = (PatientId::new("p1"), InstitutionId::new("h1"));
//! let data = DataItem::resource("Observation");
//! let request = AccessRequest {
//!     requester: &requester,
//!     purpose: Purpose::Treatment,
//!     patient: &patient,
//!     custodian: &custodian,
//!     data: &data,
//!     at: chrono::Utc::now(), // the caller owns the clock
//!     break_glass_reason: None,
//!     encounters: &[],
//! };
//! let decision = engine.decide_with(&request, &consents, &agreements);
//! assert_eq!(decision.effect, Effect::Permit);
//! assert_eq!(decision.decided_by.rule, RuleId::DefaultOptOut);
//! # Ok::<(), ConfigError>(())
//! ```

pub mod codes;
pub mod config;
pub mod decision;
pub mod fhir;
pub mod ids;
pub mod mask;
pub mod model;
pub mod store;

pub use codes::{Confidentiality, DataClass, InstitutionKind, Purpose, SecurityLabel, Sensitivity};
pub use config::{ConfigError, DefaultMode, MaskingAssignment, MaskingConfig, PolicyConfig};
pub use decision::{Decision, Effect, Obligation, PolicyEngine, Reason, RuleId};
pub use fhir::{FhirConsentError, consent_from_fhir, consent_to_fhir};
pub use ids::{AgreementId, ConsentId, EnterpriseId, InstitutionId, PatientId, UserId};
pub use mask::{
    FieldRule, MaskError, PseudonymKey, Pseudonymiser, Technique, apply_obligations, apply_rules,
};
pub use model::{
    AccessRequest, Agreement, AgreementStatus, Consent, ConsentStatus, DataItem, Encounter, Period,
    ProvisionType, Requester, Scope,
};
pub use store::{AgreementStore, ConsentStore, StoreError};
