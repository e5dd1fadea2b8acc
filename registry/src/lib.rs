//! Registry: storage (diesel over SQLite and PostgreSQL), the institution directory,
//! the enterprise master patient index, the document registry and care relationships
//! (encounters) and the staff roster (practitioners).
//!
//! This crate knows nothing of HTTP.

pub mod audit;
pub mod auth;
pub mod consent;
pub mod directory;
pub mod documents;
pub mod empi;
pub mod encounters;
pub mod mtls;
pub mod practitioners;
pub mod staff;
pub mod store;

pub use store::{Backend, Store, StoreError, StoreOptions};
