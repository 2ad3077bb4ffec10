//! The fetcher never misses an order: under churn and late commits, in both cursor modes and both
//! API generations (the seed's request config unchanged for the window mode); it uses its budget
//! without a single 199/200, alone and as 3 replicas over 6 accounts; it survives `kill -9`,
//! restarts from its checkpoints, and refreshes expired tokens.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use orderflow_tests::*;
use serde_json::json;

const CHURN: [&str; 12] = [
    "--churn-modify",
    "20",
    "--churn-confirm",
    "10",
    "--churn-cancel",
    "2",
    "--churn-new",
    "10",
    "--churn-late",
    "5",
    "--late-max",
    "5s",
];

fn seed_config() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../services/fetcher/config/seed-request-config.json"))
}

fn fetch_only(ns: &str, accounts: u32, orders: u64, fetchers: u32) -> StackOptions {
    let mut o = StackOptions::new(orderflow_shared::settings::DEFAULT_AMQP_URL, ns, &log_dir(ns));
    o.accounts = accounts;
    o.orders = orders;
    o.fetchers = fetchers;
    o.transformers = 0;
    o.writers = 0;
    o.env = vec![
        ("FETCH_INTERVAL".into(), "1s".into()),
        ("FETCH_PASS_TIME".into(), "5s".into()),
        ("FETCH_WINDOW_DELAY".into(), "8s".into()),
        ("FETCH_WINDOW_OVERLAP".into(), "10s".into()),
    ];
    o
}

async fn no_order_missed(name: &str, legacy: bool, window_mode: bool) -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns(name);
    let mut options = fetch_only(&ns, 1, 20_000, 1);
    options.amqp_url = broker_url().await;
    options.rate_per_sec = 200;
    options.rate_per_min = 12_000;
    options.legacy = legacy;
    options.jst_args = CHURN.map(String::from).to_vec();
    if window_mode {
        options.request_config = Some(seed_config());
    }
    let collector = PageCollector::start(&ns).await?;
    let stack = Stack::start(options).await?;
    let outcome = async {
        // Churn and late commits run while the fetcher backfills, then stop so the end is checkable.
        tokio::time::sleep(Duration::from_secs(15)).await;
        stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
        let confirmed = wait_all_published(&stack, &collector, Duration::from_secs(120)).await?;
        assert!(confirmed >= 15_000, "at least 15,000 Confirmed orders are checked, got {confirmed}");
        let stats = sim_stats(&stack, "m1").await?;
        assert!(stats["churn_done"]["modified"].as_u64().unwrap_or(0) > 100, "churn ran: {stats}");
        assert!(stats["churn_done"]["late"].as_u64().unwrap_or(0) > 20, "late commits ran: {stats}");
        assert_eq!(stats["stats"]["rejections"].get("140"), None, "no invalid request: {stats}");
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_ts_on_the_open_platform_misses_no_order_under_churn() -> anyhow::Result<()> {
    no_order_missed("ts-open", false, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_ts_on_the_legacy_api_misses_no_order_under_churn() -> anyhow::Result<()> {
    no_order_missed("ts-legacy", true, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_config_in_window_mode_misses_no_order_under_churn() -> anyhow::Result<()> {
    no_order_missed("win-open", false, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_mode_on_the_legacy_api_misses_no_order_under_churn() -> anyhow::Result<()> {
    no_order_missed("win-legacy", true, true).await
}

/// Calls accepted by jst-sim for an account so far, and its 199/200 rejections.
async fn calls_and_rate_rejections(stack: &Stack, account: &str) -> anyhow::Result<(u64, u64)> {
    let s = sim_stats(stack, account).await?;
    let rejections = ["199", "200"].iter().map(|c| s["stats"]["rejections"][c].as_u64().unwrap_or(0)).sum();
    Ok((s["stats"]["ok"].as_u64().unwrap_or(0), rejections))
}

async fn budget_use(replicas: u32, accounts: u32) -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("budget");
    let mut options = fetch_only(&ns, accounts, 20_000, replicas);
    options.amqp_url = broker_url().await;
    options.rate_per_sec = 20;
    options.rate_per_min = 600;
    let per_sec_budget = 600.0 / 60.0;
    let collector = PageCollector::start(&ns).await?;
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let names: Vec<String> = (1..=accounts).map(|i| format!("m{i}")).collect();
        // Let the replicas spread the accounts, then measure a steady 20 s of backfill.
        tokio::time::sleep(Duration::from_secs(12)).await;
        let mut before = Vec::new();
        for n in &names {
            before.push(calls_and_rate_rejections(&stack, n).await?.0);
        }
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(20)).await;
        let secs = t0.elapsed().as_secs_f64();
        for (n, b) in names.iter().zip(before) {
            let (after, rejected) = calls_and_rate_rejections(&stack, n).await?;
            let used = (after - b) as f64 / (secs * per_sec_budget);
            eprintln!("{n}: {:.1}% of the per-minute budget, {rejected} rejections", used * 100.0);
            assert!(used >= 0.95, "{n} used only {:.1}% of its budget", used * 100.0);
            assert!(used <= 1.0, "{n} exceeded its budget: {:.1}%", used * 100.0);
            assert_eq!(rejected, 0, "{n} got 199/200 rejections");
        }
        if replicas > 1 {
            for proc in stack.replicas(Role::Fetcher) {
                let held = metric(proc.admin.expect("admin"), "orderflow_fetch_accounts_held", None).await?;
                assert!(held >= 1.0, "fetcher #{} holds no account: accounts must spread", proc.index);
            }
        }
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    stack.stop().await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_uses_the_budget_without_a_single_rejection() -> anyhow::Result<()> {
    budget_use(1, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_over_six_accounts_keep_every_budget() -> anyhow::Result<()> {
    budget_use(3, 6).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_accounts_resume_elsewhere_within_30_s_and_nothing_is_missed() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("kill");
    let mut options = fetch_only(&ns, 4, 6_000, 2);
    options.amqp_url = broker_url().await;
    options.rate_per_sec = 20;
    options.rate_per_min = 600;
    options.jst_args = CHURN.map(String::from).to_vec();
    let collector = PageCollector::start(&ns).await?;
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let admin =
            |i: u32| stack.replicas(Role::Fetcher).iter().find(|p| p.index == i).and_then(|p| p.admin).expect("admin");
        let (a0, a1) = (admin(0), admin(1));
        wait_for(
            "both replicas to hold accounts",
            Duration::from_secs(30),
            Duration::from_millis(250),
            || async move {
                let (h0, h1) = (
                    metric(a0, "orderflow_fetch_accounts_held", None).await?,
                    metric(a1, "orderflow_fetch_accounts_held", None).await?,
                );
                Ok(if h0 >= 1.0 && h1 >= 1.0 { Ok(()) } else { Err(format!("held {h0} / {h1}")) })
            },
        )
        .await?;
        stack.kill9(Role::Fetcher, 0).await?;
        let killed_at = Instant::now();
        wait_for(
            "the survivor to hold all 4 accounts",
            Duration::from_secs(30),
            Duration::from_millis(250),
            || async move {
                let held = metric(a1, "orderflow_fetch_accounts_held", None).await?;
                Ok(if held >= 4.0 { Ok(()) } else { Err(format!("survivor holds {held}")) })
            },
        )
        .await?;
        eprintln!("accounts resumed on the survivor {:.1} s after kill -9", killed_at.elapsed().as_secs_f64());
        stack.post_json(&format!("{}/admin/churn", stack.jst_url), &json!({})).await?;
        wait_all_published(&stack, &collector, Duration::from_secs(120)).await?;
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_fetchers_resume_from_their_checkpoints_refetching_at_most_one_pass() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("restart");
    let mut options = fetch_only(&ns, 1, 10_000, 1);
    options.amqp_url = broker_url().await;
    options.rate_per_sec = 20;
    options.rate_per_min = 1200;
    options.env.push(("FETCH_PASS_PAGES".into(), "20".into()));
    let collector = PageCollector::start(&ns).await?;
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        // kill -9 in the middle of the backfill, then start a new replica.
        wait_for("a few passes", Duration::from_secs(30), Duration::from_millis(200), || {
            let c = collector.snapshot();
            async move { Ok(if c.pages >= 50 { Ok(()) } else { Err(format!("{} pages", c.pages)) }) }
        })
        .await?;
        stack.kill9(Role::Fetcher, 0).await?;
        stack.spawn_stage(Role::Fetcher, 0).await?;
        wait_all_published(&stack, &collector, Duration::from_secs(120)).await?;
        let served = sim_stats(&stack, "m1").await?["stats"]["rows_served"].as_u64().unwrap_or(0);
        let total = stack.get_json(&format!("{}/admin/stats", stack.jst_url)).await?["accounts"]["m1"]["orders"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            served <= total + 20 * 50,
            "kill -9 mid-pass re-fetched more than one pass: {served} rows for {total} orders"
        );
        // A graceful restart of a caught-up fetcher fetches nothing again.
        let before = served;
        let proc = stack.proc_mut(Role::Fetcher, 0).expect("fetcher");
        let status = Stack::terminate(proc, Duration::from_secs(20)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM exits 0");
        stack.spawn_stage(Role::Fetcher, 0).await?;
        let admin = stack.replicas(Role::Fetcher)[0].admin.expect("admin");
        wait_for(
            "a caught-up pass after the restart",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move {
                let passes = metric(admin, "orderflow_fetch_passes_total", Some("caught_up")).await?;
                Ok(if passes >= 1.0 { Ok(()) } else { Err("no pass yet".to_string()) })
            },
        )
        .await?;
        let after = sim_stats(&stack, "m1").await?["stats"]["rows_served"].as_u64().unwrap_or(0);
        assert_eq!(after, before, "a restart after catching up re-fetched {} rows", after - before);
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_mid_backfill_is_refreshed_and_nothing_is_missed() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("token");
    let mut options = fetch_only(&ns, 1, 10_000, 1);
    options.amqp_url = broker_url().await;
    options.rate_per_sec = 40;
    options.rate_per_min = 2400;
    options.jst_args = vec!["--token-lifetime".into(), "2s".into()];
    let collector = PageCollector::start(&ns).await?;
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        wait_all_published(&stack, &collector, Duration::from_secs(120)).await?;
        let stats = sim_stats(&stack, "m1").await?;
        assert!(stats["stats"]["token_refreshes"].as_u64().unwrap_or(0) >= 1, "{stats}");
        assert!(stats["stats"]["rejections"]["100"].as_u64().unwrap_or(0) >= 1, "the token did expire: {stats}");
        assert!(stack.exited().is_none(), "nothing crashed");
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_stops_only_that_account_and_says_why_without_leaking_secrets() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("permanent");
    let mut options = fetch_only(&ns, 2, 2_000, 1);
    options.amqp_url = broker_url().await;
    let collector = PageCollector::start(&ns).await?;
    let mut stack = Stack::start(options).await?;
    // Restart the fetcher with m2's secret wrong: Jushuitan answers code 10 (bad signature).
    let mut accounts: serde_json::Value = serde_json::from_slice(&std::fs::read(&stack.accounts_file)?)?;
    accounts["accounts"][1]["app_secret"] = json!("wrong-secret-DO-NOT-LOG");
    std::fs::write(&stack.accounts_file, serde_json::to_vec(&accounts)?)?;
    stack.kill9(Role::Fetcher, 0).await?;
    stack.spawn_stage(Role::Fetcher, 0).await?;
    let admin = stack.replicas(Role::Fetcher)[0].admin.expect("admin");
    let outcome = async {
        wait_for("m2 to be stopped", Duration::from_secs(60), Duration::from_millis(250), || async move {
            let stopped = metric(admin, "orderflow_fetch_account_stopped", Some("account=\"m2\"")).await?;
            Ok(if stopped == 1.0 { Ok(()) } else { Err(format!("stopped = {stopped}")) })
        })
        .await?;
        let ready = reqwest::get(format!("http://{admin}/readyz")).await?;
        assert_eq!(ready.status(), 503);
        let body: serde_json::Value = ready.json().await?;
        assert!(body["checks"]["account:m2"].as_str().unwrap_or("").contains("code 10"), "{body}");
        assert_eq!(body["checks"]["account:m1"], "ok");
        // m1 goes on: every Confirmed order of m1 is published.
        let truth = truth_pairs(&stack).await?;
        let m1: Vec<_> = truth.iter().filter(|(a, _)| a == "m1").collect();
        wait_for("m1 fully published", Duration::from_secs(60), Duration::from_millis(250), || {
            let seen = collector.snapshot();
            let missing = m1.iter().filter(|p| !seen.ids.contains(**p)).count();
            async move { Ok(if missing == 0 { Ok(()) } else { Err(format!("{missing} missing")) }) }
        })
        .await?;
        let log = std::fs::read_to_string(&stack.replicas(Role::Fetcher)[0].log)?;
        assert!(log.contains("Account stopped on a permanent error"), "the log says why");
        for secret in ["wrong-secret-DO-NOT-LOG", "demo-app-secret", "demo-access-token", "demo-refresh-token"] {
            assert!(!log.contains(secret), "the fetcher log leaks {secret}");
        }
        anyhow::Ok(())
    }
    .await;
    let _ = collector.stop().await;
    teardown(stack).await;
    outcome
}
