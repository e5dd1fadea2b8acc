//! Consent and access-policy engine (pure: no IO, no clock of its own).
