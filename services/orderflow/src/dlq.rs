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
use orderflow_shared::{
    amqp::{
        PublishError, Publisher, Stage, Topology,
        headers::clip,
        ops::{Client, Reader, Taken, close_publisher},
    },
    messages::header,
    settings::parse_duration,
};
use serde::Serialize;
use serde_json::{Value, json};

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
    pub message: Taken,
}

impl DeadLetterView {
    fn h(&self, key: &str) -> Option<String> {
        self.message.header_str(key)
    }
    pub fn reason(&self) -> String {
        self.h(header::REASON).unwrap_or_else(|| "unknown".into())
    }
    pub fn class(&self) -> String {
        self.h(header::ERROR_CLASS).unwrap_or_else(|| "unknown".into())
    }
    pub fn replays(&self) -> i64 {
        self.message.header_i64(header::REPLAYS).unwrap_or(0)
    }
    pub fn dead_at_ms(&self) -> Option<i64> {
        self.message.header_i64(header::DEAD_AT_MS)
    }
    pub fn message_id(&self) -> String {
        self.message.message_id()
    }
    /// Every id a person might use for this message: message id, order id, record id, page order ids.
    pub fn ids(&self) -> Vec<String> {
        let mut ids = vec![self.message_id()];
        ids.extend(self.h(header::ORDER_ID));
        if let Ok(body) = serde_json::from_slice::<Value>(&self.message.body) {
            ids.extend(body.get("id").and_then(orderflow_shared::json::scalar_text));
            for order in body.get("orders").and_then(Value::as_array).into_iter().flatten() {
                ids.extend(order.get("o_id").and_then(orderflow_shared::json::scalar_text));
            }
        }
        ids
    }

    /// The ledger's `replayed` event of this dead letter: the order's ids from its headers (the
    /// record id, or a rejected order's o_id, when they are missing), its account and version
    /// from its body (a record, or a one-order page).
    pub fn replayed_event(&self, stage: Stage) -> orderflow_shared::ledger::Event {
        use orderflow_shared::ledger::{Event, OrderIds, What};
        let mut ids = OrderIds::from_headers(|key| self.h(key));
        let body = serde_json::from_slice::<Value>(&self.message.body).unwrap_or(Value::Null);
        let row = body.get("orders").and_then(|o| o.get(0));
        if ids.o_id.is_none() {
            ids = row.map(OrderIds::of_row).filter(|i| i.o_id.is_some()).unwrap_or(ids);
        }
        if ids.o_id.is_none() {
            ids.o_id = self.h(header::ORDER_ID);
        }
        let text = |v: Option<&Value>| v.and_then(orderflow_shared::json::scalar_text);
        let account = text(body.get("account")).unwrap_or_default();
        let version = text(body.get("version")).or_else(|| row.and_then(OrderIds::row_version));
        Event::new(What::Replayed { to: stage.as_str().into() }, account, self.message_id()).ids(&ids).version(version)
    }

    pub fn describe(&self, now_ms: i64) -> Value {
        json!({
            "message_id": self.message_id(),
            "reason": self.reason(),
            "class": self.class(),
            "error": self.h(header::ERROR),
            "attempts": self.message.header_i64(header::ATTEMPT),
            "replays": self.replays(),
            "stage": self.h(header::STAGE),
            "origin": {"exchange": self.h(header::ORIGIN_EXCHANGE), "routing_key": self.h(header::ORIGIN_ROUTING_KEY)},
            "age_seconds": self.dead_at_ms().map(|at| (now_ms - at).max(0) / 1000),
            "order_id": self.h(header::ORDER_ID),
            "body_excerpt": clip(&String::from_utf8_lossy(&self.message.body), 300),
        })
    }
}

/// Reads up to `max` dead letters without removing them: they go back when the reader closes.
async fn browse(client: &Client, queue: &str, max: usize) -> anyhow::Result<Vec<DeadLetterView>> {
    let reader = client.reader().await?;
    let taken = reader.take_up_to(queue, max).await;
    reader.close().await;
    Ok(taken?.into_iter().map(|message| DeadLetterView { message }).collect())
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

impl StageStats {
    fn of(stage: Stage, queue: String, count: u32, messages: &[DeadLetterView], now_ms: i64) -> StageStats {
        let mut s = StageStats { stage: stage.as_str(), queue, count, ..StageStats::default() };
        for m in messages {
            *s.reasons.entry(m.reason()).or_default() += 1;
            *s.classes.entry(m.class()).or_default() += 1;
            if let Some(at) = m.dead_at_ms() {
                let age = (now_ms - at).max(0) / 1000;
                s.oldest_age_seconds = Some(s.oldest_age_seconds.map_or(age, |o| o.max(age)));
            }
        }
        s
    }
}

pub async fn stats(client: &Client, topology: &Topology) -> anyhow::Result<Vec<StageStats>> {
    let now = Timestamp::now().as_millisecond();
    let mut all = Vec::new();
    for stage in Stage::ALL {
        let queue = topology.dead_queue(stage);
        let count = client.queue_state(&queue).await?.map(|q| q.messages).unwrap_or(0);
        let messages = browse(client, &queue, count as usize).await?;
        all.push(StageStats::of(stage, queue, count, &messages, now));
    }
    Ok(all)
}

pub async fn peek(client: &Client, topology: &Topology, stage: Stage, limit: usize) -> anyhow::Result<Vec<Value>> {
    let messages = browse(client, &topology.dead_queue(stage), limit).await?;
    let now = Timestamp::now().as_millisecond();
    Ok(messages.iter().map(|m| m.describe(now)).collect())
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

/// The headers of a dead letter that a replay drops (the last reason and error are kept as
/// history under other names).
const DEAD_LETTER_HEADERS: [&str; 7] = [
    header::STAGE,
    header::ERROR_CLASS,
    header::ERROR,
    header::REASON,
    header::ORIGIN_EXCHANGE,
    header::ORIGIN_ROUTING_KEY,
    header::DEAD_AT_MS,
];

/// The message a replay publishes: same id and body, attempts reset, replays + 1, dead-letter and
/// broker death headers dropped (the last reason and error are kept as history).
pub fn replayed(m: &DeadLetterView) -> Taken {
    let (last_reason, last_error) = (m.reason(), clip(&m.h(header::ERROR).unwrap_or_default(), 1000));
    m.message.republished(
        &DEAD_LETTER_HEADERS,
        &[(header::ATTEMPT, 0), (header::REPLAYS, m.replays() + 1)],
        &[("x-orderflow-last-reason", &last_reason), ("x-orderflow-last-error", &last_error)],
    )
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
pub async fn replay(client: &Client, topology: &Topology, options: &ReplayOptions) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    let queue = topology.dead_queue(options.stage);
    let present = client.queue_state(&queue).await?.with_context(|| format!("{queue} does not exist"))?.messages;
    let reader = client.reader().await?;
    let publisher = if options.dry_run { None } else { Some(client.publisher().await?) };
    let mut pass = Pass::new(options, topology, present);
    let broker_error = pass.run(&reader, publisher.as_ref(), &queue).await.err();
    pass.progress.end();
    // Everything not acked goes back to the dead queue here.
    reader.close().await;
    if let Some(p) = &publisher {
        close_publisher(p).await;
    }
    if !pass.events.is_empty() && topology.ledger.is_some() {
        let recorded = async {
            let mut sink = orderflow_shared::amqp::ledger::StreamSink::new(client.publisher().await?, topology);
            orderflow_shared::ledger::append_events(&mut sink, "orderflow", std::mem::take(&mut pass.events)).await
        };
        if let Err(e) = recorded.await {
            tracing::warn!(message = "The replays are done, but the ledger could not record them (orderflow trace will not show them).", error = %format!("{e:#}"));
        }
    }
    let mut summary = pass.summary;
    summary.seconds = (started.elapsed().as_secs_f64() * 100.0).round() / 100.0;
    summary.left = match client.queue_state(&queue).await {
        Ok(Some(q)) => u64::from(q.messages),
        _ => u64::from(present) - summary.replayed,
    };
    if let Some(e) = broker_error {
        summary.failed = summary.failed.max(1);
        tracing::warn!(message = "The broker connection failed during the replay; unfinished messages stay in the dead queue.", error = %format!("{e:#}"));
    }
    Ok(summary)
}

/// A replay under way: what it has done, its pace, its progress line.
struct Pass<'a> {
    options: &'a ReplayOptions,
    topology: &'a Topology,
    present: u32,
    summary: ReplaySummary,
    ticker: Option<tokio::time::Interval>,
    progress: ProgressLine,
    /// The ledger's `replayed` events, appended when the pass ends.
    events: Vec<orderflow_shared::ledger::Event>,
}

impl<'a> Pass<'a> {
    fn new(options: &'a ReplayOptions, topology: &'a Topology, present: u32) -> Self {
        let ticker = options.rate.filter(|r| *r > 0.0).map(|r| {
            let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        Pass {
            options,
            topology,
            present,
            summary: ReplaySummary { dry_run: options.dry_run, ..ReplaySummary::default() },
            ticker,
            progress: ProgressLine::new(options.progress),
            events: Vec::new(),
        }
    }

    /// Takes each dead letter present at the start once (so it cannot loop); a broker failure
    /// ends the pass.
    async fn run(&mut self, reader: &Reader, publisher: Option<&Publisher>, queue: &str) -> anyhow::Result<()> {
        for _ in 0..self.present {
            let Some(message) = reader.take(queue).await? else { break };
            self.summary.scanned += 1;
            let m = DeadLetterView { message };
            if self.wanted(&m) {
                self.replay_one(reader, publisher, &m).await?;
            }
            let (s, present, dry) = (&self.summary, self.present, self.options.dry_run);
            self.progress.show(|| {
                format!(
                    "{} {}/{present} scanned · {} matched · {} replayed · {} refused · {} failed",
                    if dry { "dry run:" } else { "replaying:" },
                    s.scanned,
                    s.matched,
                    s.replayed,
                    s.refused,
                    s.failed
                )
            });
        }
        Ok(())
    }

    /// Whether the filter and the limit take this dead letter (counted as matched).
    fn wanted(&mut self, m: &DeadLetterView) -> bool {
        let wanted =
            self.options.filter.matches(m) && self.options.limit.is_none_or(|l| (self.summary.matched as usize) < l);
        self.summary.matched += u64::from(wanted);
        wanted
    }

    /// Publishes one matching dead letter to its origin (confirmed), then acks it; refuses one
    /// replayed too often; does neither in a dry run (no publisher).
    async fn replay_one(
        &mut self,
        reader: &Reader,
        publisher: Option<&Publisher>,
        m: &DeadLetterView,
    ) -> anyhow::Result<()> {
        if m.replays() >= self.options.max_replays && !self.options.force {
            self.summary.refused += 1;
            return Ok(());
        }
        let Some(publisher) = publisher else { return Ok(()) };
        if let Some(t) = self.ticker.as_mut() {
            t.tick().await;
        }
        let (exchange, routing_key) = replay_route(m, self.topology, self.options.stage);
        let out = replayed(m);
        match publisher.publish(&exchange, &routing_key, &out.body, out.properties).await {
            Ok(()) => {}
            Err(e) => {
                self.summary.failed += 1;
                // A refused publish leaves the message where it is; a lost channel ends the pass.
                return if let PublishError::Channel(e) = e { Err(e.into()) } else { Ok(()) };
            }
        }
        if let Err(e) = reader.ack(m.message.tag).await {
            self.summary.failed += 1;
            return Err(e);
        }
        self.summary.replayed += 1;
        if self.topology.ledger.is_some() {
            self.events.push(m.replayed_event(self.options.stage));
        }
        Ok(())
    }
}

/// A progress line on stderr: redrawn in place on a terminal, else printed every 5 s.
struct ProgressLine {
    on: bool,
    tty: bool,
    last: Instant,
}

impl ProgressLine {
    fn new(on: bool) -> Self {
        ProgressLine { on, tty: on && std::io::stderr().is_terminal(), last: Instant::now() }
    }

    fn show(&mut self, line: impl FnOnce() -> String) {
        if self.on && (self.tty || self.last.elapsed() >= Duration::from_secs(5)) {
            if self.tty {
                eprint!("\r{}", line());
            } else {
                eprintln!("{}", line());
            }
            self.last = Instant::now();
        }
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Deletes matching dead letters (one pass, like a replay).
pub async fn purge(client: &Client, topology: &Topology, stage: Stage, filter: &Filter) -> anyhow::Result<u64> {
    let queue = topology.dead_queue(stage);
    let present = client.queue_state(&queue).await?.map(|q| q.messages).unwrap_or(0);
    let reader = client.reader().await?;
    let mut deleted = 0;
    for _ in 0..present {
        let Some(message) = reader.take(&queue).await? else { break };
        let m = DeadLetterView { message };
        if filter.matches(&m) {
            reader.ack(m.message.tag).await?;
            deleted += 1;
        }
    }
    reader.close().await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use orderflow_shared::amqp::headers::{get, get_i64, get_str, json_properties, set_i64, set_str};

    #[test]
    fn replay_rates_that_would_panic_are_refused() {
        for bad in ["inf", "NaN", "0", "-1", "1e-9", "1e9", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rate("50"), Ok(50.0));
    }

    fn dead(reason: &str, replays: i64, dead_at_ms: i64, body: &str) -> DeadLetterView {
        let mut h = Default::default();
        set_str(&mut h, header::REASON, reason);
        set_str(&mut h, header::ERROR_CLASS, "permanent");
        set_str(&mut h, header::ERROR, "HTTP 422: nope");
        set_str(&mut h, header::STAGE, "writer");
        set_str(&mut h, header::ORIGIN_EXCHANGE, "ns.records");
        set_str(&mut h, header::ORIGIN_ROUTING_KEY, "record");
        set_i64(&mut h, header::DEAD_AT_MS, dead_at_ms);
        set_i64(&mut h, header::ATTEMPT, 3);
        set_i64(&mut h, header::REPLAYS, replays);
        set_str(&mut h, "x-death", "(the broker's dead-letter history)");
        set_str(&mut h, "traceparent", "00-abc-def-01");
        DeadLetterView {
            message: Taken { tag: 1, properties: json_properties("acme:42:7", h), body: body.as_bytes().to_vec() },
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
        let out = replayed(&m);
        let props = &out.properties;
        assert_eq!(get_i64(props, header::ATTEMPT), Some(0));
        assert_eq!(get_i64(props, header::REPLAYS), Some(2));
        for gone in ["x-death", header::REASON, header::ERROR, header::ERROR_CLASS, header::STAGE, header::DEAD_AT_MS] {
            assert!(get(props, gone).is_none(), "{gone} must be dropped");
        }
        assert_eq!(get_str(props, "x-orderflow-last-reason").as_deref(), Some("target_rejected"));
        assert_eq!(get_str(props, "traceparent").as_deref(), Some("00-abc-def-01"));
        assert_eq!(out.message_id(), "acme:42:7", "same id: idempotent downstream");
        assert_eq!(out.body, m.message.body);
    }

    #[test]
    fn a_replay_goes_to_the_origin_else_the_stage_work_exchange() {
        let topology = Topology::new("ns");
        let m = dead("x", 0, 1, "{}");
        assert_eq!(replay_route(&m, &topology, Stage::Writer), ("ns.records".into(), "record".into()));
        let bare = DeadLetterView { message: Taken { tag: 1, properties: Default::default(), body: vec![] } };
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
