//! Logs go to stderr through `tracing` (journald picks them up under systemd); data a script
//! might read goes to stdout. Levels come from `RUST_LOG`, defaulting to `info`.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber. Safe to call twice (the second call is a no-op), which tests
/// that start several services in one process rely on.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// Like [`init`], with another default level when `RUST_LOG` is not set (`tally demo` prints its
/// own summary and keeps the services' info lines out of it).
pub fn init_with_default(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
