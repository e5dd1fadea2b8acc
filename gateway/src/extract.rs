//! Extractors that check input before a handler sees it.
//!
//! - [`ValidJson<T>`]: content type, size limit, well-formed JSON, no control characters in
//!   its text (crate::sanitize) and shape, each with its own error code and the offending
//!   field's path.
//! - [`IfMatch`]: the version an `If-Match` precondition names (every versioned update).
//! - [`admin_credential`]: is the admin credential presented (for the `Caller` extractor's
//!   on-behalf path; handlers state their access with `crate::service::authz::Permit`).

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};
use crate::state::AppState;

/// A JSON body deserialised into `T` (which should `deny_unknown_fields`), or why it was
/// refused. The refusal is deferred to [`ValidJson::checked`]: actix polls a handler's
/// extractors together, so a bad body could otherwise answer 400 before the handler's
/// `Permit` had refused the caller (401/403, with its audit record). Handlers call `checked()`
/// first, after the permit.
#[derive(Debug)]
pub struct ValidJson<T>(Result<T, ApiError>);

impl<T> ValidJson<T> {
    /// The body, or the 400/413/415 naming what is wrong with it.
    pub fn checked(self) -> Result<T, ApiError> {
        self.0
    }
}

const JSON_TYPES: [&str; 2] = ["application/json", "application/fhir+json"];

impl<T: DeserializeOwned + 'static> FromRequest for ValidJson<T> {
    type Error = ApiError;
    // Never fails: see the type's documentation.
    type Future = Pin<Box<dyn Future<Output = Result<ValidJson<T>, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req
            .app_data::<web::Data<AppState>>()
            .map(|s| s.settings.http.max_body_bytes)
            .unwrap_or(1024 * 1024);
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            Ok(ValidJson(
                read(limit, content_type, declared_len, &mut payload).await,
            ))
        })
    }
}

/// Read and check a JSON body (content type, size, control characters, shape).
async fn read<T: DeserializeOwned>(
    limit: usize,
    content_type: Option<String>,
    declared_len: Option<usize>,
    payload: &mut Payload,
) -> Result<T, ApiError> {
    match content_type.as_deref() {
        Some(ct) if JSON_TYPES.contains(&ct) => {}
        Some(ct) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!(
                    "Content-Type {ct} is not accepted; send application/json or application/fhir+json"
                ),
            ));
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "Content-Type is missing; send application/json or application/fhir+json",
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body exceeds the limit of {limit} bytes"),
        )
    };
    if declared_len.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                ErrorCode::MalformedJson,
                format!("cannot read the body: {e}"),
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    parse_json(&body)
}

/// Parse with the path of the first offending field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorCode::MalformedJson,
            "the body is empty; a JSON document is required",
        ));
    }
    crate::sanitize::check_json_bytes(body)?;
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                ErrorCode::MalformedJson,
                format!("the body is not valid JSON: {inner}"),
            )
        } else {
            let field = if path == "." {
                None
            } else {
                Some(path.clone())
            };
            let mut e = ApiError::new(
                ErrorCode::InvalidBody,
                match &field {
                    Some(f) => format!("{f}: {inner}"),
                    None => inner.to_string(),
                },
            );
            e.field = field;
            e
        }
    })
}

/// Did the request present the admin credential (`Authorization: Bearer <admin_token>`)? Used
/// by the `Caller` extractor for the admin credential acting on behalf of an institution, and
/// by the `Staff` extractor; handlers take a `Permit` instead.
pub fn admin_credential(req: &HttpRequest) -> Result<(), ApiError> {
    let challenge = |msg: &str| {
        ApiError::new(ErrorCode::Unauthenticated, msg)
            .header(header::WWW_AUTHENTICATE, "Bearer realm=\"yiqiao-admin\"")
    };
    let state = req
        .app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("application state missing"))?;
    let expected = state.settings.admin_token.expose();
    if expected.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "the admin API is disabled: set admin_token (YIQIAO_ADMIN_TOKEN) to enable it",
        ));
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| challenge("the admin API needs Authorization: Bearer <admin token>"))?;
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(challenge("the admin credential is not valid"))
    }
}

/// The version an update's `If-Match: W/"3"` (or `"3"`) precondition names, `None` without
/// the header; 400 naming `If-Match` when it is not such an ETag. In a handler's signature, so
/// that every versioned update reads it the same way; the 400 is deferred to
/// [`IfMatch::checked`] for the reason [`ValidJson`]'s is.
#[derive(Debug)]
pub struct IfMatch(Result<Option<i64>, ApiError>);

impl IfMatch {
    /// The version named, or the 400 naming `If-Match`.
    pub fn checked(self) -> Result<Option<i64>, ApiError> {
        self.0
    }
}

impl FromRequest for IfMatch {
    type Error = ApiError;
    type Future = std::future::Ready<Result<IfMatch, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(Ok(IfMatch(if_match(req))))
    }
}
/// `If-Match: W/"3"` or `"3"` → Some(3).
fn if_match(req: &HttpRequest) -> Result<Option<i64>, ApiError> {
    let Some(raw) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    raw.to_str()
        .ok()
        .map(|v| v.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|v| v.parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid_param("If-Match", "must be an ETag such as W/\"3\""))
}
