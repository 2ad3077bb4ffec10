//! The simulator catches the missed-order bug: under churn, a naive client that pages a modified
//! window by page_index misses orders that never changed (rows shift under it), counted against
//! `/admin/truth`; a `start_ts` client misses none.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Client, code, start};
use serde_json::{Value, json};

async fn set_churn(url: &str, churn: Value) {
    reqwest::Client::new()
        .post(format!("{url}/admin/churn"))
        .json(&churn)
        .send()
        .await
        .expect("churn")
        .error_for_status()
        .expect("accepted");
}

async fn truth(url: &str) -> Vec<Value> {
    let t: Value =
        reqwest::get(format!("{url}/admin/truth?account=m1")).await.expect("truth").json().await.expect("json");
    t["confirmed"].as_array().cloned().unwrap_or_default()
}

fn o_ids(rows: &[Value]) -> impl Iterator<Item = i64> + '_ {
    rows.iter().filter_map(|r| r["o_id"].as_i64())
}

const CHURN: &str = r#"{"modify_per_sec": 150, "confirm_per_sec": 20, "cancel_per_sec": 5, "new_per_sec": 20, "late_per_sec": 10, "late_max_secs": 5}"#;

#[tokio::test]
async fn a_naive_page_index_walk_misses_orders_under_churn() {
    let sim = start(&["--orders", "3000", "--rate-per-sec", "0", "--rate-per-min", "0", "--history", "2d"]).await;
    let c = Client::demo(&sim.url);
    let now = jiff::Timestamp::now();
    let begin =
        orderflow_shared::time::format_china(now.checked_sub(jiff::SignedDuration::from_hours(72)).expect("time"));
    let end = orderflow_shared::time::format_china(now);
    let end_ms = orderflow_shared::time::parse_china(&end).expect("end").as_millisecond();
    set_churn(&sim.url, serde_json::from_str(CHURN).expect("churn")).await;
    let mut seen = HashSet::new();
    let mut page_index = 1;
    loop {
        let a = c.query(json!({"status": "Confirmed", "modified_begin": begin, "modified_end": end, "page_index": page_index, "page_size": 50})).await;
        assert_eq!(code(&a), 0, "{a}");
        let rows = a["data"]["datas"].as_array().cloned().unwrap_or_default();
        seen.extend(o_ids(&rows));
        if a["data"]["has_next"] != true {
            break;
        }
        page_index += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    set_churn(&sim.url, json!({})).await;
    // Orders Confirmed now whose modified time is still inside the walked window never changed
    // during the walk: a correct client has every one of them.
    let should_have: Vec<i64> = truth(&sim.url)
        .await
        .into_iter()
        .filter(|r| {
            orderflow_shared::time::parse_china(r["modified"].as_str().unwrap_or(""))
                .is_ok_and(|m| m.as_millisecond() <= end_ms)
        })
        .filter_map(|r| r["o_id"].as_i64())
        .collect();
    let missed = should_have.iter().filter(|id| !seen.contains(id)).count();
    assert!(
        missed > 0,
        "the naive walk should miss unchanged orders under churn; it saw {} of {}",
        seen.len(),
        should_have.len()
    );
    eprintln!("naive page_index walk: missed {missed} of {} unchanged Confirmed orders", should_have.len());
}

#[tokio::test]
async fn a_start_ts_client_misses_nothing_under_the_same_churn() {
    let sim = start(&["--orders", "3000", "--rate-per-sec", "0", "--rate-per-min", "0", "--history", "2d"]).await;
    let c = Client::demo(&sim.url);
    set_churn(&sim.url, serde_json::from_str(CHURN).expect("churn")).await;
    let mut seen = HashSet::new();
    let mut cursor = 0i64;
    let mut calls = 0;
    let walk = |cursor: i64| {
        let c = c.clone();
        async move {
            c.query(json!({"status": "Confirmed", "start_ts": cursor, "is_get_total": false, "page_index": 1, "page_size": 50})).await
        }
    };
    // Page through while churn runs (about as long as the naive walk takes), then once more after it stops.
    for phase in 0..2 {
        loop {
            let a = walk(cursor).await;
            assert_eq!(code(&a), 0, "{a}");
            calls += 1;
            let rows = a["data"]["datas"].as_array().cloned().unwrap_or_default();
            seen.extend(o_ids(&rows));
            let max = rows.iter().filter_map(|r| r["ts"].as_i64()).max();
            match max {
                Some(m) if m > cursor => cursor = m,
                _ => break,
            }
            if rows.len() < 50 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        if phase == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            set_churn(&sim.url, json!({})).await;
        }
    }
    let confirmed: Vec<i64> = truth(&sim.url).await.iter().filter_map(|r| r["o_id"].as_i64()).collect();
    let missed: Vec<&i64> = confirmed.iter().filter(|id| !seen.contains(id)).collect();
    assert!(
        missed.is_empty(),
        "start_ts missed {} of {} Confirmed orders: {:?}",
        missed.len(),
        confirmed.len(),
        &missed[..missed.len().min(10)]
    );
    assert!(calls > 40, "the walk ran under churn ({calls} calls)");
}
