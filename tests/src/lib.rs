//! Test harness: a broker (AMQP_URL, else a local RabbitMQ on 127.0.0.1:5672, else one started
//! with testcontainers), a unique namespace per test, condition waits with timeouts, and the local
//! stack runner of `orderflow-lab`.

use std::{
    future::Future,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use orderflow_shared::settings::BrokerArgs;

pub mod docker;
use tokio::sync::OnceCell;

pub use orderflow_lab::stack::{Progress, Role, Stack, StackOptions};

static BROKER: OnceCell<String> = OnceCell::const_new();
static BINARIES: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// Builds the workspace's binaries (same profile as these tests) once per test process: `cargo
/// test` builds test harnesses, not the binaries the end-to-end tests start as processes.
pub fn ensure_binaries() {
    let result = BINARIES.get_or_init(|| {
        let dir = orderflow_lab::stack::default_bin_dir();
        let release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins", "--quiet", "--manifest-path", manifest]);
        if release {
            cmd.arg("--release");
        }
        match cmd.status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("cargo build --workspace --bins failed ({status})")),
            Err(e) => Err(format!("cannot run cargo to build the binaries: {e}")),
        }
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
static CONTAINER: OnceCell<testcontainers::ContainerAsync<testcontainers::GenericImage>> = OnceCell::const_new();

/// The broker every test uses: `AMQP_URL` when set; otherwise a RabbitMQ already listening on
/// 127.0.0.1:5672; otherwise one started in Docker with testcontainers (kept for the whole run).
pub async fn broker_url() -> String {
    ensure_binaries();
    BROKER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("AMQP_URL") {
                return url;
            }
            if tokio::net::TcpStream::connect("127.0.0.1:5672").await.is_ok() {
                return orderflow_shared::settings::DEFAULT_AMQP_URL.to_string();
            }
            let container = CONTAINER
                .get_or_init(|| async {
                    use testcontainers::{
                        GenericImage, ImageExt,
                        core::{IntoContainerPort, WaitFor},
                        runners::AsyncRunner,
                    };
                    GenericImage::new("rabbitmq", "3.13-management")
                        .with_exposed_port(5672.tcp())
                        .with_wait_for(WaitFor::message_on_stdout("Server startup complete"))
                        .with_startup_timeout(Duration::from_secs(120))
                        .start()
                        .await
                        .unwrap_or_else(|e| {
                            panic!("no AMQP_URL, no broker on 127.0.0.1:5672, and Docker could not start RabbitMQ: {e}")
                        })
                })
                .await;
            let port =
                container.get_host_port_ipv4(5672).await.unwrap_or_else(|e| panic!("RabbitMQ container port: {e}"));
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        })
        .await
        .clone()
}

/// A namespace no other test (or earlier run) uses.
pub fn unique_ns(test: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("t-{test}-{}-{n}-{}", std::process::id(), millis % 1_000_000)
}

pub async fn broker_args(ns: &str) -> BrokerArgs {
    BrokerArgs {
        amqp_url: broker_url().await,
        amqp_password: None,
        amqp_ca_file: None,
        ns: ns.to_string(),
        declare_topology: true,
        amqp_confirm_timeout: orderflow_shared::amqp::publisher::DEFAULT_CONFIRM_TIMEOUT,
    }
}

/// A fresh log directory for one test.
pub fn log_dir(ns: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("orderflow-tests/{ns}"));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Polls `check` every `every` until it returns `Ok(Some(value))`, or fails after `timeout` with
/// the last state it described.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Result<T, String>>>,
{
    let start = Instant::now();
    loop {
        let last = match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => state,
            Err(error) => format!("error: {error:#}"),
        };
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {:?} waiting for {what}; last state: {last}", timeout);
        }
        tokio::time::sleep(every).await;
    }
}

/// Waits until every Confirmed order is written (and stays so for two polls).
pub async fn wait_synced(stack: &Stack, timeout: Duration) -> anyhow::Result<Progress> {
    let start = Instant::now();
    let mut streak = 0;
    let mut last = None;
    while start.elapsed() < timeout {
        match stack.progress().await {
            Ok(p) if p.synced() => {
                streak += 1;
                if streak >= 2 {
                    return Ok(p);
                }
            }
            Ok(p) => {
                streak = 0;
                last = Some(p);
            }
            Err(_) => streak = 0,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("not synced after {timeout:?}; last progress {last:?}")
}

/// Heavy end-to-end tests take this so they run one at a time on a 2-core machine. It also arms
/// a [`Watchdog`]: a heavy test that hangs ends the run with a report instead of holding CI
/// until its job is killed with nothing said.
pub async fn heavy() -> Heavy {
    heavy_for(watchdog_limit()).await
}

/// [`heavy`] with a limit of its own (the Docker tests may build their images first), never
/// below `ORDERFLOW_TEST_WATCHDOG`.
pub async fn heavy_for(limit: Duration) -> Heavy {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let lock = LOCK.lock().await;
    Heavy { _watchdog: Watchdog::arm(limit.max(watchdog_limit())), _lock: lock }
}

/// Held for the whole of a heavy test (see [`heavy`]).
pub struct Heavy {
    _watchdog: Watchdog,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

/// How long one heavy test may run: `ORDERFLOW_TEST_WATCHDOG` (e.g. `40m`), else 25 minutes —
/// the longest test (the fault suite) takes about 15 on a 2-core machine.
fn watchdog_limit() -> Duration {
    std::env::var("ORDERFLOW_TEST_WATCHDOG")
        .ok()
        .and_then(|v| orderflow_shared::settings::parse_duration(&v).ok())
        .unwrap_or(Duration::from_secs(25 * 60))
}

/// Ends the test process when a test outlives its limit: reports which test, the broker's alarms,
/// free disk and the processes the test started, kills those processes, puts back the broker
/// settings a guard changed (an abort skips every `Drop`), and aborts — within a minute even when
/// the report itself hangs (a wedged broker). Disarmed when dropped.
pub struct Watchdog {
    _disarm: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    pub fn arm(limit: Duration) -> Watchdog {
        let (disarm, armed) = std::sync::mpsc::channel::<()>();
        let test = std::thread::current().name().unwrap_or("a test").to_string();
        std::thread::spawn(move || {
            if armed.recv_timeout(limit) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_secs(60));
                std::process::abort();
            });
            // Straight to the process's stderr: the test harness captures `eprintln!`, and an
            // aborted test's captured output is never printed.
            let run = |program: &str, args: &[&str]| match std::process::Command::new(program).args(args).output() {
                Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
                Err(error) => format!("{program}: {error}\n"),
            };
            let pid = std::process::id().to_string();
            let report = format!(
                "\n*** WATCHDOG: {test} still running after {} s; aborting the test process.\n\
                 broker alarms: {}\nfree disk:\n{}processes this test started:\n{}",
                limit.as_secs(),
                orderflow_lab::alarms::describe_alarms(&orderflow_lab::rabbitmqctl::rabbitmqctl_command()),
                run("df", &["-h", "/", "/tmp"]),
                run("ps", &["-o", "pid,etime,time,rss,args", "--ppid", &pid]),
            );
            use std::io::Write;
            let _ = std::io::stderr().lock().write_all(report.as_bytes());
            let _ = std::process::Command::new("pkill").args(["-KILL", "-P", &pid]).status();
            for failure in orderflow_lab::alarms::restore_pending() {
                let _ = writeln!(std::io::stderr(), "could not put a broker setting back: {failure}");
            }
            std::process::abort();
        });
        Watchdog { _disarm: disarm }
    }
}

/// Stops the stack and removes the namespace's queues.
pub async fn teardown(mut stack: Stack) {
    stack.stop().await;
    let _ = stack.delete_namespace().await;
}

/// A message read back from a queue by a test.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: Vec<u8>,
    pub properties: lapin::BasicProperties,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, key: &str) -> Option<String> {
        orderflow_shared::amqp::headers::get_str(&self.properties, key)
    }
}

/// Takes (and acks) messages from `queue` until `count` have arrived or `timeout` passes, on a
/// connection of its own. A quorum queue whose Ra member is restarting answers basic.get with a
/// connection-level INTERNAL_ERROR (`noproc`), which RabbitMQ 3.10 does under load on a busy single
/// node: the connection is reopened and the unacked message, requeued by the broker, taken again.
pub async fn take(args: &BrokerArgs, queue: &str, count: usize, timeout: Duration) -> anyhow::Result<Vec<Got>> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let start = Instant::now();
    let mut out = Vec::new();
    let mut connection = orderflow_shared::amqp::connect(args, "test-take").await?;
    let mut channel = connection.create_channel().await?;
    while out.len() < count {
        let got = match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await {
            Ok(got) => got,
            // The services may not have declared the queue yet.
            Err(e) if orderflow_shared::amqp::is_not_found(&e) && start.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                channel = connection.create_channel().await?;
                continue;
            }
            Err(e) if !connection.status().connected() && start.elapsed() < timeout => {
                eprintln!("take from {queue}: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                connection = orderflow_shared::amqp::connect(args, "test-take").await?;
                channel = connection.create_channel().await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match got {
            Some(message) => {
                let d = message.delivery;
                channel.basic_ack(d.delivery_tag, BasicAckOptions::default()).await?;
                out.push(Got { body: d.data, properties: d.properties });
            }
            None if start.elapsed() >= timeout => {
                anyhow::bail!("only {} of {count} messages arrived in {queue} within {timeout:?}", out.len())
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    orderflow_shared::amqp::connect::close(&connection).await;
    Ok(out)
}

/// Publishes `body` (confirmed) to an exchange.
pub async fn publish(
    connection: &lapin::Connection,
    exchange: &str,
    routing_key: &str,
    message_id: &str,
    body: &[u8],
) -> anyhow::Result<()> {
    let publisher = orderflow_shared::amqp::Publisher::open(connection).await?;
    let props = orderflow_shared::amqp::headers::json_properties(message_id, lapin::types::FieldTable::default());
    publisher.publish(exchange, routing_key, body, props).await?;
    let _ = publisher.channel().close(200, "ok".into()).await;
    Ok(())
}

/// Runs a service in this process until the returned token is cancelled.
pub fn spawn_service<F>(run: F) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)
where
    F: FnOnce(
        tokio_util::sync::CancellationToken,
    ) -> std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
{
    let token = tokio_util::sync::CancellationToken::new();
    let handle = tokio::spawn(run(token.clone()));
    (token, handle)
}

/// Collects every page the fetchers publish (a stand-in for the transformer in fetcher tests):
/// the set of `(account, o_id)` seen, the number of pages and orders.
#[derive(Default, Debug, Clone)]
pub struct Collected {
    pub ids: std::collections::HashSet<(String, i64)>,
    pub pages: u64,
    pub orders: u64,
}

pub struct PageCollector {
    pub state: std::sync::Arc<std::sync::Mutex<Collected>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl PageCollector {
    /// Starts consuming `<ns>.pages` (declaring the topology first).
    pub async fn start(ns: &str) -> anyhow::Result<PageCollector> {
        use futures_util::StreamExt;
        use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
        let broker = broker_args(ns).await;
        let connection = orderflow_shared::amqp::connect(&broker, "test-collector").await?;
        let topology = orderflow_shared::amqp::Topology::new(ns.to_string());
        let channel = connection.create_channel().await?;
        topology.declare(&channel).await?;
        channel.basic_qos(200, BasicQosOptions::default()).await?;
        let mut consumer = channel
            .basic_consume(
                topology.pages_queue().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await?;
        let state = std::sync::Arc::new(std::sync::Mutex::new(Collected::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, token) = (state.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = token.cancelled() => break,
                    n = consumer.next() => n,
                };
                let Some(delivery) = next else { break };
                let delivery = delivery?;
                let page: serde_json::Value = serde_json::from_slice(&delivery.data)?;
                let account = page["account"].as_str().unwrap_or_default().to_string();
                {
                    let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
                    st.pages += 1;
                    for order in page["orders"].as_array().cloned().unwrap_or_default() {
                        st.orders += 1;
                        if let Some(id) = order["o_id"].as_i64() {
                            st.ids.insert((account.clone(), id));
                        }
                    }
                }
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            orderflow_shared::amqp::connect::close(&connection).await;
            anyhow::Ok(())
        });
        Ok(PageCollector { state, stop, task })
    }

    pub fn snapshot(&self) -> Collected {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn stop(self) -> anyhow::Result<Collected> {
        let PageCollector { state, stop, task } = self;
        stop.cancel();
        task.await??;
        let collected = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(collected)
    }
}

/// Every order jst-sim reports Confirmed, as `(account, o_id)`.
pub async fn truth_pairs(stack: &Stack) -> anyhow::Result<std::collections::HashSet<(String, i64)>> {
    let truth = stack.get_json(&format!("{}/admin/truth?ids_only=true", stack.jst_url)).await?;
    let mut out = std::collections::HashSet::new();
    for account in truth["accounts"].as_array().cloned().unwrap_or_default() {
        let name = account["account"].as_str().unwrap_or_default().to_string();
        for id in account["confirmed_ids"].as_array().cloned().unwrap_or_default() {
            if let Some(id) = id.as_i64() {
                out.insert((name.clone(), id));
            }
        }
    }
    Ok(out)
}

/// Waits until every Confirmed order has been published in a page (and stays so for two polls).
pub async fn wait_all_published(stack: &Stack, collector: &PageCollector, timeout: Duration) -> anyhow::Result<usize> {
    let start = Instant::now();
    let mut streak = 0;
    let mut missing_last = usize::MAX;
    while start.elapsed() < timeout {
        let truth = truth_pairs(stack).await?;
        let seen = collector.snapshot();
        let missing = truth.iter().filter(|p| !seen.ids.contains(*p)).count();
        if missing == 0 && !truth.is_empty() {
            streak += 1;
            if streak >= 2 {
                return Ok(truth.len());
            }
        } else {
            streak = 0;
        }
        missing_last = missing;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("after {timeout:?}, {missing_last} Confirmed orders were never published")
}

/// jst-sim's `/admin/stats` for one merchant.
pub async fn sim_stats(stack: &Stack, account: &str) -> anyhow::Result<serde_json::Value> {
    let stats = stack.get_json(&format!("{}/admin/stats", stack.jst_url)).await?;
    Ok(stats["accounts"][account].clone())
}

/// A queue's depth and consumers as the broker says now (`None`: no such queue).
pub async fn queue_state(stack: &Stack, name: &str) -> anyhow::Result<Option<orderflow_shared::amqp::ops::QueueState>> {
    let client = orderflow_shared::amqp::ops::Client::connect(&stack.broker_args(), "test-queue-state").await?;
    let state = client.queue_state(name).await;
    client.close().await;
    state
}

/// Scrapes one replica's `/metrics` and sums the samples of a metric family (optionally those
/// whose labels contain `label`, e.g. `account="m1"`).
pub async fn metric(proc_admin: std::net::SocketAddr, name: &str, label: Option<&str>) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{proc_admin}/metrics")).await?.text().await?;
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let family = key.split('{').next().unwrap_or("");
        if family == name && label.is_none_or(|l| key.contains(l)) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Ok(sum)
}

/// Runs `rabbitmqctl` against the test broker: the local one, or inside the testcontainers container.
/// A broker policy a test set, cleared when dropped (also when the test fails).
pub struct Policy(pub String);

impl Policy {
    /// Sets policy `name` on the queues matching `pattern` with this JSON definition.
    pub fn set(name: String, pattern: &str, definition: &str) -> anyhow::Result<Self> {
        rabbitmqctl(&["set_policy", "--apply-to", "queues", &name, pattern, definition])?;
        Ok(Self(name))
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["clear_policy", &self.0]);
    }
}

pub fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let command = rabbitmqctl_command();
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or("rabbitmqctl");
    let output = std::process::Command::new(program)
        .args(words)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("{command} {args:?}: {e} (these tests drive the broker with rabbitmqctl)"))?;
    anyhow::ensure!(output.status.success(), "{command} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The `rabbitmqctl` command line for the test broker (the tests' own calls and the fault
/// suite's): `ORDERFLOW_RABBITMQCTL` when set (e.g. `rabbitmqctl -n ci@localhost` for a second node
/// given in `AMQP_URL`), `docker exec <id> rabbitmqctl` when the broker is a container, else
/// `rabbitmqctl`.
pub fn rabbitmqctl_command() -> String {
    if let Ok(command) = std::env::var("ORDERFLOW_RABBITMQCTL")
        && !command.trim().is_empty()
    {
        return command;
    }
    match CONTAINER.get() {
        Some(container) => format!("docker exec {} rabbitmqctl", container.id()),
        None => "rabbitmqctl".to_string(),
    }
}

/// While alive, the broker application is stopped (every connection refused); dropping it starts
/// the broker again, even when a test fails half-way.
pub struct BrokerDown;

impl BrokerDown {
    pub fn stop() -> anyhow::Result<BrokerDown> {
        rabbitmqctl(&["stop_app"])?;
        Ok(BrokerDown)
    }
}

impl Drop for BrokerDown {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["start_app"]);
        let _ = rabbitmqctl(&["await_startup"]);
    }
}

/// Force-closes every broker connection whose client-provided name contains `needle`.
pub fn close_connections(needle: &str) -> anyhow::Result<usize> {
    let listing = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q"])?;
    let mut closed = 0;
    for line in listing.lines().filter(|l| l.contains(needle)) {
        if let Some(pid) = line.split('\t').next().filter(|p| p.starts_with('<'))
            && rabbitmqctl(&["close_connection", pid, "closed by an orderflow test"]).is_ok()
        {
            closed += 1;
        }
    }
    Ok(closed)
}

/// `/readyz` status code of a service (0 when it does not answer).
pub async fn readyz(admin: std::net::SocketAddr) -> u16 {
    match reqwest::Client::new().get(format!("http://{admin}/readyz")).timeout(Duration::from_secs(2)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}
