//! The writer's pace toward the target: a budget (`TARGET_RATE_PER_SEC`), a concurrency limit
//! that is fixed or adapts (`WRITER_CONCURRENCY=auto`), and a pause of every write when the target
//! answers 429 with `Retry-After`.
//!
//! The adaptive limit is AIMD, as TCP congestion control and vector's adaptive request
//! concurrency: it grows while the target's latency stays near its floor and nothing is refused
//! (doubling per round trip until the first back-off, then one per round trip), and shrinks by a
//! factor on 429/503/timeouts or when latency rises past twice the floor (at most once per round
//! trip). The floor is the lowest latency seen; every 30 s the limit dips to a quarter for a few
//! round trips to measure it again (as BBR's ProbeRTT does), so a target that became slower for good
//! does not pin the limit at its minimum, nor a long stretch at high concurrency raise the floor.
//! The controller is pure ([`Aimd`]); [`Pace`] wraps it for concurrent writers.

use std::{num::NonZeroU32, sync::Mutex, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::{sync::Notify, time::Instant};

/// Latency above this multiple of the floor counts as the target slowing under load.
const TOLERANCE: f64 = 2.0;
const BACKOFF_REFUSED: f64 = 0.75;
const BACKOFF_SLOW: f64 = 0.9;
const PROBE_EVERY: Duration = Duration::from_secs(30);
const START: f64 = 8.0;

/// `WRITER_CONCURRENCY`: a number, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Fixed(u16),
    Auto,
}

pub fn parse_concurrency(text: &str) -> Result<Concurrency, String> {
    match text.trim() {
        "auto" => Ok(Concurrency::Auto),
        n => match n.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{text:?}: give a number of writes in flight (1-65535) or `auto`")),
            Ok(n) => Ok(Concurrency::Fixed(n)),
        },
    }
}

/// What a finished write tells the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Written (or refused on its merits): a latency sample.
    Answered,
    /// 429, 503, a timeout: the target is overloaded.
    Refused,
    /// Anything else (a connection error, a 500): no information about load.
    Other,
}

/// The adaptive limit's pure state.
#[derive(Debug, Clone)]
pub struct Aimd {
    limit: f64,
    max: f64,
    slow_start: bool,
    floor: Option<Duration>,
    last_decrease: Option<Instant>,
    next_probe: Instant,
    probing_until: Option<Instant>,
    probe_best: Option<Duration>,
}

impl Aimd {
    pub fn new(max: u16, now: Instant) -> Self {
        let max = f64::from(max.max(1));
        Self {
            limit: START.min(max),
            max,
            slow_start: true,
            floor: None,
            last_decrease: None,
            next_probe: now + PROBE_EVERY,
            probing_until: None,
            probe_best: None,
        }
    }

    pub fn limit(&self) -> f64 {
        self.limit
    }

    pub fn floor(&self) -> Option<Duration> {
        self.floor
    }

    /// Whether the limit is dipped to measure the floor (from the probe's start until a write
    /// sent during it has come back, or two seconds past its end without one).
    pub fn probing(&self) -> bool {
        self.probing_until.is_some()
    }

    /// Writes allowed in flight now (a quarter of the limit while the floor is measured again).
    pub fn allowed(&mut self, now: Instant) -> usize {
        self.tick(now);
        let limit = if self.probing() { (self.limit / 4.0).max(1.0) } else { self.limit };
        limit.floor().max(1.0) as usize
    }

    fn tick(&mut self, now: Instant) {
        match self.probing_until {
            Some(until) if now >= until && (self.probe_best.is_some() || now >= until + Duration::from_secs(2)) => {
                if let Some(best) = self.probe_best.take() {
                    self.floor = Some(best);
                }
                self.probing_until = None;
                self.next_probe = now + PROBE_EVERY;
            }
            None if now >= self.next_probe && self.floor.is_some() => {
                let rtt = self.floor.unwrap_or_default();
                self.probing_until = Some(now + (rtt * 4).max(Duration::from_millis(200)));
                self.probe_best = None;
            }
            _ => {}
        }
    }

    /// One finished write: its latency, what it said, and whether it was sent during a probe.
    pub fn sample(&mut self, rtt: Duration, signal: Signal, sent_in_probe: bool, now: Instant) {
        match signal {
            Signal::Refused => self.decrease(BACKOFF_REFUSED, now),
            Signal::Other => {}
            Signal::Answered => {
                if sent_in_probe && self.probing_until.is_some() {
                    self.probe_best = Some(self.probe_best.map_or(rtt, |b| b.min(rtt)));
                }
                let floor = *self.floor.get_or_insert(rtt);
                if rtt < floor {
                    self.floor = Some(rtt);
                }
                if rtt.as_secs_f64() > floor.as_secs_f64() * TOLERANCE {
                    self.decrease(BACKOFF_SLOW, now);
                } else if self.slow_start {
                    self.limit = (self.limit + 1.0).min(self.max);
                } else {
                    self.limit = (self.limit + 1.0 / self.limit).min(self.max);
                }
            }
        }
    }

    fn decrease(&mut self, factor: f64, now: Instant) {
        let rtt = self.floor.unwrap_or(Duration::from_millis(50)) * 2;
        if self.last_decrease.is_some_and(|at| now.duration_since(at) < rtt) {
            return; // one back-off per round trip: the answers in flight all describe one moment
        }
        self.slow_start = false;
        self.limit = (self.limit * factor).max(1.0);
        self.last_decrease = Some(now);
    }
}

/// A write's place in flight; give it back with [`Pace::done`] (dropped unused, it frees the
/// place without a sample: a write abandoned at shutdown).
pub struct Slot<'a> {
    pace: &'a Pace,
    started: Instant,
    in_probe: bool,
    open: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.open
            && let Some(mut guard) = self.pace.lock()
        {
            guard.1 = guard.1.saturating_sub(1);
            drop(guard);
            self.pace.changed.notify_one();
        }
    }
}

/// The pace every write of this writer keeps.
pub struct Pace {
    aimd: Option<Mutex<(Aimd, usize)>>,
    changed: Notify,
    budget: Option<DefaultDirectRateLimiter>,
    paused_until: Mutex<Option<Instant>>,
}

impl Pace {
    /// `concurrency`: fixed (the consumer's prefetch bounds it) or auto up to `max`; `rate`: the
    /// target's budget in writes per second and its burst.
    pub fn new(concurrency: Concurrency, max: u16, rate: Option<(u32, u32)>) -> Self {
        let aimd = (concurrency == Concurrency::Auto).then(|| Mutex::new((Aimd::new(max, Instant::now()), 0)));
        let budget = rate.and_then(|(per_sec, burst)| {
            let quota = Quota::per_second(NonZeroU32::new(per_sec)?).allow_burst(NonZeroU32::new(burst.max(1))?);
            Some(RateLimiter::direct(quota))
        });
        Self { aimd, changed: Notify::new(), budget, paused_until: Mutex::new(None) }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, (Aimd, usize)>> {
        self.aimd.as_ref().map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Returns once no `Retry-After` pause is in force.
    pub async fn unpaused(&self) {
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            match until {
                Some(at) if Instant::now() < at => tokio::time::sleep_until(at).await,
                _ => break,
            }
        }
    }

    /// Waits out a `Retry-After` pause, then for a place in flight, then for the budget.
    pub async fn acquire(&self) -> Slot<'_> {
        self.unpaused().await;
        let mut in_probe = false;
        if self.aimd.is_some() {
            loop {
                let notified = self.changed.notified();
                {
                    let now = Instant::now();
                    let mut guard = self.lock().expect("auto");
                    let (aimd, inflight) = &mut *guard;
                    if *inflight < aimd.allowed(now) {
                        *inflight += 1;
                        in_probe = aimd.probing();
                        break;
                    }
                }
                // Woken by a finished write; the timeout lets a probe's end be noticed.
                let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
            }
        }
        if let Some(budget) = &self.budget {
            budget.until_ready().await;
        }
        Slot { pace: self, started: Instant::now(), in_probe, open: true }
    }

    /// A write finished. Returns the adaptive limit and floor after it (for the gauges); `None`
    /// when the concurrency is fixed.
    pub fn done(&self, mut slot: Slot<'_>, signal: Signal) -> Option<(f64, Option<Duration>)> {
        slot.open = false;
        let mut guard = self.lock()?;
        let (aimd, inflight) = &mut *guard;
        *inflight = inflight.saturating_sub(1);
        let now = Instant::now();
        aimd.sample(now.duration_since(slot.started), signal, slot.in_probe, now);
        let room = aimd.allowed(now).saturating_sub(*inflight);
        let state = (aimd.limit(), aimd.floor());
        drop(guard);
        if room > 1 {
            self.changed.notify_waiters(); // the limit grew: more than this one place is free
        } else {
            self.changed.notify_one();
        }
        Some(state)
    }

    /// The target said to come back after `after`: no write starts before then.
    pub fn pause(&self, after: Duration) {
        let at = Instant::now() + after;
        let mut until = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if until.is_none_or(|u| u < at) {
            *until = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The USL-shaped target of the benchmark: 50 ms floor, latency doubling at 200 in flight.
    fn latency(n: usize) -> Duration {
        let n = n as f64;
        Duration::from_secs_f64(0.050 + 1.25 * n * n / 1000.0 / 1000.0)
    }

    /// Runs the controller against that target in rounds of one round trip each.
    fn settle(rounds: usize) -> (Aimd, Vec<f64>) {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(512, now);
        let mut limits = Vec::new();
        for _ in 0..rounds {
            let n = aimd.allowed(now);
            let probe = aimd.probing();
            let rtt = latency(n);
            now += rtt;
            for _ in 0..n {
                aimd.sample(rtt, Signal::Answered, probe, now);
            }
            limits.push(aimd.limit());
        }
        (aimd, limits)
    }

    #[test]
    fn it_climbs_to_the_targets_sweet_spot_and_stays_there() {
        let (aimd, limits) = settle(2000);
        let tail = &limits[1000..];
        let mean = tail.iter().sum::<f64>() / tail.len() as f64;
        assert!((130.0..=300.0).contains(&mean), "settles where throughput is within 90% of the peak: {mean}");
        let floor = aimd.floor().expect("a floor");
        assert!(floor >= 50 * MS && floor < 60 * MS, "the floor is the latency at low concurrency: {floor:?}");
    }

    #[test]
    fn refusals_cut_the_limit_once_per_round_trip() {
        let now = Instant::now();
        let mut aimd = Aimd::new(512, now);
        for _ in 0..100 {
            aimd.sample(50 * MS, Signal::Answered, false, now);
        }
        let before = aimd.limit();
        for _ in 0..20 {
            aimd.sample(50 * MS, Signal::Refused, false, now);
        }
        assert!((aimd.limit() - before * BACKOFF_REFUSED).abs() < 1e-9, "one cut for a burst of refusals");
        aimd.sample(50 * MS, Signal::Refused, false, now + 200 * MS);
        assert!(aimd.limit() < before * BACKOFF_REFUSED, "a later refusal cuts again");
        let low = aimd.limit();
        aimd.sample(50 * MS, Signal::Answered, false, now + 300 * MS);
        assert!(aimd.limit() > low && aimd.limit() < low + 1.0, "then additive increase, not doubling");
    }

    #[test]
    fn a_target_that_became_slower_is_measured_again() {
        let mut now = Instant::now();
        let mut aimd = Aimd::new(64, now);
        for _ in 0..50 {
            aimd.sample(10 * MS, Signal::Answered, false, now);
        }
        // From now on 100 ms at any concurrency: without a new floor the limit would sink to 1.
        for _ in 0..2000 {
            let probe = aimd.probing();
            let _ = aimd.allowed(now);
            now += 100 * MS;
            aimd.sample(100 * MS, Signal::Answered, probe, now);
        }
        assert_eq!(aimd.floor(), Some(100 * MS));
        assert!(aimd.limit() > 10.0, "the limit recovered: {}", aimd.limit());
    }

    #[test]
    fn concurrency_is_a_number_or_auto() {
        assert_eq!(parse_concurrency("auto"), Ok(Concurrency::Auto));
        assert_eq!(parse_concurrency("64"), Ok(Concurrency::Fixed(64)));
        assert!(parse_concurrency("0").is_err());
        assert!(parse_concurrency("lots").is_err());
    }

    #[tokio::test]
    async fn a_retry_after_pauses_every_write() {
        let pace = Pace::new(Concurrency::Fixed(8), 8, None);
        pace.pause(Duration::from_millis(300));
        let start = Instant::now();
        let slot = pace.acquire().await;
        assert!(start.elapsed() >= Duration::from_millis(290), "waited {:?}", start.elapsed());
        pace.done(slot, Signal::Answered);
    }
}
