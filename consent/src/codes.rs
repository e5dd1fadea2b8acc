//! Standard codes the engine understands.
//!
//! * Purpose of use: HL7 v3 `ActReason` (system
//!   `http://terminology.hl7.org/CodeSystem/v3-ActReason`).
//! * Confidentiality: HL7 v3 `Confidentiality` (system
//!   `http://terminology.hl7.org/CodeSystem/v3-Confidentiality`).
//! * Sensitivity: HL7 v3 `ActCode`, `InformationSensitivityPolicy` branch (system
//!   `http://terminology.hl7.org/CodeSystem/v3-ActCode`).

use serde::{Deserialize, Serialize};
use std::fmt;

/// FHIR code system of purposes of use.
pub const ACT_REASON_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// FHIR code system of confidentiality codes.
pub const CONFIDENTIALITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// FHIR code system of sensitivity (information sensitivity policy) codes.
pub const ACT_CODE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// FHIR code system of resource types, used for `Consent.provision.class`.
pub const RESOURCE_TYPES_SYSTEM: &str = "http://hl7.org/fhir/resource-types";

/// Purpose of use (HL7 v3 `ActReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Purpose {
    /// `TREAT` — treatment.
    #[serde(rename = "TREAT")]
    Treatment,
    /// `ETREAT` — emergency treatment ("break the glass").
    #[serde(rename = "ETREAT")]
    EmergencyTreatment,
    /// `HPAYMT` — healthcare payment (insurance, settlement).
    #[serde(rename = "HPAYMT")]
    Payment,
    /// `HOPERAT` — healthcare operations (quality, management).
    #[serde(rename = "HOPERAT")]
    Operations,
    /// `PUBHLTH` — public health.
    #[serde(rename = "PUBHLTH")]
    PublicHealth,
    /// `HRESCH` — healthcare research.
    #[serde(rename = "HRESCH")]
    Research,
    /// `PATRQT` — at the patient's request.
    #[serde(rename = "PATRQT")]
    PatientRequest,
}

impl Purpose {
    /// All purposes, in a stable order.
    pub const ALL: [Purpose; 7] = [
        Purpose::Treatment,
        Purpose::EmergencyTreatment,
        Purpose::Payment,
        Purpose::Operations,
        Purpose::PublicHealth,
        Purpose::Research,
        Purpose::PatientRequest,
    ];

    /// The v3 `ActReason` code.
    pub fn code(self) -> &'static str {
        match self {
            Purpose::Treatment => "TREAT",
            Purpose::EmergencyTreatment => "ETREAT",
            Purpose::Payment => "HPAYMT",
            Purpose::Operations => "HOPERAT",
            Purpose::PublicHealth => "PUBHLTH",
            Purpose::Research => "HRESCH",
            Purpose::PatientRequest => "PATRQT",
        }
    }

    /// Parses a v3 `ActReason` code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.code() == code)
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The kind of a requesting institution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstitutionKind {
    /// A hospital or clinic (医疗机构).
    Hospital,
    /// An internet hospital platform (互联网医院).
    InternetHospital,
    /// A public-health body, e.g. a CDC (疾控/公共卫生机构).
    PublicHealth,
    /// The regional platform itself (区域平台).
    RegionalPlatform,
}

impl InstitutionKind {
    /// All kinds, in a stable order.
    pub const ALL: [InstitutionKind; 4] = [
        InstitutionKind::Hospital,
        InstitutionKind::InternetHospital,
        InstitutionKind::PublicHealth,
        InstitutionKind::RegionalPlatform,
    ];
}

impl fmt::Display for InstitutionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstitutionKind::Hospital => "hospital",
            InstitutionKind::InternetHospital => "internet_hospital",
            InstitutionKind::PublicHealth => "public_health",
            InstitutionKind::RegionalPlatform => "regional_platform",
        })
    }
}

/// Confidentiality (HL7 v3 `Confidentiality`), ordered from least to most restricted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Confidentiality {
    /// `U` — unrestricted.
    U,
    /// `L` — low.
    L,
    /// `M` — moderate.
    M,
    /// `N` — normal (the default for health data).
    N,
    /// `R` — restricted.
    R,
    /// `V` — very restricted.
    V,
}

impl Confidentiality {
    /// All levels, least restricted first.
    pub const ALL: [Confidentiality; 6] = [
        Confidentiality::U,
        Confidentiality::L,
        Confidentiality::M,
        Confidentiality::N,
        Confidentiality::R,
        Confidentiality::V,
    ];

    /// The v3 code.
    pub fn code(self) -> &'static str {
        match self {
            Confidentiality::U => "U",
            Confidentiality::L => "L",
            Confidentiality::M => "M",
            Confidentiality::N => "N",
            Confidentiality::R => "R",
            Confidentiality::V => "V",
        }
    }

    /// Parses a v3 confidentiality code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }
}

/// Sensitivity category (HL7 v3 `ActCode`, `InformationSensitivityPolicy`).
///
/// | code | meaning (HL7 wording, shortened) |
/// |---|---|
/// | `PSY` | psychiatry disorder information |
/// | `MH` | mental health information |
/// | `BH` | behavioural health information |
/// | `ETH` | substance abuse information |
/// | `SUD` | substance use disorder information |
/// | `HIV` | HIV/AIDS information |
/// | `STD` | sexually transmitted disease information |
/// | `GDIS` | genetic disease information |
/// | `SEX` | sexuality and reproductive health information |
/// | `SDV` | sexual assault, abuse, or domestic violence information |
/// | `SCA` | sickle cell anaemia information |
///
/// Note: in HL7 `SDV` is sexual assault / domestic violence, not substance use; substance use is
/// `ETH` (and `SUD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Sensitivity {
    /// `PSY`
    Psy,
    /// `MH`
    Mh,
    /// `BH`
    Bh,
    /// `ETH`
    Eth,
    /// `SUD`
    Sud,
    /// `HIV`
    Hiv,
    /// `STD`
    Std,
    /// `GDIS`
    Gdis,
    /// `SEX`
    Sex,
    /// `SDV`
    Sdv,
    /// `SCA`
    Sca,
}

impl Sensitivity {
    /// All sensitivity codes, in a stable order.
    pub const ALL: [Sensitivity; 11] = [
        Sensitivity::Psy,
        Sensitivity::Mh,
        Sensitivity::Bh,
        Sensitivity::Eth,
        Sensitivity::Sud,
        Sensitivity::Hiv,
        Sensitivity::Std,
        Sensitivity::Gdis,
        Sensitivity::Sex,
        Sensitivity::Sdv,
        Sensitivity::Sca,
    ];

    /// The v3 `ActCode` code.
    pub fn code(self) -> &'static str {
        match self {
            Sensitivity::Psy => "PSY",
            Sensitivity::Mh => "MH",
            Sensitivity::Bh => "BH",
            Sensitivity::Eth => "ETH",
            Sensitivity::Sud => "SUD",
            Sensitivity::Hiv => "HIV",
            Sensitivity::Std => "STD",
            Sensitivity::Gdis => "GDIS",
            Sensitivity::Sex => "SEX",
            Sensitivity::Sdv => "SDV",
            Sensitivity::Sca => "SCA",
        }
    }

    /// Parses a v3 `ActCode` sensitivity code.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.code() == code)
    }
}

/// A security label on data or in a consent provision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum SecurityLabel {
    /// A confidentiality level.
    Confidentiality(Confidentiality),
    /// A sensitivity category.
    Sensitivity(Sensitivity),
}

impl SecurityLabel {
    /// The FHIR coding `(system, code)` of this label.
    pub fn coding(self) -> (&'static str, &'static str) {
        match self {
            SecurityLabel::Confidentiality(c) => (CONFIDENTIALITY_SYSTEM, c.code()),
            SecurityLabel::Sensitivity(s) => (ACT_CODE_SYSTEM, s.code()),
        }
    }
}

impl fmt::Display for SecurityLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.coding().1)
    }
}

/// A class of data: a FHIR resource type or a document category, identified by system and code.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DataClass {
    /// Code system, e.g. [`RESOURCE_TYPES_SYSTEM`] or a document-category system.
    pub system: String,
    /// Code within the system, e.g. `Observation`.
    pub code: String,
}

impl DataClass {
    /// A FHIR resource type, e.g. `DataClass::resource_type("Observation")`.
    pub fn resource_type(name: impl Into<String>) -> Self {
        Self {
            system: RESOURCE_TYPES_SYSTEM.to_owned(),
            code: name.into(),
        }
    }

    /// Any coded class (for example a document category).
    pub fn coded(system: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            system: system.into(),
            code: code.into(),
        }
    }
}

impl fmt::Display for DataClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.system == RESOURCE_TYPES_SYSTEM {
            f.write_str(&self.code)
        } else {
            write!(f, "{}|{}", self.system, self.code)
        }
    }
}
