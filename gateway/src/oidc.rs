//! People's login through OpenID Connect (authorization code flow with PKCE, `openidconnect`
//! crate). Specified in docs/auth.md ("People").
//!
//! - `GET /login[?return_to=/path]`: discovers the provider (cached five minutes), stores a
//!   login in progress (state → nonce, PKCE verifier; one use, ten minutes) in the database,
//!   sets the `yiqiao_login` cookie to the state and redirects to the provider.
//! - `GET /login/callback`: the state must equal the cookie's (the browser that started the
//!   login) and a stored, unused login; the code is exchanged with the PKCE verifier; the ID
//!   token's signature, issuer, audience, expiry and nonce are checked by `openidconnect`; the
//!   roles come from the configured claim through `oidc.role_map`. Success creates a
//!   server-side session (`staff_sessions`) behind the `yiqiao_session` cookie.
//! - `POST /login/token`: a staff bearer token (`yqs_…`) from a browser session, for API
//!   clients; `POST /logout` ends the session (and its bearer tokens) or one bearer token.
//! - `GET /login/whoami`: the staff member, roles and how they authenticated.
//!
//! Every login success is in `auth_events` and the audit trail (DICOM 110114/110122); every
//! failure in `auth_events` (rate-limited, crate::authlog).

use std::time::{Duration, Instant};

use actix_web::http::header;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, Scope, TokenResponse, reqwest,
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;
use yiqiao_registry::auth::NewAuthEvent;
use yiqiao_registry::staff as store;

use crate::error::{ApiError, ErrorCode};
use crate::middleware::RequestId;
use crate::staff::{Role, Staff, StaffVia};
use crate::state::AppState;

/// Cookie of a browser session (opaque random token; the database keeps its SHA-256).
pub const SESSION_COOKIE: &str = "yiqiao_session";
/// Cookie binding a login in progress to the browser that started it (the state).
pub const LOGIN_COOKIE: &str = "yiqiao_login";
/// Prefix of staff tokens (session cookies and bearer tokens).
pub const TOKEN_PREFIX: &str = "yqs_";
const LOGIN_TTL_SECS: i64 = 600;
const METADATA_TTL: Duration = Duration::from_secs(300);
const CALLBACK_PATH: &str = "/login/callback";

/// The discovered provider, shared by the workers of one replica.
#[derive(Default)]
pub struct OidcRuntime {
    provider: tokio::sync::Mutex<Option<(Instant, CoreProviderMetadata)>>,
}

/// A new random staff token (256 bits).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What the database stores instead of a token.
pub fn token_hash(token: &str) -> String {
    format!("{:x}", Sha256::digest(token.as_bytes()))
}

fn enabled(state: &AppState) -> Result<(), ApiError> {
    if state.settings.oidc.issuer_url.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            "login for people is not configured (oidc.issuer_url)",
        ));
    }
    Ok(())
}

fn provider_unavailable(why: impl std::fmt::Display) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::Unavailable,
        "the OpenID provider cannot be reached; retry later",
    )
    .retry_after(5);
    e.internal = Some(why.to_string());
    e
}

fn http_client(state: &AppState) -> Result<reqwest::Client, ApiError> {
    reqwest::Client::builder()
        // Following redirects would open the client to SSRF.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_millis(state.settings.oidc.http_timeout_ms))
        .build()
        .map_err(ApiError::internal)
}

/// The provider's metadata (and JWKS), discovered at most `METADATA_TTL` ago.
async fn metadata(
    state: &AppState,
    http: &reqwest::Client,
) -> Result<CoreProviderMetadata, ApiError> {
    let mut cached = state.oidc.provider.lock().await;
    if let Some((at, meta)) = cached.as_ref()
        && at.elapsed() < METADATA_TTL
    {
        return Ok(meta.clone());
    }
    let issuer = IssuerUrl::new(state.settings.oidc.issuer_url.clone())
        .map_err(|e| ApiError::internal(format!("oidc.issuer_url: {e}")))?;
    let meta = CoreProviderMetadata::discover_async(issuer, http)
        .await
        .map_err(|e| provider_unavailable(format!("discovery: {e}")))?;
    *cached = Some((Instant::now(), meta.clone()));
    Ok(meta)
}

fn redirect_url(state: &AppState) -> String {
    let configured = &state.settings.oidc.redirect_url;
    if configured.is_empty() {
        format!("{}{CALLBACK_PATH}", state.base_url)
    } else {
        configured.clone()
    }
}

fn client(
    state: &AppState,
    meta: CoreProviderMetadata,
) -> Result<
    CoreClient<
        openidconnect::EndpointSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointNotSet,
        openidconnect::EndpointMaybeSet,
        openidconnect::EndpointMaybeSet,
    >,
    ApiError,
> {
    let cfg = &state.settings.oidc;
    let secret = cfg
        .client_secret
        .is_set()
        .then(|| ClientSecret::new(cfg.client_secret.expose().to_string()));
    let redirect = RedirectUrl::new(redirect_url(state))
        .map_err(|e| ApiError::internal(format!("oidc.redirect_url: {e}")))?;
    Ok(
        CoreClient::from_provider_metadata(meta, ClientId::new(cfg.client_id.clone()), secret)
            .set_redirect_uri(redirect),
    )
}

/// A `Set-Cookie` value. `max_age` 0 deletes the cookie.
fn cookie(state: &AppState, name: &str, value: &str, path: &str, max_age: i64) -> String {
    let mut c = cookie::Cookie::build((name, value))
        .path(path)
        .http_only(true)
        .same_site(cookie::SameSite::Lax)
        .secure(state.settings.oidc.cookie_secure)
        .max_age(cookie::time::Duration::seconds(max_age));
    if max_age == 0 {
        c = c.expires(cookie::time::OffsetDateTime::UNIX_EPOCH);
    }
    c.build().to_string()
}

/// The value of cookie `name` in the request, if present.
pub fn request_cookie(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| cookie::Cookie::split_parse(v.to_string()))
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

/// Only paths on this gateway (no scheme, no host, no `//`): an open redirect is refused.
fn safe_return_to(raw: Option<&str>) -> Result<String, ApiError> {
    match raw {
        None | Some("") => Ok("/login/whoami".into()),
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.contains('\\')
                && p.len() <= 512
                && p.chars().all(|c| !c.is_control()) =>
        {
            Ok(p.to_string())
        }
        Some(_) => Err(ApiError::invalid_param(
            "return_to",
            "must be a path on this gateway starting with a single /",
        )),
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// Start a login: redirect to the OpenID provider (authorization code flow with PKCE).
#[utoipa::path(get, path = "/login", tag = "staff",
    params(("return_to" = Option<String>, Query, description = "Path to go to after login (default /login/whoami)")),
    responses((status = 303, description = "Redirect to the OpenID provider"),
              (status = 404, description = "Login for people is not configured"),
              (status = 429, description = "Too many logins from this address"),
              (status = 503, description = "The provider cannot be reached")))]
pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<LoginQuery>,
) -> Result<HttpResponse, ApiError> {
    enabled(&state)?;
    let return_to = safe_return_to(query.return_to.as_deref())?;
    // Each login writes a row: bound what one address can write.
    let ip = req.peer_addr().map(|a| a.ip().to_string());
    let limit = crate::config::RateLimit {
        per_minute: state.settings.auth.ip_per_minute,
        burst: state.settings.auth.ip_burst,
    };
    let verdict = state
        .auth
        .limits
        .check("login", ip.as_deref().unwrap_or("unknown"), limit)
        .await
        .map_err(provider_unavailable)?;
    if let crate::oauth::limits::Verdict::Limited {
        retry_after_secs, ..
    } = verdict
    {
        return Err(ApiError::new(
            ErrorCode::RateLimited,
            format!("too many logins from this address; retry after {retry_after_secs} s"),
        )
        .retry_after(retry_after_secs));
    }
    let http = http_client(&state)?;
    let meta = metadata(&state, &http).await?;
    let client = client(&state, meta)?;
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client.authorize_url(
        CoreAuthenticationFlow::AuthorizationCode,
        CsrfToken::new_random,
        Nonce::new_random,
    );
    for scope in &state.settings.oidc.scopes {
        request = request.add_scope(Scope::new(scope.clone()));
    }
    let (url, csrf, nonce) = request.set_pkce_challenge(challenge).url();
    let state_hash = token_hash(csrf.secret());
    let nonce = nonce.secret().clone();
    let verifier = verifier.secret().clone();
    state
        .db(move |conn| {
            store::insert_login(
                conn,
                &state_hash,
                &nonce,
                &verifier,
                &return_to,
                LOGIN_TTL_SECS,
            )
        })
        .await?;
    Ok(HttpResponse::SeeOther()
        .insert_header((header::LOCATION, url.to_string()))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::SET_COOKIE,
            cookie(
                &state,
                LOGIN_COOKIE,
                csrf.secret(),
                CALLBACK_PATH,
                LOGIN_TTL_SECS,
            ),
        ))
        .finish())
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    /// RFC 9207: the provider that sent the browser back (checked when present).
    iss: Option<String>,
}

/// Where a login failed, for the record and the answer.
struct LoginFailure {
    status: ErrorCode,
    reason: String,
    subject: Option<String>,
}

fn failure(status: ErrorCode, reason: impl Into<String>) -> LoginFailure {
    LoginFailure {
        status,
        reason: reason.into(),
        subject: None,
    }
}

/// The provider sends the browser back here with `code` and `state`.
#[utoipa::path(get, path = "/login/callback", tag = "staff",
    params(("code" = Option<String>, Query, description = "Authorization code"),
           ("state" = Option<String>, Query, description = "State from /login")),
    responses((status = 303, description = "Logged in: session cookie set, redirect to return_to"),
              (status = 401, description = "Login refused (state, code, ID token or nonce invalid)"),
              (status = 403, description = "Authenticated, but no gateway role")))]
pub async fn callback(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<CallbackQuery>,
) -> Result<HttpResponse, ApiError> {
    enabled(&state)?;
    let client_ip = req.peer_addr().map(|a| a.ip().to_string());
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let clear_login = cookie(&state, LOGIN_COOKIE, "", CALLBACK_PATH, 0);
    match complete_login(&req, &state, &query).await {
        Ok((staff, session_token, return_to)) => {
            let event = NewAuthEvent {
                client_id: Some(staff.subject.clone()),
                success: true,
                oauth_error: None,
                reason: format!("staff login, roles {}", roles_text(&staff.roles)),
                client_ip,
                jti: None,
                kid: None,
                alg: Some("oidc".into()),
                request_id,
            };
            state
                .db(move |conn| yiqiao_registry::auth::record_event(conn, event))
                .await?;
            let mut audit = state.auditor.rest_event("login", "E");
            audit.type_code = "110114".into();
            audit.subtype_code = "110122".into();
            audit.agent_user = Some(staff.subject.clone());
            audit.agent_role = Some(roles_text(&staff.roles));
            state.auditor.record(audit).await?;
            Ok(HttpResponse::SeeOther()
                .insert_header((header::LOCATION, return_to))
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .append_header((
                    header::SET_COOKIE,
                    cookie(
                        &state,
                        SESSION_COOKIE,
                        &session_token,
                        "/",
                        i64::try_from(state.settings.oidc.session_ttl_secs).unwrap_or(28_800),
                    ),
                ))
                .append_header((header::SET_COOKIE, clear_login))
                .finish())
        }
        Err(fail) => {
            let event = NewAuthEvent {
                client_id: fail.subject.clone(),
                success: false,
                oauth_error: Some("login_failed".into()),
                reason: format!("staff login refused: {}", fail.reason),
                client_ip,
                jti: None,
                kid: None,
                alg: Some("oidc".into()),
                request_id,
            };
            state.auth.failures.record(&state, event).await;
            let mut err = ApiError::new(fail.status, format!("login refused: {}", fail.reason))
                .header(header::SET_COOKIE, clear_login);
            if matches!(fail.status, ErrorCode::Unauthenticated) {
                err = err.header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao-staff\"");
            }
            Err(err)
        }
    }
}

async fn complete_login(
    req: &HttpRequest,
    state: &AppState,
    query: &CallbackQuery,
) -> Result<(Staff, String, String), LoginFailure> {
    let unauth = |why: String| failure(ErrorCode::Unauthenticated, why);
    // Exempt from the control-character middleware, so that this refusal is a login failure
    // with its auth_events row (crate::sanitize).
    if let Some(e) = crate::sanitize::query_problem(req.query_string()) {
        return Err(failure(ErrorCode::InvalidParameter, e.message));
    }
    if let Some(error) = &query.error {
        return Err(unauth(format!(
            "the provider answered {error}: {}",
            query
                .error_description
                .as_deref()
                .unwrap_or("no description")
        )));
    }
    if let Some(iss) = &query.iss
        && iss.trim_end_matches('/') != state.settings.oidc.issuer_url.trim_end_matches('/')
    {
        return Err(unauth(format!(
            "the response comes from issuer {iss}, not the configured one"
        )));
    }
    let (Some(code), Some(returned_state)) = (query.code.as_deref(), query.state.as_deref()) else {
        return Err(failure(
            ErrorCode::InvalidParameter,
            "code and state are required",
        ));
    };
    let expected = request_cookie(req, LOGIN_COOKIE).ok_or_else(|| {
        unauth("no login in progress in this browser (login cookie missing)".into())
    })?;
    if !bool::from(expected.as_bytes().ct_eq(returned_state.as_bytes())) {
        return Err(unauth(
            "state does not match the login started in this browser".into(),
        ));
    }
    let state_hash = token_hash(returned_state);
    let pending = state
        .db(move |conn| store::take_login(conn, &state_hash))
        .await
        .map_err(|e| failure(e.code, e.message))?
        .ok_or_else(|| unauth("state is unknown, already used or expired".into()))?;

    let http = http_client(state).map_err(|e| failure(e.code, e.message))?;
    let meta = metadata(state, &http)
        .await
        .map_err(|e| failure(e.code, e.message))?;
    let client = client(state, meta).map_err(|e| failure(e.code, e.message))?;
    let exchange = client
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .map_err(|e| unauth(format!("the provider has no token endpoint: {e}")))?
        .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()));
    let tokens = exchange.request_async(&http).await.map_err(|e| {
        unauth(format!(
            "the provider refused the code: {}",
            describe_token_error(&e)
        ))
    })?;
    let id_token = tokens
        .id_token()
        .ok_or_else(|| unauth("the provider sent no ID token".into()))?;
    let verifier = client.id_token_verifier();
    let claims = id_token
        .claims(&verifier, &Nonce::new(pending.nonce.clone()))
        .map_err(|e| unauth(format!("the ID token is not valid: {e}")))?;
    let subject = format!("{}#{}", claims.issuer().as_str(), claims.subject().as_str());
    let name = claims
        .name()
        .and_then(|n| n.get(None))
        .map(|n| n.as_str().to_string())
        .or_else(|| claims.preferred_username().map(|u| u.as_str().to_string()));
    // The token's signature and claims are verified above; read the role claim from it.
    let raw = id_token.to_string();
    let payload = raw
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
        .ok_or_else(|| unauth("the ID token payload cannot be read".into()))?;
    let cfg = &state.settings.oidc;
    let values = claim_values(&payload, &cfg.role_claim);
    let roles = map_roles(&values, &cfg.role_map);
    if roles.is_empty() {
        return Err(LoginFailure {
            status: ErrorCode::Forbidden,
            reason: format!(
                "{subject} has no gateway role (claim {:?} = {values:?})",
                cfg.role_claim
            ),
            subject: Some(subject),
        });
    }
    let token = new_token();
    let id_hash = token_hash(&token);
    let roles_str = roles_text(&roles);
    let ttl = i64::try_from(cfg.session_ttl_secs).unwrap_or(28_800);
    let expires_at = yiqiao_registry::store::now_utc() + chrono::Duration::seconds(ttl);
    let (subj, nm) = (subject.clone(), name.clone());
    state
        .db(move |conn| {
            store::insert_session(
                conn,
                store::NewSession {
                    id_hash: &id_hash,
                    kind: "cookie",
                    parent_hash: None,
                    subject: &subj,
                    name: nm.as_deref(),
                    roles: &roles_str,
                    expires_at,
                },
            )
        })
        .await
        .map_err(|e| failure(e.code, e.message))?;
    Ok((
        Staff {
            subject,
            name,
            roles,
            via: StaffVia::OpenIdConnect,
            session_hash: None,
            session_kind: None,
        },
        token,
        pending.return_to,
    ))
}

fn describe_token_error<RE: std::error::Error + 'static>(
    e: &openidconnect::RequestTokenError<
        RE,
        openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    >,
) -> String {
    match e {
        openidconnect::RequestTokenError::ServerResponse(r) => {
            format!(
                "{}{}",
                r.error(),
                r.error_description()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
        }
        other => {
            // The whole chain: "Request failed" alone says nothing.
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// The strings at `path` (dotted) in the claims: one string or an array of strings.
pub fn claim_values(claims: &Value, path: &str) -> Vec<String> {
    let mut node = claims;
    for part in path.split('.') {
        match node.get(part) {
            Some(next) => node = next,
            None => return Vec::new(),
        }
    }
    match node {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// Gateway roles for claim values through `oidc.role_map` (sorted, without duplicates).
pub fn map_roles(
    values: &[String],
    map: &std::collections::BTreeMap<String, Vec<String>>,
) -> Vec<Role> {
    let mut roles: Vec<Role> = values
        .iter()
        .filter_map(|v| map.get(v))
        .flatten()
        .filter_map(|r| Role::parse(r))
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

pub fn roles_text(roles: &[Role]) -> String {
    roles
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A staff bearer token for API clients.
#[derive(Debug, Serialize, ToSchema)]
pub struct StaffToken {
    /// `yqs_…`; send as `Authorization: Bearer <token>`.
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    pub expires_in: i64,
    /// Gateway roles, space-separated (those of the session).
    pub roles: String,
}

/// Exchange a browser session (cookie) for a staff bearer token for API clients. The token
/// carries the session's roles, ends with it (logout) and lives at most `oidc.bearer_ttl_secs`.
#[utoipa::path(post, path = "/login/token", tag = "staff",
    responses((status = 200, description = "Bearer token", body = StaffToken),
              (status = 401, description = "No browser session")))]
pub async fn bearer_token(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let staff = Staff::authenticate(&req).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "log in at /login first (session cookie)",
        )
    })?;
    let (Some("cookie"), Some(parent)) = (staff.session_kind, staff.session_hash.clone()) else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "only a browser session (cookie) can be exchanged for a staff bearer token",
        ));
    };
    let token = new_token();
    let id_hash = token_hash(&token);
    let roles = roles_text(&staff.roles);
    let bearer_ttl = i64::try_from(state.settings.oidc.bearer_ttl_secs).unwrap_or(3600);
    let (subject, name, roles_c) = (staff.subject.clone(), staff.name.clone(), roles.clone());
    let expires_in = state
        .db(move |conn| {
            let session = store::find_session(conn, &parent, "cookie")?
                .ok_or(yiqiao_registry::StoreError::NotFound)?;
            let now = yiqiao_registry::store::now_utc();
            let expires_at = session
                .expires_at
                .min(now + chrono::Duration::seconds(bearer_ttl));
            store::insert_session(
                conn,
                store::NewSession {
                    id_hash: &id_hash,
                    kind: "bearer",
                    parent_hash: Some(&parent),
                    subject: &subject,
                    name: name.as_deref(),
                    roles: &roles_c,
                    expires_at,
                },
            )?;
            Ok::<_, yiqiao_registry::StoreError>((expires_at - now).num_seconds())
        })
        .await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(StaffToken {
            access_token: token,
            token_type: "bearer".into(),
            expires_in,
            roles,
        }))
}

/// End the session: a cookie session with all bearer tokens issued from it, or one staff
/// bearer token. The cookie is cleared.
#[utoipa::path(post, path = "/logout", tag = "staff",
    responses((status = 200, description = "Logged out"),
              (status = 401, description = "No session")))]
pub async fn logout(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let staff = Staff::authenticate(&req)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthenticated, "there is no session to end"))?;
    let Some(hash) = staff.session_hash.clone() else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "operator credentials are configured, not logged in; there is nothing to end",
        ));
    };
    let ended = state
        .db(move |conn| store::delete_session(conn, &hash))
        .await?;
    let mut audit = state.auditor.rest_event("logout", "E");
    audit.type_code = "110114".into();
    audit.subtype_code = "110123".into();
    audit.agent_user = Some(staff.subject.clone());
    audit.agent_role = Some(roles_text(&staff.roles));
    state.auditor.record(audit).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((
            header::SET_COOKIE,
            cookie(&state, SESSION_COOKIE, "", "/", 0),
        ))
        .json(serde_json::json!({ "logged_out": staff.subject, "sessions_ended": ended })))
}

/// Who is logged in.
#[derive(Debug, Serialize, ToSchema)]
pub struct StaffView {
    pub subject: String,
    pub name: Option<String>,
    pub roles: Vec<String>,
    /// `open-id-connect` or `operator-token`.
    pub via: String,
}

/// The authenticated staff member (session cookie, staff bearer token or operator token).
#[utoipa::path(get, path = "/login/whoami", tag = "staff",
    responses((status = 200, description = "The staff member", body = StaffView),
              (status = 401, description = "Not logged in")))]
pub async fn whoami(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let staff = Staff::authenticate(&req).await?.ok_or_else(|| {
        ApiError::new(ErrorCode::Unauthenticated, "not logged in: start at /login")
            .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao-staff\"")
    })?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(StaffView {
            subject: staff.subject,
            name: staff.name,
            roles: staff.roles.iter().map(|r| r.as_str().to_string()).collect(),
            via: match staff.via {
                StaffVia::OpenIdConnect => "open-id-connect",
                StaffVia::OperatorToken => "operator-token",
            }
            .into(),
        }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn role_claims_map_to_gateway_roles() {
        let claims = serde_json::json!({
            "roles": ["yiqiao-admins", "other"],
            "realm_access": {"roles": ["sec"]},
            "group": "yiqiao-auditors"
        });
        let map = [
            ("yiqiao-admins".to_string(), vec!["admin".to_string()]),
            ("yiqiao-auditors".to_string(), vec!["auditor".to_string()]),
            (
                "sec".to_string(),
                vec!["security-officer".to_string(), "auditor".to_string()],
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            map_roles(&claim_values(&claims, "roles"), &map),
            vec![Role::Admin]
        );
        assert_eq!(
            map_roles(&claim_values(&claims, "realm_access.roles"), &map),
            vec![Role::Auditor, Role::SecurityOfficer]
        );
        assert_eq!(
            map_roles(&claim_values(&claims, "group"), &map),
            vec![Role::Auditor]
        );
        assert!(map_roles(&claim_values(&claims, "missing"), &map).is_empty());
    }

    #[test]
    fn return_to_stays_on_the_gateway() {
        assert_eq!(safe_return_to(None).unwrap(), "/login/whoami");
        assert_eq!(
            safe_return_to(Some("/admin/institutions")).unwrap(),
            "/admin/institutions"
        );
        for bad in [
            "//evil.example/x",
            "https://evil.example/",
            "/\\evil",
            "evil",
        ] {
            assert!(safe_return_to(Some(bad)).is_err(), "{bad}");
        }
    }
}
