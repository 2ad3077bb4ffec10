//! Fault injection per merchant, switchable at runtime (`POST /admin/faults`): latency, HTTP 5xx,
//! connection resets, responses slower than a client's timeout, and business code 150.
//! The decision is a pure function of the settings and a random draw.

use std::time::Duration;

use orderflow_shared::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every response: a uniform draw in `[latency_min_ms, latency_max_ms]`.
    pub latency_min_ms: u64,
    pub latency_max_ms: u64,
    /// Share of calls answered with HTTP 500..504.
    pub error_5xx_rate: f64,
    /// Share of calls whose connection is cut mid-response.
    pub reset_rate: f64,
    /// Share of calls answered only after `slow_ms` (set it above the client's timeout).
    pub slow_rate: f64,
    pub slow_ms: u64,
    /// Share of calls answered with business code 150 (internal error).
    pub code_150_rate: f64,
    /// The token-refresh answer comes this long after the new pair is issued (the old refresh
    /// token is already spent): a window in which a client can lose its broker connection.
    pub refresh_latency_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    None,
    Http5xx(u16),
    Reset,
    Code150,
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_5xx_rate", self.error_5xx_rate),
            ("reset_rate", self.reset_rate),
            ("slow_rate", self.slow_rate),
            ("code_150_rate", self.code_150_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        if self.latency_max_ms < self.latency_min_ms && self.latency_max_ms != 0 {
            return Err("latency_max_ms must be >= latency_min_ms".into());
        }
        Ok(())
    }

    /// The delay before answering and what to answer with.
    pub fn decide(&self, rng: &mut Rng) -> (Duration, FaultAction) {
        let mut delay_ms = if self.latency_max_ms > self.latency_min_ms {
            rng.range(self.latency_min_ms as i64, self.latency_max_ms as i64) as u64
        } else {
            self.latency_min_ms
        };
        if rng.chance(self.slow_rate) {
            delay_ms += self.slow_ms;
        }
        let action = if rng.chance(self.reset_rate) {
            FaultAction::Reset
        } else if rng.chance(self.error_5xx_rate) {
            FaultAction::Http5xx(500 + rng.below(5) as u16)
        } else if rng.chance(self.code_150_rate) {
            FaultAction::Code150
        } else {
            FaultAction::None
        };
        (Duration::from_millis(delay_ms), action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_faults_by_default() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert_eq!(Faults::default().decide(&mut rng), (Duration::ZERO, FaultAction::None));
        }
    }

    #[test]
    fn rates_are_roughly_honoured() {
        let f = Faults { error_5xx_rate: 0.2, ..Faults::default() };
        let mut rng = Rng::new(3);
        let n = (0..10_000).filter(|_| matches!(f.decide(&mut rng).1, FaultAction::Http5xx(_))).count();
        assert!((1700..2300).contains(&n), "{n}");
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        assert!(Faults { reset_rate: 1.5, ..Faults::default() }.validate().is_err());
    }
}
