//! Broker resource alarms and the broker's ack timeout, set on purpose for the fault suite's
//! "broker alarms" scenario and the tests: a memory alarm (`set_vm_memory_high_watermark` below
//! what the node uses), a disk alarm (`set_disk_free_limit` above the free space) and a short
//! `consumer_timeout`. Each is a guard that puts the broker's own setting back when dropped, so a
//! failing test or an interrupted run never leaves the broker blocking everyone.

use std::time::{Duration, Instant};

use crate::rabbitmqctl::rabbitmqctl;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Disk,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::Disk => "disk",
        }
    }
}

/// A raised alarm; dropping it (or [`Alarm::clear`]) restores the broker's threshold.
pub struct Alarm {
    ctl: String,
    resource: Resource,
    restore: Restore,
}

/// Broker settings a guard here changed and has not put back yet (`rabbitmqctl` command and
/// arguments that put each back), so a process that must end at once, skipping every `Drop` (the
/// test watchdog's abort), can still leave the broker as it found it.
static PENDING: std::sync::Mutex<Vec<(u64, String, Vec<String>)>> = std::sync::Mutex::new(Vec::new());

/// A guard's entry in [`PENDING`]: the one place that knows how to put its setting back.
struct Restore(u64);

impl Restore {
    fn remember(ctl: &str, args: Vec<String>) -> Restore {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PENDING.lock().unwrap_or_else(|e| e.into_inner()).push((id, ctl.to_string(), args));
        Restore(id)
    }

    /// Puts the setting back (once: a success removes the entry; a failure keeps it for a later
    /// try). Nothing to do when it is back already.
    fn put_back(&self) -> anyhow::Result<()> {
        let entry = PENDING.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(id, _, _)| *id == self.0).cloned();
        if let Some((_, ctl, args)) = entry {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rabbitmqctl(&ctl, &args)?;
            PENDING.lock().unwrap_or_else(|e| e.into_inner()).retain(|(id, _, _)| *id != self.0);
        }
        Ok(())
    }
}

/// Puts back every broker setting a guard still holds (newest first); returns what failed.
pub fn restore_pending() -> Vec<String> {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    let mut failures = Vec::new();
    for (_, ctl, args) in pending.iter().rev() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(error) = rabbitmqctl(ctl, &args) {
            failures.push(format!("{error:#}"));
        }
    }
    failures
}

/// The `rabbitmqctl` arguments that put a threshold back as `eval` printed it: `0.4` or
/// `{absolute,1073741824}` for memory, a byte count for disk.
fn restore_args(resource: Resource, printed: &str) -> anyhow::Result<Vec<String>> {
    let printed = printed.trim();
    let args = match resource {
        Resource::Memory => match printed.strip_prefix("{absolute,").and_then(|r| r.strip_suffix('}')) {
            // A byte count, or a string with a unit (`"2GB"`) as the broker's config may give it.
            Some(limit) => {
                vec![
                    "set_vm_memory_high_watermark".into(),
                    "absolute".into(),
                    limit.trim().trim_matches('"').to_string(),
                ]
            }
            None => {
                let relative: f64 =
                    printed.parse().map_err(|_| anyhow::anyhow!("unexpected memory watermark {printed:?}"))?;
                vec!["set_vm_memory_high_watermark".into(), relative.to_string()]
            }
        },
        Resource::Disk => {
            let bytes: u64 = printed.parse().map_err(|_| anyhow::anyhow!("unexpected disk free limit {printed:?}"))?;
            vec!["set_disk_free_limit".into(), bytes.to_string()]
        }
    };
    Ok(args)
}

/// True while the broker reports an alarm for `resource`.
pub fn alarm_active(ctl: &str, resource: Resource) -> anyhow::Result<bool> {
    Ok(alarms(ctl)?.contains(&format!("resource_limit,{}", resource.as_str())))
}

/// The broker's alarms as `rabbit_alarm:get_alarms()` prints them.
fn alarms(ctl: &str) -> anyhow::Result<String> {
    rabbitmqctl(ctl, &["eval", "rabbit_alarm:get_alarms()."])
}

/// The broker's alarms as it prints them (`[]` when none), or why they could not be read: for
/// the message of a run that stalled.
pub fn describe_alarms(ctl: &str) -> String {
    match alarms(ctl) {
        Ok(alarms) => alarms.trim().to_string(),
        Err(error) => format!("unknown ({error:#})"),
    }
}

async fn wait_alarm(ctl: &str, resource: Resource, active: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while alarm_active(ctl, resource)? != active {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the broker's {} alarm did not {} within 30 s",
            resource.as_str(),
            if active { "go on" } else { "clear" }
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

impl Alarm {
    /// Raises the alarm and returns once the broker reports it.
    pub async fn raise(ctl: &str, resource: Resource) -> anyhow::Result<Alarm> {
        let current = match resource {
            Resource::Memory => rabbitmqctl(ctl, &["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])?,
            Resource::Disk => rabbitmqctl(ctl, &["eval", "rabbit_disk_monitor:get_disk_free_limit()."])?,
        };
        let restore = Restore::remember(ctl, restore_args(resource, &current)?);
        let alarm = Alarm { ctl: ctl.to_string(), resource, restore };
        match resource {
            Resource::Memory => rabbitmqctl(ctl, &["set_vm_memory_high_watermark", "absolute", "1MB"])?,
            Resource::Disk => rabbitmqctl(ctl, &["set_disk_free_limit", "100000GB"])?,
        };
        wait_alarm(ctl, resource, true).await?;
        Ok(alarm)
    }

    /// Restores the threshold and returns once the broker reports the alarm gone.
    pub async fn clear(self) -> anyhow::Result<()> {
        self.restore.put_back()?;
        wait_alarm(&self.ctl, self.resource, false).await
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Err(error) = self.restore.put_back() {
            eprintln!("could not clear the broker's {} alarm: {error:#}", self.resource.as_str());
        }
    }
}

/// The broker's `consumer_timeout` (how long a delivery may stay unacked before the broker
/// closes its channel) set for channels opened from now on, and how often channels check it
/// (`channel_tick_interval`, a minute by default: a fifth of the timeout here, at least 1 s, so a
/// test sees the broker act within seconds); dropping it restores both settings.
pub struct ConsumerTimeout {
    restore: Restore,
}

impl ConsumerTimeout {
    pub fn set(ctl: &str, timeout: Duration) -> anyhow::Result<ConsumerTimeout> {
        let tick = (timeout / 5).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut restore = Vec::new();
        for key in ["consumer_timeout", "channel_tick_interval"] {
            let current = rabbitmqctl(ctl, &["eval", &format!("application:get_env(rabbit, {key}).")])?;
            let current = current.trim();
            restore.push(match current.strip_prefix("{ok,").and_then(|r| r.strip_suffix('}')) {
                Some(value) => format!("application:set_env(rabbit, {key}, {})", value.trim()),
                None => format!("application:unset_env(rabbit, {key})"),
            });
        }
        let restore = format!("{}.", restore.join(", "));
        let set = format!(
            "application:set_env(rabbit, consumer_timeout, {}), application:set_env(rabbit, channel_tick_interval, {}).",
            timeout.as_millis(),
            tick.as_millis()
        );
        let restore = Restore::remember(ctl, vec!["eval".into(), restore]);
        rabbitmqctl(ctl, &["eval", &set])?;
        Ok(ConsumerTimeout { restore })
    }
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        if let Err(error) = self.restore.put_back() {
            eprintln!("could not restore the broker's consumer_timeout: {error:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_put_back_as_the_broker_printed_them() {
        assert_eq!(restore_args(Resource::Memory, "0.4\n").expect("parses"), ["set_vm_memory_high_watermark", "0.4"]);
        assert_eq!(
            restore_args(Resource::Memory, "{absolute,1073741824}\n").expect("parses"),
            ["set_vm_memory_high_watermark", "absolute", "1073741824"]
        );
        assert_eq!(
            restore_args(Resource::Memory, "{absolute,\"2GB\"}").expect("parses"),
            ["set_vm_memory_high_watermark", "absolute", "2GB"]
        );
        assert_eq!(restore_args(Resource::Disk, "50000000\n").expect("parses"), ["set_disk_free_limit", "50000000"]);
        assert!(restore_args(Resource::Disk, "{badrpc,nodedown}").is_err());
    }
}
