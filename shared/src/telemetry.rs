//! Logging setup: JSON lines in containers, readable lines on a terminal; filter from `RUST_LOG`.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt};

use crate::settings::LogFormat;

/// The log filter when `RUST_LOG` is unset (docker-compose.yml's default is this same text). lapin
/// logs expected events (a lock queue held by another replica, a channel closing at shutdown) as
/// errors; every broker failure that matters is reported by our own code.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

/// Installs the global subscriber. Logs go to stderr so a binary's stdout stays for its output.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).with_current_span(false).try_init()
    } else {
        builder.compact().try_init()
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
