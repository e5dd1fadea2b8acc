//! Request middleware: request ids, the request span, metrics.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, web};
use tracing::Instrument;

use crate::state::AppState;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The id of the request being served, as accepted from `X-Request-Id` or generated.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

tokio::task_local! {
    /// The current request id, so error bodies built deep in a handler can quote it.
    pub static CURRENT_REQUEST_ID: String;
}

/// Accept a caller's request id if it is a short token of safe characters; else make one.
fn accept_or_generate(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// When the server began handling the request (for handlers' `Server-Timing`).
#[derive(Clone, Copy)]
pub struct RequestStarted(pub Instant);

/// Request id in and out, one span per request (no query string: it may carry patient data),
/// metrics by route pattern; a handler's `Server-Timing` gets `app` (the whole time inside).
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let request_id = accept_or_generate(&req);
    req.extensions_mut().insert(RequestId(request_id.clone()));
    req.extensions_mut().insert(RequestStarted(started));
    let route = req
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().to_string();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let span =
        tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);

    let result = CURRENT_REQUEST_ID
        .scope(request_id.clone(), next.call(req))
        .instrument(span.clone())
        .await;
    let mut res = result?;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, value);
    }
    let status = res.status().as_u16();
    let elapsed = started.elapsed();
    // A handler that reports its stages (`Server-Timing`) gets the whole time inside the
    // server beside them: routing, middleware and authentication are the difference.
    if let Some(timing) = res
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        && let Ok(value) = HeaderValue::from_str(&format!(
            "{timing}, app;dur={:.2};desc=\"inside the server\"",
            elapsed.as_secs_f64() * 1000.0
        ))
    {
        res.headers_mut()
            .insert(HeaderName::from_static("server-timing"), value);
    }
    if let Some(metrics) = metrics {
        metrics.observe(&route, &method, status, elapsed.as_secs_f64());
    }
    span.in_scope(|| {
        tracing::info!(
            status,
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "served"
        );
    });
    Ok(res)
}

/// The current request id, if called while serving a request.
pub fn current_request_id() -> Option<String> {
    CURRENT_REQUEST_ID.try_with(Clone::clone).ok()
}
