//! Builders shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, TimeZone, Utc};
use yiqiao_consent::*;

/// The request instant used by the tests.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 8, 0, 0).unwrap()
}

pub fn days(n: i64) -> Duration {
    Duration::days(n)
}

pub fn consent(id: &str, provision: ProvisionType) -> Consent {
    Consent {
        id: ConsentId::new(id),
        patient: PatientId::new("p1"),
        status: ConsentStatus::Active,
        provision,
        scope: Scope::default(),
        period: Period::ALWAYS,
    }
}

pub fn deny(id: &str) -> Consent {
    consent(id, ProvisionType::Deny)
}

pub fn permit(id: &str) -> Consent {
    consent(id, ProvisionType::Permit)
}

/// Fluent modifiers for test consents.
pub trait ConsentExt: Sized {
    fn actor(self, institution: &str) -> Self;
    fn purpose(self, purpose: Purpose) -> Self;
    fn class(self, resource_type: &str) -> Self;
    fn data_class(self, class: DataClass) -> Self;
    fn sensitivity(self, s: Sensitivity) -> Self;
    fn confidentiality(self, c: Confidentiality) -> Self;
    fn status(self, status: ConsentStatus) -> Self;
    fn period(self, period: Period) -> Self;
    fn patient(self, patient: &str) -> Self;
}

impl ConsentExt for Consent {
    fn actor(mut self, institution: &str) -> Self {
        self.scope.actors.push(InstitutionId::new(institution));
        self
    }
    fn purpose(mut self, purpose: Purpose) -> Self {
        self.scope.purposes.insert(purpose);
        self
    }
    fn class(self, resource_type: &str) -> Self {
        self.data_class(DataClass::resource_type(resource_type))
    }
    fn data_class(mut self, class: DataClass) -> Self {
        self.scope.classes.push(class);
        self
    }
    fn sensitivity(mut self, s: Sensitivity) -> Self {
        self.scope.labels.push(SecurityLabel::Sensitivity(s));
        self
    }
    fn confidentiality(mut self, c: Confidentiality) -> Self {
        self.scope.labels.push(SecurityLabel::Confidentiality(c));
        self
    }
    fn status(mut self, status: ConsentStatus) -> Self {
        self.status = status;
        self
    }
    fn period(mut self, period: Period) -> Self {
        self.period = period;
        self
    }
    fn patient(mut self, patient: &str) -> Self {
        self.patient = PatientId::new(patient);
        self
    }
}

pub fn agreement(id: &str, custodian: &str, recipient: &str, purposes: &[Purpose]) -> Agreement {
    Agreement {
        id: AgreementId::new(id),
        custodian: InstitutionId::new(custodian),
        recipient: InstitutionId::new(recipient),
        purposes: purposes.iter().copied().collect(),
        classes: Vec::new(),
        period: Period::ALWAYS,
        status: AgreementStatus::Active,
    }
}

pub fn encounter(institution: &str, period: Period) -> Encounter {
    Encounter {
        institution: InstitutionId::new(institution),
        period,
    }
}

/// A period around `t0()`: from `t0 + start_days` to `t0 + end_days`.
pub fn around(start_days: i64, end_days: i64) -> Period {
    Period::between(t0() + days(start_days), t0() + days(end_days))
}

/// Obligation kinds as short names, sorted, for comparison.
pub fn obligation_kinds(decision: &Decision) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = decision
        .obligations
        .iter()
        .map(|o| match o {
            Obligation::Mask { .. } => "mask",
            Obligation::Pseudonymise { .. } => "pseudonymise",
            Obligation::FlagForReview { .. } => "flag",
        })
        .collect();
    kinds.sort_unstable();
    kinds
}
