//! Optional trace export over OTLP/HTTP (JSON) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, so one
//! order's journey (fetch → transform → write, with `o_id` and `io_id` attributes) can be found in
//! Jaeger or any OpenTelemetry collector. Off by default: a disabled tracer does nothing, and
//! callers check [`Tracer::enabled`] before building a span.
//!
//! Spans share the W3C trace context every message already carries in `traceparent`.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: &'static str,
    /// OTLP span kind: 1 internal, 3 client, 4 producer, 5 consumer.
    pub kind: u8,
    pub start_unix_nanos: u128,
    pub end_unix_nanos: u128,
    pub attributes: Vec<(&'static str, String)>,
    pub error: Option<String>,
}

/// Unix time in nanoseconds, for span timestamps.
pub fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// Splits a `traceparent` into (trace id, span id).
pub fn ids(traceparent: &str) -> Option<(String, String)> {
    let trace = crate::trace::trace_id(traceparent)?.to_string();
    let span = traceparent.split('-').nth(2)?.to_string();
    Some((trace, span))
}

#[derive(Clone, Default)]
pub struct Tracer {
    sender: Option<mpsc::Sender<Span>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("enabled", &self.enabled()).finish()
    }
}

const QUEUE: usize = 8192;
const BATCH: usize = 512;

impl Tracer {
    /// A tracer that does nothing.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Exports to `OTEL_EXPORTER_OTLP_ENDPOINT` (e.g. `http://jaeger:4318`) when it is set.
    pub fn from_env(service: &str, shutdown: &CancellationToken) -> Self {
        match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|s| !s.trim().is_empty()) {
            Some(endpoint) => {
                let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
                Self::exporting(&endpoint, &name, shutdown)
            }
            None => Self::disabled(),
        }
    }

    pub fn exporting(endpoint: &str, service: &str, shutdown: &CancellationToken) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE);
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        tracing::info!(message = "Exporting traces over OTLP/HTTP.", %url, service);
        tokio::spawn(export(receiver, url, service.to_string(), shutdown.clone()));
        Self { sender: Some(sender) }
    }

    pub fn enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues a span for export; drops it when the exporter cannot keep up (never blocks work).
    pub fn record(&self, span: Span) {
        if let Some(sender) = &self.sender {
            let _ = sender.try_send(span);
        }
    }
}

fn otlp_span(s: &Span) -> Value {
    let attributes: Vec<Value> =
        s.attributes.iter().map(|(k, v)| json!({"key": k, "value": {"stringValue": v}})).collect();
    let mut span = json!({
        "traceId": s.trace_id,
        "spanId": s.span_id,
        "name": s.name,
        "kind": s.kind,
        "startTimeUnixNano": s.start_unix_nanos.to_string(),
        "endTimeUnixNano": s.end_unix_nanos.to_string(),
        "attributes": attributes,
        "status": match &s.error { Some(e) => json!({"code": 2, "message": e}), None => json!({"code": 1}) },
    });
    if let Some(parent) = &s.parent_span_id {
        span["parentSpanId"] = json!(parent);
    }
    span
}

/// The OTLP/JSON request body for a batch of spans of one service.
pub fn export_body(service: &str, spans: &[Span]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": service}},
                {"key": "service.instance.id", "value": {"stringValue": crate::replica::name()}},
            ]},
            "scopeSpans": [{"scope": {"name": "orderflow"}, "spans": spans.iter().map(otlp_span).collect::<Vec<_>>()}]
        }]
    })
}

async fn export(mut receiver: mpsc::Receiver<Span>, url: String, service: String, shutdown: CancellationToken) {
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(10)).build() {
        Ok(h) => h,
        Err(error) => {
            tracing::warn!(message = "Trace export disabled: no HTTP client.", %error);
            return;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut failures = 0u64;
    loop {
        let stop = tokio::select! {
            span = receiver.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() < BATCH { continue; }
                    false
                }
                None => true,
            },
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        if stop {
            while let Ok(span) = receiver.try_recv() {
                batch.push(span);
            }
        }
        if !batch.is_empty() {
            let body = export_body(&service, &batch);
            match http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => failures = 0,
                Ok(r) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!(message = "Trace export refused.", status = r.status().as_u16(), failures);
                    }
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!(message = "Trace export failed.", error = %error.without_url(), failures);
                    }
                }
            }
            batch.clear();
        }
        if stop {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_follows_otlp_json() {
        let span = Span {
            trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
            span_id: "b7ad6b7169203331".into(),
            parent_span_id: Some("00f067aa0ba902b7".into()),
            name: "write record",
            kind: 3,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![("o_id", "42".into())],
            error: None,
        };
        let body = export_body("orderflow-writer", &[span]);
        let s = &body["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(s["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(s["attributes"][0], json!({"key": "o_id", "value": {"stringValue": "42"}}));
        assert_eq!(s["startTimeUnixNano"], "1");
        assert_eq!(body["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"], "orderflow-writer");
    }

    #[test]
    fn traceparent_splits_into_trace_and_span() {
        let (t, s) = ids("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").expect("valid");
        assert_eq!((t.as_str(), s.as_str()), ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"));
        assert!(ids("junk").is_none());
    }

    #[test]
    fn a_disabled_tracer_does_nothing() {
        let t = Tracer::disabled();
        assert!(!t.enabled());
        t.record(Span {
            trace_id: String::new(),
            span_id: String::new(),
            parent_span_id: None,
            name: "x",
            kind: 1,
            start_unix_nanos: 0,
            end_unix_nanos: 0,
            attributes: vec![],
            error: None,
        });
    }
}
