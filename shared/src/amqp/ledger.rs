//! The ledger stream on the broker: declaring it, appending batches (with confirms, over a
//! connection of the ledger's own that reconnects by itself) and reading them back from a point
//! in time (what `orderflow trace` and the audit read). The batching and the event format are
//! `crate::ledger`.
//!
//! Stages publish to the fanout exchange `<ns>.ledger`, bound to the stream `<ns>.ledger`: a
//! least-privilege user needs write on that exchange only (not on the default exchange, which
//! reaches every queue).

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ExchangeKind,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{
    connect::{close, close_channel},
    headers::json_properties,
    publisher::Publisher,
    soft_error,
    topology::{QueueSpec, Topology, declare_queue},
};
use tokio_util::sync::CancellationToken;

use crate::{
    ledger::{Encoded, LEDGER_SCHEMA, Ledger, Options, ReadBatch, Sink},
    settings::{BrokerArgs, LedgerArgs},
};

/// Declares the ledger's and its index's exchanges, streams and bindings when the ledger is on
/// (idempotent), on a channel of its own. A stream declared earlier with other retention
/// arguments is kept as it is (the broker refuses to change a queue's arguments): a warning says
/// so and how to change it.
pub async fn declare(connection: &Connection, topology: &Topology) -> anyhow::Result<()> {
    let (Some(ledger), Some(index)) = (topology.ledger_spec(), topology.ledger_index_spec()) else { return Ok(()) };
    for (spec, exchange) in [(ledger, topology.ledger_exchange()), (index, topology.ledger_index_exchange())] {
        declare_stream(connection, &spec, &exchange).await?;
    }
    Ok(())
}

async fn declare_stream(connection: &Connection, spec: &QueueSpec, exchange: &str) -> anyhow::Result<()> {
    let mut channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel.exchange_declare(exchange.into(), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
    if let Err(error) = declare_queue(&channel, spec).await {
        if !matches!(soft_error(&error), Some(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)) {
            return Err(error.into());
        }
        tracing::warn!(
            message = "The ledger stream exists with other retention arguments; it keeps them. To change LEDGER_MAX_AGE or LEDGER_MAX_BYTES on an existing stream, set a policy (rabbitmqctl set_policy … '{\"max-age\":…}') or delete the stream.",
            stream = %spec.name, %error
        );
        channel = connection.create_channel().await?;
    }
    channel
        .queue_bind(
            spec.name.as_str().into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    close_channel(&channel, "declared").await;
    Ok(())
}

/// Appends `batch` through `publisher` with its index entry, the entry sent first, both on the
/// wire before either confirm is awaited. Both must be confirmed: a batch stored without its
/// entry (the entry refused) is appended again with a new entry under a new id, so its events are
/// always in a batch the index names (the unnamed copy is only a duplicate).
async fn append_with_index(publisher: &Publisher, topology: &Topology, batch: &Encoded) -> anyhow::Result<()> {
    let id = format!("ledger:{}:{}:{}", crate::replica::name(), crate::messages::now_ms(), fastrand::u32(..));
    let entry = crate::ledger_index::Entry::new(&id, crate::messages::now_ms(), &batch.keys);
    let entry_properties = json_properties(&format!("index:{id}"), FieldTable::default());
    let entry_confirm = publisher
        .send(&topology.ledger_index_exchange(), "", &serde_json::to_vec(&entry)?, entry_properties)
        .await
        .map_err(|e| anyhow::anyhow!("appending the index entry: {e}"))?;
    let batch_confirm =
        publisher.send(&topology.ledger_exchange(), "", &batch.body, json_properties(&id, FieldTable::default())).await;
    let entry_confirmed = entry_confirm.await.map_err(|e| anyhow::anyhow!("appending the index entry: {e}"));
    batch_confirm?.await?;
    entry_confirmed
}

/// Appends batches through a confirmed publisher the caller keeps (the CLI's connection).
pub struct StreamSink {
    publisher: Publisher,
    topology: Topology,
}

impl StreamSink {
    pub fn new(publisher: Publisher, topology: &Topology) -> StreamSink {
        StreamSink { publisher, topology: topology.clone() }
    }
}

impl Sink for StreamSink {
    async fn append(&mut self, batch: &Encoded) -> anyhow::Result<()> {
        append_with_index(&self.publisher, &self.topology, batch).await
    }
}

/// How long connecting (and declaring) may take before an append counts as refused.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A stage's sink: its own broker connection (`<name>/ledger`), opened on the first append and
/// again after any failure, so the ledger follows the broker through restarts without the
/// stage's sessions; a broker alarm blocking it blocks only the ledger.
pub struct BrokerSink {
    broker: BrokerArgs,
    name: String,
    topology: Topology,
    link: Option<(Connection, Publisher)>,
}

impl BrokerSink {
    pub fn new(broker: BrokerArgs, connection_name: &str, topology: Topology) -> BrokerSink {
        BrokerSink { broker, name: format!("{connection_name}/ledger"), topology, link: None }
    }

    async fn open(&self) -> anyhow::Result<(Connection, Publisher)> {
        let connection = super::connect(&self.broker, &self.name).await?;
        if self.broker.declare_topology
            && let Err(error) = declare(&connection, &self.topology).await
        {
            close(&connection).await;
            return Err(error.context("declaring the ledger stream"));
        }
        let publisher = Publisher::open(&connection).await?.with_confirm_timeout(self.broker.amqp_confirm_timeout);
        Ok((connection, publisher))
    }

    /// Closes the connection (at shutdown, after the last flush).
    pub async fn close(&mut self) {
        if let Some((connection, _)) = self.link.take() {
            close(&connection).await;
        }
    }
}

impl Sink for BrokerSink {
    async fn append(&mut self, batch: &Encoded) -> anyhow::Result<()> {
        if self.link.as_ref().is_some_and(|(c, _)| !c.status().connected()) {
            self.link = None;
        }
        if self.link.is_none() {
            let opened = tokio::time::timeout(CONNECT_TIMEOUT, self.open())
                .await
                .map_err(|_| anyhow::anyhow!("connecting to the broker timed out"))??;
            self.link = Some(opened);
        }
        let Some((_, publisher)) = &self.link else { unreachable!("opened above") };
        if let Err(error) = append_with_index(publisher, &self.topology, batch).await {
            // A refused or unroutable batch, or a lost channel: start again on a fresh connection.
            if let Some((connection, _)) = self.link.take() {
                close(&connection).await;
            }
            return Err(error);
        }
        Ok(())
    }
}

/// A stage's ledger: the handle its handlers record on, and the task that appends to the stream
/// over the ledger's own connection.
pub struct StageLedger {
    pub ledger: Ledger,
    task: Option<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl StageLedger {
    /// Starts `stage`'s ledger as `args` say (off: a ledger that records nothing), registering
    /// `orderflow_ledger_dropped_events_total` in `registry` and showing failures in `readiness`'s
    /// details.
    pub fn start(
        stage: &str,
        args: &LedgerArgs,
        broker: &BrokerArgs,
        connection_name: &str,
        registry: &prometheus::Registry,
        readiness: &crate::admin::Readiness,
    ) -> StageLedger {
        let dropped = crate::ledger::dropped_counter(registry);
        let shutdown = CancellationToken::new();
        if !args.ledger {
            return StageLedger { ledger: Ledger::off(dropped), task: None, shutdown };
        }
        let topology = Topology::new(broker.ns.clone()).with_ledger(args);
        let options = Options { readiness: Some(readiness.clone()), ..Options::new(stage, crate::replica::name()) };
        let (ledger, drain) = Ledger::new(&options, dropped);
        let mut sink = BrokerSink::new(broker.clone(), connection_name, topology);
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            crate::ledger::run(drain, &mut sink, options, token).await;
            sink.close().await;
        });
        StageLedger { ledger, task: Some(task), shutdown }
    }

    /// After the stage settled its last delivery: appends what is left (bounded, see
    /// `crate::ledger::FINAL_FLUSH`) and closes the ledger's connection.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let bound = crate::ledger::FINAL_FLUSH * 2 + CONNECT_TIMEOUT;
            if tokio::time::timeout(bound, task).await.is_err() {
                tracing::warn!(message = "The ledger did not stop in time.");
            }
        }
    }
}

/// How long a read waits for the next message before it gives up on reaching its end marker
/// (the read is then reported incomplete).
const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Credit a ledger reader gives the stream (messages in flight to it: batches of up to 250 KB).
pub const READ_PREFETCH: u16 = 200;

/// Credit an index reader gives its stream: entries are small (a few KB), and a read of a full
/// index is tens of thousands of them.
pub const INDEX_PREFETCH: u16 = 2_000;

/// How long a read waits for its marker to be confirmed (a broker alarm blocks it meanwhile).
const MARKER_TIMEOUT: Duration = Duration::from_secs(30);

/// What a reader does after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    Stop,
}

/// Publishes a read's end marker (confirmed) through `exchange` into its stream and returns the
/// marker's message id: a read that began before it ends exactly where the marker comes back,
/// whatever the stages' clocks say.
pub async fn mark(connection: &Connection, exchange: &str, stream: &str) -> anyhow::Result<String> {
    let marker = format!("ledger-read:{}:{}", crate::messages::now_ms(), fastrand::u64(..));
    let publisher = Publisher::open(connection).await?;
    let body = br#"{"schema":"orderflow.ledger.read-marker.v1"}"#;
    let marking = publisher.publish(exchange, "", body, json_properties(&marker, FieldTable::default()));
    let marked = tokio::time::timeout(MARKER_TIMEOUT, marking).await;
    close_channel(publisher.channel(), "marked").await;
    match marked {
        Err(_) => anyhow::bail!(
            "{stream} cannot be read: the broker did not take the read's marker within {MARKER_TIMEOUT:?} (a resource alarm blocks publishing?)"
        ),
        Ok(Err(e)) => anyhow::bail!(
            "{stream} cannot be read: {e} (is LEDGER on and the stream declared? a reader needs write on the exchange {exchange} for its end marker)"
        ),
        Ok(Ok(())) => Ok(marker),
    }
}

/// Reads `stream` from `start` (seconds since the epoch; the broker attaches at a chunk boundary
/// near it, so a few earlier messages may come too) until `marker` comes back (`complete`),
/// `each` says stop, or nothing comes for [`IDLE_LIMIT`]; `each` gets every other message's id
/// and body. `prefetch` is the credit given the stream.
pub async fn consume(
    connection: &Connection,
    stream: &str,
    start: i64,
    marker: &str,
    prefetch: u16,
    mut each: impl FnMut(&str, &[u8]) -> Flow,
) -> anyhow::Result<ReadSummary> {
    let channel: Channel = connection.create_channel().await?;
    // A stream consumer must have a prefetch, and acks move its credit along.
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut arguments = FieldTable::default();
    // Never past now: a read from the future would start after its own marker.
    let start = start.clamp(0, crate::messages::now_ms() / 1000);
    arguments.insert(ShortString::from("x-stream-offset"), AMQPValue::Timestamp(start as u64));
    let consumer =
        match channel.basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), arguments).await {
            Ok(consumer) => consumer,
            Err(error) => {
                close_channel(&channel, "read").await;
                return Err(error.into());
            }
        };
    let mut summary = ReadSummary::default();
    // The channel is cancelled and closed however the read ends.
    let outcome = read_until(&channel, consumer.clone(), marker, prefetch, &mut summary, &mut each).await;
    let _ = super::connect::cancel(&channel, consumer.tag().as_str()).await;
    close_channel(&channel, "read").await;
    outcome.map(|()| summary)
}

async fn read_until(
    channel: &Channel,
    mut consumer: lapin::Consumer,
    marker: &str,
    prefetch: u16,
    summary: &mut ReadSummary,
    each: &mut impl FnMut(&str, &[u8]) -> Flow,
) -> anyhow::Result<()> {
    loop {
        let delivery = match tokio::time::timeout(IDLE_LIMIT, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(delivery)) => delivery?,
        };
        summary.bytes += delivery.data.len() as u64;
        let id = super::headers::message_id(&delivery.properties);
        let ours = id == marker;
        let flow = if ours {
            Flow::Stop
        } else {
            summary.messages += 1;
            each(&id, &delivery.data)
        };
        // One ack for everything up to here, every few hundred messages and at the end.
        if flow == Flow::Stop || delivery.delivery_tag % u64::from(prefetch / 2).max(1) == 0 {
            channel.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true }).await?;
        }
        if ours {
            summary.complete = true;
        }
        if flow == Flow::Stop {
            break;
        }
    }
    Ok(())
}

/// Reads the ledger stream from `since` (seconds since the epoch; callers filter by `at`) up to
/// everything appended before the read began (its own marker), handing each message body to
/// `each` (which decides whether to parse it) and each ledger batch parsed to `batch`. Messages
/// that are not ledger batches are skipped and counted.
pub async fn read(
    connection: &Connection,
    topology: &Topology,
    since: i64,
    mut each: impl FnMut(&[u8]) -> Option<ReadBatch>,
    mut batch: impl FnMut(ReadBatch),
) -> anyhow::Result<ReadSummary> {
    let stream = topology.ledger_stream();
    let marker = mark(connection, &topology.ledger_exchange(), &format!("the ledger {stream}")).await?;
    let (mut batches, mut other) = (0, 0);
    let mut summary = consume(connection, &stream, since, &marker, READ_PREFETCH, |_, body| {
        if let Some(read) = each(body) {
            if read.schema == LEDGER_SCHEMA {
                batches += 1;
                batch(read);
            } else {
                other += 1;
            }
        }
        Flow::Go
    })
    .await?;
    (summary.batches, summary.other) = (batches, other);
    Ok(summary)
}

/// Parses a ledger message body; `None` when it is not one (another reader's marker, junk).
pub fn parse(body: &[u8]) -> Option<ReadBatch> {
    serde_json::from_slice::<ReadBatch>(body).ok()
}

/// What a [`read`] went through.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ReadSummary {
    /// Stream messages read (markers included).
    pub messages: u64,
    pub bytes: u64,
    /// Ledger batches parsed and handed on.
    pub batches: u64,
    /// Messages parsed that were not ledger batches (skipped).
    pub other: u64,
    /// The read reached its own marker: it saw everything appended before it began. `false` when
    /// the stream went quiet for [`IDLE_LIMIT`] first (a stream the broker cannot serve).
    pub complete: bool,
}

/// Reads every event since `since` (seconds since the epoch) from batches that contain one of
/// `needles` (raw bytes, e.g. `"12345"` for an id as JSON writes it; none: every batch), handing
/// each event with its batch's stage and replica to `each`. Batches without a needle are skipped
/// unparsed: a reader looking for one order parses next to nothing.
pub async fn read_events(
    connection: &Connection,
    topology: &Topology,
    since: i64,
    needles: &[Vec<u8>],
    mut each: impl FnMut(&str, &str, crate::ledger::Event),
) -> anyhow::Result<ReadSummary> {
    let finders: Vec<memchr::memmem::Finder<'_>> = needles.iter().map(memchr::memmem::Finder::new).collect();
    let wanted = |body: &[u8]| {
        if finders.is_empty() || finders.iter().any(|f| f.find(body).is_some()) { parse(body) } else { None }
    };
    read(connection, topology, since, wanted, |batch| {
        let (stage, replica, events) = batch.known();
        for event in events {
            each(&stage, &replica, event);
        }
    })
    .await
}

/// How an id is written inside a ledger batch (a JSON string), for [`read_events`]'s needles.
pub fn needle(id: &str) -> Vec<u8> {
    serde_json::to_vec(id).unwrap_or_default()
}
