use clap::Parser;
use orderflow_shared::amqp::Fatal;
use transformer::{Command, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderflow_shared::init_process();
    let config = Config::parse();
    config.broker.exit_on_secret_flags("transformer");
    if let Some(Command::CheckMapping { file, input }) = &config.command {
        return match transformer::check::check_mapping(file, input.as_deref()) {
            Ok((report, all_mapped)) => {
                println!("{report}");
                if all_mapped { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) }
            }
            Err(error) => {
                eprintln!("transformer check-mapping: {error}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let telemetry = orderflow_shared::telemetry::init_service(config.log.log_format, "orderflow-transformer");
    let shutdown = orderflow_shared::shutdown::on_signal();
    let result = transformer::run(config, shutdown).await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let code = if error.is::<Fatal>() { 2 } else { 1 };
            tracing::error!(message = "Transformer stopped.", error = %format!("{error:#}"));
            eprintln!("transformer: {error:#}");
            std::process::ExitCode::from(code)
        }
    }
}
