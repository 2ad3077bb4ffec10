//! The consume loop both consuming stages share: manual acks, an explicit prefetch (re-applied on
//! every session), each delivery handled on its own task so both cores work, and a graceful stop
//! (cancel the consumer, finish in-flight work within a bound, then close the channel).

use std::{future::Future, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel,
    message::Delivery,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use prometheus::IntCounter;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admin::Readiness;

/// Readiness check name for "consuming its work queue".
pub const CONSUMING_CHECK: &str = "consuming";

/// How long a stopping consumer waits for in-flight work before closing.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Acks a delivery. `Ok(false)` from lapin means the channel is gone and the ack was not sent:
/// that is counted and reported as an error, never assumed done.
pub async fn ack(delivery: &Delivery, lost_acks: &IntCounter) -> anyhow::Result<()> {
    if delivery.acker.ack(BasicAckOptions::default()).await? {
        Ok(())
    } else {
        lost_acks.inc();
        anyhow::bail!("ack not sent: the channel is closed (the broker will redeliver)")
    }
}

/// Consumes `queue` until `shutdown` or a failure, running `handle` per delivery on its own task.
/// `handle` must ack (or dead-letter then ack) the delivery; an `Err` ends the session (unacked
/// messages return to the queue when the channel closes).
pub async fn run<F, Fut>(
    channel: Channel,
    queue: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    readiness: &Readiness,
    handle: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await?;
    let mut consumer =
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let tag = consumer.tag();
    readiness.set_ok(CONSUMING_CHECK);
    tracing::info!(message = "Consuming.", queue, prefetch);
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let mut outcome: anyhow::Result<()> = Ok(());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(error) = joined.map_err(anyhow::Error::from).and_then(|r| r) {
                    outcome = Err(error);
                    break;
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(handle(delivery));
                }
                Some(Err(error)) => {
                    outcome = Err(anyhow::Error::from(error).context("consumer failed"));
                    break;
                }
                None => {
                    outcome = Err(anyhow::anyhow!("the broker cancelled the consumer of {queue}"));
                    break;
                }
            }
        }
    }
    readiness.set_failing(CONSUMING_CHECK, if outcome.is_ok() { "stopping" } else { "consumer failed" });
    if channel.status().connected() {
        let _ = channel.basic_cancel(tag, BasicCancelOptions::default()).await;
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(error) = joined.map_err(anyhow::Error::from).and_then(|r| r) {
                tracing::warn!(message = "In-flight work failed while stopping; the broker will redeliver it.", error = %format!("{error:#}"));
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            message = "In-flight work did not finish in time; the broker will redeliver it.",
            timeout_secs = DRAIN_TIMEOUT.as_secs()
        );
        tasks.abort_all();
    }
    if channel.status().connected() {
        let _ = channel.close(200, "bye".into()).await;
    }
    outcome
}
