//! Per-merchant call limits as Jushuitan enforces them: at most N calls in any 1-second window
//! (code 199) and M in any 60-second window (code 200). Sliding windows over accepted calls, so a
//! client that bursts is caught exactly as the real API would catch it.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

use orderflow_shared::jst::code;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Calls per second; 0 = unlimited.
    pub per_sec: u32,
    /// Calls per minute; 0 = unlimited.
    pub per_min: u32,
}

#[derive(Debug)]
pub struct Limiter {
    pub limits: Limits,
    accepted: VecDeque<Instant>,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self { limits, accepted: VecDeque::new() }
    }

    /// Admits a call at `now`, or returns the rejection code (199 or 200).
    pub fn admit(&mut self, now: Instant) -> Result<(), i64> {
        let minute = Duration::from_secs(60);
        while self.accepted.front().is_some_and(|t| now.duration_since(*t) >= minute) {
            self.accepted.pop_front();
        }
        if self.limits.per_sec > 0 {
            let second = Duration::from_secs(1);
            let in_last_second = self.accepted.iter().rev().take_while(|t| now.duration_since(**t) < second).count();
            if in_last_second >= self.limits.per_sec as usize {
                return Err(code::TOO_MANY_CONCURRENT);
            }
        }
        if self.limits.per_min > 0 && self.accepted.len() >= self.limits.per_min as usize {
            return Err(code::TOO_FREQUENT);
        }
        self.accepted.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sixth_call_in_a_second_is_rejected_with_199() {
        let mut l = Limiter::new(Limits { per_sec: 5, per_min: 100 });
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(l.admit(t0 + Duration::from_millis(i * 10)), Ok(()));
        }
        assert_eq!(l.admit(t0 + Duration::from_millis(100)), Err(199));
        assert_eq!(l.admit(t0 + Duration::from_millis(1001)), Ok(()));
    }

    #[test]
    fn the_101st_call_in_a_minute_is_rejected_with_200() {
        let mut l = Limiter::new(Limits { per_sec: 5, per_min: 100 });
        let t0 = Instant::now();
        for i in 0..100 {
            assert_eq!(l.admit(t0 + Duration::from_millis(i * 300)), Ok(()), "call {i}");
        }
        assert_eq!(l.admit(t0 + Duration::from_millis(30_000)), Err(200));
        assert_eq!(l.admit(t0 + Duration::from_millis(60_001)), Ok(()));
    }

    #[test]
    fn zero_means_unlimited() {
        let mut l = Limiter::new(Limits { per_sec: 0, per_min: 0 });
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(l.admit(t0), Ok(()));
        }
    }
}
