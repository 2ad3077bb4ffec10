//! Account ownership kept by the broker, without polling: each account's job queue is a quorum
//! queue with a **single active consumer**. Every fetcher replica consumes every account's job
//! queue, all on one channel per replica (the [`Owner`] channel); the broker delivers the job only
//! to the queue's active consumer, so the replica holding the job's delivery owns the account, and
//! when that replica's channel dies the broker returns the job and activates the next consumer at
//! once (failover without retries, no lock queue, no per-account channel).
//!
//! The job message is the account's checkpoint and stays in the broker: the owner holds it unacked
//! while it fetches; a commit publishes the next job (confirmed, on the ownership channel itself)
//! into the same queue — it comes back to the owner, still the active consumer — and only then acks
//! what it replaces. A replica whose owner channel died (a stale owner: the job went back and
//! another replica may hold it now) can neither publish nor ack there, so its commits fail, its
//! reads are undone and the newest job (highest rank) wins.
//!
//! Handing an account over ([`Lease::release`]) cancels this replica's consumer and returns the job
//! to the queue: the next waiting consumer becomes active and receives it. A replica subscribes
//! again later ([`Lease::subscribe`]) and waits at the back of the line.
//!
//! Replicas count each other through a presence queue each one consumes (without messages):
//! see [`Presence`].
//!
//! The job itself is the caller's: this module moves bytes ranked by the caller (the fetcher's
//! `lease.rs` reads and writes its `Job`, ranked by `seq`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};

use super::{
    Publisher, Topology,
    headers::json_properties,
    is_resource_locked, soft_error,
    topology::{declare_queue, fetch_job_queue, plain_quorum_queue},
};

/// A broker connection.
pub type Connection = lapin::Connection;
/// A failed broker operation.
pub type Error = lapin::Error;

/// Job messages one consumer may hold unacked (a queue normally holds one; more only after a
/// crash between a commit's publish and its ack).
const PREFETCH: u16 = 16;
/// Job messages read at most from a queue kept by an older version.
const MAX_LEGACY: usize = 1000;
/// How long a commit waits for its job to come back before going on (it is acked later).
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// Ranks a job message: higher is newer; `None` is not a job of this account (dropped).
pub type Rank = Box<dyn Fn(&[u8]) -> Option<u64> + Send + Sync>;

/// This replica's ownership channel for one broker session: every account's job consumer lives on
/// it, so an account costs no channel of its own. Cheap to clone.
#[derive(Clone)]
pub struct Owner {
    channel: Channel,
    /// Confirmed publishes on the ownership channel itself: a replica whose ownership channel the
    /// broker closed (its jobs returned, maybe held by another replica now) cannot commit at all.
    commits: Publisher,
    /// Where job queues of older versions are looked for (a failed probe closes it: reopened).
    probe: Arc<tokio::sync::Mutex<Option<Channel>>>,
}

impl Owner {
    pub async fn open(connection: &Connection) -> Result<Owner, Error> {
        let channel = connection.create_channel().await?;
        channel.basic_qos(PREFETCH, BasicQosOptions { global: false }).await?;
        let commits = Publisher::on(channel.clone(), connection).await?;
        Ok(Owner { channel, commits, probe: Arc::default() })
    }

    /// The publisher for job commits, on the ownership channel.
    pub fn commits(&self) -> &Publisher {
        &self.commits
    }

    /// Whether a queue named `legacy` exists, asked without an error when it does not (a passive
    /// declare of a missing queue would close a channel and log an error per account on every
    /// new deployment): an exclusive, auto-deleted probe of that name is declared and deleted at
    /// once; only an existing (durable, shared) queue of that name refuses it (406).
    async fn legacy_exists(&self, connection: &Connection, legacy: &str) -> Result<bool, Error> {
        let mut probe = self.probe.lock().await;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            durable: false,
            ..QueueDeclareOptions::default()
        };
        for attempt in 1..=PROBES {
            let channel = match probe.take() {
                Some(channel) if channel.status().connected() => channel,
                _ => connection.create_channel().await?,
            };
            match channel.queue_declare(legacy.into(), options, FieldTable::default()).await {
                Ok(_) => {
                    channel.queue_delete(legacy.into(), QueueDeleteOptions::default()).await?;
                    *probe = Some(channel);
                    return Ok(false);
                }
                // 405 is both "a shared queue of that name" and "another replica's probe of it,
                // for a millisecond": ask again before believing the first.
                Err(error) if is_resource_locked(&error) && attempt < PROBES => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) if soft_error(&error).is_some() => return Ok(true),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}

/// Times a probe for an old job queue is tried (see [`Owner::legacy_exists`]).
const PROBES: u32 = 3;

struct Held {
    tag: u64,
    rank: u64,
    data: Vec<u8>,
    /// When it was delivered (the broker's `consumer_timeout` counts from there).
    at: Instant,
}

/// One account's job queue as this replica sees it: a consumer that waits to be the active one,
/// and the job deliveries it holds while it is.
pub struct Lease {
    channel: Channel,
    queue: String,
    rank: Rank,
    consumer: Option<Consumer>,
    held: Vec<Held>,
}

impl Lease {
    /// Declares the account's job queue and, when it is new (no job ready and no consumer), fills
    /// it: with the newest job an older version left in its job queue (that queue is then
    /// deleted), else with `initial()`. Does not subscribe yet.
    pub async fn open(
        owner: &Owner,
        connection: &Connection,
        publisher: &Publisher,
        topology: &Topology,
        account: &str,
        rank: Rank,
        initial: impl FnOnce() -> (String, Vec<u8>),
    ) -> anyhow::Result<Lease> {
        let queue = topology.fetch_queue(account);
        let declared = declare_queue(&owner.channel, &fetch_job_queue(queue.clone())).await?;
        let lease = Lease { channel: owner.channel.clone(), queue, rank, consumer: None, held: Vec::new() };
        if declared.message_count() == 0 && declared.consumer_count() == 0 {
            let legacy = topology.legacy_fetch_queue(account);
            let migrated = lease.migrate(owner, connection, publisher, &legacy).await?;
            if !migrated {
                let (id, body) = initial();
                lease.publish(publisher, &id, &body).await?;
            }
        }
        Ok(lease)
    }

    /// Moves the newest job of an older version's job queue into this one (confirmed), then
    /// deletes the old queue. `false`: there was no such queue or no job in it.
    async fn migrate(
        &self,
        owner: &Owner,
        connection: &Connection,
        publisher: &Publisher,
        legacy: &str,
    ) -> anyhow::Result<bool> {
        if !owner.legacy_exists(connection, legacy).await? {
            return Ok(false);
        }
        let channel = connection.create_channel().await?;
        let mut newest: Option<(u64, Vec<u8>)> = None;
        let mut read = 0;
        while read < MAX_LEGACY
            && let Some(message) = channel.basic_get(legacy.into(), BasicGetOptions { no_ack: false }).await?
        {
            read += 1;
            let data = message.delivery.data;
            if let Some(rank) = (self.rank)(&data)
                && newest.as_ref().is_none_or(|(best, _)| rank > *best)
            {
                newest = Some((rank, data));
            }
        }
        let Some((rank, body)) = newest else {
            let _ = channel.close(200, "nothing to migrate".into()).await;
            return Ok(false);
        };
        self.publish(publisher, &format!("migrated:{}:{rank}", self.queue), &body).await?;
        // Only a replica that moved the job deletes the old queue (what it read goes with it).
        channel.queue_delete(legacy.into(), QueueDeleteOptions::default()).await?;
        let _ = channel.close(200, "migrated".into()).await;
        tracing::info!(message = "Moved an account's checkpoint from the old job queue.", from = legacy, to = %self.queue);
        Ok(true)
    }

    async fn publish(&self, publisher: &Publisher, id: &str, body: &[u8]) -> anyhow::Result<()> {
        publisher.publish("", &self.queue, body, json_properties(id, FieldTable::default())).await?;
        Ok(())
    }

    /// Joins the line of consumers of the account's job queue (no-op when already in it).
    pub async fn subscribe(&mut self) -> Result<(), Error> {
        if self.consumer.is_none() {
            let consumer = self
                .channel
                .basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.consumer = Some(consumer);
        }
        Ok(())
    }

    /// Waits until the broker makes this replica the account's owner (its consumer receives the
    /// job) and returns the newest job. Cancel-safe: a delivery received is kept.
    pub async fn acquire(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(newest) = self.settle().await? {
                return Ok(newest);
            }
            let delivery = self.next_delivery().await?;
            self.take(delivery).await?;
        }
    }

    /// Publishes `body` (confirmed) as the account's job, waits (briefly) for it to come back to
    /// this consumer, and acks the jobs it replaces.
    pub async fn commit(&mut self, publisher: &Publisher, id: &str, body: &[u8]) -> anyhow::Result<()> {
        let last_tag = self.held.iter().map(|h| h.tag).max().unwrap_or(0);
        self.publish(publisher, id, body).await?;
        let deadline = tokio::time::Instant::now() + ECHO_WAIT;
        while !self.held.iter().any(|h| h.tag > last_tag) {
            match tokio::time::timeout_at(deadline, self.next_delivery()).await {
                Ok(delivery) => self.take(delivery?).await?,
                // Not back yet: it is acked with the next commit.
                Err(_) => break,
            }
        }
        self.settle().await?;
        Ok(())
    }

    /// How long the oldest job delivery held has been unacked (`None` when none is).
    pub fn held_for(&self) -> Option<Duration> {
        self.held.iter().map(|h| h.at.elapsed()).max()
    }

    /// Gives the account up: stops consuming and returns the jobs held to the queue, where the
    /// next waiting consumer (another replica) receives them.
    pub async fn release(&mut self) -> Result<(), Error> {
        if let Some(mut consumer) = self.consumer.take() {
            self.channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await?;
            // Deliveries that crossed the cancel are ours to return too.
            while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                self.held.push(Held { tag: delivery.delivery_tag, rank: 0, data: Vec::new(), at: Instant::now() });
            }
        }
        for held in std::mem::take(&mut self.held) {
            let options = BasicNackOptions { multiple: false, requeue: true };
            self.channel.basic_nack(held.tag, options).await?;
        }
        Ok(())
    }

    async fn next_delivery(&mut self) -> anyhow::Result<Delivery> {
        let Some(consumer) = self.consumer.as_mut() else {
            anyhow::bail!("{}: not subscribed", self.queue);
        };
        match consumer.next().await {
            Some(delivery) => Ok(delivery?),
            None => anyhow::bail!("the broker cancelled the consumer of {}", self.queue),
        }
    }

    /// Keeps a delivery (with any others already waiting); a message that is not a job of this
    /// account is acked away.
    async fn take(&mut self, first: Delivery) -> Result<(), Error> {
        let mut next = Some(first);
        while let Some(delivery) = next {
            match (self.rank)(&delivery.data) {
                Some(rank) => {
                    let at = Instant::now();
                    self.held.push(Held { tag: delivery.delivery_tag, rank, data: delivery.data, at });
                }
                None => {
                    tracing::warn!(message = "Dropping a message that is not a job of this account.", queue = %self.queue);
                    self.channel.basic_ack(delivery.delivery_tag, BasicAckOptions::default()).await?;
                }
            }
            next = match self.consumer.as_mut().and_then(|c| c.next().now_or_never()) {
                Some(Some(Ok(delivery))) => Some(delivery),
                _ => None,
            };
        }
        Ok(())
    }

    /// Keeps only the newest held job (highest rank, then the latest delivered) and acks the rest:
    /// safe, since the one kept is still in the queue. Returns the newest job's bytes.
    async fn settle(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(best) = self.held.iter().map(|h| (h.rank, h.tag)).max() else {
            return Ok(None);
        };
        let mut kept = Vec::with_capacity(1);
        for held in std::mem::take(&mut self.held) {
            if (held.rank, held.tag) == best {
                kept.push(held);
            } else {
                self.channel.basic_ack(held.tag, BasicAckOptions::default()).await?;
            }
        }
        self.held = kept;
        Ok(self.held.first().map(|h| h.data.clone()))
    }
}

/// This replica's place among the fetcher replicas for one broker session: a consumer of the
/// presence queue (it never receives anything), and the channel that counts them.
pub struct Presence {
    _consumer: Consumer,
    channel: Channel,
    queue: String,
}

impl Presence {
    /// Declares `topology` first when `declare_topology`, then the presence queue, and consumes it.
    pub async fn join(connection: &Connection, topology: &Topology, declare_topology: bool) -> Result<Presence, Error> {
        let channel = connection.create_channel().await?;
        if declare_topology {
            topology.declare(&channel).await?;
        }
        let queue = topology.fetch_replicas_queue();
        declare_queue(&channel, &plain_quorum_queue(queue.clone(), "fetcher replicas (presence)")).await?;
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Presence { _consumer: consumer, channel, queue })
    }

    /// The live fetcher replicas: consumers of the presence queue (on this session's channel).
    pub async fn replicas(&self) -> Result<usize, Error> {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let queue = self.channel.queue_declare(self.queue.as_str().into(), options, FieldTable::default()).await?;
        Ok((queue.consumer_count() as usize).max(1))
    }
}
