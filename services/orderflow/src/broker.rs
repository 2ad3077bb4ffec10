//! Broker helpers for the CLI: queue depth and consumers by passive declare, and removing a
//! namespace (the demo and tests clean up after themselves).

use lapin::{
    Channel, Connection,
    options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};
use orderflow_shared::amqp::{Topology, is_not_found};

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueState {
    pub name: String,
    pub messages: u32,
    pub consumers: u32,
}

/// Depth and consumers of a queue; `None` when it does not exist.
pub async fn queue_state(connection: &Connection, name: &str) -> anyhow::Result<Option<QueueState>> {
    let channel = connection.create_channel().await?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let result = channel.queue_declare(name.into(), options, FieldTable::default()).await;
    let state = match result {
        Ok(q) => {
            Some(QueueState { name: name.to_string(), messages: q.message_count(), consumers: q.consumer_count() })
        }
        Err(error) if is_not_found(&error) => None,
        Err(error) => return Err(error.into()),
    };
    if channel.status().connected() {
        let _ = channel.close(200, "ok".into()).await;
    }
    Ok(state)
}

async fn fresh(connection: &Connection, channel: Channel) -> anyhow::Result<Channel> {
    if channel.status().connected() { Ok(channel) } else { Ok(connection.create_channel().await?) }
}

/// Parses a `RETRY_TIERS` value (`1s,10s,1m`).
pub fn parse_tiers(tiers: &str) -> anyhow::Result<Vec<std::time::Duration>> {
    tiers
        .split(',')
        .map(|t| orderflow_shared::settings::parse_duration(t.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("RETRY_TIERS: {e}"))
}

/// Deletes every queue and exchange of a namespace (work, dead, retry, fetch queues of `accounts`).
pub async fn delete_namespace(connection: &Connection, topology: &Topology, accounts: &[String]) -> anyhow::Result<()> {
    let mut queues = topology.queue_names();
    queues.push(format!("{}.fetch.replicas", topology.ns));
    for account in accounts {
        queues.push(topology.fetch_queue(account));
    }
    let mut channel = connection.create_channel().await?;
    for queue in queues {
        channel = fresh(connection, channel).await?;
        let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for exchange in topology.exchanges() {
        channel = fresh(connection, channel).await?;
        let _ = channel.exchange_delete(exchange.name.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    if channel.status().connected() {
        let _ = channel.close(200, "ok".into()).await;
    }
    Ok(())
}

/// The command that runs `rabbitmqctl` for broker faults: `ORDERFLOW_RABBITMQCTL` (e.g. `docker
/// exec rabbit rabbitmqctl` for a broker in a container), else `rabbitmqctl`.
pub fn rabbitmqctl_command() -> String {
    std::env::var("ORDERFLOW_RABBITMQCTL").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "rabbitmqctl".into())
}

/// Runs `command args…` (`command` as from [`rabbitmqctl_command`]): closing connections,
/// stopping and starting the broker.
pub fn rabbitmqctl(command: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or("rabbitmqctl");
    let output = std::process::Command::new(program).args(words).args(args).output().map_err(|e| {
        anyhow::anyhow!("{program} {args:?}: {e} (set ORDERFLOW_RABBITMQCTL for a broker in a container)")
    })?;
    anyhow::ensure!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
