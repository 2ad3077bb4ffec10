//! The ledger: what happened to each order, as every stage saw it. A stage
//! [`record`](Ledger::record)s an [`Event`] where it settles a delivery; a background task
//! ([`run`]) gathers events into [`Batch`]es — one stream message per `max_events` events or per
//! `linger` — and appends them to a [`Sink`] (the RabbitMQ stream `<ns>.ledger`, with confirms).
//!
//! The ledger never holds the pipeline up: `record` does not wait. A batch the sink refuses (the
//! broker is down, restarting, or blocks publishers under an alarm) is kept and appended again
//! with backoff while new events wait in a bounded buffer; only when that buffer is full are
//! events dropped. Drops are counted (`orderflow_ledger_dropped_events_total`) and the last
//! failure is kept for `/readyz`'s detail; neither is fatal. An order's trace can have gaps then,
//! never a wrong entry.
//!
//! Wire format (`orderflow.ledger.v1`), one JSON object per stream message:
//! `{"schema":"orderflow.ledger.v1","stage":"writer","replica":"host-1234","events":[…]}`, each
//! event `{"kind":"attempt","o_id":"…","so_id":"…","io_id":"…","account":"m1",
//! "message_id":"…","version":"…","at":"2026-12-06T07:00:00.123Z", …kind's fields}`; `at` is
//! RFC 3339 in UTC. Readers skip kinds and fields they do not know (a newer writer's).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use crate::ledger_index::Encoded;

pub const LEDGER_SCHEMA: &str = "orderflow.ledger.v1";

/// What happened to an order at one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum What {
    /// The fetcher published it in a page (confirmed). `cursor` says where: `ts:<start_ts>`, a
    /// modified window, `sweep:…` or `repair:<request>`.
    Fetched { page: u32, cursor: String },
    /// The transformer published its record (confirmed).
    Transformed,
    /// A filter of the mapping left it out.
    Dropped { rule: String },
    /// The transformer could not map it (dead-lettered).
    Rejected { reason: String },
    /// One write to the target that did not write it, and what the target answered.
    Attempt {
        /// Which attempt of the record (1 = the first write).
        attempt: u32,
        /// The HTTP status (0: no answer: a timeout or a connection error).
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        /// `transient`, `permanent` or `target` (the target refuses everyone: held, no attempt spent).
        outcome: String,
    },
    /// Sent to a retry tier (confirmed).
    Retry { tier: String, attempts: u32 },
    /// Held back (the target refused everyone, or the broker refused what it caused, for
    /// `HOLD_LIMIT`) and republished where its stage parks (confirmed).
    Parked { reason: String },
    /// Dead-lettered (confirmed).
    DeadLettered { class: String, reason: String },
    /// `orderflow dlq replay` sent it back to its stage (confirmed).
    Replayed {
        /// The stage it went back to (`writer`, `transformer`).
        to: String,
    },
    /// The target holds it: its answer to the write that did it.
    Written {
        attempt: u32,
        status: u16,
        /// The target's idCheck called it a duplicate (written before).
        #[serde(default)]
        duplicate: bool,
    },
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
    /// The order's row version as the stage saw it (`ts`, else `modified`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// RFC 3339, UTC.
    pub at: String,
}

/// The source's ids of one order (any may be missing in a malformed row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderIds {
    pub o_id: Option<String>,
    pub so_id: Option<String>,
    pub io_id: Option<String>,
}

impl OrderIds {
    /// The ids of a raw Jushuitan order row.
    pub fn of_row(row: &serde_json::Value) -> OrderIds {
        let get = |key: &str| row.get(key).and_then(crate::json::scalar_text).filter(|s| !s.is_empty());
        OrderIds { o_id: get("o_id"), so_id: get("so_id"), io_id: get("io_id") }
    }

    /// The ids a stage put in a message's headers (`x-orderflow-o-id` and its siblings).
    pub fn from_headers(get: impl Fn(&str) -> Option<String>) -> OrderIds {
        use crate::messages::header;
        let get = |key: &str| get(key).filter(|s| !s.is_empty());
        OrderIds { o_id: get(header::SOURCE_O_ID), so_id: get(header::SOURCE_SO_ID), io_id: get(header::SOURCE_IO_ID) }
    }

    /// Sets the headers [`from_headers`](Self::from_headers) reads.
    pub fn set_headers(&self, mut set: impl FnMut(&str, &str)) {
        use crate::messages::header;
        for (key, value) in [
            (header::SOURCE_O_ID, &self.o_id),
            (header::SOURCE_SO_ID, &self.so_id),
            (header::SOURCE_IO_ID, &self.io_id),
        ] {
            if let Some(value) = value {
                set(key, value);
            }
        }
    }

    /// The version of a raw row as the fetcher sees it: `ts`, else `modified`.
    pub fn row_version(row: &serde_json::Value) -> Option<String> {
        ["ts", "modified"].iter().find_map(|k| row.get(*k).and_then(crate::json::scalar_text))
    }
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
            version: None,
            at: jiff::Timestamp::now().to_string(),
        }
    }

    pub fn order(mut self, o_id: Option<String>, so_id: Option<String>, io_id: Option<String>) -> Event {
        (self.o_id, self.so_id, self.io_id) = (o_id, so_id, io_id);
        self
    }

    pub fn ids(self, ids: &OrderIds) -> Event {
        self.order(ids.o_id.clone(), ids.so_id.clone(), ids.io_id.clone())
    }

    pub fn version(mut self, version: Option<String>) -> Event {
        self.version = version;
        self
    }

    /// Whether `id` names this event's order (as o_id, so_id or io_id).
    pub fn is_of(&self, id: &str) -> bool {
        [&self.o_id, &self.so_id, &self.io_id].into_iter().any(|v| v.as_deref() == Some(id))
    }

    /// The event's kind as written (`fetched`, `attempt`, …).
    pub fn kind(&self) -> &'static str {
        match self.what {
            What::Fetched { .. } => "fetched",
            What::Transformed => "transformed",
            What::Dropped { .. } => "dropped",
            What::Rejected { .. } => "rejected",
            What::Attempt { .. } => "attempt",
            What::Retry { .. } => "retry",
            What::Parked { .. } => "parked",
            What::DeadLettered { .. } => "dead_lettered",
            What::Replayed { .. } => "replayed",
            What::Written { .. } => "written",
        }
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

/// A batch as a reader takes it: events of kinds this version does not know are skipped, not
/// the whole batch.
#[derive(Debug, Deserialize)]
pub struct ReadBatch {
    pub schema: String,
    pub stage: String,
    pub replica: String,
    pub events: Vec<serde_json::Value>,
}

impl ReadBatch {
    /// The events this version can read.
    pub fn known(self) -> (String, String, Vec<Event>) {
        let events = self.events.into_iter().filter_map(|e| serde_json::from_value(e).ok()).collect();
        (self.stage, self.replica, events)
    }
}

/// Where batches go: the ledger stream (and its index), or anything a test gives.
pub trait Sink {
    /// Appends one batch; `Ok` only once it is stored (a broker confirm).
    fn append(&mut self, batch: &Encoded) -> impl Future<Output = anyhow::Result<()>> + Send;
}

impl<S: Sink + Send> Sink for &mut S {
    async fn append(&mut self, batch: &Encoded) -> anyhow::Result<()> {
        (**self).append(batch).await
    }
}

/// Appends `events` at once (batches of at most 500), for a command that records a few events
/// and ends (`orderflow dlq replay`): no background task, and the caller sees a failure.
pub async fn append_events(sink: &mut impl Sink, stage: &str, events: Vec<Event>) -> anyhow::Result<()> {
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        let batch = Batch {
            schema: LEDGER_SCHEMA.into(),
            stage: stage.into(),
            replica: crate::replica::name().into(),
            events: events.by_ref().take(500).collect(),
        };
        sink.append(&Encoded::of(&batch)?).await?;
    }
    Ok(())
}

/// What the stage's handles send the ledger task. Events are nearly every entry: boxing them
/// would cost an allocation each to make the rare flush smaller.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Event(Event),
    /// Everything sent before it is appended (or given up on): then answer.
    Flush(oneshot::Sender<()>),
}

/// A stage's handle on the ledger: cheap to clone; [`Ledger::off`] records nothing.
#[derive(Clone)]
pub struct Ledger {
    tx: Option<mpsc::Sender<Entry>>,
    stats: Arc<Stats>,
}

/// What the ledger lost, shared by the handles and the task that appends.
struct Stats {
    dropped: IntCounter,
    failure: Mutex<Option<String>>,
    /// Where the last failure is shown (`/readyz`'s details).
    readiness: Option<crate::admin::Readiness>,
}

impl Stats {
    fn set_failure(&self, failure: Option<String>) {
        if let Some(readiness) = &self.readiness {
            readiness.set_detail(READY_DETAIL, failure.clone());
        }
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The receiving end of a [`Ledger`], for its [`run`] task (which holds no sender, so it ends
/// when the stage's last handle is dropped, too).
pub struct Drain {
    rx: mpsc::Receiver<Entry>,
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
    /// The longest wait between two tries of a refused append.
    pub max_backoff: Duration,
    /// Where the ledger's last failure is shown (`/readyz`'s details), if anywhere.
    pub readiness: Option<crate::admin::Readiness>,
}

impl Options {
    pub fn new(stage: impl Into<String>, replica: impl Into<String>) -> Options {
        Options {
            stage: stage.into(),
            replica: replica.into(),
            buffer: 20_000,
            max_events: 500,
            linger: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            readiness: None,
        }
    }
}

/// How long the last flush at shutdown may take; what it has not appended by then is dropped
/// and counted (under a broker alarm every append would wait for the alarm).
pub const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// The counter every stage registers for the ledger's losses.
pub fn dropped_counter(registry: &prometheus::Registry) -> IntCounter {
    let counter = IntCounter::new(
        "orderflow_ledger_dropped_events_total",
        "Ledger events dropped: the buffer was full while the ledger stream refused appends, or the last flush at shutdown ran out of time.",
    )
    .expect("metric");
    registry.register(Box::new(counter.clone())).expect("unique metric");
    counter
}

/// The readiness check that shows the ledger's last failure (detail only: it never fails
/// readiness, a ledger outage must not take a stage out of service).
pub const READY_DETAIL: &str = "ledger";

impl Ledger {
    /// A ledger that records nothing (`LEDGER=off`).
    pub fn off(dropped: IntCounter) -> Ledger {
        Ledger { tx: None, stats: Arc::new(Stats { dropped, failure: Mutex::new(None), readiness: None }) }
    }

    /// A ledger and the receiving end its [`run`] task drains.
    pub fn new(options: &Options, dropped: IntCounter) -> (Ledger, Drain) {
        let (tx, rx) = mpsc::channel(options.buffer.max(1));
        let stats = Arc::new(Stats { dropped, failure: Mutex::new(None), readiness: options.readiness.clone() });
        (Ledger { tx: Some(tx), stats: stats.clone() }, Drain { rx, stats })
    }

    /// Records `event` without waiting: when the buffer is full (the sink is slow or down) the
    /// event is dropped and counted.
    pub fn record(&self, event: Event) {
        if let Some(tx) = &self.tx
            && tx.try_send(Entry::Event(event)).is_err()
        {
            self.stats.dropped.inc();
        }
    }

    /// Records every event of `events` (see [`record`](Self::record)).
    pub fn record_all(&self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            self.record(event);
        }
    }

    /// Waits (at most `timeout`) until everything recorded before is appended; `false` when it
    /// was not in time or the ledger task is gone.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (done, wait) = oneshot::channel();
        let sent =
            tokio::time::timeout(timeout, async { tx.send(Entry::Flush(done)).await.is_ok() && wait.await.is_ok() });
        matches!(sent.await, Ok(true))
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
/// most [`FINAL_FLUSH`]. A stage cancels `shutdown` only after it has settled its last delivery:
/// events recorded after it are dropped.
pub async fn run(drain: Drain, mut sink: impl Sink, options: Options, shutdown: CancellationToken) {
    let Drain { mut rx, stats } = drain;
    let mut batcher = Batcher { events: Vec::with_capacity(options.max_events), waiting: Vec::new() };
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(100), options.max_backoff);
    let mut entries = Vec::with_capacity(options.max_events);
    loop {
        if batcher.events.is_empty() {
            let open = tokio::select! {
                biased;
                _ = shutdown.cancelled() => false,
                got = rx.recv_many(&mut entries, options.max_events) => got > 0,
            };
            batcher.take(&mut entries);
            if !open {
                break;
            }
            // Let the batch fill for up to `linger` after its first event (a flush goes at once).
            let deadline = tokio::time::Instant::now() + options.linger;
            while batcher.events.len() < options.max_events && batcher.waiting.is_empty() {
                let room = options.max_events - batcher.events.len();
                tokio::select! {
                    got = tokio::time::timeout_at(deadline, rx.recv_many(&mut entries, room)) => match got {
                        Ok(0) | Err(_) => break,
                        Ok(_) => batcher.take(&mut entries),
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        }
        // Shutdown while an append waits (a broker alarm) gives it FINAL_FLUSH; what is left then
        // goes to the last flush.
        let shutdown_and_then_some = async {
            shutdown.cancelled().await;
            tokio::time::sleep(FINAL_FLUSH).await;
        };
        match flush_until(&stats, &mut sink, &options, &mut batcher.events, shutdown_and_then_some).await {
            Flushed::All => {
                backoff.reset();
                batcher.answer();
            }
            // Kept: tried again after a pause, while new events wait in the channel.
            Flushed::Refused => {
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                if shutdown.is_cancelled() {
                    break;
                }
            }
            Flushed::CutOff => break,
        }
    }
    rx.close();
    while rx.recv_many(&mut entries, usize::MAX).await > 0 {
        batcher.take(&mut entries);
    }
    let last = flush_until(&stats, &mut sink, &options, &mut batcher.events, tokio::time::sleep(FINAL_FLUSH)).await;
    if last != Flushed::All && !batcher.events.is_empty() {
        tracing::warn!(
            message = "The ledger's last flush could not append everything; those events are dropped.",
            events = batcher.events.len()
        );
        stats.dropped.inc_by(batcher.events.len() as u64);
    }
    batcher.answer();
}

/// Events waiting for their batch, and the flushes waiting for them.
struct Batcher {
    events: Vec<Event>,
    waiting: Vec<oneshot::Sender<()>>,
}

impl Batcher {
    fn take(&mut self, entries: &mut Vec<Entry>) {
        for entry in entries.drain(..) {
            match entry {
                Entry::Event(event) => self.events.push(event),
                Entry::Flush(done) => self.waiting.push(done),
            }
        }
    }

    fn answer(&mut self) {
        for done in self.waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Flushed {
    All,
    /// The sink refused a batch: it and the rest are still in `events`.
    Refused,
    /// `stop` came first: the batch cut off is counted as dropped, the rest are in `events`.
    CutOff,
}

/// [`flush`]es until `stop` completes first; then the batch whose append was cut off is dropped
/// and counted, and what was not tried stays in `events`.
async fn flush_until(
    stats: &Stats,
    sink: &mut impl Sink,
    options: &Options,
    events: &mut Vec<Event>,
    stop: impl Future<Output = ()>,
) -> Flushed {
    let mut in_flight = 0u64;
    let outcome = tokio::select! {
        refused = flush(stats, sink, options, events, &mut in_flight) => if refused { Flushed::Refused } else { Flushed::All },
        _ = stop => Flushed::CutOff,
    };
    if outcome == Flushed::CutOff {
        stats.dropped.inc_by(in_flight);
    }
    outcome
}

/// Appends `events` as batches of at most `max_events`, removing each once stored. Stops at the
/// first refusal (`true`), leaving it and the rest in `events`. `in_flight` counts the events of
/// the append under way (taken out of `events`).
async fn flush(
    stats: &Stats,
    sink: &mut impl Sink,
    options: &Options,
    events: &mut Vec<Event>,
    in_flight: &mut u64,
) -> bool {
    while !events.is_empty() {
        let take = events.len().min(options.max_events);
        let batch = Batch {
            schema: LEDGER_SCHEMA.into(),
            stage: options.stage.clone(),
            replica: options.replica.clone(),
            events: events.drain(..take).collect(),
        };
        *in_flight = take as u64;
        let outcome = match Encoded::of(&batch) {
            Ok(encoded) => sink.append(&encoded).await,
            Err(error) => Err(error.into()),
        };
        *in_flight = 0;
        match outcome {
            Ok(()) => {
                if stats.failure().is_some() {
                    tracing::info!(message = "The ledger appends again.");
                }
                stats.set_failure(None);
            }
            Err(error) => {
                if stats.failure().is_none() {
                    tracing::warn!(message = "The ledger could not append; its events wait (and are dropped once its buffer is full).", events = take, error = %format!("{error:#}"));
                }
                stats.set_failure(Some(format!("ledger append failed: {error:#}")));
                // Back at the front, in order.
                let mut back = batch.events;
                back.append(events);
                *events = back;
                return true;
            }
        }
    }
    false
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
        async fn append(&mut self, batch: &Encoded) -> anyhow::Result<()> {
            anyhow::ensure!(!self.refuse.load(std::sync::atomic::Ordering::SeqCst), "stream unavailable");
            self.batches.lock().expect("lock").push(serde_json::from_slice(&batch.body)?);
            Ok(())
        }
    }

    impl Memory {
        fn count(&self) -> usize {
            self.batches.lock().expect("lock").iter().map(|b| b.events.len()).sum()
        }
    }

    fn counter() -> IntCounter {
        IntCounter::new("orderflow_ledger_dropped_events_total", "test").expect("test value")
    }

    fn written(n: u32) -> Event {
        Event::new(What::Written { attempt: 1, status: 200, duplicate: false }, "m1", format!("rec-{n}")).order(
            Some(n.to_string()),
            None,
            None,
        )
    }

    fn options(buffer: usize, max_events: usize) -> Options {
        Options {
            buffer,
            max_events,
            linger: Duration::from_millis(200),
            max_backoff: Duration::from_millis(200),
            ..Options::new("writer", "r1")
        }
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
        let what = What::Attempt {
            attempt: 1,
            status: 200,
            code: Some("E1".into()),
            message: Some("bad".into()),
            outcome: "transient".into(),
        };
        let event = Event::new(what, "m1", "rec-1")
            .order(Some("1".into()), Some("so-1".into()), Some("io-1".into()))
            .version(Some("17".into()));
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
            (e["kind"].as_str(), e["status"].as_u64(), e["code"].as_str(), e["version"].as_str()),
            (Some("attempt"), Some(200), Some("E1"), Some("17"))
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
        assert_eq!(event.kind(), "attempt");
    }

    #[test]
    fn a_reader_skips_events_of_kinds_it_does_not_know() {
        let body = serde_json::json!({
            "schema": LEDGER_SCHEMA, "stage": "writer", "replica": "r1",
            "events": [
                {"kind": "teleported", "account": "m1", "message_id": "x", "at": "2026-12-06T07:00:00Z"},
                {"kind": "written", "attempt": 1, "status": 200, "o_id": "7", "account": "m1", "message_id": "m1:7:1", "at": "2026-12-06T07:00:00Z", "new_field": 1},
            ]
        });
        let (stage, _, events) = serde_json::from_value::<ReadBatch>(body).expect("test value").known();
        assert_eq!(stage, "writer");
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(events[0].is_of("7") && events[0].kind() == "written");
    }

    #[test]
    fn a_rows_ids_and_version_are_read_as_text() {
        let row = serde_json::json!({"o_id": 12, "so_id": "SO-1", "io_id": 99, "ts": 1700, "modified": "2026-01-01 00:00:00"});
        let ids = OrderIds::of_row(&row);
        assert_eq!(
            (ids.o_id.as_deref(), ids.so_id.as_deref(), ids.io_id.as_deref()),
            (Some("12"), Some("SO-1"), Some("99"))
        );
        assert_eq!(OrderIds::row_version(&row).as_deref(), Some("1700"));
        assert_eq!(
            OrderIds::row_version(&serde_json::json!({"modified": "2026-01-01"})).as_deref(),
            Some("2026-01-01")
        );
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
    async fn a_refusing_sink_keeps_the_events_reports_and_appends_them_once_it_recovers() {
        let sink = Memory::default();
        sink.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ledger, rx) = Ledger::new(&options(10_000, 100), counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), options(10_000, 100), shutdown.clone()));
        for n in 0..30 {
            ledger.record(written(n));
        }
        settle_until("the refusal reported", || ledger.failure().is_some()).await;
        assert!(ledger.failure().unwrap_or_default().contains("stream unavailable"));
        // A broker restart: the refusals go on for a while, and new events keep coming.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for n in 30..40 {
            ledger.record(written(n));
        }
        assert_eq!(ledger.dropped_count(), 0, "nothing is dropped while the buffer has room");
        sink.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        settle_until("appended after the recovery", || sink.count() == 40).await;
        assert!(ledger.failure().is_none());
        let order: Vec<String> = sink
            .batches
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.message_id.clone()))
            .collect();
        assert_eq!(order, (0..40).map(|n| format!("rec-{n}")).collect::<Vec<_>>(), "in order, once each");
        shutdown.cancel();
        task.await.expect("test value");
    }

    #[tokio::test]
    async fn a_long_refusal_drops_and_counts_only_what_the_buffer_cannot_hold() {
        let sink = Memory::default();
        sink.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let (ledger, rx) = Ledger::new(&options(50, 100), counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), options(50, 100), shutdown.clone()));
        for n in 0..200 {
            ledger.record(written(n));
            if n % 10 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let dropped = ledger.dropped_count();
        assert!(dropped > 0, "a full buffer drops");
        sink.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        settle_until("the rest appended", || sink.count() as u64 + dropped == 200).await;
        assert!(sink.count() >= 50, "the buffer's worth was kept: {}", sink.count());
        shutdown.cancel();
        task.await.expect("test value");
    }

    #[tokio::test]
    async fn flush_waits_until_everything_recorded_is_appended() {
        let sink = Memory::default();
        let slow = Options { linger: Duration::from_secs(3600), ..options(10_000, 1000) };
        let (ledger, rx) = Ledger::new(&slow, counter());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(rx, sink.clone(), slow, shutdown.clone()));
        for n in 0..7 {
            ledger.record(written(n));
        }
        assert!(ledger.flush(Duration::from_secs(5)).await, "flushed in time");
        assert_eq!(sink.count(), 7, "a flush does not wait for the linger");
        assert!(Ledger::off(counter()).flush(Duration::from_millis(1)).await, "an off ledger has nothing to flush");
        shutdown.cancel();
        task.await.expect("test value");
        assert!(!ledger.flush(Duration::from_secs(1)).await, "no task: not flushed");
    }

    /// Never answers (a broker that blocks every publisher).
    struct Stuck;

    impl Sink for Stuck {
        async fn append(&mut self, _batch: &Encoded) -> anyhow::Result<()> {
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
