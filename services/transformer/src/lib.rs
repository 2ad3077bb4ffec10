//! The transformer: raw pages in, cleaned and mapped records out (confirmed), invalid orders
//! dead-lettered with a reason naming the field and value. A page is acked only after every
//! record and dead letter from it is confirmed by the broker.

pub mod check;
pub mod mapping;
pub mod metrics;
pub mod page;

pub use metrics::Metrics;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{
        Applied, Connections, DeadLetter, ErrorClass, Fatal, Headers, Message, Outgoing, Settlement, Stage, Topology,
        consume::{self, Handler, Serve},
        headers::{json_properties, set_i64, set_str},
        ledger::StageLedger,
        settle::{Policy, SettleMetrics},
        supervise,
        topology::{PAGE_ROUTING_KEY, RECORD_ROUTING_KEY},
    },
    ledger::{Event, Ledger, OrderIds, What},
    messages::{PAGE_SCHEMA, header},
    settings::{BrokerArgs, LedgerArgs, LogArgs},
    trace::child_traceparent,
};
use prometheus::IntGauge;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    mapping::Mapping,
    page::{PageOutcome, transform_page},
};

/// Transforms raw Jushuitan pages into mapped records.
#[derive(Debug, Clone, Parser)]
#[command(name = "transformer", version, about, long_about = None, after_help = orderflow_shared::settings::SECRETS_HELP)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9102")]
    pub admin_addr: SocketAddr,
    /// Mapping file (JSON, see README); default: the shipped Jushuitan mapping.
    #[arg(long, env = "MAPPING_FILE")]
    pub mapping_file: Option<PathBuf>,
    /// Pages processed at once (the consumer prefetch).
    #[arg(long, env = "TRANSFORMER_PREFETCH", default_value_t = 16)]
    pub prefetch: u16,
    /// A page larger than this (bytes) is dead-lettered as `oversized` without being parsed.
    #[arg(long, env = "TRANSFORMER_MAX_PAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_page_bytes: usize,
    /// A page whose records the broker keeps refusing (a full records queue) is held at most this
    /// long, then parked: republished to the pages queue (confirmed) and acked, so the broker's
    /// ack timeout (30 min) never closes the channel on it and it never nears the delivery limit.
    #[arg(long, env = "HOLD_LIMIT", default_value = "20m", value_parser = orderflow_shared::settings::parse_duration)]
    pub hold_limit: Duration,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Validate a mapping and print the mapped output of a sample (no broker needed).
    CheckMapping {
        /// The mapping file to check.
        file: PathBuf,
        /// A sample: one order, a list of orders, or a page (`{"orders": [...]}`); default: a built-in Jushuitan order.
        #[arg(long)]
        input: Option<PathBuf>,
    },
}

/// Loads and compiles the mapping once; errors name the file and the rule.
pub fn load_mapping(path: Option<&PathBuf>) -> Result<Mapping, String> {
    match path {
        None => Ok(Mapping::default_jushuitan()),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("MAPPING_FILE {}: {e}", path.display()))?;
            Mapping::parse_str(&text).map_err(|e| format!("MAPPING_FILE {}: {e}", path.display()))
        }
    }
}

struct Shared {
    declare_topology: bool,
    confirm_timeout: Duration,
    hold_limit: Duration,
    max_page_bytes: usize,
    tracer: orderflow_shared::otel::Tracer,
    mapping: Mapping,
    topology: Topology,
    metrics: Metrics,
    /// The first account seen, until a second one shows whether ids can collide (warned once).
    id_check: std::sync::Mutex<AccountIds>,
    /// What became of each order of a page (transformed, dropped, rejected).
    ledger: Ledger,
}

/// Records of several merchants written with ids from the order alone (`o_id`) collide when the
/// merchants' numbering overlaps, and the target's idCheck then answers one merchant's order as
/// the other's duplicate: a silent loss. Warned once, when a second account's page arrives.
#[derive(Default)]
struct AccountIds {
    first: Option<String>,
    warned: bool,
}

impl AccountIds {
    fn see(&mut self, mapping: &Mapping, account: &str) {
        if self.warned || mapping.id.uses_account() {
            return;
        }
        match &self.first {
            None => self.first = Some(account.to_string()),
            Some(first) if first != account => {
                self.warned = true;
                tracing::warn!(
                    message = "Pages from several accounts, and record ids that do not name the account: if the merchants' order ids can overlap, the target's idCheck will drop one merchant's order as the other's duplicate. Use a record id like \"{account}:{o_id}\" in the mapping (record.id and the id field).",
                    id = %mapping.id.text, accounts = ?[first.as_str(), account]
                );
            }
            Some(_) => {}
        }
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mapping = load_mapping(config.mapping_file.as_ref()).map_err(Fatal)?;
    if config.hold_limit.is_zero() {
        return Err(Fatal("HOLD_LIMIT must be positive (e.g. 20m)".into()).into());
    }
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let bound = admin::spawn(config.admin_addr, metrics.registry.clone(), readiness.clone(), shutdown.clone())
        .await
        .map_err(|e| Fatal(format!("ADMIN_ADDR {}: {e}", config.admin_addr)))?;
    tracing::info!(message = "Transformer started.", admin = %bound, ns = %config.broker.ns, mapping = ?config.mapping_file.as_ref().map(|p| p.display().to_string()));
    let name = orderflow_shared::amqp::connection_name("transformer", &config.broker.ns);
    let stage_ledger =
        StageLedger::start("transformer", &config.ledger, &config.broker, &name, &metrics.registry, &readiness);
    let shared = Arc::new(Shared {
        ledger: stage_ledger.ledger.clone(),
        declare_topology: config.broker.declare_topology,
        confirm_timeout: config.broker.amqp_confirm_timeout,
        hold_limit: config.hold_limit,
        max_page_bytes: config.max_page_bytes,
        tracer: orderflow_shared::otel::Tracer::current(),
        mapping,
        topology: Topology::new(config.broker.ns.clone()),
        metrics,
        id_check: std::sync::Mutex::new(AccountIds::default()),
    });
    let broker_metrics = shared.metrics.broker.clone();
    let result = supervise(&config.broker, &name, &shutdown, &readiness, &broker_metrics, |connections| {
        session(connections, shared.clone(), config.prefetch, shutdown.clone(), readiness.clone())
    })
    .await;
    // Every page is settled by now: what they recorded goes out before the ledger stops.
    stage_ledger.stop().await;
    result
}

/// One broker session: pages are consumed and acked on one connection, records and dead letters
/// published on the other.
async fn session(
    connections: Connections,
    shared: Arc<Shared>,
    prefetch: u16,
    shutdown: CancellationToken,
    readiness: Readiness,
) -> anyhow::Result<()> {
    let topology = shared.topology.clone();
    let policy = Policy {
        park_to: (topology.pages_exchange(), PAGE_ROUTING_KEY.to_string()),
        topology,
        hold_limit: shared.hold_limit,
        metrics: SettleMetrics {
            publish_retries: shared.metrics.publish_retries.clone(),
            parked: shared.metrics.parked.clone(),
        },
    };
    let serve = Serve {
        queue: shared.topology.pages_queue(),
        prefetch,
        declare: shared.declare_topology,
        confirm_timeout: shared.confirm_timeout,
        shutdown: &shutdown,
        readiness: &readiness,
        lost_acks: shared.metrics.broker.lost_acks.clone(),
        policy,
    };
    consume::serve(&connections, serve, Arc::new(Transformer(shared))).await
}

/// Counts a page in flight until dropped (settled, failed or cancelled).
struct InFlight(IntGauge);

impl InFlight {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The transformer's handler: a page in, its records and rejected orders out.
struct Transformer(Arc<Shared>);

/// What a page turned into, for the metrics, spans and the ledger once it is settled.
struct Note {
    _in_flight: InFlight,
    outcome: Counts,
    /// The records' spans (when exporting): they end when the page is settled.
    spans: Vec<tracing::Span>,
    /// What became of each order, recorded once the page is settled (empty with the ledger off).
    events: Vec<Event>,
}

enum Counts {
    Poison { reason: &'static str },
    Transformed { records: u64, rejects: Vec<&'static str>, dropped: u64, duplicates: u64 },
}

impl Handler for Transformer {
    type Note = Note;

    async fn decide(&self, message: &Message) -> (Settlement, Note) {
        let shared = &self.0;
        let in_flight = InFlight::new(&shared.metrics.pages_in_flight);
        let outcome = if message.body.len() > shared.max_page_bytes {
            let detail = format!(
                "the page is {} bytes; TRANSFORMER_MAX_PAGE_BYTES is {}",
                message.body.len(),
                shared.max_page_bytes
            );
            PageOutcome::Poison { reason: "oversized", detail }
        } else {
            transform_page(&shared.mapping, &message.body)
        };
        let mut events = Vec::new();
        let (settlement, outcome, spans) = match outcome {
            PageOutcome::Poison { reason, detail } => {
                tracing::warn!(message = "Poison page dead-lettered.", message_id = %message.message_id(), reason, %detail);
                (Settlement::DeadLetter(shared.dead_letter(reason, detail)), Counts::Poison { reason }, Vec::new())
            }
            PageOutcome::Transformed(t) => {
                if shared.ledger.is_on() {
                    events = ledger_events(message, &t);
                }
                shared.id_check.lock().unwrap_or_else(|e| e.into_inner()).see(&shared.mapping, &t.account);
                let mut spans = Vec::new();
                let mut out = shared.records(message, &t, &mut spans);
                out.extend(shared.rejects(message, &t));
                let counts = Counts::Transformed {
                    records: t.records.len() as u64,
                    rejects: t.rejects.iter().map(|r| r.reason.as_str()).collect(),
                    dropped: t.dropped as u64,
                    duplicates: t.duplicates as u64,
                };
                (Settlement::Forward(out), counts, spans)
            }
        };
        (settlement, Note { _in_flight: in_flight, outcome, spans, events })
    }

    fn settled(&self, message: &Message, note: Note, applied: Applied) {
        let metrics = &self.0.metrics;
        if applied != Applied::Done {
            for span in &note.spans {
                orderflow_shared::otel::fail(span, "the page was not forwarded (parked or requeued)");
            }
            return;
        }
        match note.outcome {
            Counts::Poison { reason } => {
                metrics.pages.with_label_values(&["poison"]).inc();
                metrics.rejected.with_label_values(&[reason]).inc();
            }
            Counts::Transformed { records, rejects, dropped, duplicates } => {
                self.0.ledger.record_all(note.events);
                metrics.records.inc_by(records);
                for reason in rejects {
                    metrics.rejected.with_label_values(&[reason]).inc();
                }
                metrics.dropped.inc_by(dropped);
                metrics.duplicates.inc_by(duplicates);
                metrics.pages.with_label_values(&["ok"]).inc();
            }
        }
        metrics.page_seconds.observe(message.received.elapsed().as_secs_f64());
        drop(note.spans);
    }
}

impl Shared {
    fn dead_letter(&self, reason: &str, error: String) -> DeadLetter {
        DeadLetter {
            stage: Stage::Transformer,
            class: ErrorClass::Permanent,
            reason: reason.to_string(),
            error,
            origin_exchange: self.topology.pages_exchange(),
            origin_routing_key: PAGE_ROUTING_KEY.to_string(),
        }
    }

    /// The page's records, each with its trace context (and its span, when tracing).
    fn records(&self, message: &Message, t: &page::Transformed, spans: &mut Vec<tracing::Span>) -> Vec<Outgoing> {
        let parent_trace = message.header_str(header::TRACEPARENT);
        let fetched_at = message.header_i64(header::FETCHED_AT_MS);
        let exchange = self.topology.records_exchange();
        t.records
            .iter()
            .zip(&t.sources)
            .map(|(record, ids)| {
                let mut headers = Headers::default();
                set_i64(&mut headers, header::ATTEMPT, 0);
                ids.set_headers(|key, value| set_str(&mut headers, key, value));
                let (traceparent, span) =
                    orderflow_shared::otel::hop(&self.tracer, parent_trace.as_deref(), || record_span(record));
                spans.extend(span);
                set_str(&mut headers, header::TRACEPARENT, &traceparent);
                set_str(&mut headers, header::ORDER_ID, &record.id);
                if let Some(at) = fetched_at {
                    set_i64(&mut headers, header::FETCHED_AT_MS, at);
                }
                Outgoing {
                    exchange: exchange.clone(),
                    routing_key: RECORD_ROUTING_KEY.to_string(),
                    body: serde_json::to_vec(record).expect("a record serializes"),
                    properties: json_properties(&record.message_id(), headers),
                }
            })
            .collect()
    }

    /// The dead letters of the page's rejected orders, each a one-order page so a replay (after
    /// fixing the mapping) re-transforms it.
    fn rejects(&self, message: &Message, t: &page::Transformed) -> Vec<Outgoing> {
        let page_id = message.message_id();
        let parent_trace = message.header_str(header::TRACEPARENT);
        t.rejects
            .iter()
            .map(|reject| {
                let single = json!({
                    "schema": PAGE_SCHEMA, "account": t.account, "cursor": t.cursor,
                    "fetched_at": orderflow_shared::time::rfc3339_china(jiff::Timestamp::now()), "orders": [reject.order],
                });
                let order_id = reject
                    .order
                    .get("o_id")
                    .and_then(orderflow_shared::json::scalar_text)
                    .unwrap_or_else(|| format!("#{}", reject.index));
                tracing::warn!(message = "Order dead-lettered.", message_id = %page_id, o_id = %order_id, reason = reject.reason.as_str(), detail = %reject.detail);
                let mut headers = Headers::default();
                set_str(&mut headers, header::TRACEPARENT, &child_traceparent(parent_trace.as_deref()));
                set_str(&mut headers, header::ORDER_ID, &order_id);
                OrderIds::of_row(&reject.order).set_headers(|key, value| set_str(&mut headers, key, value));
                let props = json_properties(&format!("{page_id}:order:{}", reject.index), headers);
                let dl = self.dead_letter(reject.reason.as_str(), format!("{}: {}", reject.reason.as_str(), reject.detail));
                dl.outgoing(&self.topology, serde_json::to_vec(&single).expect("JSON serializes"), &props)
            })
            .collect()
    }
}

/// What became of each order of a transformed page, for the ledger: its record published, left
/// out by a filter, or rejected (its dead letter's id).
fn ledger_events(message: &Message, t: &page::Transformed) -> Vec<Event> {
    let page_id = message.message_id();
    let account = t.account.as_str();
    let mut events = Vec::with_capacity(t.records.len() + t.drops.len() + t.rejects.len());
    for (record, ids) in t.records.iter().zip(&t.sources) {
        events.push(
            Event::new(What::Transformed, account, record.message_id()).ids(ids).version(Some(record.version.clone())),
        );
    }
    for (ids, version, rule) in &t.drops {
        events.push(
            Event::new(What::Dropped { rule: rule.clone() }, account, &page_id).ids(ids).version(version.clone()),
        );
    }
    for reject in &t.rejects {
        let what = What::Rejected { reason: format!("{}: {}", reject.reason.as_str(), reject.detail) };
        let id = format!("{page_id}:order:{}", reject.index);
        let version = OrderIds::row_version(&reject.order);
        events.push(Event::new(what, account, id).ids(&OrderIds::of_row(&reject.order)).version(version));
    }
    events
}

/// A record's span (made only when exporting).
fn record_span(record: &orderflow_shared::messages::Record) -> tracing::Span {
    let io_id = record.data.get("io_id").and_then(orderflow_shared::json::scalar_text).unwrap_or_default();
    tracing::info_span!(target: orderflow_shared::otel::TARGET, parent: None, "transform record",
        otel.kind = orderflow_shared::otel::CONSUMER,
        o_id = %record.id,
        io_id = %io_id,
        account = %record.account,
        messaging.message_id = %record.message_id(),
    )
}
