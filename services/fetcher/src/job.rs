//! The sync job: one message per account in its job queue, carrying the checkpoint (cursor) and
//! the current token pair. A pass publishes the next job (confirmed) before acking the old one,
//! so a crash only repeats a pass; duplicates converge on the highest `seq`.

use std::fmt;

use orderflow_shared::messages::JOB_SCHEMA;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CursorMode {
    StartTs,
    Modified,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    pub mode: CursorMode,
    /// start_ts mode: every row with `ts` ≤ this has been published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ts: Option<i64>,
    /// modified mode: every order modified before this instant (RFC 3339) has been published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced_until: Option<String>,
    /// When a pass last reached the end of the source (RFC 3339), for the lag metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caught_up_at: Option<String>,
}

impl Cursor {
    pub fn start_ts(start_ts: i64) -> Self {
        Cursor { mode: CursorMode::StartTs, start_ts: Some(start_ts), synced_until: None, caught_up_at: None }
    }

    pub fn modified(synced_until: jiff::Timestamp) -> Self {
        Cursor {
            mode: CursorMode::Modified,
            start_ts: None,
            synced_until: Some(synced_until.to_string()),
            caught_up_at: None,
        }
    }

    pub fn synced_until(&self) -> Option<jiff::Timestamp> {
        self.synced_until.as_deref().and_then(|s| s.parse().ok())
    }
}

/// A token pair the fetcher refreshed; kept with the checkpoint so every replica uses it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    /// When the pair was issued (unix ms; 0 for pairs stored before this was kept): the newer wins.
    #[serde(default)]
    pub issued_at_ms: i64,
    /// Fingerprint of the configured pair this one descends from (see `tokens.rs`).
    #[serde(default)]
    pub from_config: String,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tokens(***)")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub schema: String,
    pub account: String,
    /// Raised by each replica that takes the account over (its fence, see
    /// `orderflow_shared::amqp::lease`): a job of an older epoch never wins, whatever its `seq`.
    /// Jobs of versions before it read as epoch 0.
    #[serde(default)]
    pub epoch: u64,
    /// Increases by one per committed pass; the highest wins when duplicates exist.
    pub seq: u64,
    pub cursor: Cursor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Tokens>,
    /// The tokens sealed with ORDERFLOW_SECRET_KEY (instead of `tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_tokens: Option<String>,
    pub updated_at: String,
    /// Orders published for this account so far (informational).
    #[serde(default)]
    pub orders_total: u64,
}

impl Job {
    pub fn new(account: &str, cursor: Cursor) -> Self {
        Job {
            schema: JOB_SCHEMA.to_string(),
            account: account.to_string(),
            epoch: 0,
            seq: 0,
            cursor,
            tokens: None,
            sealed_tokens: None,
            updated_at: jiff::Timestamp::now().to_string(),
            orders_total: 0,
        }
    }

    /// The stored pair (opening it when sealed).
    pub fn stored_tokens(&self, sealer: &crate::tokens::Sealer) -> Result<Option<Tokens>, String> {
        match (&self.sealed_tokens, &self.tokens) {
            (Some(sealed), _) => sealer.open(sealed).map(Some),
            (None, tokens) => Ok(tokens.clone()),
        }
    }

    /// Stores `tokens`, sealed when a key is set (a plain pair from before is dropped).
    pub fn store_tokens(&mut self, tokens: Tokens, sealer: &crate::tokens::Sealer) -> Result<(), String> {
        match sealer.seal(&tokens)? {
            Some(sealed) => {
                self.sealed_tokens = Some(sealed);
                self.tokens = None;
            }
            None => {
                self.tokens = Some(tokens);
                self.sealed_tokens = None;
            }
        }
        Ok(())
    }

    /// The job after a committed pass.
    pub fn next(&self, cursor: Cursor, tokens: Option<Tokens>, orders: u64) -> Self {
        Job {
            schema: JOB_SCHEMA.to_string(),
            account: self.account.clone(),
            epoch: self.epoch,
            seq: self.seq + 1,
            cursor,
            tokens: tokens.or_else(|| self.tokens.clone()),
            sealed_tokens: self.sealed_tokens.clone(),
            updated_at: jiff::Timestamp::now().to_string(),
            orders_total: self.orders_total + orders,
        }
    }

    /// The same job committed again (no progress): a keep-alive, or a new token pair stored.
    pub fn renewed(&self) -> Self {
        self.next(self.cursor.clone(), None, 0)
    }

    /// The job a new owner commits first: this one with the epoch raised (see `epoch`).
    pub fn fenced(&self) -> Self {
        Job { epoch: self.epoch + 1, updated_at: jiff::Timestamp::now().to_string(), ..self.clone() }
    }

    /// Its rank among the account's jobs: `(epoch, seq)`, higher is newer.
    pub fn rank(&self) -> (u64, u64) {
        (self.epoch, self.seq)
    }

    pub fn parse(body: &[u8]) -> Result<Job, String> {
        let job: Job = serde_json::from_slice(body).map_err(|e| format!("not a job: {e}"))?;
        if job.schema != JOB_SCHEMA {
            return Err(format!("unknown job schema {:?}", job.schema));
        }
        Ok(job)
    }
}

/// Of several jobs found for one account, the one to continue from.
pub fn newest(jobs: impl IntoIterator<Item = Job>) -> Option<Job> {
    jobs.into_iter().max_by_key(Job::rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_jobs_converge_on_the_highest_seq() {
        let a = Job::new("acme", Cursor::start_ts(10));
        let b = a.next(Cursor::start_ts(20), None, 5);
        let c = b.next(Cursor::start_ts(30), None, 5);
        let best = newest(vec![b.clone(), c.clone(), a]).expect("some");
        assert_eq!(best.seq, 2);
        assert_eq!(best.cursor.start_ts, Some(30));
        assert_eq!(best.orders_total, 10);
    }

    #[test]
    fn a_fenced_job_outranks_whatever_the_stale_owner_commits_later() {
        let held = Job::new("acme", Cursor::start_ts(10)).next(Cursor::start_ts(20), None, 5);
        let fence = held.fenced();
        assert_eq!((fence.epoch, fence.seq, fence.cursor.clone()), (1, 1, held.cursor.clone()));
        // The stale owner goes on from `held`: its commits keep epoch 0 however far they get.
        let stale = held.next(Cursor::start_ts(30), None, 5).next(Cursor::start_ts(40), None, 5);
        let ours = fence.next(Cursor::start_ts(25), None, 1);
        assert_eq!(newest(vec![stale.clone(), fence.clone()]), Some(fence));
        assert_eq!(newest(vec![stale, ours.clone()]), Some(ours));
        // A job written before epochs existed reads as epoch 0.
        let old = br#"{"schema":"orderflow.job.v1","account":"acme","seq":7,"cursor":{"mode":"start_ts","start_ts":5},"updated_at":"x"}"#;
        assert_eq!(Job::parse(old).map(|j| j.rank()), Ok((0, 7)));
    }

    #[test]
    fn a_job_round_trips_and_keeps_tokens_until_replaced() {
        let a = Job::new("acme", Cursor::start_ts(1));
        let t =
            Tokens { access_token: "a".into(), refresh_token: "r".into(), issued_at_ms: 1, from_config: String::new() };
        let b = a.next(Cursor::start_ts(2), Some(t.clone()), 0);
        let c = b.next(Cursor::start_ts(3), None, 0);
        assert_eq!(c.tokens, Some(t));
        let bytes = serde_json::to_vec(&c).expect("serializes");
        assert_eq!(Job::parse(&bytes).expect("parses"), c);
        assert!(!format!("{c:?}").contains("\"r\""));
    }

    #[test]
    fn foreign_messages_are_not_jobs() {
        assert!(Job::parse(b"{}").is_err());
        assert!(
            Job::parse(br#"{"schema":"other","account":"a","seq":1,"cursor":{"mode":"start_ts"},"updated_at":"x"}"#)
                .is_err()
        );
    }
}
