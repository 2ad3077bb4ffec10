//! Randomness for jitter, shuffles and seeded simulator data: a thin face on `fastrand` (not for
//! secrets). `Rng::new(seed)` is deterministic, so a simulator run can be reproduced exactly;
//! `Rng::from_entropy()` and [`with_ids`] are seeded from the OS's randomness, so two threads or
//! processes never share a sequence (fastrand's own per-thread seed is only a hash of the clock
//! and the thread id, which two replicas starting together could share).

use std::{cell::RefCell, hash::BuildHasher};

/// 64 bits from the OS's randomness: std's `RandomState` keys are drawn from it once per thread
/// and stepped for every new state.
pub fn entropy_seed() -> u64 {
    std::hash::RandomState::new().hash_one(std::thread::current().id())
}

thread_local! {
    static IDS: RefCell<fastrand::Rng> = RefCell::new(fastrand::Rng::with_seed(entropy_seed()));
}

/// Runs `draw` on this thread's entropy-seeded generator (trace and span ids, jitter).
pub fn with_ids<T>(draw: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
    IDS.with(|rng| draw(&mut rng.borrow_mut()))
}

/// A seeded or entropy-seeded generator with the few draws the project uses.
#[derive(Debug, Clone)]
pub struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }

    /// A generator seeded from entropy, for jitter.
    pub fn from_entropy() -> Self {
        Self(fastrand::Rng::with_seed(entropy_seed()))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.0.u64(..n) }
    }

    /// Uniform in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo { lo } else { self.0.i64(lo..=hi) }
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0.f64()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.0.f64() < p
    }

    /// Shuffles `items` in place.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        self.0.shuffle(items);
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.0.usize(..items.len())]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let a: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..5).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a[0], a[1]);
    }

    #[test]
    fn range_stays_inside_its_bounds() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let v = r.range(-3, 3);
            assert!((-3..=3).contains(&v));
        }
        assert_eq!(r.range(5, 5), 5);
        assert_eq!(r.below(0), 0);
    }

    #[test]
    fn generators_from_entropy_differ() {
        assert_ne!(Rng::from_entropy().next_u64(), Rng::from_entropy().next_u64());
    }
}
