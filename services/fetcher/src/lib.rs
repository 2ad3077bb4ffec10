//! The fetcher: for every source account it holds, runs bounded passes that publish raw pages
//! (confirmed) and then commit the advanced checkpoint to the broker. Accounts are spread over
//! replicas by exclusive lock queues and a fair share of the live replicas.

pub mod account;
pub mod accounts_file;
pub mod budget;
pub mod client;
pub mod config;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod pass;
pub mod request_config;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use jiff::Timestamp;
use lapin::{
    Connection,
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
};
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{Fatal, Publisher, Topology, supervise, topology::plain_quorum_queue},
    rng::Rng,
};
use serde_json::json;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    account::Account,
    budget::Budget,
    client::{Credentials, JstClient},
    config::Config,
    job::{Cursor, CursorMode, Job},
    lease::Lease,
    metrics::Metrics,
    pass::{PassContext, PassError, PassSettings},
    request_config::CursorKind,
};

/// An account and what outlives a broker session: its budget, its current credentials, and
/// whether it is stopped.
struct AccountRuntime {
    account: Account,
    client: JstClient,
    budget: Budget,
    credentials: Mutex<Credentials>,
    stopped: Mutex<Option<String>>,
}

struct Shared {
    config: Config,
    topology: Topology,
    accounts: Vec<Arc<AccountRuntime>>,
    metrics: Metrics,
    readiness: Readiness,
    settings: PassSettings,
    /// Accounts this replica holds.
    held: AtomicUsize,
    tracer: orderflow_shared::otel::Tracer,
}

/// The queue every fetcher replica consumes (without messages) so replicas can count each other.
fn presence_queue(topology: &Topology) -> String {
    format!("{}.fetch.replicas", topology.ns)
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let accounts = config.accounts().map_err(Fatal)?;
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let mut runtimes = Vec::new();
    for account in accounts {
        if account.request.was_clamped() {
            tracing::warn!(
                message = "Request config asks for a page size above the API maximum; using the maximum.",
                account = %account.name, requested = account.request.requested_page_size, used = account.request.page_size
            );
        }
        let client = JstClient::new(&account.base_url, account.api, config.timeout).map_err(Fatal)?;
        let budget = Budget::new(account.rate_per_sec, account.rate_per_min);
        tracing::info!(
            message = "Account configured.", account = %account.name, api = ?account.api,
            cursor = ?account.request.cursor, call_spacing_ms = budget.spacing.as_millis() as u64
        );
        metrics.track_account(&account.name);
        readiness.set_ok(&format!("account:{}", account.name));
        runtimes.push(Arc::new(AccountRuntime {
            credentials: Mutex::new(account.credentials.clone()),
            account,
            client,
            budget,
            stopped: Mutex::new(None),
        }));
    }
    let bound = admin::spawn(config.admin_addr, metrics.registry.clone(), readiness.clone(), shutdown.clone())
        .await
        .map_err(|e| Fatal(format!("ADMIN_ADDR {}: {e}", config.admin_addr)))?;
    tracing::info!(message = "Fetcher started.", admin = %bound, accounts = runtimes.len(), ns = %config.broker.ns);
    let settings = PassSettings {
        max_pages: config.pass_pages.max(1),
        max_time: config.pass_time,
        window_delay: config.window_delay,
        window_overlap: config.window_overlap,
    };
    let shared = Arc::new(Shared {
        topology: Topology::new(config.broker.ns.clone()),
        accounts: runtimes,
        metrics,
        readiness,
        settings,
        held: AtomicUsize::new(0),
        tracer: orderflow_shared::otel::Tracer::from_env("orderflow-fetcher", &shutdown),
        config,
    });
    let broker = shared.config.broker.clone();
    let reconnects = shared.metrics.reconnects.clone();
    let readiness = shared.readiness.clone();
    let name = orderflow_shared::amqp::connection_name("fetcher", &broker.ns);
    supervise(&broker, &name, &shutdown, &readiness, &reconnects, |connection| {
        session(connection, shared.clone(), shutdown.clone())
    })
    .await
}

/// One broker session: declare topology, announce this replica, run one worker per account.
async fn session(connection: Arc<Connection>, shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let channel = connection.create_channel().await?;
    if shared.config.broker.declare_topology {
        shared.topology.declare(&channel).await?;
    }
    let presence = presence_queue(&shared.topology);
    orderflow_shared::amqp::topology::declare_queue(
        &channel,
        &plain_quorum_queue(presence.clone(), "fetcher replicas (presence)"),
    )
    .await?;
    let _presence_consumer = channel
        .basic_consume(presence.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let publisher = Publisher::open(&connection).await?;
    let session_token = shutdown.child_token();
    let mut workers = JoinSet::new();
    let mut order: Vec<usize> = (0..shared.accounts.len()).collect();
    let mut rng = Rng::from_entropy();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for index in order {
        let worker = AccountWorker {
            runtime: shared.accounts[index].clone(),
            shared: shared.clone(),
            connection: connection.clone(),
            publisher: publisher.clone(),
            token: session_token.clone(),
        };
        workers.spawn(async move { worker.run().await });
    }
    let mut result = Ok(());
    while let Some(joined) = workers.join_next().await {
        let outcome = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(error) = outcome {
            if result.is_ok() {
                result = Err(error);
            }
            session_token.cancel();
        }
    }
    shared.metrics.held.set(0);
    shared.held.store(0, Ordering::SeqCst);
    result
}

struct AccountWorker {
    runtime: Arc<AccountRuntime>,
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    publisher: Publisher,
    token: CancellationToken,
}

impl AccountWorker {
    /// How many accounts this replica should hold: ⌈accounts ÷ live replicas⌉.
    async fn fair_share(&self) -> usize {
        let total = self.shared.accounts.len();
        let replicas = match self.connection.create_channel().await {
            Ok(channel) => {
                let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
                let count = channel
                    .queue_declare(
                        presence_queue(&self.shared.topology).as_str().into(),
                        options,
                        FieldTable::default(),
                    )
                    .await
                    .map(|q| q.consumer_count() as usize)
                    .unwrap_or(1);
                let _ = channel.close(200, "ok".into()).await;
                count.max(1)
            }
            Err(_) => 1,
        };
        total.div_ceil(replicas)
    }

    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.token.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn run(self) -> anyhow::Result<()> {
        let name = self.runtime.account.name.clone();
        let retry = self.shared.config.lock_retry;
        // Spread the first attempts so replicas starting together share the accounts.
        let first = retry.mul_f64(Rng::from_entropy().unit());
        if !self.sleep(first).await {
            return Ok(());
        }
        loop {
            if self.token.is_cancelled() {
                return Ok(());
            }
            let held = self.shared.held.load(Ordering::SeqCst);
            if held >= self.fair_share().await {
                if !self.sleep(retry).await {
                    return Ok(());
                }
                continue;
            }
            let Some(lease) = Lease::try_acquire(&self.connection, &self.shared.topology, &name).await? else {
                if !self.sleep(retry).await {
                    return Ok(());
                }
                continue;
            };
            self.shared.held.fetch_add(1, Ordering::SeqCst);
            self.shared.metrics.held.inc();
            tracing::info!(message = "Holding account.", account = %name);
            // The previous holder may have called a moment ago: leave one call's spacing first,
            // so a handover never puts two calls closer than the budget allows.
            let outcome = if self.sleep(self.runtime.budget.spacing * 2).await {
                self.hold(lease).await
            } else {
                lease.release().await;
                Ok(Holding::Shutdown)
            };
            self.shared.held.fetch_sub(1, Ordering::SeqCst);
            self.shared.metrics.held.dec();
            match outcome? {
                Holding::Released => {
                    // Let a less loaded replica take it before trying again.
                    if !self.sleep(retry * 3).await {
                        return Ok(());
                    }
                }
                Holding::Shutdown => return Ok(()),
            }
        }
    }

    /// Runs passes while holding the account.
    async fn hold(&self, mut lease: Lease) -> anyhow::Result<Holding> {
        let rt = &self.runtime;
        let mut fresh_until: Option<std::time::Instant> = None;
        let name = rt.account.name.as_str();
        let mode = match rt.account.request.cursor {
            CursorKind::StartTs => CursorMode::StartTs,
            CursorKind::Modified => CursorMode::Modified,
        };
        loop {
            let stopped = rt.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(reason) = stopped {
                tracing::error!(message = "Account stopped on a permanent error; fix the configuration and restart.", account = name, reason = %reason);
                if !self.sleep(Duration::from_secs(60)).await {
                    lease.release().await;
                    return Ok(Holding::Shutdown);
                }
                continue;
            }
            let job = lease.load().await?;
            let job = match job {
                Some(job) if job.cursor.mode == mode => job,
                Some(job) => {
                    tracing::warn!(message = "Request config changed cursor mode; starting this mode afresh.", account = name, previous = ?job.cursor.mode);
                    Job { cursor: self.initial_cursor(mode), ..job }
                }
                None => Job::new(name, self.initial_cursor(mode)),
            };
            let mut credentials = rt.credentials.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(tokens) = &job.tokens {
                credentials.access_token = tokens.access_token.clone();
                credentials.refresh_token = tokens.refresh_token.clone();
            }
            let outcome = {
                let mut ctx = PassContext {
                    account: &rt.account,
                    client: &rt.client,
                    budget: &rt.budget,
                    publisher: &self.publisher,
                    topology: &self.shared.topology,
                    metrics: &self.shared.metrics,
                    shutdown: &self.token,
                    settings: &self.shared.settings,
                    credentials: &mut credentials,
                    tracer: &self.shared.tracer,
                    fresh_until,
                };
                match mode {
                    CursorMode::StartTs => pass::start_ts_pass(&mut ctx, job.cursor.start_ts.unwrap_or(0)).await,
                    CursorMode::Modified => {
                        let from = job
                            .cursor
                            .synced_until()
                            .unwrap_or_else(|| rt.account.sync_start.resolve(Timestamp::now()));
                        pass::modified_pass(&mut ctx, from).await
                    }
                }
            };
            *rt.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials.clone();
            let result = match outcome {
                Ok(result) => result,
                Err(PassError::Interrupted) => {
                    lease.release().await;
                    return Ok(Holding::Shutdown);
                }
                Err(PassError::Stopped(reason)) => {
                    self.shared.metrics.passes.with_label_values(&[name, "stopped"]).inc();
                    self.shared.metrics.stopped.with_label_values(&[name]).set(1);
                    self.shared.readiness.set_failing(&format!("account:{name}"), reason.clone());
                    tracing::error!(message = "Account stopped on a permanent error.", account = name, reason = %reason);
                    self.report(json!({"account": name, "seq": job.seq, "cursor": job.cursor, "stopped": reason}))
                        .await;
                    *rt.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                    continue;
                }
                Err(PassError::Broker(error)) => {
                    self.shared.metrics.passes.with_label_values(&[name, "failed"]).inc();
                    return Err(error.context(format!("account {name}: publishing pages failed; no checkpoint")));
                }
            };
            let mut next_cursor = result.cursor.clone();
            if next_cursor.caught_up_at.is_none() {
                next_cursor.caught_up_at = job.cursor.caught_up_at.clone();
            }
            let mut next = job.next(next_cursor, None, result.orders);
            lease.commit(&self.publisher, &next).await?;
            fresh_until = None;
            if result.needs_refresh {
                // The refresh token is single-use: commit the new pair the moment we have it.
                let outcome =
                    pass::refresh_tokens(&rt.client, &rt.account, &mut credentials, &self.shared.metrics, &self.token)
                        .await;
                *rt.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials.clone();
                match outcome {
                    Ok((tokens, lifetime)) => {
                        next = next.next(next.cursor.clone(), Some(tokens), 0);
                        lease.commit(&self.publisher, &next).await?;
                        // A code 100 soon after this means the new pair is bad; much later (a
                        // short-lived token, a slow source) it has simply expired again.
                        fresh_until = Some(std::time::Instant::now() + (lifetime / 2).min(Duration::from_secs(60)));
                    }
                    Err(pass::RefreshFailure::Interrupted) => {
                        lease.release().await;
                        return Ok(Holding::Shutdown);
                    }
                    Err(pass::RefreshFailure::Stopped(reason)) => {
                        self.stop_account(&job, reason).await;
                        continue;
                    }
                }
            }
            let lag = self.observe_lag(&next.cursor);
            self.report(json!({
                "account": name, "seq": next.seq, "cursor": next.cursor, "caught_up": result.caught_up,
                "lag_seconds": lag, "orders_total": next.orders_total, "pass_orders": result.orders,
            }))
            .await;
            let label = if result.caught_up { "caught_up" } else { "partial" };
            self.shared.metrics.passes.with_label_values(&[name, label]).inc();
            tracing::info!(
                message = "Pass committed.", account = name, seq = next.seq, pages = result.pages,
                orders = result.orders, caught_up = result.caught_up, cursor = ?next.cursor
            );
            if self.token.is_cancelled() {
                lease.release().await;
                return Ok(Holding::Shutdown);
            }
            let held = self.shared.held.load(Ordering::SeqCst);
            if held > self.fair_share().await {
                tracing::info!(message = "Releasing account to rebalance over replicas.", account = name);
                lease.release().await;
                return Ok(Holding::Released);
            }
            if result.caught_up && !self.sleep(rt.account.interval).await {
                lease.release().await;
                return Ok(Holding::Shutdown);
            }
        }
    }

    /// Stops the account on a permanent error: metrics, readiness, status report, log.
    async fn stop_account(&self, job: &Job, reason: String) {
        let name = self.runtime.account.name.as_str();
        self.shared.metrics.passes.with_label_values(&[name, "stopped"]).inc();
        self.shared.metrics.stopped.with_label_values(&[name]).set(1);
        self.shared.readiness.set_failing(&format!("account:{name}"), reason.clone());
        tracing::error!(message = "Account stopped on a permanent error.", account = name, reason = %reason);
        self.report(json!({"account": name, "seq": job.seq, "cursor": job.cursor, "stopped": reason})).await;
        *self.runtime.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    fn initial_cursor(&self, mode: CursorMode) -> Cursor {
        match mode {
            CursorMode::StartTs => Cursor::start_ts(0),
            CursorMode::Modified => Cursor::modified(self.runtime.account.sync_start.resolve(Timestamp::now())),
        }
    }

    /// Sets the lag metric; returns the lag in seconds when known.
    fn observe_lag(&self, cursor: &Cursor) -> Option<f64> {
        let reference = match cursor.mode {
            CursorMode::Modified => cursor.synced_until(),
            CursorMode::StartTs => cursor.caught_up_at.as_deref().and_then(|s| s.parse::<Timestamp>().ok()),
        };
        let at = reference?;
        let lag = (Timestamp::now().as_millisecond() - at.as_millisecond()).max(0) as f64 / 1000.0;
        self.shared.metrics.cursor_lag.with_label_values(&[&self.runtime.account.name]).set(lag);
        Some(lag)
    }

    /// Publishes the account's status for `orderflow status` (best effort: a failure is logged).
    async fn report(&self, mut status: serde_json::Value) {
        status["updated_at"] = json!(orderflow_shared::time::rfc3339_china(Timestamp::now()));
        status["replica"] = json!(orderflow_shared::replica::name());
        let body = status.to_string().into_bytes();
        let queue = self.shared.topology.fetch_status_queue();
        let id = format!("status:{}:{}", self.runtime.account.name, status["seq"]);
        let props = orderflow_shared::amqp::headers::json_properties(&id, lapin::types::FieldTable::default());
        if let Err(error) = self.publisher.publish("", &queue, &body, props).await {
            tracing::warn!(message = "Could not publish the account status.", account = %self.runtime.account.name, %error);
        }
    }
}

enum Holding {
    Released,
    Shutdown,
}
