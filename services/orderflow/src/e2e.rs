//! `orderflow bench e2e` and `orderflow bench source`: the whole pipeline measured against the
//! broker's own limit, in one run.
//!
//! `e2e` starts jst-sim (limits lifted, or paced with `--rate`) and target-sim (no latency) and K
//! replicas of each stage on a fresh namespace, syncs N orders, and reports orders/s, fetch-to-write
//! latency (p50/p99, from the writers' `orderflow_fetch_to_write_seconds` histogram, fed by the
//! fetch time every message carries), and each process's CPU seconds and peak RSS (from `/proc`).
//! Then, in the same run, the **raw relay**: plain lapin moving the same number of pages and
//! records, of the same sizes, through the same two hops with the same durability (quorum queues,
//! persistent, publisher confirms, manual acks) and no project logic. The ratio of the two is the
//! figure that matters.
//!
//! `source` runs one merchant at the real limits (5 calls/s, 100 calls/min) and reports orders/s
//! against the budget (100 calls/min × 50 rows = 83.3 orders/s) and the 199/200 rejections.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::{messages::PAGE_SCHEMA, settings::BrokerArgs};
use serde::Serialize;
use serde_json::{Value, json};

use crate::stack::{Role, Stack, StackOptions};

#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub orders: u64,
    pub accounts: u32,
    pub replicas: u32,
    /// Pace the source to about this many orders/s in all (0: limits lifted).
    pub rate: u32,
    pub writer_concurrency: u16,
    pub relay: bool,
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
pub struct RelayResult {
    pub pages: u64,
    pub records: u64,
    pub page_bytes: usize,
    pub record_bytes: usize,
    pub seconds: f64,
    pub records_per_sec: f64,
    /// CPU of the broker (a local `beam.smp`, when one is found) and of the relay's own process
    /// during the relay.
    pub broker_cpu_seconds: Option<f64>,
    pub relay_cpu_seconds: f64,
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
}

fn proc_stat(pid: u32) -> Option<(f64, f64, f64)> {
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
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

/// CPU seconds used so far by a process (0 when it is gone).
fn cpu_of(pid: Option<u32>) -> f64 {
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
    ];
    let mut stack = Stack::start(options).await?;
    let outcome = measure(&mut stack, o).await;
    stack.stop().await;
    stack.delete_namespace().await?;
    outcome
}

async fn measure(stack: &mut Stack, o: &E2eOptions) -> anyhow::Result<(E2eResult, Vec<String>)> {
    let started = Instant::now();
    let cpu_at_start: HashMap<String, f64> =
        stack.procs.iter().map(|p| (process_name(p.role, p.index), cpu_of(p.child.id()))).collect();
    let broker = broker_pid();
    let broker_cpu_at_start = cpu_of(broker);
    let mut lines = Vec::new();
    let confirmed = stack.confirmed_ids().await?.len() as u64;
    anyhow::ensure!(confirmed > 0, "jst-sim seeded no Confirmed order");
    let mut rss_at_100k: HashMap<String, f64> = HashMap::new();
    let mut last_print = Instant::now();
    let deadline = started + Duration::from_secs(3600);
    let written = loop {
        let stats = stack.target_stats().await?;
        let written = stats["stats"]["records"].as_u64().unwrap_or(0);
        if rss_at_100k.is_empty() && written >= 100_000 {
            for p in &stack.procs {
                if let Some((_, _, rss)) = p.child.id().and_then(proc_stat) {
                    rss_at_100k.insert(process_name(p.role, p.index), rss);
                }
            }
        }
        if written >= confirmed {
            break written;
        }
        if let Some((role, index, log, status)) = stack.exited() {
            anyhow::bail!("{} #{index} exited ({status}) during the benchmark; see {}", role.binary(), log.display());
        }
        anyhow::ensure!(Instant::now() < deadline, "not synced within an hour ({written} of {confirmed})");
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            eprintln!("  [{secs:>5.0}s] written {written:>8} of {confirmed} ({:.0} orders/s)", written as f64 / secs);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    let broker_cpu = cpu_of(broker) - broker_cpu_at_start;
    let mut processes = Vec::new();
    let mut texts = Vec::new();
    let mut fetcher_texts = Vec::new();
    for p in &stack.procs {
        if let Some(admin) = p.admin {
            let text = metrics_text(stack.http(), admin).await;
            if p.role == Role::Fetcher {
                fetcher_texts.push(text.clone());
            }
            if p.role == Role::Writer {
                texts.push(text);
            }
        }
        let name = process_name(p.role, p.index);
        if let Some((cpu, peak, rss)) = p.child.id().and_then(proc_stat) {
            processes.push(ProcessUsage {
                rss_at_100k_mib: rss_at_100k.get(&name).map(|v| round(*v, 1)),
                cpu_seconds: round(cpu - cpu_at_start.get(&name).copied().unwrap_or(0.0), 2),
                process: name,
                peak_rss_mib: round(peak, 1),
                rss_at_end_mib: round(rss, 1),
            });
        }
    }
    if let Some((_, peak, rss)) = broker.and_then(proc_stat) {
        processes.push(ProcessUsage {
            process: "rabbitmq (beam.smp)".into(),
            cpu_seconds: round(broker_cpu, 2),
            peak_rss_mib: round(peak, 1),
            rss_at_100k_mib: None,
            rss_at_end_mib: round(rss, 1),
        });
    }
    let buckets = histogram_buckets(&texts, "orderflow_fetch_to_write_seconds");
    let pages = counter_sum(&fetcher_texts, "orderflow_fetch_pages_total") as u64;
    let progress = stack.progress().await?;
    anyhow::ensure!(progress.synced(), "the target does not hold every Confirmed order: {progress:?}");
    lines.push(format!("{} Confirmed orders in {} pages, all in the target", progress.written_confirmed, pages));
    Ok((
        E2eResult {
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
        },
        lines,
    ))
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// A page as the fetcher publishes it (50 orders from jst-sim's generator) and the records the
/// default mapping makes of it: the relay moves messages of exactly these sizes.
pub fn sample_messages() -> anyhow::Result<(Vec<u8>, Vec<Vec<u8>>)> {
    use jst_sim::store::{Credentials, Merchant};
    let creds = Credentials::placeholder();
    let now = jiff::Timestamp::now();
    let merchant = Merchant::seed("m1".into(), 0, creds, 50, 7, now, jiff::SignedDuration::from_hours(24));
    let orders: Vec<Value> = (0..merchant.len()).filter_map(|i| merchant.order(i)).map(|o| o.render()).collect();
    let page = json!({
        "schema": PAGE_SCHEMA, "account": "m1", "cursor": {"start_ts": 123_456_789},
        "fetched_at": orderflow_shared::time::rfc3339_china(now), "orders": orders,
    });
    let body = serde_json::to_vec(&page)?;
    let mapping = transformer::mapping::Mapping::default_jushuitan();
    let records = match transformer::page::transform_page(&mapping, &body) {
        transformer::page::PageOutcome::Transformed(t) => {
            t.records.iter().map(serde_json::to_vec).collect::<Result<Vec<_>, _>>()?
        }
        transformer::page::PageOutcome::Poison { reason, detail } => {
            anyhow::bail!("sample page rejected: {reason}: {detail}")
        }
    };
    anyhow::ensure!(!records.is_empty(), "the sample page made no records");
    Ok((body, records))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into())
}

/// Plain lapin, no project code: a producer publishes `pages` pages to a quorum queue (confirms,
/// up to 256 unconfirmed, as the fetcher allows); `replicas` relays each consume pages (prefetch
/// 16, as the transformer), publish `records_per_page` records per page to a second quorum queue,
/// wait for their confirms and ack the page; `replicas` sinks ack every record (prefetch 64, as the
/// writer). Returns records/s from the first publish to the last record acked.
pub async fn relay(
    broker: &BrokerArgs,
    pages: u64,
    records_per_page: usize,
    replicas: u32,
) -> anyhow::Result<RelayResult> {
    let (page_body, record_bodies) = sample_messages()?;
    let record_body = record_bodies[0].clone();
    let ns = format!("bench-relay-{}", jiff::Timestamp::now().as_millisecond());
    let (q1, q2) = (format!("{ns}.pages"), format!("{ns}.records"));
    let connect = |name: &'static str| {
        let broker = broker.clone();
        async move { orderflow_shared::amqp::connect(&broker, name).await }
    };
    let admin = connect("orderflow-bench-relay").await?;
    let channel = admin.create_channel().await?;
    for q in [&q1, &q2] {
        channel
            .queue_declare(q.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, quorum())
            .await?;
    }
    let total_records = pages * records_per_page as u64;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut connections: Vec<Connection> = Vec::new();
    for _ in 0..replicas {
        // Relay.
        let conn = connect("orderflow-bench-relay").await?;
        let consume = conn.create_channel().await?;
        let publish = conn.create_channel().await?;
        publish.confirm_select(Default::default()).await?;
        consume.basic_qos(16, BasicQosOptions::default()).await?;
        let mut consumer = consume
            .basic_consume(q1.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let (q2c, body) = (q2.clone(), record_body.clone());
        tasks.spawn(async move {
            let mut inflight = FuturesUnordered::new();
            loop {
                tokio::select! {
                    Some(result) = inflight.next(), if !inflight.is_empty() => { let _: () = result?; }
                    delivery = consumer.next() => {
                        let Some(delivery) = delivery else { break };
                        let delivery = delivery?;
                        let (publish, q2c, body) = (publish.clone(), q2c.clone(), body.clone());
                        inflight.push(async move {
                            let mut confirms = Vec::with_capacity(records_per_page);
                            for _ in 0..records_per_page {
                                confirms.push(
                                    publish
                                        .basic_publish("".into(), q2c.as_str().into(), BasicPublishOptions { mandatory: true, ..Default::default() }, &body, persistent())
                                        .await?,
                                );
                            }
                            for c in confirms {
                                anyhow::ensure!(c.await?.is_ack(), "record nacked");
                            }
                            delivery.ack(BasicAckOptions::default()).await?;
                            anyhow::Ok(())
                        });
                    }
                }
            }
            anyhow::Ok(())
        });
        connections.push(conn);
        // Sink.
        let conn = connect("orderflow-bench-relay").await?;
        let consume = conn.create_channel().await?;
        consume.basic_qos(64, BasicQosOptions::default()).await?;
        let mut consumer = consume
            .basic_consume(q2.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let done = done_tx.clone();
        tasks.spawn(async move {
            while let Some(delivery) = consumer.next().await {
                delivery?.ack(BasicAckOptions::default()).await?;
                let _ = done.send(1);
            }
            anyhow::Ok(())
        });
        connections.push(conn);
    }
    let broker = broker_pid();
    let (broker_cpu_at_start, own_cpu_at_start) = (cpu_of(broker), cpu_of(Some(std::process::id())));
    let started = Instant::now();
    // Producer.
    let publish = admin.create_channel().await?;
    publish.confirm_select(Default::default()).await?;
    let producer = {
        let (q1, body) = (q1.clone(), page_body.clone());
        tokio::spawn(async move {
            let mut confirms = FuturesUnordered::new();
            for _ in 0..pages {
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        q1.as_str().into(),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &body,
                        persistent(),
                    )
                    .await?;
                confirms.push(confirm);
                while confirms.len() >= 256 {
                    anyhow::ensure!(confirms.next().await.context("confirm")??.is_ack(), "page nacked");
                }
            }
            while let Some(c) = confirms.next().await {
                anyhow::ensure!(c?.is_ack(), "page nacked");
            }
            anyhow::Ok(())
        })
    };
    let mut received = 0u64;
    let deadline = started + Duration::from_secs(3600);
    while received < total_records {
        match tokio::time::timeout(Duration::from_secs(60), done_rx.recv()).await {
            Ok(Some(n)) => received += n,
            _ => anyhow::bail!("the raw relay stalled at {received} of {total_records} records"),
        }
        anyhow::ensure!(Instant::now() < deadline, "the raw relay took over an hour");
    }
    let seconds = started.elapsed().as_secs_f64();
    let broker_cpu = broker.map(|_| round(cpu_of(broker) - broker_cpu_at_start, 2));
    let relay_cpu = round(cpu_of(Some(std::process::id())) - own_cpu_at_start, 2);
    producer.await??;
    tasks.abort_all();
    for c in connections {
        let _ = c.close(200, "bye".into()).await;
    }
    let channel = admin.create_channel().await?;
    for q in [&q1, &q2] {
        let _ = channel.queue_delete(q.as_str().into(), Default::default()).await;
    }
    let _ = admin.close(200, "bye".into()).await;
    Ok(RelayResult {
        pages,
        records: total_records,
        page_bytes: page_body.len(),
        record_bytes: record_body.len(),
        seconds: round(seconds, 2),
        records_per_sec: round(total_records as f64 / seconds, 0),
        broker_cpu_seconds: broker_cpu,
        relay_cpu_seconds: relay_cpu,
    })
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

    #[test]
    fn sample_messages_have_the_pipeline_shapes() {
        let (page, records) = sample_messages().expect("sample");
        let page: Value = serde_json::from_slice(&page).expect("json");
        assert_eq!(page["orders"].as_array().map(Vec::len), Some(50));
        assert!(!records.is_empty() && records.len() <= 50);
    }
}
