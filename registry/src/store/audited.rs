//! [`Audited`]: the only way to write registry data.
//!
//! Every function of this crate that changes what the registry holds (patients and their links,
//! consents and agreements, the directory, encounters, documents, subscriptions, practitioners,
//! client-certificate bindings, the EMPI model) takes `&mut Audited` instead of a bare
//! connection. An `Audited` exists only inside [`crate::audit::append_with`] /
//! [`crate::audit::append_many_with`]: the transaction whose change is committed together with
//! its audit record, or not at all. Code outside this crate cannot make one, so it cannot write
//! around the audit trail: the gateway's service layer is the one caller.
//!
//! Reading through an `Audited` is fine (it dereferences to the connection); writes that are
//! bookkeeping rather than changes to the record (authentication events, sessions, delivery
//! leases, statistics) keep taking a plain [`DbConn`].
//!
//! Benchmarks and tests that load data below the audit layer enable the crate feature
//! `unaudited-writes`, which adds [`Audited::unaudited`]; production builds do not have it.

use super::DbConn;

/// A connection inside an audited change's transaction (module docs).
pub struct Audited<'a> {
    conn: &'a mut DbConn,
}

impl<'a> Audited<'a> {
    /// Made by the audit append only.
    pub(crate) fn new(conn: &'a mut DbConn) -> Audited<'a> {
        Audited { conn }
    }

    /// A writer below the audit layer, for benchmarks and tests only (feature
    /// `unaudited-writes`; never enabled by a production build).
    #[cfg(any(test, feature = "unaudited-writes"))]
    pub fn unaudited(conn: &'a mut DbConn) -> Audited<'a> {
        Audited { conn }
    }

    /// The connection, for the registry's own statements.
    pub fn conn(&mut self) -> &mut DbConn {
        self.conn
    }
}

impl std::ops::Deref for Audited<'_> {
    type Target = DbConn;
    fn deref(&self) -> &DbConn {
        self.conn
    }
}

impl std::ops::DerefMut for Audited<'_> {
    fn deref_mut(&mut self) -> &mut DbConn {
        self.conn
    }
}
