use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orderflow_cli::{bench, demo, topology_cmd};
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
        #[arg(long, env = "RETRY_TIERS", default_value = "1s,10s,1m,10m")]
        retry_tiers: String,
    },
    /// Run the whole pipeline locally (simulators + every stage) against AMQP_URL until synced.
    Demo(demo::DemoArgs),
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

async fn topology(broker: &BrokerArgs, declare: bool, json: bool, tiers: &str) -> anyhow::Result<ExitCode> {
    let tiers = tiers
        .split(',')
        .map(|t| orderflow_shared::settings::parse_duration(t.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("RETRY_TIERS: {e}"))?;
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(tiers);
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
    let client = reqwest::Client::builder().timeout(std::time::Duration::from_secs(3)).build()?;
    let status = client.get(url).send().await?.status();
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
