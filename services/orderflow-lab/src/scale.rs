//! `orderflow bench scale`: hundreds of merchants on one broker. jst-sim with N merchants at the
//! real limits (5/s, 100/min each), new orders arriving all along, K fetcher replicas and the whole
//! pipeline; one fetcher is killed (`kill -9`) mid-sync. Measured: how evenly the accounts spread,
//! how long the takeover took, whether any account was ever called by two replicas at once
//! (jst-sim's `max_concurrent_callers`), the broker's channel opens per second in steady state
//! (its `channel_created` counter), how long `rabbitmqctl list_queues` takes throughout and after,
//! `RESOURCE_LOCKED` lines in the broker's log, the broker objects per account, and the fetchers'
//! peak RSS. The fetcher tests run it at 200 merchants; the README gives the 1,000-merchant run.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::{
    e2e::{counter_sum, metrics_text, proc_stat},
    rabbitmqctl::{rabbitmqctl, rabbitmqctl_command},
    stack::{Role, Stack, StackOptions},
};

#[derive(Debug, Clone)]
pub struct ScaleOptions {
    pub amqp_url: String,
    pub ns: String,
    pub log_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    pub accounts: u32,
    /// Orders seeded per merchant.
    pub orders: u64,
    pub fetchers: u32,
    /// New orders per second per merchant while the run lasts (stopped before the final check).
    pub new_per_sec: f64,
    /// Kill one fetcher (`kill -9`) once the accounts are spread.
    pub kill: bool,
    /// Longest wait for each phase (spread, takeover, sync).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub accounts: u32,
    pub orders_per_account: u64,
    pub fetchers: u32,
    /// Seconds from start until every account was held and the replicas were within ±10%.
    pub spread_seconds: f64,
    pub held_per_replica: Vec<u64>,
    /// Largest distance of one replica's count from the even share, in % of that share.
    pub spread_deviation_pct: f64,
    /// Broker channels opened per second over a steady window (every account held, no kill).
    pub channel_opens_per_sec: f64,
    /// Seconds from the `kill -9` until the survivors held every account.
    pub takeover_seconds: Option<f64>,
    pub held_after_kill: Vec<u64>,
    /// Seconds from start until every Confirmed order was written.
    pub sync_seconds: f64,
    pub confirmed: usize,
    pub written: usize,
    /// The most replicas that ever had a call in flight for one merchant at the same moment.
    pub max_concurrent_callers: u64,
    /// 199/200 answers over all merchants.
    pub rate_rejections: u64,
    pub list_queues_max_seconds: f64,
    pub list_queues_after_seconds: f64,
    pub list_queues_samples: usize,
    /// `RESOURCE_LOCKED` lines the broker logged during the run (`None`: its log is not readable here).
    pub resource_locked_lines: Option<usize>,
    /// Queues under `<ns>.fetch.` other than the status and presence queues, per account.
    pub broker_objects_per_account: f64,
    pub fetcher_peak_rss_mib: f64,
}

/// Runs the scenario and tears the stack down whatever happens.
pub async fn run(o: ScaleOptions) -> anyhow::Result<ScaleReport> {
    let ctl = rabbitmqctl_command();
    let log = BrokerLog::open(&ctl);
    let sampler = ListQueues::start(ctl.clone());
    let mut stack = Stack::start(stack_options(&o)).await?;
    let outcome = measure(&mut stack, &o, &ctl).await;
    let samples = sampler.stop().await;
    let after = time_list_queues(&ctl);
    stack.stop().await;
    if let Err(error) = stack.delete_namespace().await {
        eprintln!("could not delete the scale run's queues: {error:#}");
    }
    let mut report = outcome?;
    report.list_queues_samples = samples.len();
    report.list_queues_max_seconds = samples.iter().copied().fold(0.0, f64::max);
    report.list_queues_after_seconds = after?;
    report.resource_locked_lines = log.and_then(|l| l.count_since("RESOURCE_LOCKED"));
    Ok(report)
}

fn stack_options(o: &ScaleOptions) -> StackOptions {
    let mut options = StackOptions::new(&o.amqp_url, &o.ns, &o.log_dir);
    if let Some(dir) = &o.bin_dir {
        options.bin_dir = dir.clone();
    }
    options.accounts = o.accounts;
    options.orders = o.orders;
    options.fetchers = o.fetchers;
    options.rate_per_sec = 5;
    options.rate_per_min = 100;
    options.jst_args = vec!["--churn-new".into(), o.new_per_sec.to_string()];
    options.env = vec![("FETCH_INTERVAL".into(), "5s".into())];
    options
}

async fn measure(stack: &mut Stack, o: &ScaleOptions, ctl: &str) -> anyhow::Result<ScaleReport> {
    let started = Instant::now();
    let held_per_replica = wait_spread(stack, o).await?;
    let spread_seconds = started.elapsed().as_secs_f64();
    let even = f64::from(o.accounts) / f64::from(o.fetchers.max(1));
    let spread_deviation_pct =
        held_per_replica.iter().map(|&h| (h as f64 - even).abs() / even * 100.0).fold(0.0, f64::max);
    let channel_opens_per_sec = channel_opens_per_sec(ctl, Duration::from_secs(20)).await?;
    let (takeover_seconds, held_after_kill) = if o.kill && o.fetchers > 1 {
        let (secs, held) = kill_one(stack, o).await?;
        (Some(secs), held)
    } else {
        (None, Vec::new())
    };
    stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
    let progress = wait_synced(stack, o.timeout).await?;
    let sync_seconds = started.elapsed().as_secs_f64();
    let stats = stack.get_json(&format!("{}/admin/stats", stack.jst_url)).await?;
    let fetcher_peak_rss_mib = stack
        .replicas(Role::Fetcher)
        .iter()
        .filter_map(|p| p.child.id().and_then(proc_stat))
        .map(|(_, peak, _)| peak)
        .fold(0.0, f64::max);
    Ok(ScaleReport {
        accounts: o.accounts,
        orders_per_account: o.orders,
        fetchers: o.fetchers,
        spread_seconds,
        held_per_replica,
        spread_deviation_pct,
        channel_opens_per_sec,
        takeover_seconds,
        held_after_kill,
        sync_seconds,
        confirmed: progress.confirmed,
        written: progress.written_confirmed,
        max_concurrent_callers: stats["max_concurrent_callers"].as_u64().unwrap_or(0),
        rate_rejections: rate_rejections(&stats),
        list_queues_max_seconds: 0.0,
        list_queues_after_seconds: 0.0,
        list_queues_samples: 0,
        resource_locked_lines: None,
        broker_objects_per_account: objects_per_account(ctl, &o.ns, o.accounts)?,
        fetcher_peak_rss_mib,
    })
}

/// Accounts each fetcher but `killed` holds (`orderflow_fetch_accounts_held`).
async fn held(stack: &Stack, killed: Option<u32>) -> anyhow::Result<Vec<u64>> {
    let mut out = Vec::new();
    for proc in stack.replicas(Role::Fetcher).into_iter().filter(|p| Some(p.index) != killed) {
        let admin = proc.admin.context("a fetcher without an admin address")?;
        let text = metrics_text(stack.http(), admin).await;
        anyhow::ensure!(!text.is_empty(), "fetcher #{} does not answer /metrics", proc.index);
        out.push(counter_sum(&[text], "orderflow_fetch_accounts_held") as u64);
    }
    Ok(out)
}

/// Waits until every account is held and each replica holds its even share ±10%.
async fn wait_spread(stack: &Stack, o: &ScaleOptions) -> anyhow::Result<Vec<u64>> {
    let even = f64::from(o.accounts) / f64::from(o.fetchers.max(1));
    let deadline = Instant::now() + o.timeout;
    loop {
        let counts = held(stack, None).await?;
        let total: u64 = counts.iter().sum();
        let even_enough = counts.iter().all(|&h| (h as f64 - even).abs() <= (even * 0.1).max(1.0));
        if total == u64::from(o.accounts) && even_enough {
            return Ok(counts);
        }
        anyhow::ensure!(Instant::now() < deadline, "accounts not spread after {:?}: held {counts:?}", o.timeout);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `kill -9` of fetcher 0; seconds until the survivors hold every account, and their counts.
async fn kill_one(stack: &mut Stack, o: &ScaleOptions) -> anyhow::Result<(f64, Vec<u64>)> {
    stack.kill9(Role::Fetcher, 0).await?;
    let killed = Instant::now();
    loop {
        let counts = held(stack, Some(0)).await?;
        if counts.iter().sum::<u64>() == u64::from(o.accounts) {
            return Ok((killed.elapsed().as_secs_f64(), counts));
        }
        anyhow::ensure!(killed.elapsed() < o.timeout, "after kill -9 the survivors hold only {counts:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_synced(stack: &Stack, timeout: Duration) -> anyhow::Result<crate::stack::Progress> {
    let deadline = Instant::now() + timeout;
    let mut streak = 0;
    loop {
        let progress = stack.progress().await?;
        streak = if progress.synced() { streak + 1 } else { 0 };
        if streak >= 2 {
            return Ok(progress);
        }
        anyhow::ensure!(Instant::now() < deadline, "not synced after {timeout:?}: {progress:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn rate_rejections(stats: &serde_json::Value) -> u64 {
    let accounts = stats["accounts"].as_object().cloned().unwrap_or_default();
    accounts
        .values()
        .map(|a| ["199", "200"].iter().map(|c| a["stats"]["rejections"][c].as_u64().unwrap_or(0)).sum::<u64>())
        .sum()
}

/// The broker's `channel_created` counter (`connection_churn_metrics`, in RabbitMQ's core).
fn channels_created(ctl: &str) -> anyhow::Result<u64> {
    let out = rabbitmqctl(ctl, &["eval", "[{_, _, _, C, _, _, _, _}] = ets:tab2list(connection_churn_metrics), C."])?;
    out.trim().parse().with_context(|| format!("channel_created counter: {out:?}"))
}

async fn channel_opens_per_sec(ctl: &str, window: Duration) -> anyhow::Result<f64> {
    let before = channels_created(ctl)?;
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let after = channels_created(ctl)?;
    Ok(after.saturating_sub(before) as f64 / t0.elapsed().as_secs_f64())
}

fn time_list_queues(ctl: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    rabbitmqctl(ctl, &["list_queues", "--quiet", "name", "messages", "consumers"])?;
    Ok(t0.elapsed().as_secs_f64())
}

fn objects_per_account(ctl: &str, ns: &str, accounts: u32) -> anyhow::Result<f64> {
    let out = rabbitmqctl(ctl, &["list_queues", "--quiet", "name"])?;
    let prefix = format!("{ns}.fetch.");
    let not_per_account = [format!("{ns}.fetch.status"), format!("{ns}.fetch.replicas")];
    let count = out
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&prefix) && !not_per_account.iter().any(|n| n == q))
        .count();
    Ok(count as f64 / f64::from(accounts.max(1)))
}

/// `rabbitmqctl list_queues` timed every few seconds on a thread of its own until stopped.
struct ListQueues {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<Vec<f64>>,
}

impl ListQueues {
    fn start(ctl: String) -> ListQueues {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = tokio::task::spawn_blocking(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match time_list_queues(&ctl) {
                    Ok(secs) => samples.push(secs),
                    Err(error) => eprintln!("list_queues failed: {error:#}"),
                }
                for _ in 0..30 {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            samples
        });
        ListQueues { stop, handle }
    }

    async fn stop(self) -> Vec<f64> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.await.unwrap_or_default()
    }
}

/// The broker's log file, read from where it stood when the run started.
struct BrokerLog {
    path: PathBuf,
    offset: u64,
}

impl BrokerLog {
    fn open(ctl: &str) -> Option<BrokerLog> {
        let out = rabbitmqctl(ctl, &["eval", "hd(rabbit:log_locations())."]).ok()?;
        let path = PathBuf::from(out.trim().trim_matches('"'));
        let offset = std::fs::metadata(&path).ok()?.len();
        Some(BrokerLog { path, offset })
    }

    fn count_since(&self, needle: &str) -> Option<usize> {
        let bytes = std::fs::read(&self.path).ok()?;
        let start = usize::try_from(self.offset).ok()?.min(bytes.len());
        Some(String::from_utf8_lossy(&bytes[start..]).lines().filter(|l| l.contains(needle)).count())
    }
}

/// Prints the report for people.
pub fn print(report: &ScaleReport) {
    let r = report;
    eprintln!(
        "scale: {} merchants × {} orders, {} fetchers, real limits (5/s, 100/min)",
        r.accounts, r.orders_per_account, r.fetchers
    );
    eprintln!(
        "  spread in {:.1} s: held {:?} (largest deviation {:.1}%)",
        r.spread_seconds, r.held_per_replica, r.spread_deviation_pct
    );
    eprintln!("  channel opens/s in steady state: {:.2}", r.channel_opens_per_sec);
    if let Some(t) = r.takeover_seconds {
        eprintln!("  kill -9 of one fetcher: every account held again after {t:.1} s ({:?})", r.held_after_kill);
    }
    eprintln!("  written {} of {} Confirmed orders; synced after {:.1} s", r.written, r.confirmed, r.sync_seconds);
    eprintln!(
        "  most replicas calling one merchant at once: {}; 199/200 answers: {}",
        r.max_concurrent_callers, r.rate_rejections
    );
    eprintln!(
        "  rabbitmqctl list_queues: max {:.2} s over {} samples, {:.2} s after",
        r.list_queues_max_seconds, r.list_queues_samples, r.list_queues_after_seconds
    );
    match r.resource_locked_lines {
        Some(n) => eprintln!("  RESOURCE_LOCKED lines in the broker log: {n}"),
        None => eprintln!("  RESOURCE_LOCKED lines in the broker log: (log not readable here)"),
    }
    eprintln!(
        "  broker objects per account: {:.2}; fetcher peak RSS {:.1} MiB",
        r.broker_objects_per_account, r.fetcher_peak_rss_mib
    );
}
