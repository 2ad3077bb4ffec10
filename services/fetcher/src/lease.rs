//! An account's lease as the fetcher uses it: the broker side (exclusive lock queue, job queue,
//! and why a stale owner can never commit) is `orderflow_shared::amqp::lease`; this reads and
//! writes the account's [`Job`] through it.

use orderflow_shared::amqp::{Connection, Publisher, Topology, lease};

use crate::job::{Job, newest};

pub struct Lease {
    pub account: String,
    inner: lease::Lease,
}

impl Lease {
    /// Takes the account if nobody holds it. `Ok(None)`: another replica holds it.
    pub async fn try_acquire(
        connection: &Connection,
        topology: &Topology,
        account: &str,
    ) -> Result<Option<Lease>, lease::Error> {
        let inner = lease::Lease::try_acquire(connection, topology, account).await?;
        Ok(inner.map(|inner| Lease { account: account.to_string(), inner }))
    }

    /// Reads every job message present and returns the newest (`None` on a first run).
    pub async fn load(&mut self) -> Result<Option<Job>, lease::Error> {
        let account = self.account.as_str();
        let jobs = self
            .inner
            .load(|data| match Job::parse(data) {
                Ok(job) if job.account == account => Some(job),
                Ok(job) => {
                    tracing::warn!(message = "Ignoring a job of another account in this job queue.", account = %account, found = %job.account);
                    None
                }
                Err(error) => {
                    tracing::warn!(message = "Ignoring an unreadable job message.", account = %account, %error);
                    None
                }
            })
            .await?;
        Ok(newest(jobs))
    }

    /// Publishes `job` (confirmed) and only then acks the jobs read by [`Lease::load`].
    pub async fn commit(&mut self, publisher: &Publisher, job: &Job) -> anyhow::Result<()> {
        let body = serde_json::to_vec(job)?;
        let id = format!("job:{}:{}", job.account, job.seq);
        self.inner.commit(publisher, &id, &body).await
    }

    /// Gives the account up (another replica may take it).
    pub async fn release(self) {
        self.inner.release().await;
    }
}
