//! Logging setup: JSON lines in containers, readable lines on a terminal; filter from `RUST_LOG`.

use std::io::IsTerminal;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, fmt};

use crate::otel;

use crate::settings::LogFormat;

/// The log filter when `RUST_LOG` is unset (docker-compose.yml's default is this same text). lapin
/// logs expected events (a lock queue held by another replica, a channel closing at shutdown) as
/// errors; every broker failure that matters is reported by our own code.
pub const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

/// Installs the global subscriber. Logs go to stderr so a binary's stdout stays for its output.
pub fn init(format: LogFormat) {
    install(format, None);
}

/// [`init`] for a service whose spans may be exported: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, also
/// the OpenTelemetry layer for [`otel::TARGET`] spans (see [`crate::otel`]). Call inside the tokio
/// runtime (the exporter runs on it), and [`Telemetry::shutdown`] before the process exits.
pub fn init_service(format: LogFormat, service: &str) -> Telemetry {
    let provider = otel::provider_from_env(service);
    let installed = install(format, provider.as_ref().and_then(|p| p.as_ref().ok()));
    let provider = match provider {
        Some(Ok(provider)) if installed => {
            otel::set_exporting();
            tracing::info!(message = "Exporting traces over OTLP/HTTP.", service = otel::service_name(service));
            Some(provider)
        }
        Some(Err(error)) => {
            tracing::warn!(message = "Trace export disabled.", %error);
            None
        }
        _ => None,
    };
    Telemetry { provider }
}

/// The trace exporter of a service, if it has one.
#[must_use = "call shutdown() so the last spans are sent"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued and stops the exporter (graceful shutdown's last step).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // The SDK waits for its tokio export task by blocking: off the runtime's workers.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(message = "Trace export did not shut down cleanly.", %error),
            Err(error) => tracing::warn!(message = "Trace export did not shut down cleanly.", %error),
        }
    }
}

/// Installs the subscriber (with the exporting layer when `provider` is given); false when one was
/// installed already.
fn install(format: LogFormat, provider: Option<&SdkTracerProvider>) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // A second init (tests) keeps the first subscriber.
    match provider {
        // As before: one filter for everything.
        None => tracing_subscriber::registry().with(filter).with(logs(json)).try_init().is_ok(),
        // Each layer its own filter: the exported spans whatever RUST_LOG says, and never in the logs.
        Some(provider) => {
            let spans = otel::layer(provider)
                .with_filter(filter_fn(|meta| meta.target() == otel::TARGET).with_max_level_hint(Level::INFO));
            let filter = filter.add_directive(format!("{}=off", otel::TARGET).parse().expect("a valid directive"));
            tracing_subscriber::registry().with(spans).with(logs(json).with_filter(filter)).try_init().is_ok()
        }
    }
}

/// The log lines' layer.
fn logs<S>(json: bool) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    if json {
        fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr).boxed()
    } else {
        fmt::layer().compact().with_writer(std::io::stderr).boxed()
    }
}
