//! Installs the tracing subscriber. Only binaries call this; libraries and
//! tests just emit events.

use std::io::IsTerminal;

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
    // Colour codes only for a person at a terminal: redirected to a file or
    // a pipe, they would be noise in every line. `NO_COLOR` turns them off
    // everywhere (https://no-color.org).
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour_wanted(std::io::stderr().is_terminal()));
    match config.log_format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
}

/// Whether log lines carry ANSI colour codes.
fn colour_wanted(stderr_is_terminal: bool) -> bool {
    stderr_is_terminal && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}
