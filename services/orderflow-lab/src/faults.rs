//! `orderflow fault-suite`: the faults real integrations see, injected while the whole pipeline
//! runs, each scenario ending with the checks that matter: every order `/admin/truth` reports
//! Confirmed is in target-sim (lost must be 0), the work queues drain, every dead letter carries a
//! reason, no stage exited on its own, and duplicate writes suppressed by `idCheck` are counted.
//!
//! 1 source churn and late commits · 2 source storms (5xx, resets, slow answers, code 150, 199/200
//! bursts, token expiry, rows committed late below the cursor) · 3 target 5xx/429, failures inside
//! HTTP 200, an outage, expired credentials (401) · 4 `kill -9` of random replicas,
//! repeatedly · 5 broker connections force-closed and a broker restart · 6 malformed pages and
//! records, oversized messages, unknown schema versions · 7 all at once (1-6, then the alarms of 8) · 8 broker alarms:
//! a memory alarm, then a disk alarm (every publishing connection blocked), then a 2-minute (long profile: 3-minute) target
//! outage under a 60 s broker ack timeout (`consumer_timeout`).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use orderflow_shared::{
    amqp::{
        Stage, Topology,
        headers::json_properties,
        ops::Client,
        topology::{PAGE_ROUTING_KEY, RECORD_ROUTING_KEY},
    },
    messages::header,
    rng::Rng,
};
use serde::Serialize;
use serde_json::json;

use crate::{
    alarms::{Alarm, ConsumerTimeout, Resource},
    rabbitmqctl::{rabbitmqctl, rabbitmqctl_command},
    stack::{Progress, Role, Stack, StackOptions},
};

#[derive(Debug, Clone, Args)]
pub struct FaultArgs {
    /// The long profile: over 200,000 orders, 4 merchants, 90 s of each fault (over 10 minutes).
    #[arg(long)]
    pub long: bool,
    /// Run only these scenarios (1-8); repeatable. Default: all.
    #[arg(long = "scenario")]
    pub scenarios: Vec<u8>,
    /// Print one JSON object per scenario on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where the binaries are (default: next to this executable).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub accounts: u32,
    pub orders: u64,
    pub replicas: u32,
    /// How long faults run.
    pub fault_secs: u64,
    /// The target outage of scenario 3.
    pub outage_secs: u64,
    /// Orders per account in scenario 7 (the long profile's big run).
    pub all_at_once_orders: u64,
    /// Source calls per second per account (and 60× per minute): paced so the backfill outlasts
    /// the faults, which must hit work in flight, not an idle pipeline.
    pub calls_per_sec: u32,
    pub all_at_once_calls_per_sec: u32,
    /// WRITER_CONCURRENCY: low enough that the writers are slower than the backfill.
    pub writer_concurrency: u16,
    /// How to run `rabbitmqctl` against the broker (see [`rabbitmqctl_command`]).
    pub rabbitmqctl: String,
    /// Scenario 8: how long each resource alarm lasts.
    pub alarm_secs: u64,
    /// Scenario 8: the target outage held through the short ack timeout.
    pub ack_timeout_outage_secs: u64,
}

impl Profile {
    pub fn short() -> Self {
        // 80 pages per account at 3 calls/s: the backfill runs ~27 s, through the 20 s of faults.
        Profile {
            accounts: 2,
            orders: 4000,
            replicas: 2,
            fault_secs: 20,
            outage_secs: 15,
            all_at_once_orders: 4000,
            calls_per_sec: 3,
            all_at_once_calls_per_sec: 3,
            writer_concurrency: 8,
            rabbitmqctl: rabbitmqctl_command(),
            alarm_secs: 20,
            ack_timeout_outage_secs: 120,
        }
    }
    pub fn long() -> Self {
        // 100 pages per account at 3 calls/s (~35 s of backfill, then 90 s of faults on the churn
        // stream and the writers' backlog); all at once: 4 × 40,000 orders, 800 pages per
        // account at 5 calls/s (~160 s). Over 200,000 Confirmed orders checked in all.
        Profile {
            accounts: 4,
            orders: 5_000,
            replicas: 2,
            fault_secs: 90,
            outage_secs: 60,
            all_at_once_orders: 40_000,
            calls_per_sec: 3,
            all_at_once_calls_per_sec: 5,
            writer_concurrency: 32,
            rabbitmqctl: rabbitmqctl_command(),
            alarm_secs: 60,
            ack_timeout_outage_secs: 180,
        }
    }
}

pub const NAMES: [&str; 8] = [
    "source churn and late commits",
    "source storms: 5xx, resets, timeouts, code 150, 199/200 bursts, token expiry, late-ts commits",
    "target 5xx/429, failures inside HTTP 200, an outage, expired credentials",
    "kill -9 of random stage replicas, repeatedly",
    "broker connections force-closed and a broker restart",
    "malformed pages and records, oversized messages, unknown schemas",
    "all of the above at once",
    "broker alarms: memory, disk, and a 60 s ack timeout through a 2-minute target outage (3 long)",
];

/// Scenario 8's broker ack timeout, and the hold limit below it that parks what the writers hold.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
const ACK_TIMEOUT_HOLD_LIMIT: &str = "30s";

/// How soon the pipeline must publish again after an alarm clears.
const RESUME_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    pub scenario: u8,
    pub name: &'static str,
    /// Orders Confirmed in the source at the end.
    pub orders: usize,
    pub written: usize,
    /// Confirmed in the source but not in the target. Must be 0.
    pub lost: usize,
    pub duplicates_suppressed: u64,
    pub dead_lettered: u64,
    pub dead_letters_without_reason: u64,
    /// Bad messages the scenario injected on purpose (each must be dead-lettered).
    pub injected_bad: u64,
    pub queues_drained: bool,
    /// From the end of the last fault to every Confirmed order written.
    pub recovery_seconds: f64,
    pub seconds: f64,
    pub passed: bool,
    /// Stage exits the suite did not cause (a panic, an unexpected error): each fails the run,
    /// even though the suite restarts the replica to see the rest through.
    pub crashes: Vec<String>,
    /// `orderflow audit` of every account over the run's window, against the oracle.
    pub audit: AuditCheck,
    pub notes: Vec<String>,
}

/// What the audits of a run found, summed over its accounts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditCheck {
    pub accounts: usize,
    /// Orders the source listed to the audits.
    pub source: u64,
    pub written: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    /// Must be 0.
    pub missing: u64,
    /// Accounts where the audit and the oracle disagree (what the audit listed is not what
    /// jst-sim has Confirmed in the window, or it found an order missing): must be empty.
    pub disagreements: Vec<String>,
    pub seconds: f64,
}

impl AuditCheck {
    pub fn agrees(&self) -> bool {
        self.accounts > 0 && self.missing == 0 && self.disagreements.is_empty()
    }
}

fn options(n: u8, profile: &Profile, amqp_url: &str, bin_dir: &std::path::Path) -> StackOptions {
    let ns = format!("fault{n}-{}", jiff::Timestamp::now().as_millisecond());
    let log_dir = std::env::temp_dir().join(format!("orderflow-{ns}"));
    let mut o = StackOptions::new(amqp_url, &ns, &log_dir);
    o.bin_dir = bin_dir.to_path_buf();
    // Kills land among many merchants' owners (each fetcher holds dozens of accounts); the same
    // orders and churn in all, spread thinner.
    let accounts = if n == 4 { profile.accounts.max(KILL_ACCOUNTS) } else { profile.accounts };
    let spread = f64::from(profile.accounts) / f64::from(accounts);
    o.accounts = accounts;
    o.orders = if n == 7 {
        profile.all_at_once_orders
    } else {
        profile.orders * u64::from(profile.accounts) / u64::from(accounts)
    };
    o.fetchers = profile.replicas;
    o.transformers = profile.replicas;
    o.writers = profile.replicas;
    // A paced backfill plus a steady stream of new and changed orders: the faults always hit work
    // in flight, not an idle pipeline.
    o.rate_per_sec = if n == 7 { profile.all_at_once_calls_per_sec } else { profile.calls_per_sec };
    o.rate_per_min = o.rate_per_sec * 60;
    // A target as slow as real ones: every writer always holds writes in flight.
    o.target_args = vec!["--latency-ms".into(), "20".into(), "--latency-max-ms".into(), "120".into()];
    o.env = stage_env(profile);
    if n == 8 {
        o.env.push(("HOLD_LIMIT".into(), ACK_TIMEOUT_HOLD_LIMIT.into()));
    }
    o.jst_args.extend(source_args(n, spread));
    o
}

/// The stages' settings in every scenario.
fn stage_env(profile: &Profile) -> Vec<(String, String)> {
    vec![
        ("FETCH_INTERVAL".into(), "1s".into()),
        ("FETCH_PASS_TIME".into(), "5s".into()),
        ("JST_TIMEOUT".into(), "2s".into()),
        ("RETRY_TIERS".into(), "200ms,1s,2s,5s".into()),
        ("WRITER_MAX_ATTEMPTS".into(), "12".into()),
        // Writers slower than the backfill: a backlog builds in the records queue, as it does
        // whenever a real target is the bottleneck, so kills and broker faults hit deep queues.
        ("WRITER_CONCURRENCY".into(), profile.writer_concurrency.to_string()),
        ("TRANSFORMER_MAX_PAGE_BYTES".into(), (4 * 1024 * 1024).to_string()),
        ("WRITER_MAX_RECORD_BYTES".into(), (256 * 1024).to_string()),
        // The audit at the end of each run may use the whole budget: the pipeline is idle then.
        ("FETCH_AUDIT_BUDGET".into(), "100%".into()),
        // The lagging sweep finds rows committed late below the cursor (scenarios 2 and 7).
        ("FETCH_SWEEP_EVERY".into(), "15s".into()),
        ("FETCH_SWEEP_SPAN".into(), "2m".into()),
        ("FETCH_WINDOW_DELAY".into(), "5s".into()),
    ]
}

/// Scenario 4 (`kill -9`) runs with at least this many merchants.
pub const KILL_ACCOUNTS: u32 = 50;

/// jst-sim's churn, token lifetime and late commits in scenario `n`, the churn rates (per
/// merchant) times `spread`.
fn source_args(n: u8, spread: f64) -> Vec<String> {
    let mut args: Vec<&str> = if n == 1 || n == 7 {
        vec![
            "--churn-modify",
            "5",
            "--churn-confirm",
            "3",
            "--churn-cancel",
            "1",
            "--churn-new",
            "5",
            "--churn-late",
            "2",
            "--late-max",
            "10s",
        ]
    } else {
        vec!["--churn-new", "5", "--churn-modify", "2"]
    };
    // Tokens expire often in the storm; in "all at once" less often, since a kill -9 that lands
    // between the source rotating a single-use refresh token and the fetcher committing it loses
    // the pair for good (a real limit of such APIs: the account stops and says so).
    match n {
        2 => args.extend(["--token-lifetime", "5s"]),
        7 => args.extend(["--token-lifetime", "20s"]),
        _ => {}
    }
    // Transactions that commit late with a row version below what the cursor has read.
    if n == 2 || n == 7 {
        args.extend(["--churn-late-ts", "1"]);
    }
    let rate = |flag: &str| flag.starts_with("--churn-");
    let mut out = Vec::with_capacity(args.len());
    for (i, arg) in args.iter().enumerate() {
        let scaled = i > 0 && rate(args[i - 1]) && spread != 1.0;
        out.push(match arg.parse::<f64>() {
            Ok(value) if scaled => format!("{}", value * spread),
            _ => arg.to_string(),
        });
    }
    out
}

/// Every replica's `/readyz` body and the `/metrics` texts.
async fn replica_views(stack: &Stack) -> (Vec<(String, serde_json::Value)>, Vec<String>) {
    let (mut ready, mut metrics) = (Vec::new(), Vec::new());
    for p in &stack.procs {
        let Some(admin) = p.admin else { continue };
        let name = format!("{} #{}", p.role.binary(), p.index);
        let body = match stack.http().get(format!("http://{admin}/readyz")).timeout(Duration::from_secs(5)).send().await
        {
            Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        ready.push((name, body));
        metrics.push(crate::e2e::metrics_text(stack.http(), admin).await);
    }
    (ready, metrics)
}

/// One resource alarm for `secs`: every stage that publishes while it lasts must say so in
/// `/readyz` (`broker_blocked`), and after it clears every replica is ready again and pages
/// flow within [`RESUME_WITHIN`]. Returns a note with what was seen.
async fn one_alarm(stack: &Stack, ctl: &str, resource: Resource, secs: u64) -> anyhow::Result<String> {
    let alarm = Alarm::raise(ctl, resource).await?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut blocked = std::collections::BTreeSet::new();
    while Instant::now() < end {
        for (name, body) in replica_views(stack).await.0 {
            if body["checks"]["broker_blocked"].as_str().is_some_and(|c| c != "ok") {
                blocked.insert(name);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    alarm.clear().await?;
    let cleared = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    let since = Instant::now();
    anyhow::ensure!(
        !blocked.is_empty(),
        "no stage reported broker_blocked in /readyz during the {} alarm",
        resource.as_str()
    );
    loop {
        let (ready, metrics) = replica_views(stack).await;
        let all_ready = ready.iter().all(|(_, b)| b["ready"] == true);
        let published = metrics
            .iter()
            .flat_map(|t| t.lines())
            .filter(|l| l.starts_with("orderflow_fetch_last_publish_timestamp_seconds "))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .any(|at| at > cleared);
        if all_ready && published {
            break;
        }
        anyhow::ensure!(
            since.elapsed() < RESUME_WITHIN,
            "{} s after the {} alarm cleared: every replica ready {all_ready}, pages published again {published}",
            RESUME_WITHIN.as_secs(),
            resource.as_str()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(format!(
        "{} alarm {secs} s: broker_blocked shown by {}; resumed in {:.1} s",
        resource.as_str(),
        blocked.into_iter().collect::<Vec<_>>().join(", "),
        since.elapsed().as_secs_f64()
    ))
}

/// Scenario 8: a memory alarm, a disk alarm, then a target outage longer than the broker's ack
/// timeout (60 s, set before the stack started): no broker session may end on its own throughout
/// (a channel the broker closed for a held delivery would show as a reconnect).
async fn broker_alarms(stack: &Stack, profile: &Profile) -> anyhow::Result<Vec<String>> {
    let reconnects = |m: &[String]| crate::e2e::counter_sum(m, "orderflow_broker_reconnects_total");
    let before = reconnects(&replica_views(stack).await.1);
    let mut notes = Vec::new();
    for resource in [Resource::Memory, Resource::Disk] {
        notes.push(one_alarm(stack, &profile.rabbitmqctl, resource, profile.alarm_secs).await?);
    }
    let outage = profile.ack_timeout_outage_secs;
    stack.target_faults(&json!({"outage_secs": outage as f64})).await?;
    tokio::time::sleep(Duration::from_secs(outage)).await;
    let (_, metrics) = replica_views(stack).await;
    let parked = crate::e2e::counter_sum(&metrics, "orderflow_write_parked_total");
    let after = reconnects(&metrics);
    anyhow::ensure!(
        after == before,
        "{} broker reconnects during the alarms and the {outage} s outage under a {} s ack timeout",
        after - before,
        ACK_TIMEOUT.as_secs()
    );
    notes.push(format!(
        "{outage} s target outage under a {} s ack timeout: {parked} records parked, no broker reconnect",
        ACK_TIMEOUT.as_secs()
    ));
    Ok(notes)
}

async fn sleep_until(deadline: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
}

/// Source storms for `secs` seconds, then calm.
async fn source_storm(stack: &Stack, secs: u64) -> anyhow::Result<()> {
    let faults = json!({"error_5xx_rate": 0.1, "reset_rate": 0.05, "code_150_rate": 0.05, "slow_rate": 0.03, "slow_ms": 3000, "latency_min_ms": 5, "latency_max_ms": 60});
    stack.post_json(&format!("{}/admin/faults", stack.jst_url), &faults).await?;
    let end = Instant::now() + Duration::from_secs(secs);
    let normal = json!({"per_sec": stack.options.rate_per_sec, "per_min": stack.options.rate_per_min});
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5)).await;
        // A merchant whose package suddenly allows far less: 199/200 answers for a while.
        stack.post_json(&format!("{}/admin/limits", stack.jst_url), &json!({"per_sec": 1, "per_min": 15})).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        stack.post_json(&format!("{}/admin/limits", stack.jst_url), &normal).await?;
    }
    stack.post_json(&format!("{}/admin/faults", stack.jst_url), &json!({})).await?;
    Ok(())
}

/// 5xx, 429 and failures inside HTTP 200, then an outage, then expired credentials (401s).
async fn target_trouble(stack: &Stack, secs: u64, outage_secs: u64) -> anyhow::Result<()> {
    // 429s carry `Retry-After: 1`, which pauses every write of a writer for a second.
    let noisy = json!({"failure_rate": 0.2, "throttle_rate": 0.02, "retry_after_secs": 1, "soft_failure_rate": 0.1});
    stack.target_faults(&noisy).await?;
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    let down =
        json!({"failure_rate": 0.0, "throttle_rate": 0.0, "soft_failure_rate": 0.0, "outage_secs": outage_secs as f64});
    stack.target_faults(&down).await?;
    tokio::time::sleep(Duration::from_secs(outage_secs)).await;
    let auth_secs = (outage_secs / 2).max(5);
    stack.target_faults(&json!({"outage_secs": 0.0, "auth_failure_secs": auth_secs as f64})).await?;
    tokio::time::sleep(Duration::from_secs(auth_secs)).await;
    stack.target_faults(&json!({"auth_failure_secs": 0.0})).await?;
    Ok(())
}

/// `kill -9` of a random replica every 2–4 s. A transformer or writer is killed the moment it
/// has work in flight (its in-flight gauge above 0, waiting up to 3 s): the kill lands between
/// receiving a message and acking it, where a broken ack order would lose data.
async fn random_kills(stack: &mut Stack, secs: u64, rng: &mut Rng) -> anyhow::Result<String> {
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut busy) = (0, 0);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(2000))).await;
        let role = *rng.pick(&[Role::Fetcher, Role::Transformer, Role::Writer]);
        let count = stack.replicas(role).len() as u64;
        let index = rng.below(count.max(1)) as u32;
        let in_flight = match role {
            Role::Transformer => Some("orderflow_transform_pages_in_flight"),
            Role::Writer => Some("orderflow_write_inflight"),
            _ => None,
        };
        if let (Some(name), Some(admin)) = (in_flight, stack.proc_mut(role, index).and_then(|p| p.admin)) {
            let wait_until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < wait_until {
                if crate::e2e::counter_sum(&[crate::e2e::metrics_text(stack.http(), admin).await], name) >= 1.0 {
                    busy += 1;
                    break;
                }
            }
        }
        stack.kill9(role, index).await?;
        stack.spawn_stage(role, index).await?;
        kills += 1;
    }
    Ok(format!("{kills} replicas killed, {busy} of them with work in flight"))
}

async fn broker_faults(ctl: &str, secs: u64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(secs);
    tokio::time::sleep(Duration::from_secs(4)).await;
    rabbitmqctl(ctl, &["close_all_connections", "orderflow fault suite: connections force-closed"])?;
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
    rabbitmqctl(ctl, &["stop_app"])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = rabbitmqctl(ctl, &["start_app"]);
    let _ = rabbitmqctl(ctl, &["await_startup"]);
    started?;
    sleep_until(end).await;
    rabbitmqctl(ctl, &["close_all_connections", "orderflow fault suite: connections force-closed again"])?;
    Ok(())
}

/// Publishes malformed, oversized and unknown-schema messages; returns how many dead letters they must produce.
async fn inject_bad(stack: &Stack) -> anyhow::Result<u64> {
    let client = Client::connect(&stack.broker_args(), "orderflow-fault-suite").await?;
    let injected = async {
        let topology = Topology::new(stack.options.ns.clone());
        let publisher = client.publisher().await?;
        let mut expected = 0u64;
        let mut send = |exchange: String, routing_key: &'static str, id: String, body: Vec<u8>| {
            expected += 1;
            let p = publisher.clone();
            async move { p.publish(&exchange, routing_key, &body, json_properties(&id, Default::default())).await }
        };
        let (pages, records) = (topology.pages_exchange(), topology.records_exchange());
        for i in 0..5 {
            send(pages.clone(), PAGE_ROUTING_KEY, format!("bad-page-{i}"), format!("{{not json {i}").into_bytes()).await?;
            let v9_page = json!({"schema": "orderflow.page.v9", "orders": []});
            send(pages.clone(), PAGE_ROUTING_KEY, format!("v9-page-{i}"), v9_page.to_string().into_bytes()).await?;
            send(records.clone(), RECORD_ROUTING_KEY, format!("bad-record-{i}"), vec![0xff, 0xfe, i as u8]).await?;
            let v9_record = json!({"schema": "orderflow.record.v9", "id": i});
            send(records.clone(), RECORD_ROUTING_KEY, format!("v9-record-{i}"), v9_record.to_string().into_bytes())
                .await?;
            // A page whose one order is unusable: the order is dead-lettered, the page acked.
            let broken = json!({"schema": "orderflow.page.v1", "account": "injected", "cursor": {}, "fetched_at": "x", "orders": [{"o_id": format!("X{i}"), "io_date": "not a date", "items": []}]});
            send(pages.clone(), PAGE_ROUTING_KEY, format!("broken-order-{i}"), broken.to_string().into_bytes()).await?;
        }
        send(pages.clone(), PAGE_ROUTING_KEY, "oversized-page".into(), vec![b' '; 5 * 1024 * 1024]).await?;
        let big = json!({"schema": "orderflow.record.v1", "account": "injected", "id": "big", "version": "1", "data": {"id": "big", "blob": "x".repeat(300 * 1024)}});
        send(records.clone(), RECORD_ROUTING_KEY, "oversized-record".into(), big.to_string().into_bytes()).await?;
        anyhow::Ok(expected)
    }
    .await;
    client.close().await;
    injected
}

/// Dead letters present, and how many carry no reason or no error.
async fn dead_letter_check(client: &Client, topology: &Topology) -> anyhow::Result<(u64, u64)> {
    let (mut total, mut without) = (0, 0);
    for stage in Stage::ALL {
        let queue = topology.dead_queue(stage);
        let count = client.queue_state(&queue).await?.map(|q| q.messages).unwrap_or(0);
        let reader = client.reader().await?;
        let taken = reader.take_up_to(&queue, count as usize).await;
        reader.close().await;
        for m in taken? {
            total += 1;
            let has = |key: &str| m.header_str(key).is_some_and(|v| !v.is_empty());
            if !has(header::REASON) || !has(header::ERROR) {
                without += 1;
            }
        }
    }
    Ok((total, without))
}

pub async fn run_scenario(
    n: u8,
    profile: &Profile,
    amqp_url: &str,
    bin_dir: &std::path::Path,
    seed: u64,
) -> anyhow::Result<ScenarioResult> {
    let started = Instant::now();
    let mut result = ScenarioResult { scenario: n, name: NAMES[usize::from(n - 1)], ..ScenarioResult::default() };
    // The broker reads consumer_timeout when a channel opens: set before the stages connect.
    let _ack_timeout = if n == 8 { Some(ConsumerTimeout::set(&profile.rabbitmqctl, ACK_TIMEOUT)?) } else { None };
    let mut stack = Stack::start(options(n, profile, amqp_url, bin_dir)).await?;
    let mut rng = Rng::new(seed ^ u64::from(n));
    let scripted = fault_script(n, profile, &mut stack, &mut rng, &mut result).await;
    stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
    let faults_over = Instant::now();
    let outcome = async {
        scripted.context("the fault script failed")?;
        let progress = wait_synced(n, &mut stack, &mut result).await?;
        note_crashes(&mut stack, &mut result.crashes).await?;
        result.recovery_seconds = (faults_over.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        count_orders(&stack, &progress, &mut result).await?;
        check_queues(&stack, &mut result).await?;
        result.audit = audit_check(&stack).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        result.notes.push(format!("{e:#}"));
    }
    result.passed = outcome.is_ok() && passed(n, &result);
    result.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    stack.stop().await;
    let _ = stack.delete_namespace().await;
    Ok(result)
}

/// Scenario `n`'s faults, once work has been flowing for a few seconds; its notes and the bad
/// messages it injected go into `result`.
async fn fault_script(
    n: u8,
    profile: &Profile,
    stack: &mut Stack,
    rng: &mut Rng,
    result: &mut ScenarioResult,
) -> anyhow::Result<()> {
    let secs = profile.fault_secs;
    tokio::time::sleep(Duration::from_secs(3)).await;
    match n {
        1 => tokio::time::sleep(Duration::from_secs(secs)).await,
        2 => source_storm(stack, secs).await?,
        3 => target_trouble(stack, secs, profile.outage_secs).await?,
        4 => result.notes.push(random_kills(stack, secs, rng).await?),
        5 => broker_faults(&profile.rabbitmqctl, secs).await?,
        6 => result.injected_bad = inject_bad(stack).await?,
        8 => result.notes.extend(broker_alarms(stack, profile).await?),
        _ => all_at_once(profile, stack, rng, result).await?,
    }
    Ok(())
}

/// Scenario 7: bad messages, source storms, target trouble and broker faults together, then kills,
/// then a memory alarm and a disk alarm.
async fn all_at_once(
    profile: &Profile,
    stack: &mut Stack,
    rng: &mut Rng,
    result: &mut ScenarioResult,
) -> anyhow::Result<()> {
    let secs = profile.fault_secs;
    result.injected_bad = inject_bad(stack).await?;
    let end = Instant::now() + Duration::from_secs(secs.max(profile.outage_secs + 10));
    let (a, b, c) = tokio::join!(
        source_storm(stack, secs),
        target_trouble(stack, secs, profile.outage_secs),
        broker_faults(&profile.rabbitmqctl, secs)
    );
    a?;
    b?;
    c?;
    result.notes.push(random_kills(stack, (secs / 2).max(10), rng).await?);
    sleep_until(end).await;
    // Then the broker's alarms, on a pipeline that has just been through all of the above.
    for resource in [Resource::Memory, Resource::Disk] {
        result.notes.push(one_alarm(stack, &profile.rabbitmqctl, resource, profile.alarm_secs).await?);
    }
    Ok(())
}

/// Waits until every Confirmed order is written, noting crashes meanwhile. A run that is not
/// synced by the deadline, or writes nothing for 2 minutes, ends with a note saying so.
async fn wait_synced(n: u8, stack: &mut Stack, result: &mut ScenarioResult) -> anyhow::Result<Progress> {
    let deadline = Instant::now() + Duration::from_secs(if n == 7 { 1800 } else { 600 });
    let stall = Duration::from_secs(120);
    let mut last_change = (Instant::now(), None);
    loop {
        if let Ok(p) = stack.progress().await {
            if p.synced() {
                return Ok(p);
            }
            if last_change.1 != Some((p.written_confirmed, p.target_records)) {
                last_change = (Instant::now(), Some((p.written_confirmed, p.target_records)));
            }
            if Instant::now() >= deadline {
                result.notes.push(format!("not synced in time: {p:?}"));
                return Ok(p);
            }
            if last_change.0.elapsed() >= stall {
                result.notes.push(format!("no write for {} s and not synced: {p:?}", stall.as_secs()));
                return Ok(p);
            }
        }
        note_crashes(stack, &mut result.crashes).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Orders Confirmed in the source, written, lost, and the duplicate writes `idCheck` suppressed.
async fn count_orders(stack: &Stack, progress: &Progress, result: &mut ScenarioResult) -> anyhow::Result<()> {
    let confirmed = stack.confirmed_ids().await?;
    let written = stack.written_ids().await?;
    result.orders = confirmed.len();
    result.written = progress.written_confirmed;
    result.lost = confirmed.iter().filter(|id| !written.contains(*id)).count();
    result.duplicates_suppressed = stack.target_stats().await?["stats"]["duplicates_suppressed"].as_u64().unwrap_or(0);
    Ok(())
}

/// Audits every account over the run's window (from before the oldest seeded order to now) with
/// `orderflow audit`, a few at a time, and checks each against the oracle: nothing missing, and
/// the orders the source listed are exactly the ones jst-sim has Confirmed up to the audit's end.
async fn audit_check(stack: &Stack) -> anyhow::Result<AuditCheck> {
    let started = Instant::now();
    let mut check = AuditCheck::default();
    for chunk in stack.options.account_names().chunks(8) {
        let audits = chunk.iter().map(|account| async move {
            let report = stack.audit(account, "4d", "10m").await?;
            let orders = stack.confirmed_orders(account).await?;
            anyhow::Ok((account.clone(), report, orders))
        });
        for outcome in futures_util::future::join_all(audits).await {
            let (account, report, orders) = outcome?;
            let count = |key: &str| report[key].as_u64().unwrap_or(0);
            let to = report["to"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let oracle = orders
                .iter()
                .filter(|o| {
                    let modified = o["modified"].as_str().and_then(|m| orderflow_shared::time::parse_china(m).ok());
                    modified.zip(to).is_some_and(|(m, to)| m <= to)
                })
                .count();
            check.accounts += 1;
            check.source += count("source");
            check.written += count("written");
            check.dead_lettered += count("dead_lettered");
            check.in_flight += count("in_flight");
            check.missing += count("missing");
            if count("source") != oracle as u64 || count("missing") > 0 {
                let missing: Vec<String> = report["not_written"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["status"] == "missing")
                    .take(5)
                    .map(|c| {
                        format!(
                            "{} ({})",
                            c["o_id"].as_str().unwrap_or("?"),
                            c["last"].as_str().unwrap_or("never seen")
                        )
                    })
                    .collect();
                check.disagreements.push(format!(
                    "{account}: the source listed {} orders, the oracle has {oracle} Confirmed up to {}; missing {}: {}",
                    count("source"),
                    report["to"].as_str().unwrap_or("?"),
                    count("missing"),
                    missing.join(", ")
                ));
            }
        }
    }
    check.seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    Ok(check)
}

/// Whether the work and retry queues drain (within a minute), and the dead letters with and
/// without a reason.
async fn check_queues(stack: &Stack, result: &mut ScenarioResult) -> anyhow::Result<()> {
    let client = Client::connect(&stack.broker_args(), "orderflow-fault-suite").await?;
    let topology = stack.options.stage_topology();
    let checked = async {
        result.queues_drained = drained(&client, &topology).await?;
        (result.dead_lettered, result.dead_letters_without_reason) = dead_letter_check(&client, &topology).await?;
        anyhow::Ok(())
    }
    .await;
    client.close().await;
    checked
}

/// Whether the work and retry queues are empty within a minute.
async fn drained(client: &Client, topology: &Topology) -> anyhow::Result<bool> {
    for _ in 0..120 {
        let mut depth = 0;
        for q in [topology.pages_queue(), topology.records_queue()]
            .into_iter()
            .chain(topology.retry_tiers.iter().map(|t| topology.retry_queue(*t)))
        {
            depth += client.queue_state(&q).await?.map(|s| s.messages).unwrap_or(0);
        }
        if depth == 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(false)
}

/// A scenario whose checks all ran passes when nothing crashed, nothing is lost, the queues
/// drained and every dead letter says why.
fn passed(n: u8, r: &ScenarioResult) -> bool {
    r.crashes.is_empty()
        && r.lost == 0
        && r.audit.agrees()
        && r.queues_drained
        && r.dead_letters_without_reason == 0
        && r.orders > 0
        && (r.injected_bad == 0 || r.dead_lettered >= r.injected_bad)
        // Alarms and an ack timeout are nobody's fault: nothing may end as a dead letter.
        && (n != 8 || r.dead_lettered == 0)
}

/// Every kill of the suite's own is followed at once by a restart, so any exit found here is a
/// crash it did not cause: noted (the run fails), and the replica restarted to see the run through.
async fn note_crashes(stack: &mut Stack, crashes: &mut Vec<String>) -> anyhow::Result<()> {
    while let Some((role, index, log, status)) = stack.exited() {
        crashes.push(format!("{} #{index} exited on its own ({status}); log {}", role.binary(), log.display()));
        stack.spawn_stage(role, index).await?;
    }
    Ok(())
}

pub fn table(results: &[ScenarioResult]) -> String {
    let mut out = String::from(
        "| # | scenario | orders | lost | duplicates suppressed | dead-lettered (all with reason) | audit: missing / in flight | recovery | result |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {}{} | {} / {}{} | {:.1} s | {} |\n",
            r.scenario,
            r.name,
            r.orders,
            r.lost,
            r.duplicates_suppressed,
            r.dead_lettered,
            if r.dead_letters_without_reason == 0 {
                String::new()
            } else {
                format!(" ({} WITHOUT reason)", r.dead_letters_without_reason)
            },
            r.audit.missing,
            r.audit.in_flight,
            if r.audit.agrees() { "" } else { " (DISAGREES with the oracle)" },
            r.recovery_seconds,
            if r.passed { "pass" } else { "FAIL" }
        ));
    }
    out
}

pub async fn run(args: FaultArgs, amqp_url: &str) -> anyhow::Result<bool> {
    let profile = if args.long { Profile::long() } else { Profile::short() };
    let bin_dir = args.bin_dir.clone().unwrap_or_else(crate::stack::default_bin_dir);
    let scenarios: Vec<u8> = if args.scenarios.is_empty() { (1..=8).collect() } else { args.scenarios.clone() };
    for s in &scenarios {
        anyhow::ensure!((1..=8).contains(s), "--scenario {s}: scenarios are 1 to 8");
    }
    let seed = jiff::Timestamp::now().as_second() as u64;
    let mut results = Vec::new();
    for n in scenarios {
        eprintln!("scenario {n}: {} …", NAMES[usize::from(n - 1)]);
        let r = run_scenario(n, &profile, amqp_url, &bin_dir, seed).await?;
        eprintln!(
            "scenario {n}: {} — {} orders, lost {}, {} duplicates suppressed, {} dead-lettered, recovered in {:.1} s; audit: {} listed, {} missing, {} in flight ({}){}",
            if r.passed { "pass" } else { "FAIL" },
            r.orders,
            r.lost,
            r.duplicates_suppressed,
            r.dead_lettered,
            r.recovery_seconds,
            r.audit.source,
            r.audit.missing,
            r.audit.in_flight,
            if r.audit.agrees() {
                format!("agrees with the oracle, {:.1} s", r.audit.seconds)
            } else {
                "DISAGREES with the oracle".to_string()
            },
            if r.notes.is_empty() { String::new() } else { format!(" ({})", r.notes.join("; ")) }
        );
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        }
        results.push(r);
    }
    eprintln!("\n{}", table(&results));
    let total: usize = results.iter().map(|r| r.orders).sum();
    eprintln!(
        "{} orders checked in {} scenario(s); lost: {}",
        total,
        results.len(),
        results.iter().map(|r| r.lost).sum::<usize>()
    );
    Ok(results.iter().all(|r| r.passed))
}
