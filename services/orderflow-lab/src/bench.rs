//! `orderflow bench`: measured speed on this machine, reproducible from a clean clone.
//!
//! `writer` — one writer against target-sim with a fixed latency: records are preloaded into
//! `<ns>.records`, then a writer process drains them; writes/s from the first to the last write,
//! compared with the ceiling concurrency ÷ latency (and the source documents' 10 threads).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use futures_util::{StreamExt, stream::FuturesUnordered};
use orderflow_shared::{
    amqp::{
        Publisher, Stage, Topology,
        headers::{json_properties, set_i64},
        ops::{Client, parse_retry_tiers},
        topology::RECORD_ROUTING_KEY,
    },
    messages::{RECORD_SCHEMA, Record, header, now_ms},
    settings::BrokerArgs,
};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::stack::{default_bin_dir, spawn_logged, spawn_sim};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
    /// Print one JSON object per measurement on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Where the binaries are (default: next to this executable).
    #[arg(long, global = true)]
    pub bin_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// One writer against a target with fixed latency, at concurrency C (and at 10 for comparison).
    Writer {
        /// Records to write per measurement.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        /// Writer concurrency (WRITER_CONCURRENCY).
        #[arg(long, default_value_t = 64)]
        concurrency: u16,
        /// Target latency per write, in milliseconds.
        #[arg(long, default_value_t = 50)]
        latency_ms: u64,
        /// Also measure at this concurrency (the source documents write with 10 threads); 0 skips it.
        #[arg(long, default_value_t = 10)]
        compare: u16,
    },
    /// The whole pipeline (limits lifted, no target latency) against the raw broker relay.
    E2e {
        /// Orders to sync (spread over the merchants).
        #[arg(long, default_value_t = 200_000)]
        orders: u64,
        /// Merchants (fetch accounts) in jst-sim.
        #[arg(long, default_value_t = 4)]
        accounts: u32,
        /// Replicas of each stage (K).
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Pace the source to about this many orders/s in all (0: limits lifted).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Writer concurrency (WRITER_CONCURRENCY).
        #[arg(long, default_value_t = 64)]
        concurrency: u16,
        /// Skip the raw relay measurement.
        #[arg(long)]
        no_relay: bool,
        /// Then run again paced at half the measured rate and report that run's latency.
        #[arg(long)]
        half_rate: bool,
    },
    /// Writing at the target's pace: adaptive concurrency against a throughput peak, a 500/s
    /// capacity (budget, auto, fixed 64), and 15% random 5xx (first attempt → written).
    Pace {
        /// Which measurement.
        #[arg(long, value_enum, default_value = "all")]
        scenario: crate::pace_bench::PaceScenario,
        /// Records per run.
        #[arg(long, default_value_t = 20_000)]
        records: u64,
    },
    /// The ledger's cost: the e2e pipeline with LEDGER=off, then on (throughput ratio, memory),
    /// then the ledger read back in full and one order traced.
    Ledger {
        /// Orders to sync in each run.
        #[arg(long, default_value_t = 200_000)]
        orders: u64,
        /// Merchants (fetch accounts) in jst-sim.
        #[arg(long, default_value_t = 4)]
        accounts: u32,
        /// Before reading it back, top the ledger up to this size with made-up orders appended
        /// as the stages do (e.g. 4GiB, the default LEDGER_MAX_BYTES: what a day at the bench's
        /// rate leaves in the ledger); 0: the run's own ledger only.
        #[arg(long, default_value = "0", value_parser = orderflow_shared::settings::parse_bytes)]
        fill: u64,
    },
    /// One merchant at the real limits (5 calls/s, 100 calls/min): orders/s against the budget.
    Source {
        /// How long to measure.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
    },
    /// Many merchants on one broker at the real limits, K fetchers, one killed mid-sync: spread,
    /// takeover, channel churn, `list_queues` latency, concurrent callers per merchant, peak RSS.
    Scale {
        /// Merchants (fetch accounts) in jst-sim.
        #[arg(long, default_value_t = 1000)]
        accounts: u32,
        /// Orders seeded per merchant.
        #[arg(long, default_value_t = 20)]
        orders: u64,
        /// Fetcher replicas.
        #[arg(long, default_value_t = 3)]
        fetchers: u32,
        /// New orders per second per merchant while the run lasts.
        #[arg(long, default_value_t = 0.05)]
        new_per_sec: f64,
        /// Longest wait for each phase (spread, takeover, sync).
        #[arg(long, default_value = "10m", value_parser = orderflow_shared::settings::parse_duration)]
        timeout: std::time::Duration,
    },
}

pub async fn run(args: BenchArgs, broker: BrokerArgs) -> anyhow::Result<bool> {
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    match args.scenario {
        Scenario::Writer { records, concurrency, latency_ms, compare } => {
            let runs =
                if compare > 0 && compare != concurrency { vec![concurrency, compare] } else { vec![concurrency] };
            let mut all_ok = true;
            for c in runs {
                let ratio = writer_bench(&bin_dir, &broker, records, c, latency_ms, args.json).await?;
                all_ok &= c != concurrency || ratio >= 0.9;
            }
            Ok(all_ok)
        }
        Scenario::E2e { orders, accounts, replicas, rate, concurrency, no_relay, half_rate } => {
            let options = crate::e2e::E2eOptions {
                orders,
                accounts,
                replicas,
                rate,
                writer_concurrency: concurrency,
                relay: !no_relay,
                ..crate::e2e::E2eOptions::new(orders, accounts, replicas)
            };
            e2e(&bin_dir, &broker, options, half_rate, args.json).await
        }
        Scenario::Ledger { orders, accounts, fill } => {
            let r = crate::ledger_bench::run(&bin_dir, &broker, orders, accounts, fill).await?;
            crate::ledger_bench::print(&r);
            if args.json {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(r.ratio >= 0.9 && r.max_stage_peak_rss_mib <= 50.0 && r.trace_seconds < 5.0)
        }
        Scenario::Pace { scenario, records } => {
            crate::pace_bench::run(&bin_dir, &broker, scenario, records, args.json).await
        }
        Scenario::Source { seconds } => source_bench(&bin_dir, &broker, seconds, args.json).await,
        Scenario::Scale { accounts, orders, fetchers, new_per_sec, timeout } => {
            let ns = format!("{}-scale-{}", broker.ns, jiff::Timestamp::now().as_millisecond());
            let options = crate::scale::ScaleOptions {
                amqp_url: broker.amqp_url.clone(),
                log_dir: std::env::temp_dir().join(&ns),
                ns,
                bin_dir: Some(bin_dir),
                accounts,
                orders,
                fetchers,
                new_per_sec,
                kill: true,
                timeout,
            };
            let report = crate::scale::run(options).await?;
            crate::scale::print(&report);
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(report.written == report.confirmed && report.max_concurrent_callers <= 1 && report.rate_rejections == 0)
        }
    }
}

/// One writer-bound measurement at concurrency `c`: prints it, returns writes/s ÷ the ceiling
/// concurrency ÷ latency.
async fn writer_bench(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    records: u64,
    c: u16,
    latency_ms: u64,
    json: bool,
) -> anyhow::Result<f64> {
    let result = writer_bound(bin_dir, broker, records, c, latency_ms).await?;
    let ceiling = f64::from(c) * 1000.0 / latency_ms as f64;
    let ratio = result / ceiling;
    if json {
        println!(
            "{}",
            json!({"scenario": "writer", "records": records, "concurrency": c, "latency_ms": latency_ms, "writes_per_sec": result.round(), "ceiling_per_sec": ceiling.round(), "ratio": (ratio * 1000.0).round() / 1000.0})
        );
    }
    eprintln!(
        "writer-bound: concurrency {c:>3}, latency {latency_ms} ms: {result:>7.0} writes/s = {:.1}% of concurrency ÷ latency ({ceiling:.0}/s)",
        ratio * 100.0
    );
    Ok(ratio)
}

/// `bench source`: prints the measurement; passes at ≥ 95% of the budget with no 199/200 answer.
async fn source_bench(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    seconds: u64,
    json: bool,
) -> anyhow::Result<bool> {
    eprintln!("source-bound: one merchant at 5 calls/s + 100 calls/min for {seconds} s …");
    let r = crate::e2e::source(bin_dir, broker, seconds).await?;
    eprintln!(
        "source-bound: {} orders/s = {:.1}% of the budget ({} orders/s); 199/200 rejections: {}",
        r["orders_per_sec"],
        r["ratio"].as_f64().unwrap_or(0.0) * 100.0,
        r["budget_orders_per_sec"],
        r["rejections_199_200"]
    );
    if json {
        println!("{r}");
    }
    Ok(r["ratio"].as_f64().unwrap_or(0.0) >= 0.95 && r["rejections_199_200"].as_u64() == Some(0))
}

fn print_e2e(r: &crate::e2e::E2eResult) {
    eprintln!(
        "pipeline: {} orders ({} pages, {} merchants, {} replica(s) per stage{}) in {:.1} s = {:.0} orders/s; fetch→write p50 {} ms, p99 {} ms",
        r.orders,
        r.pages,
        r.accounts,
        r.replicas,
        if r.paced_orders_per_sec > 0 {
            format!(", source paced to ~{}/s", r.paced_orders_per_sec)
        } else {
            String::new()
        },
        r.seconds,
        r.orders_per_sec,
        r.latency_p50_ms,
        r.latency_p99_ms
    );
    eprintln!("  {:<20} {:>12} {:>10} {:>12} {:>10}", "process", "cpu s (sync)", "peak MiB", "@100k MiB", "end MiB");
    for p in &r.processes {
        eprintln!(
            "  {:<20} {:>12.2} {:>10.1} {:>12} {:>10.1}",
            p.process,
            p.cpu_seconds,
            p.peak_rss_mib,
            p.rss_at_100k_mib.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
            p.rss_at_end_mib
        );
    }
}

async fn e2e(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    options: crate::e2e::E2eOptions,
    half_rate: bool,
    json: bool,
) -> anyhow::Result<bool> {
    orderflow_shared::init_process();
    eprintln!(
        "e2e: {} orders, {} merchants, {} replica(s) per stage, writer concurrency {} …",
        options.orders, options.accounts, options.replicas, options.writer_concurrency
    );
    let (mut result, notes) = crate::e2e::pipeline(bin_dir, broker, &options).await?;
    for n in notes {
        eprintln!("  {n}");
    }
    let mut ok = true;
    if options.relay && result.pages > 0 {
        let per_page = ((result.orders as f64 / result.pages as f64).round() as usize).max(1);
        eprintln!("raw relay: {} pages × {per_page} records through the same two hops …", result.pages);
        let relay = crate::relay::relay(broker, result.pages, per_page, options.replicas).await?;
        let ratio = result.orders_per_sec / relay.records_per_sec.max(1.0);
        result.ratio = Some((ratio * 1000.0).round() / 1000.0);
        result.relay = Some(relay);
        ok &= ratio >= 0.6;
    }
    print_e2e(&result);
    if let Some(relay) = &result.relay {
        eprintln!(
            "raw relay: {} records ({} pages of {} B, records of {} B) in {:.1} s = {:.0} records/s",
            relay.records, relay.pages, relay.page_bytes, relay.record_bytes, relay.seconds, relay.records_per_sec
        );
        if let Some(broker) = relay.broker_cpu_seconds {
            eprintln!("  cpu s: rabbitmq (beam.smp) {broker:.2}, relay process {:.2}", relay.relay_cpu_seconds);
        }
        eprintln!("ratio: pipeline ÷ raw relay = {:.1}% (target ≥ 60%)", result.ratio.unwrap_or(0.0) * 100.0);
    }
    if json {
        println!("{}", serde_json::to_string(&result)?);
    }
    if half_rate {
        let rate = ((result.orders_per_sec / 2.0) as u32).max(50);
        let paced = crate::e2e::E2eOptions { rate, relay: false, ..options };
        eprintln!("\nhalf rate: the same run with the source paced to ~{rate} orders/s …");
        let (half, _) = crate::e2e::pipeline(bin_dir, broker, &paced).await?;
        print_e2e(&half);
        eprintln!("half rate: p99 fetch→write {} ms (target < 1000 ms)", half.latency_p99_ms);
        ok &= half.latency_p99_ms < 1000.0;
        if json {
            println!("{}", serde_json::to_string(&half)?);
        }
    }
    Ok(ok)
}

fn bench_record(i: u64) -> Record {
    let id = (900_000_000 + i).to_string();
    Record {
        schema: RECORD_SCHEMA.to_string(),
        account: "bench".into(),
        id: id.clone(),
        version: "1".into(),
        data: json!({
            "id": id, "name": "张**", "date": "20231001", "amount": orderflow_shared::json::number("150.75"),
            "items_detail": [{"product_id": "SKU10001", "qty": 2, "unit_price": orderflow_shared::json::number("50.25")},
                             {"product_id": "SKU10002", "qty": 1, "unit_price": orderflow_shared::json::number("50.25")}],
            "shop_id": "100001", "so_id": format!("SO{i}"), "io_id": id, "modified": "2023-10-01T09:30:00.123+08:00",
        }),
    }
}

/// Publishes `records` bench records into the records queue (confirmed, pipelined).
async fn preload(publisher: &Publisher, topology: &Topology, records: u64) -> anyhow::Result<()> {
    let exchange = topology.records_exchange();
    let mut inflight = FuturesUnordered::new();
    for i in 0..records {
        let record = bench_record(i);
        let body = serde_json::to_vec(&record)?;
        let mut headers = Default::default();
        set_i64(&mut headers, header::ATTEMPT, 0);
        set_i64(&mut headers, header::FETCHED_AT_MS, now_ms());
        let props = json_properties(&record.message_id(), headers);
        let (p, e) = (publisher.clone(), exchange.clone());
        inflight.push(async move { p.publish(&e, RECORD_ROUTING_KEY, &body, props).await });
        while inflight.len() >= 256 {
            inflight.next().await.context("publish")??;
        }
    }
    while let Some(r) = inflight.next().await {
        r?;
    }
    Ok(())
}

async fn writer_bound(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    records: u64,
    concurrency: u16,
    latency_ms: u64,
) -> anyhow::Result<f64> {
    let target = ["--latency-ms".to_string(), latency_ms.to_string()];
    let env = [("WRITER_CONCURRENCY", concurrency.to_string())];
    Ok(writer_run(bin_dir, broker, records, &target, &env, false).await?.writes_per_sec)
}

/// One writer run: what target-sim saw, and the records it holds when asked.
pub struct WriterRun {
    pub writes_per_sec: f64,
    /// target-sim's `/admin/stats`.
    pub stats: Value,
    /// target-sim's `/admin/records` (with `keep_records`).
    pub records: Option<Value>,
    /// Dead letters in the writer's dead queue at the end.
    pub dead: u32,
}

/// Preloads `records` into a fresh namespace, runs target-sim with `target_args` and one writer
/// with `env`, and measures writes/s from the first to the last write.
pub async fn writer_run(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    records: u64,
    target_args: &[String],
    env: &[(&str, String)],
    keep_records: bool,
) -> anyhow::Result<WriterRun> {
    orderflow_shared::init_process();
    let ns = format!("bench-w-{}", jiff::Timestamp::now().as_millisecond());
    let log_dir = std::env::temp_dir().join(format!("orderflow-{ns}"));
    std::fs::create_dir_all(&log_dir)?;
    let mut broker = broker.clone();
    broker.ns = ns.clone();
    let client = Client::connect(&broker, "orderflow-bench").await?;
    let topology = writer_topology(&ns, env);
    client.declare(&topology).await?;
    let (mut target, target_url) =
        spawn_sim(&bin_dir.join("target-sim"), target_args, &log_dir.join("target-sim.log")).await?;
    preload(&client.publisher().await?, &topology, records).await?;
    let mut writer = spawn_writer(bin_dir, &broker, &target_url, env, &log_dir).await?;
    let http = reqwest::Client::new();
    let (writes_per_sec, stats) = watch_writes(&http, &target_url, records).await?;
    let records_json = if keep_records {
        Some(http.get(format!("{target_url}/admin/records")).send().await?.json::<Value>().await?)
    } else {
        None
    };
    let dead = client.queue_state(&topology.dead_queue(Stage::Writer)).await?.map(|q| q.messages).unwrap_or(0);
    for child in [&mut writer, &mut target] {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    client.delete_namespace(&topology, &[]).await?;
    client.close().await;
    Ok(WriterRun { writes_per_sec, stats, records: records_json, dead })
}

/// The namespace's topology with the retry tiers `env` gives the writer, else the default ones.
fn writer_topology(ns: &str, env: &[(&str, String)]) -> Topology {
    let tiers: Vec<Duration> =
        env.iter().find(|(k, _)| *k == "RETRY_TIERS").and_then(|(_, v)| parse_retry_tiers(v).ok()).unwrap_or_default();
    if tiers.is_empty() { Topology::new(ns) } else { Topology::new(ns).with_retry_tiers(tiers) }
}

/// Starts one writer on `broker`'s namespace against target-sim, with `env` on top.
async fn spawn_writer(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    target_url: &str,
    env: &[(&str, String)],
    log_dir: &std::path::Path,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(bin_dir.join("writer"));
    cmd.env("AMQP_URL", &broker.amqp_url)
        .env("ORDERFLOW_NS", &broker.ns)
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("TARGET_URL", format!("{target_url}/data/write"))
        .env("LOG_FORMAT", "json");
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_logged(&mut cmd, &log_dir.join("writer.log")).await
}

/// Polls target-sim until it has written `records`; returns writes/s from the first write to the
/// last, and its final `/admin/stats`.
async fn watch_writes(http: &reqwest::Client, target_url: &str, records: u64) -> anyhow::Result<(f64, Value)> {
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let stats: Value = http.get(format!("{target_url}/admin/stats")).send().await?.json().await?;
        let n = stats["stats"]["written"].as_u64().unwrap_or(0);
        let now = Instant::now();
        if first.is_none() && n > 0 {
            first = Some((now, n));
        }
        if n >= records {
            let (t0, n0) = first.unwrap_or((now, n));
            return Ok(((n - n0) as f64 / now.duration_since(t0).as_secs_f64().max(0.001), stats));
        }
        anyhow::ensure!(now < deadline, "the writer did not finish within 15 minutes ({n} of {records})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
