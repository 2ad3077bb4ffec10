//! An account's lease as the fetcher uses it: the broker side (a single-active-consumer job queue
//! per account, why a stale owner can never commit, the upgrade from the old job queue) is
//! `orderflow_shared::amqp::lease`; this reads and writes the account's [`Job`] through it.

use orderflow_shared::amqp::{Connection, Owner, Publisher, Topology, lease};

use crate::job::Job;

pub struct Lease {
    pub account: String,
    inner: lease::Lease,
}

/// Ranks a job message of `account` by its `seq` (anything else is not a job of this account).
fn rank(account: String) -> lease::Rank {
    Box::new(move |data| match Job::parse(data) {
        Ok(job) if job.account == account => Some(job.seq),
        Ok(job) => {
            tracing::warn!(message = "Ignoring a job of another account in this job queue.", account = %account, found = %job.account);
            None
        }
        Err(error) => {
            tracing::warn!(message = "Ignoring an unreadable job message.", account = %account, %error);
            None
        }
    })
}

impl Lease {
    /// Declares the account's job queue (filling a new one with `initial`, or with the checkpoint
    /// an older version left) and joins the line of its consumers.
    pub async fn open(
        owner: &Owner,
        connection: &Connection,
        publisher: &Publisher,
        topology: &Topology,
        initial: Job,
    ) -> anyhow::Result<Lease> {
        let account = initial.account.clone();
        let seed = || (job_id(&initial), serde_json::to_vec(&initial).unwrap_or_default());
        let mut inner =
            lease::Lease::open(owner, connection, publisher, topology, &account, rank(account.clone()), seed).await?;
        inner.subscribe().await?;
        Ok(Lease { account, inner })
    }

    /// Waits until the broker makes this replica the account's owner; returns the newest job.
    pub async fn acquire(&mut self) -> anyhow::Result<Job> {
        let data = self.inner.acquire().await?;
        Job::parse(&data).map_err(anyhow::Error::msg)
    }

    /// Publishes `job` (confirmed) and only then acks the jobs it replaces.
    pub async fn commit(&mut self, publisher: &Publisher, job: &Job) -> anyhow::Result<()> {
        let body = serde_json::to_vec(job)?;
        self.inner.commit(publisher, &job_id(job), &body).await
    }

    /// How long the job has been held unacked.
    pub fn held_for(&self) -> std::time::Duration {
        self.inner.held_for().unwrap_or_default()
    }

    /// Gives the account up: the next replica in line receives the job.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.release().await?)
    }

    /// Joins the line again (after a release).
    pub async fn subscribe(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.subscribe().await?)
    }
}

fn job_id(job: &Job) -> String {
    format!("job:{}:{}", job.account, job.seq)
}
