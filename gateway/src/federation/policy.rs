//! The release decision for each resource a hospital returned, before anything reaches the
//! requester. The consent engine (`yiqiao_consent`) is wired in behind [`ReleasePolicy`];
//! until then [`PermitAll`] releases everything.

use serde_json::Value;

use crate::auth::Caller;

/// The decision on one resource.
#[derive(Debug, Clone, PartialEq)]
pub enum Release {
    /// Release this (possibly redacted) resource.
    Keep(Value),
    /// Do not release it; `reason` is counted in the response's OperationOutcome.
    Withhold { reason: String },
}

/// Decides per requester, enterprise patient, custodian institution and resource.
pub trait ReleasePolicy: Send + Sync {
    fn release(
        &self,
        caller: &Caller,
        enterprise_patient: &str,
        custodian: &str,
        resource: Value,
    ) -> Release;
}

/// Releases everything (the placeholder until the consent engine is wired in).
#[derive(Debug, Clone, Copy, Default)]
pub struct PermitAll;

impl ReleasePolicy for PermitAll {
    fn release(&self, _: &Caller, _: &str, _: &str, resource: Value) -> Release {
        Release::Keep(resource)
    }
}
