//! The lagging sweep, for the `start_ts` cursor. Jushuitan's `ts` is a row version: taken when a
//! row is written, visible when its transaction commits. A long transaction can make a row visible
//! with a `ts` below rows the cursor has already passed, and the cursor never sees it. So, on a
//! schedule, the fetcher re-reads the recent past by modified window within a share of the
//! merchant's budget and publishes the rows the cursor did not publish.
//!
//! Which rows: the replica remembers the row versions its start_ts passes published (for the
//! sweep's span). A sweep row whose version is newer than the cursor is left to the cursor; one
//! the cursor published is skipped; one at or below the cursor that it did not publish was
//! *missed* — published and counted (`orderflow_fetch_sweep_found_total`). A row modified before
//! this replica's memory began (it took the account over) cannot be told apart: it is published
//! too, uncounted, and the target's `idCheck` absorbs the repeats. Publishing only the missed rows
//! keeps the sweep from re-writing the whole span to the target every interval.

use std::{
    collections::{HashSet, VecDeque},
    sync::Mutex,
    time::Duration,
};

use jiff::Timestamp;
use serde_json::Value;

use crate::pass::{PassContext, PassError, PassResult, Walk, row_ts, walk_windows};

/// The row versions the cursor published recently, and since when this replica knows.
pub struct Seen {
    inner: Mutex<Memory>,
    /// How long a version is remembered (the sweep's span and a margin).
    keep: Duration,
}

#[derive(Default)]
struct Memory {
    /// Unix ms since which every version the cursor published is in `versions`.
    since_ms: i64,
    /// The highest version the cursor has passed.
    cursor: i64,
    versions: HashSet<i64>,
    /// (recorded at, version), oldest first, for forgetting.
    order: VecDeque<(i64, i64)>,
}

/// What the sweep does with a row it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than the cursor: the cursor will read it.
    Ahead,
    /// The cursor published this version.
    Published,
    /// At or below the cursor and never published: a late commit the cursor missed.
    Missed,
    /// Modified before this replica's memory began: published again, not counted.
    Unknown,
}

impl Seen {
    pub fn new(keep: Duration) -> Self {
        Self { inner: Mutex::new(Memory::default()), keep }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts remembering afresh (this replica has just taken the account; `cursor` is the
    /// checkpoint it continues from).
    pub fn reset(&self, cursor: i64, now: Timestamp) {
        let mut m = self.lock();
        *m = Memory { since_ms: now.as_millisecond(), cursor, ..Memory::default() };
    }

    /// Versions the cursor (or a sweep) published.
    pub fn record(&self, versions: impl IntoIterator<Item = i64>) {
        self.record_at(versions, Timestamp::now().as_millisecond());
    }

    fn record_at(&self, versions: impl IntoIterator<Item = i64>, now: i64) {
        let keep_ms = i64::try_from(self.keep.as_millis()).unwrap_or(i64::MAX);
        let mut m = self.lock();
        for ts in versions {
            m.cursor = m.cursor.max(ts);
            if m.versions.insert(ts) {
                m.order.push_back((now, ts));
            }
        }
        while m.order.front().is_some_and(|(at, _)| now.saturating_sub(*at) > keep_ms) {
            if let Some((_, ts)) = m.order.pop_front() {
                m.versions.remove(&ts);
            }
        }
    }

    pub fn verdict(&self, ts: Option<i64>, modified_ms: Option<i64>) -> Verdict {
        let m = self.lock();
        let Some(ts) = ts else { return Verdict::Unknown };
        if ts > m.cursor {
            Verdict::Ahead
        } else if m.versions.contains(&ts) {
            Verdict::Published
        } else if modified_ms.is_some_and(|at| at >= m.since_ms) {
            Verdict::Missed
        } else {
            Verdict::Unknown
        }
    }

    /// Versions remembered now (for tests and the memory's size).
    pub fn len(&self) -> usize {
        self.lock().versions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn row_modified_ms(row: &Value) -> Option<i64> {
    let text = row.get("modified").and_then(Value::as_str)?;
    orderflow_shared::time::parse_china(text).ok().map(|t| t.as_millisecond())
}

/// What one sweep did.
#[derive(Debug, Default)]
pub struct SweepResult {
    pub pass: Option<PassResult>,
    /// Rows the cursor missed (published now).
    pub found: u64,
    /// Rows that could not be told apart (published again, idCheck absorbs them).
    pub unknown: u64,
    /// Rows read that the cursor had published or will read.
    pub skipped: u64,
}

/// One sweep over `[now − span, now − delay]`: reads with the context's budget share and publishes
/// only the rows [`Seen`] says the cursor did not publish; they are remembered once confirmed.
pub async fn sweep(ctx: &mut PassContext<'_>, seen: &Seen, span: Duration) -> Result<SweepResult, PassError> {
    let from = Timestamp::now()
        .checked_sub(jiff::SignedDuration::try_from(span).unwrap_or_default())
        .unwrap_or(Timestamp::now());
    let (mut found, mut unknown, mut skipped) = (0u64, 0u64, 0u64);
    // Versions this sweep publishes: remembered in `seen` only once all are confirmed (a failed
    // sweep leaves them to the next one), and never published twice by this one.
    let mut published: HashSet<i64> = HashSet::new();
    let mut filter = |rows: Vec<Value>| {
        rows.into_iter()
            .filter(|row| {
                let ts = row_ts(row);
                if ts.is_some_and(|ts| published.contains(&ts)) {
                    return false;
                }
                match seen.verdict(ts, row_modified_ms(row)) {
                    Verdict::Ahead | Verdict::Published => {
                        skipped += 1;
                        false
                    }
                    verdict => {
                        if verdict == Verdict::Missed {
                            found += 1;
                        } else {
                            unknown += 1;
                        }
                        published.extend(ts);
                        true
                    }
                }
            })
            .collect()
    };
    let walk = Walk {
        overlap: Duration::ZERO,
        mode: "sweep",
        filter: &mut filter,
        max_pages: u32::MAX,
        max_time: span,
        rewalk_on_growth: false,
        until: None,
    };
    let pass = walk_windows(ctx, from, walk).await?;
    seen.record(published);
    Ok(SweepResult { pass: Some(pass), found, unknown, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_below_the_cursor_that_was_never_published_is_missed() {
        let seen = Seen::new(Duration::from_secs(3600));
        let start = Timestamp::now();
        seen.reset(100, start);
        seen.record([101, 102, 105]);
        let after = Some(start.as_millisecond() + 1);
        assert_eq!(seen.verdict(Some(106), after), Verdict::Ahead, "the cursor will read it");
        assert_eq!(seen.verdict(Some(102), after), Verdict::Published);
        assert_eq!(seen.verdict(Some(103), after), Verdict::Missed, "a late commit below the cursor");
        assert_eq!(
            seen.verdict(Some(50), Some(start.as_millisecond() - 60_000)),
            Verdict::Unknown,
            "before memory began"
        );
        assert_eq!(seen.verdict(None, after), Verdict::Unknown, "no version: publish, idCheck decides");
        seen.record([103]);
        assert_eq!(seen.verdict(Some(103), after), Verdict::Published, "found once, not again");
    }

    #[test]
    fn versions_are_forgotten_after_the_span() {
        let seen = Seen::new(Duration::from_secs(60));
        seen.reset(0, Timestamp::now());
        seen.record_at([1, 2], 1_000_000);
        seen.record_at([3], 1_000_000 + 60_001);
        assert_eq!(seen.len(), 1, "only what is within the span stays");
        assert_eq!(seen.verdict(Some(1), Some(i64::MAX)), Verdict::Missed, "forgotten: a sweep would publish it again");
    }
}
