//! The transformer's Prometheus metrics.

use orderflow_shared::{amqp::BrokerMetrics, metrics::Register};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub pages: IntCounterVec,
    pub records: IntCounter,
    pub rejected: IntCounterVec,
    pub dropped: IntCounter,
    pub duplicates: IntCounter,
    pub publish_retries: IntCounter,
    pub page_seconds: Histogram,
    pub pages_in_flight: IntGauge,
    pub parked: IntCounter,
    pub broker: BrokerMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        let page_buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let metrics = Self {
            pages: r.counter_vec(
                "orderflow_transform_pages_total",
                "Pages handled, by outcome (ok, poison).",
                &["outcome"],
            ),
            records: r.counter("orderflow_transform_records_total", "Records published (confirmed)."),
            rejected: r.counter_vec(
                "orderflow_transform_rejected_total",
                "Orders dead-lettered, by reason.",
                &["reason"],
            ),
            dropped: r.counter("orderflow_transform_dropped_total", "Orders dropped by a mapping filter."),
            duplicates: r.counter(
                "orderflow_transform_duplicates_total",
                "Orders repeated inside a page (highest version kept).",
            ),
            publish_retries: r.counter(
                "orderflow_transform_publish_retries_total",
                "Record publishes retried after a nack or return.",
            ),
            page_seconds: r.histogram(
                "orderflow_transform_page_seconds",
                "Time from receiving a page to acking it.",
                &page_buckets,
            ),
            pages_in_flight: r.gauge(
                "orderflow_transform_pages_in_flight",
                "Pages received and not yet acked (records being published and confirmed).",
            ),
            parked: r.counter(
                "orderflow_transform_parked_total",
                "Pages held past HOLD_LIMIT while the broker refused their records, parked back in the pages queue.",
            ),
            broker: BrokerMetrics::register(&registry),
            registry,
        };
        for outcome in ["ok", "poison"] {
            metrics.pages.with_label_values(&[outcome]);
        }
        for reason in ["invalid_record", "amount_mismatch", "poison_page", "unknown_schema", "oversized"] {
            metrics.rejected.with_label_values(&[reason]);
        }
        metrics
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
