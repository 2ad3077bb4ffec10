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
        Some(Ok(unused)) => {
            // A subscriber was there already (tests). Dropping the provider would block this
            // worker on the SDK's shutdown, which waits for a task on this same runtime.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn_blocking(move || unused.shutdown());
            }
            None
        }
        None => None,
    };
    Telemetry { provider }
}

/// The longest wait for the last spans at exit.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The trace exporter of a service, if it has one.
#[must_use = "call shutdown() so the last spans are sent"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still queued and stops the exporter (graceful shutdown's last step).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // The SDK waits for its tokio export task by blocking: off the runtime's workers, and not
        // for longer than SHUTDOWN_WAIT (a collector that does not answer must not hold the exit).
        let stopped = tokio::time::timeout(SHUTDOWN_WAIT, tokio::task::spawn_blocking(move || provider.shutdown()));
        match stopped.await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(message = "Trace export did not shut down cleanly.", %error),
            Ok(Err(error)) => tracing::warn!(message = "Trace export did not shut down cleanly.", %error),
            Err(_) => tracing::warn!(message = "Trace export still busy at exit; its last spans are dropped."),
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// A collector that takes the connection but never answers must not hold the exit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_does_not_wait_for_a_silent_collector() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        crate::init_process();
        let provider = otel::provider(&endpoint, "orderflow-test").expect("a provider");
        let subscriber = tracing_subscriber::registry()
            .with(otel::layer(&provider).with_filter(filter_fn(|m| m.target() == otel::TARGET)));
        tracing::subscriber::with_default(subscriber, || {
            drop(tracing::info_span!(target: otel::TARGET, "write record"));
        });
        let started = Instant::now();
        Telemetry { provider: Some(provider) }.shutdown().await;
        assert!(started.elapsed() < SHUTDOWN_WAIT + Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
