//! Requests for the account's owner (`orderflow audit`): list the source's Confirmed orders in a
//! window, or fetch missing orders by id and push them through the pipeline again. They arrive
//! through the account's job queue, so only the replica holding the account takes them; they run
//! beside the account's passes within `FETCH_AUDIT_BUDGET`, a share of the merchant's budget
//! (taken first, then the budget itself: live fetching and the audit together never exceed it),
//! and stop when the account is let go. Answers go to the requester's queue
//! (`orderflow_shared::audit` has the messages).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use jiff::Timestamp;
use orderflow_shared::{
    amqp::{Publisher, headers::json_properties, lease::Request as Delivered},
    audit::{Action, MAX_IDS_PER_CALL, REPLY_SCHEMA, Reply, ReplyBody, Request, SourceOrder},
    ledger::Ledger,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::{
    AccountRuntime, Shared,
    account::Account,
    lease::Lease,
    pass::{self, PassContext, PassError, Walk},
};

/// Orders per `orders` answer.
const CHUNK: usize = 2000;

/// The longest an audit's walk may take (a year of windows at the audit's share is far less).
const MAX_WALK: Duration = Duration::from_secs(24 * 3600);

/// Takes the requests the lease received and starts each beside the account's passes; stopped
/// with the account (dropping the `Requests` cancels what runs).
pub(crate) struct Requests {
    runtime: Arc<AccountRuntime>,
    shared: Arc<Shared>,
    publisher: Publisher,
    token: CancellationToken,
    _stop: tokio_util::sync::DropGuard,
}

impl Requests {
    pub fn new(
        runtime: Arc<AccountRuntime>,
        shared: Arc<Shared>,
        publisher: Publisher,
        parent: &CancellationToken,
    ) -> Self {
        let token = parent.child_token();
        Requests { runtime, shared, publisher, _stop: token.clone().drop_guard(), token }
    }

    /// Starts every request received so far (each is removed from the queue first: a request
    /// whose owner dies half-way is asked again by its requester, who hears nothing more).
    pub async fn take(&self, lease: &mut Lease) -> anyhow::Result<()> {
        for delivered in lease.take_requests() {
            lease.ack_request(delivered.tag).await?;
            let (rt, shared, publisher, token) =
                (self.runtime.clone(), self.shared.clone(), self.publisher.clone(), self.token.clone());
            tokio::spawn(async move { serve(rt, shared, publisher, token, delivered).await });
        }
        Ok(())
    }
}

/// Where one request's answers go.
struct Replier {
    publisher: Publisher,
    to: String,
    id: String,
}

impl Replier {
    async fn send(&self, reply: Reply) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&ReplyBody { schema: REPLY_SCHEMA.into(), id: self.id.clone(), reply })?;
        let props = json_properties(&format!("reply:{}", self.id), Default::default())
            .with_correlation_id(self.id.as_str().into());
        // Mandatory: a requester that went away (its queue is gone) ends the request.
        self.publisher.publish("", &self.to, &body, props).await?;
        Ok(())
    }
}

async fn serve(
    rt: Arc<AccountRuntime>,
    shared: Arc<Shared>,
    publisher: Publisher,
    token: CancellationToken,
    delivered: Delivered,
) {
    let name = rt.account.name.clone();
    let Some(to) = delivered.reply_to.clone() else {
        tracing::warn!(message = "A request without reply_to was dropped.", account = %name);
        return;
    };
    let request = match serde_json::from_slice::<Request>(&delivered.body) {
        Ok(r) if r.account == name => r,
        Ok(r) => {
            let replier = Replier { publisher, to, id: r.id.clone() };
            let error = format!("this is account {name}'s queue, the request is for {}", r.account);
            let _ = replier.send(Reply::Failed { error }).await;
            return;
        }
        Err(error) => {
            let id = delivered.correlation_id.clone().unwrap_or_default();
            let replier = Replier { publisher, to, id };
            let _ = replier.send(Reply::Failed { error: format!("unreadable request: {error}") }).await;
            return;
        }
    };
    let replier = Replier { publisher: publisher.clone(), to, id: request.id.clone() };
    tracing::info!(message = "Serving a request for the account's owner.", account = %name, action = ?request.action, request = %request.id);
    let outcome = async {
        if let Some(reason) = rt.stopped.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            anyhow::bail!("the account is stopped: {reason}");
        }
        replier.send(Reply::Started { replica: orderflow_shared::replica::name().into() }).await?;
        match &request.action {
            Action::Audit { from, to } => list_confirmed(&rt, &shared, &publisher, &token, &replier, from, to).await,
            Action::Repair { o_ids } => repair(&rt, &shared, &publisher, &token, &replier, o_ids).await,
        }
    }
    .await;
    if let Err(error) = outcome {
        tracing::warn!(message = "A request for the account's owner failed.", account = %name, request = %request.id, error = %format!("{error:#}"));
        let _ = replier.send(Reply::Failed { error: format!("{error:#}") }).await;
    }
}

/// The pass context of a request: the audit's share of the budget, the pair the passes use now
/// (a request never refreshes tokens).
fn context<'a>(
    account: &'a Account,
    rt: &'a AccountRuntime,
    shared: &'a Shared,
    publisher: &'a Publisher,
    token: &'a CancellationToken,
    credentials: &'a mut crate::client::Credentials,
    ledger: &'a Ledger,
) -> PassContext<'a> {
    PassContext {
        account,
        client: &rt.client,
        budget: &rt.budget,
        publisher,
        topology: &shared.topology,
        metrics: &shared.metrics,
        shutdown: token,
        settings: &shared.settings,
        credentials,
        tracer: &shared.tracer,
        share: Some(&rt.audit_share),
        seen: None,
        follow: Some(&rt.credentials),
        fresh_until: None,
        ledger,
    }
}

fn pass_error(error: PassError) -> anyhow::Error {
    match error {
        PassError::Interrupted => {
            anyhow::anyhow!("this replica let the account go (another replica holds it now): ask again")
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// What a listing has found so far: orders not yet handed on, pages read, orders in all.
#[derive(Default)]
pub(crate) struct Found {
    pub orders: Vec<SourceOrder>,
    pub read: u64,
    pub total: u64,
}

/// Lists the orders Confirmed with `modified` in [from, to] (walking modified windows from the
/// last page to the first, as the passes do) into `found` as pages are read, within the audit's
/// share of the budget. Returns where the listing ended (windows close `FETCH_WINDOW_DELAY`
/// before now).
pub(crate) async fn walk_confirmed(
    rt: &AccountRuntime,
    shared: &Shared,
    publisher: &Publisher,
    token: &CancellationToken,
    (from, to): (Timestamp, Timestamp),
    found: Arc<Mutex<Found>>,
) -> Result<Option<Timestamp>, PassError> {
    let mut filter = move |rows: Vec<Value>| {
        let mut found = found.lock().unwrap_or_else(|e| e.into_inner());
        found.read += 1;
        for row in &rows {
            // The request asks for Confirmed orders; a row that says otherwise is not one.
            let confirmed = row.get("status").and_then(Value::as_str).is_none_or(|s| s == "Confirmed");
            if confirmed && let Some(order) = SourceOrder::of_row(row) {
                found.orders.push(order);
                found.total += 1;
            }
        }
        Vec::new()
    };
    let mut credentials = rt.credentials.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let off = Ledger::off(prometheus::IntCounter::new("unused", "unused").map_err(|e| PassError::Broker(e.into()))?);
    let mut ctx = context(&rt.audit_account, rt, shared, publisher, token, &mut credentials, &off);
    let walk = Walk {
        overlap: Duration::ZERO,
        mode: "audit",
        filter: &mut filter,
        max_pages: u32::MAX,
        max_time: MAX_WALK,
        rewalk_on_growth: true,
        until: Some(to),
    };
    let walked = pass::walk_windows(&mut ctx, from, walk).await?;
    // A walk cut short (the account let go, a token to refresh) has not listed the window.
    if token.is_cancelled() {
        return Err(PassError::Interrupted);
    }
    if walked.needs_refresh || !walked.caught_up {
        return Err(PassError::Credentials(
            "the listing was cut short (the access token is being refreshed): ask again in a minute".into(),
        ));
    }
    Ok(walked.cursor.synced_until())
}

/// Answers an audit request: the orders Confirmed in [from, to], sent in chunks with progress.
async fn list_confirmed(
    rt: &AccountRuntime,
    shared: &Shared,
    publisher: &Publisher,
    token: &CancellationToken,
    replier: &Replier,
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    let parse = |what: &str, text: &str| {
        text.parse::<Timestamp>().map_err(|e| anyhow::anyhow!("{what} {text:?} is not an RFC 3339 time: {e}"))
    };
    let (from, to) = (parse("from", from)?, parse("to", to)?);
    anyhow::ensure!(from < to, "the window is empty: from is not before to");
    let found = Arc::new(Mutex::new(Found::default()));
    let walking = walk_confirmed(rt, shared, publisher, token, (from, to), found.clone());
    tokio::pin!(walking);
    let mut heartbeat = tokio::time::interval(orderflow_shared::audit::HEARTBEAT);
    heartbeat.tick().await;
    let result = loop {
        tokio::select! {
            result = &mut walking => break result,
            _ = heartbeat.tick() => send_found(replier, &found, None).await?,
        }
    };
    let until = result.map_err(pass_error)?.map(orderflow_shared::time::rfc3339_china).unwrap_or_default();
    send_found(replier, &found, Some(until)).await
}

/// Sends the orders found since the last answer (in chunks), then progress or, at the end
/// (`until`: where the listing ended), done.
async fn send_found(replier: &Replier, found: &Mutex<Found>, until: Option<String>) -> anyhow::Result<()> {
    let (orders, read, total) = {
        let mut found = found.lock().unwrap_or_else(|e| e.into_inner());
        (std::mem::take(&mut found.orders), found.read, found.total)
    };
    for chunk in orders.chunks(CHUNK) {
        replier.send(Reply::Orders { orders: chunk.to_vec() }).await?;
    }
    let reply = match until {
        Some(until) => Reply::Done { read, orders: total, published: 0, not_found: Vec::new(), until: Some(until) },
        None => Reply::Progress { read, orders: total },
    };
    replier.send(reply).await
}

/// Fetches `o_ids` by id (at most 50 a call) and publishes what the source returns as pages
/// (confirmed, recorded as fetched): the pipeline writes them again (idCheck absorbs the ones
/// already written). Answers which ids the source did not return.
async fn repair(
    rt: &AccountRuntime,
    shared: &Shared,
    publisher: &Publisher,
    token: &CancellationToken,
    replier: &Replier,
    o_ids: &[String],
) -> anyhow::Result<()> {
    let mut credentials = rt.credentials.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (mut read, mut orders, mut published, mut not_found) = (0u64, 0u64, 0u64, Vec::new());
    let mut last_heard = tokio::time::Instant::now();
    for (n, chunk) in o_ids.chunks(MAX_IDS_PER_CALL).enumerate() {
        let account = Account { request: rt.account.request.for_ids(chunk), ..rt.account.clone() };
        let mut ctx = context(&account, rt, shared, publisher, token, &mut credentials, &shared.ledger);
        let key = format!("repair:{}:{n}", replier.id);
        let fetching = pass::fetch_by_ids(&mut ctx, &key, json!({"mode": "repair", "request": replier.id}));
        tokio::pin!(fetching);
        // A call can wait long for its budget: the requester hears from us meanwhile.
        let mut heartbeat = tokio::time::interval(orderflow_shared::audit::HEARTBEAT);
        heartbeat.tick().await;
        let rows = loop {
            tokio::select! {
                rows = &mut fetching => break rows.map_err(pass_error)?,
                _ = heartbeat.tick() => replier.send(Reply::Progress { read, orders }).await?,
            }
        };
        read += 1;
        orders += rows.len() as u64;
        published += u64::from(!rows.is_empty());
        let returned: std::collections::HashSet<String> =
            rows.iter().filter_map(SourceOrder::of_row).map(|o| o.o_id).collect();
        not_found.extend(chunk.iter().filter(|id| !returned.contains(*id)).cloned());
        if last_heard.elapsed() >= orderflow_shared::audit::HEARTBEAT {
            replier.send(Reply::Progress { read, orders }).await?;
            last_heard = tokio::time::Instant::now();
        }
    }
    tracing::info!(message = "Repair published the orders asked for.", account = %rt.account.name, orders, pages = published, not_found = not_found.len());
    replier.send(Reply::Done { read, orders, published, not_found, until: None }).await
}

/// The ledger is read from this long before an audit window: an order's events come after its
/// `modified`, give or take the machines' clocks.
const LEDGER_MARGIN: Duration = Duration::from_secs(600);

/// The scheduled audit (`FETCH_AUDIT_EVERY`): every period, each account this replica holds is
/// listed for the previous period ending `FETCH_AUDIT_LAG` ago (within its audit share), the
/// ledger is read once for all of them, and each account's findings go to
/// `orderflow_audit_missing`, `orderflow_audit_last_complete_timestamp_seconds`, the log and the
/// account's status report (`orderflow status`).
pub(crate) async fn scheduled(
    shared: Arc<Shared>,
    connection: Arc<orderflow_shared::amqp::Connection>,
    publisher: Publisher,
    token: CancellationToken,
) {
    let every = shared.config.audit_every;
    // The first soon after the session starts (once the accounts are held), then every period.
    let mut next = tokio::time::Instant::now() + every.min(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        next = tokio::time::Instant::now() + every;
        // A day of ledger takes a while to read: the session's end must not wait for it.
        let outcome = tokio::select! {
            _ = token.cancelled() => return,
            outcome = audit_held(&shared, &connection, &publisher) => outcome,
        };
        if let Err(error) = outcome {
            tracing::warn!(message = "The scheduled audit failed; the next one runs on schedule.", error = %format!("{error:#}"));
        }
    }
}

async fn audit_held(
    shared: &Shared,
    connection: &orderflow_shared::amqp::Connection,
    publisher: &Publisher,
) -> anyhow::Result<()> {
    let held: Vec<(Arc<AccountRuntime>, CancellationToken)> =
        shared.holding.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
    if held.is_empty() {
        return Ok(());
    }
    let lag = jiff::SignedDuration::try_from(shared.config.audit_lag)?;
    let every = jiff::SignedDuration::try_from(shared.config.audit_every)?;
    let to = Timestamp::now().checked_sub(lag)?;
    let to = Timestamp::from_second(to.as_second())?;
    let from = to.checked_sub(every)?;
    let listings = held.iter().map(|(rt, hold)| async move {
        let found = Arc::new(Mutex::new(Found::default()));
        let walked = walk_confirmed(rt, shared, publisher, hold, (from, to), found.clone()).await;
        let orders = std::mem::take(&mut found.lock().unwrap_or_else(|e| e.into_inner()).orders);
        (rt.clone(), walked, orders)
    });
    let listed = futures_util::future::join_all(listings).await;
    let needles: Vec<Vec<u8>> = listed
        .iter()
        .map(|(rt, _, _)| {
            format!("\"account\":{}", serde_json::to_string(&rt.account.name).unwrap_or_default()).into_bytes()
        })
        .collect();
    let topology = shared.topology.clone().with_ledger(&shared.config.ledger);
    let mut events: HashMap<String, Vec<orderflow_shared::ledger::Event>> = HashMap::new();
    let since = from.as_second() - LEDGER_MARGIN.as_secs() as i64;
    // Only the events of the orders listed are kept.
    let listed_ids: std::collections::HashSet<(String, String)> = listed
        .iter()
        .flat_map(|(rt, _, orders)| orders.iter().map(|o| (rt.account.name.clone(), o.o_id.clone())))
        .collect();
    let read = orderflow_shared::amqp::ledger::read_events(connection, &topology, since, &needles, |_, _, event| {
        if let Some(o_id) = &event.o_id
            && listed_ids.contains(&(event.account.clone(), o_id.clone()))
        {
            events.entry(event.account.clone()).or_default().push(event);
        }
    })
    .await?;
    // Queues this user may not look at count as busy: nothing is called missing for lack of sight.
    let stages = shared.topology.clone().with_retry_tiers(shared.config.retry_tiers.0.clone());
    let busy = orderflow_shared::amqp::ops::pipeline_busy(connection, &stages).await.unwrap_or(true);
    let settle = orderflow_shared::audit::Settle {
        now: Timestamp::now(),
        grace: shared.config.audit_grace,
        pipeline_busy: busy,
    };
    let window = (orderflow_shared::time::rfc3339_china(from), orderflow_shared::time::rfc3339_china(to));
    for (rt, walked, orders) in listed {
        let name = rt.account.name.as_str();
        let metrics = &shared.metrics;
        let until = match walked {
            Ok(until) => until,
            Err(error) => {
                metrics.audit_runs.with_label_values(&[name, "failed"]).inc();
                tracing::warn!(message = "The scheduled audit could not list the source.", account = name, %error);
                continue;
            }
        };
        let seen = events.remove(name).unwrap_or_default();
        let report =
            orderflow_shared::audit::classify(name, (&window.0, &window.1), &orders, &seen, settle, read.complete);
        metrics.audit_missing.with_label_values(&[name]).set(report.missing as i64);
        let result = if report.complete { "complete" } else { "incomplete" };
        metrics.audit_runs.with_label_values(&[name, result]).inc();
        if report.complete && until.is_some_and(|u| u >= to) {
            metrics.audit_last_complete.with_label_values(&[name]).set(to.as_second() as f64);
        }
        let missing = report.missing_ids();
        if missing.is_empty() {
            tracing::info!(message = "Scheduled audit done.", account = name, from = %window.0, to = %window.1, source = report.source, written = report.written, dead_lettered = report.dead_lettered, in_flight = report.in_flight);
        } else {
            tracing::warn!(
                message = "The scheduled audit found Confirmed orders nowhere in the pipeline; `orderflow audit --repair` fetches them again.",
                account = name, from = %window.0, to = %window.1, missing = report.missing,
                o_ids = %missing.iter().take(20).cloned().collect::<Vec<_>>().join(",")
            );
        }
        *rt.last_audit.lock().unwrap_or_else(|e| e.into_inner()) = Some(json!({
            "at": orderflow_shared::time::rfc3339_china(Timestamp::now()),
            "from": window.0, "to": window.1, "source": report.source, "written": report.written,
            "dead_lettered": report.dead_lettered, "dropped": report.dropped, "in_flight": report.in_flight,
            "missing": report.missing, "complete": report.complete,
            "missing_ids": missing.into_iter().take(20).collect::<Vec<_>>(),
        }));
    }
    Ok(())
}
