use clap::Parser;
use orderflow_shared::amqp::Fatal;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::init_process();
    let config = fetcher::config::Config::parse();
    config.broker.exit_on_secret_flags("fetcher");
    let telemetry = orderflow_shared::telemetry::init_service(config.log.log_format, "orderflow-fetcher");
    let shutdown = orderflow_shared::shutdown::on_signal();
    let result = fetcher::run(config, shutdown).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let code = if error.is::<Fatal>() { 2 } else { 1 };
            tracing::error!(message = "Fetcher stopped.", error = %format!("{error:#}"));
            eprintln!("fetcher: {error:#}");
            std::process::ExitCode::from(code)
        }
    }
}
