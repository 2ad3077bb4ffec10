//! The audit: the source is asked which orders are Confirmed in a window, and each one is
//! classified from the ledger — written, dead-lettered (reason), dropped by a filter (rule), in
//! flight, or **missing**. This module is the pure part (the classification, and the messages
//! between `orderflow audit` and the fetcher that holds the account); the fetcher reads the
//! source, the CLI (or the fetcher's scheduled audit) reads the ledger.
//!
//! Requests travel through the account's job queue (see `amqp::lease`, [`REQUEST_TYPE`]), so
//! they reach the one replica that holds the account and calls the merchant within its budget;
//! answers go to the requester's reply queue.

use std::collections::HashMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use crate::amqp::lease::REQUEST_TYPE;
use crate::ledger::{Event, What};

pub const REQUEST_SCHEMA: &str = "orderflow.fetch-request.v1";
pub const REPLY_SCHEMA: &str = "orderflow.fetch-reply.v1";

/// The most ids one repair call asks for (the API's limit for `o_ids`).
pub const MAX_IDS_PER_CALL: usize = 50;

/// One order as the source listed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceOrder {
    pub o_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub so_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_id: Option<String>,
    /// The row version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// China time, as the source writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modified: Option<String>,
}

impl SourceOrder {
    /// From a raw Jushuitan row; `None` without an o_id.
    pub fn of_row(row: &serde_json::Value) -> Option<SourceOrder> {
        let ids = crate::ledger::OrderIds::of_row(row);
        Some(SourceOrder {
            o_id: ids.o_id?,
            so_id: ids.so_id,
            io_id: ids.io_id,
            ts: row.get("ts").and_then(crate::json::lenient_i64),
            modified: row.get("modified").and_then(crate::json::scalar_text),
        })
    }

    /// Whether an event's `version` is this version or a newer one: compared with `ts` when
    /// both are integers, else with `modified` as text.
    pub fn covered_by(&self, version: &str) -> bool {
        match (version.parse::<i64>(), self.ts) {
            (Ok(v), Some(ts)) => v >= ts,
            _ => self.modified.as_deref().is_some_and(|m| version >= m),
        }
    }

    fn modified_at(&self) -> Option<Timestamp> {
        crate::time::parse_china(self.modified.as_deref()?).ok()
    }
}

/// What `orderflow audit` asks the account's owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// List the orders Confirmed with `modified` in [from, to] (RFC 3339).
    Audit { from: String, to: String },
    /// Fetch these orders by id and publish them as pages (through the pipeline again).
    Repair { o_ids: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub schema: String,
    /// Unique per request (the replies' correlation id).
    pub id: String,
    pub account: String,
    #[serde(flatten)]
    pub action: Action,
}

/// What the owner answers, in order: `started`, then `orders` (chunks) and `progress` (at least
/// every [`HEARTBEAT`]), then `done` or `failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Started {
        replica: String,
    },
    Orders {
        orders: Vec<SourceOrder>,
    },
    /// Source pages read so far, and orders found.
    Progress {
        read: u64,
        orders: u64,
    },
    Done {
        /// Source pages read.
        read: u64,
        orders: u64,
        /// Repair: pages published (through the pipeline again).
        #[serde(default)]
        published: u64,
        /// Repair: ids the source did not return.
        #[serde(default)]
        not_found: Vec<String>,
        /// Audit: where the listing really ended (RFC 3339): windows close `FETCH_WINDOW_DELAY`
        /// before now, so a window ending later than that is listed up to there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<String>,
    },
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyBody {
    pub schema: String,
    pub id: String,
    #[serde(flatten)]
    pub reply: Reply,
}

/// How often the owner says it is still at work; a requester that hears nothing for several of
/// these takes the owner for gone and asks again.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the ledger says became of one source order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Finding {
    Written,
    DeadLettered {
        reason: String,
    },
    Dropped {
        rule: String,
    },
    /// Still on its way (or not fetched yet): the last thing the ledger saw of it.
    InFlight {
        last: String,
    },
    /// Nowhere: no outcome, and nothing happened to it for longer than the grace while the
    /// pipeline's queues held nothing (or the ledger never saw this version at all).
    Missing {
        last: Option<String>,
    },
}

/// How to tell in flight from missing.
#[derive(Debug, Clone, Copy)]
pub struct Settle {
    pub now: Timestamp,
    /// An order with no outcome is in flight while its last event (or, never fetched, its
    /// `modified`) is younger than this…
    pub grace: std::time::Duration,
    /// …or while the pipeline's queues hold messages.
    pub pipeline_busy: bool,
}

/// One order's finding, with its ids.
#[derive(Debug, Clone, Serialize)]
pub struct Classified {
    #[serde(flatten)]
    pub order: SourceOrder,
    #[serde(flatten)]
    pub finding: Finding,
}

/// The audit's answer for one account and window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub account: String,
    pub from: String,
    pub to: String,
    /// Orders the source lists as Confirmed in the window.
    pub source: usize,
    pub written: usize,
    pub dead_lettered: usize,
    pub dropped: usize,
    pub in_flight: usize,
    pub missing: usize,
    /// Every order that is not written, with what the ledger says.
    pub not_written: Vec<Classified>,
    /// The ledger was read to its end.
    pub ledger_complete: bool,
    /// Nothing missing, nothing in flight, and the ledger read to its end.
    pub complete: bool,
}

impl Report {
    pub fn missing_ids(&self) -> Vec<String> {
        self.not_written
            .iter()
            .filter(|c| matches!(c.finding, Finding::Missing { .. }))
            .map(|c| c.order.o_id.clone())
            .collect()
    }
}

/// Classifies every source order of `account` from the ledger `events` (any accounts, any
/// versions; the caller read them from a little before the window's start).
pub fn classify(
    account: &str,
    window: (&str, &str),
    orders: &[SourceOrder],
    events: &[Event],
    settle: Settle,
    ledger_complete: bool,
) -> Report {
    let mut by_order: HashMap<&str, Vec<&Event>> = HashMap::new();
    for event in events.iter().filter(|e| e.account == account) {
        if let Some(o_id) = event.o_id.as_deref() {
            by_order.entry(o_id).or_default().push(event);
        }
    }
    // A listing may read an order twice (a row moving between pages while windows are walked,
    // a window walked again): one finding per order, its newest version.
    let mut unique: Vec<&SourceOrder> = Vec::with_capacity(orders.len());
    let mut at: HashMap<&str, usize> = HashMap::with_capacity(orders.len());
    for order in orders {
        match at.get(order.o_id.as_str()) {
            Some(&i) if order.ts > unique[i].ts => unique[i] = order,
            Some(_) => {}
            None => {
                at.insert(&order.o_id, unique.len());
                unique.push(order);
            }
        }
    }
    let mut report = Report {
        account: account.to_string(),
        from: window.0.to_string(),
        to: window.1.to_string(),
        source: unique.len(),
        ledger_complete,
        ..Report::default()
    };
    for order in unique {
        let seen = by_order.get(order.o_id.as_str()).map(Vec::as_slice).unwrap_or_default();
        let finding = find(order, seen, settle);
        match &finding {
            Finding::Written => report.written += 1,
            Finding::DeadLettered { .. } => report.dead_lettered += 1,
            Finding::Dropped { .. } => report.dropped += 1,
            Finding::InFlight { .. } => report.in_flight += 1,
            Finding::Missing { .. } => report.missing += 1,
        }
        if finding != Finding::Written {
            report.not_written.push(Classified { order: order.clone(), finding });
        }
    }
    report.complete = report.missing == 0 && report.in_flight == 0 && ledger_complete;
    report
}

fn at(event: &Event) -> Option<Timestamp> {
    event.at.parse().ok()
}

fn summary(event: &Event) -> String {
    format!("{} at {}", event.kind(), event.at)
}

/// One order's finding from the events the ledger holds of it (every version).
fn find(order: &SourceOrder, seen: &[&Event], settle: Settle) -> Finding {
    let covers = |e: &&&Event| e.version.as_deref().is_some_and(|v| order.covered_by(v));
    if seen.iter().filter(covers).any(|e| matches!(e.what, What::Written { .. })) {
        return Finding::Written;
    }
    let young = |t: Option<Timestamp>| {
        t.is_some_and(|t| settle.now.duration_since(t).unsigned_abs() < settle.grace || t > settle.now)
    };
    // The newest thing that happened to this version (or a newer one).
    let last = seen.iter().filter(covers).max_by_key(|e| at(e));
    let Some(last) = last else {
        // This version never reached the ledger. Modified just now: not fetched yet.
        if young(order.modified_at()) || settle.pipeline_busy {
            return Finding::InFlight { last: "not fetched yet".into() };
        }
        return Finding::Missing { last: seen.iter().max_by_key(|e| at(e)).map(|e| summary(e)) };
    };
    match &last.what {
        What::DeadLettered { reason, .. } => Finding::DeadLettered { reason: reason.clone() },
        What::Rejected { reason } => Finding::DeadLettered { reason: reason.clone() },
        What::Dropped { rule } => Finding::Dropped { rule: rule.clone() },
        _ if settle.pipeline_busy || young(at(last)) => Finding::InFlight { last: summary(last) },
        _ => Finding::Missing { last: Some(summary(last)) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::What;

    fn order(o_id: &str, ts: i64) -> SourceOrder {
        SourceOrder {
            o_id: o_id.into(),
            so_id: None,
            io_id: None,
            ts: Some(ts),
            modified: Some("2026-12-01 09:00:00".into()),
        }
    }

    fn event(o_id: &str, version: i64, what: What, at: &str) -> Event {
        let mut e = Event::new(what, "m1", format!("m1:{o_id}:{version}")).order(Some(o_id.into()), None, None);
        e.version = Some(version.to_string());
        e.at = at.into();
        e
    }

    fn settle(now: &str, busy: bool) -> Settle {
        Settle { now: now.parse().expect("time"), grace: std::time::Duration::from_secs(600), pipeline_busy: busy }
    }

    #[test]
    fn every_source_order_gets_the_ledgers_finding() {
        let written = What::Written { attempt: 1, status: 200, duplicate: false };
        let orders = [order("1", 5), order("2", 5), order("3", 5), order("4", 5), order("5", 5), order("6", 9)];
        let events = vec![
            event("1", 5, What::Transformed, "2026-12-01T02:00:01Z"),
            event("1", 5, written.clone(), "2026-12-01T02:00:02Z"),
            event(
                "2",
                5,
                What::DeadLettered { class: "permanent".into(), reason: "target_rejected".into() },
                "2026-12-01T02:00:02Z",
            ),
            event("3", 5, What::Dropped { rule: "status in [Cancelled]".into() }, "2026-12-01T02:00:02Z"),
            // Lost downstream: transformed, then nothing for hours.
            event("4", 5, What::Transformed, "2026-12-01T02:00:02Z"),
            // 5: never seen. 6: an older version written, the current one never fetched.
            event("6", 8, written.clone(), "2026-12-01T02:00:02Z"),
            // Another account's order 5 says nothing about m1's.
            Event { account: "m2".into(), ..event("5", 5, written, "2026-12-01T02:00:02Z") },
        ];
        let report = classify("m1", ("a", "b"), &orders, &events, settle("2026-12-01T06:00:00Z", false), true);
        assert_eq!(
            (report.source, report.written, report.dead_lettered, report.dropped, report.in_flight, report.missing),
            (6, 1, 1, 1, 0, 3)
        );
        assert_eq!(report.missing_ids(), ["4", "5", "6"]);
        assert!(!report.complete);
        let four = report.not_written.iter().find(|c| c.order.o_id == "4").expect("4");
        assert_eq!(four.finding, Finding::Missing { last: Some("transformed at 2026-12-01T02:00:02Z".into()) });
        // The same, a minute after the transform, or while the queues hold messages: in flight.
        let soon = classify("m1", ("a", "b"), &orders, &events, settle("2026-12-01T02:01:00Z", false), true);
        assert_eq!((soon.in_flight, soon.missing), (1, 2), "4 is young; 5 and 6 were never fetched");
        let busy = classify("m1", ("a", "b"), &orders, &events, settle("2026-12-01T06:00:00Z", true), true);
        assert_eq!((busy.in_flight, busy.missing), (3, 0), "queues holding messages: nothing is called missing");
        // A listing that read an order twice (a row moving between pages) counts it once.
        let twice: Vec<SourceOrder> = orders.iter().cloned().chain([order("1", 5), order("4", 5)]).collect();
        let deduped = classify("m1", ("a", "b"), &twice, &events, settle("2026-12-01T06:00:00Z", false), true);
        assert_eq!((deduped.source, deduped.written, deduped.missing), (6, 1, 3));
    }

    #[test]
    fn a_newer_version_written_covers_the_one_the_source_listed_and_a_replay_reopens_a_dead_letter() {
        let written = What::Written { attempt: 1, status: 200, duplicate: true };
        let dead = What::DeadLettered { class: "exhausted".into(), reason: "exhausted".into() };
        let orders = [order("1", 5), order("2", 5)];
        let events = vec![
            event("1", 7, written, "2026-12-01T02:00:02Z"),
            event("2", 5, dead, "2026-12-01T02:00:02Z"),
            event("2", 5, What::Replayed { to: "writer".into() }, "2026-12-01T02:05:00Z"),
        ];
        let report = classify("m1", ("a", "b"), &orders, &events, settle("2026-12-01T02:06:00Z", false), true);
        assert_eq!((report.written, report.in_flight), (1, 1), "{report:?}");
        let modified_only = SourceOrder { ts: None, modified: Some("2026-12-01 10:00:00".into()), ..order("9", 0) };
        assert!(modified_only.covered_by("2026-12-01 10:00:00") && !modified_only.covered_by("2026-12-01 09:59:59"));
    }

    #[test]
    fn requests_and_replies_have_a_stable_shape() {
        let request = Request {
            schema: REQUEST_SCHEMA.into(),
            id: "r1".into(),
            account: "m1".into(),
            action: Action::Repair { o_ids: vec!["1".into()] },
        };
        let json = serde_json::to_value(&request).expect("json");
        assert_eq!((json["action"].as_str(), json["o_ids"][0].as_str()), (Some("repair"), Some("1")));
        let reply =
            ReplyBody { schema: REPLY_SCHEMA.into(), id: "r1".into(), reply: Reply::Progress { read: 3, orders: 150 } };
        let json = serde_json::to_value(&reply).expect("json");
        assert_eq!((json["kind"].as_str(), json["read"].as_u64()), (Some("progress"), Some(3)));
        let back: ReplyBody = serde_json::from_value(json).expect("parses");
        assert_eq!(back, reply);
    }
}
