//! The crate every orderflow binary uses: settings, telemetry, the AMQP adapter (connection,
//! topology, confirmed publisher, dead-lettering), wire messages, shutdown, the admin HTTP server,
//! and the pure Jushuitan helpers (signing, China time) shared by the fetcher and `jst-sim`.

pub mod admin;
pub mod amqp;
pub mod audit;
pub mod backoff;
pub mod body;
pub mod json;
pub mod jst;
pub mod ledger;
pub mod ledger_index;
pub mod messages;
pub mod metrics;
pub mod otel;
pub mod replica;
pub mod rng;
pub mod settings;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod trace;

/// Every binary links this crate, so this one line picks their allocator: mimalloc. Under
/// `bench e2e`, glibc's malloc/free were 20-35% of each service's CPU profile (many small
/// JSON strings and maps per order).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Process-wide setup every binary does first: install the TLS crypto provider (ring) that
/// both reqwest and lapin use. Safe to call more than once.
pub fn init_process() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
