//! `jst-sim`: a Jushuitan `orders.out.simple.query` simulator faithful enough to prove the
//! fetcher loses nothing: both API generations with real signing, validation codes, per-merchant
//! rate limits, expiring tokens, churn while clients page, late commits, and fault injection.
//! `GET /admin/truth` is the oracle every no-missed-order test compares against.

// Handlers return axum `Response`s as errors; their size does not matter here.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod api;
pub mod churn;
pub mod faults;
pub mod inflight;
pub mod limits;
pub mod model;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    routing::{get, post},
};
use clap::Parser;
use jiff::{SignedDuration, Timestamp};
use orderflow_shared::{rng::Rng, settings::parse_duration};
use tokio_util::sync::CancellationToken;

use crate::{
    churn::{Churn, ChurnClock, ChurnCounts},
    faults::Faults,
    inflight::InFlight,
    limits::{Limiter, Limits},
    store::{Credentials, Merchant},
};

/// Jushuitan API simulator (both generations) for tests, demos and benchmarks.
#[derive(Debug, Clone, Parser)]
#[command(name = "jst-sim", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "JST_SIM_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Seed for all generated data and randomness: the same seed gives the same orders.
    #[arg(long, env = "JST_SIM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Number of merchants, each with its own credentials, shops and orders (named m1, m2, …).
    #[arg(long, env = "JST_SIM_ACCOUNTS", default_value_t = 1)]
    pub accounts: u32,
    /// Orders seeded for the first merchant.
    #[arg(long, env = "JST_SIM_ORDERS", default_value_t = 2000)]
    pub orders: u64,
    /// Orders seeded for every other merchant (default: same as --orders).
    #[arg(long, env = "JST_SIM_ORDERS_PER_ACCOUNT")]
    pub orders_per_account: Option<u64>,
    /// How far back seeded orders' modified times reach (e.g. 3d, 12h).
    #[arg(long, default_value = "3d", value_parser = parse_duration)]
    pub history: Duration,
    /// First merchant's app_key (others get a -2, -3, … suffix).
    #[arg(long, env = "JST_SIM_APP_KEY", default_value = "demo-app-key")]
    pub app_key: String,
    /// First merchant's app_secret.
    #[arg(long, env = "JST_SIM_APP_SECRET", default_value = "demo-app-secret", hide_env_values = true)]
    pub app_secret: String,
    /// First merchant's access_token.
    #[arg(long, env = "JST_SIM_ACCESS_TOKEN", default_value = "demo-access-token", hide_env_values = true)]
    pub access_token: String,
    /// First merchant's refresh_token.
    #[arg(long, env = "JST_SIM_REFRESH_TOKEN", default_value = "demo-refresh-token", hide_env_values = true)]
    pub refresh_token: String,
    /// First merchant's legacy partnerid.
    #[arg(long, default_value = "demo-partner")]
    pub partner_id: String,
    /// First merchant's legacy partnerkey.
    #[arg(long, default_value = "demo-partner-key", hide_env_values = true)]
    pub partner_key: String,
    /// First merchant's legacy token.
    #[arg(long, default_value = "demo-legacy-token", hide_env_values = true)]
    pub legacy_token: String,
    /// Access-token lifetime; expired tokens get code 100 until refreshed (0 = never expire).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub token_lifetime: Duration,
    /// Allowed client clock skew before code 180.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub clock_skew: Duration,
    /// Per-merchant calls per second before code 199 (0 = unlimited).
    #[arg(long, env = "JST_SIM_RATE_PER_SEC", default_value_t = 5)]
    pub rate_per_sec: u32,
    /// Per-merchant calls per minute before code 200 (0 = unlimited).
    #[arg(long, env = "JST_SIM_RATE_PER_MIN", default_value_t = 100)]
    pub rate_per_min: u32,
    /// Churn: existing orders modified per second per merchant.
    #[arg(long, default_value_t = 0.0)]
    pub churn_modify: f64,
    /// Churn: WaitConfirm → Confirmed per second per merchant.
    #[arg(long, default_value_t = 0.0)]
    pub churn_confirm: f64,
    /// Churn: Confirmed → Cancelled per second per merchant.
    #[arg(long, default_value_t = 0.0)]
    pub churn_cancel: f64,
    /// Churn: new orders per second per merchant.
    #[arg(long, default_value_t = 0.0)]
    pub churn_new: f64,
    /// Churn: late commits per second per merchant (modified up to --late-max in the past).
    #[arg(long, default_value_t = 0.0)]
    pub churn_late: f64,
    /// Churn: orders per second per merchant that become visible with a `ts` below the highest
    /// already served (a transaction that took its row version, then committed late).
    #[arg(long, default_value_t = 0.0)]
    pub churn_late_ts: f64,
    /// How far in the past a late commit's modified time may be.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub late_max: Duration,
    /// Fault: fixed latency added to every API response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Fault: share of API calls answered with HTTP 5xx.
    #[arg(long, default_value_t = 0.0)]
    pub fault_5xx_rate: f64,
    /// Fault: share of API calls whose connection is reset mid-response.
    #[arg(long, default_value_t = 0.0)]
    pub fault_reset_rate: f64,
    /// Fault: share of API calls answered with business code 150.
    #[arg(long, default_value_t = 0.0)]
    pub fault_code150_rate: f64,
    /// Every merchant numbers its orders (o_id, io_id) from the same start, so ids overlap
    /// across merchants as real merchants' may.
    #[arg(long)]
    pub overlapping_ids: bool,
}

/// Counters per merchant for `GET /admin/stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub calls: u64,
    pub ok: u64,
    pub rows_served: u64,
    /// Rejections by business code (as text, for JSON keys).
    pub rejections: BTreeMap<String, u64>,
    pub http_5xx: u64,
    pub resets: u64,
    pub token_refreshes: u64,
    /// Refresh requests received (counted on arrival, before the answer).
    pub refresh_requests: u64,
    /// Answered queries by selector: `start_ts`, `modified` (a window), `ids` (o_ids, so_ids,
    /// io_ids), `other` — e.g. to see how much of the budget a sweep or an audit used.
    pub calls_by_selector: BTreeMap<String, u64>,
}

impl Stats {
    pub fn reject(&mut self, code: i64) {
        *self.rejections.entry(code.to_string()).or_default() += 1;
    }
}

/// One merchant and everything the simulator tracks about it.
pub struct MerchantState {
    pub merchant: Merchant,
    pub limiter: Limiter,
    pub faults: Faults,
    pub churn: Churn,
    pub churn_clock: ChurnClock,
    pub churn_counts: ChurnCounts,
    pub stats: Stats,
    /// Randomness for fault decisions (separate from data generation).
    pub rng: Rng,
    /// Bumped on each token refresh; new tokens embed it.
    pub token_generation: u32,
}

pub struct Sim {
    pub merchants: Vec<Mutex<MerchantState>>,
    /// API calls in flight per merchant (same index as `merchants`), by caller; a lock of its own,
    /// so a call enters before it waits for the merchant.
    pub in_flight: Vec<InFlight>,
    by_app_key: HashMap<String, usize>,
    by_partner: HashMap<String, usize>,
    by_name: HashMap<String, usize>,
    pub clock_skew: Duration,
    pub token_lifetime: Option<Duration>,
}

impl Sim {
    pub fn build(config: &Config) -> Result<Arc<Sim>, String> {
        if config.accounts == 0 {
            return Err("--accounts must be at least 1".into());
        }
        let now = Timestamp::now();
        let history = SignedDuration::try_from(config.history).map_err(|e| format!("--history: {e}"))?;
        let churn = Churn {
            modify_per_sec: config.churn_modify,
            confirm_per_sec: config.churn_confirm,
            cancel_per_sec: config.churn_cancel,
            new_per_sec: config.churn_new,
            late_per_sec: config.churn_late,
            late_max_secs: config.late_max.as_secs(),
            late_ts_per_sec: config.churn_late_ts,
        };
        churn.validate().map_err(|e| format!("churn: {e}"))?;
        let faults = Faults {
            latency_min_ms: config.latency_ms,
            latency_max_ms: config.latency_ms,
            error_5xx_rate: config.fault_5xx_rate,
            reset_rate: config.fault_reset_rate,
            code_150_rate: config.fault_code150_rate,
            ..Faults::default()
        };
        faults.validate().map_err(|e| format!("faults: {e}"))?;
        let token_lifetime = (!config.token_lifetime.is_zero()).then_some(config.token_lifetime);
        let mut sim = Sim {
            merchants: Vec::new(),
            in_flight: Vec::new(),
            by_app_key: HashMap::new(),
            by_partner: HashMap::new(),
            by_name: HashMap::new(),
            clock_skew: config.clock_skew,
            token_lifetime,
        };
        for index in 0..config.accounts {
            let suffix = |base: &str| if index == 0 { base.to_string() } else { format!("{base}-{}", index + 1) };
            let creds = Credentials {
                app_key: suffix(&config.app_key),
                app_secret: suffix(&config.app_secret),
                access_token: suffix(&config.access_token),
                refresh_token: suffix(&config.refresh_token),
                token_expires_at: expiry(now, token_lifetime),
                partner_id: suffix(&config.partner_id),
                partner_key: suffix(&config.partner_key),
                legacy_token: suffix(&config.legacy_token),
            };
            let count = if index == 0 { config.orders } else { config.orders_per_account.unwrap_or(config.orders) };
            let name = format!("m{}", index + 1);
            let id_base = if config.overlapping_ids { 100_000_000 } else { (i64::from(index) + 1) * 100_000_000 };
            let merchant =
                Merchant::seed_numbered(name.clone(), index, creds.clone(), count, config.seed, now, history, id_base);
            sim.by_app_key.insert(creds.app_key.clone(), index as usize);
            sim.by_partner.insert(creds.partner_id.clone(), index as usize);
            sim.by_name.insert(name, index as usize);
            sim.merchants.push(Mutex::new(MerchantState {
                merchant,
                limiter: Limiter::new(Limits { per_sec: config.rate_per_sec, per_min: config.rate_per_min }),
                faults: faults.clone(),
                churn: churn.clone(),
                churn_clock: ChurnClock::default(),
                churn_counts: ChurnCounts::default(),
                stats: Stats::default(),
                rng: Rng::new(config.seed.wrapping_add(u64::from(index)).wrapping_mul(31)),
                token_generation: 0,
            }));
            sim.in_flight.push(InFlight::default());
        }
        Ok(Arc::new(sim))
    }

    /// Counts an API call by `caller` (its `User-Agent`) to merchant `index` as in flight until
    /// the guard drops: from arrival until the answer is produced, simulated latency included.
    pub fn enter(&self, index: usize, caller: String) -> inflight::InFlightGuard<'_> {
        self.in_flight[index].enter(caller)
    }

    pub fn lock(&self, index: usize) -> MutexGuard<'_, MerchantState> {
        self.merchants[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn by_app_key(&self, app_key: &str) -> Option<usize> {
        self.by_app_key.get(app_key).copied()
    }

    pub fn by_partner(&self, partner_id: &str) -> Option<usize> {
        self.by_partner.get(partner_id).copied()
    }

    /// A merchant by name (`m1`) or app_key.
    pub fn find(&self, account: &str) -> Option<usize> {
        self.by_name.get(account).or_else(|| self.by_app_key.get(account)).copied()
    }

    /// Applies churn for the time since the last tick, to every merchant.
    pub fn churn_tick(&self, elapsed: Duration) {
        let now = Timestamp::now();
        for index in 0..self.merchants.len() {
            let mut guard = self.lock(index);
            let state = &mut *guard;
            if state.churn.is_active() {
                state.churn_clock.tick(
                    &state.churn,
                    elapsed.as_secs_f64(),
                    &mut state.merchant,
                    &mut state.churn_counts,
                    now,
                );
            }
        }
    }
}

pub fn expiry(now: Timestamp, lifetime: Option<Duration>) -> Option<Timestamp> {
    let lifetime = SignedDuration::try_from(lifetime?).ok()?;
    now.checked_add(lifetime).ok()
}

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/open/orders/out/simple/query", post(api::open_query))
        .route("/api/open/query.aspx", post(api::legacy_query))
        .route("/openWeb/auth/refreshToken", post(api::refresh_token))
        .route("/admin/truth", get(admin::truth))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/accounts", get(admin::accounts))
        .route("/admin/churn", post(admin::set_churn))
        .route("/admin/faults", post(admin::set_faults))
        .route("/admin/limits", post(admin::set_limits))
        .route("/admin/reauthorize", post(admin::reauthorize))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sim)
}

/// Serves until `shutdown`; prints the bound address and the demo credentials first.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sim = Sim::build(&config).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("jst-sim listening on http://{addr}");
    for index in 0..sim.merchants.len().min(3) {
        let state = sim.lock(index);
        let c = &state.merchant.creds;
        println!(
            "  merchant {}: {} orders; app_key={} app_secret={} access_token={} refresh_token={} (legacy: partnerid={} partnerkey={} token={})",
            state.merchant.name,
            state.merchant.len(),
            c.app_key,
            c.app_secret,
            c.access_token,
            c.refresh_token,
            c.partner_id,
            c.partner_key,
            c.legacy_token
        );
    }
    if sim.merchants.len() > 3 {
        println!("  … {} more merchants: GET /admin/accounts lists them all", sim.merchants.len() - 3);
    }
    serve(listener, sim, shutdown).await
}

/// Serves `sim` on `listener` (and runs its churn) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Arc<Sim>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ticker = {
        let sim = sim.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let period = Duration::from_millis(50);
            let mut interval = tokio::time::interval(period);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = interval.tick() => {
                        let now = tokio::time::Instant::now();
                        sim.churn_tick(now - last);
                        last = now;
                    }
                }
            }
        })
    };
    axum::serve(listener, router(sim)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    ticker.abort();
    Ok(())
}
