//! The writer: records in, `POST $TARGET_URL` out, with bounded concurrency, classified retries
//! through TTL tier queues, dead-lettering with the reason, and a circuit breaker so an outage
//! does not burn attempts. A record is acked only after the target's 2xx or after its retry or
//! dead letter is confirmed by the broker.

pub mod breaker;
pub mod classify;
pub mod metrics;
pub mod pace;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{
        Applied, Connections, DeadLetter, ErrorClass, Fatal, Message, Settlement, Stage, Topology,
        consume::{self, Handler, Serve},
        ledger::StageLedger,
        settle::{Policy, SettleMetrics},
        supervise,
        topology::{RECORD_ROUTING_KEY, tier_label},
    },
    ledger::{Event, Ledger, OrderIds, What},
    messages::{RECORD_SCHEMA, RawRecord, header, now_ms, schema_of},
    settings::{BrokerArgs, LedgerArgs, LogArgs, parse_duration, redact_url},
};
use tokio_util::sync::CancellationToken;

use crate::{
    breaker::{Breaker, State},
    classify::{Answer, Rules, SuccessRule, WriteOutcome, choose_tier, classify_answer, parse_codes},
    metrics::Metrics,
};

/// What `--help` says about the secrets: none of them is a flag.
const SECRETS_HELP: &str = "Secrets come from the environment only, never from flags (a flag shows in the process \
list): TARGET_AUTH_HEADER, AMQP_PASSWORD or a password inside AMQP_URL.";

/// Writes mapped records to the target write API.
#[derive(Debug, Clone, Parser)]
#[command(name = "writer", version, about, long_about = None, after_help = SECRETS_HELP)]
pub struct Config {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9103")]
    pub admin_addr: SocketAddr,
    /// Full URL of the target's write endpoint (e.g. http://127.0.0.1:8082/data/write).
    #[arg(long, env = "TARGET_URL")]
    pub target_url: Option<String>,
    /// The payload's "api" value.
    #[arg(long, env = "TARGET_API", default_value = "空操作")]
    pub target_api: String,
    /// TARGET_AUTH_HEADER, from the environment only: an extra header sent with every write,
    /// `Name: value` (e.g. `Authorization: Bearer …`; never logged, never a flag).
    #[arg(skip = orderflow_shared::settings::secret_env("TARGET_AUTH_HEADER"))]
    pub target_auth_header: Option<secrecy::SecretString>,
    /// Writes in flight at once (also the consumer prefetch), or `auto`: adapt to the target's
    /// latency and refusals, up to WRITER_CONCURRENCY_MAX.
    #[arg(long, env = "WRITER_CONCURRENCY", default_value = "64", value_parser = pace::parse_concurrency)]
    pub concurrency: pace::Concurrency,
    /// The most writes in flight with WRITER_CONCURRENCY=auto.
    #[arg(long, env = "WRITER_CONCURRENCY_MAX", default_value_t = 512)]
    pub concurrency_max: u16,
    /// The target's budget: at most this many writes per second from this writer (split a total
    /// over the replicas). Unset: no budget.
    #[arg(long, env = "TARGET_RATE_PER_SEC")]
    pub target_rate_per_sec: Option<u32>,
    /// Writes the budget lets go at once after a quiet spell (default: a tenth of the rate, at least 1).
    #[arg(long, env = "TARGET_RATE_BURST")]
    pub target_rate_burst: Option<u32>,
    /// A transient failure is retried this many times in place (jittered, well under a second in
    /// all) before the record goes to a retry tier.
    #[arg(long, env = "WRITER_RETRY_IN_PLACE", default_value_t = 2)]
    pub retry_in_place: u32,
    /// Timeout of one write request.
    #[arg(long, env = "WRITER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Connect timeout to the target.
    #[arg(long, env = "WRITER_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Attempts before a record is dead-lettered as `exhausted`.
    #[arg(long, env = "WRITER_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Retry tier delays, comma-separated (each is a TTL queue).
    #[arg(long, env = "RETRY_TIERS", default_value = orderflow_shared::amqp::topology::DEFAULT_RETRY_TIERS, value_parser = parse_tiers)]
    pub retry_tiers: Tiers,
    /// A record larger than this (bytes) is dead-lettered as `oversized` without being sent.
    #[arg(long, env = "WRITER_MAX_RECORD_BYTES", default_value_t = 1024 * 1024)]
    pub max_record_bytes: usize,
    /// When a 2xx answer means written: `default` (`success!=false,code?=0|200|"0",errcode?=0|"0"`
    /// on a JSON body), `status` (any 2xx, body unread), or conditions like `success=true,data.code=0`.
    #[arg(long, env = "TARGET_SUCCESS", default_value = "default", value_parser = SuccessRule::parse)]
    pub target_success: SuccessRule,
    /// Business codes in a failed answer that mean the record will never be accepted (e.g. a
    /// validation error): dead-lettered at once. Every other failed answer is retried.
    #[arg(long, env = "TARGET_PERMANENT_CODES", default_value = "", value_parser = parse_codes)]
    pub target_permanent_codes: std::collections::HashSet<String>,
    /// The payload's `idCheck`: true (the target keeps the first version of each id and answers
    /// later ones as duplicates), false (the target stores every write: upsert or insert).
    #[arg(long, env = "TARGET_ID_CHECK", default_value_t = true, action = clap::ArgAction::Set)]
    pub target_id_check: bool,
    /// A record held this long while the target refuses every write is parked: republished to
    /// the longest retry tier with its attempts unchanged (below the broker's 30 min ack timeout).
    #[arg(long, env = "HOLD_LIMIT", default_value = "20m", value_parser = parse_duration)]
    pub hold_limit: Duration,
}

#[derive(Debug, Clone)]
pub struct Tiers(pub Vec<Duration>);

pub fn parse_tiers(text: &str) -> Result<Tiers, String> {
    let mut tiers = text.split(',').map(|t| parse_duration(t.trim())).collect::<Result<Vec<_>, _>>()?;
    if tiers.is_empty() || tiers.iter().any(|t| t.is_zero()) {
        return Err("give at least one positive delay, e.g. 1s,5s,30s,2m,5m".into());
    }
    tiers.sort();
    tiers.dedup();
    Ok(Tiers(tiers))
}

struct Target {
    http: reqwest::Client,
    url: String,
    api: String,
    auth: Option<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    rules: Rules,
    id_check: bool,
}

struct Shared {
    tracer: orderflow_shared::otel::Tracer,
    config: Config,
    topology: Topology,
    target: Target,
    breaker: Breaker,
    metrics: Metrics,
    readiness: Readiness,
    /// The last answer was target-level (auth, endpoint, TLS, DNS): `/readyz` says so.
    target_down: AtomicBool,
    /// Budget, concurrency limit and Retry-After pauses toward the target.
    pace: pace::Pace,
    /// What happens to each record (attempts, retries, dead letters, writes).
    ledger: Ledger,
}

impl Config {
    /// Deliveries held at once: the fixed concurrency with as many again (at least 16) waiting
    /// for a write slot or for the broker to confirm their retry or dead letter (a broker alarm
    /// holds those, and they must not take every slot from records that can be written), or the
    /// adaptive limit's ceiling.
    pub fn prefetch(&self) -> u16 {
        match self.concurrency {
            pace::Concurrency::Fixed(n) => n.saturating_add(n.max(16)),
            pace::Concurrency::Auto => self.concurrency_max,
        }
    }

    fn pace(&self) -> pace::Pace {
        let rate = self.target_rate_per_sec.map(|r| (r, self.target_rate_burst.unwrap_or((r / 10).max(1))));
        pace::Pace::new(self.concurrency, self.concurrency_max, rate)
    }

    fn target(&self) -> Result<Target, String> {
        let url = self
            .target_url
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or("TARGET_URL is required (the full URL of the write endpoint)")?;
        let parsed =
            reqwest::Url::parse(url).map_err(|e| format!("TARGET_URL {:?} is not a URL: {e}", redact_url(url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("TARGET_URL {:?} must be http:// or https://", redact_url(url)));
        }
        let auth = match self.target_auth_header.as_ref().map(secrecy::ExposeSecret::expose_secret) {
            None => None,
            Some(h) => {
                let (name, value) = h.split_once(':').ok_or("TARGET_AUTH_HEADER must look like `Name: value`")?;
                let name = reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| "TARGET_AUTH_HEADER has an invalid header name")?;
                let mut value = reqwest::header::HeaderValue::from_str(value.trim())
                    .map_err(|_| "TARGET_AUTH_HEADER has an invalid header value")?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        if self.concurrency_max == 0 {
            return Err("WRITER_CONCURRENCY_MAX must be at least 1".into());
        }
        if self.target_rate_per_sec == Some(0) {
            return Err("TARGET_RATE_PER_SEC must be at least 1 (unset it for no budget)".into());
        }
        if self.hold_limit.is_zero() {
            return Err("HOLD_LIMIT must be positive (e.g. 20m)".into());
        }
        if self.max_attempts == 0 {
            return Err("WRITER_MAX_ATTEMPTS must be at least 1".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .pool_max_idle_per_host(usize::from(self.prefetch()))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let rules =
            Rules { success: self.target_success.clone(), permanent_codes: self.target_permanent_codes.clone() };
        let api = self.target_api.clone();
        Ok(Target { http, url: url.to_string(), api, auth, rules, id_check: self.target_id_check })
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let target = config.target().map_err(Fatal)?;
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let bound = admin::spawn(config.admin_addr, metrics.registry.clone(), readiness.clone(), shutdown.clone())
        .await
        .map_err(|e| Fatal(format!("ADMIN_ADDR {}: {e}", config.admin_addr)))?;
    tracing::info!(
        message = "Writer started.", admin = %bound, ns = %config.broker.ns, target = %redact_url(&target.url),
        concurrency = ?config.concurrency, budget_per_sec = ?config.target_rate_per_sec, tiers = ?config.retry_tiers.0.iter().map(|t| tier_label(*t)).collect::<Vec<_>>()
    );
    if let pace::Concurrency::Fixed(n) = config.concurrency {
        metrics.concurrency_limit.set(i64::from(n));
    }
    let topology = Topology::new(config.broker.ns.clone()).with_retry_tiers(config.retry_tiers.0.clone());
    for tier in &topology.retry_tiers {
        metrics.retries.with_label_values(&[&tier_label(*tier)]);
    }
    let name = orderflow_shared::amqp::connection_name("writer", &config.broker.ns);
    let stage_ledger =
        StageLedger::start("writer", &config.ledger, &config.broker, &name, &metrics.registry, &readiness);
    let shared = Arc::new(Shared {
        ledger: stage_ledger.ledger.clone(),
        tracer: orderflow_shared::otel::Tracer::current(),
        topology,
        target,
        breaker: Breaker::new(breaker::Settings::default()),
        metrics,
        readiness: readiness.clone(),
        target_down: AtomicBool::new(false),
        pace: config.pace(),
        config: config.clone(),
    });
    let broker_metrics = shared.metrics.broker.clone();
    let result = supervise(&config.broker, &name, &shutdown, &readiness, &broker_metrics, |connections| {
        session(connections, shared.clone(), shutdown.clone(), readiness.clone())
    })
    .await;
    // Every delivery is settled by now: what they recorded goes out before the ledger stops.
    stage_ledger.stop().await;
    result
}

/// One broker session: records are consumed and acked on one connection, retries, parked records
/// and dead letters published on the other (a broker alarm that blocks publishing never stops the
/// acks of records written).
async fn session(
    connections: Connections,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    readiness: Readiness,
) -> anyhow::Result<()> {
    let topology = shared.topology.clone();
    let longest = topology.retry_tiers.last().copied().ok_or_else(|| Fatal("no retry tiers configured".into()))?;
    let policy = Policy {
        park_to: (topology.retry_exchange(), tier_label(longest)),
        topology,
        hold_limit: shared.config.hold_limit,
        metrics: SettleMetrics {
            publish_retries: shared.metrics.publish_retries.clone(),
            parked: shared.metrics.parked.clone(),
        },
    };
    let serve = Serve {
        queue: shared.topology.records_queue(),
        prefetch: shared.config.prefetch(),
        declare: shared.config.broker.declare_topology,
        confirm_timeout: shared.config.broker.amqp_confirm_timeout,
        shutdown: &shutdown,
        readiness: &readiness,
        lost_acks: shared.metrics.broker.lost_acks.clone(),
        policy,
    };
    consume::serve(&connections, serve, Arc::new(Writer { shared, shutdown: shutdown.clone() })).await
}

/// The write API's body; `data` is the record's JSON text as the transformer wrote it.
#[derive(serde::Serialize)]
struct Payload<'a> {
    api: &'a str,
    method: &'static str,
    #[serde(rename = "idCheck")]
    id_check: bool,
    data: &'a serde_json::value::RawValue,
}

/// The most of an answer's body the writer reads: enough for any status object, bounded so a
/// target that streams a huge answer cannot exhaust memory.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// One POST of the record's payload, and what the target answered.
async fn write(target: &Target, record: &RawRecord<'_>, message_id: &str) -> (WriteOutcome, Answer) {
    let payload = Payload { api: &target.api, method: "POST", id_check: target.id_check, data: record.data };
    let mut request = target.http.post(&target.url).header("Idempotency-Key", message_id).json(&payload);
    if let Some((name, value)) = &target.auth {
        request = request.header(name.clone(), value.clone());
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
            let wants_body = !(200..300).contains(&status) || target.rules.success.reads_body();
            let body = if wants_body {
                orderflow_shared::body::read_limited(response, MAX_ANSWER_BYTES).await.map(|(body, _)| body)
            } else {
                Ok(Vec::new())
            };
            match body {
                Ok(body) => classify_answer(&target.rules, status, retry_after.as_deref(), &body),
                // A 2xx whose body was cut off cannot be judged: try again (idCheck absorbs a repeat).
                Err(error) => {
                    let detail = format!("HTTP {status}, then the answer was cut off: {error}");
                    let answer = Answer { status, ..Answer::none(&detail) };
                    (transport_outcome(false, false, detail), answer)
                }
            }
        }
        Err(error) => {
            let (timeout, connect) = (error.is_timeout(), error.is_connect());
            let detail = error_chain(&error.without_url());
            let answer = Answer::none(&detail);
            (transport_outcome(timeout, connect, detail), answer)
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    detail
}

/// A request that got no answer. A name that does not resolve or a TLS handshake that fails is
/// the target's (or TARGET_URL's) fault for every record alike; anything else is transient.
fn transport_outcome(timeout: bool, connect: bool, detail: String) -> WriteOutcome {
    let lower = detail.to_lowercase();
    if connect && (lower.contains("dns error") || lower.contains("failed to lookup address")) {
        return WriteOutcome::TargetDown { reason: "dns", detail, unauthorized: false };
    }
    if connect && (lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake")) {
        return WriteOutcome::TargetDown { reason: "tls", detail, unauthorized: false };
    }
    let reason = if timeout {
        "timeout"
    } else if connect {
        "connect"
    } else {
        "transport"
    };
    WriteOutcome::Transient { reason, detail, retry_after: None, connection: connect, refused: timeout }
}

fn dead_letter(shared: &Shared, class: ErrorClass, reason: &'static str, error: String) -> (Settlement, Note) {
    let dead = DeadLetter {
        stage: Stage::Writer,
        class,
        reason: reason.to_string(),
        error,
        origin_exchange: shared.topology.records_exchange(),
        origin_routing_key: RECORD_ROUTING_KEY.to_string(),
    };
    (Settlement::DeadLetter(dead), Note::DeadLettered { class, reason })
}

fn note_breaker(shared: &Shared, changed: Option<State>) {
    if let Some(state) = changed {
        shared.metrics.breaker_state.set(state.as_gauge());
        let label = match state {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        };
        shared.metrics.breaker_transitions.with_label_values(&[label]).inc();
        match state {
            State::Open => tracing::warn!(
                message = "Target failing broadly: circuit breaker open; records wait without spending attempts."
            ),
            State::Closed => tracing::info!(message = "Target healthy again: circuit breaker closed."),
            State::HalfOpen => {}
        }
    }
}

/// The target-level state `/readyz` and `orderflow_write_target_unauthorized` show: set by a
/// target-level failure, cleared by the next answer about a record.
fn note_target(shared: &Shared, outcome: &WriteOutcome) {
    match outcome {
        WriteOutcome::TargetDown { reason, detail, unauthorized } => {
            if !shared.target_down.swap(true, Ordering::Relaxed) {
                let advice = if *unauthorized {
                    "the target refuses our credentials: renew TARGET_AUTH_HEADER; records wait and writing resumes by itself"
                } else {
                    "the target or TARGET_URL is wrong: check it; records wait and writing resumes by itself"
                };
                tracing::error!(message = "Target refuses every write; holding records.", reason, %detail, advice);
                shared.readiness.set_failing("target", format!("{reason}: {advice} ({detail})"));
            }
            shared.metrics.target_unauthorized.set(i64::from(*unauthorized));
        }
        WriteOutcome::Written | WriteOutcome::Permanent { .. } => {
            if shared.target_down.swap(false, Ordering::Relaxed) {
                tracing::info!(message = "Target accepts writes again.");
                shared.readiness.set_ok("target");
                shared.metrics.target_unauthorized.set(0);
            }
        }
        WriteOutcome::Transient { .. } => {}
    }
}

/// Why a body is not a record this writer reads: the dead letter's reason and detail.
fn unreadable(body: &[u8], parsed: Result<RawRecord<'_>, serde_json::Error>) -> (&'static str, String) {
    let schema = match &parsed {
        Ok(record) => Some(record.schema.clone()),
        Err(_) => schema_of(body),
    };
    match (schema, parsed) {
        (Some(s), Err(e)) if s == RECORD_SCHEMA => {
            ("poison_record", format!("the record does not match {RECORD_SCHEMA}: {e}"))
        }
        (Some(s), _) => {
            ("unknown_schema", format!("unknown record schema {s:?} (this writer reads {RECORD_SCHEMA:?})"))
        }
        (None, _) => ("poison_record", "the record is not JSON with a \"schema\" string".to_string()),
    }
}

/// The writer's handler: read the record, write it until the target answers something final,
/// decide its settlement.
struct Writer {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

/// What the writer decided, for its metrics and the ledger once the settlement is applied.
enum Note {
    Written { fetched_at_ms: Option<i64> },
    DeadLettered { class: ErrorClass, reason: &'static str },
    Retried { tier: String, attempts: u32 },
    Other,
}

/// The order a record is, as the ledger names it.
struct Order {
    account: String,
    ids: OrderIds,
    version: Option<String>,
    message_id: String,
}

impl Order {
    /// From the record and the source ids the transformer put in its headers (a record from an
    /// older transformer has only its record id, taken as the o_id).
    fn of(message: &Message, account: &str, id: &str, version: Option<&str>) -> Order {
        let mut ids = OrderIds::from_headers(|key| message.header_str(key));
        if ids.o_id.is_none() {
            ids.o_id = message.header_str(header::ORDER_ID).or_else(|| (!id.is_empty()).then(|| id.to_string()));
        }
        Order {
            account: account.to_string(),
            ids,
            version: version.map(str::to_string),
            message_id: message.message_id(),
        }
    }

    fn event(&self, what: What) -> Event {
        Event::new(what, &self.account, &self.message_id).ids(&self.ids).version(self.version.clone())
    }
}

impl Handler for Writer {
    type Note = (Note, Order);

    async fn decide(&self, message: &Message) -> (Settlement, Self::Note) {
        match read(&self.shared, message) {
            Ok(record) => {
                let order = Order::of(message, &record.account, &record.id, Some(&record.version));
                let (settlement, note) = self.write_until_final(message, &record, &order).await;
                (settlement, (note, order))
            }
            Err((reason, detail)) => {
                tracing::warn!(message = "Unreadable record dead-lettered.", message_id = %message.message_id(), reason, %detail);
                let (settlement, note) = dead_letter(&self.shared, ErrorClass::Permanent, reason, detail);
                (settlement, (note, Order::of(message, "", "", None)))
            }
        }
    }

    fn settled(&self, message: &Message, (note, order): Self::Note, applied: Applied) {
        let metrics = &self.shared.metrics;
        let ledger = &self.shared.ledger;
        match (note, applied) {
            (Note::Written { fetched_at_ms: Some(fetched) }, Applied::Done) => {
                metrics.fetch_to_write_seconds.observe((now_ms() - fetched).max(0) as f64 / 1000.0);
            }
            (Note::DeadLettered { class, reason }, Applied::Done) => {
                metrics.dead_letters.with_label_values(&[class.as_str(), reason]).inc();
                let what = What::DeadLettered { class: class.as_str().into(), reason: reason.into() };
                ledger.record(order.event(what));
            }
            (Note::Retried { tier, attempts }, Applied::Done) => {
                metrics.retries.with_label_values(&[&tier]).inc();
                tracing::debug!(message = "Write failed; retrying later.", message_id = %message.message_id(), %tier);
                ledger.record(order.event(What::Retry { tier, attempts }));
            }
            (_, Applied::Parked) => {
                let reason = "held past HOLD_LIMIT (the target, or the broker, refused everyone)";
                ledger.record(order.event(What::Parked { reason: reason.into() }));
            }
            _ => {}
        }
    }
}

/// The record in a delivery, or why it is not one (the dead letter's reason and detail).
fn read<'m>(shared: &Shared, message: &'m Message) -> Result<RawRecord<'m>, (&'static str, String)> {
    let max = shared.config.max_record_bytes;
    if message.body.len() > max {
        return Err((
            "oversized",
            format!("the record is {} bytes; WRITER_MAX_RECORD_BYTES is {max}", message.body.len()),
        ));
    }
    // One parse for a good record; a bad one is looked at again to say why.
    match serde_json::from_slice::<RawRecord>(&message.body) {
        Ok(record) if record.schema == RECORD_SCHEMA => Ok(record),
        parsed => Err(unreadable(&message.body, parsed)),
    }
}

/// What a write's answer leads to: another write, or the record's settlement.
enum Next {
    Again,
    Settle(Settlement, Note),
}

/// How one record's writes have gone so far.
struct Tries {
    /// Attempts spent before this delivery (the `x-orderflow-attempt` header).
    before: u32,
    in_place: u32,
    throttled: u32,
    /// No write of this record has been tried in this delivery yet (the breaker's probe rule).
    first: bool,
}

/// Records one write and its answer in the ledger: written, or an attempt that did not write it.
fn record_write(shared: &Shared, order: &Order, attempt: u32, outcome: &WriteOutcome, answer: Answer) {
    if !shared.ledger.is_on() {
        return;
    }
    let Answer { status, code, message, duplicate } = answer;
    let what = match outcome {
        WriteOutcome::Written => What::Written { attempt, status, duplicate },
        other => {
            let kind = match other {
                WriteOutcome::Permanent { .. } => "permanent",
                WriteOutcome::TargetDown { .. } => "target",
                _ => "transient",
            };
            let message = message.or_else(|| other.error().map(|e| orderflow_shared::amqp::headers::clip(e, 300)));
            What::Attempt { attempt, status, code, message, outcome: kind.into() }
        }
    };
    shared.ledger.record(order.event(what));
}

impl Writer {
    /// Writes until the answer settles the record; holds it (spending no attempt) while the
    /// breaker is open or a pause is in force, parks it at `HOLD_LIMIT`, requeues it on shutdown.
    async fn write_until_final(&self, message: &Message, record: &RawRecord<'_>, order: &Order) -> (Settlement, Note) {
        let shared = &self.shared;
        let before = u32::try_from(message.header_i64(header::ATTEMPT).unwrap_or(0)).unwrap_or(0);
        let mut tries = Tries { before, in_place: 0, throttled: 0, first: before == 0 };
        let hold_until = message.received + shared.config.hold_limit;
        loop {
            let probe = tokio::select! {
                _ = self.shutdown.cancelled() => return (Settlement::Requeue, Note::Other),
                _ = tokio::time::sleep_until(hold_until) => return (Settlement::Park, Note::Other),
                // The breaker lets the write go, then any `Retry-After` pause in force is waited out.
                probe = async {
                    let probe = shared.breaker.acquire().await;
                    shared.pace.unpaused().await;
                    probe
                } => probe,
            };
            let (outcome, answer) = attempt(shared, message, record, tries.before).await;
            record_write(shared, order, tries.before + 1, &outcome, answer);
            note_target(shared, &outcome);
            note_breaker(shared, judge(&shared.breaker, &outcome, probe, tries.first));
            match self.next(message, record, outcome, &mut tries).await {
                Next::Again => continue,
                Next::Settle(settlement, note) => return (settlement, note),
            }
        }
    }

    /// Decides what follows one write's answer.
    async fn next(&self, message: &Message, record: &RawRecord<'_>, outcome: WriteOutcome, tries: &mut Tries) -> Next {
        let shared = &self.shared;
        let (reason, detail, retry_after) = match outcome {
            WriteOutcome::Written => {
                let fetched_at_ms = message.header_i64(header::FETCHED_AT_MS);
                return Next::Settle(Settlement::Ack, Note::Written { fetched_at_ms });
            }
            WriteOutcome::Permanent { detail } => {
                tracing::warn!(message = "Target rejected the record; dead-lettered.", message_id = %message.message_id(), o_id = %record.id, %detail);
                let error = format!("target rejected the record: {detail}");
                let (settlement, note) = dead_letter(shared, ErrorClass::Permanent, "target_rejected", error);
                return Next::Settle(settlement, note);
            }
            WriteOutcome::TargetDown { .. } => {
                // Not the record's fault: wait for the breaker, spending no attempt.
                shared.metrics.held_during_outage.inc();
                return Next::Again;
            }
            WriteOutcome::Transient { reason, detail, retry_after, .. } => (reason, detail, retry_after),
        };
        if shared.breaker.state() != State::Closed {
            // An outage: wait for the breaker instead of spending an attempt.
            shared.metrics.held_during_outage.inc();
            return Next::Again;
        }
        // A 429 says "not so fast", not "this record failed": every write already waits out its
        // Retry-After, and the record waits with them (up to HOLD_LIMIT, then it is parked)
        // instead of spending attempts and climbing the tiers.
        if reason == "http_429" {
            if retry_after.is_none() {
                tokio::time::sleep(in_place_delay(tries.throttled.min(4))).await;
            }
            tries.throttled = tries.throttled.saturating_add(1);
            tries.first = false;
            shared.metrics.throttled.inc();
            return Next::Again;
        }
        // A flaky second: try again at once (jittered, well under a second in all) rather than
        // sending the record to a tier for a one-off failure.
        if tries.in_place < shared.config.retry_in_place && retry_after.is_none_or(|d| d <= IN_PLACE_WAIT_MAX) {
            tokio::time::sleep(in_place_delay(tries.in_place)).await;
            tries.in_place += 1;
            tries.first = false;
            shared.metrics.retries_in_place.inc();
            return Next::Again;
        }
        let (settlement, note) = retry_later(shared, message, record, tries.before + 1, reason, detail, retry_after);
        Next::Settle(settlement, note)
    }
}

/// Tells the breaker how a write went; the new state if it changed.
fn judge(breaker: &Breaker, outcome: &WriteOutcome, probe: bool, first_write: bool) -> Option<State> {
    match outcome {
        WriteOutcome::TargetDown { .. } => breaker.trip(probe),
        WriteOutcome::Written | WriteOutcome::Permanent { .. } => breaker.record(true, false, probe, first_write),
        WriteOutcome::Transient { connection, .. } => breaker.record(false, *connection, probe, first_write),
    }
}

/// A `Retry-After` this short is waited out in place (every write pauses for it anyway).
const IN_PLACE_WAIT_MAX: Duration = Duration::from_secs(1);

/// The wait before in-place retry `n` (0-based): 50-150 ms, then 100-300 ms, … (jittered so
/// writers that failed together do not retry together).
fn in_place_delay(n: u32) -> Duration {
    let base = 50u64.saturating_mul(1 << n.min(4));
    Duration::from_millis(base + orderflow_shared::rng::Rng::from_entropy().below(base.saturating_mul(2)))
}

/// One write of the record, measured and traced; what the target answered.
async fn attempt(
    shared: &Shared,
    message: &Message,
    record: &RawRecord<'_>,
    attempts_before: u32,
) -> (WriteOutcome, Answer) {
    let metrics = &shared.metrics;
    let slot = shared.pace.acquire().await;
    metrics.inflight.inc();
    let timer = metrics.write_seconds.start_timer();
    let span = shared.tracer.enabled().then(|| write_span(message, record, attempts_before));
    let (outcome, answer) = write(&shared.target, record, &message.message_id()).await;
    timer.observe_duration();
    metrics.inflight.dec();
    let adaptive = shared.pace.done(slot, outcome.signal());
    if let WriteOutcome::Transient { retry_after: Some(after), .. } = &outcome {
        shared.pace.pause(*after); // the target asked everyone to wait, not just this record
    }
    if let Some((limit, floor)) = adaptive {
        metrics.concurrency_limit.set(limit.floor() as i64);
        metrics.latency_floor.set(floor.map_or(0.0, |f| f.as_secs_f64()));
    }
    metrics.writes.with_label_values(&[outcome.label()]).inc();
    if let Some(span) = span {
        span.record("outcome", outcome.label());
        if let Some(error) = outcome.error() {
            orderflow_shared::otel::fail(&span, error);
        }
    }
    (outcome, answer)
}

/// The span of one write (made only when exporting): a child of the record's span, ended when
/// dropped after the write.
fn write_span(message: &Message, record: &RawRecord<'_>, attempts_before: u32) -> tracing::Span {
    let io_id = serde_json::from_str::<serde_json::Value>(record.data.get())
        .ok()
        .and_then(|d| d.get("io_id").and_then(orderflow_shared::json::scalar_text))
        .unwrap_or_default();
    let span = tracing::info_span!(target: orderflow_shared::otel::TARGET, parent: None, "write record",
        otel.kind = orderflow_shared::otel::CLIENT,
        o_id = %record.id,
        io_id = %io_id,
        messaging.message_id = %message.message_id(),
        attempt = attempts_before + 1,
        outcome = tracing::field::Empty,
    );
    orderflow_shared::otel::join(&span, message.header_str(header::TRACEPARENT).as_deref());
    span
}

/// A transient failure: into the retry tier for this attempt, or dead-lettered as exhausted.
fn retry_later(
    shared: &Shared,
    message: &Message,
    record: &RawRecord<'_>,
    attempts: u32,
    reason: &str,
    detail: String,
    retry_after: Option<Duration>,
) -> (Settlement, Note) {
    let tier = choose_tier(&shared.topology.retry_tiers, attempts, retry_after);
    match tier {
        Some(tier) if attempts < shared.config.max_attempts => {
            (Settlement::Retry { tier, attempts }, Note::Retried { tier: tier_label(tier), attempts })
        }
        _ => {
            tracing::warn!(message = "Record exhausted its attempts; dead-lettered.", message_id = %message.message_id(), o_id = %record.id, attempts, %detail);
            let error = format!("{attempts} attempts; last error ({reason}): {detail}");
            dead_letter(shared, ErrorClass::Exhausted, "exhausted", error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason_of(body: &[u8]) -> (&'static str, String) {
        match serde_json::from_slice::<RawRecord>(body) {
            Ok(record) if record.schema == RECORD_SCHEMA => ("readable", String::new()),
            parsed => unreadable(body, parsed),
        }
    }

    #[test]
    fn a_good_record_is_read_once_and_a_bad_one_gets_its_reason() {
        let good = br#"{"schema":"orderflow.record.v1","account":"a","id":"1","version":"9","data":{"amount":150.75}}"#;
        let record = serde_json::from_slice::<RawRecord>(good).expect("record");
        assert_eq!(record.data.get(), r#"{"amount":150.75}"#, "data is posted as it arrived");
        assert_eq!(reason_of(good).0, "readable");
        assert_eq!(reason_of(b"not json").0, "poison_record");
        assert_eq!(reason_of(br#"{"id":"1"}"#).0, "poison_record");
        let (reason, detail) = reason_of(br#"{"schema":"orderflow.record.v9","id":"1"}"#);
        assert_eq!(reason, "unknown_schema");
        assert!(detail.contains("orderflow.record.v9"), "{detail}");
        let (reason, detail) = reason_of(br#"{"schema":"orderflow.record.v1","account":"a","id":"1","version":"9"}"#);
        assert_eq!(reason, "poison_record");
        assert!(detail.contains("data"), "{detail}");
    }

    #[test]
    fn the_payload_carries_the_data_verbatim() {
        let data = serde_json::value::RawValue::from_string(r#"{"amount":150.75,"name":"张**"}"#.into()).expect("raw");
        let payload = Payload { api: "空操作", method: "POST", id_check: true, data: &data };
        let text = serde_json::to_string(&payload).expect("json");
        assert_eq!(text, r#"{"api":"空操作","method":"POST","idCheck":true,"data":{"amount":150.75,"name":"张**"}}"#);
    }
}
