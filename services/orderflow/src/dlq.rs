//! `orderflow dlq`: look at dead letters and move them back safely.
//!
//! Reading never removes anything: messages are taken unacked and go back to the queue when the
//! channel closes. A replay makes one pass over the messages present when it starts (so it cannot
//! loop), publishes each matching message to its origin (confirmed) and only then acks it; a
//! message whose publish or ack did not complete stays in (or returns to) the dead queue.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, Subcommand};
use jiff::Timestamp;
use lapin::{
    BasicProperties, Connection,
    options::{BasicAckOptions, BasicGetOptions},
};
use orderflow_shared::{
    amqp::{
        Publisher, Stage, Topology,
        headers::{clip, get_i64, get_str, headers_of, set_i64, set_str, strip_broker_death_headers},
    },
    messages::header,
    settings::parse_duration,
};
use serde::Serialize;
use serde_json::{Value, json};

use crate::broker::queue_state;

#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Per stage: dead letters, top reasons and error classes, oldest age.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters (headers, reason, attempts, replays, a body excerpt) without removing them.
    Peek {
        #[arg(long, value_enum)]
        stage: Stage,
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Move matching dead letters back to where they came from.
    Replay(ReplayArgs),
    /// Delete matching dead letters (needs --yes).
    Purge {
        #[arg(long, value_enum)]
        stage: Stage,
        /// Only dead letters with this reason (x-orderflow-reason).
        #[arg(long)]
        reason: Option<String>,
        /// Only dead letters older than this (e.g. 7d).
        #[arg(long, value_parser = parse_duration)]
        older_than: Option<Duration>,
        /// Really delete.
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    #[arg(long, value_enum)]
    pub stage: Stage,
    /// Only dead letters with this reason (x-orderflow-reason, e.g. target_rejected).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only these ids (record id, order id, or message id); repeatable.
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Only dead letters dead-lettered since this time (a datetime, or a duration ago such as 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Replay at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// At most this many replays per second (0.01 to 100000).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replay even messages already replayed more than --max-replays times.
    #[arg(long)]
    pub force: bool,
    /// Messages replayed more often than this are refused without --force (a poison message).
    #[arg(long, default_value_t = 3)]
    pub max_replays: i64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A dead letter as read from its queue.
#[derive(Debug, Clone)]
pub struct DeadLetterView {
    pub tag: u64,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl DeadLetterView {
    fn h(&self, key: &str) -> Option<String> {
        get_str(&self.properties, key)
    }
    pub fn reason(&self) -> String {
        self.h(header::REASON).unwrap_or_else(|| "unknown".into())
    }
    pub fn class(&self) -> String {
        self.h(header::ERROR_CLASS).unwrap_or_else(|| "unknown".into())
    }
    pub fn replays(&self) -> i64 {
        get_i64(&self.properties, header::REPLAYS).unwrap_or(0)
    }
    pub fn dead_at_ms(&self) -> Option<i64> {
        get_i64(&self.properties, header::DEAD_AT_MS)
    }
    pub fn message_id(&self) -> String {
        self.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default()
    }
    /// Every id a person might use for this message: message id, order id, record id, page order ids.
    pub fn ids(&self) -> Vec<String> {
        let mut ids = vec![self.message_id()];
        ids.extend(self.h(header::ORDER_ID));
        if let Ok(body) = serde_json::from_slice::<Value>(&self.body) {
            ids.extend(body.get("id").and_then(orderflow_shared::json::scalar_text));
            for order in body.get("orders").and_then(Value::as_array).into_iter().flatten() {
                ids.extend(order.get("o_id").and_then(orderflow_shared::json::scalar_text));
            }
        }
        ids
    }

    pub fn describe(&self, now_ms: i64) -> Value {
        json!({
            "message_id": self.message_id(),
            "reason": self.reason(),
            "class": self.class(),
            "error": self.h(header::ERROR),
            "attempts": get_i64(&self.properties, header::ATTEMPT),
            "replays": self.replays(),
            "stage": self.h(header::STAGE),
            "origin": {"exchange": self.h(header::ORIGIN_EXCHANGE), "routing_key": self.h(header::ORIGIN_ROUTING_KEY)},
            "age_seconds": self.dead_at_ms().map(|at| (now_ms - at).max(0) / 1000),
            "order_id": self.h(header::ORDER_ID),
            "body_excerpt": clip(&String::from_utf8_lossy(&self.body), 300),
        })
    }
}

/// Reads up to `max` messages without removing them: they return to the queue when `channel` closes.
async fn browse(channel: &lapin::Channel, queue: &str, max: usize) -> anyhow::Result<Vec<DeadLetterView>> {
    let mut out = Vec::new();
    while out.len() < max {
        match channel.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await? {
            Some(m) => out.push(DeadLetterView {
                tag: m.delivery.delivery_tag,
                properties: m.delivery.properties,
                body: m.delivery.data,
            }),
            None => break,
        }
    }
    Ok(out)
}

async fn close(channel: lapin::Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

#[derive(Debug, Default, Serialize)]
pub struct StageStats {
    pub stage: &'static str,
    pub queue: String,
    pub count: u32,
    pub reasons: BTreeMap<String, u64>,
    pub classes: BTreeMap<String, u64>,
    pub oldest_age_seconds: Option<i64>,
}

pub async fn stats(connection: &Connection, topology: &Topology) -> anyhow::Result<Vec<StageStats>> {
    let now = Timestamp::now().as_millisecond();
    let mut all = Vec::new();
    for stage in Stage::ALL {
        let queue = topology.dead_queue(stage);
        let count = queue_state(connection, &queue).await?.map(|q| q.messages).unwrap_or(0);
        let channel = connection.create_channel().await?;
        let messages = browse(&channel, &queue, count as usize).await?;
        close(channel).await;
        let mut s = StageStats { stage: stage.as_str(), queue, count, ..StageStats::default() };
        for m in &messages {
            *s.reasons.entry(m.reason()).or_default() += 1;
            *s.classes.entry(m.class()).or_default() += 1;
            if let Some(at) = m.dead_at_ms() {
                let age = (now - at).max(0) / 1000;
                s.oldest_age_seconds = Some(s.oldest_age_seconds.map_or(age, |o| o.max(age)));
            }
        }
        all.push(s);
    }
    Ok(all)
}

pub async fn peek(
    connection: &Connection,
    topology: &Topology,
    stage: Stage,
    limit: usize,
) -> anyhow::Result<Vec<Value>> {
    let channel = connection.create_channel().await?;
    let messages = browse(&channel, &topology.dead_queue(stage), limit).await?;
    let now = Timestamp::now().as_millisecond();
    let out = messages.iter().map(|m| m.describe(now)).collect();
    close(channel).await;
    Ok(out)
}

/// Which dead letters a replay or purge takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub ids: Vec<String>,
    pub since_ms: Option<i64>,
    pub before_ms: Option<i64>,
}

impl Filter {
    pub fn matches(&self, m: &DeadLetterView) -> bool {
        if self.reason.as_ref().is_some_and(|r| *r != m.reason()) {
            return false;
        }
        if !self.ids.is_empty() && !m.ids().iter().any(|id| self.ids.contains(id)) {
            return false;
        }
        let at = m.dead_at_ms();
        if self.since_ms.is_some_and(|since| at.is_none_or(|at| at < since)) {
            return false;
        }
        if self.before_ms.is_some_and(|before| at.is_none_or(|at| at >= before)) {
            return false;
        }
        true
    }
}

/// `2h` → now − 2h; a datetime (China time, or RFC 3339) as it is.
/// A replay rate: a finite number of messages per second, 0.01 to 100,000 (`inf`, `0` or `-1`
/// are errors naming the value, not a panic later).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of messages per second"))?;
    if !(0.01..=100_000.0).contains(&rate) {
        return Err(format!("{text:?}: give a rate from 0.01 to 100000 per second"));
    }
    Ok(rate)
}

pub fn parse_since(text: &str) -> Result<i64, String> {
    if let Ok(ts) = orderflow_shared::time::parse_china(text) {
        return Ok(ts.as_millisecond());
    }
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(ts.as_millisecond());
    }
    let d = parse_duration(text).map_err(|_| format!("--since {text:?}: a datetime or a duration such as 2h"))?;
    Ok(Timestamp::now().as_millisecond() - d.as_millis() as i64)
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ReplaySummary {
    /// Dead letters present at the start (the pass never goes further).
    pub scanned: u64,
    pub matched: u64,
    pub replayed: u64,
    /// Matching but replayed too often already (needs --force).
    pub refused: u64,
    /// Publish or ack that did not complete (the message stays in, or returns to, the dead queue).
    pub failed: u64,
    /// Dead letters left in the queue after the pass.
    pub left: u64,
    pub dry_run: bool,
    pub seconds: f64,
}

/// The replayed message's properties: attempts reset, replays + 1, dead-letter and broker death
/// headers dropped (the last reason and error are kept as history).
pub fn replay_properties(m: &DeadLetterView) -> BasicProperties {
    let mut headers = strip_broker_death_headers(&headers_of(&m.properties));
    let last_reason = m.reason();
    let last_error = m.h(header::ERROR).unwrap_or_default();
    let mut kept = lapin::types::FieldTable::default();
    for (k, v) in headers.inner() {
        let dead_letter_header = [
            header::STAGE,
            header::ERROR_CLASS,
            header::ERROR,
            header::REASON,
            header::ORIGIN_EXCHANGE,
            header::ORIGIN_ROUTING_KEY,
            header::DEAD_AT_MS,
        ]
        .contains(&k.as_str());
        if !dead_letter_header {
            kept.insert(k.clone(), v.clone());
        }
    }
    headers = kept;
    set_i64(&mut headers, header::ATTEMPT, 0);
    set_i64(&mut headers, header::REPLAYS, m.replays() + 1);
    set_str(&mut headers, "x-orderflow-last-reason", &last_reason);
    set_str(&mut headers, "x-orderflow-last-error", &clip(&last_error, 1000));
    m.properties.clone().with_headers(headers)
}

/// Where a replay sends a dead letter: its recorded origin, else the stage's work exchange.
pub fn replay_route(m: &DeadLetterView, topology: &Topology, stage: Stage) -> (String, String) {
    match (m.h(header::ORIGIN_EXCHANGE), m.h(header::ORIGIN_ROUTING_KEY)) {
        (Some(e), Some(rk)) if !e.is_empty() => (e, rk),
        _ => {
            let (e, rk) = topology.work_route(stage);
            (e, rk.to_string())
        }
    }
}

pub struct ReplayOptions {
    pub stage: Stage,
    pub filter: Filter,
    pub limit: Option<usize>,
    pub rate: Option<f64>,
    pub dry_run: bool,
    pub force: bool,
    pub max_replays: i64,
    pub progress: bool,
}

/// One pass over the dead letters present now. Errors from the broker end the pass early; the
/// summary says what happened (nothing is lost either way).
pub async fn replay(
    connection: &Connection,
    topology: &Topology,
    options: &ReplayOptions,
) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    let queue = topology.dead_queue(options.stage);
    let present = queue_state(connection, &queue).await?.with_context(|| format!("{queue} does not exist"))?.messages;
    let channel = connection.create_channel().await?;
    let publisher = if options.dry_run { None } else { Some(Publisher::open(connection).await?) };
    let mut summary = ReplaySummary { dry_run: options.dry_run, ..ReplaySummary::default() };
    let mut ticker = options.rate.filter(|r| *r > 0.0).map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let tty = options.progress && std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let mut broker_error = None;
    for _ in 0..present {
        let got = match channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                broker_error = Some(e);
                break;
            }
        };
        summary.scanned += 1;
        let m = DeadLetterView {
            tag: got.delivery.delivery_tag,
            properties: got.delivery.properties,
            body: got.delivery.data,
        };
        let wanted = options.filter.matches(&m) && options.limit.is_none_or(|l| (summary.matched as usize) < l);
        if wanted {
            summary.matched += 1;
            if m.replays() >= options.max_replays && !options.force {
                summary.refused += 1;
            } else if let Some(publisher) = &publisher {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let (exchange, routing_key) = replay_route(&m, topology, options.stage);
                match publisher.publish(&exchange, &routing_key, &m.body, replay_properties(&m)).await {
                    Ok(()) => match channel.basic_ack(m.tag, BasicAckOptions::default()).await {
                        Ok(()) => summary.replayed += 1,
                        Err(e) => {
                            summary.failed += 1;
                            broker_error = Some(e);
                            break;
                        }
                    },
                    Err(e) => {
                        summary.failed += 1;
                        if let orderflow_shared::amqp::PublishError::Channel(e) = e {
                            broker_error = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        if options.progress && (tty || last_line.elapsed() >= Duration::from_secs(5)) {
            let line = format!(
                "{} {}/{present} scanned · {} matched · {} replayed · {} refused · {} failed",
                if options.dry_run { "dry run:" } else { "replaying:" },
                summary.scanned,
                summary.matched,
                summary.replayed,
                summary.refused,
                summary.failed
            );
            if tty {
                eprint!("\r{line}")
            } else {
                eprintln!("{line}")
            }
            last_line = Instant::now();
        }
    }
    if tty {
        eprintln!();
    }
    // Everything not acked goes back to the dead queue here.
    close(channel).await;
    if let Some(p) = publisher {
        let _ = p.channel().close(200, "done".into()).await;
    }
    summary.seconds = (started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    summary.left = match queue_state(connection, &queue).await {
        Ok(Some(q)) => u64::from(q.messages),
        _ => u64::from(present) - summary.replayed,
    };
    if let Some(e) = broker_error {
        summary.failed = summary.failed.max(1);
        tracing::warn!(message = "The broker connection failed during the replay; unfinished messages stay in the dead queue.", error = %e);
    }
    Ok(summary)
}

/// Deletes matching dead letters (one pass, like a replay).
pub async fn purge(connection: &Connection, topology: &Topology, stage: Stage, filter: &Filter) -> anyhow::Result<u64> {
    let queue = topology.dead_queue(stage);
    let present = queue_state(connection, &queue).await?.map(|q| q.messages).unwrap_or(0);
    let channel = connection.create_channel().await?;
    let mut deleted = 0;
    for _ in 0..present {
        let Some(got) = channel.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false }).await? else {
            break;
        };
        let m = DeadLetterView {
            tag: got.delivery.delivery_tag,
            properties: got.delivery.properties,
            body: got.delivery.data,
        };
        if filter.matches(&m) {
            channel.basic_ack(m.tag, BasicAckOptions::default()).await?;
            deleted += 1;
        }
    }
    close(channel).await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;

    #[test]
    fn replay_rates_that_would_panic_are_refused() {
        for bad in ["inf", "NaN", "0", "-1", "1e-9", "1e9", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rate("50"), Ok(50.0));
    }

    fn dead(reason: &str, replays: i64, dead_at_ms: i64, body: &str) -> DeadLetterView {
        let mut h = FieldTable::default();
        set_str(&mut h, header::REASON, reason);
        set_str(&mut h, header::ERROR_CLASS, "permanent");
        set_str(&mut h, header::ERROR, "HTTP 422: nope");
        set_str(&mut h, header::STAGE, "writer");
        set_str(&mut h, header::ORIGIN_EXCHANGE, "ns.records");
        set_str(&mut h, header::ORIGIN_ROUTING_KEY, "record");
        set_i64(&mut h, header::DEAD_AT_MS, dead_at_ms);
        set_i64(&mut h, header::ATTEMPT, 3);
        set_i64(&mut h, header::REPLAYS, replays);
        h.insert("x-death".into(), lapin::types::AMQPValue::FieldArray(Default::default()));
        set_str(&mut h, "traceparent", "00-abc-def-01");
        DeadLetterView {
            tag: 1,
            properties: BasicProperties::default().with_message_id("acme:42:7".into()).with_headers(h),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn filters_combine_reason_ids_and_time() {
        let m = dead("target_rejected", 0, 1_000, r#"{"id":"42"}"#);
        assert!(Filter::default().matches(&m));
        assert!(Filter { reason: Some("target_rejected".into()), ..Filter::default() }.matches(&m));
        assert!(!Filter { reason: Some("exhausted".into()), ..Filter::default() }.matches(&m));
        assert!(Filter { ids: vec!["42".into()], ..Filter::default() }.matches(&m));
        assert!(Filter { ids: vec!["acme:42:7".into()], ..Filter::default() }.matches(&m));
        assert!(!Filter { ids: vec!["43".into()], ..Filter::default() }.matches(&m));
        assert!(Filter { since_ms: Some(999), ..Filter::default() }.matches(&m));
        assert!(!Filter { since_ms: Some(1_001), ..Filter::default() }.matches(&m));
        assert!(!Filter { before_ms: Some(1_000), ..Filter::default() }.matches(&m));
    }

    #[test]
    fn page_dead_letters_match_by_their_order_ids() {
        let m = dead("invalid_record", 0, 1, r#"{"schema":"orderflow.page.v1","orders":[{"o_id":77}]}"#);
        assert!(Filter { ids: vec!["77".into()], ..Filter::default() }.matches(&m));
    }

    #[test]
    fn a_replay_resets_attempts_counts_replays_and_drops_death_headers() {
        let m = dead("target_rejected", 1, 1, "{}");
        let props = replay_properties(&m);
        assert_eq!(get_i64(&props, header::ATTEMPT), Some(0));
        assert_eq!(get_i64(&props, header::REPLAYS), Some(2));
        for gone in ["x-death", header::REASON, header::ERROR, header::ERROR_CLASS, header::STAGE, header::DEAD_AT_MS] {
            assert!(orderflow_shared::amqp::headers::get(&props, gone).is_none(), "{gone} must be dropped");
        }
        assert_eq!(get_str(&props, "x-orderflow-last-reason").as_deref(), Some("target_rejected"));
        assert_eq!(get_str(&props, "traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(
            props.message_id().as_ref().map(|s| s.as_str()),
            Some("acme:42:7"),
            "same id: idempotent downstream"
        );
    }

    #[test]
    fn a_replay_goes_to_the_origin_else_the_stage_work_exchange() {
        let topology = Topology::new("ns");
        let m = dead("x", 0, 1, "{}");
        assert_eq!(replay_route(&m, &topology, Stage::Writer), ("ns.records".into(), "record".into()));
        let bare = DeadLetterView { tag: 1, properties: BasicProperties::default(), body: vec![] };
        assert_eq!(replay_route(&bare, &topology, Stage::Transformer), ("ns.pages".into(), "page".into()));
    }

    #[test]
    fn since_takes_a_datetime_or_a_duration_ago() {
        assert_eq!(parse_since("2021-09-18 11:02:19"), Ok(1_631_934_139_000));
        let two_hours_ago = parse_since("2h").expect("duration");
        assert!((Timestamp::now().as_millisecond() - two_hours_ago - 7_200_000).abs() < 5_000);
        assert!(parse_since("whenever").is_err());
    }
}
