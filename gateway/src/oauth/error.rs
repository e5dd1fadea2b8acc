//! OAuth 2.0 error responses of the token endpoint (RFC 6749 §5.2): JSON
//! `{"error","error_description"}`, `Cache-Control: no-store`.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// RFC 6749 / RFC 7523 error codes used by the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthCode {
    /// Missing or repeated parameter, malformed (oversized, non-base64, non-JSON) assertion,
    /// unknown purpose of use.
    InvalidRequest,
    /// The assertion does not authenticate the client: unknown or suspended client, unknown
    /// key id, key of another institution, unsupported or mismatched `alg`, bad signature.
    InvalidClient,
    /// An authentic assertion that is not acceptable: expired, not yet valid, wrong audience,
    /// lifetime too long, missing or replayed `jti`, `iss` ≠ `sub`.
    InvalidGrant,
    /// Nothing of the requested scope is granted to the institution, or a malformed scope.
    InvalidScope,
    UnsupportedGrantType,
    /// Rate limit (429, with Retry-After).
    RateLimited,
    /// A dependency (database, Redis) is unavailable (503).
    TemporarilyUnavailable,
    ServerError,
}

impl OAuthCode {
    pub fn as_str(self) -> &'static str {
        match self {
            OAuthCode::InvalidRequest => "invalid_request",
            OAuthCode::InvalidClient => "invalid_client",
            OAuthCode::InvalidGrant => "invalid_grant",
            OAuthCode::InvalidScope => "invalid_scope",
            OAuthCode::UnsupportedGrantType => "unsupported_grant_type",
            OAuthCode::RateLimited => "rate_limited",
            OAuthCode::TemporarilyUnavailable => "temporarily_unavailable",
            OAuthCode::ServerError => "server_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            OAuthCode::InvalidClient => StatusCode::UNAUTHORIZED,
            OAuthCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            OAuthCode::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            OAuthCode::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// A token-endpoint failure: what the client is told, plus headers (rate limits).
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub code: OAuthCode,
    pub description: String,
    pub headers: Vec<(header::HeaderName, String)>,
}

impl OAuthError {
    pub fn new(code: OAuthCode, description: impl Into<String>) -> OAuthError {
        OAuthError {
            code,
            description: description.into(),
            headers: Vec::new(),
        }
    }
    pub fn request(d: impl Into<String>) -> OAuthError {
        Self::new(OAuthCode::InvalidRequest, d)
    }
    pub fn client(d: impl Into<String>) -> OAuthError {
        Self::new(OAuthCode::InvalidClient, d)
    }
    pub fn grant(d: impl Into<String>) -> OAuthError {
        Self::new(OAuthCode::InvalidGrant, d)
    }
    pub fn header(mut self, name: header::HeaderName, value: impl Into<String>) -> OAuthError {
        self.headers.push((name, value.into()));
        self
    }
}

impl std::fmt::Display for OAuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.description)
    }
}

impl ResponseError for OAuthError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((header::CACHE_CONTROL, "no-store"));
        resp.insert_header((header::PRAGMA, "no-cache"));
        if self.code == OAuthCode::InvalidClient {
            resp.insert_header((
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"yiqiao\", error=\"invalid_client\"",
            ));
        }
        for (name, value) in &self.headers {
            resp.insert_header((name.clone(), value.clone()));
        }
        resp.json(json!({ "error": self.code.as_str(), "error_description": self.description }))
    }
}
