//! The raw relay, `orderflow bench e2e`'s baseline: plain lapin moving pages and records of the
//! pipeline's sizes through the same two hops with the same durability (quorum queues, persistent,
//! publisher confirms, manual acks) and no project logic. It measures the broker itself, so it is
//! the one place outside `shared/src/amqp` that calls lapin (through `orderflow_shared`'s
//! re-export, one lapin version).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesUnordered};
use orderflow_shared::{
    amqp::lapin::{
        BasicProperties, Channel, Connection, Consumer,
        message::Delivery,
        options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions},
        types::{AMQPValue, FieldTable},
    },
    messages::PAGE_SCHEMA,
    settings::BrokerArgs,
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinSet};

use crate::e2e::{broker_pid, cpu_of, round};

#[derive(Debug, Clone, Serialize)]
pub struct RelayResult {
    pub pages: u64,
    pub records: u64,
    pub page_bytes: usize,
    pub record_bytes: usize,
    pub seconds: f64,
    pub records_per_sec: f64,
    /// CPU of the broker (a local `beam.smp`, when one is found) and of the relay's own process
    /// during the relay.
    pub broker_cpu_seconds: Option<f64>,
    pub relay_cpu_seconds: f64,
}

/// A page as the fetcher publishes it (50 orders from jst-sim's generator) and the records the
/// default mapping makes of it: the relay moves messages of exactly these sizes.
pub fn sample_messages() -> anyhow::Result<(Vec<u8>, Vec<Vec<u8>>)> {
    use jst_sim::store::{Credentials, Merchant};
    let creds = Credentials::placeholder();
    let now = jiff::Timestamp::now();
    let merchant = Merchant::seed("m1".into(), 0, creds, 50, 7, now, jiff::SignedDuration::from_hours(24));
    let orders: Vec<Value> = (0..merchant.len()).filter_map(|i| merchant.order(i)).map(|o| o.render()).collect();
    let page = json!({
        "schema": PAGE_SCHEMA, "account": "m1", "cursor": {"start_ts": 123_456_789},
        "fetched_at": orderflow_shared::time::rfc3339_china(now), "orders": orders,
    });
    let body = serde_json::to_vec(&page)?;
    let mapping = transformer::mapping::Mapping::default_jushuitan();
    let records = match transformer::page::transform_page(&mapping, &body) {
        transformer::page::PageOutcome::Transformed(t) => {
            t.records.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?
        }
        transformer::page::PageOutcome::Poison { reason, detail } => {
            anyhow::bail!("sample page rejected: {reason}: {detail}")
        }
    };
    anyhow::ensure!(!records.is_empty(), "the sample page made no records");
    Ok((body, records))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into())
}

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions { mandatory: true, ..Default::default() }
}

async fn connect(broker: &BrokerArgs) -> anyhow::Result<Connection> {
    Ok(orderflow_shared::amqp::connect(broker, "orderflow-bench-relay").await?)
}

/// A consumer of `queue` with `prefetch` on a new channel of `connection`.
async fn consumer(connection: &Connection, queue: &str, prefetch: u16) -> anyhow::Result<Consumer> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    Ok(channel.basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?)
}

/// A new channel of `connection` in confirm mode.
async fn confirming(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(Default::default()).await?;
    Ok(channel)
}

/// The run's two quorum queues: pages, then records.
struct Queues {
    pages: String,
    records: String,
}

/// Plain lapin, no project code: a producer publishes `pages` pages to a quorum queue (confirms,
/// up to 256 unconfirmed, as the fetcher allows); `replicas` relays each consume pages (prefetch
/// 16, as the transformer), publish `records_per_page` records per page to a second quorum queue,
/// wait for their confirms and ack the page; `replicas` sinks ack every record (prefetch 64, as the
/// writer). Returns records/s from the first publish to the last record acked.
pub async fn relay(
    broker: &BrokerArgs,
    pages: u64,
    records_per_page: usize,
    replicas: u32,
) -> anyhow::Result<RelayResult> {
    let (page_body, record_bodies) = sample_messages()?;
    let record_body = record_bodies[0].clone();
    let ns = format!("bench-relay-{}", jiff::Timestamp::now().as_millisecond());
    let queues = Queues { pages: format!("{ns}.pages"), records: format!("{ns}.records") };
    let admin = connect(broker).await?;
    let channel = admin.create_channel().await?;
    for q in [&queues.pages, &queues.records] {
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(q.as_str().into(), options, quorum()).await?;
    }
    let total_records = pages * records_per_page as u64;
    let (done_tx, done_rx) = mpsc::unbounded_channel::<u64>();
    let mut tasks = JoinSet::new();
    let mut connections = Vec::new();
    for _ in 0..replicas {
        connections.push(start_relay(broker, &queues, record_body.clone(), records_per_page, &mut tasks).await?);
        connections.push(start_sink(broker, &queues.records, done_tx.clone(), &mut tasks).await?);
    }
    let broker_process = broker_pid();
    let (broker_cpu_at_start, own_cpu_at_start) = (cpu_of(broker_process), cpu_of(Some(std::process::id())));
    let started = Instant::now();
    let producer = tokio::spawn(produce(confirming(&admin).await?, queues.pages.clone(), page_body.clone(), pages));
    wait_for_records(done_rx, total_records, started).await?;
    let seconds = started.elapsed().as_secs_f64();
    let broker_cpu = broker_process.map(|_| round(cpu_of(broker_process) - broker_cpu_at_start, 2));
    let relay_cpu = round(cpu_of(Some(std::process::id())) - own_cpu_at_start, 2);
    producer.await??;
    tasks.abort_all();
    // Bounded: a close or delete the broker never answers must not hold the benchmark.
    tokio::time::timeout(Duration::from_secs(60), clean_up(admin, connections, &queues))
        .await
        .map_err(|_| anyhow::anyhow!("cleaning up the raw relay's queues took over 60 s"))??;
    Ok(RelayResult {
        pages,
        records: total_records,
        page_bytes: page_body.len(),
        record_bytes: record_body.len(),
        seconds: round(seconds, 2),
        records_per_sec: round(total_records as f64 / seconds, 0),
        broker_cpu_seconds: broker_cpu,
        relay_cpu_seconds: relay_cpu,
    })
}

/// One relay replica on a connection of its own: consumes pages (prefetch 16), publishes
/// `records_per_page` records for each and acks the page once they are confirmed.
async fn start_relay(
    broker: &BrokerArgs,
    queues: &Queues,
    record_body: Vec<u8>,
    records_per_page: usize,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Connection> {
    let connection = connect(broker).await?;
    let publish = confirming(&connection).await?;
    let mut consumer = consumer(&connection, &queues.pages, 16).await?;
    let records_queue = queues.records.clone();
    tasks.spawn(async move {
        let mut inflight = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(result) = inflight.next(), if !inflight.is_empty() => { let _: () = result?; }
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else { break };
                    let (publish, queue, body) = (publish.clone(), records_queue.clone(), record_body.clone());
                    inflight.push(relay_page(publish, queue, body, records_per_page, delivery?));
                }
            }
        }
        anyhow::Ok(())
    });
    Ok(connection)
}

/// Publishes a page's records, waits for their confirms, then acks the page.
async fn relay_page(
    publish: Channel,
    queue: String,
    body: Vec<u8>,
    records: usize,
    page: Delivery,
) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(records);
    for _ in 0..records {
        confirms.push(publish.basic_publish("".into(), queue.as_str().into(), mandatory(), &body, persistent()).await?);
    }
    for c in confirms {
        anyhow::ensure!(c.await?.is_ack(), "record nacked");
    }
    page.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// One sink on a connection of its own: acks every record (prefetch 64) and counts it on `done`.
async fn start_sink(
    broker: &BrokerArgs,
    queue: &str,
    done: mpsc::UnboundedSender<u64>,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Connection> {
    let connection = connect(broker).await?;
    let mut consumer = consumer(&connection, queue, 64).await?;
    tasks.spawn(async move {
        while let Some(delivery) = consumer.next().await {
            delivery?.ack(BasicAckOptions::default()).await?;
            let _ = done.send(1);
        }
        anyhow::Ok(())
    });
    Ok(connection)
}

/// Publishes `pages` pages with up to 256 unconfirmed.
async fn produce(publish: Channel, queue: String, body: Vec<u8>, pages: u64) -> anyhow::Result<()> {
    let mut confirms = FuturesUnordered::new();
    for _ in 0..pages {
        confirms.push(publish.basic_publish("".into(), queue.as_str().into(), mandatory(), &body, persistent()).await?);
        while confirms.len() >= 256 {
            anyhow::ensure!(confirms.next().await.context("confirm")??.is_ack(), "page nacked");
        }
    }
    while let Some(c) = confirms.next().await {
        anyhow::ensure!(c?.is_ack(), "page nacked");
    }
    Ok(())
}

/// Waits until the sinks have acked `total` records; fails when they stall for a minute or the
/// run takes over an hour.
async fn wait_for_records(mut done: mpsc::UnboundedReceiver<u64>, total: u64, started: Instant) -> anyhow::Result<()> {
    let mut received = 0u64;
    let deadline = started + Duration::from_secs(3600);
    while received < total {
        match tokio::time::timeout(Duration::from_secs(60), done.recv()).await {
            Ok(Some(n)) => received += n,
            _ => anyhow::bail!("the raw relay stalled at {received} of {total} records"),
        }
        anyhow::ensure!(Instant::now() < deadline, "the raw relay took over an hour");
    }
    Ok(())
}

/// Closes the relays' and sinks' connections, deletes the run's queues, closes `admin`.
async fn clean_up(admin: Connection, connections: Vec<Connection>, queues: &Queues) -> anyhow::Result<()> {
    for c in connections {
        orderflow_shared::amqp::connect::close(&c).await;
    }
    let channel = admin.create_channel().await?;
    for q in [&queues.pages, &queues.records] {
        let _ = channel.queue_delete(q.as_str().into(), Default::default()).await;
    }
    orderflow_shared::amqp::connect::close(&admin).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_messages_have_the_pipeline_shapes() {
        let (page, records) = sample_messages().expect("sample");
        let page: Value = serde_json::from_slice(&page).expect("json");
        assert_eq!(page["orders"].as_array().map(Vec::len), Some(50));
        assert!(!records.is_empty() && records.len() <= 50);
    }
}
