//! The fetcher's Prometheus metrics (labels: account, outcome — all low-cardinality).

use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// API calls by account and outcome (ok, code_199, http_5xx, timeout, …).
    pub requests: IntCounterVec,
    pub orders: IntCounterVec,
    pub pages: IntCounterVec,
    /// now − the time up to which the account is known to be fully read.
    pub cursor_lag: GaugeVec,
    pub budget_wait: prometheus::CounterVec,
    pub token_refreshes: IntCounterVec,
    /// Passes by account and result (caught_up, partial, failed).
    pub passes: IntCounterVec,
    /// 1 when an account is stopped on a permanent error.
    pub stopped: IntGaugeVec,
    /// Accounts this replica holds now.
    pub held: IntGauge,
    pub broker: orderflow_shared::amqp::BrokerMetrics,
    /// Unix time of the last successful page publish.
    pub last_publish: Gauge,
    /// Rows the lagging sweep found that the start_ts cursor had missed (late commits).
    pub sweep_found: IntCounterVec,
    /// Rows the sweep published again because it could not tell them apart (modified before
    /// this replica took the account over); the target's idCheck absorbs them.
    pub sweep_republished: IntCounterVec,
    /// Sweeps by account and result (done, partial, failed).
    pub sweeps: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let requests = counter(
            "orderflow_fetch_requests_total",
            "Jushuitan API calls by account and outcome.",
            &["account", "outcome"],
        );
        let orders = counter("orderflow_fetch_orders_total", "Orders fetched and published, by account.", &["account"]);
        let pages = counter("orderflow_fetch_pages_total", "Pages published (confirmed), by account.", &["account"]);
        let token_refreshes =
            counter("orderflow_fetch_token_refreshes_total", "Access-token refreshes, by account.", &["account"]);
        let passes =
            counter("orderflow_fetch_passes_total", "Fetch passes by account and result.", &["account", "result"]);
        let cursor_lag = GaugeVec::new(
            Opts::new(
                "orderflow_fetch_cursor_lag_seconds",
                "Now minus the time up to which the account is fully read.",
            ),
            &["account"],
        )
        .expect("valid metric");
        registry.register(Box::new(cursor_lag.clone())).expect("unique metric");
        let budget_wait = prometheus::CounterVec::new(
            Opts::new(
                "orderflow_fetch_budget_wait_seconds_total",
                "Time spent waiting for the rate budget, by account.",
            ),
            &["account"],
        )
        .expect("valid metric");
        registry.register(Box::new(budget_wait.clone())).expect("unique metric");
        let stopped = IntGaugeVec::new(
            Opts::new("orderflow_fetch_account_stopped", "1 when the account is stopped on a permanent error."),
            &["account"],
        )
        .expect("valid metric");
        registry.register(Box::new(stopped.clone())).expect("unique metric");
        let held = IntGauge::new("orderflow_fetch_accounts_held", "Accounts this replica is fetching now.")
            .expect("valid metric");
        registry.register(Box::new(held.clone())).expect("unique metric");
        let broker = orderflow_shared::amqp::BrokerMetrics::register(&registry);
        let last_publish = Gauge::new(
            "orderflow_fetch_last_publish_timestamp_seconds",
            "Unix time of the last confirmed page publish.",
        )
        .expect("valid metric");
        registry.register(Box::new(last_publish.clone())).expect("unique metric");
        let sweep_found = counter(
            "orderflow_fetch_sweep_found_total",
            "Rows the lagging sweep found that the start_ts cursor had missed (late commits), by account.",
            &["account"],
        );
        let sweep_republished = counter(
            "orderflow_fetch_sweep_republished_total",
            "Rows the sweep published again, unable to tell them apart (modified before this replica took the account).",
            &["account"],
        );
        let sweeps =
            counter("orderflow_fetch_sweeps_total", "Lagging sweeps by account and result.", &["account", "result"]);
        Self {
            sweep_found,
            sweep_republished,
            sweeps,
            registry,
            requests,
            orders,
            pages,
            cursor_lag,
            budget_wait,
            token_refreshes,
            passes,
            stopped,
            held,
            broker,
            last_publish,
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
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
