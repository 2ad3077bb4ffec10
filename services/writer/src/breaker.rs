//! Circuit breaker for the target: when most recent writes fail (or connections are refused), stop
//! writing, probe with backoff, and close by itself when a probe succeeds. While it is open,
//! records wait instead of spending attempts. The state machine is pure; the async wrapper waits.

use std::{collections::VecDeque, sync::Mutex, time::Duration};

use tokio::{sync::Notify, time::Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Recent results considered.
    pub window: usize,
    /// Minimum results before the failure ratio counts.
    pub min_samples: usize,
    /// Open when this share of the window failed.
    pub failure_ratio: f64,
    /// Open after this many consecutive connection failures.
    pub connection_failures: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// A probe not reported within this is considered lost.
    pub probe_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            window: 50,
            min_samples: 20,
            failure_ratio: 0.6,
            connection_failures: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            probe_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
pub struct Core {
    settings: Settings,
    state: State,
    window: VecDeque<bool>,
    consecutive_connection_failures: u32,
    open_until: Instant,
    backoff: Duration,
    probe_started: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Go,
    /// Go, as the single probe of a half-open breaker.
    Probe,
    WaitUntil(Instant),
    /// A probe is in flight: wait for its result.
    WaitForProbe,
}

impl Core {
    pub fn new(settings: Settings) -> Self {
        let backoff = settings.initial_backoff;
        Self {
            settings,
            state: State::Closed,
            window: VecDeque::new(),
            consecutive_connection_failures: 0,
            open_until: Instant::now(),
            backoff,
            probe_started: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn permit(&mut self, now: Instant) -> Permit {
        match self.state {
            State::Closed => Permit::Go,
            State::Open if now < self.open_until => Permit::WaitUntil(self.open_until),
            State::Open => {
                self.state = State::HalfOpen;
                self.probe_started = Some(now);
                Permit::Probe
            }
            State::HalfOpen => match self.probe_started {
                Some(started) if now.duration_since(started) < self.settings.probe_timeout => Permit::WaitForProbe,
                _ => {
                    self.probe_started = Some(now);
                    Permit::Probe
                }
            },
        }
    }

    /// Records a result; returns the new state when it changed. `first_attempt`: a record's first
    /// write. Only first attempts (and connection failures, which are never about one record) feed
    /// the failure ratio: retried records are the ones already known to fail, so a handful of
    /// records the target always refuses cannot make a healthy target look down.
    pub fn record(
        &mut self,
        ok: bool,
        connection_failure: bool,
        probe: bool,
        first_attempt: bool,
        now: Instant,
    ) -> Option<State> {
        let before = self.state;
        if probe || self.state == State::HalfOpen {
            if ok {
                self.close();
            } else if probe {
                self.open(now, true);
            }
            return (self.state != before).then_some(self.state);
        }
        if self.state == State::Open || !(first_attempt || connection_failure) {
            return None;
        }
        self.window.push_back(ok);
        while self.window.len() > self.settings.window {
            self.window.pop_front();
        }
        self.consecutive_connection_failures =
            if connection_failure { self.consecutive_connection_failures + 1 } else { 0 };
        let failures = self.window.iter().filter(|ok| !**ok).count();
        let ratio_tripped = self.window.len() >= self.settings.min_samples
            && failures as f64 >= self.settings.failure_ratio * self.window.len() as f64;
        if ratio_tripped || self.consecutive_connection_failures >= self.settings.connection_failures {
            self.open(now, false);
        }
        (self.state != before).then_some(self.state)
    }

    /// A target-level failure (refused credentials, no such endpoint, TLS or DNS): every record
    /// would get the same answer, so the breaker opens at once whatever the window says. A failed
    /// probe reopens it with a longer wait; answers to writes sent before it opened change nothing.
    pub fn trip(&mut self, probe: bool, now: Instant) -> Option<State> {
        let before = self.state;
        match (self.state, probe) {
            (State::Closed, _) => self.open(now, false),
            (_, true) => self.open(now, true),
            (State::Open | State::HalfOpen, false) => {}
        }
        (self.state != before).then_some(self.state)
    }

    fn open(&mut self, now: Instant, again: bool) {
        if again {
            self.backoff = (self.backoff * 2).min(self.settings.max_backoff);
        } else {
            self.backoff = self.settings.initial_backoff;
        }
        self.state = State::Open;
        self.open_until = now + self.backoff;
        self.probe_started = None;
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.window.clear();
        self.consecutive_connection_failures = 0;
        self.backoff = self.settings.initial_backoff;
        self.probe_started = None;
    }
}

/// The shared breaker: `acquire` before a write, `record` after it.
pub struct Breaker {
    core: Mutex<Core>,
    changed: Notify,
}

impl Breaker {
    pub fn new(settings: Settings) -> Self {
        Self { core: Mutex::new(Core::new(settings)), changed: Notify::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.lock().state()
    }

    /// Waits until a write may go; `true` when this write is the probe.
    pub async fn acquire(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            let permit = self.lock().permit(Instant::now());
            match permit {
                Permit::Go => return false,
                Permit::Probe => return true,
                Permit::WaitUntil(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = notified => {}
                    }
                }
                Permit::WaitForProbe => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = notified => {}
                    }
                }
            }
        }
    }

    pub fn record(&self, ok: bool, connection_failure: bool, probe: bool, first_attempt: bool) -> Option<State> {
        let changed = self.lock().record(ok, connection_failure, probe, first_attempt, Instant::now());
        if changed.is_some() {
            self.changed.notify_waiters();
        }
        changed
    }

    /// See [`Core::trip`].
    pub fn trip(&self, probe: bool) -> Option<State> {
        let changed = self.lock().trip(probe, Instant::now());
        if changed.is_some() {
            self.changed.notify_waiters();
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            window: 10,
            min_samples: 5,
            failure_ratio: 0.6,
            connection_failures: 3,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            probe_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn scattered_failures_keep_it_closed() {
        let mut b = Core::new(settings());
        let now = Instant::now();
        for i in 0..100 {
            b.record(i % 4 != 0, false, false, true, now);
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn broad_failure_opens_then_a_good_probe_closes() {
        let mut b = Core::new(settings());
        let t0 = Instant::now();
        for _ in 0..5 {
            b.record(false, false, false, true, t0);
        }
        assert_eq!(b.state(), State::Open);
        assert!(matches!(b.permit(t0), Permit::WaitUntil(_)));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(b.permit(later), Permit::Probe);
        assert_eq!(b.permit(later), Permit::WaitForProbe, "one probe at a time");
        assert_eq!(b.record(true, false, true, true, later), Some(State::Closed));
        assert_eq!(b.permit(later), Permit::Go);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_longer_wait() {
        let mut b = Core::new(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(false, true, false, true, t0);
        }
        assert_eq!(b.state(), State::Open, "consecutive connection failures open it");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.permit(t1), Permit::Probe);
        b.record(false, true, true, true, t1);
        match b.permit(t1) {
            Permit::WaitUntil(at) => assert_eq!(at, t1 + Duration::from_secs(2)),
            other => panic!("expected a wait, got {other:?}"),
        }
    }

    #[test]
    fn retried_records_that_keep_failing_do_not_open_it() {
        let mut b = Core::new(settings());
        let now = Instant::now();
        for _ in 0..100 {
            b.record(false, false, false, false, now);
        }
        assert_eq!(b.state(), State::Closed, "only first attempts measure the target's health");
        for _ in 0..5 {
            b.record(false, false, false, true, now);
        }
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn a_target_level_failure_opens_it_at_once_and_a_failed_probe_waits_longer() {
        let mut b = Core::new(settings());
        let t0 = Instant::now();
        b.record(true, false, false, true, t0);
        assert_eq!(b.trip(false, t0), Some(State::Open), "one 401 is enough");
        assert_eq!(b.trip(false, t0), None, "answers to writes sent earlier change nothing");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.permit(t1), Permit::Probe);
        assert_eq!(b.trip(false, t1), None, "a late answer while half-open is not the probe's");
        assert_eq!(b.trip(true, t1), Some(State::Open));
        match b.permit(t1) {
            Permit::WaitUntil(at) => assert_eq!(at, t1 + Duration::from_secs(2)),
            other => panic!("expected a wait, got {other:?}"),
        }
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(b.permit(t2), Permit::Probe);
        assert_eq!(b.record(true, false, true, true, t2), Some(State::Closed), "writing resumes by itself");
    }

    #[test]
    fn a_lost_probe_is_replaced_after_its_timeout() {
        let mut b = Core::new(settings());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(false, true, false, true, t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.permit(t1), Permit::Probe);
        assert_eq!(b.permit(t1 + Duration::from_secs(6)), Permit::Probe);
    }
}
