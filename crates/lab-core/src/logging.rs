//! Installs the tracing subscriber. Only binaries call this; libraries and
//! tests just emit events.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::config::{LogConfig, LogFormat};

pub fn init_tracing(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|err| {
        eprintln!(
            "RUST_LOG={:?} is not a valid filter ({err}); using `info`",
            config.filter
        );
        EnvFilter::new("info")
    });
    let registry = tracing_subscriber::registry().with(filter);
    // Logs go to stderr, so a command's own output (`lab bench --json`) stays clean.
    let layer = fmt::layer().with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}
