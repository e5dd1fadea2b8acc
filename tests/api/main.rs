//! Integration tests: the real server on port 0, a real HTTP client, and every storage test on
//! both SQLite and PostgreSQL (`YIQIAO_TEST_DATABASE_URL`, default the local `test` database).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::field_reassign_with_default
)]

mod helpers;
mod wait;

mod audit;
mod auditing;
mod auth;
mod authz;
mod cli;
mod consent;
mod console;
mod documents;
mod edge;
mod empi;
mod encounters;
mod errors;
mod federation;
mod institutions;
mod migrations;
mod mllp;
mod mpi_import;
mod oidc;
mod ops;
mod outbound;
mod ratelimit;
mod resident_ids;
mod retention;
mod roster;
mod write_paths;
