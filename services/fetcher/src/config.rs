//! Fetcher settings (flags and environment, flags win) and the accounts they describe.
//! Missing or invalid settings fail at start with the setting's name.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use orderflow_shared::settings::{BrokerArgs, LedgerArgs, LogArgs, parse_duration, secret_env};
use secrecy::{ExposeSecret, SecretString};

use crate::{
    account::{Account, SyncStart},
    client::{ApiGeneration, Credentials},
    request_config::RequestConfig,
};

/// The shipped default request config: the `start_ts` cursor, Confirmed orders.
pub const DEFAULT_REQUEST_CONFIG: &str = include_str!("../config/default-request-config.json");

/// Fetches Jushuitan outbound orders and publishes raw pages, never missing an order.
#[derive(Debug, Clone, Parser)]
#[command(name = "fetcher", version, about, long_about = None, after_help = SECRETS_HELP)]
pub struct Config {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Accounts file (TOML or JSON) with many merchants; when set, the JST_* account variables are not used.
    #[arg(long, env = "ORDERFLOW_ACCOUNTS")]
    pub accounts_file: Option<PathBuf>,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9101")]
    pub admin_addr: SocketAddr,
    /// Name of the single account configured from the JST_* variables (queue names use it).
    #[arg(long, env = "JST_ACCOUNT", default_value = "default")]
    pub account: String,
    /// API generation of the single account: open (new platform) or legacy.
    #[arg(long, env = "JST_API", value_enum, default_value = "open")]
    pub api: ApiGeneration,
    /// Base URL of the Jushuitan API (e.g. https://openapi.jushuitan.com, or jst-sim).
    #[arg(long, env = "JST_BASE_URL")]
    pub base_url: Option<String>,
    /// New platform: app_key.
    #[arg(long, env = "JST_APP_KEY")]
    pub app_key: Option<String>,
    /// New platform: JST_APP_SECRET (environment only, never logged).
    #[arg(skip = secret_env("JST_APP_SECRET"))]
    pub app_secret: Option<SecretString>,
    /// New platform: JST_ACCESS_TOKEN (environment only, never logged).
    #[arg(skip = secret_env("JST_ACCESS_TOKEN"))]
    pub access_token: Option<SecretString>,
    /// New platform: JST_REFRESH_TOKEN, used when the access token expires (environment only).
    #[arg(skip = secret_env("JST_REFRESH_TOKEN"))]
    pub refresh_token: Option<SecretString>,
    /// Legacy API: partnerid.
    #[arg(long, env = "JST_PARTNER_ID")]
    pub partner_id: Option<String>,
    /// Legacy API: JST_PARTNER_KEY (environment only, never logged).
    #[arg(skip = secret_env("JST_PARTNER_KEY"))]
    pub partner_key: Option<SecretString>,
    /// Legacy API: JST_TOKEN (environment only, never logged).
    #[arg(skip = secret_env("JST_TOKEN"))]
    pub token: Option<SecretString>,
    /// Request config file in the seed's format (default: the shipped start_ts config).
    #[arg(long, env = "JST_REQUEST_CONFIG")]
    pub request_config: Option<PathBuf>,
    /// First sync start for modified-window configs: a China-time datetime or a duration back from now (7d).
    #[arg(long, env = "JST_SYNC_START", default_value = "7d")]
    pub sync_start: String,
    /// Calls per second allowed by the merchant's API package.
    #[arg(long, env = "JST_RATE_PER_SEC", default_value_t = 5)]
    pub rate_per_sec: u32,
    /// Calls per minute allowed by the merchant's API package.
    #[arg(long, env = "JST_RATE_PER_MIN", default_value_t = 100)]
    pub rate_per_min: u32,
    /// Pause between passes once an account is caught up.
    #[arg(long, env = "FETCH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub interval: Duration,
    /// A pass ends (and checkpoints) after this many pages…
    #[arg(long, env = "FETCH_PASS_PAGES", default_value_t = 200)]
    pub pass_pages: u32,
    /// …or after this long, whichever comes first.
    #[arg(long, env = "FETCH_PASS_TIME", default_value = "60s", value_parser = parse_duration)]
    pub pass_time: Duration,
    /// HTTP timeout of one API call.
    #[arg(long, env = "JST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// How often a replica tries to take over accounts nobody holds.
    #[arg(long, env = "FETCH_LOCK_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub lock_retry: Duration,
    /// A job held unacked this long is committed again, also in the middle of a pass (a source
    /// outage can make one last hours): the broker's consumer_timeout (30 min by default) must
    /// never close the channel all of a replica's accounts live on, and a replica the broker has
    /// silently replaced notices it by then at the latest. Keep it well under consumer_timeout.
    #[arg(long, env = "FETCH_KEEP_AFTER", default_value = "5m", value_parser = parse_keep_after)]
    pub keep_after: Duration,
    /// Modified windows close this long before now, so late commits land inside a later window.
    #[arg(long, env = "FETCH_WINDOW_DELAY", default_value = "30s", value_parser = parse_duration)]
    pub window_delay: Duration,
    /// Each modified window starts this long before the last one ended (clock skew, slow commits).
    #[arg(long, env = "FETCH_WINDOW_OVERLAP", default_value = "60s", value_parser = parse_duration)]
    pub window_overlap: Duration,
    /// start_ts mode: re-read the recent past by modified window this often, for rows that became
    /// visible with a row version below the cursor (late commits). 0 turns the sweep off.
    #[arg(long, env = "FETCH_SWEEP_EVERY", default_value = "10m", value_parser = parse_duration)]
    pub sweep_every: Duration,
    /// How far back each sweep reads (longer than the slowest transaction plus FETCH_SWEEP_EVERY).
    #[arg(long, env = "FETCH_SWEEP_SPAN", default_value = "2h", value_parser = parse_duration)]
    pub sweep_span: Duration,
    /// The largest share of the merchant's calls the sweep may use, e.g. 10% or 0.1.
    #[arg(long, env = "FETCH_SWEEP_BUDGET", default_value = "10%", value_parser = parse_share)]
    pub sweep_budget: f64,
    /// The largest share of the merchant's calls an audit (`orderflow audit`, the scheduled
    /// audit) may use, beside live fetching, e.g. 20% or 0.2.
    #[arg(long, env = "FETCH_AUDIT_BUDGET", default_value = "20%", value_parser = parse_share)]
    pub audit_budget: f64,
    /// Audit every held account this often (the previous period, up to FETCH_AUDIT_LAG ago) and
    /// export orderflow_audit_missing; 0 (the default) turns it off. E.g. 1d.
    #[arg(long, env = "FETCH_AUDIT_EVERY", default_value = "0", value_parser = parse_duration)]
    pub audit_every: Duration,
    /// The scheduled audit's window ends this long before it runs (orders need time to flow).
    #[arg(long, env = "FETCH_AUDIT_LAG", default_value = "1h", value_parser = parse_duration)]
    pub audit_lag: Duration,
    /// The scheduled audit counts an order without an outcome as in flight while its last
    /// event is younger than this (or the pipeline's queues hold messages); past it, missing.
    #[arg(long, env = "FETCH_AUDIT_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub audit_grace: Duration,
    /// The writers' retry tiers (as their RETRY_TIERS): the scheduled audit counts what waits in
    /// them as in flight.
    #[arg(long, env = "RETRY_TIERS", default_value = orderflow_shared::amqp::topology::DEFAULT_RETRY_TIERS, value_parser = parse_tiers)]
    pub retry_tiers: RetryTiers,
}

/// The writers' retry tiers, as `RETRY_TIERS` gives them.
#[derive(Debug, Clone)]
pub struct RetryTiers(pub Vec<Duration>);

fn parse_tiers(text: &str) -> Result<RetryTiers, String> {
    orderflow_shared::amqp::ops::parse_retry_tiers(text).map(RetryTiers).map_err(|e| e.to_string())
}

/// A share of a budget: `10%` or `0.1`, above 0 and at most 1.
/// FETCH_KEEP_AFTER: a duration of at least one second (the broker must see a commit come back).
pub fn parse_keep_after(text: &str) -> Result<Duration, String> {
    let keep = parse_duration(text)?;
    if keep < Duration::from_secs(1) {
        return Err(format!("{text:?} is too short: at least 1s (and well under the broker's consumer_timeout)"));
    }
    Ok(keep)
}

pub fn parse_share(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let value = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a share (e.g. 10% or 0.1)"))?;
    if !(value > 0.0 && value <= 1.0) {
        return Err(format!("{text:?} must be above 0 and at most 100%"));
    }
    Ok(value)
}

/// What `--help` says about the secrets: none of them is a flag.
const SECRETS_HELP: &str = "Secrets come from the environment only, never from flags (a flag shows in the process \
list): JST_APP_SECRET, JST_ACCESS_TOKEN, JST_REFRESH_TOKEN (open platform), JST_PARTNER_KEY, JST_TOKEN (legacy), \
AMQP_PASSWORD or a password inside AMQP_URL; many merchants' secrets go in the ORDERFLOW_ACCOUNTS file.";

/// A required secret, named by its variable when missing: [`required`] on its exposed text.
fn required_secret(value: &Option<SecretString>, name: &str, why: &str) -> Result<SecretString, String> {
    required(value.as_ref().map(|v| v.expose_secret()), name, why).map(SecretString::from)
}

fn required(value: Option<&str>, name: &str, why: &str) -> Result<String, String> {
    match value.map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(format!("{name} is required ({why})")),
    }
}

pub fn load_request_config(path: Option<&PathBuf>) -> Result<RequestConfig, String> {
    match path {
        None => RequestConfig::parse_str(DEFAULT_REQUEST_CONFIG).map_err(|e| format!("built-in request config: {e}")),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("JST_REQUEST_CONFIG {}: {e}", path.display()))?;
            RequestConfig::parse_str(&text).map_err(|e| format!("JST_REQUEST_CONFIG {}: {e}", path.display()))
        }
    }
}

impl Config {
    /// The accounts this fetcher serves: the accounts file, else the JST_* variables.
    pub fn accounts(&self) -> Result<Vec<Account>, String> {
        if let Some(path) = &self.accounts_file {
            let fallbacks = crate::accounts_file::Fallbacks {
                rate_per_sec: self.rate_per_sec,
                rate_per_min: self.rate_per_min,
                interval: self.interval,
                sync_start: self.sync_start.clone(),
            };
            return crate::accounts_file::load(path, &fallbacks);
        }
        let why = "the Jushuitan account to fetch, or ORDERFLOW_ACCOUNTS";
        let base_url = required(self.base_url.as_deref(), "JST_BASE_URL", why)?;
        let credentials = match self.api {
            ApiGeneration::Open => Credentials {
                app_key: required(self.app_key.as_deref(), "JST_APP_KEY", why)?,
                app_secret: required_secret(&self.app_secret, "JST_APP_SECRET", why)?,
                access_token: required_secret(&self.access_token, "JST_ACCESS_TOKEN", why)?.expose_secret().into(),
                refresh_token: self.refresh_token.as_ref().map(|t| t.expose_secret().into()).unwrap_or_default(),
                ..Credentials::default()
            },
            ApiGeneration::Legacy => Credentials {
                partner_id: required(self.partner_id.as_deref(), "JST_PARTNER_ID", "JST_API=legacy")?,
                partner_key: required_secret(&self.partner_key, "JST_PARTNER_KEY", "JST_API=legacy")?,
                token: required_secret(&self.token, "JST_TOKEN", "JST_API=legacy")?.expose_secret().into(),
                ..Credentials::default()
            },
        };
        let request = load_request_config(self.request_config.as_ref())?;
        let sync_start = SyncStart::parse(&self.sync_start).map_err(|e| format!("JST_SYNC_START: {e}"))?;
        let account = Account {
            name: crate::account::parse_account_name(&self.account).map_err(|e| format!("JST_ACCOUNT: {e}"))?,
            api: self.api,
            base_url,
            credentials,
            request,
            sync_start,
            rate_per_sec: self.rate_per_sec,
            rate_per_min: self.rate_per_min,
            interval: self.interval,
        };
        account.validate()?;
        Ok(vec![account])
    }
}
