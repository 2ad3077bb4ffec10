//! `rabbitmqctl` for broker faults: closing connections, stopping and starting the broker,
//! resource alarms and the ack timeout.

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
