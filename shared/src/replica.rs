//! This replica's name, the same in every place an operator sees it: broker connection names, the
//! fetcher's account status, `orderflow_replica_info` on `/metrics` and trace resources.

use std::sync::OnceLock;

/// The container's hostname where this process is PID 1 (in containers every replica is PID 1, so
/// a PID names none of them), else `<hostname>-<pid>` (several replicas on one machine).
pub fn name() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        let host = std::env::var("HOSTNAME").ok();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
        compose(host.as_deref(), kernel.as_deref(), std::process::id())
    })
}

fn compose(env_hostname: Option<&str>, kernel_hostname: Option<&str>, pid: u32) -> String {
    let host = [env_hostname, kernel_hostname]
        .into_iter()
        .flatten()
        .map(str::trim)
        .find(|h| !h.is_empty())
        .unwrap_or("localhost");
    if pid == 1 { host.to_string() } else { format!("{host}-{pid}") }
}

#[cfg(test)]
mod tests {
    use super::compose;

    #[test]
    fn a_container_replica_is_named_by_its_hostname_not_by_pid_1() {
        assert_eq!(compose(Some("3f2a9c1b7d4e"), Some("3f2a9c1b7d4e\n"), 1), "3f2a9c1b7d4e");
    }

    #[test]
    fn processes_on_one_machine_add_their_pid() {
        assert_eq!(compose(None, Some("build-host\n"), 4242), "build-host-4242");
        assert_eq!(compose(Some(" "), None, 7), "localhost-7");
    }
}
