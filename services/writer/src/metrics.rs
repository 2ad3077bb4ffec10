//! The writer's Prometheus metrics.

use orderflow_shared::amqp::BrokerMetrics;
use orderflow_shared::metrics::Register;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Write attempts by outcome: written, soft_failure, http_5xx, http_429, http_408, timeout, connect,
    /// transport, rejected, and target-level http_401/403/404/407, tls, dns.
    pub writes: IntCounterVec,
    pub write_seconds: Histogram,
    /// From the fetcher's publish of the page to the target's 2xx.
    pub fetch_to_write_seconds: Histogram,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub breaker_state: IntGauge,
    pub breaker_transitions: IntCounterVec,
    pub inflight: IntGauge,
    /// Transient failures retried in place while the breaker was open (no attempt spent).
    pub held_during_outage: IntCounter,
    /// 1 while the target refuses our credentials (401/403/407): every write waits.
    pub target_unauthorized: IntGauge,
    /// Records held past `HOLD_LIMIT` and parked in a retry tier.
    pub parked: IntCounter,
    /// Retry and dead-letter publishes tried again after a nack or a return.
    pub publish_retries: IntCounter,
    /// WRITER_CONCURRENCY=auto: the writes allowed in flight now.
    pub concurrency_limit: IntGauge,
    /// WRITER_CONCURRENCY=auto: the target's latency floor as measured.
    pub latency_floor: prometheus::Gauge,
    /// Transient failures retried in place (before any retry tier).
    pub retries_in_place: IntCounter,
    pub throttled: IntCounter,
    pub broker: BrokerMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        Self {
            writes: writes(&r),
            write_seconds: r.histogram("orderflow_write_duration_seconds", "Target write latency.", &WRITE_BUCKETS),
            fetch_to_write_seconds: r.histogram(
                "orderflow_fetch_to_write_seconds",
                "From the page's publish by the fetcher to the record's write.",
                &E2E_BUCKETS,
            ),
            retries: r.counter_vec("orderflow_write_retries_total", "Records sent to a retry tier, by tier.", &["tier"]),
            dead_letters: dead_letters(&r),
            breaker_state: r.gauge("orderflow_write_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open."),
            breaker_transitions: breaker_transitions(&r),
            inflight: r.gauge("orderflow_write_inflight", "Writes in flight."),
            held_during_outage: r.counter(
                "orderflow_write_held_during_outage_total",
                "Transient failures retried in place while the breaker was open.",
            ),
            target_unauthorized: r.gauge(
                "orderflow_write_target_unauthorized",
                "1 while the target refuses the writer's credentials (401/403/407); records wait.",
            ),
            parked: r.counter(
                "orderflow_write_parked_total",
                "Records held past HOLD_LIMIT (the target refusing writes, or the broker refusing their retry), parked in a retry tier.",
            ),
            publish_retries: r.counter(
                "orderflow_write_publish_retries_total",
                "Retry and dead-letter publishes tried again after the broker refused them (nack or return).",
            ),
            concurrency_limit: r.gauge(
                "orderflow_write_concurrency_limit",
                "Writes allowed in flight now (WRITER_CONCURRENCY=auto adapts it).",
            ),
            latency_floor: r.float_gauge(
                "orderflow_write_latency_floor_seconds",
                "The target's latency floor as adaptive concurrency measures it.",
            ),
            retries_in_place: r.counter(
                "orderflow_write_retries_in_place_total",
                "Transient failures retried at once, in place, before any retry tier.",
            ),
            throttled: r.counter(
                "orderflow_write_throttled_total",
                "Writes the target answered 429: the record waited out the pause in place, spending no attempt.",
            ),
            broker: BrokerMetrics::register(&registry),
            registry,
        }
    }
}

const WRITE_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const E2E_BUCKETS: [f64; 13] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

// The label sets a dashboard expects are created at start, so their series read 0, not absent.

fn writes(r: &Register) -> IntCounterVec {
    let writes = r.counter_vec("orderflow_write_requests_total", "Write attempts by outcome.", &["outcome"]);
    writes.with_label_values(&["written"]);
    writes
}

fn dead_letters(r: &Register) -> IntCounterVec {
    let dead_letters = r.counter_vec(
        "orderflow_dead_letters_total",
        "Records dead-lettered, by class and reason.",
        &["class", "reason"],
    );
    for (class, reason) in [("permanent", "target_rejected"), ("exhausted", "exhausted")] {
        dead_letters.with_label_values(&[class, reason]);
    }
    dead_letters
}

fn breaker_transitions(r: &Register) -> IntCounterVec {
    let transitions =
        r.counter_vec("orderflow_write_breaker_transitions_total", "Breaker state changes, by new state.", &["to"]);
    for to in ["open", "half_open", "closed"] {
        transitions.with_label_values(&[to]);
    }
    transitions
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
