//! The decision and the engine that makes it. See the crate docs for the algorithm.

use crate::codes::InstitutionKind;
use crate::codes::{Purpose, SecurityLabel};
use crate::config::{ConfigError, DefaultMode, PolicyConfig};
use crate::ids::{AgreementId, ConsentId};
use crate::mask::FieldRule;
use crate::model::{AccessRequest, Agreement, Consent, ProvisionType};
use crate::store::{AgreementStore, ConsentStore};
use serde::{Deserialize, Serialize};

/// Permit or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Access allowed (possibly with obligations).
    Permit,
    /// Access refused.
    Deny,
}

/// Stable rule ids. The string form (kebab-case) is part of the audit contract: never rename.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleId {
    /// 1. The custodian asks for its own data: permit.
    CustodianOwnData,
    /// 2. The requester's kind may not use this purpose: deny.
    PurposeNotAllowedForKind,
    /// 3a. Break-the-glass by a kind not allowed to: deny.
    BreakGlassKindNotAllowed,
    /// 3b. Break-the-glass without a stated reason: deny.
    BreakGlassReasonMissing,
    /// 3c. Break-the-glass: permit, flagged for review.
    BreakGlass,
    /// 4. A patient deny consent applies: deny.
    ConsentDeny,
    /// 5. A data-sharing agreement is required and none covers the request: deny.
    AgreementRequired,
    /// 5'. The agreement that satisfied rule 5 (note only).
    AgreementCovers,
    /// 6. An internet hospital without consent or encounter: deny.
    InternetHospitalNoRelationship,
    /// 6'. The relationship that satisfied rule 6 (note only).
    InternetHospitalRelationship,
    /// 7. Sensitive or very restricted data without an explicit permit: deny.
    SensitiveNeedsExplicitPermit,
    /// 8. A patient permit consent applies: permit.
    ConsentPermit,
    /// 9a. Opt-out region, default purpose: permit.
    DefaultOptOut,
    /// 9b. Opt-out region, purpose outside the defaults and no permit consent: deny.
    DefaultPurposeNeedsConsent,
    /// 9c. Opt-in region and no permit consent: deny.
    DefaultOptIn,
    /// Obligation: masking configured for the requester kind and purpose (note only).
    MaskingProfile,
    /// Obligation: research receives pseudonymised data only (note only).
    ResearchPseudonymised,
    /// Break-the-glass overrode a deny consent (note only, for the reviewer).
    BreakGlassOverrodeConsent,
}

impl RuleId {
    /// The stable string id.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleId::CustodianOwnData => "custodian-own-data",
            RuleId::PurposeNotAllowedForKind => "purpose-not-allowed-for-kind",
            RuleId::BreakGlassKindNotAllowed => "break-glass-kind-not-allowed",
            RuleId::BreakGlassReasonMissing => "break-glass-reason-missing",
            RuleId::BreakGlass => "break-glass",
            RuleId::ConsentDeny => "consent-deny",
            RuleId::AgreementRequired => "agreement-required",
            RuleId::AgreementCovers => "agreement-covers",
            RuleId::InternetHospitalNoRelationship => "internet-hospital-no-relationship",
            RuleId::InternetHospitalRelationship => "internet-hospital-relationship",
            RuleId::SensitiveNeedsExplicitPermit => "sensitive-needs-explicit-permit",
            RuleId::ConsentPermit => "consent-permit",
            RuleId::DefaultOptOut => "default-opt-out",
            RuleId::DefaultPurposeNeedsConsent => "default-purpose-needs-consent",
            RuleId::DefaultOptIn => "default-opt-in",
            RuleId::MaskingProfile => "masking-profile",
            RuleId::ResearchPseudonymised => "research-pseudonymised",
            RuleId::BreakGlassOverrodeConsent => "break-glass-overrode-consent",
        }
    }
}

/// Why: the rule, and the consent or agreement it rests on, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// The rule.
    pub rule: RuleId,
    /// The consent the rule rests on, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub consent: Option<ConsentId>,
    /// The agreement the rule rests on, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub agreement: Option<AgreementId>,
    /// A sentence for the auditor.
    pub text: String,
}

impl Reason {
    fn rule(rule: RuleId, text: String) -> Self {
        Self {
            rule,
            consent: None,
            agreement: None,
            text,
        }
    }

    fn consent(rule: RuleId, consent: &Consent, text: String) -> Self {
        Self {
            rule,
            consent: Some(consent.id.clone()),
            agreement: None,
            text,
        }
    }
}

/// Something the gateway must do before releasing a permitted response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Obligation {
    /// Mask, suppress or generalise these fields ([`crate::mask::apply_obligations`]).
    Mask {
        /// The field rules.
        rules: Vec<FieldRule>,
    },
    /// Pseudonymise with the requester-scoped key, and de-identify these fields.
    Pseudonymise {
        /// The field rules.
        rules: Vec<FieldRule>,
    },
    /// Record the access for after-the-fact review.
    FlagForReview {
        /// The reason the requester stated.
        reason: String,
    },
}

/// The outcome of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Permit or deny.
    pub effect: Effect,
    /// The rule (and consent/agreement) that decided.
    pub decided_by: Reason,
    /// What must be done before release (only on permit).
    pub obligations: Vec<Obligation>,
    /// Further reasons: agreements relied on, relationships found, obligations added.
    pub notes: Vec<Reason>,
}

impl Decision {
    fn new(effect: Effect, decided_by: Reason, notes: Vec<Reason>) -> Self {
        Self {
            effect,
            decided_by,
            obligations: Vec::new(),
            notes,
        }
    }

    /// Whether access is permitted.
    pub fn is_permit(&self) -> bool {
        self.effect == Effect::Permit
    }

    /// Whether the decision carries a review flag.
    pub fn flagged_for_review(&self) -> bool {
        self.obligations
            .iter()
            .any(|o| matches!(o, Obligation::FlagForReview { .. }))
    }
}

/// The policy engine: a validated configuration. Cheap to share (`&self` only).
#[derive(Clone, Debug)]
pub struct PolicyEngine {
    config: PolicyConfig,
}

/// The smallest-id in-force consent of the given type that satisfies `pred`.
/// Taking the smallest id keeps decisions independent of the order consents were loaded in.
fn pick<'c>(
    consents: &'c [Consent],
    request: &AccessRequest<'_>,
    provision: ProvisionType,
    pred: impl Fn(&Consent) -> bool,
) -> Option<&'c Consent> {
    consents
        .iter()
        .filter(|c| {
            c.patient == *request.patient
                && c.provision == provision
                && c.in_force(request.at)
                && c.applies_to(request)
                && pred(c)
        })
        .min_by(|a, b| a.id.cmp(&b.id))
}

impl PolicyEngine {
    /// Builds an engine after validating the configuration.
    pub fn new(config: PolicyConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration in use.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// Decides with the patient's consents and the agreements held in stores.
    pub fn decide_with(
        &self,
        request: &AccessRequest<'_>,
        consents: &ConsentStore,
        agreements: &AgreementStore,
    ) -> Decision {
        self.decide(
            request,
            consents.consents_for(request.patient),
            agreements.between(request.custodian, &request.requester.institution),
        )
    }

    /// Decides one request. `consents` should be the patient's consents (others are ignored);
    /// `agreements` may be any set (only those covering the request count).
    pub fn decide(
        &self,
        request: &AccessRequest<'_>,
        consents: &[Consent],
        agreements: &[Agreement],
    ) -> Decision {
        let mut decision = self.evaluate(request, consents, agreements);
        if decision.is_permit() {
            self.add_obligations(request, &mut decision);
        }
        decision
    }

    fn evaluate(
        &self,
        request: &AccessRequest<'_>,
        consents: &[Consent],
        agreements: &[Agreement],
    ) -> Decision {
        let cfg = &self.config;
        let requester = request.requester;
        let who = &requester.institution;
        let purpose = request.purpose;
        let mut notes = Vec::new();

        // 1. The custodian always sees its own data.
        if who == request.custodian {
            return Decision::new(
                Effect::Permit,
                Reason::rule(
                    RuleId::CustodianOwnData,
                    format!(
                        "Organization/{who} is the custodian of this data and always sees its own data."
                    ),
                ),
                notes,
            );
        }

        // 2. Purposes a kind may use at all.
        if purpose != Purpose::EmergencyTreatment
            && !cfg
                .purposes_by_kind
                .get(&requester.kind)
                .is_some_and(|p| p.contains(&purpose))
        {
            return Decision::new(
                Effect::Deny,
                Reason::rule(
                    RuleId::PurposeNotAllowedForKind,
                    format!(
                        "Institutions of kind {} may not request data for purpose {purpose}.",
                        requester.kind
                    ),
                ),
                notes,
            );
        }

        // 3. Break-the-glass overrides everything below it.
        if purpose == Purpose::EmergencyTreatment {
            return self.break_glass(request, consents);
        }

        // 4. Deny overrides permit.
        if let Some(deny) = pick(consents, request, ProvisionType::Deny, |_| true) {
            return Decision::new(
                Effect::Deny,
                Reason::consent(
                    RuleId::ConsentDeny,
                    deny,
                    format!(
                        "The patient's consent {} denies Organization/{who} access for purpose {purpose}; a deny overrides any permit.",
                        deny.id
                    ),
                ),
                notes,
            );
        }

        // 5. Data-sharing agreement, where required.
        if cfg.agreement_required_for.contains(&requester.kind) {
            match agreements
                .iter()
                .filter(|a| a.covers(request))
                .min_by(|a, b| a.id.cmp(&b.id))
            {
                Some(a) => notes.push(Reason {
                    rule: RuleId::AgreementCovers,
                    consent: None,
                    agreement: Some(a.id.clone()),
                    text: format!(
                        "Data-sharing agreement {} between custodian Organization/{} and Organization/{who} covers purpose {purpose} and this data.",
                        a.id, a.custodian
                    ),
                }),
                None => {
                    return Decision::new(
                        Effect::Deny,
                        Reason::rule(
                            RuleId::AgreementRequired,
                            format!(
                                "Institutions of kind {} need a data-sharing agreement with the custodian Organization/{}, and none in force covers purpose {purpose} and this data.",
                                requester.kind, request.custodian
                            ),
                        ),
                        notes,
                    );
                }
            }
        }

        // 6. Internet hospitals need a live relationship with the patient.
        if requester.kind == InstitutionKind::InternetHospital {
            if let Some(c) = pick(consents, request, ProvisionType::Permit, |c| {
                c.names_actor(who)
            }) {
                notes.push(Reason::consent(
                    RuleId::InternetHospitalRelationship,
                    c,
                    format!("The patient's consent {} names Organization/{who}.", c.id),
                ));
            } else if request
                .encounters
                .iter()
                .any(|e| e.institution == *who && e.period.contains(request.at))
            {
                notes.push(Reason::rule(
                    RuleId::InternetHospitalRelationship,
                    format!("The patient has an active encounter with Organization/{who}."),
                ));
            } else {
                return Decision::new(
                    Effect::Deny,
                    Reason::rule(
                        RuleId::InternetHospitalNoRelationship,
                        format!(
                            "Internet hospital Organization/{who} has neither an active consent naming it nor an active encounter with the patient."
                        ),
                    ),
                    notes,
                );
            }
        }

        // 7. Sensitive and very restricted data need a permit naming each label.
        let restricted = request
            .data
            .sensitivities
            .iter()
            .filter(|s| cfg.sensitive_categories.contains(s))
            .map(|s| SecurityLabel::Sensitivity(*s))
            .chain(
                cfg.explicit_permit_confidentiality
                    .contains(&request.data.confidentiality)
                    .then_some(SecurityLabel::Confidentiality(request.data.confidentiality)),
            );
        let mut first_explicit: Option<&Consent> = None;
        for label in restricted {
            match pick(consents, request, ProvisionType::Permit, |c| {
                c.lists_label(label)
            }) {
                Some(c) => {
                    if first_explicit.is_none() {
                        first_explicit = Some(c);
                    } else {
                        notes.push(Reason::consent(
                            RuleId::ConsentPermit,
                            c,
                            format!("The patient's consent {} explicitly permits data labelled {label}.", c.id),
                        ));
                    }
                }
                None => {
                    return Decision::new(
                        Effect::Deny,
                        Reason::rule(
                            RuleId::SensitiveNeedsExplicitPermit,
                            format!(
                                "The data is labelled {label}, which needs a permit consent naming {label} explicitly for Organization/{who} and purpose {purpose}; there is none, even for treatment."
                            ),
                        ),
                        notes,
                    );
                }
            }
        }
        if let Some(c) = first_explicit {
            return Decision::new(
                Effect::Permit,
                Reason::consent(
                    RuleId::ConsentPermit,
                    c,
                    format!(
                        "The patient's consent {} explicitly permits Organization/{who} this restricted data for purpose {purpose}.",
                        c.id
                    ),
                ),
                notes,
            );
        }

        // 8. A permit consent.
        if let Some(c) = pick(consents, request, ProvisionType::Permit, |_| true) {
            return Decision::new(
                Effect::Permit,
                Reason::consent(
                    RuleId::ConsentPermit,
                    c,
                    format!(
                        "The patient's consent {} permits Organization/{who} access for purpose {purpose}.",
                        c.id
                    ),
                ),
                notes,
            );
        }

        // 9. The regional default.
        let (effect, rule, text) = match cfg.default_mode {
            DefaultMode::OptOut if cfg.default_purposes.contains(&purpose) => (
                Effect::Permit,
                RuleId::DefaultOptOut,
                format!(
                    "The region is opt-out and the patient has not objected; purpose {purpose} is shared by default."
                ),
            ),
            DefaultMode::OptOut => (
                Effect::Deny,
                RuleId::DefaultPurposeNeedsConsent,
                format!(
                    "The region is opt-out, but purpose {purpose} is not shared by default and the patient has given no permit."
                ),
            ),
            DefaultMode::OptIn => (
                Effect::Deny,
                RuleId::DefaultOptIn,
                format!(
                    "The region is opt-in and the patient has given no permit covering Organization/{who} and purpose {purpose}."
                ),
            ),
        };
        Decision::new(effect, Reason::rule(rule, text), notes)
    }

    fn break_glass(&self, request: &AccessRequest<'_>, consents: &[Consent]) -> Decision {
        let kind = request.requester.kind;
        let who = &request.requester.institution;
        if !self.config.break_glass_kinds.contains(&kind) {
            return Decision::new(
                Effect::Deny,
                Reason::rule(
                    RuleId::BreakGlassKindNotAllowed,
                    format!("Institutions of kind {kind} may not break the glass (ETREAT)."),
                ),
                Vec::new(),
            );
        }
        let Some(reason) = request
            .break_glass_reason
            .map(str::trim)
            .filter(|r| !r.is_empty())
        else {
            return Decision::new(
                Effect::Deny,
                Reason::rule(
                    RuleId::BreakGlassReasonMissing,
                    "Break-the-glass (ETREAT) needs a stated, non-empty reason.".to_owned(),
                ),
                Vec::new(),
            );
        };
        let mut overridden: Vec<&Consent> = consents
            .iter()
            .filter(|c| {
                c.patient == *request.patient
                    && c.provision == ProvisionType::Deny
                    && c.in_force(request.at)
                    && c.applies_to(request)
            })
            .collect();
        overridden.sort_by(|a, b| a.id.cmp(&b.id));
        let notes = overridden
            .into_iter()
            .map(|c| {
                Reason::consent(
                    RuleId::BreakGlassOverrodeConsent,
                    c,
                    format!(
                        "Break-the-glass overrode the patient's deny consent {}.",
                        c.id
                    ),
                )
            })
            .collect();
        let mut decision = Decision::new(
            Effect::Permit,
            Reason::rule(
                RuleId::BreakGlass,
                format!(
                    "Emergency access (break-the-glass) by Organization/{who}, stated reason: \"{reason}\". Flagged for after-the-fact review."
                ),
            ),
            notes,
        );
        decision.obligations.push(Obligation::FlagForReview {
            reason: reason.to_owned(),
        });
        decision
    }

    fn add_obligations(&self, request: &AccessRequest<'_>, decision: &mut Decision) {
        let masking = &self.config.masking;
        let kind = request.requester.kind;
        let purpose = request.purpose;
        if decision.decided_by.rule != RuleId::CustodianOwnData {
            let rules: Vec<FieldRule> = masking
                .assignments
                .iter()
                .filter(|a| a.matches(kind, purpose))
                .flat_map(|a| a.rules.iter().cloned())
                .collect();
            if !rules.is_empty() {
                decision.notes.push(Reason::rule(
                    RuleId::MaskingProfile,
                    format!("Fields are masked as configured for requester kind {kind} and purpose {purpose}."),
                ));
                decision.obligations.push(Obligation::Mask { rules });
            }
        }
        if purpose == Purpose::Research {
            decision.notes.push(Reason::rule(
                RuleId::ResearchPseudonymised,
                "Research (HRESCH) receives pseudonymised data only.".to_owned(),
            ));
            decision.obligations.push(Obligation::Pseudonymise {
                rules: masking.research.clone(),
            });
        }
    }
}
