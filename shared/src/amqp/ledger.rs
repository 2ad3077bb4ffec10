//! The ledger stream on the broker: appending batches (with confirms) and reading them back from a
//! point in time (what `orderflow trace` and the audit read). The batching and the event format are
//! `crate::ledger`.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{
    headers::json_properties,
    publisher::Publisher,
    topology::{QueueSpec, declare_queue},
};
use crate::ledger::{Batch, LEDGER_SCHEMA, Sink};

/// Appends batches to the ledger stream through a confirmed publisher.
pub struct StreamSink {
    publisher: Publisher,
    stream: String,
}

impl StreamSink {
    pub fn new(publisher: Publisher, stream: String) -> StreamSink {
        StreamSink { publisher, stream }
    }
}

impl Sink for StreamSink {
    async fn append(&mut self, body: Vec<u8>) -> anyhow::Result<()> {
        let id = format!("ledger:{}", crate::messages::now_ms());
        self.publisher.publish("", &self.stream, &body, json_properties(&id, FieldTable::default())).await?;
        Ok(())
    }
}

/// Declares the ledger stream (idempotent: the same arguments each time).
pub async fn declare(channel: &Channel, spec: &QueueSpec) -> Result<(), lapin::Error> {
    declare_queue(channel, spec).await.map(|_| ())
}

/// How long a read waits for the next message before it gives up on reaching its end marker
/// (the read is then reported incomplete).
const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Reads the ledger `stream` from `since` (seconds since the epoch; the broker starts at the
/// first chunk at or before it, so a few earlier batches may come too: callers filter by `at`) up
/// to everything appended before the read began, handing each batch to `each`. "Before the read
/// began" is exact: the read first appends a marker of its own (confirmed) and ends when that
/// marker comes back, whatever the stages' clocks say. Messages that are not ledger batches
/// (other readers' markers) are skipped and counted.
pub async fn read(
    connection: &Connection,
    stream: &str,
    since: i64,
    mut each: impl FnMut(Batch),
) -> anyhow::Result<ReadSummary> {
    let marker = format!("ledger-read:{}:{}", crate::messages::now_ms(), fastrand::u64(..));
    let publisher = Publisher::open(connection).await?;
    let body = br#"{"schema":"orderflow.ledger.read-marker.v1"}"#;
    publisher.publish("", stream, body, json_properties(&marker, FieldTable::default())).await?;
    super::connect::close_channel(publisher.channel(), "marked").await;

    let channel = connection.create_channel().await?;
    // A stream consumer must have a prefetch, and acks move its credit along.
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut arguments = FieldTable::default();
    // Never past now: a read from the future would start after its own marker.
    let since = since.clamp(0, crate::messages::now_ms() / 1000);
    arguments.insert(ShortString::from("x-stream-offset"), AMQPValue::Timestamp(since as u64));
    let mut consumer =
        channel.basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), arguments).await?;
    let mut summary = ReadSummary::default();
    loop {
        let delivery = match tokio::time::timeout(IDLE_LIMIT, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(delivery)) => delivery?,
        };
        // One ack for everything up to here, every few hundred messages and at the end.
        let ours = super::headers::message_id(&delivery.properties) == marker;
        if ours || delivery.delivery_tag % 200 == 0 {
            channel.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true }).await?;
        }
        if ours {
            summary.complete = true;
            break;
        }
        match serde_json::from_slice::<Batch>(&delivery.data) {
            Ok(batch) if batch.schema == LEDGER_SCHEMA => {
                summary.batches += 1;
                each(batch);
            }
            _ => summary.other += 1,
        }
    }
    let _ = super::connect::cancel(&channel, consumer.tag().as_str()).await;
    super::connect::close_channel(&channel, "read").await;
    Ok(summary)
}

/// What a [`read`] went through.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    pub batches: u64,
    /// Messages that were not ledger batches (skipped).
    pub other: u64,
    /// The read reached its own marker: it saw everything appended before it began. `false` when
    /// the stream went quiet for [`IDLE_LIMIT`] first (a stream the broker cannot serve).
    pub complete: bool,
}
