//! Admin endpoints: the truth oracle, stats, the accounts list, and runtime switches for churn,
//! faults and limits (per merchant with `?account=`, else for all).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Sim, Stats, churn::Churn, faults::Faults, inflight::Concurrency, limits::Limits};

#[derive(Debug, Deserialize)]
pub struct AccountParam {
    pub account: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TruthParams {
    pub account: Option<String>,
    /// Only the ids of the orders now Confirmed (`confirmed_ids`), for cheap polling.
    #[serde(default)]
    pub ids_only: bool,
}

fn targets(sim: &Sim, account: &Option<String>) -> Result<Vec<usize>, Response> {
    match account {
        None => Ok((0..sim.merchants.len()).collect()),
        Some(name) => sim
            .find(name)
            .map(|i| vec![i])
            .ok_or_else(|| (StatusCode::NOT_FOUND, format!("no merchant named {name:?}")).into_response()),
    }
}

fn truth_of(sim: &Sim, index: usize, ids_only: bool) -> Value {
    let state = sim.lock(index);
    let confirmed = state.merchant.truth();
    if ids_only {
        let ids: Vec<i64> = confirmed.iter().map(|r| r.o_id).collect();
        return json!({ "account": state.merchant.name, "confirmed_count": ids.len(), "confirmed_ids": ids, "max_ts": state.merchant.max_ts() });
    }
    json!({
        "account": state.merchant.name,
        "app_key": state.merchant.creds.app_key,
        "confirmed_count": confirmed.len(),
        "confirmed": confirmed,
        "ever_confirmed": state.merchant.ever_confirmed(),
        "max_ts": state.merchant.max_ts(),
    })
}

/// `GET /admin/truth?account=[&ids_only=true]`: every order now Confirmed (o_id, io_id, modified,
/// ts) and the ids of every order ever Confirmed.
pub async fn truth(State(sim): State<Arc<Sim>>, Query(p): Query<TruthParams>) -> Response {
    match &p.account {
        Some(_) => match targets(&sim, &p.account) {
            Ok(ix) => Json(truth_of(&sim, ix[0], p.ids_only)).into_response(),
            Err(r) => r,
        },
        None => {
            let accounts: Vec<Value> = (0..sim.merchants.len()).map(|i| truth_of(&sim, i, p.ids_only)).collect();
            Json(json!({ "accounts": accounts })).into_response()
        }
    }
}

/// A merchant's `stats` object: its counters and its concurrency, side by side.
#[derive(serde::Serialize)]
struct StatsView<'a> {
    #[serde(flatten)]
    stats: &'a Stats,
    #[serde(flatten)]
    concurrency: Concurrency,
}

/// `GET /admin/stats`: calls and rejections by merchant and code, calls in flight at once (and
/// from how many callers), churn done, current settings; `max_concurrent_callers` over all.
pub async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    let mut accounts = serde_json::Map::new();
    let mut max_concurrent_callers = 0;
    for index in 0..sim.merchants.len() {
        let state = sim.lock(index);
        let concurrency = sim.in_flight[index].snapshot();
        max_concurrent_callers = max_concurrent_callers.max(concurrency.max_concurrent_callers);
        accounts.insert(
            state.merchant.name.clone(),
            json!({
                "stats": StatsView { stats: &state.stats, concurrency },
                "churn_done": state.churn_counts,
                "orders": state.merchant.len(),
                "limits": state.limiter.limits,
                "churn": state.churn,
                "faults": state.faults,
            }),
        );
    }
    Json(json!({ "accounts": accounts, "max_concurrent_callers": max_concurrent_callers })).into_response()
}

/// `GET /admin/accounts`: every merchant's credentials (simulator demo credentials only).
pub async fn accounts(State(sim): State<Arc<Sim>>) -> Response {
    let list: Vec<Value> = (0..sim.merchants.len())
        .map(|index| {
            let state = sim.lock(index);
            let c = &state.merchant.creds;
            json!({
                "account": state.merchant.name,
                "app_key": c.app_key, "app_secret": c.app_secret,
                "access_token": c.access_token, "refresh_token": c.refresh_token,
                "partner_id": c.partner_id, "partner_key": c.partner_key, "token": c.legacy_token,
                "shops": state.merchant.shops.iter().map(|s| json!({"shop_id": s.id, "shop_name": s.name})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "accounts": list })).into_response()
}

fn apply<T: Clone>(
    sim: &Sim,
    account: &Option<String>,
    value: T,
    set: impl Fn(&mut crate::MerchantState, T),
) -> Response {
    match targets(sim, account) {
        Ok(indexes) => {
            for i in &indexes {
                set(&mut sim.lock(*i), value.clone());
            }
            Json(json!({ "applied_to": indexes.len() })).into_response()
        }
        Err(r) => r,
    }
}

/// `POST /admin/reauthorize?account=m1`: the merchant authorizes the app again; the old token
/// pair stops working and the new one is returned (`access_token`, `refresh_token`).
pub async fn reauthorize(State(sim): State<Arc<Sim>>, Query(p): Query<AccountParam>) -> Response {
    let indexes = match targets(&sim, &p.account) {
        Ok(ix) if ix.len() == 1 => ix,
        Ok(_) => return (StatusCode::BAD_REQUEST, "name one account: ?account=m1").into_response(),
        Err(r) => return r,
    };
    let (access_token, refresh_token) = crate::api::reauthorize(&mut sim.lock(indexes[0]), sim.token_lifetime);
    Json(json!({ "access_token": access_token, "refresh_token": refresh_token })).into_response()
}

/// `POST /admin/churn?account=` with a [`Churn`] body.
pub async fn set_churn(
    State(sim): State<Arc<Sim>>,
    Query(p): Query<AccountParam>,
    Json(churn): Json<Churn>,
) -> Response {
    if let Err(e) = churn.validate() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    apply(&sim, &p.account, churn, |s, c| s.churn = c)
}

/// `POST /admin/faults?account=` with a [`Faults`] body.
pub async fn set_faults(
    State(sim): State<Arc<Sim>>,
    Query(p): Query<AccountParam>,
    Json(faults): Json<Faults>,
) -> Response {
    if let Err(e) = faults.validate() {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    apply(&sim, &p.account, faults, |s, f| s.faults = f)
}

/// `POST /admin/limits?account=` with `{"per_sec","per_min"}` (0 = unlimited).
pub async fn set_limits(
    State(sim): State<Arc<Sim>>,
    Query(p): Query<AccountParam>,
    Json(limits): Json<Limits>,
) -> Response {
    apply(&sim, &p.account, limits, |s, l| s.limiter = crate::limits::Limiter::new(l))
}
