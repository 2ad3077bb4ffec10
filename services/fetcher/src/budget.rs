//! A merchant's call budget, kept by governor quotas with a safety margin: Jushuitan counts calls
//! in sliding 1 s and 60 s windows, so calls are spaced evenly and slightly under the limits (a
//! burst at the start of a minute would trip code 200 later in that minute).

use std::{num::NonZeroU32, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

pub struct Budget {
    per_sec: DefaultDirectRateLimiter,
    per_min: DefaultDirectRateLimiter,
    /// The spacing actually used, for logs.
    pub spacing: Duration,
}

/// Even spacing that never puts `limit` calls in one `window`, with `margin` calls of slack for
/// network jitter.
pub fn spacing(limit: u32, window: Duration, margin: u32) -> Duration {
    let usable = limit.saturating_sub(margin).max(1);
    window / usable
}

impl Budget {
    pub fn new(per_sec: u32, per_min: u32) -> Self {
        let sec_margin = if per_sec >= 3 { 1 } else { 0 };
        let min_margin = if per_min >= 20 { 2 } else { 1 };
        let sec = spacing(per_sec, Duration::from_secs(1), sec_margin).max(Duration::from_micros(1));
        let min = spacing(per_min, Duration::from_secs(60), min_margin).max(Duration::from_micros(1));
        let quota = |period: Duration| Quota::with_period(period).map(|q| q.allow_burst(NonZeroU32::MIN));
        let fallback = Quota::per_second(NonZeroU32::MIN);
        Self {
            per_sec: RateLimiter::direct(quota(sec).unwrap_or(fallback)),
            per_min: RateLimiter::direct(quota(min).unwrap_or(fallback)),
            spacing: sec.max(min),
        }
    }

    /// Waits until one more call fits both quotas; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let start = tokio::time::Instant::now();
        self.per_min.until_ready().await;
        self.per_sec.until_ready().await;
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_keeps_a_margin_under_the_limit() {
        assert_eq!(spacing(100, Duration::from_secs(60), 2), Duration::from_secs(60) / 98);
        assert_eq!(spacing(5, Duration::from_secs(1), 1), Duration::from_millis(250));
        assert_eq!(spacing(1, Duration::from_secs(1), 1), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn calls_are_spaced_not_burst() {
        let budget = Budget::new(1000, 60_000);
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            budget.acquire().await;
        }
        // 19 gaps of ~1.02 ms at least.
        assert!(start.elapsed() >= Duration::from_millis(18), "{:?}", start.elapsed());
    }
}
