//! The reconnecting session loop every service runs: connect, run the service's session on the
//! connection until it ends, then reconnect with backoff. A session re-declares topology and
//! re-applies prefetch each time, so a broker restart or a force-closed connection heals itself.

use std::{future::Future, sync::Arc, time::Duration};

use lapin::Connection;
use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;

use crate::{admin::Readiness, backoff::Backoff, settings::BrokerArgs};

/// An error that reconnecting cannot fix (bad configuration): the service exits with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Readiness check name for the broker connection.
pub const BROKER_CHECK: &str = "broker";

/// The name a service's connection shows in the broker (management UI, `rabbitmqctl
/// list_connections`): `orderflow-<service>@<ns>#<replica>`, so an operator can tell replicas apart.
pub fn connection_name(service: &str, ns: &str) -> String {
    format!("orderflow-{service}@{ns}#{}", crate::replica::name())
}

/// Runs `session` on fresh connections until `shutdown` is cancelled. Returns `Err` only for a
/// [`Fatal`] error.
pub async fn supervise<F, Fut>(
    broker: &BrokerArgs,
    connection_name: &str,
    shutdown: &CancellationToken,
    readiness: &Readiness,
    reconnects: &IntCounter,
    mut session: F,
) -> anyhow::Result<()>
where
    F: FnMut(Arc<Connection>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut first = true;
    readiness.set_failing(BROKER_CHECK, "not connected yet");
    while !shutdown.is_cancelled() {
        if !first {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        first = false;
        let connection = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = super::connect(broker, connection_name) => result,
        };
        let connection = match connection {
            Ok(connection) => Arc::new(connection),
            Err(error @ super::connect::ConnectError::BadUrl { .. })
            | Err(error @ super::connect::ConnectError::CaFile { .. }) => {
                return Err(Fatal(error.to_string()).into());
            }
            Err(error) => {
                tracing::warn!(message = "Broker unreachable; retrying.", %error);
                readiness.set_failing(BROKER_CHECK, error.to_string());
                continue;
            }
        };
        tracing::info!(message = "Connected to the broker.");
        readiness.set_ok(BROKER_CHECK);
        backoff.reset();
        let result = session(connection.clone()).await;
        readiness.set_failing(BROKER_CHECK, "reconnecting");
        if connection.status().connected() {
            let _ = connection.close(200, "bye".into()).await;
        }
        match result {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!(message = "Session ended unexpectedly; reconnecting."),
            Err(error) if error.is::<Fatal>() => return Err(error),
            Err(error) => tracing::warn!(message = "Session failed; reconnecting.", error = %format!("{error:#}")),
        }
        reconnects.inc();
    }
    readiness.set_failing(BROKER_CHECK, "shut down");
    Ok(())
}
