//! Optional trace export over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, so one
//! order's journey (fetch → transform → write, with `o_id` and `io_id` attributes) can be found in
//! Jaeger or any OpenTelemetry collector. Off by default: no exporter, no OpenTelemetry layer, and
//! callers check [`Tracer::enabled`] before creating a span.
//!
//! The spans are `tracing` spans with target [`TARGET`]; [`crate::telemetry::init_service`] adds
//! tracing-opentelemetry's layer for that target only, and the SDK batches them on tokio and sends
//! them with opentelemetry-otlp. A span joins the trace of the message's `traceparent`
//! ([`join`]), and the messages a hop sends carry that span's own context ([`traceparent`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanId, Status, TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, IdGenerator, SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every exported span (`tracing::info_span!(target: otel::TARGET, ...)`). Only
/// spans of this target reach the OpenTelemetry layer, and the log output never shows them.
pub const TARGET: &str = "orderflow_otel";

/// Span kinds as `otel.kind` field values (tracing-opentelemetry reads that field).
pub const PRODUCER: &str = "producer";
pub const CONSUMER: &str = "consumer";
pub const CLIENT: &str = "client";

/// Set once, when [`crate::telemetry::init_service`] installed the exporting layer.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans; cheap enough to ask per record.
#[derive(Clone, Copy, Default)]
pub struct Tracer {
    enabled: bool,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("enabled", &self.enabled).finish()
    }
}

impl Tracer {
    /// A tracer that does nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Enabled when this process exports spans (see [`crate::telemetry::init_service`]).
    pub fn current() -> Self {
        Self { enabled: EXPORTING.load(Ordering::Relaxed) }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }
}

/// Makes `span` a child of the (remote) span named by `traceparent`; a missing or malformed one
/// leaves it the root of a new trace. Call before [`traceparent`].
pub fn join(span: &tracing::Span, traceparent: Option<&str>) {
    let parent = TraceContextPropagator::new().extract(&Carrier(traceparent));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` naming `span` itself, for the messages this hop sends; `None` when the span
/// is not exported (no layer, or disabled).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Injected(None);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.0
}

/// The `traceparent` for the messages a hop sends, and the hop's span. When exporting, the span
/// made by `span` joins `parent`'s trace (a new trace without one) and the messages name it;
/// otherwise there is no span and the messages get a new span id in the same trace.
pub fn hop(
    tracer: &Tracer,
    parent: Option<&str>,
    span: impl FnOnce() -> tracing::Span,
) -> (String, Option<tracing::Span>) {
    if tracer.enabled() {
        let span = span();
        join(&span, parent);
        if let Some(traceparent) = traceparent(&span) {
            return (traceparent, Some(span));
        }
    }
    (crate::trace::child_traceparent(parent), None)
}

/// Marks `span` failed, with why.
pub fn fail(span: &tracing::Span, why: impl Into<String>) {
    span.set_status(Status::error(why.into()));
}

/// One `traceparent` header as a propagation carrier.
struct Carrier<'a>(Option<&'a str>);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.filter(|_| key.eq_ignore_ascii_case(crate::messages::header::TRACEPARENT))
    }

    fn keys(&self) -> Vec<&str> {
        vec![crate::messages::header::TRACEPARENT]
    }
}

struct Injected(Option<String>);

impl Injector for Injected {
    fn set(&mut self, key: &str, value: String) {
        if key.eq_ignore_ascii_case(crate::messages::header::TRACEPARENT) {
            self.0 = Some(value);
        }
    }
}

/// Trace and span ids from the per-thread entropy-seeded generator that `trace.rs` uses too
/// ([`crate::rng::with_ids`]): never zero, never the same sequence on two threads or replicas.
#[derive(Debug)]
struct Ids;

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        TraceId::from(crate::rng::with_ids(|rng| rng.u128(1..)))
    }

    fn new_span_id(&self) -> SpanId {
        SpanId::from(crate::rng::with_ids(|rng| rng.u64(1..)))
    }
}

/// Spans wait at most this long before they are sent (unless `OTEL_BSP_SCHEDULE_DELAY` says).
const SCHEDULE_DELAY: Duration = Duration::from_secs(1);
/// Spans queued for export at most (unless `OTEL_BSP_MAX_QUEUE_SIZE` says); more are dropped.
const QUEUE: usize = 8192;

/// The exporting tracer provider when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g.
/// `http://jaeger:4318`), named by [`service_name`]. Needs a tokio runtime.
pub fn provider_from_env(service: &str) -> Option<anyhow::Result<SdkTracerProvider>> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|s| !s.trim().is_empty())?;
    Some(provider(&endpoint, &service_name(service)))
}

/// `OTEL_SERVICE_NAME`, or the service's own name.
pub fn service_name(service: &str) -> String {
    std::env::var("OTEL_SERVICE_NAME").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| service.to_string())
}

/// A provider exporting OTLP/HTTP JSON to `endpoint`'s `/v1/traces`, batched on tokio.
pub fn provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    use anyhow::Context as _;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .with_context(|| format!("OTEL_EXPORTER_OTLP_ENDPOINT {}", crate::settings::redact_url(endpoint)))?;
    let mut batch = BatchConfigBuilder::default();
    if std::env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
        batch = batch.with_scheduled_delay(SCHEDULE_DELAY);
    }
    if std::env::var_os("OTEL_BSP_MAX_QUEUE_SIZE").is_none() {
        batch = batch.with_max_queue_size(QUEUE);
    }
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(batch.build())
        .build();
    let resource = Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(KeyValue::new("service.instance.id", crate::replica::name().to_string()))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .with_id_generator(Ids)
        .build())
}

/// The tracing layer that turns spans into OpenTelemetry spans of `provider`: no code location,
/// thread or busy/idle attributes, only the fields the span names.
pub fn layer<S>(provider: &SdkTracerProvider) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("orderflow"))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_level(false)
        .with_target(false)
        .with_context_activation(false)
}

/// Marks spans as exported from now on (called by the telemetry setup once the layer is in).
pub(crate) fn set_exporting() {
    EXPORTING.store(true, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::SpanKind;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SimpleSpanProcessor, SpanData, SpanExporter};
    use serde_json::Value;
    use tracing_subscriber::prelude::*;

    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    /// Keeps every exported span.
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).extend(batch);
            Ok(())
        }
    }

    /// Runs `f` under a subscriber exporting like the services do (spans of [`TARGET`] only).
    fn exported(f: impl FnOnce(&Tracer)) -> Vec<SpanData> {
        let kept = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(SimpleSpanProcessor::new(kept.clone()))
            .with_id_generator(Ids)
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(layer(&provider).with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == TARGET)));
        tracing::subscriber::with_default(subscriber, || f(&Tracer { enabled: true }));
        kept.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn attribute(span: &SpanData, key: &str) -> Option<String> {
        span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.to_string())
    }

    #[test]
    fn a_hop_joins_the_parent_trace_and_its_messages_name_its_span() {
        let mut sent = String::new();
        let spans = exported(|tracer| {
            let (traceparent, span) = hop(
                tracer,
                Some(PARENT),
                || tracing::info_span!(target: TARGET, parent: None, "transform record", otel.kind = CONSUMER, o_id = %"42"),
            );
            assert!(span.is_some());
            sent = traceparent;
        });
        let [span] = spans.as_slice() else { panic!("one span, not {spans:?}") };
        assert_eq!(span.name, "transform record");
        assert_eq!(span.span_kind, SpanKind::Consumer);
        assert_eq!(span.span_context.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(span.parent_span_id.to_string(), "b7ad6b7169203331");
        assert_eq!(attribute(span, "o_id").as_deref(), Some("42"));
        assert_eq!(span.status, Status::Unset);
        let expected = format!("00-{}-{}-01", span.span_context.trace_id(), span.span_context.span_id());
        assert_eq!(sent, expected, "the next hop's parent is this span");
    }

    #[test]
    fn a_fetch_starts_a_trace_and_a_failure_marks_its_span() {
        let spans = exported(|tracer| {
            let (traceparent, span) = hop(
                tracer,
                None,
                || tracing::info_span!(target: TARGET, parent: None, "fetch page", otel.kind = PRODUCER),
            );
            assert!(crate::trace::trace_id(&traceparent).is_some());
            fail(&span.expect("a span"), "no confirm");
        });
        let [span] = spans.as_slice() else { panic!("one span, not {spans:?}") };
        assert_eq!(span.span_kind, SpanKind::Producer);
        assert_eq!(span.parent_span_id, SpanId::INVALID, "a root span");
        assert!(span.span_context.trace_id() != TraceId::INVALID);
        assert_eq!(span.status, Status::error("no confirm"));
    }

    #[test]
    fn a_malformed_parent_starts_a_new_trace() {
        let spans = exported(|tracer| {
            let (traceparent, _span) = hop(
                tracer,
                Some("garbage"),
                || tracing::info_span!(target: TARGET, parent: None, "write record", otel.kind = CLIENT),
            );
            assert!(crate::trace::trace_id(&traceparent).is_some());
        });
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert_eq!(spans[0].span_kind, SpanKind::Client);
    }

    #[test]
    fn without_export_no_span_is_made_and_the_trace_is_kept() {
        let (traceparent, span) = hop(&Tracer::disabled(), Some(PARENT), || unreachable!("no span when disabled"));
        assert!(span.is_none());
        assert_eq!(crate::trace::trace_id(&traceparent), crate::trace::trace_id(PARENT));
        assert_ne!(traceparent, PARENT);
    }

    #[test]
    fn ids_are_never_zero_and_do_not_repeat() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| (Ids.new_trace_id(), Ids.new_span_id())).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|(t, s)| *t != TraceId::INVALID && *s != SpanId::INVALID));
    }

    /// The exporter's request is the OTLP JSON a collector reads (what the end-to-end test's fake
    /// collector parses): resource service.name and service.instance.id, hex ids, string attributes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_export_is_otlp_json() {
        use axum::{Json, Router, routing::post};
        let bodies = Arc::new(Mutex::new(Vec::<Value>::new()));
        let store = bodies.clone();
        let app = Router::new().route(
            "/v1/traces",
            post(move |Json(body): Json<Value>| {
                let store = store.clone();
                async move {
                    store.lock().unwrap_or_else(|e| e.into_inner()).push(body);
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let endpoint = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });

        crate::init_process(); // reqwest's TLS provider
        let provider = provider(&endpoint, "orderflow-test").expect("a provider");
        let subscriber = tracing_subscriber::registry()
            .with(layer(&provider).with_filter(tracing_subscriber::filter::filter_fn(|m| m.target() == TARGET)));
        let sent = tracing::subscriber::with_default(subscriber, || {
            let (sent, span) = hop(
                &Tracer { enabled: true },
                Some(PARENT),
                || tracing::info_span!(target: TARGET, parent: None, "write record", otel.kind = CLIENT, o_id = %"42", attempt = 1u32),
            );
            drop(span);
            sent
        });
        tokio::task::spawn_blocking(move || provider.shutdown()).await.expect("joined").expect("flushed");

        let bodies = bodies.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let [body] = bodies.as_slice() else { panic!("one request, not {bodies:?}") };
        let rs = &body["resourceSpans"][0];
        let resource = |key: &str| {
            rs["resource"]["attributes"].as_array().and_then(|a| a.iter().find(|kv| kv["key"] == key)).cloned()
        };
        assert_eq!(resource("service.name").expect("service.name")["value"]["stringValue"], "orderflow-test");
        assert_eq!(
            resource("service.instance.id").expect("service.instance.id")["value"]["stringValue"],
            crate::replica::name()
        );
        let span = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(span["name"], "write record");
        assert_eq!(span["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(span["parentSpanId"], "b7ad6b7169203331");
        assert_eq!(
            sent,
            format!("00-{}-{}-01", span["traceId"].as_str().expect("hex"), span["spanId"].as_str().expect("hex"))
        );
        assert_eq!(span["kind"], 3, "client");
        let attributes = span["attributes"].as_array().expect("attributes");
        assert!(
            attributes.contains(&serde_json::json!({"key": "o_id", "value": {"stringValue": "42"}})),
            "{attributes:?}"
        );
    }
}
