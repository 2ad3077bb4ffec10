//! The demo's broker on a fresh machine: when no RabbitMQ answers at a local `AMQP_URL`, start one
//! in Docker (testcontainers; needs an engine that can pull `rabbitmq:3.13-management`) and say so,
//! or print the one command that gets a broker.

use std::time::Duration;

use orderflow_shared::settings::{BrokerArgs, redact_url};
use testcontainers::{
    ContainerAsync, GenericImage,
    core::{IntoContainerPort, WaitFor},
    runners::AsyncRunner,
};

/// The image the demo starts (the one docker-compose.yml uses).
pub const IMAGE: (&str, &str) = ("rabbitmq", "3.13-management");

/// The command printed when neither a broker nor Docker with registry access is there.
pub const GET_A_BROKER: &str = "sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached";

/// A broker started for the demo; the container is removed when this is dropped.
pub struct DemoBroker {
    pub broker: BrokerArgs,
    _container: ContainerAsync<GenericImage>,
}

/// Whether the URL names this machine, where a demo may start a broker of its own.
pub fn is_local(amqp_url: &str) -> bool {
    orderflow_shared::amqp::connect::parse_url(amqp_url)
        .map(|uri| matches!(uri.authority.host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]"))
        .unwrap_or(false)
}

/// Starts RabbitMQ in Docker for the demo (pulling the image if needed), or says why it could not.
pub async fn start(broker: &BrokerArgs) -> Result<DemoBroker, String> {
    eprintln!(
        "orderflow demo: no RabbitMQ answers at {}; starting one in Docker ({}:{}, removed when the demo ends)...",
        redact_url(&broker.amqp_url),
        IMAGE.0,
        IMAGE.1
    );
    let start = GenericImage::new(IMAGE.0, IMAGE.1)
        .with_exposed_port(5672.tcp())
        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
        .start();
    let container = match tokio::time::timeout(Duration::from_secs(300), start).await {
        Ok(Ok(container)) => container,
        Ok(Err(error)) => return Err(format!("{error}")),
        Err(_) => return Err("Docker did not start RabbitMQ within 5 minutes".into()),
    };
    let port = container.get_host_port_ipv4(5672).await.map_err(|e| format!("RabbitMQ container port: {e}"))?;
    let mut broker = broker.clone();
    broker.amqp_url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    broker.amqp_password = None;
    eprintln!("orderflow demo: RabbitMQ is running in Docker at 127.0.0.1:{port}");
    Ok(DemoBroker { broker, _container: container })
}

/// What the demo prints when it has no broker: why, and the one command that gets one.
pub fn no_broker_message(broker: &BrokerArgs, why: &str) -> String {
    format!(
        "no RabbitMQ answers at {} and none could be started in Docker ({why}).\nGet one with:\n\n    {GET_A_BROKER}\n\nor set AMQP_URL to a broker you have.",
        redact_url(&broker.amqp_url)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broker_on_this_machine_is_replaced() {
        assert!(is_local("amqp://guest:guest@127.0.0.1:5672/%2f"));
        assert!(is_local("amqp://localhost"));
        assert!(!is_local("amqp://u:p@rabbit.prod.example:5672/%2f"));
    }
}
