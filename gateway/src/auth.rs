//! Who is calling: the [`Caller`] extractor. A handler that takes a `Caller` requires an
//! authenticated member institution; [`Caller::require`] checks a SMART scope (the
//! authorization table, crate::service::authz, asks it).
//!
//! Credentials accepted today:
//! - the admin credential plus `X-On-Behalf-Of: <institution id>`: an operator acting for an
//!   institution (bulk loads, the demo). The institution must exist and be active (read from
//!   the same directory cache as for access tokens, at most `auth.directory_cache_ttl_ms`
//!   old); the caller gets the institution's allowed scopes.
//!
//! - a gateway access token (`Authorization: Bearer <JWT>` from `POST /oauth2/token`, signed
//!   by the gateway, docs/auth.md): the institution is read from the directory (cached at most
//!   `auth.directory_cache_ttl_ms`) and must still be active; the scopes are the token's,
//!   narrowed to what the directory still allows; the purpose of use comes from the token.
//!
//! The end user: a member's system may name the person acting with `X-Yiqiao-User: <staff
//! number>` (the identifier value in the institution's practitioner namespace, the same one its
//! FHIR `Practitioner` roster entries carry; docs/hospital-contract.md). The value is checked
//! (at most 128 characters, UTF-8, no control characters, no surrounding white space; else 400
//! `invalid-parameter` naming the header) and becomes [`Caller::user`]: every audit record made
//! through `Auditor::by_caller` carries it as `agent_user` (BALP `agent.altId`), so the anomaly
//! rules work per user. The gateway does not authenticate the person: the institution vouches
//! for it with its own credential. The admin credential acting on behalf of an institution is
//! recorded as `admin-token` and may not name a user (400).
//!
//! Rate limits: a call with an access token spends from its token's and its institution's
//! budgets once authenticated (429 beyond them; crate::ratelimit, docs/auth.md). The
//! admin-on-behalf path is not limited.
//!
//! Handlers do not take a `Caller` to decide access themselves: they take a
//! `crate::service::authz::Permit<N>`, which authenticates the caller through this extractor
//! and evaluates the resource × operation × role table (including the SMART scope; 403 with
//! `WWW-Authenticate: Bearer error="insufficient_scope"` when it is not granted).

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderName};
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use yiqiao_consent::Purpose;
use yiqiao_registry::auth::NewAuthEvent;
use yiqiao_registry::directory::Institution;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

pub const ON_BEHALF_OF: HeaderName = HeaderName::from_static("x-on-behalf-of");
/// The end user acting at a member institution (module docs).
pub const YIQIAO_USER: HeaderName = HeaderName::from_static("x-yiqiao-user");
/// How error messages name [`YIQIAO_USER`].
pub const YIQIAO_USER_NAME: &str = "X-Yiqiao-User";

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerVia {
    /// Admin credential acting on behalf of an institution.
    AdminOnBehalf,
    /// A gateway-issued access token.
    AccessToken,
    /// An institution's feed or bulk load over an authenticated channel (the HL7 v2 listener,
    /// an operator's `yiqiao mpi import`), with the institution's directory scopes.
    Feed,
}

/// An authenticated member institution and what it may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub institution: Institution,
    /// Granted SMART scopes (e.g. `system/Patient.rs`).
    pub scopes: Vec<String>,
    pub via: CallerVia,
    /// Purpose of use bound to the access token (`None` for the admin-on-behalf path).
    pub purpose: Option<Purpose>,
    /// The end user the institution named with `X-Yiqiao-User` (its staff number), if any.
    pub user: Option<String>,
    /// The access token's `jti` (`None` for the admin-on-behalf path): the key of its
    /// rate-limit budget (crate::ratelimit).
    pub token_id: Option<String>,
}

/// The `X-Yiqiao-User` value of a request: `Ok(None)` when absent, 400 naming the header when
/// repeated or malformed.
pub fn stated_user(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let mut values = req.headers().get_all(YIQIAO_USER);
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_param(
            YIQIAO_USER_NAME,
            "must be sent at most once",
        ));
    }
    let value = std::str::from_utf8(first.as_bytes())
        .map_err(|_| ApiError::invalid_param(YIQIAO_USER_NAME, "must be UTF-8 text"))?;
    if let Some(problem) = yiqiao_registry::practitioners::identifier_problem(value) {
        return Err(ApiError::invalid_param(
            YIQIAO_USER_NAME,
            format!("the user's staff identifier {problem}"),
        ));
    }
    Ok(Some(value.to_string()))
}

impl Caller {
    /// An institution acting through a feed (see [`CallerVia::Feed`]).
    pub fn feed(institution: Institution) -> Caller {
        Caller {
            scopes: institution.allowed_scopes.clone(),
            institution,
            via: CallerVia::Feed,
            purpose: None,
            user: None,
            token_id: None,
        }
    }

    /// Does a granted scope allow `permission` (one of c r u d s) on `resource`?
    pub fn allows(&self, resource: &str, permission: char) -> bool {
        self.scopes
            .iter()
            .any(|scope| scope_allows(scope, resource, permission))
    }

    /// 403 OperationOutcome naming the scope that is missing.
    pub fn require(&self, resource: &str, permission: char) -> Result<(), ApiError> {
        if self.allows(resource, permission) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "scope system/{resource}.{permission} is required and not granted to {}",
                    self.institution.id
                ),
            ))
        }
    }
}

/// SMART v1 (`read`/`write`/`*`) and v2 (`cruds`) permission check.
pub fn scope_allows(scope: &str, resource: &str, permission: char) -> bool {
    let Some((_, rest)) = scope.split_once('/') else {
        return false;
    };
    let Some((res, perms)) = rest.split_once('.') else {
        return false;
    };
    if res != "*" && res != resource {
        return false;
    }
    match perms {
        "*" => true,
        "read" => matches!(permission, 'r' | 's'),
        "write" => matches!(permission, 'c' | 'u' | 'd'),
        v2 => v2.contains(permission),
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Caller, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let admin = crate::extract::admin_credential(req);
        let on_behalf = req
            .headers()
            .get(ON_BEHALF_OF)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let has_auth = req.headers().contains_key(header::AUTHORIZATION);
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.trim().to_string());
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let client_ip = req.peer_addr().map(|a| a.ip().to_string());
        let client_cert = crate::mtls::presented(req);
        let user = stated_user(req);
        let request_id = req
            .extensions()
            .get::<crate::middleware::RequestId>()
            .map(|r| r.0.clone());
        let http = req.clone();
        let inner = async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            if !has_auth {
                return Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    "an Authorization: Bearer credential is required",
                )
                .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao\""));
            }
            if admin.is_err() && on_behalf.is_none() {
                let result = from_access_token(&state, bearer.as_deref(), client_cert).await;
                if let Err(refused) = &result
                    && matches!(refused.code, ErrorCode::Unauthenticated)
                {
                    let event = NewAuthEvent {
                        client_id: None,
                        success: false,
                        oauth_error: Some("invalid_token".into()),
                        reason: format!(
                            "API call refused: {}{}",
                            refused.message,
                            claimed_subject(bearer.as_deref())
                                .map(|s| format!(" (claimed sub {s:?})"))
                                .unwrap_or_default()
                        ),
                        client_ip,
                        jti: None,
                        kid: None,
                        alg: Some("bearer".into()),
                        request_id,
                    };
                    state.auth.failures.record(&state, event).await;
                }
                return result;
            }
            admin?;
            let id = on_behalf.ok_or_else(|| {
                ApiError::invalid_param(
                    "X-On-Behalf-Of",
                    "the admin credential needs X-On-Behalf-Of: <institution id>",
                )
            })?;
            // The same directory cache as access tokens (at most `directory_cache_ttl_ms`).
            let institution = crate::oauth::cached_institution(&state, &id)
                .await?
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::Forbidden,
                        format!("institution {id} is not registered"),
                    )
                })?;
            if !institution.is_active() {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!("institution {id} is suspended"),
                ));
            }
            Ok(Caller {
                scopes: institution.allowed_scopes.clone(),
                institution,
                via: CallerVia::AdminOnBehalf,
                purpose: None,
                user: None,
                token_id: None,
            })
        };
        Box::pin(async move {
            let mut caller = inner.await?;
            // Over its token's or institution's budget: 429 before anything else is done.
            if let Some(token) = caller.token_id.as_deref() {
                crate::ratelimit::admit_token(&http, caller.institution.id.as_str(), token).await?;
            }
            caller.user = user?;
            if caller.user.is_some() && caller.via == CallerVia::AdminOnBehalf {
                return Err(ApiError::invalid_param(
                    YIQIAO_USER_NAME,
                    "the admin credential acting on behalf of an institution is recorded as admin-token and cannot name a user; use the institution's access token",
                ));
            }
            // Attribution of a later refusal (e.g. a missing scope) in the audit trail.
            let admin = caller.via == CallerVia::AdminOnBehalf;
            http.extensions_mut().insert(crate::audit::AuditAgent {
                institution: Some(caller.institution.id.to_string()),
                user: if admin {
                    Some(yiqiao_registry::audit::ADMIN_ON_BEHALF_USER.to_string())
                } else {
                    caller.user.clone()
                },
                role: admin.then(|| "admin".to_string()),
                purpose: caller.purpose.map(|p| p.code().to_string()),
            });
            Ok(caller)
        })
    }
}

fn invalid_token(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Unauthenticated,
        format!("the access token is not valid: {why}"),
    )
    .header(
        header::WWW_AUTHENTICATE,
        format!("Bearer realm=\"yiqiao\", error=\"invalid_token\", error_description=\"{why}\""),
    )
}

/// The `sub` a presented JWT claims, unverified (for the failure record only).
fn claimed_subject(token: Option<&str>) -> Option<String> {
    use base64::Engine;
    let payload = token?.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value
        .get("sub")?
        .as_str()
        .map(|s| s.chars().take(128).collect())
}

/// A gateway access token → Caller. No database read while the directory cache is fresh.
async fn from_access_token(
    state: &AppState,
    bearer: Option<&str>,
    client_cert: Option<crate::mtls::ClientCert>,
) -> Result<Caller, ApiError> {
    let token = bearer.ok_or_else(|| invalid_token("expected Authorization: Bearer <token>"))?;
    let claims = state
        .auth
        .keys
        .verify(token, &state.base_url)
        .map_err(|why| invalid_token(&why))?;
    // A certificate-bound token (RFC 8705) is valid only with that certificate.
    if let Some(bound) = claims
        .cnf
        .as_ref()
        .and_then(|c| c.get("x5t#S256"))
        .and_then(|v| v.as_str())
        && client_cert.map(|c| c.x5t_s256()).as_deref() != Some(bound)
    {
        return Err(invalid_token(
            "the token is bound to a client certificate this connection did not present",
        ));
    }
    let institution = crate::oauth::cached_institution(state, &claims.sub)
        .await?
        .ok_or_else(|| invalid_token("the institution is no longer registered"))?;
    if !institution.is_active() {
        return Err(invalid_token("the institution is suspended"));
    }
    let requested: Vec<&str> = claims.scope.split_whitespace().collect();
    let scopes = crate::oauth::scopes::intersect(&requested, &institution.allowed_scopes);
    Ok(Caller {
        institution,
        scopes,
        via: CallerVia::AccessToken,
        purpose: Purpose::from_code(&claims.purpose_of_use),
        user: None,
        token_id: Some(claims.jti),
    })
}

#[cfg(test)]
mod tests {
    use super::scope_allows;

    #[test]
    fn smart_scope_permissions() {
        assert!(scope_allows("system/Patient.rs", "Patient", 'r'));
        assert!(scope_allows("system/Patient.rs", "Patient", 's'));
        assert!(!scope_allows("system/Patient.rs", "Patient", 'c'));
        assert!(!scope_allows("system/Patient.rs", "Observation", 'r'));
        assert!(scope_allows("system/*.read", "Observation", 's'));
        assert!(scope_allows("system/Patient.write", "Patient", 'u'));
        assert!(!scope_allows("system/Patient.write", "Patient", 'r'));
        assert!(scope_allows("system/Consent.cruds", "Consent", 'd'));
        assert!(!scope_allows("garbage", "Patient", 'r'));
    }
}
