//! `orderflow bench pace`: writing at the target's pace, each figure a ratio measured in one run.
//!
//! - `peak`: target-sim with a 50 ms floor whose latency grows with the square of what is in flight
//!   (throughput peaks near 200 in flight); a sweep of fixed concurrencies, then `auto`, which must
//!   reach ≥ 90% of the best fixed one with ≤ 1% of writes refused.
//! - `capacity`: target-sim accepting 500 writes/s (429 + `Retry-After` beyond); the budget
//!   (`TARGET_RATE_PER_SEC`) and `auto` must write at ≥ 90% of 500/s with ≤ 1% 429s; fixed 64 beside.
//! - `flaky`: a target failing a random 15% of writes (5xx) at 5 ms: the slowest 0.1% of records
//!   written within 30 s of their first attempt, no dead letter.

use std::path::Path;

use clap::ValueEnum;
use orderflow_shared::settings::BrokerArgs;
use serde_json::{Value, json};

use crate::bench::{WriterRun, writer_run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PaceScenario {
    All,
    Peak,
    Capacity,
    Flaky,
}

fn refused_share(run: &WriterRun) -> f64 {
    let s = &run.stats["stats"];
    let refused = s["over_capacity"].as_u64().unwrap_or(0) + s["throttled"].as_u64().unwrap_or(0);
    refused as f64 / s["requests"].as_u64().unwrap_or(1).max(1) as f64
}

async fn run_at(
    bin_dir: &Path,
    broker: &BrokerArgs,
    records: u64,
    target: &[&str],
    env: &[(&str, &str)],
) -> anyhow::Result<WriterRun> {
    let target: Vec<String> = target.iter().map(|s| s.to_string()).collect();
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
    writer_run(bin_dir, broker, records, &target, &env, false).await
}

/// The sweep of fixed concurrencies and `auto` against a target with a throughput peak.
async fn peak(bin_dir: &Path, broker: &BrokerArgs, records: u64) -> anyhow::Result<(bool, Value)> {
    let target = ["--latency-ms", "50", "--latency-per-inflight-ms", "1.25"];
    let mut fixed = Vec::new();
    for c in [32u16, 64, 128, 192, 256, 384, 512] {
        let c_text = c.to_string();
        let run = run_at(bin_dir, broker, records, &target, &[("WRITER_CONCURRENCY", &c_text)]).await?;
        eprintln!("  peak: fixed {c:>3}: {:>6.0} writes/s", run.writes_per_sec);
        fixed.push((c, run.writes_per_sec));
    }
    let auto = run_at(bin_dir, broker, records, &target, &[("WRITER_CONCURRENCY", "auto")]).await?;
    let (best_c, best) = fixed.iter().copied().fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let ratio = auto.writes_per_sec / best.max(1.0);
    let refused = refused_share(&auto);
    eprintln!(
        "peak: auto {:.0} writes/s = {:.1}% of the best fixed ({best_c}: {best:.0}/s), {:.2}% refused; fixed 64 {:.0}/s, fixed 512 {:.0}/s; target's most in flight under auto: {}",
        auto.writes_per_sec,
        ratio * 100.0,
        refused * 100.0,
        fixed.iter().find(|f| f.0 == 64).map_or(0.0, |f| f.1),
        fixed.iter().find(|f| f.0 == 512).map_or(0.0, |f| f.1),
        auto.stats["stats"]["max_inflight"]
    );
    let ok = ratio >= 0.9 && refused <= 0.01;
    let fixed_json: Vec<Value> =
        fixed.iter().map(|(c, r)| json!({"concurrency": c, "writes_per_sec": r.round()})).collect();
    Ok((
        ok,
        json!({"scenario": "pace-peak", "fixed": fixed_json, "auto_writes_per_sec": auto.writes_per_sec.round(), "best_fixed": best_c, "ratio": ratio, "refused": refused}),
    ))
}

/// A 500/s capacity: the budget, auto, and fixed 64.
async fn capacity(bin_dir: &Path, broker: &BrokerArgs, records: u64) -> anyhow::Result<(bool, Value)> {
    let target = ["--latency-ms", "20", "--capacity-per-sec", "500", "--retry-after", "1"];
    let mut out = Vec::new();
    let mut ok = true;
    for (name, env) in [
        ("budget 475/s", vec![("WRITER_CONCURRENCY", "64"), ("TARGET_RATE_PER_SEC", "475")]),
        ("auto", vec![("WRITER_CONCURRENCY", "auto")]),
        ("fixed 64", vec![("WRITER_CONCURRENCY", "64")]),
    ] {
        let run = run_at(bin_dir, broker, records, &target, &env).await?;
        let (ratio, refused) = (run.writes_per_sec / 500.0, refused_share(&run));
        eprintln!(
            "capacity 500/s: {name:<13} {:>5.0} writes/s = {:>5.1}% of capacity, {:>5.2}% answered 429",
            run.writes_per_sec,
            ratio * 100.0,
            refused * 100.0
        );
        if name == "budget 475/s" {
            ok &= ratio >= 0.9 && refused <= 0.01;
        }
        out.push(
            json!({"run": name, "writes_per_sec": run.writes_per_sec.round(), "ratio": ratio, "refused": refused}),
        );
    }
    Ok((ok, json!({"scenario": "pace-capacity", "runs": out})))
}

/// 15% random 5xx at 5 ms: from each record's first attempt to its write.
async fn flaky(bin_dir: &Path, broker: &BrokerArgs, records: u64) -> anyhow::Result<(bool, Value)> {
    let target: Vec<String> = ["--latency-ms", "5", "--failure-rate", "0.15"].iter().map(|s| s.to_string()).collect();
    let run = writer_run(bin_dir, broker, records, &target, &[], true).await?;
    let mut delays: Vec<i64> = run
        .records
        .as_ref()
        .and_then(|r| r["records"].as_array())
        .map(|rs| {
            rs.iter()
                .map(|r| r["written_at_ms"].as_i64().unwrap_or(0) - r["first_attempt_at_ms"].as_i64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    delays.sort_unstable();
    let at = |q: f64| {
        delays.get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1))).copied().unwrap_or(0)
    };
    let (p50, p99, p999, max) = (at(0.5), at(0.99), at(0.999), delays.last().copied().unwrap_or(0));
    eprintln!(
        "flaky (15% 5xx, 5 ms): {} records, first attempt → written p50 {p50} ms, p99 {p99} ms, p99.9 {p999} ms, max {max} ms; {} dead letters; {:.0} writes/s",
        delays.len(),
        run.dead,
        run.writes_per_sec
    );
    let ok = p999 <= 30_000 && run.dead == 0 && delays.len() as u64 == records;
    Ok((
        ok,
        json!({"scenario": "pace-flaky", "records": delays.len(), "p50_ms": p50, "p99_ms": p99, "p999_ms": p999, "max_ms": max, "dead_letters": run.dead}),
    ))
}

pub async fn run(
    bin_dir: &Path,
    broker: &BrokerArgs,
    scenario: PaceScenario,
    records: u64,
    json_out: bool,
) -> anyhow::Result<bool> {
    let mut ok = true;
    let all = scenario == PaceScenario::All;
    let mut results = Vec::new();
    if all || scenario == PaceScenario::Peak {
        results.push(peak(bin_dir, broker, records).await?);
    }
    if all || scenario == PaceScenario::Capacity {
        results.push(capacity(bin_dir, broker, records / 2).await?);
    }
    if all || scenario == PaceScenario::Flaky {
        results.push(flaky(bin_dir, broker, records).await?);
    }
    for (passed, result) in results {
        ok &= passed;
        if json_out {
            println!("{result}");
        }
    }
    Ok(ok)
}
