//! Shared state handed to every handler. Nothing here is state that two replicas could
//! disagree on: the database and Redis hold all of that.

use std::sync::Arc;
use std::time::Duration;

use tracing::Span;
use yiqiao_registry::Store;
use yiqiao_registry::store::DbConn;

use crate::config::Settings;
use crate::error::ApiError;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub redis: Option<redis::Client>,
    pub metrics: Metrics,
    /// Externally visible base URL, without trailing slash.
    pub base_url: Arc<str>,
    /// Signing keys, replay cache, rate limits (crate::oauth).
    pub auth: Arc<crate::oauth::AuthRuntime>,
    /// The audit recorder (fail closed; see crate::audit).
    pub auditor: crate::audit::Auditor,
    /// People's login: the discovered OpenID provider (crate::oidc).
    pub oidc: Arc<crate::oidc::OidcRuntime>,
    /// The consent enforcement point (crate::policy).
    pub policy: Arc<crate::policy::Policy>,
    /// Federated queries: upstream client, gateway SM2 key, breakers, release policy.
    pub federation: crate::federation::Federation,
    /// Document registry: code table, HTTP client, delivery worker wake-up (crate::documents).
    pub documents: Arc<crate::documents::DocumentRuntime>,
    /// The policy every URL the gateway calls passes (crate::outbound).
    pub outbound: crate::outbound::OutboundPolicy,
}

impl AppState {
    /// Run database work on the blocking pool (never on an actix worker thread), keeping the
    /// tracing span. Waiting for a connection is bounded by `database.acquire_timeout_ms`;
    /// an exhausted pool becomes 503 with Retry-After.
    pub async fn db<T, E, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: Into<ApiError> + Send + 'static,
    {
        let store = self.store.clone();
        let span = Span::current();
        actix_web::web::block(move || {
            let _entered = span.enter();
            let mut conn = store.conn().map_err(ApiError::from)?;
            work(&mut conn).map_err(Into::into)
        })
        .await?
    }

    /// After an EMPI merge or unmerge of `persons` committed: their applicable consents changed
    /// (announced to the other replicas' consent caches) and merge events wait in the outbox
    /// (wake this replica's delivery worker).
    pub async fn persons_merged(&self, persons: &[&str]) {
        for p in persons {
            self.policy.changed(Some(p)).await;
        }
        self.documents.wake.notify_one();
    }

    /// Is Redis reachable within its timeout? `None` when Redis is not configured.
    pub async fn redis_ping(&self) -> Option<Result<(), String>> {
        let client = self.redis.as_ref()?;
        let timeout = Duration::from_millis(self.settings.redis.timeout_ms);
        let attempt = async {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(format!("unexpected reply {pong}"))
            }
        };
        Some(match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        })
    }
}
