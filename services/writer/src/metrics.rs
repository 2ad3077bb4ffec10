//! The writer's Prometheus metrics.

use orderflow_shared::amqp::BrokerMetrics;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("unique metric");
        let writes =
            IntCounterVec::new(Opts::new("orderflow_write_requests_total", "Write attempts by outcome."), &["outcome"])
                .expect("metric");
        reg(Box::new(writes.clone()));
        let buckets = vec![0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
        let write_seconds = Histogram::with_opts(
            HistogramOpts::new("orderflow_write_duration_seconds", "Target write latency.").buckets(buckets.clone()),
        )
        .expect("metric");
        reg(Box::new(write_seconds.clone()));
        let fetch_to_write_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "orderflow_fetch_to_write_seconds",
                "From the page's publish by the fetcher to the record's write.",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
        )
        .expect("metric");
        reg(Box::new(fetch_to_write_seconds.clone()));
        let retries = IntCounterVec::new(
            Opts::new("orderflow_write_retries_total", "Records sent to a retry tier, by tier."),
            &["tier"],
        )
        .expect("metric");
        reg(Box::new(retries.clone()));
        let dead_letters = IntCounterVec::new(
            Opts::new("orderflow_dead_letters_total", "Records dead-lettered, by class and reason."),
            &["class", "reason"],
        )
        .expect("metric");
        reg(Box::new(dead_letters.clone()));
        let breaker_state =
            IntGauge::new("orderflow_write_breaker_state", "Circuit breaker: 0 closed, 1 open, 2 half-open.")
                .expect("metric");
        reg(Box::new(breaker_state.clone()));
        let breaker_transitions = IntCounterVec::new(
            Opts::new("orderflow_write_breaker_transitions_total", "Breaker state changes, by new state."),
            &["to"],
        )
        .expect("metric");
        reg(Box::new(breaker_transitions.clone()));
        let inflight = IntGauge::new("orderflow_write_inflight", "Writes in flight.").expect("metric");
        reg(Box::new(inflight.clone()));
        let held_during_outage = IntCounter::new(
            "orderflow_write_held_during_outage_total",
            "Transient failures retried in place while the breaker was open.",
        )
        .expect("metric");
        reg(Box::new(held_during_outage.clone()));
        let target_unauthorized = IntGauge::new(
            "orderflow_write_target_unauthorized",
            "1 while the target refuses the writer's credentials (401/403/407); records wait.",
        )
        .expect("metric");
        reg(Box::new(target_unauthorized.clone()));
        let parked = IntCounter::new(
            "orderflow_write_parked_total",
            "Records held past HOLD_LIMIT while the target refused writes, parked in a retry tier.",
        )
        .expect("metric");
        reg(Box::new(parked.clone()));
        let concurrency_limit = IntGauge::new(
            "orderflow_write_concurrency_limit",
            "Writes allowed in flight now (WRITER_CONCURRENCY=auto adapts it).",
        )
        .expect("metric");
        reg(Box::new(concurrency_limit.clone()));
        let latency_floor = prometheus::Gauge::new(
            "orderflow_write_latency_floor_seconds",
            "The target's latency floor as adaptive concurrency measures it.",
        )
        .expect("metric");
        reg(Box::new(latency_floor.clone()));
        let retries_in_place = IntCounter::new(
            "orderflow_write_retries_in_place_total",
            "Transient failures retried at once, in place, before any retry tier.",
        )
        .expect("metric");
        reg(Box::new(retries_in_place.clone()));
        let throttled = IntCounter::new(
            "orderflow_write_throttled_total",
            "Writes the target answered 429: the record waited out the pause in place, spending no attempt.",
        )
        .expect("metric");
        reg(Box::new(throttled.clone()));
        let broker = BrokerMetrics::register(&registry);
        writes.with_label_values(&["written"]);
        for (class, reason) in [("permanent", "target_rejected"), ("exhausted", "exhausted")] {
            dead_letters.with_label_values(&[class, reason]);
        }
        for to in ["open", "half_open", "closed"] {
            breaker_transitions.with_label_values(&[to]);
        }
        Self {
            registry,
            writes,
            write_seconds,
            fetch_to_write_seconds,
            retries,
            dead_letters,
            breaker_state,
            breaker_transitions,
            inflight,
            held_during_outage,
            target_unauthorized,
            parked,
            concurrency_limit,
            latency_floor,
            retries_in_place,
            throttled,
            broker,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
