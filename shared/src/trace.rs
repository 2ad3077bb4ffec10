//! W3C `traceparent` values carried in every message: a fetch starts a trace, every later hop
//! keeps the trace id and gets a span id of its own.
//!
//! Ids come from a per-thread fastrand generator seeded from the OS's randomness
//! ([`crate::rng::with_ids`]), so no two threads, tasks or replicas draw the same sequence; an
//! all-zero id, which W3C forbids, is never drawn.

use crate::rng::with_ids;

/// A fresh span id: 16 hex digits, never all zeros.
fn span_id() -> String {
    format!("{:016x}", with_ids(|rng| rng.u64(1..)))
}

/// A new trace (version 00, sampled).
pub fn new_traceparent() -> String {
    format!("00-{:032x}-{}-01", with_ids(|rng| rng.u128(1..)), span_id())
}

/// The trace id of a `traceparent`, if it is well-formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let ok = version.len() == 2
        && trace.len() == 32
        && span.len() == 16
        && flags.len() == 2
        && trace.bytes().all(|b| b.is_ascii_hexdigit())
        && trace.bytes().any(|b| b != b'0');
    ok.then_some(trace)
}

/// A child hop of the same trace; a new trace when the parent is missing or malformed.
pub fn child_traceparent(parent: Option<&str>) -> String {
    match parent.and_then(trace_id) {
        Some(trace) => format!("00-{trace}-{}-01", span_id()),
        None => new_traceparent(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let parent = new_traceparent();
        let child = child_traceparent(Some(&parent));
        assert_eq!(trace_id(&parent), trace_id(&child));
        assert_ne!(parent, child);
        assert_eq!(child.len(), 55);
    }

    #[test]
    fn ids_do_not_collide_across_threads() {
        let draw = || (0..10_000).map(|_| new_traceparent()).collect::<Vec<_>>();
        let threads: Vec<_> = (0..4).map(|_| std::thread::spawn(draw)).collect();
        let all: Vec<String> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
        let (trace_ids, span_ids): (std::collections::HashSet<_>, std::collections::HashSet<_>) =
            all.iter().map(|t| (t[3..35].to_string(), t[36..52].to_string())).unzip();
        assert_eq!((trace_ids.len(), span_ids.len()), (40_000, 40_000));
        assert!(all.iter().all(|t| trace_id(t).is_some()));
    }

    #[test]
    fn a_malformed_parent_starts_a_new_trace() {
        let child = child_traceparent(Some("garbage"));
        assert!(trace_id(&child).is_some());
    }
}
