//! An account's lease as the fetcher uses it: the broker side (a single-active-consumer job queue
//! per account, why a stale owner can never commit, the upgrade from the old job queue) is
//! `orderflow_shared::amqp::lease`; this reads and writes the account's [`Job`] through it.

use orderflow_shared::amqp::{Connection, Owner, Publisher, Topology, lease, lease::Ownership};

use crate::job::Job;

/// The broker delivers this account's job queue to another replica now (a commit did not come
/// back): stop working the account at once and queue for it again.
#[derive(Debug)]
pub struct LostOwnership {
    pub account: String,
}

impl std::fmt::Display for LostOwnership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "account {}: another replica owns it now (a commit did not come back)", self.account)
    }
}

impl std::error::Error for LostOwnership {}

pub struct Lease {
    pub account: String,
    inner: lease::Lease,
}

/// Ranks a job message of `account` by `(epoch, seq)` (anything else is not a job of this account).
fn rank(account: String) -> lease::Rank {
    Box::new(move |data| match Job::parse(data) {
        Ok(job) if job.account == account => Some(job.rank()),
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

    /// Waits until the broker makes this replica the account's owner (the job is held; work
    /// starts from it once [`fence`](Self::fence)d).
    pub async fn acquire(&mut self) -> anyhow::Result<()> {
        self.inner.acquire().await?;
        Ok(())
    }

    /// Takes the account over: commits the newest job with its epoch raised, so an earlier owner
    /// that has not noticed yet can never commit over it. Returns the job to work from;
    /// [`LostOwnership`] when this replica is not the active consumer after all.
    pub async fn fence(&mut self, publisher: &Publisher) -> anyhow::Result<Job> {
        let fence = |data: &[u8]| {
            let job = Job::parse(data).map_err(anyhow::Error::msg)?.fenced();
            Ok((job_id(&job), serde_json::to_vec(&job)?))
        };
        match self.inner.fence(publisher, fence).await? {
            Some(data) => Job::parse(&data).map_err(anyhow::Error::msg),
            None => Err(self.lost()),
        }
    }

    /// Publishes `job` (confirmed), sees it come back and only then acks the jobs it replaces;
    /// [`LostOwnership`] when it does not come back.
    pub async fn commit(&mut self, publisher: &Publisher, job: &Job) -> anyhow::Result<()> {
        let body = serde_json::to_vec(job)?;
        match self.inner.commit(publisher, &job_id(job), &body).await? {
            Ownership::Held => Ok(()),
            Ownership::Lost => Err(self.lost()),
        }
    }

    fn lost(&self) -> anyhow::Error {
        anyhow::Error::new(LostOwnership { account: self.account.clone() })
    }

    /// How long the job has been held unacked.
    pub fn held_for(&self) -> std::time::Duration {
        self.inner.held_for().unwrap_or_default()
    }

    /// After [`LostOwnership`]: returns what is held without leaving the line (the active
    /// consumer, maybe this replica again, takes over from the newest job).
    pub async fn give_back(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.give_back().await?)
    }

    /// Gives the account up: the next replica in line receives the job.
    pub async fn release(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.release().await?)
    }

    /// Waits for a request for the account's owner (cancel-safe).
    pub async fn wait_request(&mut self) -> anyhow::Result<()> {
        self.inner.wait_request().await
    }

    /// The requests received so far; each must be acked once taken on.
    pub fn take_requests(&mut self) -> Vec<lease::Request> {
        self.inner.take_requests()
    }

    pub async fn ack_request(&self, tag: u64) -> anyhow::Result<()> {
        Ok(self.inner.ack_request(tag).await?)
    }

    /// Joins the line again (after a release).
    pub async fn subscribe(&mut self) -> anyhow::Result<()> {
        Ok(self.inner.subscribe().await?)
    }
}

/// Unique per job: a fence has the seq of the job it fences.
fn job_id(job: &Job) -> String {
    format!("job:{}:{}:{}", job.account, job.epoch, job.seq)
}
