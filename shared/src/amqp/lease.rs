//! Account ownership through the broker: the replica that declares an account's exclusive lock
//! queue is the only one fetching it (so the merchant's budget needs no distributed limiter);
//! when that replica's connection dies the broker deletes the lock and another replica takes over.
//! The lease also reads and replaces the account's job (checkpoint) in its quorum job queue.
//!
//! The lock, the job reads and their acks all live on the lease's one channel, on the connection
//! that holds the lock: a commit acks the jobs it replaces on that channel, so a replica whose
//! lock connection died (a stale owner, whose lock another replica may hold by now) can never
//! commit — its acks fail and the jobs it read go back to the queue.
//!
//! Replicas count each other through a presence queue each one consumes (without messages):
//! see [`Presence`] and [`replicas`].
//!
//! The job itself is the caller's: this module moves bytes (the fetcher's `lease.rs` reads and
//! writes its `Job`).

use lapin::{
    Channel, Consumer,
    options::{BasicAckOptions, BasicConsumeOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};

use super::{
    Publisher, Topology,
    headers::json_properties,
    is_resource_locked,
    topology::{declare_queue, plain_quorum_queue},
};

/// A broker connection (the locks are held by the session's `consume` connection).
pub type Connection = lapin::Connection;
/// A failed broker operation.
pub type Error = lapin::Error;

/// Job messages one [`Lease::load`] reads at most (about: it stops once past this).
const MAX_LOAD: usize = 1000;

pub struct Lease {
    channel: Channel,
    lock_queue: String,
    job_queue: String,
    /// Delivery tags of job messages read and not yet acked (acked after the next job is confirmed).
    held: Vec<u64>,
}

impl Lease {
    /// Takes the account if nobody holds it. `Ok(None)`: another replica holds it.
    pub async fn try_acquire(
        connection: &Connection,
        topology: &Topology,
        account: &str,
    ) -> Result<Option<Lease>, Error> {
        let channel = connection.create_channel().await?;
        let lock_queue = topology.fetch_lock(account);
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            durable: false,
            ..QueueDeclareOptions::default()
        };
        match channel.queue_declare(lock_queue.as_str().into(), options, FieldTable::default()).await {
            Ok(_) => {}
            Err(error) if is_resource_locked(&error) => return Ok(None),
            Err(error) => return Err(error),
        }
        let job_queue = topology.fetch_queue(account);
        declare_queue(&channel, &plain_quorum_queue(job_queue.clone(), "fetch job + checkpoint")).await?;
        Ok(Some(Lease { channel, lock_queue, job_queue, held: Vec::new() }))
    }

    /// Reads every job message present (each stays unacked until the next [`Lease::commit`]) and
    /// returns the ones `read` makes a job of (`None`: ignored, the caller says why).
    pub async fn load<T>(&mut self, mut read: impl FnMut(&[u8]) -> Option<T>) -> Result<Vec<T>, Error> {
        let mut jobs = Vec::new();
        while let Some(message) =
            self.channel.basic_get(self.job_queue.as_str().into(), BasicGetOptions { no_ack: false }).await?
        {
            let delivery = message.delivery;
            self.held.push(delivery.delivery_tag);
            if let Some(job) = read(&delivery.data) {
                jobs.push(job);
            }
            if jobs.len() + self.held.len() > MAX_LOAD {
                break;
            }
        }
        Ok(jobs)
    }

    /// Publishes the job `body` under message id `id` (confirmed) and only then acks the jobs read
    /// by [`Lease::load`].
    pub async fn commit(&mut self, publisher: &Publisher, id: &str, body: &[u8]) -> anyhow::Result<()> {
        publisher.publish("", &self.job_queue, body, json_properties(id, FieldTable::default())).await?;
        if let Some(max) = self.held.iter().copied().max() {
            self.channel.basic_ack(max, BasicAckOptions { multiple: true }).await?;
        }
        self.held.clear();
        Ok(())
    }

    /// Gives the account up (another replica may take it).
    pub async fn release(self) {
        let _ = self.channel.queue_delete(self.lock_queue.as_str().into(), QueueDeleteOptions::default()).await;
        let _ = self.channel.close(200, "released".into()).await;
    }
}

/// The queue every fetcher replica consumes (without messages) so replicas can count each other.
pub fn presence_queue(topology: &Topology) -> String {
    format!("{}.fetch.replicas", topology.ns)
}

/// This replica's place among the fetcher replicas for one broker session: a consumer of the
/// presence queue (it never receives anything). Dropped with the session.
pub struct Presence {
    _consumer: Consumer,
    _channel: Channel,
}

impl Presence {
    /// Declares `topology` first when `declare_topology`, then the presence queue, and consumes it.
    pub async fn join(connection: &Connection, topology: &Topology, declare_topology: bool) -> Result<Presence, Error> {
        let channel = connection.create_channel().await?;
        if declare_topology {
            topology.declare(&channel).await?;
        }
        let presence = presence_queue(topology);
        declare_queue(&channel, &plain_quorum_queue(presence.clone(), "fetcher replicas (presence)")).await?;
        let consumer = channel
            .basic_consume(presence.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        Ok(Presence { _consumer: consumer, _channel: channel })
    }
}

/// The live fetcher replicas: consumers of the presence queue (1 when it cannot be read).
pub async fn replicas(connection: &Connection, topology: &Topology) -> usize {
    match connection.create_channel().await {
        Ok(channel) => {
            let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
            let count = channel
                .queue_declare(presence_queue(topology).as_str().into(), options, FieldTable::default())
                .await
                .map(|q| q.consumer_count() as usize)
                .unwrap_or(1);
            let _ = channel.close(200, "ok".into()).await;
            count.max(1)
        }
        Err(_) => 1,
    }
}
