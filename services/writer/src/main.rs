use clap::Parser;
use orderflow_shared::amqp::Fatal;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::init_process();
    let config = writer::Config::parse();
    config.broker.exit_on_secret_flags("writer");
    let telemetry = orderflow_shared::telemetry::init_service(config.log.log_format, "orderflow-writer");
    let shutdown = orderflow_shared::shutdown::on_signal();
    let result = writer::run(config, shutdown).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let code = if error.is::<Fatal>() { 2 } else { 1 };
            tracing::error!(message = "Writer stopped.", error = %format!("{error:#}"));
            eprintln!("writer: {error:#}");
            std::process::ExitCode::from(code)
        }
    }
}
