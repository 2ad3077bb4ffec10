//! `target-sim`: the Qingyiyun-style write API (`{"api","method","idCheck","data"}`) with `idCheck`
//! dedupe by `data.id`, and fault injection switchable at runtime: failure rate, 429 with
//! `Retry-After`, latency, outage windows, permanent rejects for an id pattern, and the ways real
//! platform APIs fail inside an HTTP 200 (`success:false`, business codes) or refuse expired
//! credentials (401 windows).

pub mod faults;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use clap::Parser;
use orderflow_shared::{json::scalar_text, rng::Rng};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::faults::{Decision, Faults, FaultsUpdate};

/// Target write-API simulator with idCheck, for tests, demos and benchmarks.
#[derive(Debug, Clone, Parser)]
#[command(name = "target-sim", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "TARGET_SIM_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: SocketAddr,
    /// Seed for injected randomness.
    #[arg(long, env = "TARGET_SIM_SEED", default_value_t = 42)]
    pub seed: u64,
    /// Latency added to every write, in milliseconds.
    #[arg(long, env = "TARGET_SIM_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// Upper bound of a uniform latency draw (default: --latency-ms, i.e. fixed).
    #[arg(long)]
    pub latency_max_ms: Option<u64>,
    /// Share of writes answered with HTTP 500/502/503.
    #[arg(long, default_value_t = 0.0)]
    pub failure_rate: f64,
    /// Share of writes answered with HTTP 429.
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Seconds sent in `Retry-After` with each 429 (0: no header).
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// Reject (HTTP 422, permanent) every record whose id matches this glob (`*` wildcard).
    #[arg(long)]
    pub reject_ids: Option<String>,
    /// Fail (HTTP 503, transient) every write of a record whose id matches this glob.
    #[arg(long)]
    pub fail_ids: Option<String>,
    /// Share of writes answered HTTP 200 with a business failure (`success:false` or a failing
    /// code, in one of several shapes), nothing stored.
    #[arg(long, default_value_t = 0.0)]
    pub soft_failure_rate: f64,
    /// Writes accepted per second; beyond it 429 with `Retry-After` (--retry-after). 0: unlimited.
    #[arg(long, default_value_t = 0.0)]
    pub capacity_per_sec: f64,
    /// Contention: latency grows by this many ms per 1,000 requests in flight, per request in
    /// flight (throughput peaks at √(1000 × latency ÷ this) in flight).
    #[arg(long, default_value_t = 0.0)]
    pub latency_per_inflight_ms: f64,
    /// Answer HTTP 200 with the permanent business code 40001 (a validation error) for every record
    /// whose id matches this glob, nothing stored.
    #[arg(long)]
    pub soft_reject_ids: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stored {
    pub id: String,
    pub data: Value,
    /// Accepted writes of this id (1 + suppressed duplicates + overwrites).
    pub writes: u64,
    /// When it was first stored (unix milliseconds).
    pub written_at_ms: i64,
    /// When a write of this id first arrived, whatever the answer (unix milliseconds).
    pub first_attempt_at_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub requests: u64,
    /// Distinct records stored.
    pub records: u64,
    /// Writes that stored a new record.
    pub written: u64,
    /// Writes of an id already stored under idCheck (answered 2xx, not stored again).
    pub duplicates_suppressed: u64,
    /// Writes without idCheck that replaced a stored record.
    pub overwritten: u64,
    /// Malformed requests (HTTP 400).
    pub invalid: u64,
    /// Permanent rejects by the id rule (HTTP 422).
    pub rejected_by_rule: u64,
    /// Injected HTTP 5xx.
    pub failures_injected: u64,
    /// Injected HTTP 429.
    pub throttled: u64,
    /// Requests refused during an outage window (HTTP 503).
    pub outage_refusals: u64,
    /// Answered 200 with a business failure, not stored.
    pub soft_failures_injected: u64,
    /// Answered 200 with the permanent business code, not stored.
    pub soft_rejected_by_rule: u64,
    /// Answered 401 during an auth-failure window.
    pub auth_refusals: u64,
    /// Answered 429 because writes came faster than `capacity_per_sec`.
    pub over_capacity: u64,
    /// The most requests in flight at once.
    pub max_inflight: u64,
}

pub struct State_ {
    /// Token bucket for `capacity_per_sec`: tokens and when they were last topped up.
    capacity: (f64, tokio::time::Instant),
    /// When each id's first write arrived (answered or not).
    first_attempt_ms: HashMap<String, i64>,
    records: HashMap<String, Stored>,
    order: Vec<String>,
    stats: Stats,
    faults: Faults,
    rng: Rng,
}

pub struct TargetSim {
    state: Mutex<State_>,
    inflight: std::sync::atomic::AtomicU64,
}

/// Counts a request in flight while it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl TargetSim {
    pub fn new(config: &Config) -> Result<Arc<Self>, String> {
        let faults = Faults {
            latency_min_ms: config.latency_ms,
            latency_max_ms: config.latency_max_ms.unwrap_or(config.latency_ms),
            failure_rate: config.failure_rate,
            throttle_rate: config.throttle_rate,
            retry_after_secs: config.retry_after,
            reject_ids: config.reject_ids.clone(),
            fail_ids: config.fail_ids.clone(),
            outage_until: None,
            soft_failure_rate: config.soft_failure_rate,
            soft_reject_ids: config.soft_reject_ids.clone(),
            auth_failure_until: None,
            capacity_per_sec: config.capacity_per_sec,
            latency_per_inflight_ms: config.latency_per_inflight_ms,
        };
        faults.validate()?;
        Ok(Arc::new(Self {
            inflight: std::sync::atomic::AtomicU64::new(0),
            state: Mutex::new(State_ {
                capacity: (0.0, tokio::time::Instant::now()),
                first_attempt_ms: HashMap::new(),
                records: HashMap::new(),
                order: Vec::new(),
                stats: Stats::default(),
                faults,
                rng: Rng::new(config.seed),
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The write request. `data.id` is required; other fields are the record.
#[derive(Debug, Deserialize)]
struct WriteRequest {
    api: Option<Value>,
    #[serde(rename = "idCheck", default)]
    id_check: bool,
    data: Option<Value>,
}

fn reply(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// Whether a write fits `capacity_per_sec` (a token bucket holding a tenth of a second's worth).
fn admit(state: &mut State_, now: tokio::time::Instant) -> bool {
    let rate = state.faults.capacity_per_sec;
    if rate <= 0.0 {
        return true;
    }
    let burst = (rate / 10.0).max(1.0);
    let (tokens, at) = state.capacity;
    let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate).min(burst);
    if tokens >= 1.0 {
        state.capacity = (tokens - 1.0, now);
        true
    } else {
        state.capacity = (tokens, now);
        false
    }
}

/// 429 with `Retry-After: <secs>` (none when 0).
fn too_many_requests(message: &str, retry_after: u64) -> Response {
    let mut response = failure(StatusCode::TOO_MANY_REQUESTS, message.into());
    if retry_after > 0
        && let Ok(v) = HeaderValue::from_str(&retry_after.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// A business failure inside an HTTP 200, in the shapes platform APIs use.
fn soft_failure(shape: u8) -> Value {
    match shape {
        0 => json!({ "success": false, "code": 50001, "message": "系统繁忙，请稍后再试 (injected)" }),
        1 => json!({ "code": "50002", "msg": "数据库连接超时 (injected)", "data": null }),
        _ => json!({ "errcode": 50003, "errmsg": "服务暂不可用 (injected)" }),
    }
}

fn failure(status: StatusCode, message: String) -> Response {
    reply(status, json!({ "success": false, "code": status.as_u16(), "message": message }))
}

/// `POST /data/write`.
async fn write(State(sim): State<Arc<TargetSim>>, body: Bytes) -> Response {
    let inflight = sim.inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let _counted = InFlight(&sim.inflight);
    let request: WriteRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            sim.lock().stats.invalid += 1;
            return failure(StatusCode::BAD_REQUEST, format!("body is not a write request: {e}"));
        }
    };
    let id = request.data.as_ref().and_then(|d| d.get("id")).and_then(scalar_text).filter(|s| !s.is_empty());
    let (Some(data), Some(id), Some(_api)) = (request.data, id, request.api) else {
        sim.lock().stats.invalid += 1;
        return failure(StatusCode::BAD_REQUEST, "api and data.id are required".into());
    };
    let (delay, decision) = {
        let mut guard = sim.lock();
        let state = &mut *guard;
        state.stats.requests += 1;
        state.stats.max_inflight = state.stats.max_inflight.max(inflight);
        let now_ms = jiff::Timestamp::now().as_millisecond();
        state.first_attempt_ms.entry(id.clone()).or_insert(now_ms);
        let now = tokio::time::Instant::now();
        if !admit(state, now) {
            (Duration::ZERO, Decision::OverCapacity(state.faults.retry_after_secs.max(1)))
        } else {
            let (delay, decision) = state.faults.decide(&mut state.rng, now);
            (delay + state.faults.load_latency(inflight), decision)
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match decision {
        Decision::Outage => {
            sim.lock().stats.outage_refusals += 1;
            return failure(StatusCode::SERVICE_UNAVAILABLE, "target is down (injected outage)".into());
        }
        Decision::Fail(code) => {
            sim.lock().stats.failures_injected += 1;
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return failure(status, "internal error (injected)".into());
        }
        Decision::Throttle(retry_after) => {
            sim.lock().stats.throttled += 1;
            return too_many_requests("too many requests (injected)", retry_after);
        }
        Decision::OverCapacity(retry_after) => {
            sim.lock().stats.over_capacity += 1;
            return too_many_requests("over the target's capacity", retry_after);
        }
        Decision::Unauthorized => {
            sim.lock().stats.auth_refusals += 1;
            return failure(StatusCode::UNAUTHORIZED, "access token expired (injected)".into());
        }
        Decision::SoftFailure(shape) => {
            sim.lock().stats.soft_failures_injected += 1;
            return reply(StatusCode::OK, soft_failure(shape));
        }
        Decision::Pass => {}
    }
    let mut guard = sim.lock();
    let state = &mut *guard;
    if state.faults.always_fails(&id) {
        state.stats.failures_injected += 1;
        return failure(StatusCode::SERVICE_UNAVAILABLE, format!("record id {id} cannot be written now (injected)"));
    }
    if state.faults.soft_rejects(&id) {
        state.stats.soft_rejected_by_rule += 1;
        let message = format!("数据校验失败: record {id} is rejected by the target's business rule");
        return reply(
            StatusCode::OK,
            json!({ "success": false, "code": faults::SOFT_REJECT_CODE, "message": message }),
        );
    }
    if state.faults.rejects(&id) {
        state.stats.rejected_by_rule += 1;
        return failure(StatusCode::UNPROCESSABLE_ENTITY, format!("record id {id} is rejected by the target's rule"));
    }
    let duplicate = match state.records.get_mut(&id) {
        Some(existing) => {
            existing.writes += 1;
            if request.id_check {
                state.stats.duplicates_suppressed += 1;
            } else {
                existing.data = data;
                state.stats.overwritten += 1;
            }
            true
        }
        None => {
            state.order.push(id.clone());
            let written_at_ms = jiff::Timestamp::now().as_millisecond();
            let first_attempt_at_ms = state.first_attempt_ms.get(&id).copied().unwrap_or(written_at_ms);
            state
                .records
                .insert(id.clone(), Stored { id: id.clone(), data, writes: 1, written_at_ms, first_attempt_at_ms });
            state.stats.written += 1;
            state.stats.records += 1;
            false
        }
    };
    reply(
        StatusCode::OK,
        json!({ "success": true, "code": 0, "message": "ok", "data": { "id": id, "duplicate": duplicate } }),
    )
}

#[derive(Debug, Deserialize)]
struct RecordsParams {
    #[serde(default)]
    ids_only: bool,
}

/// `GET /admin/records[?ids_only=true]`: every stored record in arrival order.
async fn records(State(sim): State<Arc<TargetSim>>, Query(p): Query<RecordsParams>) -> Response {
    let state = sim.lock();
    if p.ids_only {
        return Json(json!({ "count": state.order.len(), "ids": state.order })).into_response();
    }
    let list: Vec<&Stored> = state.order.iter().filter_map(|id| state.records.get(id)).collect();
    Json(json!({ "count": list.len(), "records": list })).into_response()
}

/// `GET /admin/stats`.
async fn stats(State(sim): State<Arc<TargetSim>>) -> Response {
    let state = sim.lock();
    Json(json!({ "stats": state.stats, "faults": state.faults.describe(tokio::time::Instant::now()) })).into_response()
}

/// `POST /admin/faults`: change any fault setting; `{"outage_secs": 60}` starts a 60 s outage now.
async fn set_faults(State(sim): State<Arc<TargetSim>>, Json(update): Json<FaultsUpdate>) -> Response {
    let mut state = sim.lock();
    let mut next = state.faults.clone();
    next.apply(update, tokio::time::Instant::now());
    if let Err(e) = next.validate() {
        return failure(StatusCode::BAD_REQUEST, e);
    }
    state.faults = next;
    Json(json!({ "faults": state.faults.describe(tokio::time::Instant::now()) })).into_response()
}

pub fn router(sim: Arc<TargetSim>) -> Router {
    Router::new()
        .route("/data/write", post(write))
        .route("/admin/records", get(records))
        .route("/admin/stats", get(stats))
        .route("/admin/faults", post(set_faults))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sim)
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sim = TargetSim::new(&config).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: {e}", config.listen))?;
    let addr = listener.local_addr()?;
    println!("target-sim listening on http://{addr} (write endpoint: http://{addr}/data/write)");
    axum::serve(listener, router(sim)).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
    Ok(())
}
