//! The one API error type, rendered as a FHIR `OperationOutcome`.
//!
//! Conventions:
//! - Every error has a stable code from [`ErrorCode`] (the table below: code, HTTP status,
//!   FHIR issue type). Clients and docs key on the code, never on the message text.
//! - Bad input names the offending field in `issue.expression`.
//! - Internal causes are logged with the request id and never sent to the client; the client
//!   gets the request id to quote.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

/// System URI of Yiqiao's error codes in `OperationOutcome.issue.details.coding`.
pub const ERROR_CODE_SYSTEM: &str = "https://yiqiao.health/fhir/CodeSystem/error-code";

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal, $issue:literal, $doc:literal),)*) => {
        /// Stable error codes: (code, HTTP status, FHIR issue type, meaning).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant,)* }

        impl ErrorCode {
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];
            pub fn code(self) -> &'static str { match self { $(ErrorCode::$variant => $code,)* } }
            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::from_u16($status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),)* }
            }
            /// FHIR `IssueType` code.
            pub fn issue_type(self) -> &'static str { match self { $(ErrorCode::$variant => $issue,)* } }
            pub fn meaning(self) -> &'static str { match self { $(ErrorCode::$variant => $doc,)* } }
        }
    };
}

error_codes! {
    MalformedJson => ("malformed-json", 400, "structure", "The body is not well-formed JSON."),
    InvalidBody => ("invalid-body", 400, "invalid", "The body does not have the expected shape (unknown or missing field, wrong type)."),
    InvalidParameter => ("invalid-parameter", 400, "invalid", "A query parameter or path segment is invalid."),
    Unauthenticated => ("unauthenticated", 401, "login", "No valid credential was presented."),
    Forbidden => ("forbidden", 403, "forbidden", "The credential does not allow this operation."),
    NotFound => ("not-found", 404, "not-found", "No such resource."),
    UnknownRoute => ("unknown-route", 404, "not-supported", "No such endpoint."),
    MethodNotAllowed => ("method-not-allowed", 405, "not-supported", "The endpoint does not support this HTTP method."),
    ConsentDenied => ("consent-denied", 403, "suppressed", "The patient's consent or the access policy does not permit releasing this data to the caller for the stated purpose; the reason names the rule."),
    Conflict => ("conflict", 409, "duplicate", "The request conflicts with stored data (e.g. a unique value already registered)."),
    VersionConflict => ("version-conflict", 412, "conflict", "If-Match names a version that is not the current one."),
    PayloadTooLarge => ("payload-too-large", 413, "too-costly", "The body is larger than the configured limit."),
    UnsupportedMediaType => ("unsupported-media-type", 415, "structure", "The Content-Type is not accepted by this endpoint."),
    ValidationFailed => ("validation-failed", 422, "business-rule", "The body is well-formed but breaks a rule; the field is named."),
    OutboundRefused => ("outbound-refused", 422, "security", "The gateway does not call this URL: its scheme is not allowed, or its host is or resolves to a loopback, link-local (cloud metadata), private or other special-purpose address that is not allow-listed in [outbound]. The same answer at registration and when the URL would be called."),
    RateLimited => ("rate-limited", 429, "throttled", "Too many requests; retry after the given delay."),
    Internal => ("internal", 500, "exception", "An internal error; quote the request id to the operators."),
    Unavailable => ("unavailable", 503, "transient", "A dependency (database, Redis) is unavailable; retry later."),
    AuditUnavailable => ("audit-unavailable", 503, "transient", "The audit record of the request could not be made durable, so no data was released; retry later."),
    PoolExhausted => ("pool-exhausted", 503, "transient", "All database connections are busy; retry after the given delay."),
    UpstreamUnavailable => ("upstream-unavailable", 502, "transient", "The custodian institution holding the content did not answer or answered with an error."),
    UpstreamIntegrity => ("upstream-integrity", 502, "processing", "The content served by the custodian does not match the SM3 hash or size in the registry; it was not relayed."),
}

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The offending field as a path (e.g. `Organization.name`, `jwks.keys[0].kid`).
    pub field: Option<String>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
    /// Logged, never sent.
    pub internal: Option<String>,
    /// Extra headers (e.g. `Allow` on 405, `WWW-Authenticate` on 401).
    pub headers: Vec<(header::HeaderName, String)>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            internal: None,
            headers: Vec::new(),
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn header(mut self, name: header::HeaderName, value: impl Into<String>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    /// An internal failure: the cause is logged, the client sees a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        let mut err = ApiError::new(ErrorCode::Internal, "internal error");
        err.internal = Some(cause.to_string());
        err
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::NotFound, what)
    }

    pub fn invalid_param(name: &str, why: impl std::fmt::Display) -> ApiError {
        ApiError::new(ErrorCode::InvalidParameter, format!("{name}: {why}")).field(name)
    }

    /// The OperationOutcome body for this error.
    pub fn outcome(&self, request_id: Option<&str>) -> serde_json::Value {
        operation_outcome(self.code, &self.message, self.field.as_deref(), request_id)
    }
}

/// Build an OperationOutcome with one error issue.
pub fn operation_outcome(
    code: ErrorCode,
    message: &str,
    field: Option<&str>,
    request_id: Option<&str>,
) -> serde_json::Value {
    let mut issue = json!({
        "severity": "error",
        "code": code.issue_type(),
        "details": {
            "coding": [{ "system": ERROR_CODE_SYSTEM, "code": code.code() }],
            "text": message,
        },
    });
    if let Some(field) = field {
        issue["expression"] = json!([field]);
    }
    if let Some(id) = request_id {
        issue["diagnostics"] = json!(format!("request id {id}"));
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.code(), self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        resp.insert_header((
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::fhir::FHIR_JSON),
        ));
        if let Some(secs) = self.retry_after {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        for (name, value) in &self.headers {
            if let Ok(v) = HeaderValue::from_str(value) {
                resp.insert_header((name.clone(), v));
            }
        }
        let request_id = crate::middleware::current_request_id();
        if let Some(cause) = &self.internal {
            tracing::error!(code = self.code.code(), request_id = request_id.as_deref().unwrap_or("-"), cause = %cause, "request failed");
        }
        let mut resp = resp.json(self.outcome(request_id.as_deref()));
        resp.extensions_mut().insert(crate::audit::RefusalInfo {
            code: self.code.code(),
            message: self.message.clone(),
        });
        resp
    }
}

impl From<yiqiao_registry::StoreError> for ApiError {
    fn from(err: yiqiao_registry::StoreError) -> ApiError {
        use yiqiao_registry::StoreError as E;
        match err {
            E::PoolTimeout(_) => ApiError::new(
                ErrorCode::PoolExhausted,
                "all database connections are busy; retry shortly",
            )
            .retry_after(1),
            E::Unavailable(cause) => {
                let mut e = ApiError::new(ErrorCode::Unavailable, "the database is unavailable")
                    .retry_after(5);
                e.internal = Some(cause);
                e
            }
            E::NotFound => ApiError::not_found("not found"),
            E::Conflict(msg) => {
                let mut e = ApiError::new(ErrorCode::Conflict, "conflicts with stored data");
                e.internal = Some(msg);
                e
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<yiqiao_registry::directory::ValidationError> for ApiError {
    fn from(v: yiqiao_registry::directory::ValidationError) -> ApiError {
        ApiError::new(ErrorCode::ValidationFailed, v.to_string()).field(v.field)
    }
}

impl From<yiqiao_registry::directory::DirectoryError> for ApiError {
    fn from(err: yiqiao_registry::directory::DirectoryError) -> ApiError {
        use yiqiao_registry::directory::DirectoryError as E;
        match err {
            E::Invalid(v) => v.into(),
            E::NotFound(id) => ApiError::not_found(format!("institution {id} not found")),
            dup @ E::Duplicate { field, .. } => {
                ApiError::new(ErrorCode::Conflict, dup.to_string()).field(field)
            }
            v @ E::VersionMismatch { .. } => {
                ApiError::new(ErrorCode::VersionConflict, v.to_string())
            }
            E::Store(s) => s.into(),
        }
    }
}

impl From<yiqiao_registry::empi::store::EmpiError> for ApiError {
    fn from(err: yiqiao_registry::empi::store::EmpiError) -> ApiError {
        use yiqiao_registry::empi::store::EmpiError as E;
        match err {
            E::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            E::Invalid { field, message } => {
                ApiError::new(ErrorCode::ValidationFailed, message).field(field)
            }
            E::Conflict(message) => ApiError::new(ErrorCode::Conflict, message),
            E::Model(m) => ApiError::internal(m),
            E::Store(s) => s.into(),
        }
    }
}

impl From<yiqiao_registry::documents::DocumentError> for ApiError {
    fn from(err: yiqiao_registry::documents::DocumentError) -> ApiError {
        use yiqiao_registry::documents::DocumentError as E;
        match err {
            E::Invalid { field, message, .. } => {
                ApiError::new(ErrorCode::ValidationFailed, message).field(field)
            }
            E::Conflict { field, message, .. } => {
                ApiError::new(ErrorCode::Conflict, message).field(field)
            }
            E::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            E::Store(s) => s.into(),
        }
    }
}

impl From<yiqiao_registry::encounters::EncounterError> for ApiError {
    fn from(err: yiqiao_registry::encounters::EncounterError) -> ApiError {
        use yiqiao_registry::encounters::EncounterError as E;
        match err {
            E::Invalid { field, message } => {
                ApiError::new(ErrorCode::ValidationFailed, message).field(field)
            }
            E::Conflict { field, message } => {
                ApiError::new(ErrorCode::Conflict, message).field(field)
            }
            E::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            v @ E::VersionConflict { .. } => {
                ApiError::new(ErrorCode::VersionConflict, v.to_string())
            }
            c @ E::ChangeRefused { .. } => {
                ApiError::new(ErrorCode::Conflict, c.to_string()).field("Encounter.identifier")
            }
            E::Store(s) => s.into(),
        }
    }
}

impl From<yiqiao_registry::practitioners::PractitionerError> for ApiError {
    fn from(err: yiqiao_registry::practitioners::PractitionerError) -> ApiError {
        use yiqiao_registry::practitioners::PractitionerError;
        match err {
            PractitionerError::Invalid { field, message } => {
                ApiError::new(ErrorCode::ValidationFailed, message).field(field)
            }
            PractitionerError::NotFound(what) => ApiError::not_found(format!("{what} not found")),
            PractitionerError::CreateRefused { identifier } => ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "practitioner {identifier} is not registered; registering it needs scope system/Practitioner.c"
                ),
            ),
            PractitionerError::ChangeRefused { id, identifier } => ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "practitioner {identifier} is registered (Practitioner/{id}) with other content; changing it needs scope system/Practitioner.u"
                ),
            ),
            PractitionerError::Store(s) => s.into(),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(err: tokio::task::JoinError) -> ApiError {
        ApiError::internal(format!("blocking task failed: {err}"))
    }
}

impl From<actix_web::error::BlockingError> for ApiError {
    fn from(err: actix_web::error::BlockingError) -> ApiError {
        ApiError::internal(format!("blocking task failed: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_valid() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.code()), "duplicate code {}", code.code());
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }
}
