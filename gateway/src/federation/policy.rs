//! A deployment's own filter on each resource a hospital returned ([`ReleasePolicy`]), applied
//! before the consent engine. The consent engine (`state.policy`, crate::policy) is applied
//! after it to every resource, always; [`PermitAll`], the default hook, only means "no
//! deployment-specific filter" — it does not bypass consent.

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

/// The default hook: no deployment-specific filter (the consent engine still decides).
#[derive(Debug, Clone, Copy, Default)]
pub struct PermitAll;

impl ReleasePolicy for PermitAll {
    fn release(&self, _: &Caller, _: &str, _: &str, resource: Value) -> Release {
        Release::Keep(resource)
    }
}
