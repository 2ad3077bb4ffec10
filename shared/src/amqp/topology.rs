//! The broker topology, as data first (so `orderflow topology` can print it and tests can read
//! it) and then declared idempotently by one function every service calls at start.
//!
//! ```text
//! <ns>.pages   (direct) --page-->   <ns>.pages   (quorum) --dead--> <ns>.dead --transformer--> <ns>.transformer.dead
//! <ns>.records (direct) --record--> <ns>.records (quorum) --dead--> <ns>.dead --writer-->      <ns>.writer.dead
//! <ns>.retry   (direct) --<tier>--> <ns>.writer.retry.<tier> (quorum, TTL) --expired--> <ns>.records
//! ```

use std::{fmt, time::Duration};

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use serde::Serialize;

pub const PAGE_ROUTING_KEY: &str = "page";
pub const RECORD_ROUTING_KEY: &str = "record";

/// Redeliveries (consumer crashes, requeues) before the broker itself dead-letters a message.
/// High on purpose: `kill -9` of a consumer must not push healthy messages to the dead queue.
pub const DELIVERY_LIMIT: i64 = 50;

/// Effectively unlimited redeliveries for queues that are only browsed (dead letters, status).
pub const TERMINAL_DELIVERY_LIMIT: i64 = 1_000_000;

/// Fetch status messages kept (the newest win).
pub const FETCH_STATUS_LENGTH: i64 = 1000;

/// A stage that consumes a work queue and so has a dead queue of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Transformer,
    Writer,
}

impl Stage {
    pub const ALL: [Stage; 2] = [Stage::Transformer, Stage::Writer];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Transformer => "transformer",
            Stage::Writer => "writer",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueSpec {
    pub name: String,
    /// What the queue is for, for people reading `orderflow topology`.
    pub role: &'static str,
    pub arguments: Vec<(String, ArgValue)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ArgValue {
    Text(String),
    Int(i64),
    Bool(bool),
}

#[derive(Debug, Clone, Serialize)]
pub struct BindingSpec {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
}

/// Every name under one namespace, plus the writer's retry tiers and the ledger's retention.
#[derive(Debug, Clone)]
pub struct Topology {
    pub ns: String,
    pub retry_tiers: Vec<Duration>,
    /// The ledger stream's retention when the ledger is on (`LEDGER`); `None`: no ledger.
    pub ledger: Option<Retention>,
}

/// How long and how much of the ledger the broker keeps (`LEDGER_MAX_AGE`, `LEDGER_MAX_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_bytes: u64,
}

/// The writer's default retry tiers (`RETRY_TIERS`): a gentle ladder capped at 5 minutes. A flaky
/// second is retried in place first; a real outage is the breaker's job, not the tiers'.
pub const DEFAULT_RETRY_TIERS: &str = "1s,5s,30s,2m,5m";

pub fn default_retry_tiers() -> Vec<Duration> {
    DEFAULT_RETRY_TIERS
        .split(',')
        .map(|t| crate::settings::parse_duration(t).expect("DEFAULT_RETRY_TIERS parses"))
        .collect()
}

/// `1s`, `10s`, `1m`, `10m`, `1500ms`: the tier's label in queue names and metrics.
pub fn tier_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl Topology {
    pub fn new(ns: impl Into<String>) -> Self {
        let retention = crate::settings::LedgerArgs::default();
        Self {
            ns: ns.into(),
            retry_tiers: default_retry_tiers(),
            ledger: Some(Retention { max_age: retention.ledger_max_age, max_bytes: retention.ledger_max_bytes }),
        }
    }

    /// The same topology with the ledger as `args` say (off: no ledger stream).
    pub fn with_ledger(mut self, args: &crate::settings::LedgerArgs) -> Self {
        self.ledger =
            args.ledger.then_some(Retention { max_age: args.ledger_max_age, max_bytes: args.ledger_max_bytes });
        self
    }

    pub fn with_retry_tiers(mut self, tiers: Vec<Duration>) -> Self {
        self.retry_tiers = tiers;
        self
    }

    pub fn pages_exchange(&self) -> String {
        format!("{}.pages", self.ns)
    }
    pub fn pages_queue(&self) -> String {
        format!("{}.pages", self.ns)
    }
    pub fn records_exchange(&self) -> String {
        format!("{}.records", self.ns)
    }
    pub fn records_queue(&self) -> String {
        format!("{}.records", self.ns)
    }
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.ns)
    }
    pub fn dead_queue(&self, stage: Stage) -> String {
        format!("{}.{}.dead", self.ns, stage)
    }
    pub fn retry_exchange(&self) -> String {
        format!("{}.retry", self.ns)
    }
    pub fn retry_queue(&self, tier: Duration) -> String {
        format!("{}.writer.retry.{}", self.ns, tier_label(tier))
    }
    /// The work queue a stage consumes.
    pub fn work_queue(&self, stage: Stage) -> String {
        match stage {
            Stage::Transformer => self.pages_queue(),
            Stage::Writer => self.records_queue(),
        }
    }
    /// The exchange and routing key that feed a stage's work queue (where replays go).
    pub fn work_route(&self, stage: Stage) -> (String, &'static str) {
        match stage {
            Stage::Transformer => (self.pages_exchange(), PAGE_ROUTING_KEY),
            Stage::Writer => (self.records_exchange(), RECORD_ROUTING_KEY),
        }
    }
    /// A fetch account's job queue: holds the account's sync job and checkpoint.
    pub fn fetch_queue(&self, account: &str) -> String {
        format!("{}.fetch.{}.job", self.ns, account)
    }
    /// Where versions before single-active-consumer ownership kept an account's job (read once
    /// when upgrading, then deleted: see `amqp::lease`).
    pub fn legacy_fetch_queue(&self, account: &str) -> String {
        format!("{}.fetch.{}", self.ns, account)
    }
    /// Where fetchers report each committed pass (bounded; browsed by `orderflow status`).
    pub fn fetch_status_queue(&self) -> String {
        format!("{}.fetch.status", self.ns)
    }
    /// Every fetcher replica consumes it (without messages) so replicas can count each other.
    pub fn fetch_replicas_queue(&self) -> String {
        format!("{}.fetch.replicas", self.ns)
    }

    /// The ledger: a stream every stage appends order events to (see `crate::ledger`).
    pub fn ledger_stream(&self) -> String {
        format!("{}.ledger", self.ns)
    }

    /// Where stages publish ledger batches (fanout to the stream): a stage's broker user needs
    /// write on this exchange only, not on the default exchange.
    pub fn ledger_exchange(&self) -> String {
        format!("{}.ledger", self.ns)
    }

    /// The ledger stream's declaration, when the ledger is on (declared apart from the rest:
    /// see `amqp::ledger::declare`).
    pub fn ledger_spec(&self) -> Option<QueueSpec> {
        self.ledger.map(|r| ledger_stream(self.ledger_stream(), r.max_age, r.max_bytes))
    }

    /// The ledger's index: one small entry per ledger batch naming the orders in it (see
    /// `crate::ledger_index`), what `orderflow trace` reads instead of the whole ledger.
    pub fn ledger_index_stream(&self) -> String {
        format!("{}.ledger.index", self.ns)
    }

    /// Where stages publish index entries (fanout to the index stream).
    pub fn ledger_index_exchange(&self) -> String {
        format!("{}.ledger.index", self.ns)
    }

    /// The index stream's declaration: the ledger's age, and half its size cap (an entry is about
    /// a twentieth of a full batch, but of a batch of a few events, flushed after 50 ms on a quiet
    /// day, it can be half: the index still outlives what it indexes).
    pub fn ledger_index_spec(&self) -> Option<QueueSpec> {
        self.ledger.map(|r| {
            let mut spec = ledger_stream(self.ledger_index_stream(), r.max_age, (r.max_bytes / 2).max(1 << 20));
            spec.role = "ledger index: which ledger batch names which order (stream)";
            spec
        })
    }

    pub fn exchanges(&self) -> Vec<ExchangeSpec> {
        [self.pages_exchange(), self.records_exchange(), self.dead_exchange(), self.retry_exchange()]
            .into_iter()
            .map(|name| ExchangeSpec { name, kind: "direct" })
            .collect()
    }

    pub fn queues(&self) -> Vec<QueueSpec> {
        let mut queues = vec![
            work_queue_spec(
                self.pages_queue(),
                "work: raw pages for the transformer",
                &self.dead_exchange(),
                Stage::Transformer,
            ),
            work_queue_spec(
                self.records_queue(),
                "work: mapped records for the writer",
                &self.dead_exchange(),
                Stage::Writer,
            ),
        ];
        for stage in Stage::ALL {
            queues.push(QueueSpec {
                name: self.dead_queue(stage),
                role: "dead letters (terminal; replay with `orderflow dlq replay`)",
                arguments: vec![
                    ("x-queue-type".into(), ArgValue::Text("quorum".into())),
                    // Peeking returns messages to the queue; newer brokers count that against a
                    // default limit of 20. A dead letter must survive any number of looks.
                    ("x-delivery-limit".into(), ArgValue::Int(TERMINAL_DELIVERY_LIMIT)),
                ],
            });
        }
        queues.push(QueueSpec {
            name: self.fetch_status_queue(),
            role: "fetch status: the latest pass of every account (for `orderflow status`)",
            arguments: vec![
                ("x-queue-type".into(), ArgValue::Text("quorum".into())),
                ("x-max-length".into(), ArgValue::Int(FETCH_STATUS_LENGTH)),
                ("x-overflow".into(), ArgValue::Text("drop-head".into())),
                ("x-delivery-limit".into(), ArgValue::Int(TERMINAL_DELIVERY_LIMIT)),
            ],
        });
        for tier in &self.retry_tiers {
            queues.push(QueueSpec {
                name: self.retry_queue(*tier),
                role: "writer retry tier (TTL, then back to the records queue)",
                arguments: vec![
                    ("x-queue-type".into(), ArgValue::Text("quorum".into())),
                    ("x-message-ttl".into(), ArgValue::Int(tier.as_millis() as i64)),
                    ("x-dead-letter-exchange".into(), ArgValue::Text(self.records_exchange())),
                    ("x-dead-letter-routing-key".into(), ArgValue::Text(RECORD_ROUTING_KEY.into())),
                    ("x-dead-letter-strategy".into(), ArgValue::Text("at-least-once".into())),
                    ("x-overflow".into(), ArgValue::Text("reject-publish".into())),
                ],
            });
        }
        queues
    }

    pub fn bindings(&self) -> Vec<BindingSpec> {
        let mut bindings = vec![
            BindingSpec {
                exchange: self.pages_exchange(),
                routing_key: PAGE_ROUTING_KEY.into(),
                queue: self.pages_queue(),
            },
            BindingSpec {
                exchange: self.records_exchange(),
                routing_key: RECORD_ROUTING_KEY.into(),
                queue: self.records_queue(),
            },
        ];
        for stage in Stage::ALL {
            bindings.push(BindingSpec {
                exchange: self.dead_exchange(),
                routing_key: stage.as_str().into(),
                queue: self.dead_queue(stage),
            });
        }
        for tier in &self.retry_tiers {
            bindings.push(BindingSpec {
                exchange: self.retry_exchange(),
                routing_key: tier_label(*tier),
                queue: self.retry_queue(*tier),
            });
        }
        bindings
    }

    /// Declares every exchange, queue and binding. Idempotent; a conflicting existing queue
    /// (other arguments) fails with the broker's PRECONDITION_FAILED naming it.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        for exchange in self.exchanges() {
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                    FieldTable::default(),
                )
                .await?;
        }
        for queue in self.queues() {
            declare_queue(channel, &queue).await?;
        }
        for binding in self.bindings() {
            channel
                .queue_bind(
                    binding.queue.as_str().into(),
                    binding.exchange.as_str().into(),
                    binding.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Every queue name of the namespace that this topology knows (fetch queues excluded).
    pub fn queue_names(&self) -> Vec<String> {
        self.queues().into_iter().map(|q| q.name).collect()
    }
}

fn work_queue_spec(name: String, role: &'static str, dead_exchange: &str, stage: Stage) -> QueueSpec {
    QueueSpec {
        name,
        role,
        arguments: vec![
            ("x-queue-type".into(), ArgValue::Text("quorum".into())),
            ("x-delivery-limit".into(), ArgValue::Int(DELIVERY_LIMIT)),
            ("x-dead-letter-exchange".into(), ArgValue::Text(dead_exchange.to_string())),
            ("x-dead-letter-routing-key".into(), ArgValue::Text(stage.as_str().into())),
            ("x-dead-letter-strategy".into(), ArgValue::Text("at-least-once".into())),
            ("x-overflow".into(), ArgValue::Text("reject-publish".into())),
        ],
    }
}

pub fn field_table(arguments: &[(String, ArgValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        let value = match value {
            ArgValue::Text(s) => AMQPValue::LongString(LongString::from(s.as_str())),
            ArgValue::Int(n) => AMQPValue::LongLongInt(*n),
            ArgValue::Bool(b) => AMQPValue::Boolean(*b),
        };
        table.insert(ShortString::from(key.as_str()), value);
    }
    table
}

pub async fn declare_queue(channel: &Channel, queue: &QueueSpec) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() },
            field_table(&queue.arguments),
        )
        .await
}

/// A durable quorum queue with no dead-lettering (the fetcher replicas' presence queue).
pub fn plain_quorum_queue(name: String, role: &'static str) -> QueueSpec {
    QueueSpec { name, role, arguments: vec![("x-queue-type".into(), ArgValue::Text("quorum".into()))] }
}

/// A fetch account's job queue: quorum, one active consumer at a time (the broker's choice is
/// the account's owner), and no practical delivery limit (a job handed back to the queue must
/// never be dropped, as RabbitMQ 4's default limit of 20 would).
pub fn fetch_job_queue(name: String) -> QueueSpec {
    QueueSpec {
        name,
        role: "fetch job + checkpoint (single active consumer: the account's owner)",
        arguments: vec![
            ("x-queue-type".into(), ArgValue::Text("quorum".into())),
            ("x-single-active-consumer".into(), ArgValue::Bool(true)),
            ("x-delivery-limit".into(), ArgValue::Int(TERMINAL_DELIVERY_LIMIT)),
        ],
    }
}

/// The ledger stream: kept for `max_age` (`x-max-age`, whole seconds) and at most `max_bytes`
/// (`x-max-length-bytes`), whichever ends first; the broker drops whole segments (here 64 MiB at
/// most, so a small cap still leaves several) from the old end.
pub fn ledger_stream(name: String, max_age: Duration, max_bytes: u64) -> QueueSpec {
    let segment = (max_bytes / 4).clamp(1 << 20, 64 << 20);
    QueueSpec {
        name,
        role: "ledger: what happened to each order, every stage (stream)",
        arguments: vec![
            ("x-queue-type".into(), ArgValue::Text("stream".into())),
            ("x-max-age".into(), ArgValue::Text(format!("{}s", max_age.as_secs().max(1)))),
            ("x-max-length-bytes".into(), ArgValue::Int(i64::try_from(max_bytes).unwrap_or(i64::MAX))),
            ("x-stream-max-segment-size-bytes".into(), ArgValue::Int(segment as i64)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_is_a_stream_with_an_age_and_a_size_cap() {
        let spec = ledger_stream(Topology::new("t").ledger_stream(), Duration::from_secs(7 * 86_400), 10 << 30);
        assert_eq!(spec.name, "t.ledger");
        let arg = |k: &str| spec.arguments.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(arg("x-queue-type"), Some(ArgValue::Text("stream".into())));
        assert_eq!(arg("x-max-age"), Some(ArgValue::Text("604800s".into())));
        assert_eq!(arg("x-max-length-bytes"), Some(ArgValue::Int(10 << 30)));
        assert_eq!(arg("x-stream-max-segment-size-bytes"), Some(ArgValue::Int(64 << 20)));
        let small = ledger_stream("s".into(), Duration::from_millis(10), 1000);
        assert!(small.arguments.contains(&("x-max-age".into(), ArgValue::Text("1s".into()))));
        assert!(small.arguments.contains(&("x-stream-max-segment-size-bytes".into(), ArgValue::Int(1 << 20))));
        let index = Topology::new("t").ledger_index_spec().expect("on by default");
        assert_eq!(index.name, "t.ledger.index");
        assert!(index.arguments.contains(&("x-max-length-bytes".into(), ArgValue::Int(2 << 30))), "{index:?}");
    }

    #[test]
    fn every_name_lives_under_the_namespace() {
        let t = Topology::new("t-123");
        for q in t.queues() {
            assert!(q.name.starts_with("t-123."), "{}", q.name);
        }
        for e in t.exchanges() {
            assert!(e.name.starts_with("t-123."), "{}", e.name);
        }
    }

    #[test]
    fn work_queues_dead_letter_at_least_once_to_their_stage_dead_queue() {
        let t = Topology::new("ns");
        let pages = t.queues().into_iter().find(|q| q.name == "ns.pages").expect("pages queue");
        let args: std::collections::HashMap<_, _> = pages.arguments.into_iter().collect();
        assert_eq!(args["x-queue-type"], ArgValue::Text("quorum".into()));
        assert_eq!(args["x-dead-letter-exchange"], ArgValue::Text("ns.dead".into()));
        assert_eq!(args["x-dead-letter-routing-key"], ArgValue::Text("transformer".into()));
        assert_eq!(args["x-dead-letter-strategy"], ArgValue::Text("at-least-once".into()));
        assert_eq!(args["x-overflow"], ArgValue::Text("reject-publish".into()));
        assert!(matches!(args["x-delivery-limit"], ArgValue::Int(_)));
        let bound = t
            .bindings()
            .into_iter()
            .any(|b| b.exchange == "ns.dead" && b.routing_key == "transformer" && b.queue == "ns.transformer.dead");
        assert!(bound);
    }

    #[test]
    fn the_default_tiers_are_the_documented_ladder() {
        let secs: Vec<u64> = default_retry_tiers().iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 5, 30, 120, 300]);
    }

    #[test]
    fn dead_queues_are_terminal() {
        let t = Topology::new("ns");
        for stage in Stage::ALL {
            let q = t.queues().into_iter().find(|q| q.name == t.dead_queue(stage)).expect("dead queue");
            assert!(
                q.arguments.iter().all(|(k, _)| !k.starts_with("x-dead-letter")),
                "{} must not dead-letter again",
                q.name
            );
        }
    }

    #[test]
    fn retry_tiers_expire_back_into_the_records_exchange() {
        let t = Topology::new("ns");
        let tier = t.queues().into_iter().find(|q| q.name == "ns.writer.retry.5s").expect("5s tier");
        let args: std::collections::HashMap<_, _> = tier.arguments.into_iter().collect();
        assert_eq!(args["x-message-ttl"], ArgValue::Int(5_000));
        assert_eq!(args["x-dead-letter-exchange"], ArgValue::Text("ns.records".into()));
    }

    #[test]
    fn tier_labels_are_short_and_exact() {
        assert_eq!(tier_label(Duration::from_secs(1)), "1s");
        assert_eq!(tier_label(Duration::from_secs(600)), "10m");
        assert_eq!(tier_label(Duration::from_millis(1500)), "1500ms");
        assert_eq!(tier_label(Duration::from_secs(7200)), "2h");
    }
}
