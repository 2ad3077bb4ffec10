//! API calls in flight per merchant, keyed by caller (the `User-Agent`): how many distinct callers
//! ever had a call in flight for one merchant at the same moment (two fetcher replicas working one
//! account at once shows here as 2), how many calls at once, and how many callers were seen.
//! A call counts from arrival to its answer (simulated latency included) through [`InFlightGuard`].

use std::{collections::HashMap, sync::Mutex};

use axum::http::{HeaderMap, header};

/// The caller of a request: its `User-Agent`, or `unknown` without one.
pub fn caller(headers: &HeaderMap) -> String {
    match headers.get(header::USER_AGENT) {
        Some(value) if !value.is_empty() => String::from_utf8_lossy(value.as_bytes()).into_owned(),
        _ => "unknown".to_string(),
    }
}

/// What `GET /admin/stats` shows of one merchant's concurrency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Concurrency {
    /// The most distinct callers with a call in flight at the same moment.
    pub max_concurrent_callers: u32,
    /// The most calls in flight at the same moment, from any callers.
    pub max_concurrent_calls: u32,
    /// Distinct callers seen.
    pub callers: u32,
}

#[derive(Debug, Default)]
struct Inner {
    /// Calls in flight by caller; a caller stays (at 0) once seen, so `len()` counts callers seen.
    by_caller: HashMap<String, u32>,
    /// Callers with at least one call in flight.
    active_callers: u32,
    /// Calls in flight.
    calls: u32,
    max: Concurrency,
}

/// One merchant's calls in flight. Empty until the first call (no allocation).
#[derive(Debug, Default)]
pub struct InFlight {
    inner: Mutex<Inner>,
}

impl InFlight {
    /// Counts a call by `caller` as in flight until the guard drops.
    pub fn enter(&self, caller: String) -> InFlightGuard<'_> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let count = inner.by_caller.entry(caller.clone()).or_default();
        *count += 1;
        if *count == 1 {
            inner.active_callers += 1;
        }
        inner.calls += 1;
        inner.max.max_concurrent_callers = inner.max.max_concurrent_callers.max(inner.active_callers);
        inner.max.max_concurrent_calls = inner.max.max_concurrent_calls.max(inner.calls);
        inner.max.callers = u32::try_from(inner.by_caller.len()).unwrap_or(u32::MAX);
        InFlightGuard { in_flight: self, caller }
    }

    pub fn snapshot(&self) -> Concurrency {
        self.lock().max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A call in flight; dropping it (when the answer is produced, or the request is abandoned) ends it.
#[must_use = "the call is in flight only while the guard lives"]
pub struct InFlightGuard<'a> {
    in_flight: &'a InFlight,
    caller: String,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut inner = self.in_flight.lock();
        let inner = &mut *inner;
        if let Some(count) = inner.by_caller.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.active_callers = inner.active_callers.saturating_sub(1);
            }
        }
        inner.calls = inner.calls.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_calls_from_two_callers_count_two_sequential_ones_one() {
        let sequential = InFlight::default();
        drop(sequential.enter("a".into()));
        drop(sequential.enter("b".into()));
        assert_eq!(
            sequential.snapshot(),
            Concurrency { max_concurrent_callers: 1, max_concurrent_calls: 1, callers: 2 }
        );

        let overlapping = InFlight::default();
        let a1 = overlapping.enter("a".into());
        let a2 = overlapping.enter("a".into());
        assert_eq!(overlapping.snapshot().max_concurrent_callers, 1, "one caller, two calls");
        drop(a1);
        let b = overlapping.enter("b".into());
        drop((a2, b));
        let _c = overlapping.enter("c".into());
        assert_eq!(
            overlapping.snapshot(),
            Concurrency { max_concurrent_callers: 2, max_concurrent_calls: 2, callers: 3 }
        );
    }

    #[test]
    fn a_missing_user_agent_is_the_caller_unknown() {
        let mut headers = HeaderMap::new();
        assert_eq!(caller(&headers), "unknown");
        headers.insert(header::USER_AGENT, "orderflow-fetcher/1.0 (host-7)".parse().expect("header"));
        assert_eq!(caller(&headers), "orderflow-fetcher/1.0 (host-7)");
    }
}
