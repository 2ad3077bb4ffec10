use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::init_process();
    let config = target_sim::Config::parse();
    orderflow_shared::telemetry::init(orderflow_shared::settings::LogFormat::Auto);
    let shutdown = orderflow_shared::shutdown::on_signal();
    match target_sim::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("target-sim: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
