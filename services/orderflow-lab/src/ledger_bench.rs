//! `orderflow bench ledger`: what the ledger costs, measured in one run — the same `bench e2e`
//! pipeline with `LEDGER=off` and then `LEDGER=on` (throughput ratio, each stage's peak RSS), and
//! then how fast its ledger reads back: the whole stream (what an audit reads, and what a trace
//! read before the index) and one order's `orderflow trace` (the CLI itself, as an operator runs
//! it, through the index). `--fill` first tops the ledger up to a size (see `ledger_fill`): a day
//! at the bench's rate leaves the ledger at its cap.

use std::time::{Duration, Instant};

use orderflow_shared::{
    amqp::{Topology, ledger, ops::Client},
    settings::BrokerArgs,
};
use serde::Serialize;

use crate::e2e::{E2eOptions, E2eResult, pipeline, round};

#[derive(Debug, Serialize)]
pub struct LedgerBench {
    pub orders: u64,
    pub off_orders_per_sec: f64,
    pub on_orders_per_sec: f64,
    /// On ÷ off (target ≥ 0.9).
    pub ratio: f64,
    /// The highest peak RSS of a stage replica with the ledger on (target ≤ 50 MiB).
    pub max_stage_peak_rss_mib: f64,
    pub events: u64,
    pub ledger_bytes: u64,
    pub bytes_per_order: f64,
    /// Reading the whole ledger back (every batch parsed).
    pub full_read_seconds: f64,
    pub full_read_mb_per_sec: f64,
    /// `orderflow trace <id>` over the same ledger, process start to answer.
    pub trace_seconds: f64,
    /// How the trace read: `index` or `scan`, and what it read of each stream.
    pub trace_how: String,
    pub trace_index_mb: f64,
    pub trace_ledger_mb: f64,
    /// What `--fill` appended before the reads (none: the run's own ledger only).
    pub filled: Option<crate::ledger_fill::Filled>,
    pub on: E2eResult,
}

pub async fn run(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    orders: u64,
    accounts: u32,
    fill: u64,
) -> anyhow::Result<LedgerBench> {
    orderflow_shared::init_process();
    eprintln!("ledger: {orders} orders with LEDGER=off …");
    let (off, _) =
        pipeline(bin_dir, broker, &E2eOptions { ledger: false, ..E2eOptions::new(orders, accounts, 1) }).await?;
    eprintln!("  {:.0} orders/s", off.orders_per_sec);
    eprintln!("ledger: {orders} orders with LEDGER=on …");
    let with = E2eOptions { ledger: true, keep_namespace: true, ..E2eOptions::new(orders, accounts, 1) };
    let (on, _) = pipeline(bin_dir, broker, &with).await?;
    eprintln!("  {:.0} orders/s", on.orders_per_sec);
    let filled = if fill > 0 {
        eprintln!("ledger: filling it up to {:.1} GiB …", fill as f64 / f64::from(1u32 << 30));
        let filled = crate::ledger_fill::fill(broker, &on.namespace, fill).await?;
        eprintln!(
            "  {} orders, {:.0} MB of ledger in {:.0} s",
            filled.orders,
            filled.ledger_bytes as f64 / 1e6,
            filled.seconds
        );
        Some(filled)
    } else {
        None
    };
    let read = read_back(bin_dir, broker, &on).await;
    let client = Client::connect(&BrokerArgs { ns: on.namespace.clone(), ..broker.clone() }, "orderflow-bench").await?;
    client.delete_namespace(&Topology::new(on.namespace.clone()), &[]).await?;
    client.close().await;
    let (events, bytes, full_secs, trace) = read?;
    let max_peak = on
        .processes
        .iter()
        .filter(|p| ["fetcher", "transformer", "writer"].iter().any(|s| p.process.starts_with(s)))
        .map(|p| p.peak_rss_mib)
        .fold(0.0, f64::max);
    let per_order = bytes as f64 / on.orders.max(1) as f64;
    let mb_per_sec = bytes as f64 / 1e6 / full_secs.max(1e-6);
    Ok(LedgerBench {
        orders: on.orders,
        off_orders_per_sec: off.orders_per_sec,
        on_orders_per_sec: on.orders_per_sec,
        ratio: round(on.orders_per_sec / off.orders_per_sec.max(1.0), 3),
        max_stage_peak_rss_mib: max_peak,
        events,
        ledger_bytes: bytes,
        bytes_per_order: round(per_order, 0),
        full_read_seconds: round(full_secs, 2),
        full_read_mb_per_sec: round(mb_per_sec, 1),
        trace_seconds: round(trace.seconds, 2),
        trace_how: trace.how,
        trace_index_mb: round(trace.index_bytes as f64 / 1e6, 1),
        trace_ledger_mb: round(trace.ledger_bytes as f64 / 1e6, 1),
        filled,
        on,
    })
}

/// One `orderflow trace` as the bench saw it.
struct Traced {
    seconds: f64,
    how: String,
    index_bytes: u64,
    ledger_bytes: u64,
}

/// Reads the run's ledger in full (events, bytes, seconds), then times `orderflow trace` of an
/// order from the middle of the run.
async fn read_back(
    bin_dir: &std::path::Path,
    broker: &BrokerArgs,
    on: &E2eResult,
) -> anyhow::Result<(u64, u64, f64, Traced)> {
    let args = BrokerArgs { ns: on.namespace.clone(), ..broker.clone() };
    let client = Client::connect(&args, "orderflow-bench").await?;
    let topology = Topology::new(on.namespace.clone());
    let (mut events, mut ids) = (0u64, Vec::new());
    let started = Instant::now();
    let summary = ledger::read_events(client.connection(), &topology, 0, &[], |_, _, event| {
        events += 1;
        // The run's own orders (jst-sim's), not the fill's.
        if events % 1000 == 0
            && let Some(id) = event.o_id.filter(|id| id.len() < 9 || !id.starts_with('9'))
        {
            ids.push(id);
        }
    })
    .await;
    let full = started.elapsed().as_secs_f64();
    client.close().await;
    let summary = summary?;
    anyhow::ensure!(summary.complete, "the ledger read did not reach its end: {summary:?}");
    let id = ids.get(ids.len() / 2).cloned().ok_or_else(|| anyhow::anyhow!("the ledger holds no order"))?;
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(bin_dir.join("orderflow"))
            .args(["trace", &id, "--json"])
            .env("AMQP_URL", &broker.amqp_url)
            .env("ORDERFLOW_NS", &on.namespace)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let read = &answer["read"];
    let trace = Traced {
        seconds,
        how: read["how"].as_str().unwrap_or("?").to_string(),
        index_bytes: read["index"]["bytes"].as_u64().unwrap_or(0),
        ledger_bytes: read["ledger"]["bytes"].as_u64().unwrap_or(0),
    };
    let kinds: Vec<String> = answer["orders"][0]["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|v| v["steps"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| s["kind"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(
        out.status.success()
            && kinds.first().map(String::as_str) == Some("fetched")
            && kinds.iter().any(|k| k == "written"),
        "orderflow trace {id} did not show the order fetched and written: {kinds:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("  trace of order {id}: {}", kinds.join(" → "));
    Ok((events, summary.bytes, full, trace))
}

pub fn print(r: &LedgerBench) {
    eprintln!(
        "ledger cost: {} orders, {:.0} orders/s with LEDGER=off, {:.0} with LEDGER=on: ratio {:.1}% (target ≥ 90%)",
        r.orders,
        r.off_orders_per_sec,
        r.on_orders_per_sec,
        r.ratio * 100.0
    );
    eprintln!("  peak RSS of a stage with the ledger on: {:.1} MiB (target ≤ 50)", r.max_stage_peak_rss_mib);
    eprintln!(
        "  ledger: {} events, {:.1} MB ({:.0} bytes per order); read back in {:.2} s ({:.1} MB/s)",
        r.events,
        r.ledger_bytes as f64 / 1e6,
        r.bytes_per_order,
        r.full_read_seconds,
        r.full_read_mb_per_sec
    );
    eprintln!(
        "  orderflow trace over it: {:.2} s (target < 5 s), through the {}: {:.1} MB of index and {:.1} MB of ledger read",
        r.trace_seconds, r.trace_how, r.trace_index_mb, r.trace_ledger_mb
    );
}
