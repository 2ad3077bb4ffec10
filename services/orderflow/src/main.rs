use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use orderflow_cli::{audit, dlq, dlq_cmd, lab, status, topology_cmd, trace};
use orderflow_shared::{
    amqp::{
        Topology,
        ops::{Client, parse_retry_tiers},
    },
    settings::{BrokerArgs, LedgerArgs, LogArgs},
};

/// Operator CLI for orderflow: the broker topology, dead letters, status; and the lab commands
/// (a local demo, the fault suite, benchmarks), which run orderflow-lab.
#[derive(Debug, Parser)]
#[command(name = "orderflow", version, about, long_about = None)]
#[command(
    after_help = "Lab commands (demo, fault-suite, bench) run orderflow-lab with the same arguments: it is built \
    beside orderflow by `cargo build`, and the production image leaves it out. `orderflow demo --help` shows its options. \
    Secrets come from the environment only, never from flags (a flag shows in the process list): AMQP_PASSWORD, or a \
    password inside AMQP_URL."
)]
struct Cli {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    ledger: LedgerArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Operate(Operation),
    #[command(flatten)]
    Lab(LabCommand),
}

/// The operator commands.
#[derive(Debug, Subcommand)]
enum Operation {
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
    /// One order's timeline from the ledger: fetched, transformed, each write and the target's
    /// answer, retries, dead letters, replays, written. Exits 1 when the ledger has no trace of it.
    Trace {
        /// The order's o_id, so_id or io_id.
        id: String,
        /// Only this account's order (an so_id can name orders of several merchants).
        #[arg(long)]
        account: Option<String>,
        /// How far back to read the ledger (e.g. 2h, 3d).
        #[arg(long, default_value = "24h", value_parser = orderflow_shared::settings::parse_duration)]
        since: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Did every order arrive? Asks the fetcher holding the account which orders the source has
    /// Confirmed in the window (within FETCH_AUDIT_BUDGET of its rate budget) and classifies each
    /// from the ledger: written, dead-lettered, dropped, in flight, or missing. Exits 0 when
    /// complete, 1 when something is missing or still in flight.
    Audit {
        /// The account (merchant) to audit.
        #[arg(long)]
        account: String,
        /// Window start (orders by `modified`): RFC 3339, China time `2026-12-06 00:00:00`, or a
        /// duration back from now (`24h`).
        #[arg(long, value_parser = audit::parse_time)]
        from: jiff::Timestamp,
        /// Window end (same forms, or `now`).
        #[arg(long, default_value = "now", value_parser = audit::parse_time)]
        to: jiff::Timestamp,
        /// Fetch the missing orders again by id and push them through the pipeline.
        #[arg(long)]
        repair: bool,
        /// An order without an outcome counts as in flight while its last event is younger
        /// than this (or the queues hold messages); past it, with the queues empty, missing.
        #[arg(long, default_value = "10m", value_parser = orderflow_shared::settings::parse_duration)]
        in_flight_grace: std::time::Duration,
        /// How long to wait for the fetcher holding the account to take the request (it does
        /// between passes).
        #[arg(long, default_value = "3m", value_parser = orderflow_shared::settings::parse_duration)]
        wait: std::time::Duration,
        /// The writer's retry tiers (as the writer's RETRY_TIERS): their queues count as in flight.
        #[arg(long, env = "RETRY_TIERS", default_value = orderflow_shared::amqp::topology::DEFAULT_RETRY_TIERS)]
        retry_tiers: String,
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when an HTTP URL answers 2xx (container healthchecks; no curl in the image).
    #[command(hide = true)]
    Probe { url: String },
}

/// The lab commands: each runs orderflow-lab with the same arguments.
#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Lab: run the whole pipeline locally (simulators + every stage) against AMQP_URL until synced.
    #[command(disable_help_flag = true)]
    Demo(LabArgs),
    /// Lab: inject the faults real integrations see and check that no order is lost (README table).
    #[command(disable_help_flag = true)]
    FaultSuite(LabArgs),
    /// Lab: measure speed on this machine (see the README's benchmark table).
    #[command(disable_help_flag = true)]
    Bench(LabArgs),
}

impl LabCommand {
    fn name(&self) -> &'static str {
        match self {
            LabCommand::Demo(_) => "demo",
            LabCommand::FaultSuite(_) => "fault-suite",
            LabCommand::Bench(_) => "bench",
        }
    }
}

/// A lab command's arguments, passed to orderflow-lab as they are (`--help` included).
#[derive(Debug, Args)]
struct LabArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<std::ffi::OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Lab(command) => lab::run(command.name()),
        Command::Operate(operation) => {
            cli.broker.exit_on_secret_flags("orderflow");
            operate(cli.broker, cli.log, cli.ledger, operation)
        }
    }
}

#[tokio::main]
async fn operate(broker: BrokerArgs, log: LogArgs, ledger: LedgerArgs, operation: Operation) -> ExitCode {
    orderflow_shared::init_process();
    orderflow_shared::telemetry::init(log.log_format);
    let result = match operation {
        Operation::Topology { declare, json, retry_tiers } => {
            topology(&broker, &ledger, declare, json, &retry_tiers).await
        }
        Operation::Probe { url } => probe(&url).await,
        Operation::Dlq(command) => run_dlq(&broker, &ledger, command).await,
        Operation::Trace { id, account, since, json } => run_trace(&broker, &id, account.as_deref(), since, json).await,
        Operation::Audit { account, from, to, repair, in_flight_grace, wait, retry_tiers, json } => {
            let options = audit::AuditOptions {
                account,
                from,
                to,
                grace: in_flight_grace,
                repair,
                patience: audit::Patience { start: wait, ..audit::Patience::default() },
                progress: !json,
            };
            run_audit(&broker, &options, &retry_tiers, json).await
        }
        Operation::Status { json, max_lag, sample, retry_tiers } => {
            run_status(&broker, json, max_lag, sample, &retry_tiers).await
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

async fn run_status(
    broker: &BrokerArgs,
    json: bool,
    max_lag: std::time::Duration,
    sample: std::time::Duration,
    tiers: &str,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(parse_retry_tiers(tiers)?);
    let client = Client::connect(broker, "orderflow-status").await?;
    let report = status::report(&client, &topology, max_lag, sample).await;
    client.close().await;
    let report = report?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render(&report));
    }
    Ok(if report.healthy { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run_trace(
    broker: &BrokerArgs,
    id: &str,
    account: Option<&str>,
    since: std::time::Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone());
    let client = Client::connect(broker, "orderflow-trace").await?;
    let found = trace::trace(&client, &topology, id, account, since).await;
    client.close().await;
    let found = found?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!("{}", trace::render(&found));
    }
    Ok(if found.orders.is_empty() { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

async fn run_audit(
    broker: &BrokerArgs,
    options: &audit::AuditOptions,
    tiers: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(parse_retry_tiers(tiers)?);
    let client = Client::connect(broker, "orderflow-audit").await?;
    let outcome = audit::audit(&client, &topology, options).await;
    client.close().await;
    let outcome = outcome?;
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", audit::render(&outcome));
    }
    Ok(if outcome.report.complete { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run_dlq(broker: &BrokerArgs, ledger: &LedgerArgs, command: dlq::DlqCommand) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_ledger(ledger);
    let client = Client::connect(broker, "orderflow-dlq").await?;
    let code = dlq_cmd::run(&client, &topology, command).await;
    client.close().await;
    code
}

async fn topology(
    broker: &BrokerArgs,
    ledger: &LedgerArgs,
    declare: bool,
    json: bool,
    tiers: &str,
) -> anyhow::Result<ExitCode> {
    let topology = Topology::new(broker.ns.clone()).with_retry_tiers(parse_retry_tiers(tiers)?).with_ledger(ledger);
    if json {
        println!("{}", serde_json::to_string_pretty(&topology_cmd::render_json(&topology))?);
    } else {
        print!("{}", topology_cmd::render_text(&topology));
    }
    if declare {
        let client = Client::connect(broker, "orderflow-cli").await?;
        let declared = client.declare(&topology).await;
        client.close().await;
        declared?;
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
