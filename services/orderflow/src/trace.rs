//! `orderflow trace <id>`: one order's timeline from the ledger, across stages and replicas —
//! fetched, transformed, each write attempt with the target's answer, retry tiers, dead letters,
//! replays, written — grouped by row version (newest last). The id may be the order's o_id,
//! so_id or io_id.

use std::{collections::BTreeMap, time::Duration};

use orderflow_shared::{
    amqp::{Topology, ledger_index, ops::Client},
    ledger::{Event, What},
    time::china,
};
use serde::Serialize;

/// One event as the trace shows it: where it happened, and the event.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub stage: String,
    pub replica: String,
    #[serde(flatten)]
    pub event: Event,
}

/// One version of the order and what happened to it.
#[derive(Debug, Clone, Serialize)]
pub struct Version {
    /// The row version (`ts`, else `modified`); empty when a stage did not know it.
    pub version: String,
    pub steps: Vec<Step>,
}

/// One order the id names (an so_id can name orders of several merchants).
#[derive(Debug, Clone, Serialize)]
pub struct OrderTrace {
    pub account: String,
    pub o_id: Option<String>,
    pub so_id: Option<String>,
    pub io_id: Option<String>,
    pub versions: Vec<Version>,
    /// The last thing that happened to its newest version.
    pub state: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub id: String,
    pub account: Option<String>,
    /// RFC 3339, China time.
    pub since: String,
    pub orders: Vec<OrderTrace>,
    /// How the ledger was read: through its index, or the whole window (and why).
    pub read: ledger_index::Found,
}

/// Reads the ledger from `since` ago and gathers every event of the order(s) `id` names.
pub async fn trace(
    client: &Client,
    topology: &Topology,
    id: &str,
    account: Option<&str>,
    since: Duration,
) -> anyhow::Result<Trace> {
    let from = jiff::Timestamp::now() - jiff::SignedDuration::try_from(since)?;
    let (events, found) = ledger_index::find(client.connection(), topology, from.as_second(), id).await?;
    let steps = events
        .into_iter()
        .filter(|(_, _, event)| {
            let at_or_after = event.at.parse::<jiff::Timestamp>().is_ok_and(|at| at >= from);
            event.is_of(id) && at_or_after && account.is_none_or(|a| a == event.account)
        })
        .map(|(stage, replica, event)| Step { stage, replica, event })
        .collect();
    Ok(Trace {
        id: id.to_string(),
        account: account.map(str::to_string),
        since: orderflow_shared::time::rfc3339_china(from),
        orders: group(steps),
        read: found,
    })
}

/// Steps by order (account + o_id, or whichever id the events carry), then by version, in time.
fn group(steps: Vec<Step>) -> Vec<OrderTrace> {
    let mut orders: BTreeMap<(String, String), Vec<Step>> = BTreeMap::new();
    for step in steps {
        let e = &step.event;
        let key = e.o_id.clone().or_else(|| e.io_id.clone()).or_else(|| e.so_id.clone()).unwrap_or_default();
        orders.entry((e.account.clone(), key)).or_default().push(step);
    }
    orders
        .into_values()
        .map(|mut steps| {
            // Stable: events with the same time keep the stream's order.
            steps.sort_by_key(|s| s.event.at.parse::<jiff::Timestamp>().ok());
            let first = |pick: fn(&Event) -> &Option<String>| steps.iter().find_map(|s| pick(&s.event).clone());
            let (o_id, so_id, io_id) = (first(|e| &e.o_id), first(|e| &e.so_id), first(|e| &e.io_id));
            let account = steps.first().map(|s| s.event.account.clone()).unwrap_or_default();
            let mut versions: Vec<Version> = Vec::new();
            for step in steps {
                let version = step.event.version.clone().unwrap_or_default();
                match versions.iter_mut().find(|v| v.version == version) {
                    Some(v) => v.steps.push(step),
                    None => versions.push(Version { version, steps: vec![step] }),
                }
            }
            versions.sort_by(|a, b| version_order(&a.version, &b.version));
            let state = versions.last().and_then(|v| v.steps.last()).map(|s| describe(&s.event)).unwrap_or_default();
            OrderTrace { account, o_id, so_id, io_id, versions, state }
        })
        .collect()
}

/// Versions in order: numerically when both are integers (`ts`), else as text; an unknown
/// version (empty) first.
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<i64>(), b.parse::<i64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

/// What an event says, in a few words.
pub fn describe(event: &Event) -> String {
    match &event.what {
        What::Fetched { page, cursor } => format!("fetched (page {page} at {cursor})"),
        What::Transformed => "transformed".to_string(),
        What::Dropped { rule } => format!("dropped by the filter {rule}"),
        What::Rejected { reason } => format!("rejected: {reason}"),
        What::Attempt { attempt, status, code, message, outcome } => {
            let answer = match status {
                0 => "no answer".to_string(),
                s => format!("HTTP {s}"),
            };
            let said = match (code, message) {
                (Some(c), Some(m)) => format!(", code {c}: {m}"),
                (Some(c), None) => format!(", code {c}"),
                (None, Some(m)) => format!(": {m}"),
                (None, None) => String::new(),
            };
            format!("write failed ({outcome}), attempt {attempt}: {answer}{said}")
        }
        What::Retry { tier, attempts } => format!("sent to the {tier} retry tier after {attempts} attempt(s)"),
        What::Parked { reason } => format!("parked: {reason}"),
        What::DeadLettered { class, reason } => format!("dead-lettered ({class}): {reason}"),
        What::Replayed { to } => format!("replayed to the {to}"),
        What::Written { attempt, status, duplicate } => {
            let dup = if *duplicate { ", already there (idCheck duplicate)" } else { "" };
            format!("written, attempt {attempt}: HTTP {status}{dup}")
        }
    }
}

/// How much was read, in a few words.
fn how_read(read: &ledger_index::Found) -> String {
    let mb = |bytes: u64| bytes as f64 / 1e6;
    match read.how {
        "index" => format!(
            "{:.1} MB of index read, {} of {} batches it named found in {:.1} MB of ledger{}{}",
            mb(read.index.bytes),
            read.found,
            read.sought,
            mb(read.ledger.bytes),
            if read.gone > 0 { format!(", {} past the ledger's retention", read.gone) } else { String::new() },
            if read.superseded > 0 {
                format!(", {} never stored (appended again)", read.superseded)
            } else {
                String::new()
            },
        ),
        _ => format!("the whole window read: {} batches, {:.1} MB", read.ledger.batches, mb(read.ledger.bytes)),
    }
}

/// The trace for a person.
pub fn render(trace: &Trace) -> String {
    let mut out = String::new();
    let scope = trace.account.as_ref().map(|a| format!(" of account {a}")).unwrap_or_default();
    if trace.orders.is_empty() {
        out.push_str(&format!(
            "No trace of {}{scope} in the ledger since {} ({}).\n\
             Check the id (o_id, so_id or io_id), --account, and --since; the ledger keeps LEDGER_MAX_AGE \
             (7 days by default) and records nothing where LEDGER=off.\n",
            trace.id,
            trace.since,
            match &trace.read.why {
                Some(why) => format!("{}; {why}", how_read(&trace.read)),
                None => how_read(&trace.read),
            }
        ));
    }
    for order in &trace.orders {
        let ids: Vec<String> = [("o_id", &order.o_id), ("so_id", &order.so_id), ("io_id", &order.io_id)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k} {v}")))
            .collect();
        let events: usize = order.versions.iter().map(|v| v.steps.len()).sum();
        out.push_str(&format!(
            "Order {} · account {} — {events} events since {}\n",
            ids.join(" · "),
            order.account,
            trace.since
        ));
        for version in &order.versions {
            let label = if version.version.is_empty() { "(version not known)" } else { version.version.as_str() };
            out.push_str(&format!("  version {label}\n"));
            for step in &version.steps {
                let at = step
                    .event
                    .at
                    .parse::<jiff::Timestamp>()
                    .map(|t| t.to_zoned_datetime(china()).strftime("%Y-%m-%d %H:%M:%S%.3f").to_string())
                    .unwrap_or_else(|_| step.event.at.clone());
                out.push_str(&format!(
                    "    {at}  {:<11} {:<14} {}  [{}]\n",
                    step.stage,
                    step.event.kind(),
                    describe(&step.event),
                    step.replica
                ));
            }
        }
        out.push_str(&format!("  now: {}\n", order.state));
    }
    if let Some(why) = trace.read.why.as_ref().filter(|_| !trace.orders.is_empty()) {
        out.push_str(&format!("({}: {why})\n", how_read(&trace.read)));
    }
    if !trace.read.ledger.complete {
        out.push_str(
            "Warning: the ledger read did not reach its end (the stream went quiet): the trace may be incomplete.\n",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use orderflow_shared::amqp::ledger;

    use super::*;

    fn step(stage: &str, what: What, version: &str, at: &str) -> Step {
        let mut event = Event::new(what, "m1", "m").order(Some("7".into()), Some("SO-7".into()), None);
        event.version = Some(version.into());
        event.at = at.into();
        Step { stage: stage.into(), replica: "r".into(), event }
    }

    #[test]
    fn steps_are_grouped_by_version_newest_last_and_in_time_within_one() {
        let written = What::Written { attempt: 2, status: 200, duplicate: false };
        let failed = What::Attempt {
            attempt: 1,
            status: 200,
            code: Some("E42".into()),
            message: Some("库存不足".into()),
            outcome: "transient".into(),
        };
        let steps = vec![
            step("writer", written, "9", "2026-12-07T08:00:05Z"),
            step("fetcher", What::Fetched { page: 1, cursor: "ts:0".into() }, "10", "2026-12-07T08:00:06Z"),
            step("fetcher", What::Fetched { page: 1, cursor: "ts:0".into() }, "9", "2026-12-07T08:00:01Z"),
            step("writer", failed, "9", "2026-12-07T08:00:03Z"),
        ];
        let orders = group(steps);
        assert_eq!(orders.len(), 1);
        let order = &orders[0];
        assert_eq!((order.o_id.as_deref(), order.so_id.as_deref()), (Some("7"), Some("SO-7")));
        let versions: Vec<&str> = order.versions.iter().map(|v| v.version.as_str()).collect();
        assert_eq!(versions, ["9", "10"], "numeric order, newest last");
        let kinds: Vec<&str> = order.versions[0].steps.iter().map(|s| s.event.kind()).collect();
        assert_eq!(kinds, ["fetched", "attempt", "written"]);
        assert_eq!(order.state, "fetched (page 1 at ts:0)", "the newest version's last step");
        let text = render(&Trace {
            id: "7".into(),
            account: None,
            since: "x".into(),
            orders: orders.clone(),
            read: ledger_index::Found {
                how: "index",
                ledger: ledger::ReadSummary { complete: true, ..Default::default() },
                ..Default::default()
            },
        });
        assert!(text.contains("code E42: 库存不足") && text.contains("written, attempt 2: HTTP 200"), "{text}");
    }

    #[test]
    fn no_trace_says_so_plainly() {
        let text = render(&Trace {
            id: "404".into(),
            account: Some("m1".into()),
            since: "2026-12-06T16:00:00.000+08:00".into(),
            orders: Vec::new(),
            read: ledger_index::Found {
                how: "scan",
                why: Some("no index".into()),
                ledger: ledger::ReadSummary { complete: true, batches: 12, ..Default::default() },
                ..Default::default()
            },
        });
        assert!(text.starts_with("No trace of 404 of account m1 in the ledger since 2026-12-06T16:00"), "{text}");
    }
}
