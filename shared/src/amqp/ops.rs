//! What the operator CLI and the lab need from the broker besides the stages' paths: a queue's
//! depth and consumers (passive declare), reading messages without removing them (`basic.get`
//! unacked: they go back to their queue when the reader closes) and removing the ones a command
//! acks, declaring or deleting a namespace's topology, and a confirmed [`Publisher`]. The lapin
//! calls stay here; commands see [`Client`], [`Reader`] and [`Taken`].

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Connection,
    options::{BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};

use super::{
    Topology,
    connect::{ConnectError, close_channel, connect},
    headers::{get_i64, get_str, headers_of, set_i64, set_str, strip_broker_death_headers},
    is_not_found,
    publisher::Publisher,
};
use crate::settings::BrokerArgs;

/// A queue's depth and consumers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueState {
    pub name: String,
    pub messages: u32,
    pub consumers: u32,
}

/// A broker connection for an operator command or the lab.
pub struct Client {
    connection: Connection,
}

impl Client {
    /// Connects as `broker` says, under a connection name shown in the management UI.
    pub async fn connect(broker: &BrokerArgs, name: &str) -> Result<Client, ConnectError> {
        Ok(Client { connection: connect(broker, name).await? })
    }

    /// The connection itself (for a publisher or a channel of a test's own).
    pub fn connection(&self) -> &lapin::Connection {
        &self.connection
    }

    /// Closes the connection (waiting at most `CLOSE_TIMEOUT`); whatever was taken and not acked
    /// goes back to its queue. A failure to close leaves nothing to do, so it is not reported.
    pub async fn close(&self) {
        super::connect::close(&self.connection).await;
    }

    /// Depth and consumers of a queue; `None` when it does not exist.
    pub async fn queue_state(&self, name: &str) -> anyhow::Result<Option<QueueState>> {
        let channel = self.connection.create_channel().await?;
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let state = match channel.queue_declare(name.into(), options, FieldTable::default()).await {
            Ok(q) => {
                Some(QueueState { name: name.to_string(), messages: q.message_count(), consumers: q.consumer_count() })
            }
            // The broker closed the channel with the 404.
            Err(error) if is_not_found(&error) => None,
            Err(error) => return Err(error.into()),
        };
        close_channel(&channel, "done").await;
        Ok(state)
    }

    /// Declares every exchange, queue and binding of `topology` (idempotent), the ledger too
    /// when it is on.
    pub async fn declare(&self, topology: &Topology) -> anyhow::Result<()> {
        let channel = self.connection.create_channel().await?;
        topology.declare(&channel).await?;
        close_channel(&channel, "done").await;
        super::ledger::declare(&self.connection, topology).await?;
        Ok(())
    }

    /// Deletes every queue and exchange of a namespace: work, dead and retry queues, the fetch
    /// replicas queue, and the fetch job queues of `accounts` (and their pre-upgrade names). What is
    /// not there is skipped.
    pub async fn delete_namespace(&self, topology: &Topology, accounts: &[String]) -> anyhow::Result<()> {
        let mut queues = topology.queue_names();
        queues.push(topology.fetch_replicas_queue());
        // Whether the ledger is on now or not: a namespace's stream stays on disk until deleted.
        queues.push(topology.ledger_stream());
        queues.push(topology.ledger_index_stream());
        for account in accounts {
            queues.push(topology.fetch_queue(account));
            queues.push(topology.legacy_fetch_queue(account));
        }
        let mut channel = self.connection.create_channel().await?;
        for queue in queues {
            channel = self.usable(channel).await?;
            let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
        }
        let exchanges = topology
            .exchanges()
            .into_iter()
            .map(|e| e.name)
            .chain([topology.ledger_exchange(), topology.ledger_index_exchange()]);
        for exchange in exchanges {
            channel = self.usable(channel).await?;
            let _ = channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        close_channel(&channel, "done").await;
        Ok(())
    }

    /// A confirmed publisher on a channel of its own.
    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        Ok(Publisher::open(&self.connection).await?)
    }

    /// A reader on a channel of its own.
    pub async fn reader(&self) -> anyhow::Result<Reader> {
        Ok(Reader { channel: self.connection.create_channel().await? })
    }

    /// `channel`, or a new one when the broker closed it (a failed delete closes its channel).
    async fn usable(&self, channel: Channel) -> anyhow::Result<Channel> {
        if channel.status().connected() { Ok(channel) } else { Ok(self.connection.create_channel().await?) }
    }
}

/// A queue of this connection's own (exclusive, server-named, gone with the connection) where
/// answers to a request come: `orderflow audit` asks the fetcher that holds an account.
pub struct Replies {
    channel: Channel,
    consumer: lapin::Consumer,
    queue: String,
}

impl Client {
    /// Declares a reply queue and starts consuming it.
    pub async fn replies(&self) -> anyhow::Result<Replies> {
        let channel = self.connection.create_channel().await?;
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let queue = channel.queue_declare("".into(), options, FieldTable::default()).await?.name().to_string();
        let consume = lapin::options::BasicConsumeOptions { no_ack: true, ..Default::default() };
        let consumer = channel.basic_consume(queue.as_str().into(), "".into(), consume, FieldTable::default()).await?;
        Ok(Replies { channel, consumer, queue })
    }

    /// Publishes a request of AMQP type `kind` into `queue` (through the default exchange,
    /// confirmed, mandatory: a queue that does not exist is an error) with its answers going to
    /// `reply_to`.
    pub async fn request(&self, queue: &str, kind: &str, id: &str, body: &[u8], reply_to: &str) -> anyhow::Result<()> {
        let publisher = self.publisher().await?;
        let props = super::headers::json_properties(id, FieldTable::default())
            .with_type(kind.into())
            .with_reply_to(reply_to.into())
            .with_correlation_id(id.into());
        let sent = publisher.publish("", queue, body, props).await;
        close_publisher(&publisher).await;
        match sent {
            Err(super::PublishError::Returned(why)) => anyhow::bail!("no queue {queue} ({why})"),
            other => Ok(other?),
        }
    }
}

impl Replies {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next answer's body, or `None` after `timeout` without one.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        use futures_util::StreamExt;
        match tokio::time::timeout(timeout, self.consumer.next()).await {
            Err(_) => Ok(None),
            Ok(Some(delivery)) => Ok(Some(delivery?.data)),
            Ok(None) => anyhow::bail!("the broker cancelled the reply queue's consumer"),
        }
    }

    pub async fn close(self) {
        close_channel(&self.channel, "done").await;
    }
}

/// Whether the pipeline's queues (pages, records, the topology's retry tiers) hold messages now,
/// by passive declares on `connection` (a queue that does not exist holds nothing). An audit
/// counts an order without an outcome as in flight while they do.
pub async fn pipeline_busy(connection: &Connection, topology: &Topology) -> anyhow::Result<bool> {
    let mut queues = vec![topology.pages_queue(), topology.records_queue()];
    queues.extend(topology.retry_tiers.iter().map(|t| topology.retry_queue(*t)));
    let mut channel = connection.create_channel().await?;
    let mut busy = false;
    for queue in queues {
        if !channel.status().connected() {
            channel = connection.create_channel().await?;
        }
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        match channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await {
            Ok(q) if q.message_count() > 0 => {
                busy = true;
                break;
            }
            Ok(_) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(error.into()),
        }
    }
    close_channel(&channel, "done").await;
    Ok(busy)
}

/// Closes a publisher's channel (its connection stays open).
pub async fn close_publisher(publisher: &Publisher) {
    close_channel(publisher.channel(), "done").await;
}

/// Takes messages from queues without removing them: a message is removed only when acked
/// ([`Reader::ack`]); every other one goes back to its queue when the reader closes (or its
/// connection does).
pub struct Reader {
    channel: Channel,
}

impl Reader {
    /// The next message of `queue`, or `None` when it is empty.
    pub async fn take(&self, queue: &str) -> anyhow::Result<Option<Taken>> {
        let got = self.channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await?;
        Ok(got.map(|m| Taken {
            tag: m.delivery.delivery_tag,
            body: m.delivery.data,
            properties: m.delivery.properties,
        }))
    }

    /// Up to `max` messages of `queue` (fewer when it holds fewer).
    pub async fn take_up_to(&self, queue: &str, max: usize) -> anyhow::Result<Vec<Taken>> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.take(queue).await? {
                Some(m) => out.push(m),
                None => break,
            }
        }
        Ok(out)
    }

    /// Removes a taken message from its queue for good.
    pub async fn ack(&self, tag: u64) -> anyhow::Result<()> {
        Ok(self.channel.basic_ack(tag, BasicAckOptions::default()).await?)
    }

    /// Gives back every message taken and not acked.
    pub async fn close(self) {
        close_channel(&self.channel, "done").await;
    }
}

/// A message taken from a queue.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The delivery tag on the reader's channel.
    pub tag: u64,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

impl Taken {
    pub fn message_id(&self) -> String {
        super::headers::message_id(&self.properties)
    }

    /// A header as text (numbers rendered as text).
    pub fn header_str(&self, key: &str) -> Option<String> {
        get_str(&self.properties, key)
    }

    /// A header as an integer, whatever width the publisher used.
    pub fn header_i64(&self, key: &str) -> Option<i64> {
        get_i64(&self.properties, key)
    }

    /// A copy to publish again (same id and body): the broker's death headers and the headers in
    /// `drop` removed, then `ints` and `texts` set.
    pub fn republished(&self, drop: &[&str], ints: &[(&str, i64)], texts: &[(&str, &str)]) -> Taken {
        let mut headers = FieldTable::default();
        for (key, value) in strip_broker_death_headers(&headers_of(&self.properties)).inner() {
            if !drop.contains(&key.as_str()) {
                headers.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in ints {
            set_i64(&mut headers, key, *value);
        }
        for (key, value) in texts {
            set_str(&mut headers, key, value);
        }
        Taken { properties: self.properties.clone().with_headers(headers), ..self.clone() }
    }
}

/// Parses a `RETRY_TIERS` value (`1s,10s,1m`) as operator tools take it.
pub fn parse_retry_tiers(tiers: &str) -> anyhow::Result<Vec<Duration>> {
    tiers
        .split(',')
        .map(|t| crate::settings::parse_duration(t.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("RETRY_TIERS: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::{get, json_properties};

    #[test]
    fn a_republished_message_keeps_its_id_and_other_headers_and_loses_the_dropped_ones() {
        let mut h = FieldTable::default();
        set_str(&mut h, "x-reason", "gone");
        set_str(&mut h, "x-first-death-queue", "q");
        set_str(&mut h, "traceparent", "00-abc-def-01");
        set_i64(&mut h, "x-attempt", 5);
        let taken = Taken { tag: 1, body: Vec::new(), properties: json_properties("acme:1", h) };
        let again = taken.republished(&["x-reason"], &[("x-attempt", 0)], &[("x-last", "gone")]);
        let props = &again.properties;
        assert!(get(props, "x-reason").is_none() && get(props, "x-first-death-queue").is_none());
        assert_eq!(again.header_i64("x-attempt"), Some(0));
        assert_eq!(again.header_str("x-last").as_deref(), Some("gone"));
        assert_eq!(again.header_str("traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(again.message_id(), "acme:1");
    }

    #[test]
    fn retry_tiers_parse_or_name_the_setting() {
        assert_eq!(
            parse_retry_tiers("200ms, 1s").expect("parses"),
            [Duration::from_millis(200), Duration::from_secs(1)]
        );
        assert!(parse_retry_tiers("1s,soon").expect_err("fails").to_string().contains("RETRY_TIERS"));
    }
}
