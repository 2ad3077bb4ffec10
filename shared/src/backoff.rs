//! Exponential backoff with half jitter, as a plain value (no timers inside), so the policy is
//! unit-tested and every retry loop in the project shares one shape. The sequence itself comes
//! from `backon`'s [`ExponentialBackoff`]; this face keeps the project's shape on it: delays in
//! `[ceiling/2, ceiling]` with `ceiling = min(max, base * 2^n)`, no limit on the number of
//! attempts unless one is set, an attempt counter, and `reset` after a success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use crate::rng::entropy_seed;

#[derive(Debug)]
pub struct Backoff {
    /// First delay ceiling; doubles per attempt.
    base: Duration,
    /// Never wait longer than this.
    max: Duration,
    /// `None`: retry for ever.
    max_attempts: Option<u32>,
    /// `None`: a fresh seed from the OS's randomness for each run of delays.
    seed: Option<u64>,
    attempt: u32,
    delays: ExponentialBackoff,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self::configured(base, max, None, None)
    }

    /// Stop after `attempts` delays: `next_delay` then returns `None` from [`Backoff::try_next`]
    /// (and `max` from `next_delay`).
    pub fn with_max_attempts(self, attempts: u32) -> Self {
        Self::configured(self.base, self.max, Some(attempts), self.seed)
    }

    /// A reproducible jitter sequence (tests).
    pub fn with_seed(self, seed: u64) -> Self {
        Self::configured(self.base, self.max, self.max_attempts, Some(seed))
    }

    fn configured(base: Duration, max: Duration, max_attempts: Option<u32>, seed: Option<u64>) -> Self {
        let delays = Self::schedule(base, max, max_attempts, seed);
        Self { base, max, max_attempts, seed, attempt: 0, delays }
    }

    /// backon's jitter adds `[0, d)` to a delay `d`, so running it on half the ceilings gives
    /// `[ceiling/2, ceiling)`: the floor keeps a tight loop from spinning.
    fn schedule(base: Duration, max: Duration, max_attempts: Option<u32>, seed: Option<u64>) -> ExponentialBackoff {
        let builder = ExponentialBuilder::new()
            .with_factor(2.0)
            .with_min_delay(base / 2)
            .with_max_delay(max / 2)
            .with_jitter()
            .with_jitter_seed(seed.unwrap_or_else(entropy_seed));
        match max_attempts {
            Some(attempts) => builder.with_max_times(attempts as usize),
            None => builder.without_max_times(),
        }
        .build()
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// The ceiling for attempt `n` (0-based): `min(max, base * 2^n)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay, or `None` once a configured number of attempts is spent.
    pub fn try_next(&mut self) -> Option<Duration> {
        let delay = self.delays.next()?;
        self.attempt = self.attempt.saturating_add(1);
        // backon computes in f32 seconds: a rounding must not overshoot the maximum.
        Some(delay.min(self.max))
    }

    /// The next delay: uniform in `[ceiling/2, ceiling]`; `max` once a configured number of
    /// attempts is spent.
    pub fn next_delay(&mut self) -> Duration {
        self.try_next().unwrap_or(self.max)
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
        self.delays = Self::schedule(self.base, self.max, self.max_attempts, self.seed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// backon works in f32 seconds: allow a relative rounding error far below any jitter.
    fn within(delay: Duration, low: Duration, high: Duration) -> bool {
        let slack = high.mul_f64(1e-5) + Duration::from_nanos(1);
        delay + slack >= low && delay <= high + slack
    }

    #[test]
    fn each_delay_lies_between_half_its_ceiling_and_the_ceiling() {
        for seed in 0..50 {
            let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).with_seed(seed);
            for n in 0..40 {
                let ceiling = b.ceiling(n);
                let delay = b.next_delay();
                assert!(within(delay, ceiling / 2, ceiling), "seed {seed}, attempt {n}: {delay:?} vs {ceiling:?}");
                assert!(delay <= Duration::from_secs(2));
                assert_eq!(b.attempts(), n + 1);
            }
        }
    }

    #[test]
    fn delays_grow_then_stay_under_the_maximum() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(49) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_millis(999));
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn the_jitter_spreads_the_delays() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).with_seed(7);
        let delays: Vec<Duration> = (0..100).map(|_| b.next_delay()).collect();
        let (low, high) = (delays.iter().min().copied(), delays.iter().max().copied());
        assert!(low < Some(Duration::from_millis(600)) && high > Some(Duration::from_millis(900)), "{low:?}..{high:?}");
    }

    #[test]
    fn unlimited_unless_a_maximum_of_attempts_is_set() {
        let mut endless = Backoff::new(Duration::from_millis(1), Duration::from_millis(8));
        assert!((0..10_000).all(|_| endless.try_next().is_some()));
        assert_eq!(endless.attempts(), 10_000);

        let mut limited = Backoff::new(Duration::from_millis(1), Duration::from_millis(8)).with_max_attempts(3);
        assert!((0..3).all(|_| limited.try_next().is_some()));
        assert_eq!(limited.try_next(), None);
        assert_eq!(limited.next_delay(), Duration::from_millis(8));
        assert_eq!(limited.attempts(), 3);
        limited.reset();
        assert!(limited.try_next().is_some());
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let run = |seed| {
            let mut b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).with_seed(seed);
            (0..12).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
