//! In-memory indexes so a decision looks only at one patient's consents and one pair's
//! agreements. Pure data structures: persistence and sharing across threads are the caller's.

use crate::ids::{ConsentId, InstitutionId, PatientId};
use crate::model::{Agreement, Consent, ConsentStatus};
use std::collections::HashMap;
use thiserror::Error;

/// A store operation that could not be done.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// No consent with this id.
    #[error("consent {0} is not in the store")]
    UnknownConsent(ConsentId),
    /// The caller's expected version is stale (optimistic concurrency).
    #[error("version conflict: expected {expected}, store is at {actual}")]
    VersionConflict {
        /// What the caller read.
        expected: u64,
        /// What the store holds.
        actual: u64,
    },
}

#[derive(Clone, Debug, Default)]
struct PatientConsents {
    consents: Vec<Consent>,
    version: u64,
}

/// Consents indexed by patient, with a monotonic version.
///
/// Every change increments the store's version; each patient records the version of its last
/// change, so a cache keyed by `(patient, patient_version)` is invalidated exactly when that
/// patient's consents change.
#[derive(Clone, Debug, Default)]
pub struct ConsentStore {
    by_patient: HashMap<PatientId, PatientConsents>,
    owner: HashMap<ConsentId, PatientId>,
    version: u64,
}

const NO_CONSENTS: &[Consent] = &[];

impl ConsentStore {
    /// An empty store at version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The store's version: the number of changes made so far.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The version of the last change to this patient's consents (0 if never changed).
    pub fn patient_version(&self, patient: &PatientId) -> u64 {
        self.by_patient.get(patient).map_or(0, |p| p.version)
    }

    /// Number of consents held.
    pub fn len(&self) -> usize {
        self.owner.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty()
    }

    /// The patient's consents (empty when none).
    pub fn consents_for(&self, patient: &PatientId) -> &[Consent] {
        self.by_patient
            .get(patient)
            .map_or(NO_CONSENTS, |p| &p.consents)
    }

    /// The patient's consents with the version they were read at.
    pub fn read(&self, patient: &PatientId) -> (u64, &[Consent]) {
        (self.patient_version(patient), self.consents_for(patient))
    }

    /// One consent by id.
    pub fn get(&self, id: &ConsentId) -> Option<&Consent> {
        let patient = self.owner.get(id)?;
        self.consents_for(patient).iter().find(|c| c.id == *id)
    }

    /// Inserts a consent, or replaces the one with the same id (even if it moved to another
    /// patient). Returns the new store version.
    pub fn upsert(&mut self, consent: Consent) -> u64 {
        self.detach(&consent.id);
        self.version += 1;
        let version = self.version;
        self.owner
            .insert(consent.id.clone(), consent.patient.clone());
        let entry = self.by_patient.entry(consent.patient.clone()).or_default();
        entry.consents.push(consent);
        entry.version = version;
        version
    }

    /// Like [`ConsentStore::upsert`], but only if the patient's version is still `expected`.
    pub fn upsert_if(&mut self, consent: Consent, expected: u64) -> Result<u64, StoreError> {
        let actual = self.patient_version(&consent.patient);
        if actual != expected {
            return Err(StoreError::VersionConflict { expected, actual });
        }
        Ok(self.upsert(consent))
    }

    /// Marks a consent revoked (it stays stored for audit). Returns the new store version.
    pub fn revoke(&mut self, id: &ConsentId) -> Result<u64, StoreError> {
        let patient = self
            .owner
            .get(id)
            .ok_or_else(|| StoreError::UnknownConsent(id.clone()))?;
        let entry = self
            .by_patient
            .get_mut(patient)
            .ok_or_else(|| StoreError::UnknownConsent(id.clone()))?;
        let consent = entry
            .consents
            .iter_mut()
            .find(|c| c.id == *id)
            .ok_or_else(|| StoreError::UnknownConsent(id.clone()))?;
        consent.status = ConsentStatus::Revoked;
        self.version += 1;
        entry.version = self.version;
        Ok(self.version)
    }

    /// Removes a consent entirely (e.g. entered in error). Returns the new store version.
    pub fn remove(&mut self, id: &ConsentId) -> Result<u64, StoreError> {
        if !self.detach(id) {
            return Err(StoreError::UnknownConsent(id.clone()));
        }
        self.version += 1;
        Ok(self.version)
    }

    /// Takes a consent out of its patient's list; stamps that patient with the next version.
    fn detach(&mut self, id: &ConsentId) -> bool {
        let Some(patient) = self.owner.remove(id) else {
            return false;
        };
        if let Some(entry) = self.by_patient.get_mut(&patient) {
            entry.consents.retain(|c| c.id != *id);
            entry.version = self.version + 1;
            if entry.consents.is_empty() {
                // Keep the entry so the patient's version stays monotonic.
                entry.consents.shrink_to_fit();
            }
        }
        true
    }
}

/// Data-sharing agreements indexed by custodian, then recipient.
#[derive(Clone, Debug, Default)]
pub struct AgreementStore {
    by_custodian: HashMap<InstitutionId, HashMap<InstitutionId, Vec<Agreement>>>,
}

const NO_AGREEMENTS: &[Agreement] = &[];

impl AgreementStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts an agreement, replacing one with the same id for the same pair.
    pub fn upsert(&mut self, agreement: Agreement) {
        let list = self
            .by_custodian
            .entry(agreement.custodian.clone())
            .or_default()
            .entry(agreement.recipient.clone())
            .or_default();
        list.retain(|a| a.id != agreement.id);
        list.push(agreement);
    }

    /// Agreements under which `custodian` shares with `recipient`.
    pub fn between(&self, custodian: &InstitutionId, recipient: &InstitutionId) -> &[Agreement] {
        self.by_custodian
            .get(custodian)
            .and_then(|m| m.get(recipient))
            .map_or(NO_AGREEMENTS, Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::model::{Period, ProvisionType, Scope};

    fn consent(id: &str, patient: &str) -> Consent {
        Consent {
            id: ConsentId::new(id),
            patient: PatientId::new(patient),
            status: ConsentStatus::Active,
            provision: ProvisionType::Permit,
            scope: Scope::default(),
            period: Period::ALWAYS,
        }
    }

    #[test]
    fn versions_are_monotonic_and_per_patient() {
        let mut store = ConsentStore::new();
        let (p1, p2) = (PatientId::new("p1"), PatientId::new("p2"));
        assert_eq!(store.read(&p1), (0, &[][..]));
        assert_eq!(store.upsert(consent("c1", "p1")), 1);
        assert_eq!(store.upsert(consent("c2", "p2")), 2);
        assert_eq!(store.patient_version(&p1), 1);
        assert_eq!(store.patient_version(&p2), 2);
        // Replace keeps one copy.
        let mut replaced = consent("c1", "p1");
        replaced.provision = ProvisionType::Deny;
        assert_eq!(store.upsert(replaced), 3);
        assert_eq!(store.consents_for(&p1).len(), 1);
        assert_eq!(store.consents_for(&p1)[0].provision, ProvisionType::Deny);
        // Revoke keeps the consent for audit.
        assert_eq!(store.revoke(&ConsentId::new("c1")).unwrap(), 4);
        assert_eq!(
            store.get(&ConsentId::new("c1")).unwrap().status,
            ConsentStatus::Revoked
        );
        assert_eq!(store.patient_version(&p1), 4);
        assert_eq!(store.patient_version(&p2), 2, "other patients untouched");
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.revoke(&ConsentId::new("nope")).unwrap_err(),
            StoreError::UnknownConsent(ConsentId::new("nope"))
        );
    }

    #[test]
    fn moving_a_consent_bumps_both_patients() {
        let mut store = ConsentStore::new();
        store.upsert(consent("c1", "p1"));
        let v = store.upsert(consent("c1", "p2"));
        assert!(store.consents_for(&PatientId::new("p1")).is_empty());
        assert_eq!(store.consents_for(&PatientId::new("p2")).len(), 1);
        assert_eq!(store.patient_version(&PatientId::new("p1")), v);
        assert_eq!(store.patient_version(&PatientId::new("p2")), v);
        assert_eq!(store.remove(&ConsentId::new("c1")).unwrap(), v + 1);
        assert!(store.is_empty());
        assert_eq!(store.patient_version(&PatientId::new("p2")), v + 1);
    }

    #[test]
    fn conditional_upsert_detects_stale_reads() {
        let mut store = ConsentStore::new();
        let (v0, _) = store.read(&PatientId::new("p1"));
        store.upsert_if(consent("c1", "p1"), v0).unwrap();
        let err = store.upsert_if(consent("c2", "p1"), v0).unwrap_err();
        assert_eq!(
            err,
            StoreError::VersionConflict {
                expected: 0,
                actual: 1
            }
        );
    }

    #[test]
    fn agreements_by_pair() {
        use crate::codes::Purpose;
        use crate::ids::AgreementId;
        use crate::model::{Agreement, AgreementStatus};
        let mut store = AgreementStore::new();
        let a = Agreement {
            id: AgreementId::new("a1"),
            custodian: InstitutionId::new("h1"),
            recipient: InstitutionId::new("h2"),
            purposes: [Purpose::Treatment].into(),
            classes: Vec::new(),
            period: Period::ALWAYS,
            status: AgreementStatus::Active,
        };
        store.upsert(a.clone());
        store.upsert(a);
        assert_eq!(
            store
                .between(&InstitutionId::new("h1"), &InstitutionId::new("h2"))
                .len(),
            1
        );
        assert!(
            store
                .between(&InstitutionId::new("h2"), &InstitutionId::new("h1"))
                .is_empty()
        );
    }
}
