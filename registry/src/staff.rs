//! Storage for people's login (OpenID Connect): logins in progress (`oidc_logins`: state →
//! nonce and PKCE verifier, one use, ten minutes) and staff sessions (`staff_sessions`: a
//! browser session behind a cookie, or a bearer token derived from one).
//!
//! Tokens never reach the database: rows are keyed by the SHA-256 of the random token, so a
//! copy of the database does not let anyone use a session. Expired rows are deleted whenever a
//! new one is written, so the tables stay as small as the number of live logins.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use crate::store::schema::{oidc_logins, staff_sessions};
use crate::store::{DbConn, StoreError, now_utc};

/// A login started by `GET /login`, waiting for the provider's callback.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = oidc_logins)]
pub struct PendingLogin {
    pub state_hash: String,
    pub nonce: String,
    pub pkce_verifier: String,
    pub return_to: String,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

/// Remember a login in progress; deletes expired ones first.
pub fn insert_login(
    conn: &mut DbConn,
    state_hash: &str,
    nonce: &str,
    pkce_verifier: &str,
    return_to: &str,
    ttl_secs: i64,
) -> Result<(), StoreError> {
    let now = now_utc();
    diesel::delete(oidc_logins::table.filter(oidc_logins::expires_at.le(now)))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    diesel::insert_into(oidc_logins::table)
        .values((
            oidc_logins::state_hash.eq(state_hash),
            oidc_logins::nonce.eq(nonce),
            oidc_logins::pkce_verifier.eq(pkce_verifier),
            oidc_logins::return_to.eq(return_to),
            oidc_logins::created_at.eq(now),
            oidc_logins::expires_at.eq(now + chrono::Duration::seconds(ttl_secs)),
        ))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(())
}

/// Take (and delete) the login for `state_hash`. `None` when it is unknown, already used or
/// expired: each state works once, even when two replicas receive the same callback (only the
/// one whose DELETE removes the row gets it).
pub fn take_login(conn: &mut DbConn, state_hash: &str) -> Result<Option<PendingLogin>, StoreError> {
    let found = oidc_logins::table
        .filter(oidc_logins::state_hash.eq(state_hash))
        .select(PendingLogin::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)?;
    let Some(login) = found else {
        return Ok(None);
    };
    let deleted = diesel::delete(oidc_logins::table.filter(oidc_logins::state_hash.eq(state_hash)))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    if deleted != 1 || login.expires_at <= now_utc() {
        return Ok(None);
    }
    Ok(Some(login))
}

/// A live staff session.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = staff_sessions)]
pub struct StaffSession {
    pub id_hash: String,
    /// `cookie` (browser) or `bearer` (API token derived from a browser session).
    pub kind: String,
    /// For bearer tokens: the browser session they were issued from (logout ends both).
    pub parent_hash: Option<String>,
    /// `<issuer>#<sub>`.
    pub subject: String,
    pub name: Option<String>,
    /// Gateway roles, space-separated.
    pub roles: String,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

/// What to store for a new session.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub id_hash: &'a str,
    pub kind: &'a str,
    pub parent_hash: Option<&'a str>,
    pub subject: &'a str,
    pub name: Option<&'a str>,
    pub roles: &'a str,
    pub expires_at: NaiveDateTime,
}

/// Store a session; deletes expired ones first.
pub fn insert_session(conn: &mut DbConn, session: NewSession<'_>) -> Result<(), StoreError> {
    let now = now_utc();
    diesel::delete(staff_sessions::table.filter(staff_sessions::expires_at.le(now)))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    diesel::insert_into(staff_sessions::table)
        .values((
            staff_sessions::id_hash.eq(session.id_hash),
            staff_sessions::kind.eq(session.kind),
            staff_sessions::parent_hash.eq(session.parent_hash),
            staff_sessions::subject.eq(session.subject),
            staff_sessions::name.eq(session.name),
            staff_sessions::roles.eq(session.roles),
            staff_sessions::created_at.eq(now),
            staff_sessions::expires_at.eq(session.expires_at),
        ))
        .execute(conn)
        .map_err(StoreError::from_diesel)?;
    Ok(())
}

/// The unexpired session of `kind` with this hash.
pub fn find_session(
    conn: &mut DbConn,
    id_hash: &str,
    kind: &str,
) -> Result<Option<StaffSession>, StoreError> {
    staff_sessions::table
        .filter(staff_sessions::id_hash.eq(id_hash))
        .filter(staff_sessions::kind.eq(kind))
        .filter(staff_sessions::expires_at.gt(now_utc()))
        .select(StaffSession::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}

/// End a session and every bearer token issued from it; returns how many rows went.
pub fn delete_session(conn: &mut DbConn, id_hash: &str) -> Result<usize, StoreError> {
    diesel::delete(
        staff_sessions::table.filter(
            staff_sessions::id_hash
                .eq(id_hash)
                .or(staff_sessions::parent_hash.eq(id_hash)),
        ),
    )
    .execute(conn)
    .map_err(StoreError::from_diesel)
}
