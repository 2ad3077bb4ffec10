//! `orderflow status`: every queue's depth, consumers and rate, every account's cursor and lag;
//! exits non-zero when something is stuck, so monitoring can call it.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use jiff::Timestamp;
use lapin::{Connection, options::BasicGetOptions};
use orderflow_shared::amqp::{Stage, Topology};
use serde::Serialize;
use serde_json::Value;

use crate::broker::queue_state;

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
async fn accounts(connection: &Connection, topology: &Topology) -> anyhow::Result<Vec<Value>> {
    let queue = topology.fetch_status_queue();
    let Some(state) = queue_state(connection, &queue).await? else { return Ok(Vec::new()) };
    let channel = connection.create_channel().await?;
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    for _ in 0..state.messages {
        let Some(m) = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await? else { break };
        let Ok(v) = serde_json::from_slice::<Value>(&m.delivery.data) else { continue };
        let Some(account) = v["account"].as_str().map(str::to_string) else { continue };
        let newer = latest.get(&account).is_none_or(|old| old["updated_at"].as_str() <= v["updated_at"].as_str());
        if newer {
            latest.insert(account, v);
        }
    }
    let _ = channel.close(200, "done".into()).await;
    Ok(latest.into_values().collect())
}

pub async fn report(
    connection: &Connection,
    topology: &Topology,
    max_lag: Duration,
    sample: Duration,
) -> anyhow::Result<Report> {
    let names = queues_of(topology);
    let mut first = Vec::new();
    for (name, _) in &names {
        first.push(queue_state(connection, name).await?);
    }
    let t0 = Instant::now();
    tokio::time::sleep(sample).await;
    let mut queues = Vec::new();
    let mut problems = Vec::new();
    for ((name, role), before) in names.into_iter().zip(first) {
        let Some(now) = queue_state(connection, &name).await? else {
            problems.push(format!("{name} does not exist (run `orderflow topology --declare`, or start a service)"));
            continue;
        };
        let change = before
            .map(|b| (f64::from(now.messages) - f64::from(b.messages)) / t0.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        if role == "dead" && now.messages > 0 {
            problems.push(format!("{} dead letters in {name} (see `orderflow dlq stats`)", now.messages));
        }
        if role == "work" && now.messages > 0 && now.consumers == 0 {
            problems.push(format!("{name} holds {} messages and has no consumer", now.messages));
        }
        queues.push(QueueRow {
            name,
            role,
            messages: now.messages,
            consumers: now.consumers,
            depth_change_per_sec: (change * 10.0).round() / 10.0,
        });
    }
    let now_ms = Timestamp::now().as_millisecond();
    let mut rows = Vec::new();
    for v in accounts(connection, topology).await? {
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
        rows.push(AccountRow {
            account,
            seq: v["seq"].as_u64().unwrap_or(0),
            caught_up: v["caught_up"].as_bool().unwrap_or(false),
            lag_seconds: lag.map(|l| (l * 10.0).round() / 10.0),
            last_pass_age_seconds: age.map(|a| (a * 10.0).round() / 10.0),
            orders_total: v["orders_total"].as_u64().unwrap_or(0),
            cursor: v["cursor"].clone(),
            stopped,
        });
    }
    Ok(Report { namespace: topology.ns.clone(), healthy: problems.is_empty(), queues, accounts: rows, problems })
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
        "\n{:<16} {:>6} {:>10} {:>9} {:>12} {:>10}\n",
        "account", "passes", "caught up", "lag s", "last pass s", "orders"
    ));
    if r.accounts.is_empty() {
        out.push_str("(no fetcher has reported a pass yet)\n");
    }
    for a in &r.accounts {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<16} {:>6} {:>10} {:>9} {:>12} {:>10}{}\n",
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
