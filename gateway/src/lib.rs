//! The Yiqiao gateway: HTTP (actix-web), authentication, federation and the command line.
//! Only this crate knows HTTP; storage is `yiqiao_registry`, policy is `yiqiao_consent`.

pub mod alerting;
pub mod app;
pub mod audit;
pub mod auth;
pub mod authlog;
pub mod cli;
pub mod config;
pub mod console;
pub mod demo;
pub mod documents;
pub mod envelope;
pub mod error;
pub mod extract;
pub mod federation;
pub mod fhir;
pub mod metrics;
pub mod middleware;
pub mod mllp;
pub mod mpi_import;
pub mod mtls;
pub mod oauth;
pub mod oidc;
pub mod outbound;
pub mod policy;
pub mod ratelimit;
pub mod report;
pub mod retention;
pub mod routes;
pub mod sanitize;
pub mod service;
pub mod sim;
pub mod staff;
pub mod state;
pub mod telemetry;

pub use app::Application;
pub use config::Settings;
