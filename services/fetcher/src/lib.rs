//! The fetcher: for every source account it holds, runs bounded passes that publish raw pages
//! (confirmed) and then commit the advanced checkpoint to the broker. The broker picks each
//! account's owner (single active consumer on its job queue, see `lease.rs`); a replica keeps at
//! most a fair share of the live replicas and hands the rest on.

pub mod account;
pub mod accounts_file;
mod audit;
pub mod budget;
pub mod client;
pub mod config;
pub mod job;
pub mod lease;
pub mod metrics;
pub mod pass;
pub mod request_config;
pub mod sweep;
pub mod tokens;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use jiff::Timestamp;
use orderflow_shared::{
    admin::{self, Readiness},
    amqp::{
        Connection, Connections, Fatal, Headers, Owner, Presence, Publisher, Topology, ledger::StageLedger, supervise,
    },
    ledger::Ledger,
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
    lease::{Lease, LostOwnership},
    metrics::Metrics,
    pass::{PassContext, PassError, PassSettings},
    request_config::CursorKind,
    tokens::Pick,
};

/// An account and what outlives a broker session: its budget, its current credentials, and
/// whether it is stopped.
struct AccountRuntime {
    account: Account,
    client: JstClient,
    budget: Budget,
    /// The lagging sweep's share of `budget` (taken first, then `budget`).
    sweep_share: Budget,
    /// The account as the sweep reads it: its request by modified window.
    sweep_account: Account,
    /// The audit's share of `budget` (`FETCH_AUDIT_BUDGET`; taken first, then `budget`).
    audit_share: Budget,
    /// The account as the audit reads it: Confirmed orders by modified window.
    audit_account: Account,
    /// Row versions this replica's start_ts passes published, for the sweep.
    seen: sweep::Seen,
    /// The configured and the newest token pair (see `tokens.rs`).
    book: tokens::TokenBook,
    credentials: Mutex<Credentials>,
    stopped: Mutex<Option<String>>,
    /// The last scheduled audit's findings, for the status report.
    last_audit: Mutex<Option<serde_json::Value>>,
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
    /// Live fetcher replicas (this one included), kept fresh by the session.
    replicas: AtomicUsize,
    /// Seals tokens stored in the broker (ORDERFLOW_SECRET_KEY).
    sealer: tokens::Sealer,
    tracer: orderflow_shared::otel::Tracer,
    /// Where every published order is recorded (`fetched`).
    ledger: Ledger,
    /// The accounts this replica holds now, with the token that stops work on each when it is
    /// let go (the scheduled audit lists these).
    holding: Mutex<std::collections::HashMap<String, (Arc<AccountRuntime>, CancellationToken)>>,
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let accounts = config.accounts().map_err(Fatal)?;
    // Read from the environment only: a secret never goes on a command line.
    let secret = std::env::var("ORDERFLOW_SECRET_KEY").ok();
    let sealer = tokens::Sealer::new(secret.as_deref()).map_err(Fatal)?;
    let metrics = Metrics::new();
    let readiness = Readiness::new();
    let http = JstClient::http(config.timeout).map_err(Fatal)?;
    let mut runtimes = Vec::new();
    for account in accounts {
        runtimes.push(Arc::new(account_runtime(account, &http, &config, &metrics, &readiness)?));
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
    let name = orderflow_shared::amqp::connection_name("fetcher", &config.broker.ns);
    let stage_ledger =
        StageLedger::start("fetcher", &config.ledger, &config.broker, &name, &metrics.registry, &readiness);
    let shared = Arc::new(Shared {
        ledger: stage_ledger.ledger.clone(),
        holding: Mutex::default(),
        topology: Topology::new(config.broker.ns.clone()),
        accounts: runtimes,
        metrics,
        readiness,
        settings,
        held: AtomicUsize::new(0),
        replicas: AtomicUsize::new(1),
        sealer,
        tracer: orderflow_shared::otel::Tracer::current(),
        config,
    });
    let broker = shared.config.broker.clone();
    let broker_metrics = shared.metrics.broker.clone();
    let readiness = shared.readiness.clone();
    let result = supervise(&broker, &name, &shutdown, &readiness, &broker_metrics, |connections| {
        session(connections, shared.clone(), shutdown.clone())
    })
    .await;
    // Every page is confirmed or abandoned by now: what was recorded goes out before the ledger stops.
    stage_ledger.stop().await;
    result
}

/// One configured account, ready to be held: its client, budgets, metrics and readiness check.
fn account_runtime(
    account: Account,
    http: &reqwest::Client,
    config: &Config,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Result<AccountRuntime, Fatal> {
    if account.request.was_clamped() {
        tracing::warn!(
            message = "Request config asks for a page size above the API maximum; using the maximum.",
            account = %account.name, requested = account.request.requested_page_size, used = account.request.page_size
        );
    }
    let client = JstClient::with_http(http.clone(), &account.base_url, account.api).map_err(Fatal)?;
    let budget = Budget::new(account.rate_per_sec, account.rate_per_min);
    let share = |limit: u32| ((f64::from(limit) * config.sweep_budget).floor() as u32).max(1);
    let sweep_share = Budget::new(share(account.rate_per_sec), share(account.rate_per_min));
    let audit = |limit: u32| ((f64::from(limit) * config.audit_budget).floor() as u32).max(1);
    let audit_share = Budget::new(audit(account.rate_per_sec), audit(account.rate_per_min));
    tracing::info!(
        message = "Account configured.", account = %account.name, api = ?account.api,
        cursor = ?account.request.cursor, call_spacing_ms = budget.spacing.as_millis() as u64
    );
    metrics.track_account(&account.name);
    readiness.set_ok(&format!("account:{}", account.name));
    let sweep_account = Account { request: account.request.for_windows(), ..account.clone() };
    let audit_account = Account { request: account.request.for_audit(), ..account.clone() };
    Ok(AccountRuntime {
        audit_share,
        audit_account,
        book: tokens::TokenBook::new(account.credentials.clone()),
        sweep_account,
        credentials: Mutex::new(account.credentials.clone()),
        account,
        client,
        budget,
        sweep_share,
        seen: sweep::Seen::new(config.sweep_span + Duration::from_secs(600)),
        stopped: Mutex::new(None),
        last_audit: Mutex::new(None),
    })
}

/// One broker session: declare topology, announce this replica, run one worker per account and
/// keep the replica count fresh. Every account's job consumer and the checkpoint commits share one
/// channel on the `consume` connection (a replica whose ownership channel died can never commit); pages and
/// status reports are published on the other, so a broker alarm blocking publishes leaves the
/// owners' connection free.
async fn session(connections: Connections, shared: Arc<Shared>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let connection = connections.consume.clone();
    let presence = Presence::join(&connection, &shared.topology, shared.config.broker.declare_topology).await?;
    let timeout = shared.config.broker.amqp_confirm_timeout;
    let publisher = Publisher::open(&connections.publish).await?.with_confirm_timeout(timeout);
    let owner = Owner::open(&connection).await?;
    // Commits go out on the ownership channel: a replica that lost it cannot commit.
    let commits = owner.commits().clone().with_confirm_timeout(timeout);
    shared.replicas.store(presence.replicas().await?, Ordering::SeqCst);
    let session_token = shutdown.child_token();
    let mut workers = JoinSet::new();
    workers.spawn(watch_replicas(presence, shared.clone(), session_token.clone()));
    if !shared.config.audit_every.is_zero() {
        let audits = audit::scheduled(shared.clone(), connection.clone(), publisher.clone(), session_token.clone());
        workers.spawn(async move {
            audits.await;
            Ok(())
        });
    }
    let mut order: Vec<usize> = (0..shared.accounts.len()).collect();
    Rng::from_entropy().shuffle(&mut order);
    for index in order {
        let worker = AccountWorker {
            runtime: shared.accounts[index].clone(),
            shared: shared.clone(),
            connection: connection.clone(),
            owner: owner.clone(),
            publisher: publisher.clone(),
            commits: commits.clone(),
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

/// How often a replica counts the live replicas (on its presence channel: no channel per check).
const REPLICA_CHECK: Duration = Duration::from_secs(2);

/// Keeps `Shared::replicas` fresh until the session ends.
async fn watch_replicas(presence: Presence, shared: Arc<Shared>, token: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = token.cancelled() => return Ok(()),
            _ = tokio::time::sleep(REPLICA_CHECK) => {}
        }
        let count = presence.replicas().await?;
        let before = shared.replicas.swap(count, Ordering::SeqCst);
        if before != count {
            tracing::info!(message = "Fetcher replicas changed.", replicas = count, fair_share = shared.fair_share());
        }
    }
}

impl Shared {
    /// How many accounts one replica should hold: ⌈accounts ÷ live replicas⌉.
    fn fair_share(&self) -> usize {
        self.accounts.len().div_ceil(self.replicas.load(Ordering::SeqCst).max(1))
    }

    /// Counts one more account held, if this replica holds fewer than its fair share.
    fn take_slot(&self) -> bool {
        let share = self.fair_share();
        self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| (h < share).then_some(h + 1)).is_ok()
    }

    /// Counts one account less, if this replica holds more than its fair share.
    fn shed_slot(&self) -> bool {
        let share = self.fair_share();
        self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| (h > share).then_some(h - 1)).is_ok()
    }

    /// Counts one account less.
    fn drop_slot(&self) {
        let _ = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| h.checked_sub(1));
    }
}

struct AccountWorker {
    runtime: Arc<AccountRuntime>,
    shared: Arc<Shared>,
    connection: Arc<Connection>,
    /// The session's ownership channel (every account's job consumer).
    owner: Owner,
    /// Pages and status reports.
    publisher: Publisher,
    /// Checkpoint commits, on the lock's connection.
    commits: Publisher,
    token: CancellationToken,
}

impl AccountWorker {
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.token.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    async fn run(self) -> anyhow::Result<()> {
        let name = self.runtime.account.name.clone();
        let retry = self.shared.config.lock_retry;
        // Spread the first subscriptions so replicas starting together interleave in each line.
        if !self.sleep(retry.mul_f64(Rng::from_entropy().unit())).await {
            return Ok(());
        }
        let mode = self.mode();
        let initial = Job::new(&name, self.initial_cursor(mode));
        let topology = &self.shared.topology;
        let mut lease = Lease::open(&self.owner, &self.connection, &self.commits, topology, initial).await?;
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return Ok(()),
                acquired = lease.acquire() => acquired?,
            }
            if !self.shared.take_slot() {
                // This replica holds its fair share: the next replica in line takes the account.
                if !self.requeue(&mut lease, retry).await? {
                    return Ok(());
                }
                continue;
            }
            // Fence before the first call: whatever an earlier owner still commits ranks below.
            let job = match lease.fence(&self.commits).await {
                Ok(job) => job,
                Err(error) if error.is::<LostOwnership>() => {
                    self.shared.drop_slot();
                    tracing::warn!(message = "Not the account's owner after all; waiting in line again.", account = %name, %error);
                    lease.give_back().await?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            self.shared.metrics.held.inc();
            tracing::info!(message = "Holding account.", account = %name, seq = job.seq);
            // The previous holder may have called a moment ago: leave one call's spacing first,
            // so a handover never puts two calls closer than the budget allows.
            let outcome = if self.sleep(self.runtime.budget.spacing * 2).await {
                self.hold(&mut lease, self.adopt(job, mode)).await
            } else {
                Ok(Holding::Shutdown)
            };
            self.shared.metrics.held.dec();
            match outcome {
                Ok(Holding::Released) => {
                    // Let a less loaded replica take it before queueing for it again.
                    if !self.requeue(&mut lease, retry * 3).await? {
                        return Ok(());
                    }
                }
                Ok(Holding::Shutdown) => {
                    self.shared.drop_slot();
                    // Hand the job back now rather than when the connection closes.
                    let _ = lease.release().await;
                    return Ok(());
                }
                // The broker gave the account to another replica without closing our channel:
                // whatever this replica was doing stops here (nothing of it was committed).
                Err(error) if error.is::<LostOwnership>() => {
                    self.shared.drop_slot();
                    self.shared.metrics.ownership_lost.inc();
                    tracing::warn!(message = "Lost the account to another replica; stopped working it.", account = %name, %error);
                    // Stay in line (no cancel): if the broker makes this replica active again it
                    // takes over from the newest job, fenced.
                    lease.give_back().await?;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Hands the account on (returns what is held) and queues for it again after `wait`; `false`
    /// on shutdown.
    async fn requeue(&self, lease: &mut Lease, wait: Duration) -> anyhow::Result<bool> {
        lease.release().await?;
        if !self.sleep(wait).await {
            return Ok(false);
        }
        lease.subscribe().await?;
        Ok(true)
    }

    fn mode(&self) -> CursorMode {
        match self.runtime.account.request.cursor {
            CursorKind::StartTs => CursorMode::StartTs,
            CursorKind::Modified => CursorMode::Modified,
        }
    }

    /// Runs passes while holding the account, from `job` (the newest the broker handed over).
    async fn hold(&self, lease: &mut Lease, mut job: Job) -> anyhow::Result<Holding> {
        let rt = &self.runtime;
        let mode = job.cursor.mode;
        let sweeping = mode == CursorMode::StartTs && !self.shared.config.sweep_every.is_zero();
        let mut sweeper = Sweeper::new(self, sweeping);
        let requests = audit::Requests::new(rt.clone(), self.shared.clone(), self.publisher.clone(), &self.token);
        let _holding = Registered::new(&self.shared, rt, &self.token);
        let mut fresh_until: Option<std::time::Instant> = None;
        loop {
            requests.take(lease).await?;
            if rt.stopped.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                if !self.wait_while_stopped(lease).await? {
                    return Ok(Holding::Shutdown);
                }
                self.keep(lease, &mut job).await?;
                continue;
            }
            sweeper.begin(&job);
            let (mut credentials, store) = self.credentials_for(&job);
            let mut kept = None;
            let outcome = {
                let pass = self.run_pass(&job, mode, &mut credentials, sweeping, fresh_until);
                tokio::pin!(pass);
                // A pass has no end while the source is down (calls are retried): keep the job
                // alive beside it, and stop it at once if the broker gave the account away.
                loop {
                    let due = self.shared.config.keep_after.saturating_sub(lease.held_for());
                    tokio::select! {
                        outcome = &mut pass => break outcome,
                        _ = tokio::time::sleep(due) => {
                            let alive = kept.as_ref().unwrap_or(&job).renewed();
                            lease.commit(&self.commits, &alive).await?;
                            kept = Some(alive);
                        }
                    }
                }
            };
            if let Some(alive) = kept {
                job = alive;
            }
            *rt.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials.clone();
            let result = match outcome {
                Ok(result) => result,
                Err(error) => {
                    if self.pass_failed(&job, &credentials, error).await? {
                        continue;
                    }
                    return Ok(Holding::Shutdown);
                }
            };
            let mut next = self.next_job(&job, &result, store)?;
            lease.commit(&self.commits, &next).await?;
            fresh_until = None;
            if result.needs_refresh {
                match self.refresh(lease, &mut next, &mut credentials).await? {
                    Refreshed::Fresh(until) => fresh_until = Some(until),
                    Refreshed::Shutdown => return Ok(Holding::Shutdown),
                    Refreshed::Refused(reason) => {
                        self.credentials_refused(&next, &credentials, reason).await;
                        job = next;
                        continue;
                    }
                }
            }
            sweeper.tend().await;
            self.committed(&next, &result).await;
            job = next;
            if let Some(holding) = self.let_go() {
                return Ok(holding);
            }
            if result.caught_up && !self.idle(lease, &mut job, &requests).await? {
                return Ok(Holding::Shutdown);
            }
        }
    }

    /// Waits `FETCH_INTERVAL` between caught-up passes, keeping the held job fresh and taking
    /// requests for the owner as they come. `false` on shutdown.
    async fn idle(&self, lease: &mut Lease, job: &mut Job, requests: &audit::Requests) -> anyhow::Result<bool> {
        let until = tokio::time::Instant::now() + self.runtime.account.interval;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(true);
            }
            tokio::select! {
                _ = self.token.cancelled() => return Ok(false),
                _ = tokio::time::sleep(left.min(self.shared.config.keep_after)) => {}
                waited = lease.wait_request() => waited?,
            }
            requests.take(lease).await?;
            self.keep(lease, job).await?;
        }
    }

    /// Re-commits the job when it has been held unacked for `FETCH_KEEP_AFTER`, so the broker's
    /// `consumer_timeout` never closes the channel every account's consumer lives on.
    async fn keep(&self, lease: &mut Lease, job: &mut Job) -> anyhow::Result<()> {
        if lease.held_for() >= self.shared.config.keep_after {
            *job = job.renewed();
            lease.commit(&self.commits, job).await?;
        }
        Ok(())
    }

    /// A pass that failed, handled: `Ok(true)` to go on holding the account (stopped, or to try
    /// the configured pair), `Ok(false)` on shutdown; a broker failure ends the session.
    async fn pass_failed(&self, job: &Job, credentials: &Credentials, error: PassError) -> anyhow::Result<bool> {
        let name = self.runtime.account.name.as_str();
        match error {
            PassError::Interrupted => Ok(false),
            PassError::Stopped(reason) => {
                self.stop_account(job, reason).await;
                Ok(true)
            }
            PassError::Credentials(reason) => {
                self.credentials_refused(job, credentials, reason).await;
                Ok(true)
            }
            PassError::Broker(error) => {
                self.shared.metrics.passes.with_label_values(&[name, "failed"]).inc();
                Err(error.context(format!("account {name}: publishing pages failed; no checkpoint")))
            }
        }
    }

    /// The job a pass commits: its cursor (still saying when the source was last caught up), its
    /// orders, and the token pair to store if the job's is older or missing.
    fn next_job(&self, job: &Job, result: &pass::PassResult, store: Option<job::Tokens>) -> anyhow::Result<Job> {
        let mut next_cursor = result.cursor.clone();
        if next_cursor.caught_up_at.is_none() {
            next_cursor.caught_up_at = job.cursor.caught_up_at.clone();
        }
        let mut next = job.next(next_cursor, None, result.orders);
        if let Some(tokens) = store {
            next.store_tokens(tokens, &self.shared.sealer).map_err(anyhow::Error::msg)?;
        }
        Ok(next)
    }

    /// After a committed pass: `Some` to let the account go (shutdown, or more than this
    /// replica's fair share held), `None` to hold on.
    fn let_go(&self) -> Option<Holding> {
        if self.token.is_cancelled() {
            return Some(Holding::Shutdown);
        }
        if self.shared.shed_slot() {
            let name = self.runtime.account.name.as_str();
            tracing::info!(message = "Releasing account to rebalance over replicas.", account = name);
            return Some(Holding::Released);
        }
        None
    }

    /// The job to go on from: `job`, or its mode started afresh when the request config changed
    /// cursor mode.
    fn adopt(&self, job: Job, mode: CursorMode) -> Job {
        if job.cursor.mode == mode {
            return job;
        }
        let name = self.runtime.account.name.as_str();
        tracing::warn!(message = "Request config changed cursor mode; starting this mode afresh.", account = name, previous = ?job.cursor.mode);
        Job { cursor: self.initial_cursor(mode), ..job }
    }

    /// The credentials to call with (the newest token pair, see `tokens.rs`), and the pair the
    /// next commit must store when the job's is older or missing.
    fn credentials_for(&self, job: &Job) -> (Credentials, Option<job::Tokens>) {
        let rt = &self.runtime;
        let name = rt.account.name.as_str();
        let stored = job.stored_tokens(&self.shared.sealer).unwrap_or_else(|reason| {
            tracing::warn!(message = "The job's stored tokens cannot be read; using the configured pair.", account = name, %reason);
            None
        });
        let (credentials, which) = rt.book.choose(stored.as_ref());
        let store = match which {
            // Sealing was switched on since the pair was stored in the clear: store it sealed.
            Pick::Stored if self.shared.sealer.enabled() && job.tokens.is_some() => stored,
            Pick::Stored => None,
            Pick::Memory => {
                tracing::info!(
                    message = "Using the token pair this replica refreshed last (newer than the stored one).",
                    account = name
                );
                rt.book.newest()
            }
            Pick::Configured if stored.is_some() => {
                tracing::info!(
                    message =
                        "The configured token pair changed since the stored one was issued; using the configured pair.",
                    account = name
                );
                Some(rt.book.adopt_configured())
            }
            Pick::Configured => None,
        };
        (credentials, store)
    }

    async fn run_pass(
        &self,
        job: &Job,
        mode: CursorMode,
        credentials: &mut Credentials,
        sweeping: bool,
        fresh_until: Option<std::time::Instant>,
    ) -> Result<pass::PassResult, PassError> {
        let rt = &self.runtime;
        let mut ctx = PassContext {
            account: &rt.account,
            client: &rt.client,
            budget: &rt.budget,
            publisher: &self.publisher,
            topology: &self.shared.topology,
            metrics: &self.shared.metrics,
            shutdown: &self.token,
            settings: &self.shared.settings,
            credentials,
            tracer: &self.shared.tracer,
            share: None,
            seen: sweeping.then_some(&rt.seen),
            follow: None,
            fresh_until,
            ledger: &self.shared.ledger,
        };
        match mode {
            CursorMode::StartTs => pass::start_ts_pass(&mut ctx, job.cursor.start_ts.unwrap_or(0)).await,
            CursorMode::Modified => {
                let from = job.cursor.synced_until().unwrap_or_else(|| rt.account.sync_start.resolve(Timestamp::now()));
                pass::modified_pass(&mut ctx, from).await
            }
        }
    }

    /// Refreshes the token pair and commits it at once (the refresh token is single-use).
    async fn refresh(
        &self,
        lease: &mut Lease,
        next: &mut Job,
        credentials: &mut Credentials,
    ) -> anyhow::Result<Refreshed> {
        let rt = &self.runtime;
        let outcome =
            pass::refresh_tokens(&rt.client, &rt.account, credentials, &rt.book, &self.shared.metrics, &self.token)
                .await;
        *rt.credentials.lock().unwrap_or_else(|e| e.into_inner()) = credentials.clone();
        Ok(match outcome {
            Ok((tokens, lifetime)) => {
                *next = next.renewed();
                next.store_tokens(tokens, &self.shared.sealer).map_err(anyhow::Error::msg)?;
                // If this commit fails the replica still has the pair in memory (newest wins).
                lease.commit(&self.commits, next).await?;
                // A code 100 soon after this means the new pair is bad; much later (a short-lived
                // token, a slow source) it has simply expired again.
                Refreshed::Fresh(std::time::Instant::now() + (lifetime / 2).min(Duration::from_secs(60)))
            }
            Err(pass::RefreshFailure::Interrupted) => Refreshed::Shutdown,
            Err(pass::RefreshFailure::Credentials(reason)) => Refreshed::Refused(reason),
        })
    }

    /// The pair in use was refused: try the configured pair once (the operator may have set new
    /// tokens), else stop the account saying what to do.
    async fn credentials_refused(&self, job: &Job, in_use: &Credentials, reason: String) {
        let rt = &self.runtime;
        let configured = rt.book.configured();
        if in_use.access_token != configured.access_token || in_use.refresh_token != configured.refresh_token {
            tracing::warn!(message = "The token pair in use was refused; trying the configured pair.", account = %rt.account.name, %reason);
            rt.book.adopt_configured();
            return;
        }
        let advice = "the configured token pair was refused too: set new JST_ACCESS_TOKEN/JST_REFRESH_TOKEN \
                      (an accounts file is re-read while the account is stopped; environment variables at the next start)";
        self.stop_account(job, format!("{reason}; {advice}")).await;
    }

    /// A stopped account waits (a request for its owner is answered that it is stopped); with
    /// an accounts file, new credentials there restart it.
    async fn wait_while_stopped(&self, lease: &mut Lease) -> anyhow::Result<bool> {
        let rt = &self.runtime;
        let name = rt.account.name.as_str();
        let reason = rt.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        tracing::error!(message = "Account stopped; fix the configuration (see reason).", account = name, %reason);
        let recheck = tokio::time::Instant::now() + STOPPED_RECHECK;
        loop {
            tokio::select! {
                _ = self.token.cancelled() => return Ok(false),
                _ = tokio::time::sleep_until(recheck) => break,
                waited = lease.wait_request() => {
                    waited?;
                    let requests = audit::Requests::new(rt.clone(), self.shared.clone(), self.publisher.clone(), &self.token);
                    requests.take(lease).await?;
                }
            }
        }
        Ok(self.restart_if_new_credentials())
    }

    /// With an accounts file holding new credentials for a stopped account, restarts it.
    fn restart_if_new_credentials(&self) -> bool {
        let rt = &self.runtime;
        let name = rt.account.name.as_str();
        let Some(fresh) = self.reread_credentials() else { return true };
        if fresh.access_token == rt.book.configured().access_token
            && fresh.refresh_token == rt.book.configured().refresh_token
        {
            return true;
        }
        rt.book.set_configured(fresh);
        rt.book.adopt_configured();
        *rt.stopped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.shared.metrics.stopped.with_label_values(&[name]).set(0);
        self.shared.readiness.set_ok(&format!("account:{name}"));
        tracing::info!(message = "New credentials in the accounts file; the account restarts.", account = name);
        true
    }

    /// This account's credentials as the accounts file says now (`None` without a file).
    fn reread_credentials(&self) -> Option<Credentials> {
        self.shared.config.accounts_file.as_ref()?;
        match self.shared.config.accounts() {
            Ok(accounts) => accounts.into_iter().find(|a| a.name == self.runtime.account.name).map(|a| a.credentials),
            Err(error) => {
                tracing::warn!(message = "Could not re-read the accounts file.", %error);
                None
            }
        }
    }

    /// After a committed pass: lag, status report, metrics, log.
    async fn committed(&self, next: &Job, result: &pass::PassResult) {
        let name = self.runtime.account.name.as_str();
        let lag = self.observe_lag(&next.cursor);
        let audit = self.runtime.last_audit.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.report(json!({
            "account": name, "seq": next.seq, "cursor": next.cursor, "caught_up": result.caught_up,
            "lag_seconds": lag, "orders_total": next.orders_total, "pass_orders": result.orders,
            "audit": audit,
        }))
        .await;
        let label = if result.caught_up { "caught_up" } else { "partial" };
        self.shared.metrics.passes.with_label_values(&[name, label]).inc();
        tracing::info!(
            message = "Pass committed.", account = name, seq = next.seq, pages = result.pages,
            orders = result.orders, caught_up = result.caught_up, cursor = ?next.cursor
        );
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
        let props = orderflow_shared::amqp::headers::json_properties(&id, Headers::default());
        if let Err(error) = self.publisher.publish("", &queue, &body, props).await {
            tracing::warn!(message = "Could not publish the account status.", account = %self.runtime.account.name, %error);
        }
    }
}

enum Holding {
    Released,
    Shutdown,
}

/// An account in `Shared::holding` while this replica works it; its token is cancelled and the
/// entry removed when dropped.
struct Registered {
    shared: Arc<Shared>,
    account: String,
    token: CancellationToken,
}

impl Registered {
    fn new(shared: &Arc<Shared>, rt: &Arc<AccountRuntime>, parent: &CancellationToken) -> Registered {
        let token = parent.child_token();
        let account = rt.account.name.clone();
        shared.holding.lock().unwrap_or_else(|e| e.into_inner()).insert(account.clone(), (rt.clone(), token.clone()));
        Registered { shared: shared.clone(), account, token }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.token.cancel();
        self.shared.holding.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.account);
    }
}

/// How often a stopped account looks for new credentials in the accounts file.
const STOPPED_RECHECK: Duration = Duration::from_secs(15);

enum Refreshed {
    /// Refreshed and committed; a code 100 before this instant means the new pair is bad.
    Fresh(std::time::Instant),
    Shutdown,
    Refused(String),
}

/// Runs the lagging sweep of a held start_ts account beside its passes (sharing the merchant's
/// budget, within its share), every FETCH_SWEEP_EVERY; stopped when the account is let go.
struct Sweeper {
    enabled: bool,
    runtime: Arc<AccountRuntime>,
    shared: Arc<Shared>,
    publisher: Publisher,
    token: CancellationToken,
    _stop: tokio_util::sync::DropGuard,
    running: Option<tokio::task::JoinHandle<Result<sweep::SweepResult, PassError>>>,
    next_at: tokio::time::Instant,
    began: bool,
}

impl Sweeper {
    fn new(worker: &AccountWorker, enabled: bool) -> Self {
        let token = worker.token.child_token();
        Self {
            enabled,
            runtime: worker.runtime.clone(),
            shared: worker.shared.clone(),
            publisher: worker.publisher.clone(),
            _stop: token.clone().drop_guard(),
            token,
            running: None,
            next_at: tokio::time::Instant::now() + worker.shared.config.sweep_every,
            began: false,
        }
    }

    /// The replica's memory of published versions starts when it takes the account.
    fn begin(&mut self, job: &Job) {
        if self.enabled && !self.began {
            self.began = true;
            self.runtime.seen.reset(job.cursor.start_ts.unwrap_or(0), Timestamp::now());
        }
    }

    /// Collects a finished sweep and starts the next one when it is due.
    async fn tend(&mut self) {
        if !self.enabled {
            return;
        }
        if self.running.as_ref().is_some_and(tokio::task::JoinHandle::is_finished)
            && let Some(handle) = self.running.take()
        {
            self.report(handle.await);
        }
        if self.running.is_none() && tokio::time::Instant::now() >= self.next_at {
            self.next_at = tokio::time::Instant::now() + self.shared.config.sweep_every;
            self.running = Some(tokio::spawn(Self::run(
                self.runtime.clone(),
                self.shared.clone(),
                self.publisher.clone(),
                self.token.clone(),
            )));
        }
    }

    async fn run(
        rt: Arc<AccountRuntime>,
        shared: Arc<Shared>,
        publisher: Publisher,
        token: CancellationToken,
    ) -> Result<sweep::SweepResult, PassError> {
        let mut credentials = rt.credentials.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut ctx = PassContext {
            account: &rt.sweep_account,
            client: &rt.client,
            budget: &rt.budget,
            publisher: &publisher,
            topology: &shared.topology,
            metrics: &shared.metrics,
            shutdown: &token,
            settings: &shared.settings,
            credentials: &mut credentials,
            tracer: &shared.tracer,
            share: Some(&rt.sweep_share),
            seen: None,
            follow: Some(&rt.credentials),
            fresh_until: None,
            ledger: &shared.ledger,
        };
        sweep::sweep(&mut ctx, &rt.seen, shared.config.sweep_span).await
    }

    fn report(&self, joined: Result<Result<sweep::SweepResult, PassError>, tokio::task::JoinError>) {
        let name = self.runtime.account.name.as_str();
        let metrics = &self.shared.metrics;
        match joined {
            Ok(Ok(result)) => {
                let complete = result.pass.as_ref().is_some_and(|p| p.caught_up);
                metrics.sweeps.with_label_values(&[name, if complete { "done" } else { "partial" }]).inc();
                metrics.sweep_found.with_label_values(&[name]).inc_by(result.found);
                metrics.sweep_republished.with_label_values(&[name]).inc_by(result.unknown);
                if result.found > 0 {
                    tracing::warn!(
                        message =
                            "The sweep found orders the start_ts cursor had missed (late commits); published them.",
                        account = name,
                        found = result.found,
                        republished = result.unknown,
                        skipped = result.skipped
                    );
                } else {
                    tracing::info!(
                        message = "Sweep done.",
                        account = name,
                        complete,
                        republished = result.unknown,
                        skipped = result.skipped
                    );
                }
            }
            Ok(Err(PassError::Interrupted)) => {}
            Ok(Err(error)) => {
                metrics.sweeps.with_label_values(&[name, "failed"]).inc();
                tracing::warn!(message = "Sweep failed; the next one runs on schedule.", account = name, %error);
            }
            Err(error) => {
                metrics.sweeps.with_label_values(&[name, "failed"]).inc();
                tracing::error!(message = "Sweep task ended abnormally.", account = name, %error);
            }
        }
    }
}
