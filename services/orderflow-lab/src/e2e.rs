//! `orderflow bench e2e` and `orderflow bench source`: the whole pipeline measured against the
//! broker's own limit, in one run.
//!
//! `e2e` starts jst-sim (limits lifted, or paced with `--rate`) and target-sim (no latency) and K
//! replicas of each stage on a fresh namespace, syncs N orders, and reports orders/s, fetch-to-write
//! latency (p50/p99, from the writers' `orderflow_fetch_to_write_seconds` histogram, fed by the
//! fetch time every message carries), and each process's CPU seconds and peak RSS (from `/proc`).
//! Then, in the same run, the **raw relay** ([`crate::relay`]): plain lapin moving the same number
//! of pages and records, of the same sizes, through the same two hops with the same durability
//! (quorum queues, persistent, publisher confirms, manual acks) and no project logic. The ratio of
//! the two is the figure that matters.
//!
//! `source` runs one merchant at the real limits (5 calls/s, 100 calls/min) and reports orders/s
//! against the budget (100 calls/min × 50 rows = 83.3 orders/s) and the 199/200 rejections.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use orderflow_shared::settings::BrokerArgs;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    relay::RelayResult,
    stack::{Role, Stack, StackOptions},
};

#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub orders: u64,
    pub accounts: u32,
    pub replicas: u32,
    /// Pace the source to about this many orders/s in all (0: limits lifted).
    pub rate: u32,
    pub writer_concurrency: u16,
    pub relay: bool,
    /// The stages' LEDGER setting.
    pub ledger: bool,
    /// Leave the namespace (and its ledger) on the broker for the caller to read, then delete.
    pub keep_namespace: bool,
}

impl E2eOptions {
    pub fn new(orders: u64, accounts: u32, replicas: u32) -> Self {
        E2eOptions {
            orders,
            accounts,
            replicas,
            rate: 0,
            writer_concurrency: 64,
            relay: false,
            ledger: true,
            keep_namespace: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub process: String,
    /// CPU used while the orders were synced (from the start of the measurement to the last
    /// write), so start-up work (jst-sim seeding its orders) is not counted.
    pub cpu_seconds: f64,
    pub peak_rss_mib: f64,
    /// Resident memory when 100,000 records had been written, and at the end.
    pub rss_at_100k_mib: Option<f64>,
    pub rss_at_end_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct E2eResult {
    pub scenario: &'static str,
    pub accounts: u32,
    pub replicas: u32,
    pub paced_orders_per_sec: u32,
    /// Orders written to the target (every Confirmed order in the source).
    pub orders: u64,
    pub pages: u64,
    pub seconds: f64,
    pub orders_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub processes: Vec<ProcessUsage>,
    pub relay: Option<RelayResult>,
    /// Pipeline orders/s ÷ relay records/s.
    pub ratio: Option<f64>,
    pub ledger: bool,
    /// The run's namespace (still on the broker with `keep_namespace`).
    pub namespace: String,
}

pub(crate) fn proc_stat(pid: u32) -> Option<(f64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state field.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some((ticks / 100.0, kib("VmHWM:") / 1024.0, kib("VmRSS:") / 1024.0))
}

/// The local RabbitMQ's Erlang VM (`beam.smp`), when the broker runs on this machine and its
/// process is visible: its CPU is part of what the benchmark measures.
pub(crate) fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU seconds used so far by a process (0 when it is gone).
pub(crate) fn cpu_of(pid: Option<u32>) -> f64 {
    pid.and_then(proc_stat).map(|(cpu, _, _)| cpu).unwrap_or(0.0)
}

fn process_name(role: Role, index: u32) -> String {
    format!("{}#{index}", role.binary())
}

/// Sums a metric family's samples across several `/metrics` texts, by label set.
fn histogram_buckets(texts: &[String], family: &str) -> Vec<(f64, f64)> {
    let mut buckets: HashMap<String, f64> = HashMap::new();
    let prefix = format!("{family}_bucket{{");
    for text in texts {
        for line in text.lines().filter(|l| l.starts_with(&prefix)) {
            let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
            let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            *buckets.entry(le.to_string()).or_default() += value;
        }
    }
    let mut out: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, n)| (if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) }, n))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The q-quantile of a cumulative histogram, interpolated linearly inside its bucket (as
/// Prometheus' `histogram_quantile` does).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else { return 0.0 };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return prev.0;
            }
            let span = count - prev.1;
            let within = if span > 0.0 { (rank - prev.1) / span } else { 1.0 };
            return prev.0 + (le - prev.0) * within;
        }
        prev = (le, count);
    }
    prev.0
}

/// A replica's `/metrics` text (empty when it does not answer).
pub async fn metrics_text(http: &reqwest::Client, admin: std::net::SocketAddr) -> String {
    match http.get(format!("http://{admin}/metrics")).timeout(Duration::from_secs(5)).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The sum of a metric family's samples across `/metrics` texts.
pub fn counter_sum(texts: &[String], family: &str) -> f64 {
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// One pipeline run; `log` receives progress lines.
pub async fn pipeline(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    o: &E2eOptions,
) -> anyhow::Result<(E2eResult, Vec<String>)> {
    let ns = format!("bench-e2e-{}", jiff::Timestamp::now().as_millisecond());
    let log_dir = std::env::temp_dir().join(format!("orderflow-{ns}"));
    let mut options = StackOptions::new(&broker.amqp_url, &ns, &log_dir);
    options.bin_dir = bin_dir.to_path_buf();
    options.accounts = o.accounts;
    options.orders = o.orders.div_ceil(u64::from(o.accounts.max(1)));
    options.fetchers = o.replicas;
    options.transformers = o.replicas;
    options.writers = o.replicas;
    if o.rate == 0 {
        // Limits lifted: the source accepts every call, the fetchers' budget is out of the way.
        options.rate_per_sec = 0;
        options.rate_per_min = 0;
        options.fetch_budget = Some((1_000_000, 60_000_000));
    } else {
        let per_account_pages = (f64::from(o.rate) / 50.0 / f64::from(o.accounts.max(1))).ceil().max(1.0) as u32;
        options.rate_per_sec = per_account_pages;
        options.rate_per_min = per_account_pages * 60;
    }
    options.env = vec![
        ("WRITER_CONCURRENCY".into(), o.writer_concurrency.to_string()),
        ("FETCH_INTERVAL".into(), "1s".into()),
        ("RUST_LOG".into(), "warn".into()),
        ("LEDGER".into(), if o.ledger { "on" } else { "off" }.into()),
    ];
    let mut stack = Stack::start(options).await?;
    let outcome = measure(&mut stack, o).await;
    stack.stop().await;
    if !o.keep_namespace || outcome.is_err() {
        stack.delete_namespace().await?;
    }
    outcome
}

async fn measure(stack: &mut Stack, o: &E2eOptions) -> anyhow::Result<(E2eResult, Vec<String>)> {
    let started = Instant::now();
    let cpu_at_start: HashMap<String, f64> =
        stack.procs.iter().map(|p| (process_name(p.role, p.index), cpu_of(p.child.id()))).collect();
    let broker = broker_pid();
    let broker_cpu_at_start = cpu_of(broker);
    let confirmed = stack.confirmed_ids().await?.len() as u64;
    anyhow::ensure!(confirmed > 0, "jst-sim seeded no Confirmed order");
    let (written, rss_at_100k) = wait_written(stack, confirmed, started).await?;
    let seconds = started.elapsed().as_secs_f64();
    let broker_cpu = cpu_of(broker) - broker_cpu_at_start;
    let mut processes = process_usage(stack, &cpu_at_start, &rss_at_100k);
    if let Some((_, peak, rss)) = broker.and_then(proc_stat) {
        processes.push(ProcessUsage {
            process: "rabbitmq (beam.smp)".into(),
            cpu_seconds: round(broker_cpu, 2),
            peak_rss_mib: round(peak, 1),
            rss_at_100k_mib: None,
            rss_at_end_mib: round(rss, 1),
        });
    }
    let buckets = histogram_buckets(&metrics_of(stack, Role::Writer).await, "orderflow_fetch_to_write_seconds");
    let pages = counter_sum(&metrics_of(stack, Role::Fetcher).await, "orderflow_fetch_pages_total") as u64;
    let progress = stack.progress().await?;
    anyhow::ensure!(progress.synced(), "the target does not hold every Confirmed order: {progress:?}");
    let lines = vec![format!("{} Confirmed orders in {} pages, all in the target", progress.written_confirmed, pages)];
    let result = E2eResult {
        scenario: if o.rate == 0 { "e2e" } else { "e2e-paced" },
        accounts: o.accounts,
        replicas: o.replicas,
        paced_orders_per_sec: o.rate,
        orders: written,
        pages,
        seconds: round(seconds, 2),
        orders_per_sec: round(written as f64 / seconds, 0),
        latency_p50_ms: round(quantile(&buckets, 0.5) * 1000.0, 0),
        latency_p99_ms: round(quantile(&buckets, 0.99) * 1000.0, 0),
        processes,
        relay: None,
        ratio: None,
        ledger: o.ledger,
        namespace: stack.options.ns.clone(),
    };
    Ok((result, lines))
}

/// How long the target may see no new record before the run is called stalled: far above any
/// pause of a healthy run (the longest default retry tier is 5 minutes), far below the
/// hour a blocked broker would otherwise hold a run (and a CI job) for.
const STALL_LIMIT: Duration = Duration::from_secs(600);

/// Waits until target-sim holds `confirmed` records, printing progress every 5 s; returns how many
/// it holds and each process's resident memory when 100,000 were written. Fails when a process
/// exits, when nothing new is written for [`STALL_LIMIT`] (naming any broker alarm that blocks
/// publishers), or after an hour.
async fn wait_written(
    stack: &mut Stack,
    confirmed: u64,
    started: Instant,
) -> anyhow::Result<(u64, HashMap<String, f64>)> {
    let mut rss_at_100k: HashMap<String, f64> = HashMap::new();
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let mut progress = (0, Instant::now());
    loop {
        let stats = stack.target_stats().await?;
        let written = stats["stats"]["records"].as_u64().unwrap_or(0);
        if written != progress.0 {
            progress = (written, Instant::now());
        }
        if rss_at_100k.is_empty() && written >= 100_000 {
            for p in &stack.procs {
                if let Some((_, _, rss)) = p.child.id().and_then(proc_stat) {
                    rss_at_100k.insert(process_name(p.role, p.index), rss);
                }
            }
        }
        if written >= confirmed {
            return Ok((written, rss_at_100k));
        }
        if let Some((role, index, log, status)) = stack.exited() {
            anyhow::bail!("{} #{index} exited ({status}) during the benchmark; see {}", role.binary(), log.display());
        }
        anyhow::ensure!(Instant::now() < deadline, "not synced within an hour ({written} of {confirmed})");
        if progress.1.elapsed() >= STALL_LIMIT {
            anyhow::bail!(
                "stalled: {written} of {confirmed} written and nothing new for {} s; broker alarms: {}; logs in {}",
                STALL_LIMIT.as_secs(),
                crate::alarms::describe_alarms(&crate::rabbitmqctl::rabbitmqctl_command()),
                stack.options.log_dir.display(),
            );
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!("  [{secs:>5.0}s] written {written:>8} of {confirmed} ({:.0} orders/s)", written as f64 / secs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU used since `cpu_at_start` and memory of every process of the stack still running.
fn process_usage(
    stack: &Stack,
    cpu_at_start: &HashMap<String, f64>,
    rss_at_100k: &HashMap<String, f64>,
) -> Vec<ProcessUsage> {
    let usage = |p: &crate::stack::Proc| {
        let name = process_name(p.role, p.index);
        let (cpu, peak, rss) = p.child.id().and_then(proc_stat)?;
        Some(ProcessUsage {
            rss_at_100k_mib: rss_at_100k.get(&name).map(|v| round(*v, 1)),
            cpu_seconds: round(cpu - cpu_at_start.get(&name).copied().unwrap_or(0.0), 2),
            process: name,
            peak_rss_mib: round(peak, 1),
            rss_at_end_mib: round(rss, 1),
        })
    };
    stack.procs.iter().filter_map(usage).collect()
}

/// The `/metrics` texts of every replica of `role`.
async fn metrics_of(stack: &Stack, role: Role) -> Vec<String> {
    let mut texts = Vec::new();
    for admin in stack.procs.iter().filter(|p| p.role == role).filter_map(|p| p.admin) {
        texts.push(metrics_text(stack.http(), admin).await);
    }
    texts
}

pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// `bench source`: one merchant at the real limits for `seconds`.
pub async fn source(bin_dir: &std::path::Path, broker: &BrokerArgs, seconds: u64) -> anyhow::Result<Value> {
    let ns = format!("bench-src-{}", jiff::Timestamp::now().as_millisecond());
    let log_dir = std::env::temp_dir().join(format!("orderflow-{ns}"));
    let mut options = StackOptions::new(&broker.amqp_url, &ns, &log_dir);
    options.bin_dir = bin_dir.to_path_buf();
    options.accounts = 1;
    // More than the window can fetch, so the source is the bottleneck throughout.
    options.orders = (seconds / 60 + 2) * 100 * 50 * 2;
    options.rate_per_sec = 5;
    options.rate_per_min = 100;
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let started = Instant::now();
        let end = started + Duration::from_secs(seconds);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(10).min(end.saturating_duration_since(Instant::now()))).await;
            let stats = stack.target_stats().await?;
            let written = stats["stats"]["records"].as_u64().unwrap_or(0);
            eprintln!(
                "  [{:>4.0}s] written {written:>6} ({:.1} orders/s)",
                started.elapsed().as_secs_f64(),
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
        let elapsed = started.elapsed().as_secs_f64();
        let sim = stack.get_json(&format!("{}/admin/stats", stack.jst_url)).await?;
        let account = &sim["accounts"]["m1"]["stats"];
        let written = stack.target_stats().await?["stats"]["records"].as_u64().unwrap_or(0);
        let rows = account["rows_served"].as_u64().unwrap_or(0);
        let calls_ok = account["ok"].as_u64().unwrap_or(0);
        let rejections = &account["rejections"];
        let limited = rejections["199"].as_u64().unwrap_or(0) + rejections["200"].as_u64().unwrap_or(0);
        let budget = 100.0 * 50.0 / 60.0;
        let rate = rows as f64 / elapsed;
        anyhow::Ok(json!({
            "scenario": "source", "seconds": round(elapsed, 1), "calls_ok": calls_ok, "orders_fetched": rows,
            "orders_per_sec": round(rate, 1), "budget_orders_per_sec": round(budget, 1),
            "ratio": round(rate / budget, 3), "rejections_199_200": limited, "orders_written": written,
        }))
    }
    .await;
    stack.stop().await;
    let _ = stack.delete_namespace().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        // 100 samples: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1].
        let buckets = vec![(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (f64::INFINITY, 100.0)];
        assert!((quantile(&buckets, 0.5) - 0.01).abs() < 1e-9);
        assert!((quantile(&buckets, 0.7) - 0.055).abs() < 1e-9);
        assert!((quantile(&buckets, 0.99) - 0.91).abs() < 1e-9);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn histogram_buckets_sum_across_replicas() {
        let a = "x_bucket{le=\"0.1\"} 3\nx_bucket{le=\"+Inf\"} 4\nx_count 4\n".to_string();
        let b = "x_bucket{le=\"0.1\"} 1\nx_bucket{le=\"+Inf\"} 1\n".to_string();
        assert_eq!(histogram_buckets(&[a, b], "x"), vec![(0.1, 4.0), (f64::INFINITY, 5.0)]);
    }
}
