use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::init_process();
    let config = jst_sim::Config::parse();
    orderflow_shared::telemetry::init(orderflow_shared::settings::LogFormat::Auto);
    let shutdown = orderflow_shared::shutdown::on_signal();
    match jst_sim::run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("jst-sim: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
