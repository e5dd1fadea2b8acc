//! The anomaly job: evaluates the rules of `registry::audit::alerts` over the trail and
//! delivers new alerts to the webhook.
//!
//! Why a periodic job and not evaluation as events are recorded: the writer's group commit
//! must stay fast (rules need window queries), and a scan that moves a database cursor in the
//! same transaction as the alerts it raises survives restarts and replicas — no alert lost
//! (an uncommitted scan is repeated), none duplicated (cursor lock + unique dedupe keys).
//! Alerts therefore appear up to `audit.alert_scan_interval_secs` after the access.

use std::time::Duration;

use chrono::Duration as ChronoDuration;
use yiqiao_registry::audit::alerts::{self, Alert, Rules};

use crate::config::AuditSettings;
use crate::state::AppState;

/// Records evaluated per scan transaction.
const SCAN_BATCH: i64 = 5000;

pub fn rules(a: &AuditSettings) -> Rules {
    Rules {
        many_patients_threshold: a.alert_many_patients_threshold,
        many_patients_window_secs: a.alert_many_patients_window_secs as i64,
        off_hours_start: a.alert_off_hours_start,
        off_hours_end: a.alert_off_hours_end,
        utc_offset_hours: a.alert_utc_offset_hours,
        break_glass_threshold: a.alert_break_glass_threshold,
        break_glass_window_secs: a.alert_break_glass_window_secs as i64,
        denials_threshold: a.alert_denials_threshold,
        denials_window_secs: a.alert_denials_window_secs as i64,
        same_surname_address: a.alert_same_surname_address,
        webhook: !a.alert_webhook_url.is_empty(),
    }
}

/// Start the job on this replica (unless `audit.alert_scan_interval_secs` is 0).
pub fn start(state: AppState) {
    let interval = state.settings.audit.alert_scan_interval_secs;
    if interval == 0 {
        return;
    }
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(
                state.settings.audit.alert_webhook_timeout_ms.max(1),
            ))
            .build();
        let mut tick = tokio::time::interval(Duration::from_secs(interval));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = scan_all(&state).await {
                tracing::warn!(cause = %e, "anomaly scan failed; retried at the next interval");
            }
            if let Ok(client) = &client
                && !state.settings.audit.alert_webhook_url.is_empty()
                && let Err(e) = deliver(&state, client).await
            {
                tracing::warn!(cause = %e, "alert webhook delivery round failed");
            }
        }
    });
}

/// Scan until the cursor reaches the chain head. Returns the number of alerts raised.
pub async fn scan_all(state: &AppState) -> Result<usize, String> {
    let rules = rules(&state.settings.audit);
    let mut raised = 0;
    loop {
        let store = state.store.clone();
        let r = rules.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut conn = store.conn()?;
            alerts::scan(&mut conn, &r, SCAN_BATCH)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        raised += outcome.raised.len();
        if !outcome.raised.is_empty() {
            tracing::warn!(alerts = outcome.raised.len(), "audit anomaly alerts raised");
        }
        if (outcome.evaluated as i64) < SCAN_BATCH {
            return Ok(raised);
        }
    }
}

/// Deliver due alerts: at least once (a crash after the POST and before the result is stored
/// repeats it; the receiver deduplicates by `id`), exponential back-off up to 5 minutes,
/// `failed` after `alert_webhook_max_attempts`.
pub async fn deliver(state: &AppState, client: &reqwest::Client) -> Result<(), String> {
    let a = &state.settings.audit;
    let lease = ChronoDuration::milliseconds(a.alert_webhook_timeout_ms as i64 * 2 + 1000);
    let store = state.store.clone();
    let due: Vec<Alert> = tokio::task::spawn_blocking(move || {
        let mut conn = store.conn()?;
        alerts::claim_deliveries(&mut conn, 50, lease)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    for alert in due {
        let body = serde_json::json!({
            "id": alert.id,
            "rule": alert.rule,
            "agent": alert.agent,
            "patient_id": alert.patient_id,
            "first_seq": alert.first_seq,
            "last_seq": alert.last_seq,
            "detail": serde_json::from_str::<serde_json::Value>(&alert.detail).unwrap_or_default(),
            "created_at": yiqiao_registry::audit::format_time(&alert.created_at),
            "source": state.auditor.replica(),
        });
        let sent = client
            .post(&a.alert_webhook_url)
            .header("X-Yiqiao-Alert-Id", &alert.id)
            .json(&body)
            .send()
            .await;
        let delivered = matches!(&sent, Ok(r) if r.status().is_success());
        if !delivered {
            tracing::warn!(alert = %alert.id, outcome = ?sent.as_ref().map(|r| r.status()).map_err(|e| e.to_string()), "alert webhook delivery failed");
        }
        let attempts = alert.webhook_attempts + 1;
        let retry_at =
            (!delivered && (attempts as u32) < a.alert_webhook_max_attempts).then(|| {
                let backoff = 2i64.saturating_pow(attempts as u32).min(300);
                yiqiao_registry::store::now_utc() + ChronoDuration::seconds(backoff)
            });
        let store = state.store.clone();
        let id = alert.id.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = store.conn()?;
            alerts::delivery_result(&mut conn, &id, delivered, retry_at)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
