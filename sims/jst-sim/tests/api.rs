//! Every validation rule and protocol error of the simulator returns its documented code, over HTTP.

mod common;

use common::{Client, Tweak, code, start};
use serde_json::json;

#[tokio::test]
async fn a_signed_call_returns_a_page_in_the_data_envelope() {
    let sim = start(&["--orders", "120", "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let c = Client::demo(&sim.url);
    let a = c.query(json!({"start_ts": 0, "page_size": 50, "page_index": 1})).await;
    assert_eq!(code(&a), 0, "{a}");
    assert_eq!(a["data"]["datas"].as_array().map(Vec::len), Some(50));
    assert_eq!(a["data"]["has_next"], true);
    for key in ["page_size", "page_index", "data_count", "page_count"] {
        assert!(a["data"].get(key).is_some(), "{key}");
    }
    let b = c.query(json!({"start_ts": "0", "page_size": "50", "page_index": "3", "is_get_total": true})).await;
    assert_eq!(b["data"]["data_count"], 120);
    assert_eq!(b["data"]["page_count"], 3);
    assert_eq!(b["data"]["has_next"], false);
}

#[tokio::test]
async fn signature_timestamp_and_token_errors_have_their_codes() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let c = Client::demo(&sim.url);
    let biz = json!({"start_ts": 0});
    assert_eq!(
        code(&c.call(biz.clone(), Tweak { sign: Some("00000000000000000000000000000000"), ..Tweak::default() }).await),
        10
    );
    let mut stranger = Client::demo(&sim.url);
    stranger.app_key = "nobody".into();
    assert_eq!(code(&stranger.query(biz.clone()).await), 10);
    assert_eq!(code(&c.call(biz.clone(), Tweak { timestamp_offset: -601, ..Tweak::default() }).await), 180);
    assert_eq!(code(&c.call(biz.clone(), Tweak { timestamp_offset: 599, ..Tweak::default() }).await), 0);
    assert_eq!(code(&c.call(biz.clone(), Tweak { access_token: Some("stolen"), ..Tweak::default() }).await), 100);
    let legacy = c.legacy(json!({"start_ts": 0}), "demo-partner-key").await;
    assert_eq!((code(&legacy), legacy["issuccess"].clone()), (0, json!(true)));
    assert!(legacy["datas"].is_array(), "legacy keeps paging fields at the top level: {legacy}");
    let legacy_bad = c.legacy(json!({"start_ts": 0}), "wrong-key").await;
    assert_eq!((code(&legacy_bad), legacy_bad["issuccess"].clone()), (120, json!(false)));
}

#[tokio::test]
async fn parameter_errors_are_code_140_with_a_readable_message() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let c = Client::demo(&sim.url);
    let cases = [
        (json!({"page_size": 10}), "selector"),
        (json!({"start_ts": 0, "page_size": 51}), "page_size"),
        (json!({"modified_begin": "2024-01-01 00:00:00"}), "together"),
        (json!({"modified_begin": "2024-01-01 00:00:00", "modified_end": "2024-01-09 00:00:00"}), "7 days"),
        (
            json!({"modified_begin": "2024-01-01 00:00:00", "modified_end": "2024-01-02 00:00:01", "drp_co_id": 1}),
            "1 day",
        ),
        (json!({"modified_begin": "2024-01-01T00:00:00Z", "modified_end": "2024-01-02 00:00:00"}), "modified_begin"),
        (json!({"o_ids": (0..51).collect::<Vec<i32>>()}), "at most 50"),
        (json!({"l_ids": (0..21).map(|i| i.to_string()).collect::<Vec<_>>()}), "at most 20"),
        (json!({"start_ts": 0, "status": "Shipped"}), "status"),
    ];
    for (biz, needle) in cases {
        let a = c.query(biz.clone()).await;
        assert_eq!(code(&a), 140, "{biz}: {a}");
        assert!(a["msg"].as_str().unwrap_or("").contains(needle), "{biz}: {a}");
    }
}

#[tokio::test]
async fn rate_limits_answer_199_per_second_and_200_per_minute() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "5", "--rate-per-min", "8"]).await;
    let c = Client::demo(&sim.url);
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(code(&c.query(json!({"start_ts": 0})).await));
    }
    assert_eq!(codes, [0, 0, 0, 0, 0, 199]);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(code(&c.query(json!({"start_ts": 0})).await));
    }
    assert_eq!(codes, [0, 0, 0, 200], "8 per minute: the 9th call in the minute is refused");
    let stats: serde_json::Value =
        reqwest::get(format!("{}/admin/stats", sim.url)).await.expect("stats").json().await.expect("json");
    assert_eq!(stats["accounts"]["m1"]["stats"]["rejections"]["199"], 1);
    assert_eq!(stats["accounts"]["m1"]["stats"]["rejections"]["200"], 1);
}

#[tokio::test]
async fn tokens_expire_refresh_once_and_the_used_refresh_token_dies() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "0", "--rate-per-min", "0", "--token-lifetime", "1s"]).await;
    let mut c = Client::demo(&sim.url);
    assert_eq!(code(&c.query(json!({"start_ts": 0})).await), 0);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let expired = c.query(json!({"start_ts": 0})).await;
    assert_eq!(code(&expired), 100, "{expired}");
    let refreshed = c.refresh("demo-refresh-token").await;
    assert_eq!(code(&refreshed), 0, "{refreshed}");
    c.access_token = refreshed["data"]["access_token"].as_str().expect("token").to_string();
    assert_eq!(code(&c.query(json!({"start_ts": 0})).await), 0);
    assert_eq!(code(&c.refresh("demo-refresh-token").await), 100, "a used refresh token is invalid");
    let next = refreshed["data"]["refresh_token"].as_str().expect("refresh token");
    assert_eq!(code(&c.refresh(next).await), 0);
}

#[tokio::test]
async fn injected_faults_are_switchable_at_runtime() {
    let sim = start(&["--orders", "10", "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let c = Client::demo(&sim.url);
    let http = reqwest::Client::new();
    let set = |body: serde_json::Value| http.post(format!("{}/admin/faults?account=m1", sim.url)).json(&body).send();
    set(json!({"error_5xx_rate": 1.0})).await.expect("faults");
    assert!(c.query(json!({"start_ts": 0})).await["http_status"].as_u64().is_some_and(|s| s >= 500));
    set(json!({"code_150_rate": 1.0})).await.expect("faults");
    assert_eq!(code(&c.query(json!({"start_ts": 0})).await), 150);
    set(json!({"reset_rate": 1.0})).await.expect("faults");
    assert!(c.query(json!({"start_ts": 0})).await.get("transport").is_some(), "the connection is cut mid-answer");
    set(json!({"latency_min_ms": 300, "latency_max_ms": 300})).await.expect("faults");
    let started = std::time::Instant::now();
    assert_eq!(code(&c.query(json!({"start_ts": 0})).await), 0);
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert!(set(json!({"reset_rate": 2.0})).await.expect("faults").status().is_client_error());
}
