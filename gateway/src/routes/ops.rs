//! Operational endpoints: liveness, readiness, metrics.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::error::ApiError;
use crate::service::authz::Public;
use crate::state::AppState;

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn healthz(_public: Public) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "alive" }))
}

/// Readiness: the database (and Redis, when configured) answer. 503 otherwise; recovers
/// without a restart when they return.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "Ready"), (status = 503, description = "A dependency is unreachable")))]
pub async fn readyz(_public: Public, state: web::Data<AppState>) -> HttpResponse {
    let store = state.store.clone();
    let timeout = Duration::from_millis(state.settings.database.acquire_timeout_ms.min(2000));
    let db = web::block(move || store.ping(timeout)).await;
    let db_status = match db {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            "unreachable".to_string()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            "unreachable".to_string()
        }
    };
    let redis_status = match state.redis_ping().await {
        None => "not configured".to_string(),
        Some(Ok(())) => "ok".to_string(),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "readiness: redis unreachable");
            "unreachable".to_string()
        }
    };
    let ready = db_status == "ok" && redis_status != "unreachable";
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": {
            "database": { "backend": state.store.backend().name(), "status": db_status },
            "redis": { "status": redis_status },
        },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "5"))
            .json(body)
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(
    _public: Public,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let text = state
        .metrics
        .render(state.store.pool_state())
        .map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text))
}
