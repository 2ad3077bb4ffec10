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
//! another replica may hold it now) can neither publish nor ack there, so its commits fail.
//!
//! The broker may also make another consumer active **without closing this replica's channel**
//! (a cluster node that lost sight of the queue's leader for a moment: the leader returns the job
//! and activates the next consumer; newer brokers' queue-level delivery timeouts do the same). Two
//! rules keep such a stale owner from ever committing:
//! - **Fencing.** Jobs are ranked by `(epoch, seq)`. A replica that becomes the owner first commits
//!   a fence: the newest job with its epoch raised ([`Lease::fence`]). Whatever a stale owner
//!   commits afterwards carries the old epoch, ranks below the fence, and is acked away unread by
//!   the real owner.
//! - **Echo.** Every commit must come back to its publisher (matched by message id) within
//!   [`ECHO_WAIT`]; when it does not, the broker delivers this queue to someone else: the commit
//!   reports [`Ownership::Lost`] and the caller stops working the account and queues again.
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
//!
//! **Requests for the owner** (an audit, a repair: `orderflow audit`) travel the same way: a
//! message of type [`REQUEST_TYPE`] published into the account's job queue reaches whichever
//! replica holds the account, because the broker delivers the queue to its active consumer only.
//! It is set aside for the caller ([`Lease::take_requests`]), never taken for a job; a request
//! not yet taken when the account is handed over goes back to the queue with the job.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Channel, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
};

use super::{
    Publisher, Topology,
    headers::{json_properties, message_id},
    is_not_found, is_resource_locked, soft_error,
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
/// How long a commit waits for its job to come back; past it, this replica is no longer the
/// queue's active consumer (or the broker is too slow to tell): ownership is given up.
pub const ECHO_WAIT: Duration = Duration::from_secs(10);

/// The AMQP `type` of a request for the account's owner (see the module docs).
pub const REQUEST_TYPE: &str = "orderflow.fetch-request";

/// A request for the account's owner, delivered through its job queue.
#[derive(Debug, Clone)]
pub struct Request {
    pub tag: u64,
    pub body: Vec<u8>,
    /// Where the answers go (a queue of the requester's).
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// A job's rank, `(epoch, seq)`: higher is newer. The epoch rises when an owner takes over (see
/// [`Lease::fence`]), the seq with every commit.
pub type Ranked = (u64, u64);

/// Ranks a job message; `None` is not a job of this account (dropped).
pub type Rank = Box<dyn Fn(&[u8]) -> Option<Ranked> + Send + Sync>;

/// Whether a commit came back to this replica (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The job came back: this replica still owns the account.
    Held,
    /// It did not come back within [`ECHO_WAIT`]: another consumer receives this queue.
    Lost,
}

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

/// What opening found of an older version's job queue.
#[derive(Debug, PartialEq, Eq)]
enum Migration {
    /// None: the account starts from its initial job.
    NoOldQueue,
    /// Its job was moved here (by this replica or another).
    Moved,
}

struct Held {
    tag: u64,
    rank: Ranked,
    /// The publisher's message id (how a commit recognises its own job coming back).
    id: String,
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
    /// Requests for the owner, received and not yet taken by the caller.
    requests: Vec<Request>,
    /// Deliveries that are neither a job of this account nor a request: acked away at the next
    /// settle.
    junk: Vec<u64>,
}

impl Lease {
    /// Declares the account's job queue and, when it is new (no job ready and no consumer), fills
    /// it: with the newest job an older version left in its job queue (that queue is then
    /// deleted), else with `initial()`. Never seeds while an old job queue still exists (another
    /// replica may be moving its checkpoint). Does not subscribe yet.
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
        let lease = Lease {
            channel: owner.channel.clone(),
            queue,
            rank,
            consumer: None,
            held: Vec::new(),
            requests: Vec::new(),
            junk: Vec::new(),
        };
        if declared.message_count() == 0 && declared.consumer_count() == 0 {
            let legacy = topology.legacy_fetch_queue(account);
            if lease.migrate(owner, connection, publisher, &legacy).await? == Migration::NoOldQueue {
                let (id, body) = initial();
                lease.publish(publisher, &id, &body).await?;
            }
        }
        Ok(lease)
    }

    /// Moves the newest job of an older version's job queue into this one (confirmed), then
    /// deletes the old queue. Safe when several replicas start together: each moves what it read
    /// (the newest wins by rank), a queue deleted under a reader means another replica moved it,
    /// and a reader that finds the old queue empty while it still exists waits for the replica
    /// that holds its job to finish (or deletes it, when it stays empty).
    async fn migrate(
        &self,
        owner: &Owner,
        connection: &Connection,
        publisher: &Publisher,
        legacy: &str,
    ) -> anyhow::Result<Migration> {
        if !owner.legacy_exists(connection, legacy).await? {
            return Ok(Migration::NoOldQueue);
        }
        let channel = connection.create_channel().await?;
        let mut newest: Option<(Ranked, Vec<u8>)> = None;
        let mut read = 0;
        let mut deleted = false;
        while read < MAX_LEGACY {
            match channel.basic_get(legacy.into(), BasicGetOptions { no_ack: false }).await {
                Ok(Some(message)) => {
                    read += 1;
                    let data = message.delivery.data;
                    if let Some(rank) = (self.rank)(&data)
                        && newest.as_ref().is_none_or(|(best, _)| rank > *best)
                    {
                        newest = Some((rank, data));
                    }
                }
                Ok(None) => break,
                // Deleted under us: another replica moved it (what we read went with it, and
                // that replica published its newest; ours follows, the higher rank wins).
                Err(error) if is_not_found(&error) => {
                    deleted = true;
                    break;
                }
                Err(error) => return Err(error.into()),
            }
        }
        let Some((rank, body)) = newest else {
            if deleted {
                return Ok(Migration::Moved);
            }
            super::connect::close_channel(&channel, "nothing to migrate").await;
            return self.wait_for_other_mover(owner, connection, legacy).await;
        };
        self.publish(publisher, &format!("migrated:{}:{}:{}", self.queue, rank.0, rank.1), &body).await?;
        // Only a replica that moved a job deletes the old queue (what it read goes with it). After
        // a 404 the channel is closed, and the replica that deleted the queue moved its job too.
        if !deleted {
            match channel.queue_delete(legacy.into(), QueueDeleteOptions::default()).await {
                Ok(_) => {
                    super::connect::close_channel(&channel, "migrated").await;
                }
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        tracing::info!(message = "Moved an account's checkpoint from the old job queue.", from = legacy, to = %self.queue);
        Ok(Migration::Moved)
    }

    /// The old queue exists but gave nothing: another replica holds its job while moving it. Waits
    /// for that replica to delete it; an old queue that stays without a ready job (it never held
    /// one) is deleted here and the account starts afresh. (Quorum queues refuse `if-empty`
    /// deletes with a connection error: the queue is looked at first, then deleted.)
    async fn wait_for_other_mover(
        &self,
        owner: &Owner,
        connection: &Connection,
        legacy: &str,
    ) -> anyhow::Result<Migration> {
        let deadline = Instant::now() + ECHO_WAIT;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if !owner.legacy_exists(connection, legacy).await? {
                return Ok(Migration::Moved);
            }
        }
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let state = match channel.queue_declare(legacy.into(), passive, FieldTable::default()).await {
            Ok(state) => state,
            Err(error) if is_not_found(&error) => return Ok(Migration::Moved),
            Err(error) => return Err(error.into()),
        };
        if state.message_count() > 0 {
            // Its job came back (a mover that crashed): move it on the next start of the session.
            anyhow::bail!("{legacy}: the old job queue holds a job again; moving it on the next try");
        }
        match channel.queue_delete(legacy.into(), QueueDeleteOptions::default()).await {
            Ok(_) => {
                super::connect::close_channel(&channel, "empty old job queue").await;
                tracing::warn!(message = "The old job queue held no job; starting the account afresh.", queue = legacy);
                Ok(Migration::NoOldQueue)
            }
            Err(error) if is_not_found(&error) => Ok(Migration::Moved),
            Err(error) => Err(error.into()),
        }
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
    /// job) and returns the newest job. Cancel-safe: a delivery received is kept. The caller then
    /// [`fence`](Self::fence)s it before working the account.
    pub async fn acquire(&mut self) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(newest) = self.settle().await? {
                return Ok(newest);
            }
            let delivery = self.next_delivery().await?;
            self.take(delivery);
        }
    }

    /// Waits until a request for the owner arrives (jobs delivered meanwhile are kept as
    /// usual). Cancel-safe: it only waits for deliveries.
    pub async fn wait_request(&mut self) -> anyhow::Result<()> {
        while self.requests.is_empty() {
            let delivery = self.next_delivery().await?;
            self.take(delivery);
        }
        Ok(())
    }

    /// The requests received so far (each to be acked with [`ack_request`](Self::ack_request)
    /// once taken on).
    pub fn take_requests(&mut self) -> Vec<Request> {
        std::mem::take(&mut self.requests)
    }

    /// Removes a request from the queue (the owner took it on).
    pub async fn ack_request(&self, tag: u64) -> Result<(), Error> {
        self.channel.basic_ack(tag, BasicAckOptions::default()).await
    }

    /// Takes over the account for good: commits `fence(newest)` — the newest job with a higher
    /// epoch — so whatever an earlier owner may still commit ranks below it. When a newer job of
    /// that owner turns up before the fence comes back, fences that one instead (its progress and
    /// tokens are kept). Returns the fence's bytes, or `None` when this replica turned out not to
    /// be the active consumer ([`Ownership::Lost`]).
    pub async fn fence(
        &mut self,
        publisher: &Publisher,
        fence: impl Fn(&[u8]) -> anyhow::Result<(String, Vec<u8>)>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            let Some(base) = self.newest() else {
                anyhow::bail!("{}: fence without a job held", self.queue);
            };
            let (id, body) = fence(&base.2)?;
            let (ownership, earlier) = self.publish_and_echo(publisher, &id, &body).await?;
            if ownership == Ownership::Lost {
                return Ok(None);
            }
            // A newer job of the old epoch arrived while fencing: fence from it instead.
            if let Some(newer) = earlier.into_iter().filter(|(rank, _)| *rank > base.0).max() {
                tracing::info!(message = "A newer job arrived while taking over; fencing it.", queue = %self.queue, epoch = newer.0.0, seq = newer.0.1);
                // Our fence is superseded: take it out of the queue again.
                for echo in self.held.iter().filter(|h| h.id == id) {
                    self.channel.basic_ack(echo.tag, BasicAckOptions::default()).await?;
                }
                self.held.retain(|h| h.id != id);
                continue;
            }
            // A job ranked above our fence (another replica fenced too: we are not alone).
            if !self.settle_keeps(&id).await? {
                return Ok(None);
            }
            return Ok(Some(body));
        }
    }

    /// Publishes `body` (confirmed) as the account's job, waits for it to come back to this
    /// consumer, and acks the jobs it replaces. [`Ownership::Lost`] when it does not come back
    /// within [`ECHO_WAIT`]: another consumer is active; the caller must stop working the account
    /// and [`release`](Self::release) it.
    pub async fn commit(&mut self, publisher: &Publisher, id: &str, body: &[u8]) -> anyhow::Result<Ownership> {
        let (ownership, _) = self.publish_and_echo(publisher, id, body).await?;
        // Back, but outranked (a replica that fenced while this one was replaced, before the
        // broker made this one active again): the job to go on from is that one, not ours.
        if ownership == Ownership::Held && !self.settle_keeps(id).await? {
            return Ok(Ownership::Lost);
        }
        Ok(ownership)
    }

    /// Settles the jobs held; whether the one kept is ours (`id`).
    async fn settle_keeps(&mut self, id: &str) -> Result<bool, Error> {
        self.settle().await?;
        let kept = self.held.first().is_some_and(|h| h.id == id);
        if !kept {
            tracing::warn!(message = "A newer job than this replica's is in the queue: another replica took the account over.", queue = %self.queue);
        }
        Ok(kept)
    }

    /// Publishes a job and waits for it to come back; also returns the (rank, tag) of every job
    /// that arrived before it.
    async fn publish_and_echo(
        &mut self,
        publisher: &Publisher,
        id: &str,
        body: &[u8],
    ) -> anyhow::Result<(Ownership, Vec<(Ranked, u64)>)> {
        let last_tag = self.held.iter().map(|h| h.tag).max().unwrap_or(0);
        self.publish(publisher, id, body).await?;
        let deadline = tokio::time::Instant::now() + ECHO_WAIT;
        loop {
            let arrived = self.held.iter().filter(|h| h.tag > last_tag);
            if arrived.clone().any(|h| h.id == id) {
                let earlier = arrived.filter(|h| h.id != id).map(|h| (h.rank, h.tag)).collect();
                return Ok((Ownership::Held, earlier));
            }
            match tokio::time::timeout_at(deadline, self.next_delivery()).await {
                Ok(delivery) => self.take(delivery?),
                Err(_) => {
                    tracing::warn!(
                        message = "A commit did not come back: another replica receives this job queue now.",
                        queue = %self.queue, waited_s = ECHO_WAIT.as_secs(),
                    );
                    return Ok((Ownership::Lost, Vec::new()));
                }
            }
        }
    }

    /// The newest job held: (rank, tag, bytes).
    fn newest(&self) -> Option<(Ranked, u64, Vec<u8>)> {
        self.held.iter().max_by_key(|h| (h.rank, h.tag)).map(|h| (h.rank, h.tag, h.data.clone()))
    }

    /// How long the oldest job delivery held has been unacked (`None` when none is).
    pub fn held_for(&self) -> Option<Duration> {
        self.held.iter().map(|h| h.at.elapsed()).max()
    }

    /// Returns the jobs held to the queue without leaving the line (after [`Ownership::Lost`]):
    /// whoever is the active consumer receives them — this replica again, if the loss was only a
    /// slow broker, and it takes the account over from the newest job.
    pub async fn give_back(&mut self) -> Result<(), Error> {
        for tag in std::mem::take(&mut self.junk) {
            self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        }
        let requests = std::mem::take(&mut self.requests).into_iter().map(|r| r.tag);
        for tag in std::mem::take(&mut self.held).into_iter().map(|h| h.tag).chain(requests) {
            let options = BasicNackOptions { multiple: false, requeue: true };
            self.channel.basic_nack(tag, options).await?;
        }
        Ok(())
    }

    /// Gives the account up: stops consuming and returns the jobs held to the queue, where the
    /// next waiting consumer (another replica) receives them.
    pub async fn release(&mut self) -> Result<(), Error> {
        if let Some(mut consumer) = self.consumer.take() {
            // A cancel that times out ends the session (a stuck channel): the broker returns
            // what is held.
            super::connect::cancel(&self.channel, consumer.tag().as_str()).await?;
            // Deliveries that crossed the cancel are ours to return too.
            while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                let at = Instant::now();
                self.held.push(Held {
                    tag: delivery.delivery_tag,
                    rank: (0, 0),
                    id: String::new(),
                    data: Vec::new(),
                    at,
                });
            }
        }
        self.give_back().await
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

    /// Keeps a delivery (with any others already waiting): a job, a request for the owner, or
    /// junk to ack away at the next settle. Never waits, so no delivery is lost to a cancel.
    fn take(&mut self, first: Delivery) {
        let mut next = Some(first);
        while let Some(delivery) = next {
            let props = &delivery.properties;
            if props.kind().as_ref().is_some_and(|k| k.as_str() == REQUEST_TYPE) {
                self.requests.push(Request {
                    tag: delivery.delivery_tag,
                    reply_to: props.reply_to().as_ref().map(|r| r.as_str().to_string()),
                    correlation_id: props.correlation_id().as_ref().map(|c| c.as_str().to_string()),
                    body: delivery.data,
                });
            } else {
                match (self.rank)(&delivery.data) {
                    Some(rank) => {
                        let at = Instant::now();
                        let id = message_id(props);
                        self.held.push(Held { tag: delivery.delivery_tag, rank, id, data: delivery.data, at });
                    }
                    None => {
                        tracing::warn!(message = "Dropping a message that is not a job of this account.", queue = %self.queue);
                        self.junk.push(delivery.delivery_tag);
                    }
                }
            }
            next = match self.consumer.as_mut().and_then(|c| c.next().now_or_never()) {
                Some(Some(Ok(delivery))) => Some(delivery),
                _ => None,
            };
        }
    }

    /// Keeps only the newest held job (highest rank, then the latest delivered) and acks the rest:
    /// safe, since the one kept is still in the queue. Returns the newest job's bytes.
    async fn settle(&mut self) -> Result<Option<Vec<u8>>, Error> {
        for tag in std::mem::take(&mut self.junk) {
            self.channel.basic_ack(tag, BasicAckOptions::default()).await?;
        }
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
