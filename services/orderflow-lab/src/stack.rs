//! Running the whole pipeline as local processes: jst-sim, target-sim, and K replicas of each
//! stage against a broker, with logs in files. Used by `orderflow demo` and by the tests, which
//! also kill and restart single replicas.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use orderflow_shared::amqp::{
    Topology,
    ops::{Client, parse_retry_tiers},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{Child, Command},
};

/// Deletes everything a stack's processes declared on the broker: the stages' topology with
/// the accounts' fetch queues, and the default retry tiers (which a harness's own connections
/// declare) when the stages used others.
pub async fn delete_stack_namespace(client: &Client, options: &StackOptions) -> anyhow::Result<()> {
    let stage = options.stage_topology();
    client.delete_namespace(&stage, &options.account_names()).await?;
    let default = Topology::new(options.ns.clone());
    if default.retry_tiers != stage.retry_tiers {
        client.delete_namespace(&default, &[]).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    JstSim,
    TargetSim,
    Fetcher,
    Transformer,
    Writer,
}

impl Role {
    pub fn binary(self) -> &'static str {
        match self {
            Role::JstSim => "jst-sim",
            Role::TargetSim => "target-sim",
            Role::Fetcher => "fetcher",
            Role::Transformer => "transformer",
            Role::Writer => "writer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Where the binaries are (default: next to the running executable).
    pub bin_dir: PathBuf,
    pub amqp_url: String,
    pub ns: String,
    /// Merchants in jst-sim (each becomes a fetch account).
    pub accounts: u32,
    /// Orders seeded per merchant.
    pub orders: u64,
    pub fetchers: u32,
    pub transformers: u32,
    pub writers: u32,
    /// Per-merchant limits of jst-sim, and the fetchers' budget.
    pub rate_per_sec: u32,
    pub rate_per_min: u32,
    /// The fetchers' budget (per second, per minute) when not the source's limits (e.g. when the
    /// source's limits are lifted with 0).
    pub fetch_budget: Option<(u32, u32)>,
    pub jst_args: Vec<String>,
    pub target_args: Vec<String>,
    /// Environment for every stage replica (FETCH_INTERVAL, RETRY_TIERS, …).
    pub env: Vec<(String, String)>,
    /// Per-account request config (a file path) for every account, if not the default.
    pub request_config: Option<PathBuf>,
    /// Use jst-sim's legacy API generation for every account.
    pub legacy: bool,
    pub log_dir: PathBuf,
}

impl StackOptions {
    /// The source accounts jst-sim creates for this stack: `m1` … `mN`.
    pub fn account_names(&self) -> Vec<String> {
        (1..=self.accounts.max(1)).map(|i| format!("m{i}")).collect()
    }

    /// The topology the stages declare: the retry tiers `env` gives them in `RETRY_TIERS`, else
    /// the default ones.
    pub fn stage_topology(&self) -> Topology {
        let topology = Topology::new(self.ns.clone());
        match self.env.iter().find(|(k, _)| k == "RETRY_TIERS").and_then(|(_, v)| parse_retry_tiers(v).ok()) {
            Some(tiers) => topology.with_retry_tiers(tiers),
            None => topology,
        }
    }

    pub fn new(amqp_url: &str, ns: &str, log_dir: &Path) -> Self {
        Self {
            bin_dir: default_bin_dir(),
            amqp_url: amqp_url.to_string(),
            ns: ns.to_string(),
            accounts: 1,
            orders: 2000,
            fetchers: 1,
            transformers: 1,
            writers: 1,
            rate_per_sec: 50,
            rate_per_min: 3000,
            fetch_budget: None,
            jst_args: Vec::new(),
            target_args: Vec::new(),
            env: Vec::new(),
            request_config: None,
            legacy: false,
            log_dir: log_dir.to_path_buf(),
        }
    }
}

/// The directory of the running executable (the other binaries are built beside it). Test
/// executables live one level deeper (`target/debug/deps`), so that case is handled too.
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") { dir.parent().map(Path::to_path_buf).unwrap_or(dir) } else { dir }
}

pub struct Proc {
    pub role: Role,
    pub index: u32,
    pub child: Child,
    /// The admin server of a stage replica.
    pub admin: Option<SocketAddr>,
    pub log: PathBuf,
}

pub struct Stack {
    pub options: StackOptions,
    pub jst_url: String,
    pub target_url: String,
    pub accounts_file: PathBuf,
    pub procs: Vec<Proc>,
    http: reqwest::Client,
}

/// The log line every service writes once its admin server listens (shared/src/admin.rs).
const ADMIN_LISTENING: &str = "Admin server listening.";

/// Waits until a stage replica started with `ADMIN_ADDR=127.0.0.1:0` logs the address its admin
/// server bound. Letting the child pick its own port leaves no window in which another socket can
/// take a port chosen for it (a released "free" port can be taken before the child binds it).
async fn admin_addr_from_log(child: &mut Child, log: &Path) -> anyhow::Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = tokio::fs::read_to_string(log).await.unwrap_or_default();
        if let Some(addr) = text.lines().find_map(listening_addr) {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited at start ({status}); see {}", log.display());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no admin server within 60 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn listening_addr(line: &str) -> Option<SocketAddr> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["message"] != ADMIN_LISTENING {
        return None;
    }
    v["addr"].as_str()?.parse().ok()
}

/// `RUST_LOG` for stage replicas: the stack's own `RUST_LOG` setting, else `ORDERFLOW_CHILD_LOG`,
/// else `info,lapin=off`; always keeping the admin server's start line, which
/// [`admin_addr_from_log`] reads.
fn child_log_filter(env: &[(String, String)]) -> String {
    let base = env
        .iter()
        .rev()
        .find(|(k, _)| k == "RUST_LOG")
        .map(|(_, v)| v.clone())
        .or_else(|| std::env::var("ORDERFLOW_CHILD_LOG").ok())
        .unwrap_or_else(|| "info,lapin=off".into());
    format!("{base},orderflow_shared::admin=info")
}

pub async fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("log file {}", log.display()))?;
    cmd.stdout(Stdio::from(file.try_clone()?)).stderr(Stdio::from(file)).stdin(Stdio::null()).kill_on_drop(true);
    cmd.spawn().with_context(|| format!("starting {:?}", cmd.as_std().get_program()))
}

/// Starts a simulator with `--listen 127.0.0.1:0` and reads its URL from the first stdout line.
pub async fn spawn_sim(bin: &Path, args: &[String], log: &Path) -> anyhow::Result<(Child, String)> {
    let mut cmd = Command::new(bin);
    cmd.args(["--listen", "127.0.0.1:0"]).args(args).env("LOG_FORMAT", "json");
    let file = std::fs::File::create(log).with_context(|| format!("log file {}", log.display()))?;
    cmd.stdout(Stdio::piped()).stderr(Stdio::from(file)).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("simulator stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .with_context(|| format!("{} did not start within 60 s (see {})", bin.display(), log.display()))??
        .with_context(|| format!("{} exited at start (see {})", bin.display(), log.display()))?;
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("unexpected first line {first:?}"))?
        .to_string();
    let mut out = tokio::fs::OpenOptions::new().append(true).open(log).await?;
    out.write_all(format!("{first}\n").as_bytes()).await?;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = out.write_all(format!("{line}\n").as_bytes()).await;
        }
    });
    Ok((child, url))
}

/// Fails naming the first binary the stack needs that is not in `bin_dir`.
fn check_binaries(bin_dir: &Path) -> anyhow::Result<()> {
    for role in [Role::JstSim, Role::TargetSim, Role::Fetcher, Role::Transformer, Role::Writer] {
        if !bin_dir.join(role.binary()).exists() {
            bail!(
                "{} not found in {}: build the workspace first (cargo build --release)",
                role.binary(),
                bin_dir.display()
            );
        }
    }
    Ok(())
}

/// Starts jst-sim (the stack's merchants, orders and limits) and target-sim; returns them with
/// jst-sim's URL and target-sim's base URL.
async fn start_sims(options: &StackOptions) -> anyhow::Result<(Vec<Proc>, String, String)> {
    let mut jst_args = vec![
        "--accounts".to_string(),
        options.accounts.to_string(),
        "--orders".to_string(),
        options.orders.to_string(),
        "--rate-per-sec".to_string(),
        options.rate_per_sec.to_string(),
        "--rate-per-min".to_string(),
        options.rate_per_min.to_string(),
    ];
    jst_args.extend(options.jst_args.iter().cloned());
    let log = options.log_dir.join("jst-sim.log");
    let (child, jst_url) = spawn_sim(&options.bin_dir.join("jst-sim"), &jst_args, &log).await?;
    let mut procs = vec![Proc { role: Role::JstSim, index: 0, child, admin: None, log }];
    let log = options.log_dir.join("target-sim.log");
    let (child, target_base) = spawn_sim(&options.bin_dir.join("target-sim"), &options.target_args, &log).await?;
    procs.push(Proc { role: Role::TargetSim, index: 0, child, admin: None, log });
    Ok((procs, jst_url, target_base))
}

/// Writes the fetchers' accounts file: every merchant jst-sim created, with its credentials and
/// the stack's budget.
async fn write_accounts(http: &reqwest::Client, jst_url: &str, options: &StackOptions) -> anyhow::Result<PathBuf> {
    let accounts: Value =
        http.get(format!("{jst_url}/admin/accounts")).send().await?.error_for_status()?.json().await?;
    let entries: Vec<Value> = accounts["accounts"]
        .as_array()
        .context("accounts list")?
        .iter()
        .map(|a| account_entry(a, jst_url, options))
        .collect();
    let accounts_file = options.log_dir.join("accounts.json");
    std::fs::write(&accounts_file, serde_json::to_vec_pretty(&json!({ "accounts": entries }))?)?;
    Ok(accounts_file)
}

/// One merchant of jst-sim as a fetcher account.
fn account_entry(a: &Value, jst_url: &str, options: &StackOptions) -> Value {
    let mut entry = if options.legacy {
        json!({
            "name": a["account"], "base_url": jst_url, "api": "legacy",
            "partner_id": a["partner_id"], "partner_key": a["partner_key"], "token": a["token"],
        })
    } else {
        json!({
            "name": a["account"], "base_url": jst_url, "app_key": a["app_key"], "app_secret": a["app_secret"],
            "access_token": a["access_token"], "refresh_token": a["refresh_token"],
        })
    };
    let (per_sec, per_min) = options.fetch_budget.unwrap_or((options.rate_per_sec, options.rate_per_min));
    entry["rate_per_sec"] = json!(per_sec);
    entry["rate_per_min"] = json!(per_min);
    if let Some(path) = &options.request_config {
        entry["request_config"] = json!(path.display().to_string());
    }
    entry
}

impl Stack {
    pub async fn start(options: StackOptions) -> anyhow::Result<Stack> {
        orderflow_shared::init_process();
        std::fs::create_dir_all(&options.log_dir)?;
        check_binaries(&options.bin_dir)?;
        let (procs, jst_url, target_base) = start_sims(&options).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let accounts_file = write_accounts(&http, &jst_url, &options).await?;
        let target_url = format!("{target_base}/data/write");
        let mut stack = Stack { jst_url, target_url, accounts_file, procs, http, options };
        stack.start_stages().await?;
        Ok(stack)
    }

    /// Starts every stage replica: writers, transformers, then fetchers. When one cannot start,
    /// stops everything and deletes what the replicas already started declared.
    async fn start_stages(&mut self) -> anyhow::Result<()> {
        let o = &self.options;
        let counts = [(Role::Writer, o.writers), (Role::Transformer, o.transformers), (Role::Fetcher, o.fetchers)];
        for (role, count) in counts {
            for index in 0..count {
                if let Err(error) = self.spawn_stage(role, index).await {
                    self.stop().await;
                    if let Err(cleanup) = self.delete_namespace().await {
                        tracing::warn!(message = "Could not delete the stack's queues.", error = %format!("{cleanup:#}"));
                    }
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// The broker settings of the stack's namespace, for a harness's own connections (the CA file,
    /// like the replicas', comes from `AMQP_CA_FILE`).
    pub fn broker_args(&self) -> orderflow_shared::settings::BrokerArgs {
        orderflow_shared::settings::BrokerArgs {
            amqp_url: self.options.amqp_url.clone(),
            amqp_password: None,
            amqp_ca_file: std::env::var_os("AMQP_CA_FILE").map(PathBuf::from),
            ns: self.options.ns.clone(),
            declare_topology: true,
            amqp_confirm_timeout: orderflow_shared::amqp::publisher::DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// Deletes what the stack's processes declared on the broker (after [`Stack::stop`]).
    pub async fn delete_namespace(&self) -> anyhow::Result<()> {
        let client = Client::connect(&self.broker_args(), "orderflow-cleanup").await?;
        let result = tokio::time::timeout(Duration::from_secs(120), delete_stack_namespace(&client, &self.options))
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("deleting namespace {} took over 120 s", self.options.ns)));
        client.close().await;
        result
    }

    /// Starts (or restarts) replica `index` of a stage.
    pub async fn spawn_stage(&mut self, role: Role, index: u32) -> anyhow::Result<()> {
        let o = &self.options;
        let log = o.log_dir.join(format!("{}-{index}.log", role.binary()));
        let log = if log.exists() {
            o.log_dir.join(format!("{}-{index}-{}.log", role.binary(), jiff::Timestamp::now().as_millisecond()))
        } else {
            log
        };
        let mut cmd = Command::new(o.bin_dir.join(role.binary()));
        cmd.env("AMQP_URL", &o.amqp_url)
            .env("ORDERFLOW_NS", &o.ns)
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", child_log_filter(&o.env));
        match role {
            Role::Fetcher => {
                cmd.env("ORDERFLOW_ACCOUNTS", &self.accounts_file).env("FETCH_LOCK_RETRY", "1s");
            }
            Role::Writer => {
                cmd.env("TARGET_URL", &self.target_url);
            }
            _ => {}
        }
        for (k, v) in o.env.iter().filter(|(k, _)| k != "RUST_LOG") {
            cmd.env(k, v);
        }
        let mut child = spawn_logged(&mut cmd, &log).await?;
        let admin =
            admin_addr_from_log(&mut child, &log).await.with_context(|| format!("{} #{index}", role.binary()))?;
        self.procs.retain(|p| !(p.role == role && p.index == index));
        self.procs.push(Proc { role, index, child, admin: Some(admin), log });
        Ok(())
    }

    pub fn proc_mut(&mut self, role: Role, index: u32) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.role == role && p.index == index)
    }

    pub fn replicas(&self, role: Role) -> Vec<&Proc> {
        self.procs.iter().filter(|p| p.role == role).collect()
    }

    /// `kill -9` of one replica.
    pub async fn kill9(&mut self, role: Role, index: u32) -> anyhow::Result<()> {
        let proc = self.proc_mut(role, index).with_context(|| format!("no {} #{index}", role.binary()))?;
        proc.child.start_kill()?;
        let _ = proc.child.wait().await;
        Ok(())
    }

    /// SIGTERM to one process, then wait up to `grace` for it to exit (SIGKILL after that).
    pub async fn terminate(proc: &mut Proc, grace: Duration) -> Option<std::process::ExitStatus> {
        if let Some(pid) = proc.child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(grace, proc.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = proc.child.start_kill();
                proc.child.wait().await.ok()
            }
        }
    }

    /// Stops every process: the stages first (gracefully), then the simulators.
    pub async fn stop(&mut self) {
        for role in [Role::Fetcher, Role::Transformer, Role::Writer, Role::JstSim, Role::TargetSim] {
            for proc in self.procs.iter_mut().filter(|p| p.role == role) {
                Stack::terminate(proc, Duration::from_secs(30)).await;
            }
        }
    }

    /// The first process that exited on its own (role, index, log), if any.
    pub fn exited(&mut self) -> Option<(Role, u32, PathBuf, String)> {
        for proc in &mut self.procs {
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Some((proc.role, proc.index, proc.log.clone(), status.to_string()));
            }
        }
        None
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub async fn get_json(&self, url: &str) -> anyhow::Result<Value> {
        Ok(self.http.get(url).send().await?.error_for_status()?.json().await?)
    }

    pub async fn post_json(&self, url: &str, body: &Value) -> anyhow::Result<Value> {
        Ok(self.http.post(url).json(body).send().await?.error_for_status()?.json().await?)
    }

    /// The ids of every order jst-sim reports Confirmed now (all merchants).
    pub async fn confirmed_ids(&self) -> anyhow::Result<HashSet<String>> {
        let truth = self.get_json(&format!("{}/admin/truth?ids_only=true", self.jst_url)).await?;
        let mut ids = HashSet::new();
        for account in truth["accounts"].as_array().context("truth accounts")? {
            for id in account["confirmed_ids"].as_array().context("confirmed ids")? {
                ids.insert(id.to_string().trim_matches('"').to_string());
            }
        }
        Ok(ids)
    }

    /// Runs `orderflow audit` against this stack for `account` over [from, now] (`from` as the
    /// CLI takes it, e.g. `4d`): its JSON report, or why it failed.
    pub async fn audit(&self, account: &str, from: &str, grace: &str) -> anyhow::Result<Value> {
        let mut cmd = Command::new(self.options.bin_dir.join("orderflow"));
        cmd.args(["audit", "--account", account, "--from", from, "--in-flight-grace", grace, "--json"])
            .env("AMQP_URL", &self.options.amqp_url)
            .env("ORDERFLOW_NS", &self.options.ns)
            .env("LOG_FORMAT", "json")
            .kill_on_drop(true);
        if let Some((_, tiers)) = self.options.env.iter().find(|(k, _)| k == "RETRY_TIERS") {
            cmd.env("RETRY_TIERS", tiers);
        }
        let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
            .await
            .context("orderflow audit timed out")??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // Exit 1 is a report (something missing or in flight); other failures have no report.
        match (out.status.code(), serde_json::from_str::<Value>(&stdout)) {
            (Some(0 | 1), Ok(report)) => Ok(report),
            _ => bail!(
                "orderflow audit --account {account} failed ({}): {}{}",
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Every order Confirmed now for `account`, as jst-sim lists them (o_id, modified, ts, …).
    pub async fn confirmed_orders(&self, account: &str) -> anyhow::Result<Vec<Value>> {
        let truth = self.get_json(&format!("{}/admin/truth?account={account}", self.jst_url)).await?;
        Ok(truth["confirmed"].as_array().cloned().unwrap_or_default())
    }

    /// The ids of every record target-sim holds.
    pub async fn written_ids(&self) -> anyhow::Result<HashSet<String>> {
        let base = self.target_url.trim_end_matches("/data/write");
        let records = self.get_json(&format!("{base}/admin/records?ids_only=true")).await?;
        Ok(records["ids"].as_array().context("ids")?.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
    }

    pub async fn target_stats(&self) -> anyhow::Result<Value> {
        let base = self.target_url.trim_end_matches("/data/write");
        self.get_json(&format!("{base}/admin/stats")).await
    }

    pub async fn target_faults(&self, body: &Value) -> anyhow::Result<Value> {
        let base = self.target_url.trim_end_matches("/data/write");
        self.post_json(&format!("{base}/admin/faults"), body).await
    }

    /// Confirmed in source vs written in target, right now.
    pub async fn progress(&self) -> anyhow::Result<Progress> {
        let confirmed = self.confirmed_ids().await?;
        let written = self.written_ids().await?;
        let written_confirmed = confirmed.iter().filter(|id| written.contains(*id)).count();
        Ok(Progress { confirmed: confirmed.len(), written_confirmed, target_records: written.len() })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub confirmed: usize,
    /// Confirmed orders present in the target.
    pub written_confirmed: usize,
    /// Every record in the target (orders confirmed then cancelled stay written).
    pub target_records: usize,
}

impl Progress {
    pub fn synced(&self) -> bool {
        self.confirmed > 0 && self.written_confirmed == self.confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_is_read_from_the_services_json_start_line() {
        let line = r#"{"timestamp":"2026-11-28T15:00:00Z","level":"INFO","message":"Admin server listening.","addr":"127.0.0.1:40123","target":"orderflow_shared::admin"}"#;
        assert_eq!(listening_addr(line), Some("127.0.0.1:40123".parse().expect("an address")));
        assert_eq!(listening_addr(r#"{"message":"Writer started.","admin":"127.0.0.1:40123"}"#), None);
        assert_eq!(listening_addr("writer: ADMIN_ADDR 127.0.0.1:0: Address in use"), None);
    }

    #[test]
    fn a_quiet_log_filter_still_lets_the_admin_start_line_through() {
        let env = vec![("RUST_LOG".to_string(), "warn".to_string())];
        assert_eq!(child_log_filter(&env), "warn,orderflow_shared::admin=info");
    }
}
