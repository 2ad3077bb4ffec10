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
    collections::BTreeMap,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Acker,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use prometheus::IntCounter;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{
    Connections, Publisher,
    settle::{Applied, Live, Message, Policy, Settlement, Settler},
};
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
    /// Deliveries received and not yet done (being worked on, or left for redelivery), with what
    /// acks each.
    open: BTreeMap<u64, A>,
    /// Done deliveries whose ack is not sent yet, with when they were done.
    done: BTreeMap<u64, (A, Instant)>,
    /// The channel is gone: no ack can be sent any more.
    closed: bool,
}

impl<A> Default for AckState<A> {
    fn default() -> Self {
        Self { open: BTreeMap::new(), done: BTreeMap::new(), closed: false }
    }
}

/// What one flush sends: one `multiple` ack (with how many deliveries it covers) for the done
/// tags below the oldest open one, and single acks for stragglers.
struct Flush<A> {
    multiple: Option<(A, u64)>,
    singles: Vec<A>,
}

impl<A> AckState<A> {
    fn receive(&mut self, tag: u64, acker: A) {
        self.open.insert(tag, acker);
    }

    /// Moves a delivery from open to done; `false` when it was not open (already done).
    fn complete(&mut self, tag: u64, now: Instant) -> bool {
        match self.open.remove(&tag) {
            Some(acker) => {
                self.done.insert(tag, (acker, now));
                true
            }
            None => false,
        }
    }

    /// Takes what can be acked now: every done tag below the oldest open one (one `multiple`
    /// ack at the highest of them: it covers no open tag), and done tags above it that waited
    /// `STRAGGLER_AFTER` (or all of them when `everything`).
    fn take(&mut self, now: Instant, everything: bool) -> Flush<A> {
        let oldest_open = self.open.first_key_value().map_or(u64::MAX, |(tag, _)| *tag);
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
    fn received(&self, delivery: &Delivery) {
        self.state().receive(delivery.delivery_tag, delivery.acker.clone());
    }

    /// Marks the delivery done: its ack goes out with the next batch (within milliseconds).
    /// Fails when the channel is already gone (the broker will redeliver it).
    pub fn ack(&self, tag: u64) -> anyhow::Result<()> {
        {
            let mut state = self.state();
            if state.closed {
                drop(state);
                self.inner.lost_acks.inc();
                anyhow::bail!("ack not sent: the channel is closed (the broker will redeliver)");
            }
            if !state.complete(tag, Instant::now()) {
                anyhow::bail!("delivery {tag} acked twice, or never received on this channel");
            }
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

/// A consuming stage's deciding half: what should happen to each delivery. The [`Settler`]
/// applies it; the handler never talks to the broker.
pub trait Handler: Send + Sync + 'static {
    /// What the handler wants back once the delivery is settled (for its metrics and spans).
    type Note: Send + 'static;

    /// Decides the delivery's fate. A stopping handler answers [`Settlement::Requeue`].
    fn decide(&self, message: &Message) -> impl Future<Output = (Settlement, Self::Note)> + Send;

    /// Called once the settlement is applied (confirmed and acked, parked, or left unacked).
    fn settled(&self, message: &Message, note: Self::Note, applied: Applied);
}

/// How a stage consumes: its work queue, prefetch and settlement rules.
pub struct Serve<'a> {
    pub queue: String,
    pub prefetch: u16,
    /// Declare the topology before consuming (`AMQP_DECLARE_TOPOLOGY`).
    pub declare: bool,
    pub confirm_timeout: Duration,
    pub shutdown: &'a CancellationToken,
    pub readiness: &'a Readiness,
    pub lost_acks: IntCounter,
    pub policy: Policy,
}

/// One broker session of a consuming stage: consumes and acks on the consuming connection,
/// publishes (confirmed) on the publishing one, until `shutdown` or a failure.
pub async fn serve<H: Handler>(connections: &Connections, serve: Serve<'_>, handler: Arc<H>) -> anyhow::Result<()> {
    let channel = connections.consume.create_channel().await?;
    if serve.declare {
        serve.policy.topology.declare(&channel).await?;
    }
    let publisher = Publisher::open(&connections.publish).await?.with_confirm_timeout(serve.confirm_timeout);
    channel.basic_qos(serve.prefetch.max(1), BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(serve.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let tag = consumer.tag();
    serve.readiness.set_ok(CONSUMING_CHECK);
    tracing::info!(message = "Consuming.", queue = %serve.queue, prefetch = serve.prefetch);
    let acks = Acks::new(serve.lost_acks.clone());
    let stop_acks = CancellationToken::new();
    let ack_task = tokio::spawn(acks.clone().run(stop_acks.clone()));
    let settler = Arc::new(Settler::new(Live { publisher, acks: acks.clone() }, serve.policy.clone()));
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let outcome = consume(&mut consumer, &serve, &acks, &mut tasks, |message| {
        let (settler, handler) = (settler.clone(), handler.clone());
        async move {
            let (settlement, note) = handler.decide(&message).await;
            let applied = settler.settle(&message, settlement).await?;
            handler.settled(&message, note, applied);
            Ok(())
        }
    })
    .await;
    serve.readiness.set_failing(CONSUMING_CHECK, if outcome.is_ok() { "stopping" } else { "consumer failed" });
    if channel.status().connected() {
        let _ = super::connect::cancel(&channel, tag.as_str()).await;
    }
    drain(&mut tasks).await;
    // Every finished delivery is acked before the channel closes (so a graceful stop leaves
    // nothing to redeliver but the work that was cut off).
    stop_acks.cancel();
    let _ = ack_task.await;
    super::connect::close_channel(&channel, "bye").await;
    outcome
}

/// Receives deliveries, each worked on its own task, until shutdown or a failure (a task's
/// error, a lost consumer).
async fn consume<F, Fut>(
    consumer: &mut lapin::Consumer,
    serve: &Serve<'_>,
    acks: &Acks,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = serve.shutdown.cancelled() => return Ok(()),
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                joined.map_err(anyhow::Error::from).and_then(|r| r)?;
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    acks.received(&delivery);
                    let message = Message::new(delivery.delivery_tag, delivery.data, delivery.properties);
                    tasks.spawn(work(message));
                }
                Some(Err(error)) => return Err(anyhow::Error::from(error).context("consumer failed")),
                None => anyhow::bail!("the broker cancelled the consumer of {}", serve.queue),
            }
        }
    }
}

/// Lets in-flight work finish within [`DRAIN_TIMEOUT`]; what does not is cut off (redelivered).
async fn drain(tasks: &mut JoinSet<anyhow::Result<()>>) {
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn state(open: &[u64], done: &[(u64, Duration)]) -> (AckState<u64>, Instant) {
        let now = Instant::now();
        let mut s = AckState::default();
        s.open.extend(open.iter().map(|t| (*t, *t)));
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
        assert!(s.complete(4, now));
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
        assert!(s.open.contains_key(&2), "an open tag is never acked");
        assert!(!s.complete(3, now), "a delivery is done once");
    }

    /// One step of a channel's life: a delivery arrives, one in work finishes (an index into the
    /// open ones), or the ack task flushes (after `millis`, maybe for everything).
    #[derive(Debug, Clone)]
    enum Step {
        Receive,
        Finish(usize),
        Flush { millis: u64, everything: bool },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => Just(Step::Receive),
            3 => any::<usize>().prop_map(Step::Finish),
            2 => (0u64..50, proptest::bool::weighted(0.1)).prop_map(|(millis, everything)| Step::Flush { millis, everything }),
        ]
    }

    proptest::proptest! {
        /// Whatever order deliveries finish in and whenever flushes happen, no ack ever covers a
        /// delivery still in work, no delivery is acked twice, and every finished one is acked by
        /// the final flush.
        #[test]
        fn random_completion_orders_never_ack_a_delivery_in_work(steps in proptest::collection::vec(step(), 1..200)) {
            let mut s = AckState::<u64>::default();
            let mut now = Instant::now();
            let (mut next_tag, mut acked) = (1u64, BTreeSet::new());
            let mut check = |flush: Flush<u64>, s: &AckState<u64>| -> Result<(), proptest::test_runner::TestCaseError> {
                if let Some((top, count)) = flush.multiple {
                    // `multiple` acks every unacked tag up to `top` on the channel.
                    let covered: Vec<u64> = (1..=top).filter(|t| !acked.contains(t)).collect();
                    proptest::prop_assert_eq!(covered.len() as u64, count, "the count is what the ack covers");
                    for tag in covered {
                        proptest::prop_assert!(!s.open.contains_key(&tag), "multiple ack at {} covers {} in work", top, tag);
                        acked.insert(tag);
                    }
                }
                for tag in flush.singles {
                    proptest::prop_assert!(!s.open.contains_key(&tag) && acked.insert(tag), "single ack of {} in work or twice", tag);
                }
                Ok(())
            };
            for step in steps {
                match step {
                    Step::Receive => {
                        s.receive(next_tag, next_tag);
                        next_tag += 1;
                    }
                    Step::Finish(i) => {
                        if let Some(tag) = s.open.keys().nth(i % s.open.len().max(1)).copied() {
                            proptest::prop_assert!(s.complete(tag, now));
                        }
                    }
                    Step::Flush { millis, everything } => {
                        now += Duration::from_millis(millis);
                        let flush = s.take(now, everything);
                        check(flush, &s)?;
                    }
                }
            }
            let finished: BTreeSet<u64> = (1..next_tag).filter(|t| !s.open.contains_key(t)).collect();
            let flush = s.take(now, true);
            check(flush, &s)?;
            proptest::prop_assert_eq!(acked, finished, "every finished delivery acked once, no other");
        }
    }
}
