//! `orderflow demo`: the whole pipeline on this machine against `AMQP_URL` — jst-sim, target-sim
//! and K replicas of each stage as child processes — with live progress (Confirmed in source vs
//! written), ending when synced with a summary. Ctrl-C stops every child cleanly.

use std::{
    io::IsTerminal,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Args;
use orderflow_shared::{
    amqp::{Stage, Topology, ops::Client},
    settings::{BrokerArgs, redact_url},
};
use serde_json::json;

use crate::{
    demo_broker::DemoBroker,
    stack::{Progress, Stack, StackOptions, delete_stack_namespace},
};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Orders seeded per merchant.
    #[arg(long, default_value_t = 20_000)]
    pub orders: u64,
    /// Merchants (source accounts).
    #[arg(long, default_value_t = 1)]
    pub accounts: u32,
    /// Replicas of each stage (fetcher, transformer, writer).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Keep the source changing (modified, confirmed, cancelled, new and late orders) for --churn-secs.
    #[arg(long)]
    pub churn: bool,
    /// How long churn runs before the demo lets the pipeline catch up.
    #[arg(long, default_value_t = 20)]
    pub churn_secs: u64,
    /// Inject faults: source 5xx/resets/code 150, target 5xx and 429.
    #[arg(long)]
    pub faults: bool,
    /// Use Jushuitan's real per-merchant limits (5/s, 100/min) instead of demo limits (50/s, 3000/min).
    #[arg(long)]
    pub real_limits: bool,
    /// Print one JSON object with the summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Keep the namespace's queues afterwards (default: deleted).
    #[arg(long)]
    pub keep: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Where the binaries are (default: next to this executable).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

pub async fn run(args: DemoArgs, broker: BrokerArgs) -> anyhow::Result<bool> {
    let ns = if broker.ns == "orderflow" {
        format!("demo-{}", jiff::Timestamp::now().as_second())
    } else {
        broker.ns.clone()
    };
    let (client, broker, _demo_broker) = connect_or_start_broker(broker).await?;
    let log_dir = std::env::temp_dir().join(format!("orderflow-{ns}"));
    let started = Instant::now();
    let mut stack = Stack::start(stack_options(&args, &broker, &ns, &log_dir)).await?;
    eprintln!(
        "orderflow demo: namespace {ns}; {} merchant(s) × {} orders; {} replica(s) per stage\n  jst-sim {}  target-sim {}\n  logs in {}  (Ctrl-C stops everything)",
        args.accounts.max(1),
        args.orders,
        args.replicas.max(1),
        stack.jst_url,
        stack.target_url,
        log_dir.display()
    );
    let watched = watch(&args, &mut stack, &client, &Topology::new(ns.clone()), started).await?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = stack.target_stats().await.ok();
    stack.stop().await;
    if !args.keep {
        let _ = delete_stack_namespace(&client, &stack.options).await;
    }
    client.close().await;
    let duplicates = stats.as_ref().and_then(|s| s["stats"]["duplicates_suppressed"].as_u64()).unwrap_or(0);
    summarize(&args, &ns, &watched, duplicates, seconds, &log_dir);
    Ok(watched.synced)
}

/// A connection to the broker at `AMQP_URL`. With no broker at a local URL, one is started in
/// Docker (kept until the returned guard is dropped), or the error says how to get one.
async fn connect_or_start_broker(broker: BrokerArgs) -> anyhow::Result<(Client, BrokerArgs, Option<DemoBroker>)> {
    match Client::connect(&broker, "orderflow-demo").await {
        Ok(client) => Ok((client, broker, None)),
        Err(_) if crate::demo_broker::is_local(&broker.amqp_url) => {
            let started = crate::demo_broker::start(&broker)
                .await
                .map_err(|why| anyhow::anyhow!(crate::demo_broker::no_broker_message(&broker, &why)))?;
            let client = Client::connect(&started.broker, "orderflow-demo").await?;
            Ok((client, started.broker.clone(), Some(started)))
        }
        Err(error) => Err(anyhow::Error::from(error)
            .context(format!("RabbitMQ is needed at {} (or set AMQP_URL)", redact_url(&broker.amqp_url)))),
    }
}

/// The demo's stack: the flags' sizes, demo limits (or the real ones), quick passes and retries,
/// and churn and faults when asked.
fn stack_options(args: &DemoArgs, broker: &BrokerArgs, ns: &str, log_dir: &std::path::Path) -> StackOptions {
    let mut options = StackOptions::new(&broker.amqp_url, ns, log_dir);
    if let Some(dir) = &args.bin_dir {
        options.bin_dir = dir.clone();
    }
    options.accounts = args.accounts.max(1);
    options.orders = args.orders;
    options.fetchers = args.replicas.max(1);
    options.transformers = args.replicas.max(1);
    options.writers = args.replicas.max(1);
    if args.real_limits {
        options.rate_per_sec = 5;
        options.rate_per_min = 100;
    }
    options.env = vec![
        ("FETCH_INTERVAL".into(), "1s".into()),
        ("FETCH_PASS_TIME".into(), "10s".into()),
        ("RETRY_TIERS".into(), "1s,2s,5s,10s".into()),
    ];
    if args.churn {
        options.jst_args.extend(
            [
                "--churn-modify",
                "5",
                "--churn-confirm",
                "5",
                "--churn-new",
                "5",
                "--churn-late",
                "2",
                "--churn-cancel",
                "1",
                "--late-max",
                "20s",
            ]
            .map(String::from),
        );
    }
    if args.faults {
        options.jst_args.extend(
            ["--fault-5xx-rate", "0.05", "--fault-reset-rate", "0.02", "--fault-code150-rate", "0.02"]
                .map(String::from),
        );
        options
            .target_args
            .extend(["--failure-rate", "0.1", "--throttle-rate", "0.05", "--retry-after", "1"].map(String::from));
    }
    options
}

/// What the demo saw by its end.
struct Watched {
    synced: bool,
    interrupted: bool,
    progress: Option<Progress>,
    dead: u64,
}

/// Shows Confirmed vs written every second until synced (after churn stopped), a process exits,
/// Ctrl-C, or the timeout.
async fn watch(
    args: &DemoArgs,
    stack: &mut Stack,
    client: &Client,
    topology: &Topology,
    started: Instant,
) -> anyhow::Result<Watched> {
    let tty = std::io::stderr().is_terminal();
    let deadline = started + Duration::from_secs(args.timeout);
    let mut churn_on = args.churn;
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let mut watched = Watched { synced: false, interrupted: false, progress: None, dead: 0 };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { watched.interrupted = true; break; }
            _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
        }
        if churn_on && started.elapsed() >= Duration::from_secs(args.churn_secs) {
            stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
            churn_on = false;
            eprintln!("{}churn stopped; letting the pipeline catch up", if tty { "\n" } else { "" });
        }
        if report_exit(stack) {
            break;
        }
        let p = match stack.progress().await {
            Ok(p) => p,
            Err(error) => {
                eprintln!("progress: {error:#}");
                continue;
            }
        };
        watched.dead = dead_letters(client, topology).await?;
        watched.progress = Some(p);
        let line = progress_line(&p, watched.dead, started.elapsed().as_secs_f64(), churn_on);
        if tty {
            eprint!("\r{line}");
        } else if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!("{line}");
            last_print = Instant::now();
        }
        watched.synced = p.synced() && !churn_on;
        if watched.synced || Instant::now() >= deadline {
            break;
        }
    }
    if tty {
        eprintln!();
    }
    Ok(watched)
}

/// When a process of the stack exited, says so with the end of its log; returns whether one did.
fn report_exit(stack: &mut Stack) -> bool {
    let Some((role, index, log, status)) = stack.exited() else { return false };
    eprintln!("\n{} #{index} exited ({status}); its log: {}", role.binary(), log.display());
    if let Ok(text) = std::fs::read_to_string(&log) {
        for line in text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev() {
            eprintln!("  {line}");
        }
    }
    true
}

/// Dead letters in every stage's dead queue.
async fn dead_letters(client: &Client, topology: &Topology) -> anyhow::Result<u64> {
    let mut dead = 0;
    for stage in Stage::ALL {
        dead += client.queue_state(&topology.dead_queue(stage)).await?.map(|q| u64::from(q.messages)).unwrap_or(0);
    }
    Ok(dead)
}

fn progress_line(p: &Progress, dead: u64, secs: f64, churn_on: bool) -> String {
    format!(
        "[{:>5.0}s] confirmed in source {:>7} | written {:>7} ({:>5.1}%) | dead-lettered {} | {:.0} orders/s{}",
        secs,
        p.confirmed,
        p.written_confirmed,
        100.0 * p.written_confirmed as f64 / p.confirmed.max(1) as f64,
        dead,
        p.written_confirmed as f64 / secs.max(0.001),
        if churn_on { " | churning" } else { "" }
    )
}

/// The summary: one JSON object on stdout with `--json`, and the verdict for a person on stderr.
fn summarize(args: &DemoArgs, ns: &str, w: &Watched, duplicates: u64, seconds: f64, log_dir: &std::path::Path) {
    let p = w.progress.unwrap_or(Progress { confirmed: 0, written_confirmed: 0, target_records: 0 });
    let rate = p.written_confirmed as f64 / seconds.max(0.001);
    if args.json {
        let summary = json!({
            "namespace": ns,
            "synced": w.synced,
            "interrupted": w.interrupted,
            "confirmed": p.confirmed,
            "written": p.written_confirmed,
            "target_records": p.target_records,
            "dead_lettered": w.dead,
            "duplicates_suppressed": duplicates,
            "seconds": (seconds * 10.0).round() / 10.0,
            "orders_per_sec": rate.round(),
        });
        println!("{summary}");
    }
    let verdict = if w.synced {
        "synced: every order Confirmed in the source was written"
    } else if w.interrupted {
        "interrupted"
    } else {
        "NOT synced before the timeout"
    };
    eprintln!(
        "\n{verdict}\n  orders confirmed in source  {}\n  written to target           {}\n  dead-lettered               {}\n  duplicates suppressed       {}\n  duration                    {:.1} s\n  throughput                  {:.0} orders/s\n  logs                        {}",
        p.confirmed,
        p.written_confirmed,
        w.dead,
        duplicates,
        seconds,
        rate,
        log_dir.display()
    );
}
