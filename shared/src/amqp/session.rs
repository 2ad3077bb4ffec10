//! The reconnecting session loop every service runs: open two connections (one that consumes and
//! acks, one that publishes), run the service's session on them until it ends, then reconnect
//! with backoff. A session re-declares topology and re-applies prefetch each time, so a broker
//! restart or a force-closed connection heals itself.
//!
//! Two connections because RabbitMQ's flow control blocks a connection that publishes while a
//! memory or disk alarm lasts, and a blocked connection carries nothing (lapin stops writing to
//! it): acks sent on the publishing connection would wait for the alarm to clear, and an alarm
//! that clears only as queues drain would never clear. A blocked connection is shown, not fought:
//! `/readyz` fails its `broker_blocked` check with the broker's reason and
//! `orderflow_broker_blocked` is 1 until the broker unblocks it.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{Connection, Event};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio_util::sync::CancellationToken;

use crate::{admin::Readiness, backoff::Backoff, settings::BrokerArgs};

/// An error that reconnecting cannot fix (bad configuration): the service exits with it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Readiness check name for the broker connection.
pub const BROKER_CHECK: &str = "broker";

/// Readiness check name for the broker's flow control (a resource alarm blocking publishes).
pub const BLOCKED_CHECK: &str = "broker_blocked";

/// A session must stay up this long before a failure reconnects at the fastest pace again: a
/// failure that repeats on every connect (a topology mismatch) backs off to the maximum instead
/// of reconnecting several times a second forever.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The name a service's connection shows in the broker (management UI, `rabbitmqctl
/// list_connections`): `orderflow-<service>@<ns>#<replica>`, so an operator can tell replicas apart.
pub fn connection_name(service: &str, ns: &str) -> String {
    format!("orderflow-{service}@{ns}#{}", crate::replica::name())
}

/// The broker metrics every service exports, registered in one place.
#[derive(Clone)]
pub struct BrokerMetrics {
    pub reconnects: IntCounter,
    pub blocked: IntGauge,
    pub lost_acks: IntCounter,
}

impl BrokerMetrics {
    pub fn register(registry: &Registry) -> Self {
        let reconnects =
            IntCounter::new("orderflow_broker_reconnects_total", "Broker reconnections after a lost connection.")
                .expect("metric");
        let blocked = IntGauge::new(
            "orderflow_broker_blocked",
            "1 while the broker blocks this service's publishing connection (a memory or disk alarm).",
        )
        .expect("metric");
        let lost_acks =
            IntCounter::new("orderflow_lost_acks_total", "Acks that could not be sent because the channel was gone.")
                .expect("metric");
        for metric in [
            Box::new(reconnects.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(blocked.clone()),
            Box::new(lost_acks.clone()),
        ] {
            registry.register(metric).expect("unique metric");
        }
        Self { reconnects, blocked, lost_acks }
    }
}

/// A session's two connections: `consume` for consuming, acking and declaring (the broker blocks a
/// connection only once it publishes: the transformer's and writer's never do; the fetcher's
/// carries its checkpoint commits), `publish` for confirmed publishes.
#[derive(Clone)]
pub struct Connections {
    pub consume: Arc<Connection>,
    pub publish: Arc<Connection>,
}

impl Connections {
    async fn close(&self) {
        for connection in [&self.consume, &self.publish] {
            super::connect::close(connection).await;
        }
    }
}

/// Opens both connections (the publishing one named `<name>/publish`); the error is the first
/// that failed.
async fn open(broker: &BrokerArgs, name: &str) -> Result<Connections, super::connect::ConnectError> {
    let consume = Arc::new(super::connect(broker, name).await?);
    match super::connect(broker, &format!("{name}/publish")).await {
        Ok(publish) => Ok(Connections { consume, publish: Arc::new(publish) }),
        Err(error) => {
            super::connect::close(&consume).await;
            Err(error)
        }
    }
}

/// Mirrors `connection.blocked` / `connection.unblocked` of both connections (the consuming one
/// is blocked only if it publishes: the fetcher commits checkpoints on it) into readiness and the
/// gauge until their events end.
async fn watch_blocked(connections: Connections, readiness: Readiness, gauge: IntGauge) {
    let consume = connections.consume.events_listener().map(|e| (0, e));
    let publish = connections.publish.events_listener().map(|e| (1, e));
    let mut events = futures_util::stream::select(consume, publish);
    let mut blocked: [Option<String>; 2] = [None, None];
    for (i, c) in [&connections.consume, &connections.publish].into_iter().enumerate() {
        // A connection blocked before the listener started is caught by its status.
        blocked[i] = c.status().blocked().then(|| "blocked".to_string());
    }
    loop {
        match blocked.iter().flatten().next() {
            Some(reason) => {
                readiness.set_failing(BLOCKED_CHECK, format!("the broker blocks publishing: {reason}"));
                gauge.set(1);
            }
            None => {
                readiness.set_ok(BLOCKED_CHECK);
                gauge.set(0);
            }
        }
        let Some((i, event)) = events.next().await else { return };
        match event {
            Event::ConnectionBlocked(reason) => {
                tracing::warn!(message = "The broker blocks publishing (a resource alarm); publishes wait until it clears.", %reason);
                blocked[i] = Some(reason);
            }
            Event::ConnectionUnblocked => {
                tracing::info!(message = "The broker unblocked publishing.");
                blocked[i] = None;
            }
            _ => {}
        }
    }
}

/// Runs `session` on fresh connections until `shutdown` is cancelled. Returns `Err` only for a
/// [`Fatal`] error.
pub async fn supervise<F, Fut>(
    broker: &BrokerArgs,
    connection_name: &str,
    shutdown: &CancellationToken,
    readiness: &Readiness,
    metrics: &BrokerMetrics,
    mut session: F,
) -> anyhow::Result<()>
where
    F: FnMut(Connections) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut first = true;
    readiness.set_failing(BROKER_CHECK, "not connected yet");
    readiness.set_ok(BLOCKED_CHECK);
    while !shutdown.is_cancelled() {
        if !first && !pause(&mut backoff, shutdown).await {
            break;
        }
        first = false;
        let connections = match try_connect(broker, connection_name, shutdown, readiness).await? {
            Connect::Connected(connections) => connections,
            Connect::Retry => continue,
            Connect::ShutDown => break,
        };
        let (result, lasted) = run_session(&mut session, connections, readiness, metrics).await;
        if lasted >= HEALTHY_AFTER {
            backoff.reset();
        }
        match result {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!(message = "Session ended unexpectedly; reconnecting."),
            Err(error) if error.is::<Fatal>() => return Err(error),
            Err(error) => {
                tracing::warn!(message = "Session failed; reconnecting.", error = %format!("{error:#}"), next_attempt = backoff.attempts() + 1)
            }
        }
        metrics.reconnects.inc();
    }
    readiness.set_failing(BROKER_CHECK, "shut down");
    Ok(())
}

/// Sleeps the backoff's next delay; `false` if `shutdown` came first.
async fn pause(backoff: &mut Backoff, shutdown: &CancellationToken) -> bool {
    let delay = backoff.next_delay();
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

enum Connect {
    Connected(Connections),
    /// The broker is unreachable for now (logged, shown in readiness).
    Retry,
    ShutDown,
}

/// One attempt to open the connections; `Err` (a [`Fatal`] one) for a configuration that no
/// retry can fix.
async fn try_connect(
    broker: &BrokerArgs,
    connection_name: &str,
    shutdown: &CancellationToken,
    readiness: &Readiness,
) -> anyhow::Result<Connect> {
    let connections = tokio::select! {
        _ = shutdown.cancelled() => return Ok(Connect::ShutDown),
        result = open(broker, connection_name) => result,
    };
    match connections {
        Ok(connections) => {
            tracing::info!(message = "Connected to the broker.");
            readiness.set_ok(BROKER_CHECK);
            Ok(Connect::Connected(connections))
        }
        Err(error @ super::connect::ConnectError::BadUrl { .. })
        | Err(error @ super::connect::ConnectError::CaFile { .. }) => Err(Fatal(error.to_string()).into()),
        Err(error) => {
            tracing::warn!(message = "Broker unreachable; retrying.", %error);
            readiness.set_failing(BROKER_CHECK, error.to_string());
            Ok(Connect::Retry)
        }
    }
}

/// Runs one session on `connections` with the blocked-publishing watcher beside it, then clears
/// what the session showed and closes the connections. Returns how the session ended and how
/// long it lasted.
async fn run_session<F, Fut>(
    session: &mut F,
    connections: Connections,
    readiness: &Readiness,
    metrics: &BrokerMetrics,
) -> (anyhow::Result<()>, Duration)
where
    F: FnMut(Connections) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let watcher = tokio::spawn(watch_blocked(connections.clone(), readiness.clone(), metrics.blocked.clone()));
    let started = Instant::now();
    let result = session(connections.clone()).await;
    watcher.abort();
    readiness.set_ok(BLOCKED_CHECK);
    metrics.blocked.set(0);
    readiness.set_failing(BROKER_CHECK, "reconnecting");
    connections.close().await;
    (result, started.elapsed())
}
