//! Storage for machine authentication: the `auth_events` audit trail (one row per token
//! request, success or failure) and the gateway's token-signing keys (`gateway_keys`).
//!
//! Signing keys are shared by all replicas through the database: the first replica to start
//! inserts generation 1; a replica that loses the race gets a unique violation and reads the
//! winner's row (no ON CONFLICT needed, so the same code runs on both backends).

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::store::schema::{auth_events, gateway_keys};
use crate::store::{DbConn, StoreError, now_utc};

/// One authentication attempt, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = auth_events)]
pub struct AuthEvent {
    pub id: String,
    pub occurred_at: NaiveDateTime,
    pub client_id: Option<String>,
    /// `success` or `failure`.
    pub outcome: String,
    /// The OAuth error code sent to the client (`invalid_client`, …); `None` on success.
    pub oauth_error: Option<String>,
    /// Why (never secrets, never the assertion itself).
    pub reason: String,
    pub client_ip: Option<String>,
    pub jti: Option<String>,
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub request_id: Option<String>,
}

/// What to record; id and time are set on insert.
#[derive(Debug, Clone, Default)]
pub struct NewAuthEvent {
    pub client_id: Option<String>,
    pub success: bool,
    pub oauth_error: Option<String>,
    pub reason: String,
    pub client_ip: Option<String>,
    pub jti: Option<String>,
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub request_id: Option<String>,
}

/// `value` as it can be stored on both backends: control characters escaped (`\u{0}`:
/// PostgreSQL refuses U+0000 in text, and the others would garble the trail when read), then
/// cut to `max` characters. What a refused request carried is kept, readably.
fn storable(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    match out.char_indices().nth(max) {
        Some((end, _)) => out[..end].to_string(),
        None => out,
    }
}

fn clip(value: Option<String>, max: usize) -> Option<String> {
    value.map(|v| storable(&v, max))
}

/// Append one event.
pub fn record_event(conn: &mut DbConn, event: NewAuthEvent) -> Result<(), StoreError> {
    diesel::insert_into(auth_events::table)
        .values((
            auth_events::id.eq(uuid::Uuid::now_v7().to_string()),
            auth_events::occurred_at.eq(now_utc()),
            auth_events::client_id.eq(clip(event.client_id, 128)),
            auth_events::outcome.eq(if event.success { "success" } else { "failure" }),
            auth_events::oauth_error.eq(clip(event.oauth_error, 64)),
            auth_events::reason.eq(storable(&event.reason, 500)),
            auth_events::client_ip.eq(clip(event.client_ip, 64)),
            auth_events::jti.eq(clip(event.jti, 256)),
            auth_events::kid.eq(clip(event.kid, 128)),
            auth_events::alg.eq(clip(event.alg, 16)),
            auth_events::request_id.eq(clip(event.request_id, 128)),
        ))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(())
}

/// Events, newest first; optionally only one client's.
pub fn list_events(
    conn: &mut DbConn,
    client_id: Option<&str>,
    limit: i64,
) -> Result<Vec<AuthEvent>, StoreError> {
    let mut query = auth_events::table
        .select(AuthEvent::as_select())
        .order((auth_events::occurred_at.desc(), auth_events::id.desc()))
        .limit(limit)
        .into_boxed();
    if let Some(client) = client_id {
        query = query.filter(auth_events::client_id.eq(client.to_string()));
    }
    query.load(conn).map_err(StoreError::from_diesel)
}

/// A gateway token-signing key as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = gateway_keys)]
pub struct GatewayKey {
    pub kid: String,
    pub generation: i64,
    pub alg: String,
    /// Base64 (standard) PKCS#8 DER of the private key.
    pub private_pkcs8: String,
    /// The public JWK (JSON text).
    pub public_jwk: String,
    pub created_at: NaiveDateTime,
}

/// The newest signing key, if any.
pub fn current_key(conn: &mut DbConn) -> Result<Option<GatewayKey>, StoreError> {
    gateway_keys::table
        .select(GatewayKey::as_select())
        .order(gateway_keys::generation.desc())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}

/// All keys (published in the JWKS so tokens signed before a rotation still verify).
pub fn all_keys(conn: &mut DbConn) -> Result<Vec<GatewayKey>, StoreError> {
    gateway_keys::table
        .select(GatewayKey::as_select())
        .order(gateway_keys::generation.desc())
        .load(conn)
        .map_err(StoreError::from_diesel)
}

/// Store `candidate` as generation 1 unless a key exists; returns the key in force (the
/// first writer's when several replicas start at once).
pub fn ensure_first_key(
    conn: &mut DbConn,
    kid: &str,
    alg: &str,
    private_pkcs8: &str,
    public_jwk: &str,
) -> Result<GatewayKey, StoreError> {
    if let Some(key) = current_key(conn)? {
        return Ok(key);
    }
    let inserted = diesel::insert_into(gateway_keys::table)
        .values((
            gateway_keys::kid.eq(kid),
            gateway_keys::generation.eq(1i64),
            gateway_keys::alg.eq(alg),
            gateway_keys::private_pkcs8.eq(private_pkcs8),
            gateway_keys::public_jwk.eq(public_jwk),
            gateway_keys::created_at.eq(now_utc()),
        ))
        .execute(conn)
        .map_err(StoreError::from_diesel);
    match inserted {
        Ok(_) | Err(StoreError::Conflict(_)) => {}
        Err(e) => return Err(e),
    }
    current_key(conn)?.ok_or(StoreError::NotFound)
}

#[cfg(test)]
mod tests {
    use super::storable;

    #[test]
    fn recorded_values_are_escaped_and_clipped() {
        assert_eq!(storable("kid\u{0}x", 128), "kid\\u{0}x");
        assert_eq!(storable("a\tb\u{85}", 128), "a\\u{9}b\\u{85}");
        assert_eq!(storable("张三丰", 2), "张三");
        assert_eq!(storable("\u{0}\u{0}", 7), "\\u{0}\\u");
    }
}
