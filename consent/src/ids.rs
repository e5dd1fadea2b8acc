//! Newtype identifiers, so that an institution id can never be passed where a
//! patient id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an identifier string.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self(value.to_owned())
            }
        }
    };
}

string_id!(
    /// A registered institution (FHIR `Organization/<id>`).
    InstitutionId
);
string_id!(
    /// The enterprise (master patient index) id of a person: the key consents are stored under.
    /// FHIR `Patient/<id>`.
    PatientId
);
string_id!(
    /// A patient consent (FHIR `Consent.id`).
    ConsentId
);
string_id!(
    /// A data-sharing agreement between two institutions.
    AgreementId
);
string_id!(
    /// A user (health worker) acting for an institution.
    UserId
);

/// The enterprise id of a person; the same thing as [`PatientId`].
pub type EnterpriseId = PatientId;
