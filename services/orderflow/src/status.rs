//! `orderflow status`: every queue's depth, consumers and rate, every account's cursor and lag;
//! exits non-zero when something is stuck, so monitoring can call it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use orderflow_shared::amqp::{
    Stage, Topology,
    ops::{Client, QueueState},
};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub name: String,
    pub role: &'static str,
    pub messages: u32,
    pub consumers: u32,
    /// Change in depth per second over the sampling interval (negative: draining).
    pub depth_change_per_sec: f64,
}

#[derive(Debug, Serialize)]
pub struct AccountRow {
    pub account: String,
    pub seq: u64,
    pub caught_up: bool,
    pub lag_seconds: Option<f64>,
    pub last_pass_age_seconds: Option<f64>,
    pub orders_total: u64,
    pub cursor: Value,
    pub stopped: Option<String>,
    /// The fetcher's last scheduled audit of the account (FETCH_AUDIT_EVERY), when there is one.
    pub audit: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub namespace: String,
    pub queues: Vec<QueueRow>,
    pub accounts: Vec<AccountRow>,
    pub problems: Vec<String>,
    pub healthy: bool,
}

fn queues_of(topology: &Topology) -> Vec<(String, &'static str)> {
    let mut q = vec![(topology.pages_queue(), "work"), (topology.records_queue(), "work")];
    for tier in &topology.retry_tiers {
        q.push((topology.retry_queue(*tier), "retry"));
    }
    for stage in Stage::ALL {
        q.push((topology.dead_queue(stage), "dead"));
    }
    q
}

/// The newest status of every account (from `<ns>.fetch.status`, read without removing anything).
async fn accounts(client: &Client, topology: &Topology) -> anyhow::Result<Vec<Value>> {
    let queue = topology.fetch_status_queue();
    let Some(state) = client.queue_state(&queue).await? else { return Ok(Vec::new()) };
    let reader = client.reader().await?;
    let taken = reader.take_up_to(&queue, state.messages as usize).await;
    reader.close().await;
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    for m in taken? {
        let Ok(v) = serde_json::from_slice::<Value>(&m.body) else { continue };
        let Some(account) = v["account"].as_str().map(str::to_string) else { continue };
        let newer = latest.get(&account).is_none_or(|old| old["updated_at"].as_str() <= v["updated_at"].as_str());
        if newer {
            latest.insert(account, v);
        }
    }
    Ok(latest.into_values().collect())
}

pub async fn report(
    client: &Client,
    topology: &Topology,
    max_lag: Duration,
    sample: Duration,
) -> anyhow::Result<Report> {
    let mut problems = Vec::new();
    let queues = sample_queues(client, topology, sample, &mut problems).await?;
    let now_ms = Timestamp::now().as_millisecond();
    let accounts = accounts(client, topology).await?;
    let accounts = accounts.iter().map(|v| account_row(v, now_ms, max_lag, &mut problems)).collect();
    Ok(Report { namespace: topology.ns.clone(), healthy: problems.is_empty(), queues, accounts, problems })
}

/// Every queue's state now and `sample` later: depths, consumers and rates, and the problems seen.
async fn sample_queues(
    client: &Client,
    topology: &Topology,
    sample: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<Vec<QueueRow>> {
    let names = queues_of(topology);
    let mut first = Vec::new();
    for (name, _) in &names {
        first.push(client.queue_state(name).await?);
    }
    let t0 = Instant::now();
    tokio::time::sleep(sample).await;
    let mut queues = Vec::new();
    for ((name, role), before) in names.into_iter().zip(first) {
        let Some(now) = client.queue_state(&name).await? else {
            problems.push(format!("{name} does not exist (run `orderflow topology --declare`, or start a service)"));
            continue;
        };
        queues.push(queue_row(name, role, before, now, t0.elapsed(), problems));
    }
    Ok(queues)
}

fn queue_row(
    name: String,
    role: &'static str,
    before: Option<QueueState>,
    now: QueueState,
    elapsed: Duration,
    problems: &mut Vec<String>,
) -> QueueRow {
    let change =
        before.map(|b| (f64::from(now.messages) - f64::from(b.messages)) / elapsed.as_secs_f64()).unwrap_or(0.0);
    if role == "dead" && now.messages > 0 {
        problems.push(format!("{} dead letters in {name} (see `orderflow dlq stats`)", now.messages));
    }
    if role == "work" && now.messages > 0 && now.consumers == 0 {
        problems.push(format!("{name} holds {} messages and has no consumer", now.messages));
    }
    QueueRow {
        name,
        role,
        messages: now.messages,
        consumers: now.consumers,
        depth_change_per_sec: (change * 10.0).round() / 10.0,
    }
}

/// One account's row from its newest status, and the problems it shows.
fn account_row(v: &Value, now_ms: i64, max_lag: Duration, problems: &mut Vec<String>) -> AccountRow {
    let account = v["account"].as_str().unwrap_or_default().to_string();
    let age = v["updated_at"]
        .as_str()
        .and_then(|s| s.parse::<Timestamp>().ok())
        .map(|t| (now_ms - t.as_millisecond()).max(0) as f64 / 1000.0);
    let stopped = v["stopped"].as_str().map(str::to_string);
    let lag = v["lag_seconds"].as_f64().map(|l| l + age.unwrap_or(0.0));
    if let Some(reason) = &stopped {
        problems.push(format!("account {account} is stopped: {reason}"));
    }
    if let Some(lag) = lag.filter(|l| *l > max_lag.as_secs_f64()) {
        problems.push(format!("account {account} is {lag:.0} s behind the source"));
    }
    if let Some(age) = age.filter(|a| *a > max_lag.as_secs_f64()) {
        problems.push(format!("account {account} has not completed a pass for {age:.0} s (is a fetcher running?)"));
    }
    let audit = v.get("audit").filter(|a| !a.is_null()).cloned();
    if let Some(missing) = audit.as_ref().and_then(|a| a["missing"].as_u64()).filter(|m| *m > 0) {
        let window = audit
            .as_ref()
            .map(|a| format!("{} to {}", a["from"].as_str().unwrap_or("?"), a["to"].as_str().unwrap_or("?")));
        problems.push(format!(
            "account {account}: the last audit ({}) found {missing} Confirmed orders nowhere in the pipeline \
             (`orderflow audit --account {account} --from … --repair`)",
            window.unwrap_or_default()
        ));
    }
    AccountRow {
        account,
        seq: v["seq"].as_u64().unwrap_or(0),
        caught_up: v["caught_up"].as_bool().unwrap_or(false),
        lag_seconds: lag.map(|l| (l * 10.0).round() / 10.0),
        last_pass_age_seconds: age.map(|a| (a * 10.0).round() / 10.0),
        orders_total: v["orders_total"].as_u64().unwrap_or(0),
        cursor: v["cursor"].clone(),
        stopped,
        audit,
    }
}

pub fn render(r: &Report) -> String {
    let mut out = format!(
        "namespace {}\n\n{:<44} {:>6} {:>9} {:>10} {:>8}\n",
        r.namespace, "queue", "role", "messages", "consumers", "Δ/s"
    );
    for q in &r.queues {
        out.push_str(&format!(
            "{:<44} {:>6} {:>9} {:>10} {:>8.1}\n",
            q.name, q.role, q.messages, q.consumers, q.depth_change_per_sec
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:>6} {:>10} {:>9} {:>12} {:>10}  {}\n",
        "account", "passes", "caught up", "lag s", "last pass s", "orders", "last audit"
    ));
    if r.accounts.is_empty() {
        out.push_str("(no fetcher has reported a pass yet)\n");
    }
    for a in &r.accounts {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        let audit = match &a.audit {
            None => "-".to_string(),
            Some(v) if v["complete"] == true => format!("complete to {}", v["to"].as_str().unwrap_or("?")),
            Some(v) => format!(
                "{} missing, {} in flight (to {})",
                v["missing"].as_u64().unwrap_or(0),
                v["in_flight"].as_u64().unwrap_or(0),
                v["to"].as_str().unwrap_or("?")
            ),
        };
        out.push_str(&format!(
            "{:<16} {:>6} {:>10} {:>9} {:>12} {:>10}  {audit}{}\n",
            a.account,
            a.seq,
            a.caught_up,
            opt(a.lag_seconds),
            opt(a.last_pass_age_seconds),
            a.orders_total,
            a.stopped.as_ref().map(|s| format!("  STOPPED: {s}")).unwrap_or_default()
        ));
    }
    if r.problems.is_empty() {
        out.push_str("\nhealthy\n");
    } else {
        out.push_str("\nproblems:\n");
        for p in &r.problems {
            out.push_str(&format!("  - {p}\n"));
        }
    }
    out
}
