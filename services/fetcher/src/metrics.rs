//! The fetcher's Prometheus metrics (labels: account, outcome — all low-cardinality).

use orderflow_shared::{amqp::BrokerMetrics, metrics::Register};
use prometheus::{CounterVec, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// API calls by account and outcome (ok, code_199, http_5xx, timeout, …).
    pub requests: IntCounterVec,
    pub orders: IntCounterVec,
    pub pages: IntCounterVec,
    /// now − the time up to which the account is known to be fully read.
    pub cursor_lag: GaugeVec,
    pub budget_wait: CounterVec,
    pub token_refreshes: IntCounterVec,
    /// Passes by account and result (caught_up, partial, failed).
    pub passes: IntCounterVec,
    /// 1 when an account is stopped on a permanent error.
    pub stopped: IntGaugeVec,
    /// Accounts this replica holds now.
    pub held: IntGauge,
    /// Accounts this replica stopped working because the broker gave them to another replica
    /// without closing its channel (a commit did not come back).
    pub ownership_lost: IntCounter,
    pub broker: BrokerMetrics,
    /// Unix time of the last successful page publish.
    pub last_publish: Gauge,
    /// Rows the lagging sweep found that the start_ts cursor had missed (late commits).
    pub sweep_found: IntCounterVec,
    /// Rows the sweep published again because it could not tell them apart (modified before
    /// this replica took the account over); the target's idCheck absorbs them.
    pub sweep_republished: IntCounterVec,
    /// Sweeps by account and result (done, partial, failed).
    pub sweeps: IntCounterVec,
    /// The scheduled audit's findings (FETCH_AUDIT_EVERY), by account.
    pub audit_missing: IntGaugeVec,
    pub audit_last_complete: GaugeVec,
    pub audit_runs: IntCounterVec,
}

/// The label of the per-account series.
const ACCOUNT: &[&str] = &["account"];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = Register(&registry);
        Self {
            requests: r.counter_vec(
                "orderflow_fetch_requests_total",
                "Jushuitan API calls by account and outcome.",
                &["account", "outcome"],
            ),
            orders: r.counter_vec("orderflow_fetch_orders_total", "Orders fetched and published, by account.", ACCOUNT),
            pages: r.counter_vec("orderflow_fetch_pages_total", "Pages published (confirmed), by account.", ACCOUNT),
            token_refreshes: r.counter_vec(
                "orderflow_fetch_token_refreshes_total",
                "Access-token refreshes, by account.",
                ACCOUNT,
            ),
            passes: r.counter_vec(
                "orderflow_fetch_passes_total",
                "Fetch passes by account and result.",
                &["account", "result"],
            ),
            cursor_lag: r.float_gauge_vec(
                "orderflow_fetch_cursor_lag_seconds",
                "Now minus the time up to which the account is fully read.",
                ACCOUNT,
            ),
            budget_wait: r.float_counter_vec(
                "orderflow_fetch_budget_wait_seconds_total",
                "Time spent waiting for the rate budget, by account.",
                ACCOUNT,
            ),
            stopped: r.gauge_vec(
                "orderflow_fetch_account_stopped",
                "1 when the account is stopped on a permanent error.",
                ACCOUNT,
            ),
            held: r.gauge("orderflow_fetch_accounts_held", "Accounts this replica is fetching now."),
            ownership_lost: r.counter(
                "orderflow_fetch_ownership_lost_total",
                "Accounts this replica stopped working because a commit did not come back (another replica owns them).",
            ),
            broker: BrokerMetrics::register(&registry),
            last_publish: r.float_gauge(
                "orderflow_fetch_last_publish_timestamp_seconds",
                "Unix time of the last confirmed page publish.",
            ),
            sweep_found: r.counter_vec(
                "orderflow_fetch_sweep_found_total",
                "Rows the lagging sweep found that the start_ts cursor had missed (late commits), by account.",
                ACCOUNT,
            ),
            sweep_republished: r.counter_vec(
                "orderflow_fetch_sweep_republished_total",
                "Rows the sweep published again, unable to tell them apart (modified before this replica took the account).",
                ACCOUNT,
            ),
            sweeps: r.counter_vec(
                "orderflow_fetch_sweeps_total",
                "Lagging sweeps by account and result.",
                &["account", "result"],
            ),
            audit_missing: r.gauge_vec(
                "orderflow_audit_missing",
                "Orders the last scheduled audit found Confirmed at the source and nowhere in the pipeline, by account.",
                ACCOUNT,
            ),
            audit_last_complete: r.float_gauge_vec(
                "orderflow_audit_last_complete_timestamp_seconds",
                "End of the newest audit window with every Confirmed order accounted for (unix time), by account.",
                ACCOUNT,
            ),
            audit_runs: r.counter_vec(
                "orderflow_audit_runs_total",
                "Scheduled audits by account and result (complete, incomplete, failed).",
                &["account", "result"],
            ),
            registry,
        }
    }
}

impl Metrics {
    /// Creates every per-account series at zero, so dashboards and alerts see the account at once.
    pub fn track_account(&self, account: &str) {
        self.stopped.with_label_values(&[account]).set(0);
        self.requests.with_label_values(&[account, "ok"]);
        self.orders.with_label_values(&[account]);
        self.pages.with_label_values(&[account]);
        self.token_refreshes.with_label_values(&[account]);
        self.budget_wait.with_label_values(&[account]);
        self.passes.with_label_values(&[account, "caught_up"]);
        self.cursor_lag.with_label_values(&[account]);
        self.sweep_found.with_label_values(&[account]);
        self.sweep_republished.with_label_values(&[account]);
        self.audit_runs.with_label_values(&[account, "complete"]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use prometheus::proto::MetricType::{COUNTER, GAUGE};

    use super::*;

    /// Names, help texts and kinds are a contract with dashboards and alerts.
    #[test]
    fn the_fetch_metrics_keep_their_names_help_and_kinds() {
        let metrics = Metrics::new();
        metrics.track_account("a");
        metrics.held.set(0);
        metrics.last_publish.set(0.0);
        metrics.sweeps.with_label_values(&["a", "done"]);
        let expected = [
            ("orderflow_fetch_account_stopped", "1 when the account is stopped on a permanent error.", GAUGE),
            ("orderflow_fetch_accounts_held", "Accounts this replica is fetching now.", GAUGE),
            (
                "orderflow_fetch_budget_wait_seconds_total",
                "Time spent waiting for the rate budget, by account.",
                COUNTER,
            ),
            ("orderflow_fetch_cursor_lag_seconds", "Now minus the time up to which the account is fully read.", GAUGE),
            ("orderflow_fetch_last_publish_timestamp_seconds", "Unix time of the last confirmed page publish.", GAUGE),
            ("orderflow_fetch_orders_total", "Orders fetched and published, by account.", COUNTER),
            (
                "orderflow_fetch_ownership_lost_total",
                "Accounts this replica stopped working because a commit did not come back (another replica owns them).",
                COUNTER,
            ),
            ("orderflow_fetch_pages_total", "Pages published (confirmed), by account.", COUNTER),
            ("orderflow_fetch_passes_total", "Fetch passes by account and result.", COUNTER),
            ("orderflow_fetch_requests_total", "Jushuitan API calls by account and outcome.", COUNTER),
            (
                "orderflow_fetch_sweep_found_total",
                "Rows the lagging sweep found that the start_ts cursor had missed (late commits), by account.",
                COUNTER,
            ),
            (
                "orderflow_fetch_sweep_republished_total",
                "Rows the sweep published again, unable to tell them apart (modified before this replica took the account).",
                COUNTER,
            ),
            ("orderflow_fetch_sweeps_total", "Lagging sweeps by account and result.", COUNTER),
            ("orderflow_fetch_token_refreshes_total", "Access-token refreshes, by account.", COUNTER),
        ];
        metrics.audit_missing.with_label_values(&["a"]).set(0);
        metrics.audit_last_complete.with_label_values(&["a"]).set(0.0);
        metrics.audit_runs.with_label_values(&["a", "complete"]);
        let audit: Vec<_> = metrics
            .registry
            .gather()
            .into_iter()
            .filter(|f| f.name().starts_with("orderflow_audit_"))
            .map(|f| (f.name().to_string(), f.get_field_type()))
            .collect();
        assert_eq!(
            audit,
            [
                ("orderflow_audit_last_complete_timestamp_seconds".to_string(), GAUGE),
                ("orderflow_audit_missing".to_string(), GAUGE),
                ("orderflow_audit_runs_total".to_string(), COUNTER),
            ]
        );
        let found: Vec<_> = metrics
            .registry
            .gather()
            .into_iter()
            .filter(|f| f.name().starts_with("orderflow_fetch_"))
            .map(|f| (f.name().to_string(), f.help().to_string(), f.get_field_type()))
            .collect();
        let expected: Vec<_> = expected.iter().map(|(n, h, t)| (n.to_string(), h.to_string(), *t)).collect();
        assert_eq!(found, expected);
    }
}
