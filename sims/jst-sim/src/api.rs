//! The API endpoints: new open platform (form-encoded, `biz` JSON, md5 sign, `data` envelope),
//! legacy partner API (sign in the query, JSON body, top-level envelope with `issuccess`), and
//! token refresh. Validation returns the documented codes with a readable `msg`.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query as UrlQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use jiff::Timestamp;
use orderflow_shared::{
    json::{lenient_bool, lenient_i64},
    jst::{MAX_PAGE_SIZE, code, sign_legacy, sign_open, signatures_match},
};
use serde_json::{Value, json};

use crate::{
    Sim, expiry,
    faults::FaultAction,
    inflight::{InFlightGuard, caller},
    model::Status,
    store::{PageResult, Query},
};

const MAX_IDS: usize = 50;
const MAX_L_IDS: usize = 20;
const MAX_WINDOW_MS: i64 = 7 * 86_400_000;
const MAX_WINDOW_DRP_MS: i64 = 86_400_000;

/// Parses and validates the business parameters. `Err` is the code-140 message.
pub fn parse_query(biz: &Value) -> Result<Query, String> {
    let obj = biz.as_object().ok_or("biz must be a JSON object")?;
    let int = |key: &str| -> Result<Option<i64>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(v) => lenient_i64(v).map(Some).ok_or_else(|| format!("{key} must be an integer, got {v}")),
        }
    };
    let page_index = int("page_index")?.unwrap_or(1);
    if page_index < 1 {
        return Err(format!("page_index must be >= 1, got {page_index}"));
    }
    let page_size = int("page_size")?.unwrap_or(30);
    if !(1..=i64::from(MAX_PAGE_SIZE)).contains(&page_size) {
        return Err(format!("page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size}"));
    }
    let text = |key: &str| obj.get(key).and_then(Value::as_str).filter(|s| !s.is_empty());
    let begin = text("modified_begin");
    let end = text("modified_end");
    let window = match (begin, end) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err("modified_begin and modified_end must be given together".into());
        }
        (Some(b), Some(e)) => {
            let b_ms = parse_request_datetime("modified_begin", b)?;
            let e_ms = parse_request_datetime("modified_end", e)?;
            if e_ms < b_ms {
                return Err(format!("modified_end {e} is before modified_begin {b}"));
            }
            let drp = int("drp_co_id")?.is_some();
            let max = if drp { MAX_WINDOW_DRP_MS } else { MAX_WINDOW_MS };
            if e_ms - b_ms > max {
                let days = if drp { "1 day (with drp_co_id)" } else { "7 days" };
                return Err(format!("the modified window {b} .. {e} is longer than {days}"));
            }
            Some((b_ms, e_ms))
        }
    };
    let status = match text("status") {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| format!("unknown status {s:?}"))?),
    };
    let string_list = |key: &str, max: usize| -> Result<Option<Vec<String>>, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => {
                if items.len() > max {
                    return Err(format!("{key} has {} ids; at most {max} are allowed", items.len()));
                }
                let ids = items
                    .iter()
                    .map(|v| {
                        orderflow_shared::json::scalar_text(v)
                            .ok_or_else(|| format!("{key} must hold strings or numbers"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((!ids.is_empty()).then_some(ids))
            }
            Some(other) => Err(format!("{key} must be an array, got {other}")),
        }
    };
    let so_ids = string_list("so_ids", MAX_IDS)?;
    let int_list = |key: &str, max: usize| -> Result<Option<Vec<i64>>, String> {
        string_list(key, max)?
            .map(|ids| {
                ids.iter()
                    .map(|s| s.trim().parse::<i64>().map_err(|_| format!("{key}: {s:?} is not a number")))
                    .collect()
            })
            .transpose()
    };
    let o_ids = int_list("o_ids", MAX_IDS)?;
    let io_ids = int_list("io_ids", MAX_IDS)?;
    let l_ids = string_list("l_ids", MAX_L_IDS)?;
    let wave_ids = int_list("wave_ids", MAX_IDS)?;
    let start_ts = int("start_ts")?;
    let date_type = int("date_type")?.unwrap_or(0);
    if date_type != 0 && date_type != 2 {
        return Err(format!("date_type must be 0 (modified) or 2 (io_date), got {date_type}"));
    }
    let has_selector = window.is_some()
        || start_ts.is_some()
        || so_ids.is_some()
        || o_ids.is_some()
        || io_ids.is_some()
        || l_ids.is_some()
        || wave_ids.is_some();
    if !has_selector {
        return Err("a selector is required: modified_begin + modified_end, start_ts, or an id list".into());
    }
    let bool_field = |key: &str, default: bool| -> Result<bool, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::String(s)) if s.is_empty() => Ok(default),
            Some(v) => lenient_bool(v).ok_or_else(|| format!("{key} must be true or false, got {v}")),
        }
    };
    Ok(Query {
        status,
        shop_id: int("shop_id")?,
        is_offline_shop: bool_field("is_offline_shop", false)?,
        so_ids,
        o_ids,
        io_ids,
        date_type,
        window,
        start_ts,
        page_index: page_index.min(i64::from(u32::MAX)) as u32,
        page_size: page_size as u32,
        get_total: bool_field("is_get_total", true)?,
    })
}

/// `yyyy-MM-dd HH:mm:ss` China time → unix milliseconds; anything else is a 140.
fn parse_request_datetime(field: &str, text: &str) -> Result<i64, String> {
    let shape_ok = text.len() == 19 && text.as_bytes()[10] == b' ';
    let parsed = shape_ok.then(|| orderflow_shared::time::parse_china(text).ok()).flatten();
    parsed.map(|ts| ts.as_millisecond()).ok_or_else(|| format!("{field} must be yyyy-MM-dd HH:mm:ss, got {text:?}"))
}

/// Outcome of the shared part of a call (auth, limits, faults, the query itself).
enum Outcome {
    Page { query: Query, page: PageResult },
    Code { code: i64, msg: String },
}

struct CallPlan {
    delay: Duration,
    action: FaultAction,
    outcome: Outcome,
}

/// Authentication already done by the caller; this applies limits, faults and the query.
fn serve_call(
    sim: &Sim,
    index: usize,
    biz: Result<Value, String>,
    authenticate: impl FnOnce(&crate::store::Credentials, Timestamp) -> Result<(), (i64, String)>,
) -> CallPlan {
    let now = Timestamp::now();
    let mut guard = sim.lock(index);
    let state = &mut *guard;
    state.stats.calls += 1;
    let (delay, action) = state.faults.decide(&mut state.rng);
    let outcome = (|| {
        authenticate(&state.merchant.creds, now).map_err(|(code, msg)| Outcome::Code { code, msg })?;
        state.limiter.admit(tokio::time::Instant::now()).map_err(|code| Outcome::Code {
            code,
            msg: if code == code::TOO_MANY_CONCURRENT {
                "too many calls per second".into()
            } else {
                "too many calls per minute".into()
            },
        })?;
        if action == FaultAction::Code150 {
            return Err(Outcome::Code { code: code::INTERNAL, msg: "internal error (injected)".into() });
        }
        let biz = biz.map_err(|msg| Outcome::Code { code: code::BAD_PARAMS, msg })?;
        let query = parse_query(&biz).map_err(|msg| Outcome::Code { code: code::BAD_PARAMS, msg })?;
        let page = state.merchant.query(&query);
        Ok(Outcome::Page { query, page })
    })()
    .unwrap_or_else(|outcome| outcome);
    match (&outcome, action) {
        (_, FaultAction::Http5xx(_)) => state.stats.http_5xx += 1,
        (_, FaultAction::Reset) => state.stats.resets += 1,
        (Outcome::Code { code, .. }, _) => state.stats.reject(*code),
        (Outcome::Page { page, query }, _) => {
            state.stats.ok += 1;
            state.stats.rows_served += page.rows.len() as u64;
            *state.stats.calls_by_selector.entry(selector(query).to_string()).or_default() += 1;
            state.merchant.note_served(page.max_ts);
        }
    }
    CallPlan { delay, action, outcome }
}

/// Which kind of query a call was.
fn selector(query: &Query) -> &'static str {
    if query.start_ts.is_some() {
        "start_ts"
    } else if query.o_ids.is_some() || query.so_ids.is_some() || query.io_ids.is_some() {
        "ids"
    } else if query.window.is_some() {
        "modified"
    } else {
        "other"
    }
}

async fn respond(plan: CallPlan, render: impl FnOnce(Outcome) -> String) -> Response {
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    match plan.action {
        FaultAction::Http5xx(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, "upstream error (injected)").into_response()
        }
        FaultAction::Reset => reset_response(),
        _ => json_response(render(plan.outcome)),
    }
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json; charset=utf-8")], body).into_response()
}

/// A response whose body fails after a few bytes: the client sees the connection cut.
fn reset_response() -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"{\"code\":0,\"data\":{\"datas\":[")),
        Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset (injected)")),
    ];
    let body = Body::from_stream(futures_util::stream::iter(chunks));
    ([(header::CONTENT_TYPE, "application/json; charset=utf-8")], body).into_response()
}

fn page_fields(query: &Query, page: &PageResult, out: &mut String) {
    use std::fmt::Write;
    let _ = write!(
        out,
        "\"page_size\":{},\"page_index\":{},\"data_count\":{},\"page_count\":{},\"has_next\":{},\"datas\":[",
        query.page_size, query.page_index, page.data_count, page.page_count, page.has_next
    );
    for (i, row) in page.rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(row);
    }
    out.push(']');
}

fn code_body(code: i64, msg: &str, legacy: bool) -> String {
    if legacy {
        json!({ "code": code, "issuccess": false, "msg": msg }).to_string()
    } else {
        json!({ "code": code, "msg": msg, "data": null }).to_string()
    }
}

fn skew_ok(sim: &Sim, timestamp: &str, now: Timestamp) -> Result<(), (i64, String)> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| (code::BAD_PARAMS, format!("timestamp must be unix seconds, got {timestamp:?}")))?;
    if (now.as_second() - ts).unsigned_abs() > sim.clock_skew.as_secs() {
        return Err((
            code::TIMESTAMP_SKEW,
            format!("timestamp {ts} is more than {}s from server time", sim.clock_skew.as_secs()),
        ));
    }
    Ok(())
}

/// `POST /open/orders/out/simple/query` (new open platform).
pub async fn open_query(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let params: Vec<(String, String)> = match serde_urlencoded::from_bytes(&body) {
        Ok(p) => p,
        Err(e) => return json_response(code_body(code::BAD_PARAMS, &format!("body must be form-encoded: {e}"), false)),
    };
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str()).unwrap_or("");
    let Some(index) = sim.by_app_key(get("app_key")) else {
        return json_response(code_body(code::BAD_SIGN, &format!("unknown app_key {:?}", get("app_key")), false));
    };
    // In flight until this handler returns its answer (after the simulated latency).
    let _in_flight = sim.enter(index, caller(&headers));
    let biz = serde_json::from_str::<Value>(if get("biz").is_empty() { "{}" } else { get("biz") })
        .map_err(|e| format!("biz is not valid JSON: {e}"));
    let plan = serve_call(&sim, index, biz, |creds, now| {
        let expected = sign_open(&creds.app_secret, params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if !signatures_match(&expected, get("sign")) {
            return Err((code::BAD_SIGN, "invalid signature".into()));
        }
        skew_ok(&sim, get("timestamp"), now)?;
        if get("access_token") != creds.access_token {
            return Err((code::TOKEN_INVALID, "access_token is invalid".into()));
        }
        if creds.token_expires_at.is_some_and(|at| now >= at) {
            return Err((code::TOKEN_INVALID, "access_token has expired".into()));
        }
        Ok(())
    });
    respond(plan, |outcome| match outcome {
        Outcome::Code { code, msg } => code_body(code, &msg, false),
        Outcome::Page { query, page } => {
            let mut out = String::with_capacity(64 + page.rows.iter().map(|r| r.len() + 1).sum::<usize>());
            out.push_str("{\"code\":0,\"msg\":\"执行成功\",\"data\":{");
            page_fields(&query, &page, &mut out);
            out.push_str("}}");
            out
        }
    })
    .await
}

/// `POST /api/open/query.aspx?method=orders.out.simple.query&partnerid=&token=&ts=&sign=` (legacy).
pub async fn legacy_query(
    State(sim): State<Arc<Sim>>,
    UrlQuery(params): UrlQuery<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let method = get("method");
    if method != "orders.out.simple.query" {
        return json_response(code_body(
            code::NO_PERMISSION,
            &format!("method {method:?} is not served by this simulator"),
            true,
        ));
    }
    let Some(index) = sim.by_partner(get("partnerid")) else {
        return json_response(code_body(
            code::BAD_SIGN_LEGACY,
            &format!("unknown partnerid {:?}", get("partnerid")),
            true,
        ));
    };
    let _in_flight = sim.enter(index, caller(&headers));
    let biz = serde_json::from_slice::<Value>(if body.is_empty() { b"{}" } else { &body })
        .map_err(|e| format!("body is not valid JSON: {e}"));
    let plan = serve_call(&sim, index, biz, |creds, now| {
        let ts: i64 = get("ts")
            .parse()
            .map_err(|_| (code::BAD_PARAMS, format!("ts must be unix seconds, got {:?}", get("ts"))))?;
        let expected = sign_legacy(method, &creds.partner_id, get("token"), ts, &creds.partner_key);
        if !signatures_match(&expected, get("sign")) {
            return Err((code::BAD_SIGN_LEGACY, "invalid signature".into()));
        }
        skew_ok(&sim, get("ts"), now)?;
        if get("token") != creds.legacy_token {
            return Err((code::TOKEN_INVALID, "token is invalid".into()));
        }
        Ok(())
    });
    respond(plan, |outcome| match outcome {
        Outcome::Code { code, msg } => code_body(code, &msg, true),
        Outcome::Page { query, page } => {
            let mut out = String::with_capacity(64 + page.rows.iter().map(|r| r.len() + 1).sum::<usize>());
            out.push_str("{\"code\":0,\"issuccess\":true,\"msg\":\"\",");
            page_fields(&query, &page, &mut out);
            out.push('}');
            out
        }
    })
    .await
}

/// `POST /openWeb/auth/refreshToken`: a signed refresh returns a new token pair; the used
/// refresh token stops working.
pub async fn refresh_token(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let (answer, delay, _in_flight) = refresh_answer(&sim, &body, caller(&headers));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    answer
}

/// The refresh's answer, how long to hold it back, and the call in flight (a known merchant's)
/// until then.
fn refresh_answer<'s>(sim: &'s Sim, body: &Bytes, caller: String) -> (Response, Duration, Option<InFlightGuard<'s>>) {
    let params: Vec<(String, String)> = match serde_urlencoded::from_bytes(body) {
        Ok(p) => p,
        Err(e) => {
            return (
                json_response(code_body(code::BAD_PARAMS, &format!("body must be form-encoded: {e}"), false)),
                Duration::ZERO,
                None,
            );
        }
    };
    let get = |k: &str| params.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str()).unwrap_or("");
    let Some(index) = sim.by_app_key(get("app_key")) else {
        return (
            json_response(code_body(code::BAD_SIGN, &format!("unknown app_key {:?}", get("app_key")), false)),
            Duration::ZERO,
            None,
        );
    };
    let in_flight = sim.enter(index, caller);
    let now = Timestamp::now();
    let mut state = sim.lock(index);
    state.stats.refresh_requests += 1;
    let creds = &state.merchant.creds;
    let expected = sign_open(&creds.app_secret, params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let result = if !signatures_match(&expected, get("sign")) {
        Err((code::BAD_SIGN, "invalid signature".to_string()))
    } else if let Err(e) = skew_ok(sim, get("timestamp"), now) {
        Err(e)
    } else if get("grant_type") != "refresh_token" {
        Err((code::BAD_PARAMS, "grant_type must be refresh_token".to_string()))
    } else if get("refresh_token") != creds.refresh_token {
        Err((code::TOKEN_INVALID, "refresh_token is invalid or already used".to_string()))
    } else {
        Ok(())
    };
    if let Err((code, msg)) = result {
        state.stats.reject(code);
        return (json_response(code_body(code, &msg, false)), Duration::ZERO, Some(in_flight));
    }
    state.token_generation += 1;
    let generation = state.token_generation;
    let app_key = state.merchant.creds.app_key.clone();
    let creds = &mut state.merchant.creds;
    creds.access_token = format!("{app_key}-at-{generation}");
    creds.refresh_token = format!("{app_key}-rt-{generation}");
    creds.token_expires_at = expiry(now, sim.token_lifetime);
    let expires_in = sim.token_lifetime.map(|d| d.as_secs()).unwrap_or(365 * 86_400);
    let body = json!({
        "code": 0,
        "msg": "执行成功",
        "data": { "access_token": creds.access_token, "expires_in": expires_in, "refresh_token": creds.refresh_token, "scope": "all" }
    });
    state.stats.token_refreshes += 1;
    (json_response(body.to_string()), Duration::from_millis(state.faults.refresh_latency_ms), Some(in_flight))
}

/// Issues a new token pair for a merchant (as when the merchant authorizes the app again): the
/// old pair stops working at once. Returns the new pair.
pub fn reauthorize(state: &mut crate::MerchantState, lifetime: Option<Duration>) -> (String, String) {
    state.token_generation += 1;
    let generation = state.token_generation;
    let creds = &mut state.merchant.creds;
    creds.access_token = format!("{}-reauth-at-{generation}", creds.app_key);
    creds.refresh_token = format!("{}-reauth-rt-{generation}", creds.app_key);
    creds.token_expires_at = crate::expiry(Timestamp::now(), lifetime);
    (creds.access_token.clone(), creds.refresh_token.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(biz: Value) -> String {
        parse_query(&biz).expect_err("invalid")
    }

    #[test]
    fn a_selector_is_required() {
        assert!(err(json!({"page_size": 10})).contains("selector"));
        assert!(parse_query(&json!({"start_ts": 0})).is_ok());
        assert!(parse_query(&json!({"o_ids": ["1"]})).is_ok());
    }

    #[test]
    fn the_modified_pair_goes_together_and_spans_at_most_seven_days() {
        assert!(err(json!({"modified_begin": "2024-01-01 00:00:00"})).contains("together"));
        assert!(
            err(json!({"modified_begin": "2024-01-01 00:00:00", "modified_end": "2024-01-08 00:00:01"}))
                .contains("7 days")
        );
        assert!(
            parse_query(&json!({"modified_begin": "2024-01-01 00:00:00", "modified_end": "2024-01-08 00:00:00"}))
                .is_ok()
        );
        let drp =
            json!({"modified_begin": "2024-01-01 00:00:00", "modified_end": "2024-01-02 00:00:01", "drp_co_id": 5});
        assert!(err(drp).contains("1 day"));
    }

    #[test]
    fn datetimes_must_have_the_documented_format() {
        assert!(
            err(json!({"modified_begin": "2023-10-01T00:00:00Z", "modified_end": "2023-10-02 00:00:00"}))
                .contains("modified_begin")
        );
    }

    #[test]
    fn page_size_is_at_most_fifty() {
        assert!(err(json!({"start_ts": 0, "page_size": 51})).contains("page_size"));
        assert!(err(json!({"start_ts": 0, "page_size": "100"})).contains("page_size"));
        assert_eq!(parse_query(&json!({"start_ts": 0, "page_size": "50"})).expect("ok").page_size, 50);
    }

    #[test]
    fn id_lists_have_limits() {
        let ids: Vec<String> = (0..51).map(|i| i.to_string()).collect();
        assert!(err(json!({"o_ids": ids})).contains("at most 50"));
        let l_ids: Vec<String> = (0..21).map(|i| i.to_string()).collect();
        assert!(err(json!({"l_ids": l_ids})).contains("at most 20"));
    }

    #[test]
    fn numbers_may_come_as_strings() {
        let q = parse_query(&json!({"start_ts": "17", "page_index": "2", "is_get_total": "false"})).expect("ok");
        assert_eq!((q.start_ts, q.page_index, q.get_total), (Some(17), 2, false));
    }

    #[test]
    fn unknown_status_and_date_type_are_rejected() {
        assert!(err(json!({"start_ts": 0, "status": "Shipped"})).contains("status"));
        assert!(err(json!({"start_ts": 0, "date_type": 1})).contains("date_type"));
    }
}
