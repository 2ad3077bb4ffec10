//! `orderflow audit --account A --from T1 --to T2 [--repair]`: asks the fetcher that holds the
//! account which orders the source has Confirmed in the window (within the account's audit share
//! of its rate budget), reads the ledger, and classifies every one: written, dead-lettered
//! (reason), dropped by a filter (rule), in flight, or missing. `--repair` has the same fetcher
//! fetch the missing orders by id and push them through the pipeline again.

use std::time::Duration;

use anyhow::Context;
use jiff::{SignedDuration, Timestamp};
use orderflow_shared::{
    amqp::{Topology, ledger, ops::Client},
    audit::{self, Action, REQUEST_SCHEMA, REQUEST_TYPE, Reply, ReplyBody, Report, Request, Settle, SourceOrder},
    time::rfc3339_china,
};
use serde::Serialize;

/// A time as the operator gives it: RFC 3339 with its zone, a China-time `yyyy-MM-dd[ HH:mm:ss]`,
/// `now`, or a duration back from now (`24h`, `7d`).
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    let t = text.trim();
    if t == "now" {
        return Ok(Timestamp::now());
    }
    if let Ok(ts) = t.parse::<Timestamp>() {
        return Ok(ts);
    }
    if let Ok(ts) = orderflow_shared::time::parse_china(t) {
        return Ok(ts);
    }
    match orderflow_shared::settings::parse_duration(t) {
        Ok(ago) => SignedDuration::try_from(ago)
            .ok()
            .and_then(|ago| Timestamp::now().checked_sub(ago).ok())
            .ok_or_else(|| format!("{text:?} reaches too far back")),
        Err(_) => Err(format!(
            "{text:?} is not a time: give RFC 3339 (2026-12-06T00:00:00+08:00), China time (2026-12-06 00:00:00), now, or a duration back (24h)"
        )),
    }
}

/// What one request to the account's owner brought back.
#[derive(Debug, Default)]
pub struct Answer {
    pub orders: Vec<SourceOrder>,
    pub read: u64,
    pub published: u64,
    pub not_found: Vec<String>,
    pub replica: String,
    /// Where the listing ended, when earlier than asked.
    pub until: Option<String>,
}

/// How long to wait for the owner.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    /// For the first answer (the owner takes requests between passes: up to FETCH_PASS_TIME).
    pub start: Duration,
    /// Between answers once started (the owner sends one at least every `audit::HEARTBEAT`).
    pub quiet: Duration,
    /// Times a request whose owner fell silent is asked again (the account moved).
    pub tries: u32,
}

impl Default for Patience {
    fn default() -> Self {
        Patience { start: Duration::from_secs(180), quiet: audit::HEARTBEAT * 6, tries: 3 }
    }
}

/// Asks the account's owner (through its job queue) and gathers the answers.
pub async fn ask(
    client: &Client,
    topology: &Topology,
    account: &str,
    action: Action,
    patience: Patience,
    progress: bool,
) -> anyhow::Result<Answer> {
    let queue = topology.fetch_queue(account);
    let mut replies = client.replies().await?;
    let mut last_error = String::new();
    for attempt in 1..=patience.tries.max(1) {
        let id = format!("{account}:{}:{}", orderflow_shared::messages::now_ms(), fastrand::u64(..));
        let request =
            Request { schema: REQUEST_SCHEMA.into(), id: id.clone(), account: account.into(), action: action.clone() };
        client.request(&queue, REQUEST_TYPE, &id, &serde_json::to_vec(&request)?, replies.queue()).await.with_context(
            || {
                format!(
                    "account {account} has no job queue: is it configured in a fetcher of namespace {}?",
                    topology.ns
                )
            },
        )?;
        match gather(&mut replies, &id, patience, progress).await {
            Ok(answer) => {
                replies.close().await;
                return Ok(answer);
            }
            Err(Gathered::Retry(why)) => {
                if progress {
                    eprintln!("{why}; asking again ({attempt}/{})", patience.tries);
                }
                last_error = why;
            }
            Err(Gathered::Fatal(error)) => {
                replies.close().await;
                return Err(error);
            }
        }
    }
    replies.close().await;
    anyhow::bail!("account {account}: {last_error} (after {} tries)", patience.tries)
}

enum Gathered {
    /// The owner fell silent or let the account go: ask again.
    Retry(String),
    Fatal(anyhow::Error),
}

async fn gather(
    replies: &mut orderflow_shared::amqp::ops::Replies,
    id: &str,
    patience: Patience,
    progress: bool,
) -> Result<Answer, Gathered> {
    let mut answer = Answer::default();
    let mut started = false;
    loop {
        let wait = if started { patience.quiet } else { patience.start };
        let body = match replies.next(wait).await {
            Ok(Some(body)) => body,
            Ok(None) if started => return Err(Gathered::Retry(format!("the fetcher {} fell silent", answer.replica))),
            Ok(None) => {
                return Err(Gathered::Fatal(anyhow::anyhow!(
                    "no fetcher answered within {:?}: is a fetcher running that holds this account (`orderflow status`)?",
                    patience.start
                )));
            }
            Err(error) => return Err(Gathered::Fatal(error)),
        };
        let Ok(reply) = serde_json::from_slice::<ReplyBody>(&body) else { continue };
        if reply.id != id {
            continue; // an answer to an earlier try
        }
        match reply.reply {
            Reply::Started { replica } => {
                started = true;
                if progress {
                    eprintln!("fetcher {replica} holds the account and is asking the source");
                }
                answer.replica = replica;
            }
            Reply::Orders { orders } => answer.orders.extend(orders),
            Reply::Progress { read, orders } => {
                if progress {
                    eprintln!("  {read} source pages read, {orders} orders");
                }
            }
            Reply::Done { read, published, not_found, until, .. } => {
                answer.read = read;
                answer.published = published;
                answer.not_found = not_found;
                answer.until = until;
                return Ok(answer);
            }
            Reply::Failed { error } if error.contains("ask again") => return Err(Gathered::Retry(error)),
            Reply::Failed { error } => return Err(Gathered::Fatal(anyhow::anyhow!("the fetcher could not: {error}"))),
        }
    }
}

/// The ledger is read from this long before the window: an order's events come after its
/// `modified`, give or take the machines' clocks.
const LEDGER_MARGIN: Duration = Duration::from_secs(600);

/// Everything an audit found (and what a repair did).
#[derive(Debug, Serialize)]
pub struct Outcome {
    #[serde(flatten)]
    pub report: Report,
    /// Source pages read for the window.
    pub source_pages: u64,
    pub replica: String,
    /// Ledger batches read, and bytes.
    pub ledger: ledger::ReadSummary,
    pub repair: Option<Repaired>,
}

#[derive(Debug, Serialize)]
pub struct Repaired {
    pub asked: usize,
    pub published_pages: u64,
    pub not_found: Vec<String>,
}

pub struct AuditOptions {
    pub account: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub grace: Duration,
    pub repair: bool,
    pub patience: Patience,
    pub progress: bool,
}

pub async fn audit(client: &Client, topology: &Topology, options: &AuditOptions) -> anyhow::Result<Outcome> {
    anyhow::ensure!(options.from < options.to, "--from must be before --to");
    // The source takes whole seconds: the window is [from, to] to the second.
    let second = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap_or(t);
    let (from, asked_to) = (rfc3339_china(second(options.from)), rfc3339_china(second(options.to)));
    let action = Action::Audit { from: from.clone(), to: asked_to.clone() };
    let answer = ask(client, topology, &options.account, action, options.patience, options.progress).await?;
    // The source is listed up to FETCH_WINDOW_DELAY before now at most: say where it really ended.
    let to = answer
        .until
        .clone()
        .filter(|u| u.parse::<Timestamp>().is_ok_and(|u| u < second(options.to)))
        .unwrap_or(asked_to);
    let since = options.from.as_second() - LEDGER_MARGIN.as_secs() as i64;
    let needle = format!("\"account\":{}", serde_json::to_string(&options.account)?).into_bytes();
    let mut events = Vec::new();
    let read = ledger::read_events(client.connection(), topology, since, &[needle], |_, _, event| {
        if event.account == options.account && event.o_id.is_some() {
            events.push(event);
        }
    })
    .await?;
    let settle = Settle {
        now: Timestamp::now(),
        grace: options.grace,
        pipeline_busy: orderflow_shared::amqp::ops::pipeline_busy(client.connection(), topology).await?,
    };
    let report = audit::classify(&options.account, (&from, &to), &answer.orders, &events, settle, read.complete);
    let mut outcome =
        Outcome { report, source_pages: answer.read, replica: answer.replica, ledger: read, repair: None };
    let missing = outcome.report.missing_ids();
    if options.repair && !missing.is_empty() {
        let action = Action::Repair { o_ids: missing.clone() };
        let done = ask(client, topology, &options.account, action, options.patience, options.progress).await?;
        outcome.repair =
            Some(Repaired { asked: missing.len(), published_pages: done.published, not_found: done.not_found });
    }
    Ok(outcome)
}

/// The report for a person.
pub fn render(outcome: &Outcome) -> String {
    let r = &outcome.report;
    let mut out = format!(
        "Audit of account {} from {} to {}: {} orders Confirmed at the source ({} pages read by {})\n",
        r.account, r.from, r.to, r.source, outcome.source_pages, outcome.replica
    );
    for (label, n) in [
        ("written", r.written),
        ("dead-lettered", r.dead_lettered),
        ("dropped by a filter", r.dropped),
        ("in flight", r.in_flight),
        ("missing", r.missing),
    ] {
        out.push_str(&format!("  {label:<20} {n:>8}\n"));
    }
    let mut section = |title: &str, pick: &dyn Fn(&audit::Finding) -> Option<String>| {
        let rows: Vec<String> = r
            .not_written
            .iter()
            .filter_map(|c| pick(&c.finding).map(|why| format!("    {:<14} {why}\n", c.order.o_id)))
            .collect();
        if !rows.is_empty() {
            out.push_str(&format!("  {title}:\n"));
            for row in rows.iter().take(50) {
                out.push_str(row);
            }
            if rows.len() > 50 {
                out.push_str(&format!("    … and {} more (--json lists them all)\n", rows.len() - 50));
            }
        }
    };
    section("missing (o_id, last seen)", &|f| match f {
        audit::Finding::Missing { last } => Some(last.clone().unwrap_or_else(|| "never seen by the ledger".into())),
        _ => None,
    });
    section("dead-lettered (o_id, reason)", &|f| match f {
        audit::Finding::DeadLettered { reason } => Some(reason.clone()),
        _ => None,
    });
    section("dropped (o_id, rule)", &|f| match f {
        audit::Finding::Dropped { rule } => Some(rule.clone()),
        _ => None,
    });
    section("in flight (o_id, last seen)", &|f| match f {
        audit::Finding::InFlight { last } => Some(last.clone()),
        _ => None,
    });
    if !r.ledger_complete {
        out.push_str("  Warning: the ledger read did not reach its end: findings may be incomplete.\n");
    }
    match (&outcome.repair, r.complete) {
        (Some(repair), _) => out.push_str(&format!(
            "Repair: asked the source for {} orders; {} page(s) published through the pipeline; {} not found at the source{}.\n\
             Run the audit again once they are written (usually within a minute).\n",
            repair.asked,
            repair.published_pages,
            repair.not_found.len(),
            if repair.not_found.is_empty() { String::new() } else { format!(" ({})", repair.not_found.join(", ")) }
        )),
        (None, true) => out.push_str("Complete: every Confirmed order is accounted for.\n"),
        (None, false) if r.missing > 0 => out.push_str("Not complete: --repair fetches the missing orders again.\n"),
        (None, false) => out.push_str("Not complete: orders are still in flight; audit again later.\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_taken_as_operators_write_them() {
        let rfc = parse_time("2026-12-06T00:00:00+08:00").expect("rfc 3339");
        assert_eq!(rfc.to_string(), "2026-12-05T16:00:00Z");
        assert_eq!(parse_time("2026-12-06 00:00:00"), Ok(rfc), "China time");
        let ago = parse_time("24h").expect("a duration back");
        let expected = Timestamp::now().as_second() - 86_400;
        assert!((ago.as_second() - expected).abs() <= 2);
        assert!(parse_time("yesterday").expect_err("not a time").contains("RFC 3339"));
    }
}
