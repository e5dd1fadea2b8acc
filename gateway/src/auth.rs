//! Who is calling: the [`Caller`] extractor. A handler that takes a `Caller` requires an
//! authenticated member institution; `caller.require(...)` checks a SMART scope.
//!
//! Credentials accepted today:
//! - the admin credential plus `X-On-Behalf-Of: <institution id>`: an operator acting for an
//!   institution (bulk loads, the demo). The institution must exist and be active; the caller
//!   gets the institution's allowed scopes.
//!
//! Institution access tokens (SMART Backend Services) arrive with the authentication issue and
//! produce the same `Caller`.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderName};
use actix_web::{FromRequest, HttpRequest, web};
use yiqiao_registry::directory::{self, Institution};

use crate::error::{ApiError, ErrorCode};
use crate::extract::AdminAuth;
use crate::state::AppState;

pub const ON_BEHALF_OF: HeaderName = HeaderName::from_static("x-on-behalf-of");

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerVia {
    /// Admin credential acting on behalf of an institution.
    AdminOnBehalf,
    /// A gateway-issued access token.
    AccessToken,
}

/// An authenticated member institution and what it may do.
#[derive(Debug, Clone)]
pub struct Caller {
    pub institution: Institution,
    /// Granted SMART scopes (e.g. `system/Patient.rs`).
    pub scopes: Vec<String>,
    pub via: CallerVia,
}

impl Caller {
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

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let admin = AdminAuth::from_request(req, payload).into_inner();
        let on_behalf = req
            .headers()
            .get(ON_BEHALF_OF)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        let has_auth = req.headers().contains_key(header::AUTHORIZATION);
        let state = req.app_data::<web::Data<AppState>>().cloned();
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::internal("application state missing"))?;
            if !has_auth {
                return Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    "an Authorization: Bearer credential is required",
                )
                .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao\""));
            }
            admin?;
            let id = on_behalf.ok_or_else(|| {
                ApiError::invalid_param(
                    "X-On-Behalf-Of",
                    "the admin credential needs X-On-Behalf-Of: <institution id>",
                )
            })?;
            let lookup = id.clone();
            let institution = state
                .db(move |conn| match directory::get(conn, &lookup) {
                    Ok(inst) => Ok(Some(inst)),
                    Err(directory::DirectoryError::NotFound(_)) => Ok(None),
                    Err(e) => Err(e),
                })
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
            })
        })
    }
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
