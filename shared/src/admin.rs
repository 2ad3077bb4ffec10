//! The admin HTTP server every service runs on `ADMIN_ADDR`: `/metrics` (Prometheus text),
//! `/healthz` (the process is alive), `/readyz` (every readiness check holds).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// Named readiness checks; the service is ready when every check is `Ok`.
/// Cloning shares the same checks.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, Result<(), String>>>>,
    /// Trouble worth showing that does not make the service unready (the ledger's last failure).
    details: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks a check as passing.
    pub fn set_ok(&self, name: &str) {
        self.lock().insert(name.to_string(), Ok(()));
    }

    /// Marks a check as failing with a reason a person can read.
    pub fn set_failing(&self, name: &str, reason: impl Into<String>) {
        self.lock().insert(name.to_string(), Err(reason.into()));
    }

    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Shows `detail` under `name` in `/readyz`'s `details` without failing readiness; `None`
    /// takes it away.
    pub fn set_detail(&self, name: &str, detail: Option<String>) {
        let mut details = self.details.lock().unwrap_or_else(|e| e.into_inner());
        match detail {
            Some(text) => details.insert(name.to_string(), text),
            None => details.remove(name),
        };
    }

    /// The details shown beside the checks.
    pub fn details(&self) -> BTreeMap<String, String> {
        self.details.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_ready(&self) -> bool {
        let checks = self.lock();
        !checks.is_empty() && checks.values().all(Result::is_ok)
    }

    /// Every check with `"ok"` or its failure reason.
    pub fn report(&self) -> BTreeMap<String, String> {
        self.lock().iter().map(|(k, v)| (k.clone(), v.clone().err().unwrap_or_else(|| "ok".to_string()))).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Result<(), String>>> {
        self.checks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

/// The admin routes, testable without a socket.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { registry, readiness })
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(error) = encoder.encode(&state.registry.gather(), &mut body) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            error.to_string().into_bytes(),
        );
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let ready = state.readiness.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": ready, "checks": state.readiness.report(), "details": state.readiness.details(),
    });
    (status, Json(body))
}

/// Adds `orderflow_replica_info{replica="<name>"} 1`, so a scraped replica (known to Prometheus
/// only by its address) can be told by the name it has everywhere else ([`crate::replica::name`]).
fn register_replica_info(registry: &Registry) {
    let opts = prometheus::Opts::new("orderflow_replica_info", "Always 1; the replica label names this replica.")
        .const_label("replica", crate::replica::name());
    if let Ok(gauge) = prometheus::IntGauge::with_opts(opts) {
        gauge.set(1);
        // Registered once per registry; a second admin server on the same registry reuses it.
        let _ = registry.register(Box::new(gauge));
    }
}

/// Binds `addr` and serves the admin routes until `shutdown` is cancelled. Returns the bound
/// address (useful with port 0) once listening.
pub async fn spawn(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    register_replica_info(&registry);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!(message = "Admin server listening.", addr = %bound);
    let app = router(registry, readiness);
    tokio::spawn(async move {
        let result = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = result {
            tracing::error!(message = "Admin server failed.", %error);
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_check_to_pass() {
        let r = Readiness::new();
        assert!(!r.is_ready(), "no checks yet means not ready");
        r.set_ok("broker");
        assert!(r.is_ready());
        r.set_failing("consuming", "no consumer");
        assert!(!r.is_ready());
        assert_eq!(r.report()["consuming"], "no consumer");
        r.set_ok("consuming");
        assert!(r.is_ready());
    }
}
