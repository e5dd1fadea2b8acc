//! People and operators: the [`Staff`] extractor and role guards.
//!
//! MLPS level 3 wants administration, audit and security duties separated, so a credential
//! carries roles. A handler states what it needs in its signature with
//! `crate::service::authz::Permit<N>`, which authenticates through [`Staff::authenticate`] and
//! looks the roles up in the authorization table: 401 (no or unknown credential) or 403
//! (credential without a role the table names) as an OperationOutcome before the handler runs.
//!
//! Credentials accepted:
//! - the admin credential (`admin_token`): role admin only;
//! - the auditor credential (`auditor_token`): role auditor only (operators' jobs, e.g. a SIEM
//!   export);
//! - the steward credential (`steward_token`): role steward only (data stewardship jobs).
//!
//! - a person logged in through OpenID Connect (crate::oidc): the `yiqiao_session` cookie of a
//!   browser session, or `Authorization: Bearer yqs_…` (a staff bearer token from
//!   `POST /login/token`); roles from the configured ID-token claim, stored with the session.
//!
//! A request authenticated by the session cookie with an unsafe method (POST, PUT, DELETE…)
//! must not carry an `Origin` other than the gateway's own (cross-site request forgery; the
//! cookie is also `SameSite=Lax`). The auditors' changes also check a CSRF token
//! (crate::console::require_csrf).

use actix_web::http::header;
use actix_web::{HttpMessage, HttpRequest, web};
use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// Gateway roles for people and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages institutions, configuration and the EMPI review queue.
    Admin,
    /// Reads the audit trail, alerts and reports; changes nothing but alert acknowledgements.
    Auditor,
    /// Manages security policy (consent rules, keys); reviews break-the-glass.
    SecurityOfficer,
    /// Data steward: records and revokes consents on patients' behalf, keeps data-sharing
    /// agreements and resolves the EMPI review queue.
    Steward,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::SecurityOfficer => "security-officer",
            Role::Steward => "steward",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            "security-officer" => Some(Role::SecurityOfficer),
            "steward" => Some(Role::Steward),
            _ => None,
        }
    }
}

/// How a staff member proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StaffVia {
    /// A static operator credential from the configuration.
    OperatorToken,
    /// An OpenID Connect login (session cookie or bearer token).
    OpenIdConnect,
}

/// An authenticated person or operator and their roles.
#[derive(Debug, Clone, Serialize)]
pub struct Staff {
    /// Stable subject: `operator:admin`, `operator:auditor`, or `<issuer>#<sub>` for people.
    pub subject: String,
    /// Display name when known.
    pub name: Option<String>,
    pub roles: Vec<Role>,
    pub via: StaffVia,
    /// SHA-256 of the session token when authenticated by a session (logout ends it).
    #[serde(skip)]
    pub session_hash: Option<String>,
    /// `cookie` (browser session) or `bearer` (staff bearer token) when from a session.
    #[serde(skip)]
    pub session_kind: Option<&'static str>,
}

impl Staff {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Authenticate the request's credential. `Ok(None)`: no credential was presented.
    /// Whoever was authenticated is named in the request's extensions, so that a refusal
    /// recorded later (crate::audit) says who was refused.
    pub async fn authenticate(req: &HttpRequest) -> Result<Option<Staff>, ApiError> {
        let staff = Staff::authenticate_credential(req).await?;
        if let Some(staff) = &staff {
            req.extensions_mut().insert(crate::audit::AuditAgent {
                institution: None,
                user: Some(staff.subject.clone()),
                role: Some(crate::oidc::roles_text(&staff.roles)),
                purpose: None,
            });
        }
        Ok(staff)
    }

    async fn authenticate_credential(req: &HttpRequest) -> Result<Option<Staff>, ApiError> {
        let state = req
            .app_data::<web::Data<AppState>>()
            .ok_or_else(|| ApiError::internal("application state missing"))?
            .clone();
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(presented) = presented {
            let operators = [
                (state.settings.admin_token.expose(), Role::Admin),
                (state.settings.auditor_token.expose(), Role::Auditor),
                (state.settings.steward_token.expose(), Role::Steward),
            ];
            for (expected, role) in operators {
                if !expected.is_empty()
                    && bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
                {
                    return Ok(Some(Staff {
                        subject: format!("operator:{}", role.as_str()),
                        name: None,
                        roles: vec![role],
                        via: StaffVia::OperatorToken,
                        session_hash: None,
                        session_kind: None,
                    }));
                }
            }
            if presented.starts_with(crate::oidc::TOKEN_PREFIX) {
                return match session(&state, presented, "bearer").await? {
                    Some(staff) => Ok(Some(staff)),
                    None => Err(unauthenticated(
                        "the staff bearer token is not valid (expired, ended by logout or unknown)",
                    )),
                };
            }
            return Err(unauthenticated("the credential is not valid"));
        }
        let Some(cookie) = crate::oidc::request_cookie(req, crate::oidc::SESSION_COOKIE) else {
            return Ok(None);
        };
        let staff = session(&state, &cookie, "cookie").await?.ok_or_else(|| {
            unauthenticated("the session has expired or was ended; log in again at /login")
        })?;
        if !req.method().is_safe() {
            let origin = req
                .headers()
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok());
            if let Some(origin) = origin
                && origin.trim_end_matches('/') != state.base_url.as_ref()
            {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!("a session request from origin {origin} is refused (cross-site)"),
                ));
            }
        }
        Ok(Some(staff))
    }
}

/// The unexpired session of `kind` for `token`.
async fn session(
    state: &AppState,
    token: &str,
    kind: &'static str,
) -> Result<Option<Staff>, ApiError> {
    if !token.starts_with(crate::oidc::TOKEN_PREFIX) || token.len() > 128 {
        return Ok(None);
    }
    let hash = crate::oidc::token_hash(token);
    let lookup = hash.clone();
    let found = state
        .db(move |conn| yiqiao_registry::staff::find_session(conn, &lookup, kind))
        .await?;
    Ok(found.map(|s| Staff {
        roles: s.roles.split_whitespace().filter_map(Role::parse).collect(),
        subject: s.subject,
        name: s.name,
        via: StaffVia::OpenIdConnect,
        session_hash: Some(hash),
        session_kind: Some(kind),
    }))
}

fn unauthenticated(msg: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, msg)
        .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao-staff\"")
}
