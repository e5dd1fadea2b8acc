//! Policy configuration with regional defaults. Deserialisable from JSON/TOML; unknown keys
//! are rejected with their name.

use crate::codes::{Confidentiality, InstitutionKind, Purpose, Sensitivity};
use crate::mask::{FieldRule, Technique};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// What happens when a patient has no consent that decides a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefaultMode {
    /// Sharing is allowed for the default purposes unless the patient objected.
    OptOut,
    /// Sharing needs a permit consent.
    OptIn,
}

/// Which masking rules apply to a requester kind and purpose.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingAssignment {
    /// Requester kinds this applies to; empty = every kind.
    #[serde(default)]
    pub kinds: BTreeSet<InstitutionKind>,
    /// Purposes this applies to; empty = every purpose.
    #[serde(default)]
    pub purposes: BTreeSet<Purpose>,
    /// Field rules to apply.
    pub rules: Vec<FieldRule>,
}

impl MaskingAssignment {
    /// Whether this assignment covers a requester kind and purpose.
    pub fn matches(&self, kind: InstitutionKind, purpose: Purpose) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind))
            && (self.purposes.is_empty() || self.purposes.contains(&purpose))
    }
}

/// Masking and de-identification configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// Masking by requester kind and purpose; every matching assignment applies.
    pub assignments: Vec<MaskingAssignment>,
    /// Rules for research (`HRESCH`): applied as a pseudonymisation obligation to every permit.
    pub research: Vec<FieldRule>,
}

/// Resource types whose identifying fields the default profiles cover.
const PERSON_TYPES: [&str; 3] = ["Patient", "RelatedPerson", "Person"];

fn person_rules(fields: &[(&str, Technique)]) -> Vec<FieldRule> {
    PERSON_TYPES
        .iter()
        .flat_map(|ty| {
            fields.iter().map(move |(field, technique)| FieldRule {
                path: format!("{ty}.{field}"),
                technique: *technique,
            })
        })
        .collect()
}

impl Default for MaskingConfig {
    fn default() -> Self {
        use Technique::*;
        let full_mask = person_rules(&[
            ("name", Name),
            ("identifier", Identifier),
            ("telecom", Telecom),
            ("address", Address),
            ("birthDate", DateToYear),
            ("photo", Suppress),
            ("contact.name", Name),
            ("contact.telecom", Telecom),
            ("contact.address", Address),
        ]);
        Self {
            assignments: vec![
                // Internet hospitals see who the patient is, but not the ID number or home address.
                MaskingAssignment {
                    kinds: [InstitutionKind::InternetHospital].into(),
                    purposes: BTreeSet::new(),
                    rules: person_rules(&[
                        ("identifier", Identifier),
                        ("address", Address),
                        ("photo", Suppress),
                        ("contact.address", Address),
                        ("contact.telecom", Telecom),
                    ]),
                },
                // Payment and operations do not need direct identifiers in clear.
                MaskingAssignment {
                    kinds: BTreeSet::new(),
                    purposes: [Purpose::Payment, Purpose::Operations].into(),
                    rules: full_mask,
                },
            ],
            research: person_rules(&[
                ("id", Pseudonymise),
                ("identifier", Pseudonymise),
                ("name", Suppress),
                ("telecom", Suppress),
                ("address", Address),
                ("birthDate", DateToYear),
                ("photo", Suppress),
                ("contact", Suppress),
                // Extensions may carry linkable ids (e.g. the enterprise person id).
                ("extension", Suppress),
            ]),
        }
    }
}

/// The whole policy configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Regional default when no consent decides. Default: `opt_out`.
    pub default_mode: DefaultMode,
    /// Purposes the opt-out default permits. Default: TREAT, PATRQT, PUBHLTH.
    /// Ignored under opt-in.
    pub default_purposes: BTreeSet<Purpose>,
    /// Purposes each requester kind may ask for at all (`ETREAT` is governed by
    /// `break_glass_kinds` instead). A kind missing from the map may ask for nothing.
    pub purposes_by_kind: BTreeMap<InstitutionKind, BTreeSet<Purpose>>,
    /// Requester kinds allowed to break the glass. Default: hospital.
    pub break_glass_kinds: BTreeSet<InstitutionKind>,
    /// Sensitivity categories that need a permit naming them explicitly. Default: all known.
    pub sensitive_categories: BTreeSet<Sensitivity>,
    /// Confidentiality levels that need a permit naming them explicitly. Default: V.
    pub explicit_permit_confidentiality: BTreeSet<Confidentiality>,
    /// Requester kinds that need a data-sharing agreement with the custodian. Default: none.
    pub agreement_required_for: BTreeSet<InstitutionKind>,
    /// Masking and de-identification.
    pub masking: MaskingConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        use Purpose::*;
        let purposes_by_kind = BTreeMap::from([
            (
                InstitutionKind::Hospital,
                [
                    Treatment,
                    Payment,
                    Operations,
                    PublicHealth,
                    Research,
                    PatientRequest,
                ]
                .into(),
            ),
            (
                InstitutionKind::InternetHospital,
                [Treatment, Payment, PatientRequest].into(),
            ),
            (
                InstitutionKind::PublicHealth,
                [PublicHealth, Research].into(),
            ),
            (
                InstitutionKind::RegionalPlatform,
                [Operations, PublicHealth, Research, PatientRequest].into(),
            ),
        ]);
        Self {
            default_mode: DefaultMode::OptOut,
            default_purposes: [Treatment, PatientRequest, PublicHealth].into(),
            purposes_by_kind,
            break_glass_kinds: [InstitutionKind::Hospital].into(),
            sensitive_categories: Sensitivity::ALL.into_iter().collect(),
            explicit_permit_confidentiality: [Confidentiality::V].into(),
            agreement_required_for: BTreeSet::new(),
            masking: MaskingConfig::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A masking rule path is not `ResourceType.field[.field…]`.
    #[error("masking rule path `{0}` must look like `ResourceType.field[.field...]`")]
    BadPath(String),
}

impl PolicyConfig {
    /// Checks the configuration (masking paths well formed).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let rules = self
            .masking
            .assignments
            .iter()
            .flat_map(|a| a.rules.iter())
            .chain(self.masking.research.iter());
        for rule in rules {
            rule.validate()?;
        }
        Ok(())
    }
}
