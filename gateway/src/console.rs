//! The auditors' web console (`/console`, docs/audit.md "The web console"): one page, its
//! script and its style sheet, compiled into the binary from `gateway/assets/console/` (nothing
//! fetched from elsewhere, so it works air-gapped). The page calls the auditors' JSON and FHIR
//! APIs with the browser's staff session (the `yiqiao_session` cookie from `/login`), so every
//! read it makes is audited like any other auditor read.
//!
//! - `GET /console`: the page for a person holding the auditor role; without a session the
//!   browser is sent to `/login?return_to=/console`; a person without the role gets a 403 page
//!   that says so (and the refusal is recorded).
//! - `GET /console/session`: who is logged in and the CSRF token for changes.
//! - Content Security Policy without `'unsafe-inline'`: scripts and styles only from the gateway.
//! - CSRF: changes made with the session cookie (alert acknowledgements, flags) must carry
//!   `X-CSRF-Token`, a value derived from the session token that only a page of this origin can
//!   read (`/console/session`); the cookie is also `SameSite=Lax` and cross-site `Origin`s are
//!   refused (crate::staff).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorCode};
use crate::service::authz::{AuditReportRead, Permit};
use crate::staff::{Role, Staff};

const PAGE: &str = include_str!("../assets/console/index.html");
const SCRIPT: &str = include_str!("../assets/console/console.js");
const STYLE: &str = include_str!("../assets/console/console.css");

/// The console's Content Security Policy: nothing inline, nothing from another origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Header carrying the CSRF token on changes made with the session cookie.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The CSRF token of a browser session: SHA-256 over a domain prefix and the session token.
/// The session token is secret (an HttpOnly cookie), so the value can only be learnt from
/// `/console/session`, which another origin's page cannot read.
pub fn csrf_token(session_token: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"yiqiao-csrf-v1\n");
    h.update(session_token.as_bytes());
    format!("{:x}", h.finalize())
}

/// A change authenticated by the session cookie must carry the session's CSRF token
/// (`X-CSRF-Token`). Bearer and operator credentials are not sent by browsers on their own and
/// need none.
pub fn require_csrf(req: &HttpRequest, staff: &Staff) -> Result<(), ApiError> {
    if staff.session_kind != Some("cookie") {
        return Ok(());
    }
    let expected = crate::oidc::request_cookie(req, crate::oidc::SESSION_COOKIE)
        .map(|token| csrf_token(&token))
        .unwrap_or_default();
    let presented = req
        .headers()
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if expected.is_empty()
        || presented.is_empty()
        || !bool::from(presented.as_bytes().ct_eq(expected.as_bytes()))
    {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a change made with the session cookie needs the X-CSRF-Token header (from GET /console/session)",
        ));
    }
    Ok(())
}

fn html(status: actix_web::http::StatusCode, body: String) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}

fn to_login() -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/login?return_to=/console"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The page a logged-in person without the auditor role sees.
fn refusal(staff: &Staff) -> HttpResponse {
    let roles = staff
        .roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let who = staff.name.as_deref().unwrap_or(&staff.subject);
    let body = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Yiqiao audit console: access refused</title>
<link rel="stylesheet" href="/console/console.css"></head>
<body><main class="refused">
<h1 id="refused">Access refused</h1>
<p>The audit console is for the <b>auditor</b> role. You are logged in as
<b id="refused-who">{who}</b> ({subject}) with the role(s): <b id="refused-roles">{roles}</b>.</p>
<p>Ask your administrator for the auditor role, or log in as another person.
This refusal has been recorded in the audit trail.</p>
</main></body></html>
"#,
        who = crate::report::esc(who),
        subject = crate::report::esc(&staff.subject),
        roles = crate::report::esc(if roles.is_empty() { "none" } else { &roles }),
    );
    let mut resp = html(actix_web::http::StatusCode::FORBIDDEN, body);
    // Named for the refusal record (crate::audit::record_refusals).
    resp.extensions_mut().insert(crate::audit::RefusalInfo {
        code: ErrorCode::Forbidden.code(),
        message: format!(
            "the audit console needs the auditor role; {} holds {}",
            staff.subject,
            if roles.is_empty() { "none" } else { &roles }
        ),
    });
    resp
}

/// The console page (auditor role). No session: redirect to the login.
pub async fn page(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    match Staff::authenticate(&req).await {
        Ok(Some(staff)) if staff.has(Role::Auditor) => {
            Ok(html(actix_web::http::StatusCode::OK, PAGE.to_string()))
        }
        Ok(Some(staff)) => Ok(refusal(&staff)),
        Ok(None) => Ok(to_login()),
        Err(e) if matches!(e.code, ErrorCode::Unauthenticated) => Ok(to_login()),
        Err(e) => Err(e),
    }
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

/// The console's script (no secrets: it learns everything from the APIs).
pub async fn script() -> HttpResponse {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The console's style sheet.
pub async fn style() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE)
}

/// The console's session: who is logged in, and the CSRF token for changes.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsoleSession {
    pub subject: String,
    pub name: Option<String>,
    pub roles: Vec<String>,
    /// Send as `X-CSRF-Token` with changes made through the session cookie; absent for bearer
    /// and operator credentials, which need none.
    pub csrf_token: Option<String>,
}

/// Who is using the console (auditor role) and the CSRF token of the browser session.
#[utoipa::path(get, path = "/console/session", tag = "audit",
    responses((status = 200, body = ConsoleSession),
              (status = 401, description = "Not logged in"),
              (status = 403, description = "Not the auditor role")),
    security(("auditor_token" = [])))]
pub async fn session(
    permit: Permit<AuditReportRead>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let auditor = permit.staff()?;
    let csrf = match auditor.session_kind {
        Some("cookie") => {
            crate::oidc::request_cookie(&req, crate::oidc::SESSION_COOKIE).map(|t| csrf_token(&t))
        }
        _ => None,
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(ConsoleSession {
            subject: auditor.subject.clone(),
            name: auditor.name.clone(),
            roles: auditor
                .roles
                .iter()
                .map(|r| r.as_str().to_string())
                .collect(),
            csrf_token: csrf,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_differ_per_session_and_are_not_the_session() {
        let (a, b) = ("yqs_a", "yqs_b");
        assert_eq!(csrf_token(a), csrf_token(a));
        assert_ne!(csrf_token(a), csrf_token(b));
        assert_eq!(csrf_token(a).len(), 64);
        assert!(!csrf_token(a).contains(a));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        assert!(!PAGE.contains("http") && !STYLE.contains("http"));
        // The script names the SVG namespace, and no other absolute URL.
        assert_eq!(
            SCRIPT.matches("http").count(),
            SCRIPT.matches("http://www.w3.org/2000/svg").count()
        );
        // Nothing inline that the Content Security Policy would have to allow.
        assert!(!PAGE.contains("<script>") && !PAGE.contains("style="));
        for handler in ["onclick=", "onsubmit=", "onload=", "onchange=", "oninput="] {
            assert!(!PAGE.contains(handler), "{handler}");
        }
    }
}
