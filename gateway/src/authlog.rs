//! Writing authentication failures to `auth_events` without letting a flood fill the disk.
//!
//! Token-endpoint requests are already bounded by the per-address rate limit, but API calls
//! with a bad, expired or forged access token and failed staff logins are not: anyone can send
//! them as fast as the network allows. Each replica therefore writes at most
//! `auth.failure_log_per_minute` such rows per minute (a `governor` limiter with that rate and
//! burst); the failures it does not write are counted, and the next row written says how many
//! were left out (`… (+N similar failures not written)`). The log line (`tracing`) is emitted
//! for every failure at debug level only. With N replicas the bound is N × the setting.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::clock::DefaultClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use yiqiao_registry::auth::{self as store, NewAuthEvent};

use crate::state::AppState;

pub struct FailureLog {
    limiter: RateLimiter<NotKeyed, InMemoryState, DefaultClock>,
    suppressed: AtomicU64,
}

impl std::fmt::Debug for FailureLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailureLog")
            .field("suppressed", &self.suppressed.load(Ordering::Relaxed))
            .finish()
    }
}

impl FailureLog {
    pub fn new(per_minute: u32) -> FailureLog {
        let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        FailureLog {
            limiter: RateLimiter::direct(Quota::per_minute(rate).allow_burst(rate)),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Failures not written since the last row (for tests and metrics).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Write `event` (a failure) unless this replica's budget is spent. Never fails the
    /// request: the caller is refused either way.
    pub async fn record(&self, state: &AppState, mut event: NewAuthEvent) {
        tracing::debug!(reason = %event.reason, "authentication failure");
        if self.limiter.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let left_out = self.suppressed.swap(0, Ordering::Relaxed);
        if left_out > 0 {
            event.reason = format!(
                "{} (+{left_out} similar failures not written)",
                event.reason
            );
        }
        if let Err(e) = state.db(move |conn| store::record_event(conn, event)).await {
            tracing::error!(error = %e, "cannot record an authentication failure");
        }
    }
}
