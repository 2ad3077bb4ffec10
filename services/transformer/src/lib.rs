//! The transformer: raw pages in, cleaned and mapped records out (confirmed), invalid orders
//! dead-lettered with a reason naming the field and value. A page is acked only after every
//! record and dead letter from it is confirmed by the broker.

pub mod check;
pub mod mapping;
pub mod page;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use lapin::{BasicProperties, message::Delivery, types::FieldTable};
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{
        BrokerMetrics, Connections, DeadLetter, ErrorClass, Fatal, PublishError, Publisher, Stage, Topology, consume,
        headers::{get_str, json_properties, set_i64, set_str},
        supervise,
        topology::{PAGE_ROUTING_KEY, RECORD_ROUTING_KEY},
    },
    backoff::Backoff,
    messages::{PAGE_SCHEMA, header},
    settings::{BrokerArgs, LogArgs},
    trace::child_traceparent,
};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::{
    mapping::Mapping,
    page::{PageOutcome, transform_page},
};

/// Transforms raw Jushuitan pages into mapped records.
#[derive(Debug, Clone, Parser)]
#[command(name = "transformer", version, about, long_about = None)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub log: LogArgs,
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

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub pages: IntCounterVec,
    pub records: IntCounter,
    pub rejected: IntCounterVec,
    pub dropped: IntCounter,
    pub duplicates: IntCounter,
    pub publish_retries: IntCounter,
    pub page_seconds: Histogram,
    pub pages_in_flight: IntGauge,
    pub parked: IntCounter,
    pub broker: BrokerMetrics,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| registry.register(c).expect("unique metric");
        let pages = IntCounterVec::new(
            Opts::new("orderflow_transform_pages_total", "Pages handled, by outcome (ok, poison)."),
            &["outcome"],
        )
        .expect("metric");
        reg(Box::new(pages.clone()));
        let records =
            IntCounter::new("orderflow_transform_records_total", "Records published (confirmed).").expect("metric");
        reg(Box::new(records.clone()));
        let rejected = IntCounterVec::new(
            Opts::new("orderflow_transform_rejected_total", "Orders dead-lettered, by reason."),
            &["reason"],
        )
        .expect("metric");
        reg(Box::new(rejected.clone()));
        let dropped = IntCounter::new("orderflow_transform_dropped_total", "Orders dropped by a mapping filter.")
            .expect("metric");
        reg(Box::new(dropped.clone()));
        let duplicates = IntCounter::new(
            "orderflow_transform_duplicates_total",
            "Orders repeated inside a page (highest version kept).",
        )
        .expect("metric");
        reg(Box::new(duplicates.clone()));
        let publish_retries = IntCounter::new(
            "orderflow_transform_publish_retries_total",
            "Record publishes retried after a nack or return.",
        )
        .expect("metric");
        reg(Box::new(publish_retries.clone()));
        let page_seconds = Histogram::with_opts(
            HistogramOpts::new("orderflow_transform_page_seconds", "Time from receiving a page to acking it.")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("metric");
        reg(Box::new(page_seconds.clone()));
        let pages_in_flight = IntGauge::new(
            "orderflow_transform_pages_in_flight",
            "Pages received and not yet acked (records being published and confirmed).",
        )
        .expect("metric");
        reg(Box::new(pages_in_flight.clone()));
        let parked = IntCounter::new(
            "orderflow_transform_parked_total",
            "Pages held past HOLD_LIMIT while the broker refused their records, parked back in the pages queue.",
        )
        .expect("metric");
        reg(Box::new(parked.clone()));
        let broker = BrokerMetrics::register(&registry);
        for outcome in ["ok", "poison"] {
            pages.with_label_values(&[outcome]);
        }
        for reason in ["invalid_record", "amount_mismatch", "poison_page", "unknown_schema", "oversized"] {
            rejected.with_label_values(&[reason]);
        }
        Self {
            registry,
            pages,
            records,
            rejected,
            dropped,
            duplicates,
            publish_retries,
            page_seconds,
            pages_in_flight,
            parked,
            broker,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
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
    let shared = Arc::new(Shared {
        declare_topology: config.broker.declare_topology,
        confirm_timeout: config.broker.amqp_confirm_timeout,
        hold_limit: config.hold_limit,
        max_page_bytes: config.max_page_bytes,
        tracer: orderflow_shared::otel::Tracer::from_env("orderflow-transformer", &shutdown),
        mapping,
        topology: Topology::new(config.broker.ns.clone()),
        metrics,
        id_check: std::sync::Mutex::new(AccountIds::default()),
    });
    let broker_metrics = shared.metrics.broker.clone();
    let name = orderflow_shared::amqp::connection_name("transformer", &config.broker.ns);
    supervise(&config.broker, &name, &shutdown, &readiness, &broker_metrics, |connections| {
        session(connections, shared.clone(), config.prefetch, shutdown.clone(), readiness.clone())
    })
    .await
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
    let channel = connections.consume.create_channel().await?;
    if shared.declare_topology {
        shared.topology.declare(&channel).await?;
    }
    let publisher = Publisher::open(&connections.publish).await?.with_confirm_timeout(shared.confirm_timeout);
    let queue = shared.topology.pages_queue();
    let lost_acks = shared.metrics.broker.lost_acks.clone();
    consume::run(channel, &queue, prefetch, &shutdown, &readiness, &lost_acks, |delivery, acks| {
        let shared = shared.clone();
        let publisher = publisher.clone();
        async move { handle_page(&shared, &publisher, &acks, delivery).await }
    })
    .await
}

/// Publishes a record, retrying with backoff (up to 5 s apart):
/// - a nack (the broker refuses: typically a full queue with reject-publish) is backpressure, so it
///   is retried for as long as it lasts. The page waits unacked, which holds the pipeline back
///   without failing the page to the broker: a failed page counts towards its delivery limit and
///   would end as a dead letter however healthy it is;
/// - a return (unroutable) is retried a few times, then the session reconnects (re-declaring the
///   topology) and the page is redelivered;
/// - a channel error is returned at once (same).
async fn publish_retrying(
    publisher: &Publisher,
    metrics: &Metrics,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: &BasicProperties,
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match publisher.publish(exchange, routing_key, body, props.clone()).await {
            Ok(()) => return Ok(()),
            Err(error) if error.ends_session() => return Err(error.into()),
            Err(error) if matches!(error, PublishError::Nacked) || backoff.attempts() < 5 => {
                metrics.publish_retries.inc();
                // The first refusal, then every 12th retry (under a minute apart) while it lasts.
                if backoff.attempts().is_multiple_of(12) {
                    tracing::warn!(
                        message = "Publish not confirmed; retrying.", %error, exchange, attempts = backoff.attempts() + 1
                    );
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(error) => {
                return Err(anyhow::Error::from(error).context(format!("publishing to {exchange} kept failing")));
            }
        }
    }
}

/// How soon a park the broker refused is tried again.
const PARK_RETRY: Duration = Duration::from_secs(5);

/// Republishes a page held past `HOLD_LIMIT` to the back of the pages queue (confirmed), counting
/// `x-orderflow-parked`. `Ok(false)` when the broker refused that too: the page is held on; an
/// error that ends the session (a lost channel, no confirm) is returned.
async fn park(shared: &Shared, publisher: &Publisher, delivery: &Delivery, page_id: &str) -> anyhow::Result<bool> {
    let parked = orderflow_shared::amqp::headers::get_i64(&delivery.properties, header::PARKED).unwrap_or(0) + 1;
    let mut headers = orderflow_shared::amqp::headers::headers_of(&delivery.properties);
    set_i64(&mut headers, header::PARKED, parked);
    let props = delivery.properties.clone().with_headers(headers);
    let exchange = shared.topology.pages_exchange();
    match publisher.publish(&exchange, PAGE_ROUTING_KEY, &delivery.data, props).await {
        Ok(()) => {
            shared.metrics.parked.inc();
            tracing::warn!(message = "Page held too long while the broker refused its records; parked at the back of the pages queue.", message_id = %page_id, parked, hold_limit = ?shared.hold_limit);
            Ok(true)
        }
        Err(error) if error.ends_session() => Err(anyhow::Error::from(error).context("parking a page")),
        Err(error) => {
            tracing::warn!(message = "Could not park a page held too long; holding it on.", message_id = %page_id, %error);
            Ok(false)
        }
    }
}

/// Counts a page in flight until dropped (acked, failed or cancelled).
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

async fn handle_page(
    shared: &Shared,
    publisher: &Publisher,
    acks: &consume::Acks,
    delivery: Delivery,
) -> anyhow::Result<()> {
    let _in_flight = InFlight::new(&shared.metrics.pages_in_flight);
    let timer = shared.metrics.page_seconds.start_timer();
    let received_nanos = orderflow_shared::otel::now_nanos();
    let metrics = &shared.metrics;
    let topology = &shared.topology;
    let page_id = delivery.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default();
    let outcome = if delivery.data.len() > shared.max_page_bytes {
        PageOutcome::Poison {
            reason: "oversized",
            detail: format!(
                "the page is {} bytes; TRANSFORMER_MAX_PAGE_BYTES is {}",
                delivery.data.len(),
                shared.max_page_bytes
            ),
        }
    } else {
        transform_page(&shared.mapping, &delivery.data)
    };
    let page_dead_letter = |reason: &str, error: String| DeadLetter {
        stage: Stage::Transformer,
        class: ErrorClass::Permanent,
        reason: reason.to_string(),
        error,
        origin_exchange: topology.pages_exchange(),
        origin_routing_key: PAGE_ROUTING_KEY.to_string(),
    };
    let transformed = match outcome {
        PageOutcome::Poison { reason, detail } => {
            tracing::warn!(message = "Poison page dead-lettered.", message_id = %page_id, reason, %detail);
            page_dead_letter(reason, detail).publish(publisher, topology, &delivery.data, &delivery.properties).await?;
            metrics.pages.with_label_values(&["poison"]).inc();
            metrics.rejected.with_label_values(&[reason]).inc();
            acks.ack(&delivery)?;
            timer.observe_duration();
            return Ok(());
        }
        PageOutcome::Transformed(t) => t,
    };
    shared.id_check.lock().unwrap_or_else(|e| e.into_inner()).see(&shared.mapping, &transformed.account);
    let parent_trace = get_str(&delivery.properties, header::TRACEPARENT);
    let fetched_at = orderflow_shared::amqp::headers::get_i64(&delivery.properties, header::FETCHED_AT_MS);
    let records_exchange = topology.records_exchange();
    let mut publishes = Vec::with_capacity(transformed.records.len() + transformed.rejects.len());
    let mut spans = Vec::new();
    let parent_span = parent_trace.as_deref().and_then(orderflow_shared::otel::ids).map(|(_, span)| span);
    for record in &transformed.records {
        let mut headers = FieldTable::default();
        set_i64(&mut headers, header::ATTEMPT, 0);
        let traceparent = child_traceparent(parent_trace.as_deref());
        if shared.tracer.enabled()
            && let Some((trace_id, span_id)) = orderflow_shared::otel::ids(&traceparent)
        {
            let io_id = record.data.get("io_id").and_then(orderflow_shared::json::scalar_text).unwrap_or_default();
            spans.push(orderflow_shared::otel::Span {
                trace_id,
                span_id,
                parent_span_id: parent_span.clone(),
                name: "transform record",
                kind: 5,
                start_unix_nanos: received_nanos,
                end_unix_nanos: 0,
                attributes: vec![
                    ("o_id", record.id.clone()),
                    ("io_id", io_id),
                    ("account", record.account.clone()),
                    ("messaging.message_id", record.message_id()),
                ],
                error: None,
            });
        }
        set_str(&mut headers, header::TRACEPARENT, &traceparent);
        set_str(&mut headers, header::ORDER_ID, &record.id);
        if let Some(at) = fetched_at {
            set_i64(&mut headers, header::FETCHED_AT_MS, at);
        }
        let body = serde_json::to_vec(record)?;
        let props = json_properties(&record.message_id(), headers);
        let exchange = records_exchange.clone();
        publishes.push(futures_util::future::Either::Left(async move {
            publish_retrying(publisher, metrics, &exchange, RECORD_ROUTING_KEY, &body, &props).await
        }));
    }
    for reject in &transformed.rejects {
        // The dead letter is a one-order page, so a replay (after fixing the mapping) re-transforms it.
        let single = json!({
            "schema": PAGE_SCHEMA, "account": transformed.account, "cursor": transformed.cursor,
            "fetched_at": orderflow_shared::time::rfc3339_china(jiff::Timestamp::now()), "orders": [reject.order],
        });
        let body = serde_json::to_vec(&single)?;
        let order_id = reject
            .order
            .get("o_id")
            .and_then(orderflow_shared::json::scalar_text)
            .unwrap_or_else(|| format!("#{}", reject.index));
        tracing::warn!(message = "Order dead-lettered.", message_id = %page_id, o_id = %order_id, reason = reject.reason.as_str(), detail = %reject.detail);
        let mut headers = FieldTable::default();
        set_str(&mut headers, header::TRACEPARENT, &child_traceparent(parent_trace.as_deref()));
        set_str(&mut headers, header::ORDER_ID, &order_id);
        let props = json_properties(&format!("{page_id}:order:{}", reject.index), headers);
        let dl = page_dead_letter(reject.reason.as_str(), format!("{}: {}", reject.reason.as_str(), reject.detail));
        publishes.push(futures_util::future::Either::Right(async move {
            dl.publish(publisher, topology, &body, &props).await.map_err(anyhow::Error::from)
        }));
    }
    let mut all = std::pin::pin!(futures_util::future::join_all(publishes));
    let mut park_at = tokio::time::Instant::now() + shared.hold_limit;
    let results = loop {
        tokio::select! {
            results = &mut all => break results,
            _ = tokio::time::sleep_until(park_at) => {
                // A refused park is tried again soon: the ack timeout is not far off.
                park_at = tokio::time::Instant::now() + PARK_RETRY.min(shared.hold_limit);
                if park(shared, publisher, &delivery, &page_id).await? {
                    // The records confirmed so far are published again with the page: the
                    // writer's idempotency key and the target's idCheck absorb them.
                    acks.ack(&delivery)?;
                    timer.observe_duration();
                    return Ok(());
                }
            }
        }
    };
    for result in results {
        result?;
    }
    let confirmed_nanos = orderflow_shared::otel::now_nanos();
    for mut span in spans {
        span.end_unix_nanos = confirmed_nanos;
        shared.tracer.record(span);
    }
    metrics.records.inc_by(transformed.records.len() as u64);
    for reject in &transformed.rejects {
        metrics.rejected.with_label_values(&[reject.reason.as_str()]).inc();
    }
    metrics.dropped.inc_by(transformed.dropped as u64);
    metrics.duplicates.inc_by(transformed.duplicates as u64);
    metrics.pages.with_label_values(&["ok"]).inc();
    acks.ack(&delivery)?;
    timer.observe_duration();
    Ok(())
}
