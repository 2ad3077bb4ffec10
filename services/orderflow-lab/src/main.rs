use std::process::ExitCode;

use clap::{Parser, Subcommand};
use orderflow_lab::{bench, demo, faults};
use orderflow_shared::settings::{BrokerArgs, LogArgs};

/// The orderflow lab: the whole pipeline on this machine, the fault suite and the benchmarks
/// (`orderflow demo|fault-suite|bench` run these). Not part of the production image.
#[derive(Debug, Parser)]
#[command(name = "orderflow-lab", version, about, long_about = None)]
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
    /// Run the whole pipeline locally (simulators + every stage) against AMQP_URL until synced.
    Demo(demo::DemoArgs),
    /// Inject the faults real integrations see and check that no order is lost (README table).
    FaultSuite(faults::FaultArgs),
    /// Measure speed on this machine (see the README's benchmark table).
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    orderflow_shared::init_process();
    let cli = Cli::parse();
    orderflow_shared::telemetry::init(cli.log.log_format);
    let result = match cli.command {
        Command::Demo(args) => demo::run(args, cli.broker).await,
        Command::FaultSuite(args) => faults::run(args, &cli.broker.amqp_url).await,
        Command::Bench(args) => bench::run(args, cli.broker).await,
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("orderflow-lab: {error:#}");
            ExitCode::from(2)
        }
    }
}
