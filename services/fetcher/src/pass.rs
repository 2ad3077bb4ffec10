//! One fetch pass of one account: call the API within the budget (retrying what is transient,
//! refreshing an expired token, stopping the account on a permanent error), publish every page
//! (persistent, mandatory, confirmed), and return the advanced cursor, which the caller commits
//! only after every page of the pass is confirmed.
//!
//! Two cursor modes, both lossless under churn:
//! - `start_ts`: rows with `ts` > cursor, in `ts` order, always page 1; the cursor moves to the
//!   largest `ts` seen. A row that changes gets a new, larger `ts`, so it is seen again.
//! - `modified` windows: closed windows ending at `now − delay` (≤ 7 days, shrunk to fit a pass;
//!   the first window of a pass starts `overlap` before `synced_until`, the next ones where the
//!   last ended), walked from the last page to the first so rows leaving the window can only
//!   cause duplicates, never gaps; the row count is re-checked on every call and a window that
//!   gained rows is walked again. A pass whose window reached `now − delay` is caught up.
//!
//! The same walk serves the lagging sweep (`sweep.rs`), which publishes only rows the start_ts
//! cursor missed.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream::FuturesUnordered};
use jiff::{SignedDuration, Timestamp};
use orderflow_shared::{
    amqp::{
        Headers, Properties, Publisher, Topology,
        headers::{json_properties, set_i64, set_str},
        topology::PAGE_ROUTING_KEY,
    },
    backoff::Backoff,
    jst::CodeAction,
    ledger::{Event, Ledger, OrderIds, What},
    messages::{PAGE_SCHEMA, Page, header, now_ms, page_message_id},
    otel,
    time::rfc3339_china,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Span;

use crate::{
    account::Account,
    budget::Budget,
    client::{ApiPage, CallError, Credentials, JstClient},
    job::{Cursor, Tokens},
    metrics::Metrics,
    request_config::RenderContext,
};

/// Publishes in flight at once per account (confirms are awaited in a window, not one by one).
const PUBLISH_WINDOW: usize = 16;
/// Code-100 answers a sweep waits through for the passes to refresh the pair.
const FOLLOW_WAITS: u32 = 6;
/// Undecodable answers to one call in a row (about two minutes of backoff) before the account
/// stops: a misconfigured URL must not look like a slow source forever.
const MAX_UNDECODABLE: u32 = 10;
/// The API's longest modified window.
const MAX_WINDOW: SignedDuration = SignedDuration::from_hours(7 * 24);

pub struct PassSettings {
    pub max_pages: u32,
    pub max_time: Duration,
    pub window_delay: Duration,
    pub window_overlap: Duration,
}

/// Everything a pass uses; `credentials` may change (token refresh).
pub struct PassContext<'a> {
    pub account: &'a Account,
    pub client: &'a JstClient,
    pub budget: &'a Budget,
    pub publisher: &'a Publisher,
    pub topology: &'a Topology,
    pub metrics: &'a Metrics,
    pub shutdown: &'a CancellationToken,
    pub settings: &'a PassSettings,
    pub credentials: &'a mut Credentials,
    pub tracer: &'a orderflow_shared::otel::Tracer,
    /// A share of the budget this walk may use (a sweep's), taken before the merchant's budget.
    pub share: Option<&'a Budget>,
    /// Where start_ts passes record the row versions they published (for the sweep).
    pub seen: Option<&'a crate::sweep::Seen>,
    /// A walk beside the account's passes (the sweep) calls with the pair they use now and leaves
    /// refreshing to them: on code 100 it waits for a newer pair instead of refreshing.
    pub follow: Option<&'a std::sync::Mutex<Credentials>>,
    /// Until when the tokens count as just refreshed: a code 100 before then means bad
    /// credentials (stop), after it an expired token (refresh again). Cleared by a good call.
    pub fresh_until: Option<Instant>,
    /// Where each published order is recorded (`fetched`, once its page is confirmed).
    pub ledger: &'a Ledger,
}

/// A page ready to publish: body, properties, its span (when exporting) and the ledger events
/// recorded once the broker confirms it.
pub type PageMessage = (Vec<u8>, Properties, Option<Span>, Vec<Event>);

#[derive(Debug)]
pub struct PassResult {
    pub cursor: Cursor,
    pub pages: u32,
    pub orders: u64,
    pub caught_up: bool,
    /// The access token expired (code 100): the caller commits this pass, refreshes the token,
    /// and commits the new pair at once (a used refresh token is dead, so the pair must not be lost).
    pub needs_refresh: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// A permanent source error: stop this account (reason for logs, metrics and /readyz).
    #[error("{0}")]
    Stopped(String),
    /// The token pair in use was refused (code 100 right after a refresh, a refresh refused):
    /// the configured pair may be tried before the account stops.
    #[error("{0}")]
    Credentials(String),
    /// Shutdown requested before anything could be committed.
    #[error("interrupted")]
    Interrupted,
    /// The broker failed a publish: no checkpoint; the session reconnects.
    #[error("broker: {0}")]
    Broker(#[source] anyhow::Error),
}

enum CallFailure {
    /// `PassError::Stopped` or `PassError::Credentials`.
    Stop(PassError),
    Interrupted,
    NeedsRefresh,
}

impl PassContext<'_> {
    /// One API call, retried until it succeeds, the account must stop, or shutdown.
    async fn call(&mut self, ctx: &RenderContext) -> Result<ApiPage, CallFailure> {
        let name = self.account.name.as_str();
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut undecodable = 0u32;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(CallFailure::Interrupted);
            }
            self.wait_for_budget().await?;
            if let Some(current) = self.follow {
                *self.credentials = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            }
            let biz = self.account.request.render(ctx);
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(CallFailure::Interrupted),
                r = self.client.query(&self.account.request.api, self.credentials, &biz) => r,
            };
            let error = match result {
                Ok(page) => {
                    self.metrics.requests.with_label_values(&[name, "ok"]).inc();
                    self.fresh_until = None;
                    return Ok(page);
                }
                Err(error) => error,
            };
            self.metrics.requests.with_label_values(&[name, &error.outcome()]).inc();
            undecodable = if error.outcome() == "decode" { undecodable + 1 } else { 0 };
            let delay = self.retry_delay(&error, &mut backoff, undecodable)?;
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(CallFailure::Interrupted),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Waits for this call's turn in the budget (in the walk's share first, when it has one).
    async fn wait_for_budget(&self) -> Result<(), CallFailure> {
        if let Some(share) = self.share {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(CallFailure::Interrupted),
                _ = share.acquire() => {}
            }
        }
        let waited = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(CallFailure::Interrupted),
            w = self.budget.acquire() => w,
        };
        self.metrics.budget_wait.with_label_values(&[&self.account.name]).inc_by(waited.as_secs_f64());
        Ok(())
    }

    /// What a failed call leads to: how long to wait before making it again, or why not to.
    fn retry_delay(&self, error: &CallError, backoff: &mut Backoff, undecodable: u32) -> Result<Duration, CallFailure> {
        let name = self.account.name.as_str();
        Ok(match error.action() {
            CodeAction::Success => Duration::ZERO,
            CodeAction::Permanent => {
                return Err(CallFailure::Stop(PassError::Stopped(format!("permanent error from Jushuitan: {error}"))));
            }
            CodeAction::RefreshToken if self.follow.is_some() => {
                // The passes refresh the pair; wait for it (bounded: a stopped account's
                // sweep gives up and the next one tries again).
                if backoff.attempts() >= FOLLOW_WAITS {
                    return Err(CallFailure::NeedsRefresh);
                }
                backoff.next_delay()
            }
            CodeAction::RefreshToken => {
                if self.fresh_until.is_some_and(|until| Instant::now() < until) {
                    return Err(CallFailure::Stop(PassError::Credentials(format!(
                        "{error} right after a token refresh; check the account's credentials"
                    ))));
                }
                if self.account.api == crate::client::ApiGeneration::Legacy {
                    return Err(CallFailure::Stop(PassError::Stopped(format!(
                        "{error}; the legacy API has no token refresh: set a new JST_TOKEN"
                    ))));
                }
                if self.credentials.refresh_token.is_empty() {
                    return Err(CallFailure::Stop(PassError::Credentials(format!(
                        "{error}; no refresh token configured (JST_REFRESH_TOKEN)"
                    ))));
                }
                return Err(CallFailure::NeedsRefresh);
            }
            CodeAction::Resign => {
                tracing::warn!(
                    message = "Timestamp outside the allowed skew; re-signing. Check this machine's clock.",
                    account = name
                );
                backoff.next_delay()
            }
            CodeAction::RateLimited => {
                tracing::warn!(message = "Rate limited by Jushuitan; backing off and retrying the same page.", account = name, %error);
                backoff.next_delay().max(Duration::from_secs(1))
            }
            CodeAction::Transient if undecodable >= MAX_UNDECODABLE => {
                // The same call answered with something that is not an answer, again and again:
                // a wrong JST_BASE_URL or JST_API, or a proxy's page. Retrying forever hides it.
                return Err(CallFailure::Stop(PassError::Stopped(format!(
                    "the source's answer could not be read {MAX_UNDECODABLE} times in a row ({error}); \
                     check JST_BASE_URL and JST_API"
                ))));
            }
            CodeAction::Transient => {
                tracing::warn!(message = "Transient API error; retrying.", account = name, %error, attempt = backoff.attempts() + 1);
                backoff.next_delay()
            }
        })
    }

    /// The page message for `rows` (published by the caller).
    pub fn page_message(
        &self,
        cursor: Value,
        cursor_key: &str,
        page_index: u32,
        rows: Vec<Value>,
    ) -> Result<PageMessage, PassError> {
        let fetched_ms = now_ms();
        let id = page_message_id(&self.account.name, cursor_key, page_index);
        let events = if self.ledger.is_on() {
            let what = || What::Fetched { page: page_index, cursor: cursor_key.to_string() };
            rows.iter()
                .map(|row| {
                    Event::new(what(), &self.account.name, &id)
                        .ids(&OrderIds::of_row(row))
                        .version(OrderIds::row_version(row))
                })
                .collect()
        } else {
            Vec::new()
        };
        // A fetch starts the trace; when exporting, the page's traceparent names this span.
        let (traceparent, span) = otel::hop(self.tracer, None, || {
            let list = |key: &str| {
                rows.iter().take(50).filter_map(|r| r.get(key).map(|v| v.to_string())).collect::<Vec<_>>().join(",")
            };
            tracing::info_span!(target: otel::TARGET, parent: None, "fetch page",
                otel.kind = otel::PRODUCER,
                account = %self.account.name,
                messaging.message_id = %id,
                orders = rows.len(),
                o_id = %list("o_id"),
                io_id = %list("io_id"),
            )
        });
        let page = Page {
            schema: PAGE_SCHEMA.to_string(),
            account: self.account.name.clone(),
            cursor,
            fetched_at: rfc3339_china(Timestamp::from_millisecond(fetched_ms).unwrap_or_else(|_| Timestamp::now())),
            orders: rows,
        };
        // Never an empty body in place of a page: a page that cannot be encoded fails the pass
        // (no checkpoint), and the account stops saying why.
        let body = serde_json::to_vec(&page)
            .map_err(|e| PassError::Stopped(format!("a page of {} could not be encoded: {e}", self.account.name)))?;
        let mut headers = Headers::default();
        set_i64(&mut headers, header::ATTEMPT, 0);
        set_i64(&mut headers, header::FETCHED_AT_MS, fetched_ms);
        set_str(&mut headers, header::TRACEPARENT, &traceparent);
        Ok((body, json_properties(&id, headers), span, events))
    }
}

/// Why a refresh did not give a new token pair.
pub enum RefreshFailure {
    /// The refresh token was refused (or the refresh failed for good).
    Credentials(String),
    Interrupted,
}

/// Refreshes the access token (retrying transient failures); the caller must commit the new pair
/// with the checkpoint at once. The new pair is stamped and remembered in `book` at once, so a
/// failed commit cannot bring the spent pair back.
pub async fn refresh_tokens(
    client: &JstClient,
    account: &Account,
    credentials: &mut Credentials,
    book: &crate::tokens::TokenBook,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(Tokens, Duration), RefreshFailure> {
    let name = account.name.as_str();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        match client.refresh_token(credentials).await {
            Ok(pair) => {
                tracing::info!(message = "Access token refreshed.", account = name, expires_in = pair.expires_in);
                metrics.token_refreshes.with_label_values(&[name]).inc();
                credentials.access_token = pair.access_token;
                credentials.refresh_token = pair.refresh_token;
                let tokens = book.issued(credentials.access_token.clone(), credentials.refresh_token.clone());
                // No expires_in in the answer: assume a long-lived token (as Jushuitan's are).
                let lifetime =
                    if pair.expires_in == 0 { Duration::from_secs(120) } else { Duration::from_secs(pair.expires_in) };
                return Ok((tokens, lifetime));
            }
            Err(error) if error.action() == CodeAction::Transient => {
                tracing::warn!(message = "Token refresh failed; retrying.", account = name, %error);
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(RefreshFailure::Interrupted),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            Err(error) => {
                return Err(RefreshFailure::Credentials(format!("token refresh failed: {error}; set new tokens")));
            }
        }
    }
}

/// Confirmed publishes in flight, bounded.
pub struct Inflight<'p> {
    publisher: &'p Publisher,
    exchange: String,
    ledger: &'p Ledger,
    futures: FuturesUnordered<futures_util::future::BoxFuture<'p, Result<u64, anyhow::Error>>>,
}

impl<'p> Inflight<'p> {
    pub fn new(publisher: &'p Publisher, topology: &Topology, ledger: &'p Ledger) -> Self {
        Self { publisher, exchange: topology.pages_exchange(), ledger, futures: FuturesUnordered::new() }
    }

    pub async fn push(
        &mut self,
        message: PageMessage,
        orders: u64,
        metrics: &Metrics,
        account: &str,
    ) -> Result<(), PassError> {
        let (body, props, span, events) = message;
        let ledger = self.ledger;
        // On the wire now; only the confirm is awaited later.
        let confirm = self
            .publisher
            .send(&self.exchange, PAGE_ROUTING_KEY, &body, props)
            .await
            .map_err(|e| PassError::Broker(e.into()))?;
        self.futures.push(Box::pin(async move {
            // The page's span (when exporting) ends with its confirm.
            let confirmed = confirm.await;
            if let (Err(error), Some(span)) = (&confirmed, &span) {
                otel::fail(span, error.to_string());
            }
            confirmed?;
            drop(span);
            ledger.record_all(events);
            Ok(orders)
        }));
        while self.futures.len() >= PUBLISH_WINDOW {
            self.next(metrics, account).await?;
        }
        Ok(())
    }

    async fn next(&mut self, metrics: &Metrics, account: &str) -> Result<(), PassError> {
        if let Some(result) = self.futures.next().await {
            let orders = result.map_err(PassError::Broker)?;
            metrics.pages.with_label_values(&[account]).inc();
            metrics.orders.with_label_values(&[account]).inc_by(orders);
            metrics.last_publish.set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
        }
        Ok(())
    }

    /// Waits for every publish; any failure fails the pass (no checkpoint).
    pub async fn drain(&mut self, metrics: &Metrics, account: &str) -> Result<(), PassError> {
        while !self.futures.is_empty() {
            self.next(metrics, account).await?;
        }
        Ok(())
    }
}

pub fn row_ts(row: &Value) -> Option<i64> {
    row.get("ts").and_then(orderflow_shared::json::lenient_i64)
}

/// Where a start_ts pass should continue: the largest `ts` of the page, if it moved forward.
pub fn advance_start_ts(cursor: i64, rows: &[Value]) -> Result<Option<i64>, String> {
    if rows.is_empty() {
        return Ok(None);
    }
    let max = rows
        .iter()
        .map(row_ts)
        .collect::<Option<Vec<i64>>>()
        .ok_or("rows carry no ts: the start_ts cursor needs it; use a modified-window request config")?;
    Ok(max.into_iter().max().filter(|m| *m > cursor))
}

/// A start_ts pass from `start_ts`.
pub async fn start_ts_pass(ctx: &mut PassContext<'_>, start_ts: i64) -> Result<PassResult, PassError> {
    let started = Instant::now();
    let name = ctx.account.name.clone();
    let page_size = ctx.account.request.page_size;
    let mut inflight = Inflight::new(ctx.publisher, ctx.topology, ctx.ledger);
    let mut cursor = start_ts;
    let (mut pages, mut orders, mut caught_up, mut needs_refresh) = (0u32, 0u64, false, false);
    while pages < ctx.settings.max_pages && started.elapsed() < ctx.settings.max_time {
        let render = RenderContext { start_ts: Some(cursor), page_index: 1, page_size, ..RenderContext::default() };
        let page = match ctx.call(&render).await {
            Ok(page) => page,
            Err(CallFailure::Interrupted) => break,
            Err(CallFailure::NeedsRefresh) => {
                needs_refresh = true;
                break;
            }
            Err(CallFailure::Stop(error)) => {
                inflight.drain(ctx.metrics, &name).await?;
                return Err(error);
            }
        };
        let rows = page.datas;
        let count = rows.len();
        let next = advance_start_ts(cursor, &rows).map_err(PassError::Stopped)?;
        if let Some(seen) = ctx.seen {
            seen.record(rows.iter().filter_map(row_ts));
        }
        if count > 0 {
            let message =
                ctx.page_message(json!({"mode": "start_ts", "start_ts": cursor}), &format!("ts:{cursor}"), 1, rows)?;
            inflight.push(message, u64::try_from(count).unwrap_or(u64::MAX), ctx.metrics, &name).await?;
            pages += 1;
            orders += u64::try_from(count).unwrap_or(u64::MAX);
        }
        match next {
            Some(ts) if count >= usize::try_from(page_size).unwrap_or(usize::MAX) => cursor = ts,
            Some(ts) => {
                cursor = ts;
                caught_up = true;
                break;
            }
            None => {
                caught_up = true;
                break;
            }
        }
    }
    inflight.drain(ctx.metrics, &name).await?;
    if pages == 0 && !caught_up && !needs_refresh && ctx.shutdown.is_cancelled() {
        return Err(PassError::Interrupted);
    }
    let mut next = Cursor::start_ts(cursor);
    if caught_up {
        next.caught_up_at = Some(Timestamp::now().to_string());
    }
    Ok(PassResult { cursor: next, pages, orders, caught_up, needs_refresh })
}

/// One repair call: the orders `ctx.account`'s request names by id (see
/// `RequestConfig::for_ids`), published as one page under `key` (confirmed, recorded as fetched).
/// Returns the rows the source returned.
pub async fn fetch_by_ids(ctx: &mut PassContext<'_>, key: &str, cursor: Value) -> Result<Vec<Value>, PassError> {
    let page_size = ctx.account.request.page_size;
    let render = RenderContext { page_index: 1, page_size, ..RenderContext::default() };
    let rows = match ctx.call(&render).await {
        Ok(page) => page.datas,
        Err(CallFailure::Interrupted) => return Err(PassError::Interrupted),
        Err(CallFailure::NeedsRefresh) => {
            return Err(PassError::Credentials(
                "the access token expired; the account's passes refresh it: ask again in a minute".into(),
            ));
        }
        Err(CallFailure::Stop(error)) => return Err(error),
    };
    if !rows.is_empty() {
        let name = ctx.account.name.clone();
        let mut inflight = Inflight::new(ctx.publisher, ctx.topology, ctx.ledger);
        let message = ctx.page_message(cursor, key, 1, rows.clone())?;
        inflight.push(message, rows.len() as u64, ctx.metrics, &name).await?;
        inflight.drain(ctx.metrics, &name).await?;
    }
    Ok(rows)
}

/// The next modified window after `synced_until`: `[synced_until − overlap, min(+7 days, now − delay)]`.
/// `None` when the source is caught up (nothing closed yet beyond `synced_until`).
pub fn next_window(
    synced_until: Timestamp,
    now: Timestamp,
    delay: Duration,
    overlap: Duration,
) -> Option<(Timestamp, Timestamp)> {
    let delay = SignedDuration::try_from(delay).ok()?;
    let overlap = SignedDuration::try_from(overlap).ok()?;
    let closed = now.checked_sub(delay).ok()?;
    if closed <= synced_until {
        return None;
    }
    let begin = synced_until.checked_sub(overlap).ok()?;
    let latest = begin.checked_add(MAX_WINDOW).ok()?;
    Some((begin, truncate(closed.min(latest))))
}

fn truncate(ts: Timestamp) -> Timestamp {
    Timestamp::from_second(ts.as_second()).unwrap_or(ts)
}

/// How a modified-window walk reads and publishes: the cursor's own passes publish every row and
/// overlap their first window; a sweep publishes only the rows its filter keeps.
pub struct Walk<'f> {
    /// The first window starts this long before `from` (once per pass).
    pub overlap: Duration,
    /// The page cursor's `mode` and the message-id prefix: `modified` or `sweep`.
    pub mode: &'static str,
    /// Picks the rows to publish from a page read.
    pub filter: &'f mut (dyn FnMut(Vec<Value>) -> Vec<Value> + Send),
    pub max_pages: u32,
    pub max_time: Duration,
    /// Walk a window again when it gained rows while being walked (a row inserted before the
    /// page being read shifts one row onto a page already read). A sweep does not: the next
    /// sweep reads the window again anyway, and under steady late commits a re-walk never ends.
    pub rewalk_on_growth: bool,
    /// Read no further than this (the audit's window end); `None`: up to `now − delay`.
    pub until: Option<Timestamp>,
}

/// A modified-window pass from `synced_until`.
pub async fn modified_pass(ctx: &mut PassContext<'_>, synced_until: Timestamp) -> Result<PassResult, PassError> {
    let mut keep_all = |rows: Vec<Value>| rows;
    let walk = Walk {
        overlap: ctx.settings.window_overlap,
        mode: "modified",
        filter: &mut keep_all,
        max_pages: ctx.settings.max_pages,
        max_time: ctx.settings.max_time,
        rewalk_on_growth: true,
        until: None,
    };
    walk_windows(ctx, synced_until, walk).await
}

/// Walks closed modified windows from `from` up to `now − delay` (see the module's comment).
pub async fn walk_windows(
    ctx: &mut PassContext<'_>,
    from: Timestamp,
    mut walk: Walk<'_>,
) -> Result<PassResult, PassError> {
    let started = Instant::now();
    let name = ctx.account.name.clone();
    let mut published =
        Published { inflight: Inflight::new(ctx.publisher, ctx.topology, ctx.ledger), pages: 0, orders: 0 };
    let mut synced = from;
    let (mut caught_up, mut needs_refresh) = (false, false);
    let mut overlap = walk.overlap;
    while published.pages < walk.max_pages && started.elapsed() < walk.max_time {
        // A walk that must stop at `until` sees "now" no later than `until + delay`.
        let mut now = Timestamp::now();
        if let Some(until) = walk.until
            && let Ok(horizon) =
                until.checked_add(SignedDuration::try_from(ctx.settings.window_delay).unwrap_or_default())
        {
            now = now.min(horizon);
        }
        let Some((begin, closed)) = next_window(synced, now, ctx.settings.window_delay, overlap) else {
            caught_up = true;
            break;
        };
        let end = match read_window(ctx, &mut walk, &mut published, begin, closed).await? {
            Window::Read(end) => end,
            Window::Grew => continue,
            Window::Halted(CallFailure::Interrupted) => break,
            Window::Halted(CallFailure::NeedsRefresh) => {
                needs_refresh = true;
                break;
            }
            Window::Halted(CallFailure::Stop(error)) => {
                published.inflight.drain(ctx.metrics, &name).await?;
                return Err(error);
            }
        };
        synced = end;
        overlap = Duration::ZERO;
        if end == closed {
            // This window reached now − delay: the source is read up to what has closed. Wait for
            // the next pass rather than stepping on in slivers that re-read churn.
            caught_up = true;
            break;
        }
    }
    published.inflight.drain(ctx.metrics, &name).await?;
    if synced == from && !caught_up && !needs_refresh && ctx.shutdown.is_cancelled() {
        return Err(PassError::Interrupted);
    }
    let mut next = Cursor::modified(synced);
    if caught_up {
        next.caught_up_at = Some(Timestamp::now().to_string());
    }
    let Published { pages, orders, .. } = published;
    Ok(PassResult { cursor: next, pages, orders, caught_up, needs_refresh })
}

/// How reading one window ended.
enum Window {
    /// Read and published up to this end (the window's, or earlier when it was shrunk to fit).
    Read(Timestamp),
    /// The window gained rows while being walked: walk it again.
    Grew,
    /// A call failed; the walk stops.
    Halted(CallFailure),
}

/// A walk's page publishes: in flight, and counted.
struct Published<'p> {
    inflight: Inflight<'p>,
    pages: u32,
    orders: u64,
}

impl Published<'_> {
    /// Publishes `rows` as one page (nothing when there are none).
    async fn page(
        &mut self,
        ctx: &PassContext<'_>,
        cursor: Value,
        key: &str,
        page_index: u32,
        rows: Vec<Value>,
    ) -> Result<(), PassError> {
        if rows.is_empty() {
            return Ok(());
        }
        let n = u64::try_from(rows.len()).unwrap_or(u64::MAX);
        let message = ctx.page_message(cursor, key, page_index, rows)?;
        self.inflight.push(message, n, ctx.metrics, &ctx.account.name).await?;
        self.pages += 1;
        self.orders += n;
        Ok(())
    }
}

/// Reads the closed window from `begin` to `closed` (shrunk to fit what is left of the pass) and
/// publishes the rows the walk keeps: from the probe when one page holds it all, else walking
/// from the last page to the first. A row leaving the window mid-walk only shifts rows we
/// already have; a window that gained rows is planned and walked again.
async fn read_window(
    ctx: &mut PassContext<'_>,
    walk: &mut Walk<'_>,
    published: &mut Published<'_>,
    begin: Timestamp,
    closed: Timestamp,
) -> Result<Window, PassError> {
    let budget_pages = walk.max_pages.saturating_sub(published.pages).max(2);
    let (probe, count, end) = match probe_window(ctx, begin, closed, budget_pages).await {
        Ok(probed) => probed,
        Err(failure) => return Ok(Window::Halted(failure)),
    };
    let page_size = ctx.account.request.page_size;
    let page_count =
        u32::try_from(probe.page_count.max(count.div_ceil(u64::from(page_size))).max(1)).unwrap_or(u32::MAX);
    let mode = walk.mode;
    let window_json = |page_index: u32| json!({"mode": mode, "begin": rfc3339_china(begin), "end": rfc3339_china(end), "page_index": page_index});
    let key = format!("{}:{}:{}", mode, begin.as_second(), end.as_second());
    if page_count <= 1 || u64::try_from(probe.datas.len()).unwrap_or(u64::MAX) >= count {
        // One page holds the whole closed window: the probe is complete.
        let rows = (walk.filter)(probe.datas);
        published.page(ctx, window_json(1), &key, 1, rows).await?;
        return Ok(Window::Read(end));
    }
    for page_index in (1..=page_count).rev() {
        let render =
            RenderContext { last_sync: Some(begin), current: Some(end), page_index, page_size, start_ts: None };
        let page = match ctx.call(&render).await {
            Ok(p) => p,
            Err(failure) => return Ok(Window::Halted(failure)),
        };
        let grew = probe_count(&page) > count;
        let rows = (walk.filter)(page.datas);
        published.page(ctx, window_json(page_index), &key, page_index, rows).await?;
        if grew && walk.rewalk_on_growth {
            tracing::warn!(message = "A closed window gained rows while walking it; walking it again.", account = %ctx.account.name);
            return Ok(Window::Grew);
        }
    }
    Ok(Window::Read(end))
}

/// Probes page 1 of the window for its row count, shrinking the window's end until it fits in
/// `budget_pages`: the probe, the count, and the end.
async fn probe_window(
    ctx: &mut PassContext<'_>,
    begin: Timestamp,
    mut end: Timestamp,
    budget_pages: u32,
) -> Result<(ApiPage, u64, Timestamp), CallFailure> {
    let page_size = ctx.account.request.page_size;
    loop {
        let render =
            RenderContext { last_sync: Some(begin), current: Some(end), page_index: 1, page_size, start_ts: None };
        let probe = ctx.call(&render).await?;
        let page_count = probe.page_count.max(probe.data_count.div_ceil(u64::from(page_size)));
        let span = end.as_second() - begin.as_second();
        if page_count > u64::from(budget_pages) && span > 1 {
            let keep = u64::try_from(span).unwrap_or(1).saturating_mul(u64::from(budget_pages)) / page_count;
            end = Timestamp::from_second(begin.as_second() + i64::try_from(keep.max(1)).unwrap_or(1)).unwrap_or(end);
            continue;
        }
        let count = probe_count(&probe);
        return Ok((probe, count, end));
    }
}

/// The window's row count as a call reported it (`data_count`, or the rows when totals are off).
fn probe_count(page: &ApiPage) -> u64 {
    page.data_count.max(u64::try_from(page.datas.len()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        orderflow_shared::time::parse_china(s).expect("valid")
    }

    #[test]
    fn start_ts_moves_to_the_largest_ts_seen() {
        let rows = vec![json!({"ts": 5}), json!({"ts": "9"}), json!({"ts": 7})];
        assert_eq!(advance_start_ts(3, &rows), Ok(Some(9)));
        assert_eq!(advance_start_ts(9, &rows), Ok(None), "no progress means caught up");
        assert_eq!(advance_start_ts(3, &[]), Ok(None));
        assert!(advance_start_ts(3, &[json!({"o_id": 1})]).is_err());
    }

    #[test]
    fn windows_close_before_now_overlap_and_span_at_most_seven_days() {
        let now = ts("2024-03-10 12:00:00");
        let delay = Duration::from_secs(30);
        let overlap = Duration::from_secs(60);
        let (b, e) = next_window(ts("2024-03-10 11:00:00"), now, delay, overlap).expect("window");
        assert_eq!(b, ts("2024-03-10 10:59:00"));
        assert_eq!(e, ts("2024-03-10 11:59:30"));
        let (b, e) = next_window(ts("2024-01-01 00:00:00"), now, delay, overlap).expect("window");
        assert_eq!(e.as_second() - b.as_second(), 7 * 86_400);
        assert!(next_window(ts("2024-03-10 11:59:45"), now, delay, overlap).is_none(), "nothing closed yet");
    }
}
