//! Rate limits on API calls (issue 25; docs/auth.md "API rate limits").
//!
//! - A call authenticated with a gateway access token spends from two budgets: its **token's**
//!   and its **institution's** (all of the institution's tokens together). The token's comes
//!   first, so a runaway client is stopped at its own budget before it drains the
//!   institution's (with Redis the two are taken all or nothing).
//! - A public directory read (`/fhir/Organization`, `/fhir/Endpoint`, no credential) spends from
//!   its **client address's** budget.
//!
//! Over a budget: 429 `rate-limited` (OperationOutcome) with `Retry-After`, `RateLimit-Limit`
//! and `RateLimit-Remaining: 0`. The buckets are the token endpoint's GCRA machinery
//! ([`crate::oauth::limits`]): in Redis when `redis.url` is set — every replica spends from
//! the same budget — and in process otherwise. With Redis configured and unreachable the call
//! answers 503 `unavailable` (fail closed, as the token endpoint does).
//!
//! Budgets: defaults in `[rate_limits]`, overrides per institution id in
//! `[rate_limits.institutions.<id>]`. A configuration table rather than a directory column:
//! the token endpoint's per-institution limits are configured the same way
//! (`auth.institution_limits`), a budget is an operating decision (capacity planning) rather than
//! part of an institution's registration, and it needs no migration on both backends nor a
//! change to the directory's write path. The price: a new budget takes effect when the
//! replicas restart with the new configuration.
//!
//! The admin credential acting on behalf of an institution (`X-On-Behalf-Of`) is not limited:
//! it is the operators' credential (bulk loads, the demo), not the institution's traffic.

use std::collections::BTreeMap;

use actix_web::http::header::HeaderName;
use actix_web::{HttpMessage, HttpRequest, web};
use serde::{Deserialize, Serialize};

use crate::config::RateLimit;
use crate::error::{ApiError, ErrorCode};
use crate::oauth::limits::{Budget, Verdict};
use crate::state::AppState;

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

/// `[rate_limits]`: budgets of API calls and public directory reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Check the budgets below. `false` only to measure what the check costs, or behind a
    /// front end that limits every caller itself.
    pub enabled: bool,
    /// API calls per minute of one institution (all its access tokens), and the burst above
    /// that rate, unless overridden in `institutions`.
    pub institution_per_minute: u32,
    pub institution_burst: u32,
    /// API calls per minute with one access token, and burst, unless overridden.
    pub token_per_minute: u32,
    pub token_burst: u32,
    /// Public directory reads (`/fhir/Organization`, `/fhir/Endpoint`) per minute from one
    /// client address, and burst.
    pub directory_per_minute: u32,
    pub directory_burst: u32,
    /// Per-institution overrides, keyed by institution id.
    pub institutions: BTreeMap<String, InstitutionRateLimits>,
}

/// `[rate_limits.institutions.<id>]`: the institution's own budget, and optionally its tokens'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstitutionRateLimits {
    pub per_minute: u32,
    pub burst: u32,
    /// Per access token of this institution; absent: `rate_limits.token_per_minute`/`_burst`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_per_minute: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_burst: Option<u32>,
}

impl Default for RateLimitSettings {
    fn default() -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            institution_per_minute: 3000,
            institution_burst: 300,
            token_per_minute: 1200,
            token_burst: 120,
            directory_per_minute: 300,
            directory_burst: 30,
            institutions: BTreeMap::new(),
        }
    }
}

impl RateLimitSettings {
    /// Range checks: (the key, why) of the first bad value.
    pub fn check(&self) -> Result<(), (String, &'static str)> {
        const POSITIVE: &str = "rate and burst must be positive";
        for (key, rate, burst) in [
            (
                "institution_per_minute",
                self.institution_per_minute,
                self.institution_burst,
            ),
            ("token_per_minute", self.token_per_minute, self.token_burst),
            (
                "directory_per_minute",
                self.directory_per_minute,
                self.directory_burst,
            ),
        ] {
            if rate == 0 || burst == 0 {
                return Err((format!("rate_limits.{key}"), POSITIVE));
            }
        }
        for (id, o) in &self.institutions {
            if o.per_minute == 0
                || o.burst == 0
                || o.token_per_minute == Some(0)
                || o.token_burst == Some(0)
            {
                return Err((format!("rate_limits.institutions.{id}"), POSITIVE));
            }
        }
        Ok(())
    }

    /// The budgets of `institution` and of each of its tokens.
    pub fn for_institution(&self, institution: &str) -> (RateLimit, RateLimit) {
        let o = self.institutions.get(institution);
        let own = RateLimit {
            per_minute: o.map_or(self.institution_per_minute, |o| o.per_minute),
            burst: o.map_or(self.institution_burst, |o| o.burst),
        };
        let token = RateLimit {
            per_minute: o
                .and_then(|o| o.token_per_minute)
                .unwrap_or(self.token_per_minute),
            burst: o.and_then(|o| o.token_burst).unwrap_or(self.token_burst),
        };
        (own, token)
    }
}

/// Marks a request whose budgets were already spent (a handler may extract its caller twice).
#[derive(Clone, Copy)]
struct Admitted;

/// The application state, when this request has yet to spend from its budgets (limits on, and
/// not spent already).
fn pending(req: &HttpRequest) -> Result<Option<web::Data<AppState>>, ApiError> {
    if req.extensions().get::<Admitted>().is_some() {
        return Ok(None);
    }
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("application state missing"))?;
    Ok(state.settings.rate_limits.enabled.then_some(state))
}

/// Take one cell from each of `budgets` for this request (see `SharedLimits::check_all`).
async fn spend(
    req: &HttpRequest,
    state: &AppState,
    budgets: &[Budget<'_>],
) -> Result<(usize, Verdict), ApiError> {
    let decided = state
        .auth
        .limits
        .check_all(budgets)
        .await
        .map_err(unavailable)?;
    req.extensions_mut().insert(Admitted);
    Ok(decided)
}

/// Spend one call from the budgets of `token_id` (the access token's `jti`) and of
/// `institution`; 429 when either is exhausted. Once per request.
pub async fn admit_token(
    req: &HttpRequest,
    institution: &str,
    token_id: &str,
) -> Result<(), ApiError> {
    let Some(state) = pending(req)? else {
        return Ok(());
    };
    let (own, token) = state.settings.rate_limits.for_institution(institution);
    let budgets = [
        Budget {
            scope: "api-token",
            key: token_id,
            limit: token,
        },
        Budget {
            scope: "api-institution",
            key: institution,
            limit: own,
        },
    ];
    let (which, verdict) = spend(req, &state, &budgets).await?;
    let what = if which == 0 {
        format!(
            "with this access token (at most {} per minute)",
            token.per_minute
        )
    } else {
        format!(
            "from institution {institution} (at most {} per minute)",
            own.per_minute
        )
    };
    refused(verdict, &what)
}

/// Spend one public directory read from the budget of the client's address; 429 when it is
/// exhausted.
pub async fn admit_public(req: &HttpRequest) -> Result<(), ApiError> {
    let Some(state) = pending(req)? else {
        return Ok(());
    };
    let settings = &state.settings.rate_limits;
    let address = client_address(req);
    let budget = Budget {
        scope: "directory",
        key: address.as_deref().unwrap_or("unknown"),
        limit: RateLimit {
            per_minute: settings.directory_per_minute,
            burst: settings.directory_burst,
        },
    };
    let (_, verdict) = spend(req, &state, &[budget]).await?;
    refused(
        verdict,
        &format!(
            "to the public directory from this address (at most {} per minute)",
            budget.limit.per_minute
        ),
    )
}

/// The peer's IP address (the connection's; a reverse proxy in front makes it the proxy's).
pub fn client_address(req: &HttpRequest) -> Option<String> {
    req.peer_addr().map(|a| a.ip().to_string())
}

fn refused(verdict: Verdict, what: &str) -> Result<(), ApiError> {
    match verdict {
        Verdict::Allowed { .. } => Ok(()),
        Verdict::Limited {
            limit,
            retry_after_secs,
        } => Err(ApiError::new(
            ErrorCode::RateLimited,
            format!("too many requests {what}; retry after {retry_after_secs} s"),
        )
        .retry_after(retry_after_secs)
        .header(RATELIMIT_LIMIT, limit.to_string())
        .header(RATELIMIT_REMAINING, "0")),
    }
}

fn unavailable(e: crate::oauth::limits::Unavailable) -> ApiError {
    let mut err = ApiError::new(
        ErrorCode::Unavailable,
        "the rate-limit store is unavailable; retry later",
    )
    .retry_after(5);
    err.internal = Some(e.to_string());
    err
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn overrides_parse_from_toml_and_unknown_keys_are_refused() {
        let s: RateLimitSettings = toml::from_str(
            r#"
            enabled = true
            institution_per_minute = 3000
            institution_burst = 300
            token_per_minute = 1200
            token_burst = 120
            directory_per_minute = 300
            directory_burst = 30
            [institutions.hosp-001]
            per_minute = 12000
            burst = 1000
            token_burst = 500
            "#,
        )
        .unwrap();
        let (own, token) = s.for_institution("hosp-001");
        assert_eq!((own.per_minute, own.burst), (12000, 1000));
        assert_eq!((token.per_minute, token.burst), (1200, 500));
        let typo = toml::from_str::<RateLimitSettings>(
            "enabled = true\n[institutions.hosp-001]\nper_minute = 1\nburst = 1\ntoken_brust = 1\n",
        );
        assert!(typo.unwrap_err().to_string().contains("token_brust"));
    }

    #[test]
    fn an_override_replaces_the_institution_budget_and_optionally_the_tokens() {
        let mut s = RateLimitSettings::default();
        s.institutions.insert(
            "hosp-001".into(),
            InstitutionRateLimits {
                per_minute: 10,
                burst: 2,
                token_per_minute: None,
                token_burst: Some(1),
            },
        );
        let (own, token) = s.for_institution("hosp-001");
        assert_eq!((own.per_minute, own.burst), (10, 2));
        assert_eq!((token.per_minute, token.burst), (s.token_per_minute, 1));
        let (own, token) = s.for_institution("hosp-002");
        assert_eq!(own.per_minute, s.institution_per_minute);
        assert_eq!(token.burst, s.token_burst);
        assert!(s.check().is_ok());
        if let Some(o) = s.institutions.get_mut("hosp-001") {
            o.burst = 0;
        }
        assert_eq!(
            s.check().map_err(|(k, _)| k),
            Err("rate_limits.institutions.hosp-001".to_string())
        );
    }
}
