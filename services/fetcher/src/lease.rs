//! Account ownership through the broker: the replica that declares an account's exclusive lock
//! queue is the only one fetching it (so the merchant's budget needs no distributed limiter);
//! when that replica's connection dies the broker deletes the lock and another replica takes over.
//! The lease also reads and replaces the account's job (checkpoint) in its quorum job queue.

use lapin::{
    Channel, Connection,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use orderflow_shared::amqp::{
    Publisher, Topology,
    headers::json_properties,
    is_resource_locked,
    topology::{declare_queue, plain_quorum_queue},
};

use crate::job::{Job, newest};

pub struct Lease {
    pub account: String,
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
    ) -> Result<Option<Lease>, lapin::Error> {
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
        Ok(Some(Lease { account: account.to_string(), channel, lock_queue, job_queue, held: Vec::new() }))
    }

    /// Reads every job message present and returns the newest (`None` on a first run).
    pub async fn load(&mut self) -> Result<Option<Job>, lapin::Error> {
        let mut jobs = Vec::new();
        while let Some(message) =
            self.channel.basic_get(self.job_queue.as_str().into(), BasicGetOptions { no_ack: false }).await?
        {
            let delivery = message.delivery;
            self.held.push(delivery.delivery_tag);
            match Job::parse(&delivery.data) {
                Ok(job) if job.account == self.account => jobs.push(job),
                Ok(job) => {
                    tracing::warn!(message = "Ignoring a job of another account in this job queue.", account = %self.account, found = %job.account)
                }
                Err(error) => {
                    tracing::warn!(message = "Ignoring an unreadable job message.", account = %self.account, %error)
                }
            }
            if jobs.len() + self.held.len() > 1000 {
                break;
            }
        }
        Ok(newest(jobs))
    }

    /// Publishes `job` (confirmed) and only then acks the jobs read by [`Lease::load`].
    pub async fn commit(&mut self, publisher: &Publisher, job: &Job) -> anyhow::Result<()> {
        let body = serde_json::to_vec(job)?;
        let id = format!("job:{}:{}", job.account, job.seq);
        publisher.publish("", &self.job_queue, &body, json_properties(&id, FieldTable::default())).await?;
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
