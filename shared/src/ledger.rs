//! The ledger (issue 17, first part): what happened to each order, as every stage saw it. A stage
//! [`record`](Ledger::record)s an [`Event`] where it settles a delivery; a background task
//! ([`run`]) gathers events into [`Batch`]es — one stream message per `max_events` events or per
//! `linger` — and appends them to a [`Sink`] (the RabbitMQ stream `<ns>.ledger`, with confirms).
//!
//! The ledger never holds the pipeline up: `record` does not wait (a full buffer drops the event),
//! and a batch the sink refuses is dropped. Both are counted
//! (`orderflow_ledger_dropped_events_total`) and the last failure is kept for `/readyz`'s detail;
//! neither is fatal. An order's trace can have gaps then, never a wrong entry.
//!
//! Wire format (`orderflow.ledger.v1`), one JSON object per stream message:
//! `{"schema":"orderflow.ledger.v1","stage":"writer","replica":"host-1234","events":[…]}`, each
//! event `{"kind":"attempt","o_id":"…","so_id":"…","io_id":"…","account":"m1",
//! "message_id":"…","at":"2026-12-06T07:00:00.123Z", …kind's fields}`; `at` is RFC 3339 in UTC.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const LEDGER_SCHEMA: &str = "orderflow.ledger.v1";

/// What happened to an order at one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// The fetcher published it in a page.
    Fetched {
        page: u32,
        cursor: String,
        version: String,
    },
    /// The transformer published its record.
    Transformed,
    /// A filter of the mapping left it out.
    Dropped {
        rule: String,
    },
    /// The transformer could not map it.
    Rejected {
        reason: String,
    },
    /// One write to the target and what the target answered.
    Attempt {
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// The target's idCheck called it a duplicate (already written).
        #[serde(default)]
        duplicate: bool,
    },
    /// Sent to a retry tier.
    Retry {
        tier: String,
    },
    /// Held back (the target refused it for a while) and put in the parking queue.
    Parked {
        reason: String,
    },
    DeadLettered {
        class: String,
        reason: String,
    },
    /// `orderflow dlq replay` sent it back.
    Replayed,
    /// The target holds it.
    Written,
}

/// One order's event: which order, where it was, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(flatten)]
    pub what: What,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub o_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub so_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_id: Option<String>,
    pub account: String,
    /// The AMQP message id the stage handled (page or record).
    pub message_id: String,
    /// RFC 3339, UTC.
    pub at: String,
}

impl Event {
    /// An event of `account`'s message `message_id`, now, with no order ids yet.
    pub fn new(what: What, account: impl Into<String>, message_id: impl Into<String>) -> Event {
        Event {
            what,
            o_id: None,
            so_id: None,
            io_id: None,
            account: account.into(),
            message_id: message_id.into(),
            at: jiff::Timestamp::now().to_string(),
        }
    }

    pub fn order(mut self, o_id: Option<String>, so_id: Option<String>, io_id: Option<String>) -> Event {
        (self.o_id, self.so_id, self.io_id) = (o_id, so_id, io_id);
        self
    }

    /// Whether `id` names this event's order (as o_id, so_id or io_id).
    pub fn is_of(&self, id: &str) -> bool {
        [&self.o_id, &self.so_id, &self.io_id].into_iter().any(|v| v.as_deref() == Some(id))
    }
}

/// One stream message: the events one replica of one stage recorded in a short while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub schema: String,
    pub stage: String,
    pub replica: String,
    pub events: Vec<Event>,
}

/// Where batches go: the ledger stream, or anything a test gives.
pub trait Sink {
    /// Appends one batch (serialized); `Ok` only once it is stored (a broker confirm).
    fn append(&mut self, body: Vec<u8>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A stage's handle on the ledger: cheap to clone; [`Ledger::off`] records nothing.
#[derive(Clone)]
pub struct Ledger {
    tx: Option<mpsc::Sender<Event>>,
    stats: Arc<Stats>,
}

/// What the ledger lost, shared by the handles and the task that appends.
struct Stats {
    dropped: IntCounter,
    failure: Mutex<Option<String>>,
}

impl Stats {
    fn set_failure(&self, failure: Option<String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The receiving end of a [`Ledger`], for its [`run`] task (which holds no sender, so it ends
/// when the stage's last handle is dropped, too).
pub struct Drain {
    rx: mpsc::Receiver<Event>,
    stats: Arc<Stats>,
}

/// How a stage's ledger task batches.
#[derive(Debug, Clone)]
pub struct Options {
    pub stage: String,
    pub replica: String,
    /// Events buffered at most; past it `record` drops (and counts) instead of waiting.
    pub buffer: usize,
    /// Events per stream message at most.
    pub max_events: usize,
    /// How long an event may wait for its batch to fill.
    pub linger: Duration,
}

impl Options {
    pub fn new(stage: impl Into<String>, replica: impl Into<String>) -> Options {
        Options {
            stage: stage.into(),
            replica: replica.into(),
            buffer: 20_000,
            max_events: 500,
            linger: Duration::from_millis(200),
        }
    }
}

/// How long the last flush at shutdown may take; what it has not appended by then is dropped
/// and counted (under a broker alarm every append would wait for the alarm).
pub const FINAL_FLUSH: Duration = Duration::from_secs(5);

impl Ledger {
    /// A ledger that records nothing (`LEDGER=off`).
    pub fn off(dropped: IntCounter) -> Ledger {
        Ledger { tx: None, stats: Arc::new(Stats { dropped, failure: Mutex::new(None) }) }
    }

    /// A ledger and the receiving end its [`run`] task drains.
    pub fn new(options: &Options, dropped: IntCounter) -> (Ledger, Drain) {
        let (tx, rx) = mpsc::channel(options.buffer.max(1));
        let stats = Arc::new(Stats { dropped, failure: Mutex::new(None) });
        (Ledger { tx: Some(tx), stats: stats.clone() }, Drain { rx, stats })
    }

    /// Records `event` without waiting: when the buffer is full (the sink is slow or down) the
    /// event is dropped and counted.
    pub fn record(&self, event: Event) {
        if let Some(tx) = &self.tx
            && tx.try_send(event).is_err()
        {
            self.stats.dropped.inc();
        }
    }

    /// Events dropped so far (the value of `orderflow_ledger_dropped_events_total` it counts).
    pub fn dropped_count(&self) -> u64 {
        self.stats.dropped.get()
    }

    pub fn is_on(&self) -> bool {
        self.tx.is_some()
    }

    /// The last append that failed, for `/readyz`'s detail (`None` once one succeeds again).
    pub fn failure(&self) -> Option<String> {
        self.stats.failure()
    }
}

/// Drains into batches appended to `sink`, until every [`Ledger`] handle is gone or `shutdown`;
/// then an append in flight may finish and what is buffered is appended once more, each for at
/// most [`FINAL_FLUSH`]. A stage cancels
/// `shutdown` only after it has settled its last delivery: events recorded after it are dropped.
pub async fn run(drain: Drain, mut sink: impl Sink, options: Options, shutdown: CancellationToken) {
    let Drain { mut rx, stats } = drain;
    let mut events = Vec::with_capacity(options.max_events);
    loop {
        let open = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            got = rx.recv_many(&mut events, options.max_events) => got > 0,
        };
        if !open {
            rx.close();
            while rx.recv_many(&mut events, usize::MAX).await > 0 {}
            if !flush_until(&stats, &mut sink, &options, &mut events, tokio::time::sleep(FINAL_FLUSH)).await {
                tracing::warn!(
                    message = "The ledger's last flush ran out of time; its events are dropped.",
                    events = events.len()
                );
                stats.dropped.inc_by(events.len() as u64);
            }
            return;
        }
        // Let the batch fill for up to `linger` after its first event.
        let deadline = tokio::time::Instant::now() + options.linger;
        while events.len() < options.max_events {
            let room = options.max_events - events.len();
            tokio::select! {
                got = tokio::time::timeout_at(deadline, rx.recv_many(&mut events, room)) => match got {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = shutdown.cancelled() => break,
            }
        }
        // Shutdown while an append waits (a broker alarm) gives it FINAL_FLUSH; what is left then
        // goes to the last flush.
        let shutdown_and_then_some = async {
            shutdown.cancelled().await;
            tokio::time::sleep(FINAL_FLUSH).await;
        };
        flush_until(&stats, &mut sink, &options, &mut events, shutdown_and_then_some).await;
    }
}

/// [`flush`]es until `stop` completes first; then the batch whose append was cut off is dropped
/// and counted, and what was not tried stays in `events`. Whether everything was flushed.
async fn flush_until(
    stats: &Stats,
    sink: &mut impl Sink,
    options: &Options,
    events: &mut Vec<Event>,
    stop: impl Future<Output = ()>,
) -> bool {
    let (before, mut settled) = (events.len() as u64, 0);
    let flushed = tokio::select! {
        _ = flush(stats, sink, options, events, &mut settled) => true,
        _ = stop => false,
    };
    if !flushed {
        stats.dropped.inc_by(before - settled - events.len() as u64);
    }
    flushed
}

/// Appends `events` as batches of at most `max_events`; a refused batch is dropped and counted.
/// `settled` counts the events appended or dropped so far.
async fn flush(stats: &Stats, sink: &mut impl Sink, options: &Options, events: &mut Vec<Event>, settled: &mut u64) {
    while !events.is_empty() {
        let rest = events.split_off(events.len().min(options.max_events));
        let batch = Batch {
            schema: LEDGER_SCHEMA.into(),
            stage: options.stage.clone(),
            replica: options.replica.clone(),
            events: std::mem::replace(events, rest),
        };
        let count = batch.events.len() as u64;
        let outcome = match serde_json::to_vec(&batch) {
            Ok(body) => sink.append(body).await,
            Err(error) => Err(error.into()),
        };
        match outcome {
            Ok(()) => stats.set_failure(None),
            Err(error) => {
                if stats.failure().is_none() {
                    tracing::warn!(message = "The ledger could not append; its events are dropped until it can.", events = count, error = %format!("{error:#}"));
                }
                stats.dropped.inc_by(count);
                stats.set_failure(Some(format!("ledger append failed: {error:#}")));
            }
        }
        *settled += count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps what it is given; refuses while `refuse` is set.
    #[derive(Clone, Default)]
    struct Memory {
        batches: Arc<Mutex<Vec<Batch>>>,
        refuse: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Sink for Memory {
        async fn append(&mut self, body: Vec<u8>) -> anyhow::Result<()> {
            anyhow::ensure!(!self.refuse.load(std::sync::atomic::Ordering::SeqCst), "stream unavailable");
            self.batches.lock().expect("lock").push(serde_json::from_slice(&body)?);
            Ok(())
        }
    }

    fn counter() -> IntCounter {
        IntCounter::new("orderflow_ledger_dropped_events_total", "test").expect("test value")
    }

    fn written(n: u32) -> Event {
        Event::new(What::Written, "m1", format!("rec-{n}")).order(Some(n.to_string()), None, None)
    }

    fn options(buffer: usize, max_events: usize) -> Options {
        Options { buffer, max_events, linger: Duration::from_millis(200), ..Options::new("writer", "r1") }
    }

    async fn settle_until(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn events_serialize_as_the_documented_v1_shape() {
        let event = Event::new(
            What::Attempt { status: 200, code: Some("E1".into()), message: Some("bad".into()), duplicate: false },
            "m1",
            "rec-1",
        )
        .order(Some("1".into()), Some("so-1".into()), Some("io-1".into()));
        let batch = Batch {
            schema: LEDGER_SCHEMA.into(),
            stage: "writer".into(),
            replica: "r1".into(),
            events: vec![event.clone()],
        };
        let json: serde_json::Value = serde_json::to_value(&batch).expect("test value");
        assert_eq!(json["schema"], "orderflow.ledger.v1");
        let e = &json["events"][0];
        assert_eq!(
            (e["kind"].as_str(), e["status"].as_u64(), e["code"].as_str()),
            (Some("attempt"), Some(200), Some("E1"))
        );
        assert_eq!(
            (e["o_id"].as_str(), e["so_id"].as_str(), e["io_id"].as_str()),
            (Some("1"), Some("so-1"), Some("io-1"))
        );
        let at = e["at"].as_str().expect("test value");
        assert!(at.parse::<jiff::Timestamp>().is_ok() && at.ends_with('Z'), "{e}");
        let dead = serde_json::to_value(Event::new(
            What::DeadLettered { class: "permanent".into(), reason: "x".into() },
            "m1",
            "r",
        ))
        .expect("test value");
        assert_eq!(dead["kind"], "dead_lettered");
        assert!(dead.get("o_id").is_none(), "absent ids are left out: {dead}");
        let back: Batch = serde_json::from_value(json).expect("test value");
        assert_eq!(back.events, vec![event.clone()]);
        assert!(event.is_of("so-1") && event.is_of("io-1") && !event.is_of("2"));
    }

    #[tokio::test]
    async fn events_are_batched_up_to_the_size_and_a_lone_event_goes_out_after_the_linger() {
        let sink = Memory::default();
        let (ledger, rx) = Ledger::new(&options(10_000, 100), counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), options(10_000, 100), shutdown.clone()));
        for n in 0..250 {
            ledger.record(written(n));
        }
        settle_until("250 events appended", || {
            sink.batches.lock().expect("lock").iter().map(|b| b.events.len()).sum::<usize>() == 250
        })
        .await;
        let sizes: Vec<usize> = sink.batches.lock().expect("lock").iter().map(|b| b.events.len()).collect();
        assert!(sizes.iter().all(|&s| s <= 100) && sizes.len() >= 3, "{sizes:?}");
        let started = tokio::time::Instant::now();
        ledger.record(written(999));
        settle_until("the lone event appended", || {
            sink.batches.lock().expect("lock").iter().any(|b| b.events.iter().any(|e| e.is_of("999")))
        })
        .await;
        assert!(started.elapsed() >= Duration::from_millis(150), "it waited for company first");
        let order: Vec<String> = sink
            .batches
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.message_id.clone()))
            .collect();
        assert_eq!(order.first().map(String::as_str), Some("rec-0"));
        assert_eq!(order.last().map(String::as_str), Some("rec-999"), "events keep their order");
        assert_eq!(ledger.dropped_count(), 0);
        shutdown.cancel();
        task.await.expect("test value");
    }

    #[tokio::test]
    async fn a_full_buffer_drops_and_counts_instead_of_waiting() {
        // No task drains it: the sink is "stuck".
        let (ledger, _rx) = Ledger::new(&options(5, 100), counter());
        let started = std::time::Instant::now();
        for n in 0..20 {
            ledger.record(written(n));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "record never waits");
        assert_eq!(ledger.dropped_count(), 15);
        let off = Ledger::off(counter());
        off.record(written(1));
        assert_eq!((off.is_on(), off.dropped_count()), (false, 0), "off records nothing and drops nothing");
    }

    #[tokio::test]
    async fn a_refusing_sink_drops_counts_and_reports_then_recovers() {
        let sink = Memory::default();
        sink.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ledger, rx) = Ledger::new(&options(10_000, 100), counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), options(10_000, 100), shutdown.clone()));
        for n in 0..30 {
            ledger.record(written(n));
        }
        settle_until("the refused events counted", || ledger.dropped_count() == 30).await;
        let failure = ledger.failure().unwrap_or_default();
        assert!(failure.contains("stream unavailable"), "{failure}");
        sink.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        ledger.record(written(100));
        settle_until("appended again", || ledger.failure().is_none()).await;
        assert_eq!(sink.batches.lock().expect("lock").iter().map(|b| b.events.len()).sum::<usize>(), 1);
        shutdown.cancel();
        task.await.expect("test value");
    }

    /// Never answers (a broker that blocks every publisher).
    struct Stuck;

    impl Sink for Stuck {
        async fn append(&mut self, _body: Vec<u8>) -> anyhow::Result<()> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_flush_is_bounded_and_what_it_could_not_append_is_counted() {
        let (ledger, rx) = Ledger::new(&options(10_000, 10), counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, Stuck, options(10_000, 10), shutdown.clone()));
        tokio::task::yield_now().await;
        for n in 0..25 {
            ledger.record(written(n));
        }
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), task).await.expect("run ends").expect("no panic");
        // An append in flight gets FINAL_FLUSH, then what is left gets it again.
        assert!(started.elapsed() <= FINAL_FLUSH * 2 + Duration::from_secs(1), "{:?}", started.elapsed());
        assert_eq!(ledger.dropped_count(), 25);
    }

    #[tokio::test]
    async fn the_task_ends_with_a_flush_when_the_stage_drops_its_last_handle() {
        let sink = Memory::default();
        let (ledger, rx) = Ledger::new(&options(10_000, 100), counter());
        let task = tokio::spawn(run(rx, sink.clone(), options(10_000, 100), CancellationToken::new()));
        ledger.record(written(1));
        drop(ledger);
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("run ends").expect("no panic");
        assert_eq!(sink.batches.lock().expect("lock").iter().map(|b| b.events.len()).sum::<usize>(), 1);
    }

    #[tokio::test]
    async fn shutdown_appends_what_is_buffered() {
        let sink = Memory::default();
        let slow = Options { linger: Duration::from_secs(3600), ..options(10_000, 1000) };
        let (ledger, rx) = Ledger::new(&slow, counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), slow, shutdown.clone()));
        for n in 0..42 {
            ledger.record(written(n));
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the task ends at shutdown")
            .expect("test value");
        let batches = sink.batches.lock().expect("lock");
        assert_eq!(batches.iter().map(|b| b.events.len()).sum::<usize>(), 42);
        assert!(batches.iter().all(|b| b.stage == "writer" && b.replica == "r1" && b.schema == LEDGER_SCHEMA));
    }
}
