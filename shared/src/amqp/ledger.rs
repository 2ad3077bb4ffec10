//! The ledger stream on the broker: appending batches (with confirms) and reading them back from a
//! point in time (what `orderflow trace` and the audit read). The batching and the event format are
//! `crate::ledger`.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
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

/// How long a read waits for the next message before it calls the stream read to its end.
const IDLE_END: Duration = Duration::from_secs(1);

/// Reads the ledger `stream` from `since` (seconds since the epoch; the broker starts at the first
/// chunk at or before it, so a few earlier batches may come too) up to what was published before
/// the read began, handing each batch to `each`. Messages that are not ledger batches are skipped
/// and counted in the result.
pub async fn read(
    connection: &Connection,
    stream: &str,
    since: i64,
    mut each: impl FnMut(Batch),
) -> anyhow::Result<ReadSummary> {
    let started = jiff::Timestamp::now().as_second();
    let channel = connection.create_channel().await?;
    // A stream consumer must have a prefetch, and acks move its credit along.
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-stream-offset"), AMQPValue::Timestamp(since.max(0) as u64));
    let mut consumer =
        channel.basic_consume(stream.into(), "".into(), BasicConsumeOptions::default(), arguments).await?;
    let mut summary = ReadSummary::default();
    loop {
        let delivery = match tokio::time::timeout(IDLE_END, consumer.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(delivery)) => delivery?,
        };
        channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?;
        let published = delivery.properties.timestamp().map(|t| t as i64);
        match serde_json::from_slice::<Batch>(&delivery.data) {
            Ok(batch) if batch.schema == LEDGER_SCHEMA => {
                summary.batches += 1;
                each(batch);
            }
            _ => summary.unreadable += 1,
        }
        // Live stages keep appending: stop at the first batch published after the read began.
        if published.is_some_and(|at| at > started) {
            break;
        }
    }
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    super::connect::close_channel(&channel, "read").await;
    Ok(summary)
}

/// What a [`read`] went through.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    pub batches: u64,
    /// Messages that were not ledger batches (skipped).
    pub unreadable: u64,
}
