//! W3C `traceparent` values carried in every message: a fetch starts a trace, every later hop
//! keeps the trace id and gets a span id of its own.

use crate::rng::Rng;

fn hex(bytes: u64, width: usize) -> String {
    format!("{bytes:0width$x}")
}

/// A new trace (version 00, sampled).
pub fn new_traceparent() -> String {
    let mut rng = Rng::from_entropy();
    let trace = format!("{}{}", hex(rng.next_u64(), 16), hex(rng.next_u64(), 16));
    format!("00-{trace}-{}-01", hex(rng.next_u64() | 1, 16))
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
        Some(trace) => format!("00-{trace}-{}-01", hex(Rng::from_entropy().next_u64() | 1, 16)),
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
    fn a_malformed_parent_starts_a_new_trace() {
        let child = child_traceparent(Some("garbage"));
        assert!(trace_id(&child).is_some());
    }
}
