//! Churn: the source keeps changing while clients page through it. Orders are modified (modified =
//! now, ts bumped), confirmed, cancelled, created, and committed late (visible now with a modified
//! time in the past, as a slow transaction would), and committed late *with an old row version*
//! (`ts` below rows already served: what a `start_ts` cursor cannot see). Rates are per merchant
//! per second.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::{model::Status, store::Merchant};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Churn {
    /// Existing orders touched (modified = now, new ts), status unchanged.
    pub modify_per_sec: f64,
    /// WaitConfirm → Confirmed.
    pub confirm_per_sec: f64,
    /// Confirmed → Cancelled.
    pub cancel_per_sec: f64,
    /// New orders (half WaitConfirm, half Confirmed).
    pub new_per_sec: f64,
    /// New Confirmed orders whose modified time is up to `late_max_secs` in the past.
    pub late_per_sec: f64,
    pub late_max_secs: u64,
    /// New Confirmed orders that become visible with a `ts` below the highest already served
    /// (their transaction took its row version, then committed late), modified up to
    /// `late_max_secs` in the past.
    pub late_ts_per_sec: f64,
}

impl Churn {
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("modify_per_sec", self.modify_per_sec),
            ("confirm_per_sec", self.confirm_per_sec),
            ("cancel_per_sec", self.cancel_per_sec),
            ("new_per_sec", self.new_per_sec),
            ("late_per_sec", self.late_per_sec),
            ("late_ts_per_sec", self.late_ts_per_sec),
        ] {
            if !(0.0..=100_000.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 100000, got {rate}"));
            }
        }
        Ok(())
    }

    pub fn is_active(&self) -> bool {
        self.modify_per_sec
            + self.confirm_per_sec
            + self.cancel_per_sec
            + self.new_per_sec
            + self.late_per_sec
            + self.late_ts_per_sec
            > 0.0
    }
}

/// What one merchant's churn has done so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnCounts {
    pub modified: u64,
    pub confirmed: u64,
    pub cancelled: u64,
    pub created: u64,
    pub late: u64,
    pub late_ts: u64,
    /// The latest late-`ts` rows (at most [`LATE_TS_LOG`]): when each became visible, for tests
    /// that measure how soon a sweep finds them.
    #[serde(skip_serializing_if = "std::collections::VecDeque::is_empty")]
    pub late_ts_rows: std::collections::VecDeque<LateTsRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LateTsRow {
    pub o_id: i64,
    pub ts: i64,
    /// Unix milliseconds.
    pub visible_at_ms: i64,
}

pub const LATE_TS_LOG: usize = 10_000;

/// Fractional carry-over between ticks, so low rates still happen.
#[derive(Debug, Clone, Default)]
pub struct ChurnClock {
    carry: [f64; 6],
}

impl ChurnClock {
    /// Applies `elapsed_secs` worth of churn to a merchant.
    pub fn tick(
        &mut self,
        churn: &Churn,
        elapsed_secs: f64,
        merchant: &mut Merchant,
        counts: &mut ChurnCounts,
        now: Timestamp,
    ) {
        let rates = [
            churn.modify_per_sec,
            churn.confirm_per_sec,
            churn.cancel_per_sec,
            churn.new_per_sec,
            churn.late_per_sec,
            churn.late_ts_per_sec,
        ];
        for (kind, rate) in rates.iter().enumerate() {
            self.carry[kind] += rate * elapsed_secs;
            let n = self.carry[kind].floor();
            self.carry[kind] -= n;
            for _ in 0..n as u64 {
                match kind {
                    0 => {
                        if let Some(slot) = pick(merchant, |_| true) {
                            merchant.update(slot, None, now);
                            counts.modified += 1;
                        }
                    }
                    1 => {
                        if let Some(slot) = pick(merchant, |s| s == Status::WaitConfirm) {
                            merchant.update(slot, Some(Status::Confirmed), now);
                            counts.confirmed += 1;
                        }
                    }
                    2 => {
                        if let Some(slot) = pick(merchant, |s| s == Status::Confirmed) {
                            merchant.update(slot, Some(Status::Cancelled), now);
                            counts.cancelled += 1;
                        }
                    }
                    3 => {
                        let status = if merchant.rng().chance(0.5) { Status::Confirmed } else { Status::WaitConfirm };
                        merchant.insert(now, status);
                        counts.created += 1;
                    }
                    4 => {
                        let lag = merchant.rng().below(churn.late_max_secs.max(1) * 1000) as i64;
                        let modified = now.checked_sub(SignedDuration::from_millis(lag)).unwrap_or(now);
                        merchant.insert(modified, Status::Confirmed);
                        counts.late += 1;
                    }
                    _ => {
                        let lag = merchant.rng().below(churn.late_max_secs.max(1) * 1000) as i64;
                        if let Some((slot, ts)) = merchant.insert_late_ts(now, SignedDuration::from_millis(lag)) {
                            counts.late_ts += 1;
                            if counts.late_ts_rows.len() >= LATE_TS_LOG {
                                counts.late_ts_rows.pop_front();
                            }
                            let o_id = merchant.order(slot).map(|o| o.o_id).unwrap_or_default();
                            counts.late_ts_rows.push_back(LateTsRow { o_id, ts, visible_at_ms: now.as_millisecond() });
                        }
                    }
                }
            }
        }
    }
}

/// A random order whose status passes `want` (a bounded number of tries).
fn pick(merchant: &mut Merchant, want: impl Fn(Status) -> bool) -> Option<usize> {
    let len = merchant.len() as u64;
    if len == 0 {
        return None;
    }
    for _ in 0..64 {
        let slot = merchant.rng().below(len) as usize;
        if merchant.order(slot).is_some_and(|o| want(o.status)) {
            return Some(slot);
        }
    }
    None
}
