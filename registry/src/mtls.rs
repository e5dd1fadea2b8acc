//! Mutual TLS bindings: which client certificate (SHA-256 of its DER, lowercase hex) an
//! institution must present. An institution without a row does not use mutual TLS.

use diesel::prelude::*;

use crate::store::schema::institution_client_certs as certs;
use crate::store::{Audited, DbConn, StoreError, now_utc};

/// Bind (or re-bind) `institution` to the certificate with this fingerprint.
pub fn bind(tx: &mut Audited<'_>, institution: &str, sha256: &str) -> Result<(), StoreError> {
    let conn = tx.conn();
    crate::store::write_tx(conn, |conn| {
        diesel::delete(certs::table.filter(certs::institution_id.eq(institution))).execute(conn)?;
        diesel::insert_into(certs::table)
            .values((
                certs::institution_id.eq(institution),
                certs::sha256.eq(sha256),
                certs::bound_at.eq(now_utc()),
            ))
            .execute(conn)?;
        Ok::<_, diesel::result::Error>(())
    })
    .map_err(StoreError::from_diesel)
}

/// Remove the binding; returns whether there was one.
pub fn unbind(tx: &mut Audited<'_>, institution: &str) -> Result<bool, StoreError> {
    let conn = tx.conn();
    diesel::delete(certs::table.filter(certs::institution_id.eq(institution)))
        .execute(conn)
        .map(|n| n > 0)
        .map_err(StoreError::from_diesel)
}

/// The fingerprint `institution` is bound to, if any.
pub fn bound_cert(conn: &mut DbConn, institution: &str) -> Result<Option<String>, StoreError> {
    certs::table
        .filter(certs::institution_id.eq(institution))
        .select(certs::sha256)
        .first(conn)
        .optional()
        .map_err(StoreError::from_diesel)
}

/// The institutions bound to the certificate with this fingerprint (usually one).
pub fn institutions_bound_to(conn: &mut DbConn, sha256: &str) -> Result<Vec<String>, StoreError> {
    certs::table
        .filter(certs::sha256.eq(sha256))
        .select(certs::institution_id)
        .order(certs::institution_id)
        .load(conn)
        .map_err(StoreError::from_diesel)
}
