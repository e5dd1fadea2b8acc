//! The inputs of a decision: consents, agreements, encounters, the requester and the data.

use crate::codes::{
    Confidentiality, DataClass, InstitutionKind, Purpose, SecurityLabel, Sensitivity,
};
use crate::ids::{AgreementId, ConsentId, InstitutionId, PatientId, UserId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A time period; both ends inclusive, an absent end is open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    /// First instant the period covers.
    pub start: Option<DateTime<Utc>>,
    /// Last instant the period covers.
    pub end: Option<DateTime<Utc>>,
}

impl Period {
    /// A period with no bounds (always current).
    pub const ALWAYS: Period = Period {
        start: None,
        end: None,
    };

    /// A period between two instants (inclusive).
    pub fn between(start: DateTime<Utc>, end: DateTime<Utc>) -> Self {
        Self {
            start: Some(start),
            end: Some(end),
        }
    }

    /// Whether `at` lies inside the period.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start.is_none_or(|s| s <= at) && self.end.is_none_or(|e| at <= e)
    }
}

/// Consent status, after FHIR `Consent.status` plus an explicit `revoked`.
///
/// Only `Active` consents take part in decisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsentStatus {
    /// Not yet in force.
    Draft,
    /// Offered to the patient, not yet agreed.
    Proposed,
    /// In force.
    Active,
    /// Declined by the patient.
    Rejected,
    /// No longer in force (expired or replaced).
    Inactive,
    /// Withdrawn by the patient. Stored in FHIR as `inactive` plus the
    /// [`crate::fhir::REVOKED_EXTENSION_URL`] extension.
    Revoked,
    /// Recorded by mistake.
    EnteredInError,
}

/// Whether a provision grants or refuses access (FHIR `Consent.provision.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionType {
    /// Access refused.
    Deny,
    /// Access granted.
    Permit,
}

/// What a consent applies to. An empty list means "any".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Recipient institutions (`provision.actor.reference`); empty = any institution.
    pub actors: Vec<InstitutionId>,
    /// Purposes of use (`provision.purpose`); empty = any purpose.
    pub purposes: BTreeSet<Purpose>,
    /// Data classes (`provision.class`); empty = any data.
    pub classes: Vec<DataClass>,
    /// Security labels (`provision.securityLabel`); empty = data with any labels.
    /// A listed label matches data carrying that label.
    pub labels: Vec<SecurityLabel>,
}

/// A patient's consent, modelled after FHIR R4 `Consent` with a single provision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    /// Consent id.
    pub id: ConsentId,
    /// The patient (enterprise id) the consent belongs to.
    pub patient: PatientId,
    /// Status; only `Active` counts.
    pub status: ConsentStatus,
    /// Permit or deny.
    pub provision: ProvisionType,
    /// What the provision covers.
    pub scope: Scope,
    /// When the provision is in force (`provision.period`).
    pub period: Period,
}

impl Consent {
    /// Whether the consent is active at `at` (status active and period covering `at`).
    pub fn in_force(&self, at: DateTime<Utc>) -> bool {
        self.status == ConsentStatus::Active && self.period.contains(at)
    }

    /// Whether the consent names this institution explicitly as actor.
    pub fn names_actor(&self, institution: &InstitutionId) -> bool {
        self.scope.actors.iter().any(|a| a == institution)
    }

    /// Whether this consent covers the request's actor, purpose and data.
    pub fn applies_to(&self, request: &AccessRequest<'_>) -> bool {
        let scope = &self.scope;
        (scope.actors.is_empty() || self.names_actor(&request.requester.institution))
            && (scope.purposes.is_empty() || scope.purposes.contains(&request.purpose))
            && (scope.classes.is_empty()
                || scope
                    .classes
                    .iter()
                    .any(|c| request.data.classes.contains(c)))
            && (scope.labels.is_empty() || scope.labels.iter().any(|l| request.data.has_label(*l)))
    }

    /// Whether this consent lists `label` explicitly (needed for sensitive data).
    pub fn lists_label(&self, label: SecurityLabel) -> bool {
        self.scope.labels.contains(&label)
    }
}

/// Status of a data-sharing agreement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgreementStatus {
    /// In force.
    Active,
    /// Temporarily suspended.
    Suspended,
    /// Ended.
    Terminated,
}

/// A data-sharing agreement: the custodian shares data with the recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    /// Agreement id.
    pub id: AgreementId,
    /// The institution holding the data.
    pub custodian: InstitutionId,
    /// The institution receiving the data.
    pub recipient: InstitutionId,
    /// Purposes covered; must not be empty to cover anything.
    pub purposes: BTreeSet<Purpose>,
    /// Data classes covered; empty = all data.
    pub classes: Vec<DataClass>,
    /// Validity period.
    pub period: Period,
    /// Status; only `Active` counts.
    pub status: AgreementStatus,
}

impl Agreement {
    /// Whether this agreement covers the request.
    pub fn covers(&self, request: &AccessRequest<'_>) -> bool {
        self.status == AgreementStatus::Active
            && self.period.contains(request.at)
            && self.custodian == *request.custodian
            && self.recipient == request.requester.institution
            && self.purposes.contains(&request.purpose)
            && (self.classes.is_empty()
                || self
                    .classes
                    .iter()
                    .any(|c| request.data.classes.contains(c)))
    }
}

/// A care relationship: the patient has (or had) an encounter with an institution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encounter {
    /// The institution treating the patient.
    pub institution: InstitutionId,
    /// When the encounter is open.
    pub period: Period,
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// The requesting institution.
    pub institution: InstitutionId,
    /// Its kind.
    pub kind: InstitutionKind,
    /// The user acting, when known (recorded in reasons, not used by rules).
    pub user: Option<UserId>,
    /// The user's role, when known (recorded, not used by rules).
    pub role: Option<String>,
}

impl Requester {
    /// A requester without user details.
    pub fn institution(institution: impl Into<InstitutionId>, kind: InstitutionKind) -> Self {
        Self {
            institution: institution.into(),
            kind,
            user: None,
            role: None,
        }
    }
}

/// What data is asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataItem {
    /// Classes of the data: its resource type and any document categories.
    pub classes: Vec<DataClass>,
    /// Confidentiality of the data.
    pub confidentiality: Confidentiality,
    /// Sensitivity categories of the data.
    pub sensitivities: BTreeSet<Sensitivity>,
}

impl DataItem {
    /// Normal-confidentiality data of one FHIR resource type, without sensitivity labels.
    pub fn resource(resource_type: &str) -> Self {
        Self {
            classes: vec![DataClass::resource_type(resource_type)],
            confidentiality: Confidentiality::N,
            sensitivities: BTreeSet::new(),
        }
    }

    /// Adds a sensitivity label.
    pub fn with_sensitivity(mut self, s: Sensitivity) -> Self {
        self.sensitivities.insert(s);
        self
    }

    /// Sets the confidentiality.
    pub fn with_confidentiality(mut self, c: Confidentiality) -> Self {
        self.confidentiality = c;
        self
    }

    /// Whether the data carries this label.
    pub fn has_label(&self, label: SecurityLabel) -> bool {
        match label {
            SecurityLabel::Confidentiality(c) => self.confidentiality == c,
            SecurityLabel::Sensitivity(s) => self.sensitivities.contains(&s),
        }
    }
}

/// One access request. Borrowed so that a decision allocates nothing for its inputs.
#[derive(Clone, Debug)]
pub struct AccessRequest<'a> {
    /// Who asks.
    pub requester: &'a Requester,
    /// Why.
    pub purpose: Purpose,
    /// Whose data.
    pub patient: &'a PatientId,
    /// Which institution holds the data.
    pub custodian: &'a InstitutionId,
    /// What data.
    pub data: &'a DataItem,
    /// The instant of the request (the engine has no clock).
    pub at: DateTime<Utc>,
    /// The stated reason for break-the-glass (`ETREAT`).
    pub break_glass_reason: Option<&'a str>,
    /// The patient's encounters (care relationships) known to the caller.
    pub encounters: &'a [Encounter],
}
