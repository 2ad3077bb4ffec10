//! `GET /admin/stats` tells how many callers (by `User-Agent`) had a call in flight for one
//! merchant at the same moment: two fetcher replicas working one account at once show as 2.

mod common;

use common::{Client, code, start};
use serde_json::{Value, json};

fn client_as(base: &str, user_agent: Option<&str>) -> Client {
    let mut client = Client::demo(base);
    let mut http = reqwest::Client::builder();
    if let Some(user_agent) = user_agent {
        http = http.user_agent(user_agent);
    }
    client.http = http.build().expect("http client");
    client
}

fn second_merchant(mut client: Client) -> Client {
    client.app_key = "demo-app-key-2".into();
    client.app_secret = "demo-app-secret-2".into();
    client.access_token = "demo-access-token-2".into();
    client
}

async fn stats(base: &str) -> Value {
    reqwest::get(format!("{base}/admin/stats")).await.expect("stats").json().await.expect("json")
}

/// `(max_concurrent_callers, max_concurrent_calls, callers)` of one merchant.
fn concurrency(stats: &Value, account: &str) -> (u64, u64, u64) {
    let s = &stats["accounts"][account]["stats"];
    let field = |key: &str| s[key].as_u64().unwrap_or_else(|| panic!("{account}: no {key} in {s}"));
    (field("max_concurrent_callers"), field("max_concurrent_calls"), field("callers"))
}

#[tokio::test]
async fn overlapping_calls_from_two_callers_count_two_and_sequential_ones_one() {
    // Every answer is held back 400 ms, so calls sent together are in flight together.
    let sim = start(&[
        "--accounts",
        "2",
        "--orders",
        "10",
        "--rate-per-sec",
        "0",
        "--rate-per-min",
        "0",
        "--latency-ms",
        "400",
    ])
    .await;
    let biz = || json!({"start_ts": 0, "page_size": 5});

    // m1: replica-a, then replica-b once replica-a's call is answered.
    let a = client_as(&sim.url, Some("replica-a"));
    let b = client_as(&sim.url, Some("replica-b"));
    assert_eq!(code(&a.query(biz()).await), 0);
    assert_eq!(code(&b.query(biz()).await), 0);
    let after_sequential = stats(&sim.url).await;
    assert_eq!(concurrency(&after_sequential, "m1"), (1, 1, 2), "{after_sequential}");
    assert_eq!(after_sequential["max_concurrent_callers"], 1);

    // m2: both replicas at once.
    let (a2, b2) = (second_merchant(a.clone()), second_merchant(b.clone()));
    let (answer_a, answer_b) = tokio::join!(a2.query(biz()), b2.query(biz()));
    assert_eq!((code(&answer_a), code(&answer_b)), (0, 0), "{answer_a} {answer_b}");
    let after_overlap = stats(&sim.url).await;
    assert_eq!(concurrency(&after_overlap, "m2"), (2, 2, 2), "{after_overlap}");
    assert_eq!(concurrency(&after_overlap, "m1"), (1, 1, 2), "m1 untouched");
    assert_eq!(after_overlap["max_concurrent_callers"], 2, "the most over all merchants");

    // Two calls at once from one caller are two calls but one caller.
    let (x, y) = tokio::join!(a.query(biz()), a.query(biz()));
    assert_eq!((code(&x), code(&y)), (0, 0));
    assert_eq!(concurrency(&stats(&sim.url).await, "m1"), (1, 2, 2));
}

#[tokio::test]
async fn legacy_queries_token_refreshes_and_callers_without_a_user_agent_count_too() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let faults = json!({"latency_min_ms": 400, "latency_max_ms": 400, "refresh_latency_ms": 400});
    let set = reqwest::Client::new().post(format!("{}/admin/faults?account=m1", sim.url)).json(&faults).send().await;
    assert!(set.expect("faults").status().is_success());

    let legacy = client_as(&sim.url, Some("replica-a"));
    let refresher = client_as(&sim.url, Some("replica-b"));
    let anonymous = client_as(&sim.url, None);
    let (l, r, q) = tokio::join!(
        legacy.legacy(json!({"start_ts": 0}), "demo-partner-key"),
        refresher.refresh("demo-refresh-token"),
        anonymous.query(json!({"start_ts": 0})),
    );
    assert_eq!((code(&l), code(&r)), (0, 0), "{l} {r}");
    assert!(q.get("code").is_some(), "answered (the token may just have been refreshed): {q}");
    let s = stats(&sim.url).await;
    assert_eq!(concurrency(&s, "m1"), (3, 3, 3), "legacy, refresh and `unknown` at once: {s}");
    assert_eq!(s["max_concurrent_callers"], 3);
}
