//! Machine authentication: the SMART Backend Services token endpoint (`POST /oauth2/token`,
//! RFC 7523 client assertions), gateway access tokens, discovery (`/.well-known/...`) and the
//! institution's own authentication log. Specified in docs/auth.md.

pub mod assertion;
pub mod error;
pub mod keys;
pub mod limits;
pub mod scopes;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderName};
use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use yiqiao_consent::Purpose;
use yiqiao_registry::auth::{self as store, NewAuthEvent};
use yiqiao_registry::directory::{self, Institution};

use crate::auth::{Caller, CallerVia};
use crate::error::ApiError;
use crate::middleware::RequestId;
use crate::sanitize::{describe, escaped, first_refused};
use crate::service::authz::{AuthEventRead, Permit, Public};
use crate::state::AppState;

use self::error::{OAuthCode, OAuthError};
use self::keys::{AccessClaims, SigningKeys};
use self::limits::{SharedLimits, Verdict};

pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
pub const TOKEN_PATH: &str = "/oauth2/token";
/// The token-request parameter that carries the purpose of use (docs/auth.md).
pub const PURPOSE_PARAM: &str = "purpose_of_use";

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

/// Scopes the gateway knows how to serve (advertised in smart-configuration).
pub const SCOPES_SUPPORTED: [&str; 5] = [
    "system/Patient.rs",
    "system/DocumentReference.rs",
    "system/Observation.rs",
    "system/Consent.cruds",
    "system/AuditEvent.rs",
];

/// Authentication state of one replica: signing keys (from the database, identical on every
/// replica), the shared replay cache and rate limits, and a short-lived directory cache.
pub struct AuthRuntime {
    pub keys: SigningKeys,
    pub limits: SharedLimits,
    /// Rate-limited writer of authentication failures (crate::authlog).
    pub failures: crate::authlog::FailureLog,
    directory_cache: Mutex<HashMap<String, (Instant, Institution)>>,
}

impl AuthRuntime {
    pub fn new(
        keys: SigningKeys,
        limits: SharedLimits,
        failure_log_per_minute: u32,
    ) -> AuthRuntime {
        AuthRuntime {
            keys,
            limits,
            failures: crate::authlog::FailureLog::new(failure_log_per_minute),
            directory_cache: Mutex::new(HashMap::new()),
        }
    }
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// This replica's cached directory entry of `id`, if it is younger than
/// `directory_cache_ttl_ms` (never with a zero TTL).
fn cache_get(state: &AppState, id: &str) -> Option<Institution> {
    let ttl = Duration::from_millis(state.settings.auth.directory_cache_ttl_ms);
    if ttl.is_zero() {
        return None;
    }
    let cache = state.auth.directory_cache.lock().ok()?;
    let (at, inst) = cache.get(id)?;
    (at.elapsed() < ttl).then(|| inst.clone())
}

/// Cache directory entries just read (nothing with a zero TTL).
fn cache_put(state: &AppState, read: &[Institution]) {
    if state.settings.auth.directory_cache_ttl_ms == 0 {
        return;
    }
    if let Ok(mut cache) = state.auth.directory_cache.lock() {
        if cache.len() > 10_000 {
            cache.clear();
        }
        for inst in read {
            cache.insert(inst.id.as_str().to_string(), (Instant::now(), inst.clone()));
        }
    }
}

/// The directory entry for an access token's institution, at most `directory_cache_ttl_ms` old.
pub async fn cached_institution(
    state: &AppState,
    id: &str,
) -> Result<Option<Institution>, ApiError> {
    if let Some(inst) = cache_get(state, id) {
        return Ok(Some(inst));
    }
    let lookup = id.to_string();
    let found = state
        .db(move |conn| match directory::get(conn, &lookup) {
            Ok(inst) => Ok(Some(inst)),
            Err(directory::DirectoryError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
    cache_put(state, found.as_slice());
    Ok(found)
}

/// Directory entries of `ids`, in that order, each at most `directory_cache_ttl_ms` old: the
/// cached ones as they are, the others read in one query (and cached). `NotFound` when an id
/// has no entry.
pub async fn cached_institutions(
    state: &AppState,
    ids: Vec<String>,
) -> Result<Vec<Institution>, ApiError> {
    let (mut found, missing) = cached_part(state, &ids);
    if !missing.is_empty() {
        let read = state
            .db(move |conn| directory::get_many(conn, &missing))
            .await?;
        fill(state, &mut found, read);
    }
    Ok(found.into_iter().flatten().collect())
}

/// [`cached_institutions`] inside a blocking call that holds `conn` (no trip of its own).
pub fn cached_institutions_on(
    state: &AppState,
    conn: &mut yiqiao_registry::store::DbConn,
    ids: &[String],
) -> Result<Vec<Institution>, ApiError> {
    let (mut found, missing) = cached_part(state, ids);
    if !missing.is_empty() {
        fill(state, &mut found, directory::get_many(conn, &missing)?);
    }
    Ok(found.into_iter().flatten().collect())
}

/// The cached entries of `ids` (by position, `None` where not cached) and the ids to read.
fn cached_part(state: &AppState, ids: &[String]) -> (Vec<Option<Institution>>, Vec<String>) {
    let found: Vec<Option<Institution>> = ids.iter().map(|id| cache_get(state, id)).collect();
    let missing = ids
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(id, _)| id.clone())
        .collect();
    (found, missing)
}

/// Cache the entries read for the empty positions of `found` and put them there, in order.
fn fill(state: &AppState, found: &mut [Option<Institution>], read: Vec<Institution>) {
    cache_put(state, &read);
    let mut read = read.into_iter();
    for slot in found.iter_mut().filter(|f| f.is_none()) {
        *slot = read.next();
    }
}

/// Drop this replica's cached directory entry of `id` (after a change made through it, so the
/// change takes effect here at once; other replicas within `directory_cache_ttl_ms`).
pub fn forget_institution(state: &AppState, id: &str) {
    if let Ok(mut cache) = state.auth.directory_cache.lock() {
        cache.remove(id);
    }
}

/// Token response (RFC 6749 §5.1).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// Seconds until the token expires.
    pub expires_in: u64,
    /// Granted scopes (space-separated): the intersection of the request and the directory.
    pub scope: String,
    /// The purpose of use bound to the token.
    pub purpose_of_use: String,
}

/// Context of one token request, for the audit record.
#[derive(Default)]
struct Attempt {
    client_id: Option<String>,
    jti: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
}

/// SMART Backend Services token endpoint (client_credentials + private_key_jwt).
#[utoipa::path(
    post, path = "/oauth2/token", tag = "auth",
    request_body(content_type = "application/x-www-form-urlencoded",
        description = "grant_type=client_credentials, client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer, client_assertion=<JWT signed with RS256/RS384/ES256/ES384/SM2SM3>, scope=<SMART v2 system scopes>, optional purpose_of_use=<TREAT|ETREAT|HPAYMT|HOPERAT|PUBHLTH|HRESCH|PATRQT> (default: the institution's configured purpose)"),
    responses(
        (status = 200, description = "Access token", body = TokenResponse),
        (status = 400, description = "RFC 6749 error: invalid_request, invalid_grant, invalid_scope, unsupported_grant_type"),
        (status = 401, description = "RFC 6749 error invalid_client"),
        (status = 429, description = "Rate limited (Retry-After, RateLimit-Limit, RateLimit-Remaining)"),
        (status = 503, description = "Database or Redis unavailable"),
    )
)]
pub async fn token(
    _public: Public,
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> HttpResponse {
    let client_ip = req.peer_addr().map(|a| a.ip().to_string());
    let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let mut attempt = Attempt::default();
    let result = issue(&req, &state, &body, client_ip.as_deref(), &mut attempt).await;
    let (success, oauth_error, reason) = match &result {
        Ok((resp, _)) => (true, None, format!("issued scope {:?}", resp.scope)),
        Err(e) => (
            false,
            Some(e.code.as_str().to_string()),
            e.description.clone(),
        ),
    };
    let event = NewAuthEvent {
        client_id: attempt.client_id,
        success,
        oauth_error,
        reason,
        client_ip,
        jti: attempt.jti,
        kid: attempt.kid,
        alg: attempt.alg,
        request_id,
    };
    let recorded = state.db(move |conn| store::record_event(conn, event)).await;
    match (result, recorded) {
        (Ok((body, headers)), Ok(())) => {
            let mut resp = HttpResponse::Ok();
            resp.insert_header((header::CACHE_CONTROL, "no-store"));
            resp.insert_header((header::PRAGMA, "no-cache"));
            for (name, value) in headers {
                resp.insert_header((name, value));
            }
            resp.json(body)
        }
        // No token without its audit record.
        (Ok(_), Err(e)) => {
            tracing::error!(error = %e, "cannot record authentication event");
            actix_web::ResponseError::error_response(&OAuthError::new(
                OAuthCode::TemporarilyUnavailable,
                "the audit trail is unavailable; retry later",
            ))
        }
        (Err(err), recorded) => {
            if let Err(e) = recorded {
                tracing::error!(error = %e, "cannot record authentication failure");
            }
            actix_web::ResponseError::error_response(&err)
        }
    }
}

type Issued = (TokenResponse, Vec<(HeaderName, String)>);

/// The form of a token request: a form body, each parameter once, and no control character in
/// it or in the query string. (This endpoint is exempt from the control-character middleware so
/// that these refusals are OAuth errors with their auth_events row; crate::sanitize.)
fn token_form(req: &HttpRequest, body: &[u8]) -> Result<HashMap<String, String>, OAuthError> {
    if let Some(e) = crate::sanitize::query_problem(req.query_string()) {
        return Err(OAuthError::request(format!("query string: {}", e.message)));
    }
    let form_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !form_type.starts_with("application/x-www-form-urlencoded") {
        return Err(OAuthError::request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|_| OAuthError::request("the body is not a valid form"))?;
    let mut form: HashMap<String, String> = HashMap::new();
    for (name, value) in pairs {
        let bad = first_refused(&name, false).or_else(|| first_refused(&value, false));
        if let Some(c) = bad {
            return Err(OAuthError::request(format!(
                "parameter {} {}",
                escaped(&name),
                describe(c)
            )));
        }
        if form.insert(name.clone(), value).is_some() {
            return Err(OAuthError::request(format!("parameter {name} is repeated")));
        }
    }
    Ok(form)
}

/// The assertion's claims that are looked up or stored (directory, keys, replay cache,
/// auth_events) hold no control character.
fn plain_claims(parsed: &assertion::Parsed, client_id: &str) -> Result<(), OAuthError> {
    for (claim, value) in [
        ("iss", Some(client_id)),
        ("kid", parsed.kid.as_deref()),
        ("jti", parsed.jti()),
        ("alg", Some(parsed.alg.as_str())),
    ] {
        if let Some(c) = value.and_then(|v| first_refused(v, false)) {
            return Err(OAuthError::client(format!(
                "the assertion's {claim} {}",
                describe(c)
            )));
        }
    }
    Ok(())
}

fn limited(verdict: Verdict, what: &str) -> Result<Vec<(HeaderName, String)>, OAuthError> {
    match verdict {
        Verdict::Allowed { limit, remaining } => Ok(vec![
            (RATELIMIT_LIMIT, limit.to_string()),
            (RATELIMIT_REMAINING, remaining.to_string()),
        ]),
        Verdict::Limited {
            limit,
            retry_after_secs,
        } => Err(OAuthError::new(
            OAuthCode::RateLimited,
            format!("too many token requests {what}; retry after {retry_after_secs} s"),
        )
        .header(header::RETRY_AFTER, retry_after_secs.to_string())
        .header(RATELIMIT_LIMIT, limit.to_string())
        .header(RATELIMIT_REMAINING, "0")),
    }
}

fn unavailable(e: impl std::fmt::Display) -> OAuthError {
    tracing::error!(error = %e, "token endpoint dependency unavailable");
    OAuthError::new(
        OAuthCode::TemporarilyUnavailable,
        "a dependency is unavailable; retry later",
    )
    .header(header::RETRY_AFTER, "5")
}

/// A client bound to a certificate (RFC 8705) must present it on this connection: the
/// token's `cnf` claim, `None` for an unbound client.
async fn certificate_binding(
    req: &HttpRequest,
    state: &AppState,
    client_id: &str,
) -> Result<Option<Value>, OAuthError> {
    let lookup = client_id.to_string();
    let bound = state
        .db(move |conn| yiqiao_registry::mtls::bound_cert(conn, &lookup))
        .await
        .map_err(unavailable)?;
    Ok(match bound {
        None => None,
        Some(expected) => match crate::mtls::presented(req) {
            Some(cert) if cert.hex() == expected => Some(json!({ "x5t#S256": cert.x5t_s256() })),
            Some(_) => {
                return Err(OAuthError::client(format!(
                    "client {client_id} must present its registered client certificate; this one is not it"
                )));
            }
            None => {
                return Err(OAuthError::client(format!(
                    "client {client_id} requires mutual TLS: connect to the mTLS listener with its registered client certificate"
                )));
            }
        },
    })
}

/// `grant_type=client_credentials` with a JWT-bearer client assertion, else the OAuth error.
fn check_grant(grant_type: Option<&str>, assertion_type: Option<&str>) -> Result<(), OAuthError> {
    match grant_type {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                OAuthCode::UnsupportedGrantType,
                format!("grant_type {other} is not supported (client_credentials only)"),
            ));
        }
        None => return Err(OAuthError::request("grant_type is required")),
    }
    if assertion_type != Some(CLIENT_ASSERTION_TYPE) {
        return Err(OAuthError::request(format!(
            "client_assertion_type must be {CLIENT_ASSERTION_TYPE}"
        )));
    }
    Ok(())
}

async fn issue(
    req: &HttpRequest,
    state: &AppState,
    body: &[u8],
    client_ip: Option<&str>,
    attempt: &mut Attempt,
) -> Result<Issued, OAuthError> {
    let auth = &state.settings.auth;
    let ip_limit = crate::config::RateLimit {
        per_minute: auth.ip_per_minute,
        burst: auth.ip_burst,
    };
    let verdict = state
        .auth
        .limits
        .check("ip", client_ip.unwrap_or("unknown"), ip_limit)
        .await
        .map_err(unavailable)?;
    limited(verdict, "from this address")?;
    let form = token_form(req, body)?;
    let param = |name: &str| form.get(name).map(String::as_str).filter(|v| !v.is_empty());
    check_grant(param("grant_type"), param("client_assertion_type"))?;
    let raw = param("client_assertion")
        .ok_or_else(|| OAuthError::request("client_assertion is required"))?;
    let parsed = assertion::parse(raw)?;
    attempt.alg = Some(parsed.alg.clone());
    attempt.kid = parsed.kid.clone();
    attempt.jti = parsed.jti().map(String::from);
    let client_id = parsed
        .issuer()
        .filter(|i| !i.is_empty() && i.len() <= 128)
        .ok_or_else(|| OAuthError::client("the assertion has no iss (client id)"))?
        .to_string();
    attempt.client_id = Some(client_id.clone());
    plain_claims(&parsed, &client_id)?;
    if let Some(declared) = param("client_id")
        && declared != client_id
    {
        return Err(OAuthError::client(
            "client_id does not match the assertion's iss",
        ));
    }
    let scope = param("scope").ok_or_else(|| OAuthError::request("scope is required"))?;
    // Optional: a stock SMART Backend Services client sends only the standard parameters and
    // gets its institution's configured default purpose (below, once the client is known).
    let asked = param(PURPOSE_PARAM)
        .map(|purpose| {
            Purpose::from_code(purpose).ok_or_else(|| {
                OAuthError::request(format!(
                    "{PURPOSE_PARAM} {purpose:?} is not a known code (TREAT, ETREAT, HPAYMT, HOPERAT, PUBHLTH, HRESCH, PATRQT)"
                ))
            })
        })
        .transpose()?;

    let lookup = client_id.clone();
    let institution = state
        .db(move |conn| match directory::get(conn, &lookup) {
            Ok(inst) => Ok(Some(inst)),
            Err(directory::DirectoryError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        })
        .await
        .map_err(unavailable)?
        .ok_or_else(|| OAuthError::client(format!("client {client_id} is not registered")))?;
    if !institution.is_active() {
        return Err(OAuthError::client(format!(
            "client {client_id} is suspended"
        )));
    }
    assertion::verify_signature(&parsed, &institution)?;
    // The per-institution limit counts only requests signed by the institution's key: keyed by
    // a claimed `iss` before the signature check, anyone could spend another institution's
    // budget. Unsigned floods are bounded by the per-address limit above.
    let inst_limit =
        auth.institution_limits
            .get(&client_id)
            .copied()
            .unwrap_or(crate::config::RateLimit {
                per_minute: auth.institution_per_minute,
                burst: auth.institution_burst,
            });
    let verdict = state
        .auth
        .limits
        .check("client", &client_id, inst_limit)
        .await
        .map_err(unavailable)?;
    let headers = limited(verdict, "for this client")?;
    // Mutual TLS: a bound institution must present its certificate on this connection.
    let cnf = certificate_binding(req, state, &client_id).await?;

    let purpose = match asked {
        Some(p) => p,
        None => default_purpose(&state.settings.consent, &client_id),
    };
    let now = now_secs();
    let skew = i64::try_from(auth.clock_skew_secs).unwrap_or(60);
    let token_url = format!("{}{TOKEN_PATH}", state.base_url);
    let (jti, exp) = assertion::check_claims(&parsed, &client_id, &token_url, now, skew)?;
    let requested: Vec<&str> = scope.split_whitespace().collect();
    let granted = scopes::intersect(&requested, &institution.allowed_scopes);
    if granted.is_empty() {
        return Err(OAuthError::new(
            OAuthCode::InvalidScope,
            format!("none of the requested scopes is granted to {client_id}"),
        ));
    }
    let first = state
        .auth
        .limits
        .first_use(&client_id, &jti, now, exp - now + skew)
        .await
        .map_err(unavailable)?;
    if !first {
        return Err(OAuthError::grant(format!("jti {jti} has been used before")));
    }
    let ttl = auth.access_token_ttl_secs;
    let claims = AccessClaims {
        iss: state.base_url.to_string(),
        sub: client_id.clone(),
        aud: state.base_url.to_string(),
        client_id,
        exp: now + i64::try_from(ttl).unwrap_or(300),
        iat: now,
        jti: uuid::Uuid::new_v4().to_string(),
        scope: granted.join(" "),
        purpose_of_use: purpose.code().to_string(),
        cnf,
    };
    let token = state.auth.keys.sign(&claims).map_err(|e| {
        tracing::error!(error = %e, "cannot sign an access token");
        OAuthError::new(OAuthCode::ServerError, "cannot sign the access token")
    })?;
    Ok((
        TokenResponse {
            access_token: token,
            token_type: "bearer".into(),
            expires_in: ttl,
            scope: claims.scope,
            purpose_of_use: claims.purpose_of_use,
        },
        headers,
    ))
}

/// The gateway's public signing keys (verifies access tokens).
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "JWKS of the gateway's access-token keys")))]
pub async fn jwks(_public: Public, state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .json(state.auth.keys.jwks())
}

/// SMART App Launch discovery document for backend services.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "auth",
    responses((status = 200, description = "SMART configuration")))]
pub async fn smart_configuration(_public: Public, state: web::Data<AppState>) -> HttpResponse {
    let base = &state.base_url;
    let purposes: Vec<&str> = Purpose::ALL.iter().map(|p| p.code()).collect();
    HttpResponse::Ok().json(json!({
        "issuer": base.as_ref(),
        "token_endpoint": format!("{base}{TOKEN_PATH}"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": assertion::SUPPORTED_ALGS,
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric", "permission-v2"],
        "access_token_lifetime_seconds": state.settings.auth.access_token_ttl_secs,
        "purpose_of_use_parameter": PURPOSE_PARAM,
        "purpose_of_use_supported": purposes,
        "sm2_signer_id": yiqiao_sm::DEFAULT_SIGNER_ID,
    }))
}

/// One authentication event as shown to its institution.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthEventView {
    pub occurred_at: String,
    pub outcome: String,
    pub oauth_error: Option<String>,
    pub reason: String,
    pub client_ip: Option<String>,
    pub jti: Option<String>,
    pub request_id: Option<String>,
}

/// The calling institution's own token requests, newest first (last 100). Needs
/// `system/AuditEvent.rs`.
#[utoipa::path(get, path = "/oauth2/events", tag = "auth",
    security(("access_token" = [])),
    responses((status = 200, description = "Events", body = [AuthEventView]),
              (status = 401, description = "No valid access token"),
              (status = 403, description = "system/AuditEvent.rs not granted")))]
pub async fn own_events(
    permit: Permit<AuthEventRead>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let caller = permit.member()?;
    let id = caller.institution.id.to_string();
    let events = state
        .db(move |conn| store::list_events(conn, Some(&id), 100))
        .await?;
    permit
        .record(
            &state.auditor,
            state.auditor.search_event("/oauth2/events".into()),
            None,
        )
        .await?;
    let views: Vec<AuthEventView> = events
        .into_iter()
        .map(|e| AuthEventView {
            occurred_at: e.occurred_at.and_utc().to_rfc3339(),
            outcome: e.outcome,
            oauth_error: e.oauth_error,
            reason: e.reason,
            client_ip: e.client_ip,
            jti: e.jti,
            request_id: e.request_id,
        })
        .collect();
    Ok(HttpResponse::Ok().json(views))
}

/// Who the gateway thinks the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub institution: String,
    pub scopes: Vec<String>,
    pub purpose_of_use: Option<String>,
    /// `access_token` or `admin_on_behalf`.
    pub via: String,
}

/// The authenticated institution, its effective scopes and purpose of use (any valid token).
#[utoipa::path(get, path = "/oauth2/whoami", tag = "auth",
    security(("access_token" = [])),
    responses((status = 200, description = "The caller", body = WhoAmI),
              (status = 401, description = "No valid access token")))]
pub async fn whoami(caller: Caller) -> HttpResponse {
    HttpResponse::Ok().json(WhoAmI {
        institution: caller.institution.id.to_string(),
        scopes: caller.scopes,
        purpose_of_use: caller.purpose.map(|p| p.code().to_string()),
        via: match caller.via {
            CallerVia::AccessToken => "access_token",
            CallerVia::AdminOnBehalf => "admin_on_behalf",
            CallerVia::Feed => "feed",
        }
        .into(),
    })
}

/// The purpose bound to a token requested without `purpose_of_use`: the institution's
/// configured default, else the region's (`consent.default_purpose`; both checked at start).
fn default_purpose(consent: &crate::config::ConsentSettings, client_id: &str) -> Purpose {
    consent
        .institution_purposes
        .get(client_id)
        .and_then(|code| Purpose::from_code(code))
        .or_else(|| Purpose::from_code(&consent.default_purpose))
        .unwrap_or(Purpose::Treatment)
}
