use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orderflow_cli::{bench, broker::parse_tiers, demo, dlq, faults, status, topology_cmd};
use orderflow_shared::{
    amqp::Topology,
    settings::{BrokerArgs, LogArgs},
};

/// Operator CLI for orderflow: the broker topology, dead letters, status, and a local demo.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the broker topology (exchanges, queues, bindings); --declare creates it.
    Topology {
        /// Declare everything on the broker (idempotent).
        #[arg(long)]
        declare: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The writer's retry tiers (as the writer's RETRY_TIERS).
        #[arg(long, env = "RETRY_TIERS", default_value = orderflow_shared::amqp::topology::DEFAULT_RETRY_TIERS)]
        retry_tiers: String,
    },
    /// Dead letters: stats, peek, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Queue depths, consumers and rates, and every account's cursor and lag; exits 1 when stuck.
    Status {
        #[arg(long)]
        json: bool,
        /// An account further behind than this (or silent this long) is a problem.
        #[arg(long, default_value = "10m", value_parser = orderflow_shared::settings::parse_duration)]
        max_lag: std::time::Duration,
        /// How long to watch the queues to compute rates.
        #[arg(long, default_value = "1s", value_parser = orderflow_shared::settings::parse_duration)]
        sample: std::time::Duration,
        /// The writer's retry tiers (as the writer's RETRY_TIERS).
        #[arg(long, env = "RETRY_TIERS", default_value = orderflow_shared::amqp::topology::DEFAULT_RETRY_TIERS)]
        retry_tiers: String,
    },
    /// Run the whole pipeline locally (simulators + every stage) against AMQP_URL until synced.
    Demo(demo::DemoArgs),
    /// Inject the faults real integrations see and check that no order is lost (README table).
    FaultSuite(faults::FaultArgs),
    /// Measure speed on this machine (see the README's benchmark table).
    Bench(bench::BenchArgs),
    /// Exit 0 when an HTTP URL answers 2xx (container healthchecks; no curl in the image).
    #[command(hide = true)]
    Probe { url: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    orderflow_shared::init_process();
    let cli = Cli::parse();
    orderflow_shared::telemetry::init(cli.log.log_format);
    let result = match cli.command {
        Command::Topology { declare, json, retry_tiers } => topology(&cli.broker, declare, json, &retry_tiers).await,
        Command::Probe { url } => probe(&url).await,
        Command::Dlq(command) => run_dlq(&cli.broker, command).await,
        Command::Status { json, max_lag, sample, retry_tiers } => {
            run_status(&cli.broker, json, max_lag, sample, &retry_tiers).await
        }
        Command::FaultSuite(args) => faults::run(args, &cli.broker.amqp_url)
            .await
            .map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) }),
        Command::Bench(args) => {
            bench::run(args, cli.broker.clone()).await.map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Demo(args) => {
            demo::run(args, cli.broker.clone()).await.map(|ok| if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("orderflow: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn connect(broker: &BrokerArgs, name: &str) -> anyhow::Result<lapin::Connection> {
    orderflow_shared::amqp::connect(broker, name).await.map_err(anyhow::Error::from)
}

async fn run_status(
    broker: &BrokerArgs,
    json: bool,
    max_lag: std::time::Duration,
    sample: std::time::Duration,
    tiers: &str,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(parse_tiers(tiers)?);
    let connection = connect(broker, "orderflow-status").await?;
    let report = status::report(&connection, &topology, max_lag, sample).await?;
    let _ = connection.close(200, "bye".into()).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render(&report));
    }
    Ok(if report.healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run_dlq(broker: &BrokerArgs, command: dlq::DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone());
    let connection = connect(broker, "orderflow-dlq").await?;
    let code = match command {
        dlq::DlqCommand::Stats { json } => {
            let stats = dlq::stats(&connection, &topology).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                for s in &stats {
                    println!("{:<12} {:>7} dead letters in {}", s.stage, s.count, s.queue);
                    if let Some(age) = s.oldest_age_seconds {
                        println!("             oldest {age} s ago");
                    }
                    let mut reasons: Vec<_> = s.reasons.iter().collect();
                    reasons.sort_by(|a, b| b.1.cmp(a.1));
                    for (reason, n) in reasons.iter().take(5) {
                        println!("             {n:>7} {reason}");
                    }
                    for (class, n) in &s.classes {
                        println!("             {n:>7} class {class}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        dlq::DlqCommand::Peek { stage, limit, json } => {
            let messages = dlq::peek(&connection, &topology, stage, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&messages)?);
            } else if messages.is_empty() {
                println!("no dead letters in {}", topology.dead_queue(stage));
            } else {
                for m in &messages {
                    println!(
                        "{}  reason={} class={} attempts={} replays={} age={}s\n  error: {}\n  origin: {} / {}\n  body: {}\n",
                        m["message_id"].as_str().unwrap_or(""),
                        m["reason"].as_str().unwrap_or(""),
                        m["class"].as_str().unwrap_or(""),
                        m["attempts"],
                        m["replays"],
                        m["age_seconds"],
                        m["error"].as_str().unwrap_or(""),
                        m["origin"]["exchange"].as_str().unwrap_or("-"),
                        m["origin"]["routing_key"].as_str().unwrap_or("-"),
                        m["body_excerpt"].as_str().unwrap_or("")
                    );
                }
            }
            ExitCode::SUCCESS
        }
        dlq::DlqCommand::Replay(args) => {
            let since_ms = args.since.as_deref().map(dlq::parse_since).transpose().map_err(anyhow::Error::msg)?;
            if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
                anyhow::bail!("--rate must be a positive number of messages per second");
            }
            let options = dlq::ReplayOptions {
                stage: args.stage,
                filter: dlq::Filter { reason: args.reason.clone(), ids: args.ids.clone(), since_ms, before_ms: None },
                limit: args.limit,
                rate: args.rate,
                dry_run: args.dry_run,
                force: args.force,
                max_replays: args.max_replays,
                progress: !args.json,
            };
            let summary = dlq::replay(&connection, &topology, &options).await?;
            if args.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                println!(
                    "{}scanned {} · matched {} · replayed {} · refused {} (replayed > {} times; --force) · failed {} · left in queue {} · {:.1} s",
                    if summary.dry_run { "DRY RUN (nothing changed): " } else { "" },
                    summary.scanned,
                    summary.matched,
                    summary.replayed,
                    summary.refused,
                    args.max_replays,
                    summary.failed,
                    summary.left,
                    summary.seconds
                );
            }
            if summary.failed > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
        dlq::DlqCommand::Purge { stage, reason, older_than, yes, json } => {
            if !yes {
                anyhow::bail!(
                    "purge deletes dead letters for good: add --yes (see them first with `orderflow dlq peek --stage {stage}`)"
                );
            }
            let before_ms = older_than.map(|d| jiff::Timestamp::now().as_millisecond() - d.as_millis() as i64);
            let filter = dlq::Filter { reason, ids: Vec::new(), since_ms: None, before_ms };
            let deleted = dlq::purge(&connection, &topology, stage, &filter).await?;
            if json {
                println!("{}", serde_json::json!({"deleted": deleted}));
            } else {
                println!("deleted {deleted} dead letters from {}", topology.dead_queue(stage));
            }
            ExitCode::SUCCESS
        }
    };
    let _ = connection.close(200, "bye".into()).await;
    Ok(code)
}

async fn topology(broker: &BrokerArgs, declare: bool, json: bool, tiers: &str) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(parse_tiers(tiers)?);
    if json {
        println!("{}", serde_json::to_string_pretty(&topology_cmd::render_json(&topology))?);
    } else {
        print!("{}", topology_cmd::render_text(&topology));
    }
    if declare {
        let connection = orderflow_shared::amqp::connect(broker, "orderflow-cli").await?;
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        let _ = connection.close(200, "bye".into()).await;
        eprintln!("declared on the broker");
    }
    Ok(ExitCode::SUCCESS)
}

async fn probe(url: &str) -> anyhow::Result<ExitCode> {
    // A healthcheck asks its own container: HTTP(S)_PROXY/ALL_PROXY set for the service's outbound
    // calls must not send the probe to a proxy.
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).no_proxy().build()?;
    let status = client.get(url).send().await?.status();
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
