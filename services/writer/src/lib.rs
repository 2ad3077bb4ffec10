//! The writer: records in, `POST $TARGET_URL` out, with bounded concurrency, classified retries
//! through TTL tier queues, dead-lettering with the reason, and a circuit breaker so an outage
//! does not burn attempts. A record is acked only after the target's 2xx or after its retry or
//! dead letter is confirmed by the broker.

pub mod breaker;
pub mod classify;
pub mod metrics;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::Parser;
use lapin::{Connection, message::Delivery};
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{
        DeadLetter, ErrorClass, Fatal, Publisher, Stage, Topology, consume,
        headers::{get_i64, headers_of, set_i64, strip_broker_death_headers},
        supervise,
        topology::{RECORD_ROUTING_KEY, tier_label},
    },
    messages::{RECORD_SCHEMA, RawRecord, header, now_ms, schema_of},
    settings::{BrokerArgs, LogArgs, parse_duration},
};
use tokio_util::sync::CancellationToken;

use crate::{
    breaker::{Breaker, State},
    classify::{WriteOutcome, choose_tier, classify_status},
    metrics::Metrics,
};

/// Writes mapped records to the target write API.
#[derive(Debug, Clone, Parser)]
#[command(name = "writer", version, about, long_about = None)]
pub struct Config {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "ADMIN_ADDR", default_value = "127.0.0.1:9103")]
    pub admin_addr: SocketAddr,
    /// Full URL of the target's write endpoint (e.g. http://127.0.0.1:8082/data/write).
    #[arg(long, env = "TARGET_URL")]
    pub target_url: Option<String>,
    /// The payload's "api" value.
    #[arg(long, env = "TARGET_API", default_value = "空操作")]
    pub target_api: String,
    /// Extra header sent with every write, `Name: value` (e.g. `Authorization: Bearer …`; never logged).
    #[arg(long, env = "TARGET_AUTH_HEADER", hide_env_values = true)]
    pub target_auth_header: Option<String>,
    /// Writes in flight at once (also the consumer prefetch).
    #[arg(long, env = "WRITER_CONCURRENCY", default_value_t = 64)]
    pub concurrency: u16,
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
    #[arg(long, env = "RETRY_TIERS", default_value = "1s,10s,1m,10m", value_parser = parse_tiers)]
    pub retry_tiers: Tiers,
    /// A record larger than this (bytes) is dead-lettered as `oversized` without being sent.
    #[arg(long, env = "WRITER_MAX_RECORD_BYTES", default_value_t = 1024 * 1024)]
    pub max_record_bytes: usize,
}

#[derive(Debug, Clone)]
pub struct Tiers(pub Vec<Duration>);

pub fn parse_tiers(text: &str) -> Result<Tiers, String> {
    let mut tiers = text.split(',').map(|t| parse_duration(t.trim())).collect::<Result<Vec<_>, _>>()?;
    if tiers.is_empty() || tiers.iter().any(|t| t.is_zero()) {
        return Err("give at least one positive delay, e.g. 1s,10s,1m,10m".into());
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
}

struct Shared {
    tracer: orderflow_shared::otel::Tracer,
    config: Config,
    topology: Topology,
    target: Target,
    breaker: Breaker,
    metrics: Metrics,
}

impl Config {
    fn target(&self) -> Result<Target, String> {
        let url = self
            .target_url
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or("TARGET_URL is required (the full URL of the write endpoint)")?;
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("TARGET_URL {url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("TARGET_URL {url:?} must be http:// or https://"));
        }
        let auth = match self.target_auth_header.as_deref().filter(|s| !s.trim().is_empty()) {
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
        if self.concurrency == 0 {
            return Err("WRITER_CONCURRENCY must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("WRITER_MAX_ATTEMPTS must be at least 1".into());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.timeout)
            .pool_max_idle_per_host(usize::from(self.concurrency))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Target { http, url: url.to_string(), api: self.target_api.clone(), auth })
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
        message = "Writer started.", admin = %bound, ns = %config.broker.ns, target = %target.url,
        concurrency = config.concurrency, tiers = ?config.retry_tiers.0.iter().map(|t| tier_label(*t)).collect::<Vec<_>>()
    );
    let topology = Topology::new(config.broker.ns.clone()).with_retry_tiers(config.retry_tiers.0.clone());
    for tier in &topology.retry_tiers {
        metrics.retries.with_label_values(&[&tier_label(*tier)]);
    }
    let shared = Arc::new(Shared {
        tracer: orderflow_shared::otel::Tracer::from_env("orderflow-writer", &shutdown),
        topology,
        target,
        breaker: Breaker::new(breaker::Settings::default()),
        metrics,
        config: config.clone(),
    });
    let reconnects = shared.metrics.reconnects.clone();
    let name = orderflow_shared::amqp::connection_name("writer", &config.broker.ns);
    supervise(&config.broker, &name, &shutdown, &readiness, &reconnects, |connection| {
        session(connection, shared.clone(), shutdown.clone(), readiness.clone())
    })
    .await
}

async fn session(
    connection: Arc<Connection>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    readiness: Readiness,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    if shared.config.broker.declare_topology {
        shared.topology.declare(&channel).await?;
    }
    let publisher = Publisher::open(&connection).await?;
    let queue = shared.topology.records_queue();
    let stop = shutdown.clone();
    let lost_acks = shared.metrics.lost_acks.clone();
    consume::run(channel, &queue, shared.config.concurrency, &shutdown, &readiness, &lost_acks, |delivery, acks| {
        let shared = shared.clone();
        let publisher = publisher.clone();
        let stop = stop.clone();
        async move { handle_record(&shared, &publisher, &acks, &stop, delivery).await }
    })
    .await
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

/// One POST of the record's payload.
async fn write(target: &Target, record: &RawRecord<'_>, message_id: &str) -> WriteOutcome {
    let payload = Payload { api: &target.api, method: "POST", id_check: true, data: record.data };
    let mut request = target.http.post(&target.url).header("Idempotency-Key", message_id).json(&payload);
    if let Some((name, value)) = &target.auth {
        request = request.header(name.clone(), value.clone());
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after =
                response.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
            let body =
                if (200..300).contains(&status) { String::new() } else { response.text().await.unwrap_or_default() };
            classify_status(status, retry_after.as_deref(), &orderflow_shared::amqp::headers::clip(&body, 300))
        }
        Err(error) => {
            let timeout = error.is_timeout();
            let connect = error.is_connect();
            let error = error.without_url();
            let mut detail = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                detail.push_str(": ");
                detail.push_str(&cause.to_string());
                source = cause.source();
            }
            let reason = if timeout {
                "timeout"
            } else if connect {
                "connect"
            } else {
                "transport"
            };
            WriteOutcome::Transient { reason, detail, retry_after: None, connection: connect }
        }
    }
}

fn dead_letter(shared: &Shared, class: ErrorClass, reason: &str, error: String) -> DeadLetter {
    DeadLetter {
        stage: Stage::Writer,
        class,
        reason: reason.to_string(),
        error,
        origin_exchange: shared.topology.records_exchange(),
        origin_routing_key: RECORD_ROUTING_KEY.to_string(),
    }
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

async fn handle_record(
    shared: &Shared,
    publisher: &Publisher,
    acks: &consume::Acks,
    shutdown: &CancellationToken,
    delivery: Delivery,
) -> anyhow::Result<()> {
    let metrics = &shared.metrics;
    let message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default();
    if delivery.data.len() > shared.config.max_record_bytes {
        let detail = format!(
            "the record is {} bytes; WRITER_MAX_RECORD_BYTES is {}",
            delivery.data.len(),
            shared.config.max_record_bytes
        );
        tracing::warn!(message = "Oversized record dead-lettered.", message_id = %message_id, %detail);
        dead_letter(shared, ErrorClass::Permanent, "oversized", detail)
            .publish(publisher, &shared.topology, &delivery.data, &delivery.properties)
            .await?;
        metrics.dead_letters.with_label_values(&["permanent", "oversized"]).inc();
        return acks.ack(&delivery);
    }
    // One parse for a good record; a bad one is looked at again to say why.
    let record = match serde_json::from_slice::<RawRecord>(&delivery.data) {
        Ok(record) if record.schema == RECORD_SCHEMA => record,
        parsed => {
            let (reason, detail) = unreadable(&delivery.data, parsed);
            tracing::warn!(message = "Unreadable record dead-lettered.", message_id = %message_id, %detail);
            dead_letter(shared, ErrorClass::Permanent, reason, detail)
                .publish(publisher, &shared.topology, &delivery.data, &delivery.properties)
                .await?;
            metrics.dead_letters.with_label_values(&["permanent", reason]).inc();
            return acks.ack(&delivery);
        }
    };
    let attempts_before = get_i64(&delivery.properties, header::ATTEMPT).unwrap_or(0).max(0) as u32;
    loop {
        let probe = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()), // unacked: redelivered when the channel closes
            probe = shared.breaker.acquire() => probe,
        };
        metrics.inflight.inc();
        let timer = metrics.write_seconds.start_timer();
        let started_nanos = orderflow_shared::otel::now_nanos();
        let outcome = write(&shared.target, &record, &message_id).await;
        timer.observe_duration();
        metrics.inflight.dec();
        if shared.tracer.enabled() {
            let parent = orderflow_shared::amqp::headers::get_str(&delivery.properties, header::TRACEPARENT);
            if let Some((trace_id, parent_span)) = parent.as_deref().and_then(orderflow_shared::otel::ids) {
                let span_id =
                    orderflow_shared::otel::ids(&orderflow_shared::trace::child_traceparent(parent.as_deref()))
                        .map(|(_, s)| s)
                        .unwrap_or_default();
                shared.tracer.record(orderflow_shared::otel::Span {
                    trace_id,
                    span_id,
                    parent_span_id: Some(parent_span),
                    name: "write record",
                    kind: 3,
                    start_unix_nanos: started_nanos,
                    end_unix_nanos: orderflow_shared::otel::now_nanos(),
                    attributes: vec![
                        ("o_id", record.id.clone()),
                        (
                            "io_id",
                            serde_json::from_str::<serde_json::Value>(record.data.get())
                                .ok()
                                .and_then(|d| d.get("io_id").and_then(orderflow_shared::json::scalar_text))
                                .unwrap_or_default(),
                        ),
                        ("messaging.message_id", message_id.clone()),
                        ("outcome", outcome.label().to_string()),
                        ("attempt", (attempts_before + 1).to_string()),
                    ],
                    error: match &outcome {
                        WriteOutcome::Written => None,
                        WriteOutcome::Transient { detail, .. } | WriteOutcome::Permanent { detail } => {
                            Some(detail.clone())
                        }
                    },
                });
            }
        }
        metrics.writes.with_label_values(&[outcome.label()]).inc();
        let (ok, connection) = match &outcome {
            WriteOutcome::Written | WriteOutcome::Permanent { .. } => (true, false),
            WriteOutcome::Transient { connection, .. } => (false, *connection),
        };
        note_breaker(shared, shared.breaker.record(ok, connection, probe, attempts_before == 0));
        match outcome {
            WriteOutcome::Written => {
                if let Some(fetched) = get_i64(&delivery.properties, header::FETCHED_AT_MS) {
                    metrics.fetch_to_write_seconds.observe((now_ms() - fetched).max(0) as f64 / 1000.0);
                }
                return acks.ack(&delivery);
            }
            WriteOutcome::Permanent { detail } => {
                tracing::warn!(message = "Target rejected the record; dead-lettered.", message_id = %message_id, o_id = %record.id, %detail);
                dead_letter(
                    shared,
                    ErrorClass::Permanent,
                    "target_rejected",
                    format!("target rejected the record: {detail}"),
                )
                .publish(publisher, &shared.topology, &delivery.data, &delivery.properties)
                .await?;
                metrics.dead_letters.with_label_values(&["permanent", "target_rejected"]).inc();
                return acks.ack(&delivery);
            }
            WriteOutcome::Transient { reason, detail, retry_after, .. } => {
                if shared.breaker.state() != State::Closed {
                    // An outage: wait for the breaker instead of spending an attempt.
                    metrics.held_during_outage.inc();
                    continue;
                }
                let attempts = attempts_before + 1;
                if attempts >= shared.config.max_attempts {
                    tracing::warn!(message = "Record exhausted its attempts; dead-lettered.", message_id = %message_id, o_id = %record.id, attempts, %detail);
                    dead_letter(
                        shared,
                        ErrorClass::Exhausted,
                        "exhausted",
                        format!("{attempts} attempts; last error ({reason}): {detail}"),
                    )
                    .publish(publisher, &shared.topology, &delivery.data, &delivery.properties)
                    .await?;
                    metrics.dead_letters.with_label_values(&["exhausted", "exhausted"]).inc();
                    return acks.ack(&delivery);
                }
                let Some(tier) = choose_tier(&shared.topology.retry_tiers, attempts, retry_after) else {
                    anyhow::bail!("no retry tiers configured");
                };
                let mut headers = strip_broker_death_headers(&headers_of(&delivery.properties));
                set_i64(&mut headers, header::ATTEMPT, i64::from(attempts));
                let props = delivery.properties.clone().with_headers(headers);
                let label = tier_label(tier);
                publisher.publish(&shared.topology.retry_exchange(), &label, &delivery.data, props).await?;
                metrics.retries.with_label_values(&[&label]).inc();
                tracing::debug!(message = "Write failed; retrying later.", message_id = %message_id, attempts, tier = %label, %detail);
                return acks.ack(&delivery);
            }
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
