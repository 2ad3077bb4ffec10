//! The target's injected faults and the pure decision for one request.

use std::time::Duration;

use orderflow_shared::rng::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

#[derive(Debug, Clone, Default)]
pub struct Faults {
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    pub failure_rate: f64,
    pub throttle_rate: f64,
    pub retry_after_secs: u64,
    /// Glob (`*` wildcard) of record ids rejected permanently.
    pub reject_ids: Option<String>,
    /// Glob of record ids that always fail with 503 (a record that can never be written).
    pub fail_ids: Option<String>,
    pub outage_until: Option<Instant>,
    /// Share of writes answered HTTP 200 with a business failure (`success:false`), not stored:
    /// what platform APIs do when they are busy.
    pub soft_failure_rate: f64,
    /// Glob of record ids answered HTTP 200 with the permanent business code [`SOFT_REJECT_CODE`].
    pub soft_reject_ids: Option<String>,
    /// Until then every write is answered 401 (expired credentials).
    pub auth_failure_until: Option<Instant>,
    /// Writes accepted per second (0: unlimited); beyond it 429 with `Retry-After`.
    pub capacity_per_sec: f64,
    /// Contention: every request in flight adds this much latency per 1,000 requests in flight,
    /// so latency grows with the square of concurrency and throughput peaks at
    /// √(1000 × latency ÷ this) in flight (200 for a 50 ms floor and 1.25).
    pub latency_per_inflight_ms: f64,
}

/// The business code of a soft reject ("this record will never be accepted").
pub const SOFT_REJECT_CODE: u32 = 40001;

/// A partial update: only the fields given change.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsUpdate {
    pub latency_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
    pub failure_rate: Option<f64>,
    pub throttle_rate: Option<f64>,
    pub retry_after_secs: Option<u64>,
    /// A glob, or `""` to lift the rule.
    pub reject_ids: Option<String>,
    /// A glob of ids that always get 503, or `""` to lift it.
    pub fail_ids: Option<String>,
    /// Starts an outage of this many seconds now (0 ends a running one).
    pub outage_secs: Option<f64>,
    pub soft_failure_rate: Option<f64>,
    /// A glob, or `""` to lift the rule.
    pub soft_reject_ids: Option<String>,
    /// Answers every write 401 for this many seconds from now (0 ends it).
    pub auth_failure_secs: Option<f64>,
    pub capacity_per_sec: Option<f64>,
    pub latency_per_inflight_ms: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pass,
    /// Over `capacity_per_sec`: 429 with this `Retry-After`.
    OverCapacity(u64),
    Outage,
    Unauthorized,
    /// HTTP 200 with `success:false`; shape picks one of the answer forms platforms use.
    SoftFailure(u8),
    Fail(u16),
    Throttle(u64),
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        let rates = [
            ("failure_rate", self.failure_rate),
            ("throttle_rate", self.throttle_rate),
            ("soft_failure_rate", self.soft_failure_rate),
        ];
        for (name, rate) in rates {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        for (name, value) in
            [("capacity_per_sec", self.capacity_per_sec), ("latency_per_inflight_ms", self.latency_per_inflight_ms)]
        {
            if !(0.0..=1_000_000.0).contains(&value) {
                return Err(format!("{name} must be between 0 and 1000000, got {value}"));
            }
        }
        if self.latency_max_ms < self.latency_min_ms {
            return Err(format!(
                "latency_max_ms ({}) is below latency_ms ({})",
                self.latency_max_ms, self.latency_min_ms
            ));
        }
        Ok(())
    }

    pub fn apply(&mut self, u: FaultsUpdate, now: Instant) {
        if let Some(v) = u.latency_ms {
            self.latency_min_ms = v;
            self.latency_max_ms = self.latency_max_ms.max(v);
        }
        if let Some(v) = u.latency_max_ms {
            self.latency_max_ms = v;
        }
        if let Some(v) = u.failure_rate {
            self.failure_rate = v;
        }
        if let Some(v) = u.throttle_rate {
            self.throttle_rate = v;
        }
        if let Some(v) = u.retry_after_secs {
            self.retry_after_secs = v;
        }
        if let Some(v) = u.reject_ids {
            self.reject_ids = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = u.fail_ids {
            self.fail_ids = (!v.is_empty()).then_some(v);
        }
        if let Some(secs) = u.outage_secs {
            self.outage_until = window(secs, now);
        }
        if let Some(v) = u.soft_failure_rate {
            self.soft_failure_rate = v;
        }
        if let Some(v) = u.soft_reject_ids {
            self.soft_reject_ids = (!v.is_empty()).then_some(v);
        }
        if let Some(secs) = u.auth_failure_secs {
            self.auth_failure_until = window(secs, now);
        }
        if let Some(v) = u.capacity_per_sec {
            self.capacity_per_sec = v;
        }
        if let Some(v) = u.latency_per_inflight_ms {
            self.latency_per_inflight_ms = v;
        }
    }

    /// The latency added by `inflight` concurrent requests (contention, see the field).
    pub fn load_latency(&self, inflight: u64) -> Duration {
        let n = inflight as f64;
        Duration::from_secs_f64((self.latency_per_inflight_ms * n * n / 1000.0 / 1000.0).min(3600.0))
    }

    pub fn decide(&self, rng: &mut Rng, now: Instant) -> (Duration, Decision) {
        let latency = if self.latency_max_ms > self.latency_min_ms {
            rng.range(self.latency_min_ms as i64, self.latency_max_ms as i64) as u64
        } else {
            self.latency_min_ms
        };
        let delay = Duration::from_millis(latency);
        if self.outage_until.is_some_and(|until| now < until) {
            return (Duration::ZERO, Decision::Outage);
        }
        if self.auth_failure_until.is_some_and(|until| now < until) {
            return (Duration::ZERO, Decision::Unauthorized);
        }
        if rng.chance(self.soft_failure_rate) {
            return (delay, Decision::SoftFailure(*rng.pick(&[0u8, 1, 2])));
        }
        if rng.chance(self.failure_rate) {
            return (delay, Decision::Fail(*rng.pick(&[500u16, 502, 503])));
        }
        if rng.chance(self.throttle_rate) {
            return (delay, Decision::Throttle(self.retry_after_secs));
        }
        (delay, Decision::Pass)
    }

    pub fn rejects(&self, id: &str) -> bool {
        self.reject_ids.as_deref().is_some_and(|pattern| glob_match(pattern, id))
    }

    pub fn soft_rejects(&self, id: &str) -> bool {
        self.soft_reject_ids.as_deref().is_some_and(|pattern| glob_match(pattern, id))
    }

    pub fn always_fails(&self, id: &str) -> bool {
        self.fail_ids.as_deref().is_some_and(|pattern| glob_match(pattern, id))
    }

    pub fn describe(&self, now: Instant) -> Value {
        json!({
            "latency_ms": self.latency_min_ms,
            "latency_max_ms": self.latency_max_ms,
            "failure_rate": self.failure_rate,
            "throttle_rate": self.throttle_rate,
            "retry_after_secs": self.retry_after_secs,
            "reject_ids": self.reject_ids,
            "fail_ids": self.fail_ids,
            "outage_remaining_secs": remaining(self.outage_until, now),
            "soft_failure_rate": self.soft_failure_rate,
            "soft_reject_ids": self.soft_reject_ids,
            "auth_failure_remaining_secs": remaining(self.auth_failure_until, now),
            "capacity_per_sec": self.capacity_per_sec,
            "latency_per_inflight_ms": self.latency_per_inflight_ms,
        })
    }
}

/// A window of `secs` from now; 0 (or less, or not a number) ends a running one. Huge values
/// are capped at a year rather than overflowing.
fn window(secs: f64, now: Instant) -> Option<Instant> {
    let secs = if secs.is_finite() { secs.min(365.0 * 86400.0) } else { 0.0 };
    (secs > 0.0).then(|| now + Duration::from_secs_f64(secs))
}

fn remaining(until: Option<Instant>, now: Instant) -> f64 {
    until.map(|u| u.saturating_duration_since(now).as_secs_f64()).unwrap_or(0.0)
}

/// `*` matches any run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell() {
        assert!(glob_match("*7", "100000017"));
        assert!(!glob_match("*7", "100000018"));
        assert!(glob_match("1*0*9", "1000019"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*a", "a"));
    }

    #[test]
    fn an_outage_refuses_until_it_ends() {
        let mut f = Faults::default();
        let now = Instant::now();
        f.apply(FaultsUpdate { outage_secs: Some(60.0), ..FaultsUpdate::default() }, now);
        let mut rng = Rng::new(1);
        assert_eq!(f.decide(&mut rng, now + Duration::from_secs(59)).1, Decision::Outage);
        assert_eq!(f.decide(&mut rng, now + Duration::from_secs(61)).1, Decision::Pass);
    }

    #[test]
    fn an_auth_failure_window_refuses_until_it_ends_and_soft_failures_come_at_their_rate() {
        let mut f = Faults::default();
        let now = Instant::now();
        f.apply(FaultsUpdate { auth_failure_secs: Some(10.0), ..FaultsUpdate::default() }, now);
        let mut rng = Rng::new(7);
        assert_eq!(f.decide(&mut rng, now + Duration::from_secs(9)).1, Decision::Unauthorized);
        assert_eq!(f.decide(&mut rng, now + Duration::from_secs(11)).1, Decision::Pass);
        f.apply(FaultsUpdate { soft_failure_rate: Some(0.1), ..FaultsUpdate::default() }, now);
        let soft = (0..10_000)
            .filter(|_| matches!(f.decide(&mut rng, now + Duration::from_secs(11)).1, Decision::SoftFailure(_)))
            .count();
        assert!((800..1200).contains(&soft), "{soft} of 10000");
        f.apply(FaultsUpdate { outage_secs: Some(f64::INFINITY), ..FaultsUpdate::default() }, now);
        assert!(f.outage_until.is_none(), "a value that is not a number of seconds is no window, and panics nowhere");
    }

    #[test]
    fn latency_grows_with_the_square_of_what_is_in_flight_so_throughput_peaks() {
        let f = Faults { latency_min_ms: 50, latency_max_ms: 50, latency_per_inflight_ms: 1.25, ..Faults::default() };
        let throughput = |n: u64| n as f64 / (0.050 + f.load_latency(n).as_secs_f64());
        assert!((f.load_latency(200).as_secs_f64() - 0.050).abs() < 1e-9, "at the peak latency doubles");
        assert!(throughput(200) > throughput(100) && throughput(200) > throughput(400), "a peak near 200");
        assert!(throughput(200) > throughput(180) && throughput(200) > throughput(220));
    }

    #[test]
    fn a_partial_update_changes_only_what_it_names() {
        let mut f = Faults { failure_rate: 0.2, reject_ids: Some("*1".into()), ..Faults::default() };
        f.apply(FaultsUpdate { throttle_rate: Some(0.05), ..FaultsUpdate::default() }, Instant::now());
        assert_eq!((f.failure_rate, f.throttle_rate), (0.2, 0.05));
        f.apply(FaultsUpdate { reject_ids: Some(String::new()), ..FaultsUpdate::default() }, Instant::now());
        assert!(f.reject_ids.is_none());
    }
}
