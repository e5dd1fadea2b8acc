//! Logging: human-readable by default, JSON by configuration. Never patient data: handlers log
//! ids and counts, not names, ID numbers or bodies; the request span carries no query string.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::MakeWriterExt;

use crate::config::{LogFormat, LogSettings};

/// Install the global subscriber (once per process; later calls are ignored).
pub fn init(log: &LogSettings) {
    let filter = EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let writer = std::io::stderr.with_max_level(tracing::Level::TRACE);
    let result = match log.format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_target(false)
            .try_init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_current_span(true)
            .flatten_event(true)
            .try_init(),
    };
    let _ = result;
}
