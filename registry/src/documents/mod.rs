//! Document registry (issue 8, WS/T 790.10–.14, IHE MHD): DocumentReference metadata that
//! custodian institutions register, the transactional outbox of document and merge events,
//! and topic-based subscriptions with their deliveries.
//!
//! Invariants:
//! - A registration (single or a whole batch) is one transaction: the documents, the
//!   superseded status of what they replace, the events and every subscriber's delivery row
//!   commit together or not at all.
//! - `(custodian_id, custodian_doc_id)` is unique: registering the same document again stores
//!   nothing new (idempotent).
//! - Event sequence numbers are taken from `doc_event_counter` as the last write of the
//!   transaction, so events become visible in sequence order (the delivery worker relies on
//!   it for per-subscriber ordering).
//! - The registry never resolves consent: callers filter what a reader may see.

pub mod codes;
pub mod outbox;
pub mod store;

pub use codes::{CodeTable, DocumentCode};
pub use store::{
    DocStatus, DocumentFilter, NewDocument, RegisterOutcome, StoredDocument, get, register_batch,
    search,
};

use crate::store::StoreError;

/// Errors of the document registry. `index` is the position in a batch (0 for a single
/// registration); `field` a FHIR path inside the DocumentReference.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("{message}")]
    Invalid {
        index: usize,
        field: String,
        message: String,
    },
    #[error("{message}")]
    Conflict {
        index: usize,
        field: String,
        message: String,
    },
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for DocumentError {
    fn from(err: diesel::result::Error) -> DocumentError {
        DocumentError::Store(StoreError::from_diesel(err))
    }
}

impl From<crate::empi::store::EmpiError> for DocumentError {
    fn from(err: crate::empi::store::EmpiError) -> DocumentError {
        use crate::empi::store::EmpiError as E;
        match err {
            E::NotFound(what) => DocumentError::NotFound(what),
            E::Store(s) => DocumentError::Store(s),
            other => DocumentError::Store(StoreError::Unavailable(other.to_string())),
        }
    }
}

pub(crate) fn invalid(index: usize, field: &str, message: impl Into<String>) -> DocumentError {
    DocumentError::Invalid {
        index,
        field: field.to_string(),
        message: message.into(),
    }
}
