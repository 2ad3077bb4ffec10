//! The consume loop both consuming stages share: manual acks, an explicit prefetch (re-applied on
//! every session), each delivery handled on its own task so both cores work, and a graceful stop
//! (cancel the consumer, finish in-flight work within a bound, then close the channel).
//!
//! Acks are batched ([`Acks`]): a handler marks its delivery done, and one task sends a single
//! `basic.ack multiple=true` for every done delivery below the oldest one still being worked on.
//! A delivery still in work is never covered by such an ack; done deliveries stuck behind a slow
//! one are acked one by one after a short wait. Per-message acks were half the broker's CPU in
//! the raw relay benchmark.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Acker, Channel,
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

/// Done deliveries waiting behind one still in work are acked one by one after this long.
const STRAGGLER_AFTER: Duration = Duration::from_millis(20);

/// The acks of one consumer channel. Cheap to clone; every clone is the same batch.
#[derive(Clone)]
pub struct Acks {
    inner: Arc<AcksInner>,
}

struct AcksInner {
    state: Mutex<AckState<Acker>>,
    wake: tokio::sync::Notify,
    lost_acks: IntCounter,
}

/// The bookkeeping of one channel's acks; `A` is what acks one delivery (lapin's `Acker`).
struct AckState<A> {
    /// Delivery tags received and not yet done (being worked on, or given up for redelivery).
    open: BTreeSet<u64>,
    /// Done deliveries whose ack is not sent yet, with when they were done.
    done: BTreeMap<u64, (A, Instant)>,
    /// The channel is gone: no ack can be sent any more.
    closed: bool,
}

impl<A> Default for AckState<A> {
    fn default() -> Self {
        Self { open: BTreeSet::new(), done: BTreeMap::new(), closed: false }
    }
}

/// What one flush sends: one `multiple` ack (with how many deliveries it covers) for the done
/// tags below the oldest open one, and single acks for stragglers.
struct Flush<A> {
    multiple: Option<(A, u64)>,
    singles: Vec<A>,
}

impl<A> AckState<A> {
    /// Takes what can be acked now: every done tag below the oldest open one (one `multiple`
    /// ack at the highest of them: it covers no open tag), and done tags above it that waited
    /// `STRAGGLER_AFTER` (or all of them when `everything`).
    fn take(&mut self, now: Instant, everything: bool) -> Flush<A> {
        let oldest_open = self.open.first().copied().unwrap_or(u64::MAX);
        let rest = self.done.split_off(&oldest_open);
        let prefix = std::mem::replace(&mut self.done, rest);
        let count = prefix.len() as u64;
        let multiple = prefix.into_iter().next_back().map(|(_, (acker, _))| (acker, count));
        let stragglers: Vec<u64> = self
            .done
            .iter()
            .filter(|(_, (_, at))| everything || now.duration_since(*at) >= STRAGGLER_AFTER)
            .map(|(tag, _)| *tag)
            .collect();
        let singles = stragglers.iter().filter_map(|tag| self.done.remove(tag)).map(|(acker, _)| acker).collect();
        Flush { multiple, singles }
    }
}

impl Acks {
    pub fn new(lost_acks: IntCounter) -> Self {
        Self {
            inner: Arc::new(AcksInner {
                state: Mutex::new(AckState::default()),
                wake: tokio::sync::Notify::new(),
                lost_acks,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AckState<Acker>> {
        self.inner.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a delivery as received (the consume loop does this, in delivery-tag order).
    fn received(&self, tag: u64) {
        self.state().open.insert(tag);
    }

    /// Marks the delivery done: its ack goes out with the next batch (within milliseconds).
    /// Fails when the channel is already gone (the broker will redeliver it).
    pub fn ack(&self, delivery: &Delivery) -> anyhow::Result<()> {
        {
            let mut state = self.state();
            if state.closed {
                drop(state);
                self.inner.lost_acks.inc();
                anyhow::bail!("ack not sent: the channel is closed (the broker will redeliver)");
            }
            state.open.remove(&delivery.delivery_tag);
            state.done.insert(delivery.delivery_tag, (delivery.acker.clone(), Instant::now()));
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Sends one flush; `false` when the channel is gone (nothing more can be acked).
    async fn flush(&self, everything: bool) -> bool {
        let Flush { multiple, singles } = self.state().take(Instant::now(), everything);
        let mut lost = 0u64;
        if let Some((acker, count)) = multiple
            && !matches!(acker.ack(BasicAckOptions { multiple: true }).await, Ok(true))
        {
            lost += count;
        }
        for acker in singles {
            if lost > 0 || !matches!(acker.ack(BasicAckOptions::default()).await, Ok(true)) {
                lost += 1;
            }
        }
        if lost > 0 {
            self.inner.lost_acks.inc_by(lost);
            self.close();
            return false;
        }
        true
    }

    fn close(&self) {
        self.state().closed = true;
    }

    fn has_done(&self) -> bool {
        !self.state().done.is_empty()
    }

    /// The ack task: flushes shortly after completions until `stop`, then once more for
    /// everything done.
    async fn run(self, stop: CancellationToken) {
        loop {
            let idle = !self.has_done();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(STRAGGLER_AFTER), if !idle => {}
            }
            // No waiting for a batch to fill (a held ack holds a prefetch slot): completions that
            // arrive while one ack is being sent go out together in the next.
            if !self.flush(false).await {
                return;
            }
        }
        self.flush(true).await;
        self.close();
    }
}

/// Consumes `queue` until `shutdown` or a failure, running `handle` per delivery on its own task.
/// `handle` must ack (or dead-letter then ack) the delivery through the [`Acks`] it is given; an
/// `Err` ends the session (unacked messages return to the queue when the channel closes).
pub async fn run<F, Fut>(
    channel: Channel,
    queue: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    readiness: &Readiness,
    lost_acks: &IntCounter,
    handle: F,
) -> anyhow::Result<()>
where
    F: Fn(Delivery, Acks) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await?;
    let mut consumer =
        channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let tag = consumer.tag();
    readiness.set_ok(CONSUMING_CHECK);
    tracing::info!(message = "Consuming.", queue, prefetch);
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let acks = Acks::new(lost_acks.clone());
    let stop_acks = CancellationToken::new();
    let ack_task = tokio::spawn(acks.clone().run(stop_acks.clone()));
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
                    acks.received(delivery.delivery_tag);
                    tasks.spawn(handle(delivery, acks.clone()));
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
    // Every finished delivery is acked before the channel closes (so a graceful stop leaves
    // nothing to redeliver but the work that was cut off).
    stop_acks.cancel();
    let _ = ack_task.await;
    if channel.status().connected() {
        let _ = channel.close(200, "bye".into()).await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(open: &[u64], done: &[(u64, Duration)]) -> (AckState<u64>, Instant) {
        let now = Instant::now();
        let mut s = AckState::default();
        s.open.extend(open);
        for (tag, ago) in done {
            s.done.insert(*tag, (*tag, now - *ago));
        }
        (s, now)
    }

    #[test]
    fn one_multiple_ack_covers_the_done_tags_below_the_oldest_open_one() {
        let fresh = Duration::ZERO;
        let (mut s, now) = state(&[4, 7], &[(1, fresh), (2, fresh), (3, fresh), (5, fresh), (6, fresh)]);
        let flush = s.take(now, false);
        assert_eq!(flush.multiple, Some((3, 3)), "ack multiple at 3: tags 1-3, never 4 (still open)");
        assert!(flush.singles.is_empty(), "5 and 6 wait behind 4 for a moment");
        assert_eq!(s.done.keys().copied().collect::<Vec<_>>(), vec![5, 6]);
        // 4 finishes: 5 and 6 go with it; 7 stays open.
        s.open.remove(&4);
        s.done.insert(4, (4, now));
        let flush = s.take(now, false);
        assert_eq!(flush.multiple, Some((6, 3)));
        assert!(s.done.is_empty());
    }

    #[test]
    fn done_tags_stuck_behind_a_slow_one_are_acked_singly_after_a_while() {
        let (mut s, now) = state(&[2], &[(3, STRAGGLER_AFTER * 2), (4, Duration::ZERO)]);
        let flush = s.take(now, false);
        assert_eq!(flush.multiple, None, "nothing below the open tag 2");
        assert_eq!(flush.singles, vec![3], "3 waited long enough; 4 just finished");
        let flush = s.take(now, true);
        assert_eq!(flush.singles, vec![4], "on stop, everything done is acked");
        assert!(s.open.contains(&2), "an open tag is never acked");
    }
}
