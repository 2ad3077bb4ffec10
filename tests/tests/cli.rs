//! The operator CLI: dead letters are inspected without being touched, replayed safely (dry run,
//! reason filter, rate, no second replay, nothing lost when the connection drops mid-way),
//! `status` reports stuck work with its exit code, and `demo` runs the whole pipeline.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use orderflow_shared::amqp::{Stage, Topology, ops::Client};
use orderflow_tests::*;
use serde_json::{Value, json};

fn orderflow(ns: &str, amqp_url: &str, args: &[&str]) -> (i32, Value, String) {
    ensure_binaries();
    let out = Command::new(orderflow_lab::stack::default_bin_dir().join("orderflow"))
        .args(args)
        .env("AMQP_URL", amqp_url)
        .env("ORDERFLOW_NS", ns)
        .env("LOG_FORMAT", "json")
        .output()
        .expect("orderflow runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), json, format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
}

async fn dead(ns: &str) -> anyhow::Result<u32> {
    let client = Client::connect(&broker_args(ns).await, "test").await?;
    let q = client.queue_state(&Topology::new(ns.to_string()).dead_queue(Stage::Writer)).await;
    client.close().await;
    let q = q?;
    Ok(q.map(|q| q.messages).unwrap_or(0))
}

/// A pipeline whose target rejects every id ending in 7; returns the stack and how many were rejected.
async fn poisoned(ns: &str) -> anyhow::Result<(Stack, usize)> {
    let mut options = StackOptions::new(&broker_url().await, ns, &log_dir(ns));
    options.orders = 2000;
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into())];
    options.target_args = ["--reject-ids", "*7"].map(String::from).to_vec();
    let stack = Stack::start(options).await?;
    let confirmed = stack.confirmed_ids().await?;
    let rejected = confirmed.iter().filter(|id| id.ends_with('7')).count();
    let expected_written = confirmed.len() - rejected;
    wait_for(
        "the poisoned records to be dead-lettered",
        Duration::from_secs(120),
        Duration::from_millis(300),
        || async {
            let (d, w) = (dead(ns).await?, stack.written_ids().await?.len());
            Ok(if d as usize == rejected && w == expected_written {
                Ok(())
            } else {
                Err(format!("{d} dead, {w} written"))
            })
        },
    )
    .await?;
    Ok((stack, rejected))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_records_are_inspected_then_replayed_once_at_the_given_rate() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("dlq");
    let url = broker_url().await;
    let (stack, n) = poisoned(&ns).await?;
    let outcome = async {
        let (code, status, text) = orderflow(&ns, &url, &["status", "--json", "--sample", "200ms"]);
        assert_eq!(code, 1, "dead letters make status exit 1: {text}");
        assert!(status["problems"].to_string().contains("dead letters"), "{status}");

        let (code, stats, text) = orderflow(&ns, &url, &["dlq", "stats", "--json"]);
        assert_eq!(code, 0, "{text}");
        let writer =
            stats.as_array().and_then(|a| a.iter().find(|s| s["stage"] == "writer")).cloned().unwrap_or_default();
        assert_eq!(writer["count"], n);
        assert_eq!(writer["reasons"]["target_rejected"], n);
        assert_eq!(writer["classes"]["permanent"], n);

        let (code, peek, text) = orderflow(&ns, &url, &["dlq", "peek", "--stage", "writer", "--limit", "3", "--json"]);
        assert_eq!(code, 0, "{text}");
        assert_eq!(peek.as_array().map(Vec::len), Some(3));
        assert!(peek[0]["error"].as_str().unwrap_or("").contains("422"), "{peek}");
        assert_eq!(dead(&ns).await? as usize, n, "peek removes nothing");

        let (code, dry, text) = orderflow(
            &ns,
            &url,
            &["dlq", "replay", "--stage", "writer", "--reason", "target_rejected", "--dry-run", "--json"],
        );
        assert_eq!(code, 0, "{text}");
        assert_eq!((dry["matched"].as_u64(), dry["replayed"].as_u64()), (Some(n as u64), Some(0)));
        assert_eq!(dead(&ns).await? as usize, n, "a dry run changes nothing");

        let (code, none, _) =
            orderflow(&ns, &url, &["dlq", "replay", "--stage", "writer", "--reason", "exhausted", "--json"]);
        assert_eq!((code, none["matched"].as_u64()), (0, Some(0)), "non-matching messages stay");
        assert_eq!(dead(&ns).await? as usize, n);

        stack.target_faults(&json!({"reject_ids": ""})).await?;
        let rate = 20.0;
        let started = Instant::now();
        let (code, done, text) = orderflow(
            &ns,
            &url,
            &["dlq", "replay", "--stage", "writer", "--reason", "target_rejected", "--rate", "20", "--json"],
        );
        let took = started.elapsed().as_secs_f64();
        assert_eq!(code, 0, "{text}");
        assert_eq!(done["replayed"].as_u64(), Some(n as u64), "{done}");
        assert_eq!(done["failed"].as_u64(), Some(0));
        assert!(took >= (n as f64 - 1.0) / rate, "--rate {rate}/s kept: {n} replays took {took:.1} s");
        wait_synced(&stack, Duration::from_secs(60)).await?;
        assert_eq!(
            stack.written_ids().await?,
            stack.confirmed_ids().await?,
            "every poisoned record is written after the replay"
        );

        let (code, again, _) =
            orderflow(&ns, &url, &["dlq", "replay", "--stage", "writer", "--reason", "target_rejected", "--json"]);
        assert_eq!(
            (code, again["matched"].as_u64(), again["replayed"].as_u64()),
            (0, Some(0), Some(0)),
            "a second replay finds nothing"
        );

        let (code, status, text) = orderflow(&ns, &url, &["status", "--json", "--sample", "200ms"]);
        assert_eq!(code, 0, "healthy again: {text}");
        let m1 = status["accounts"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["account"] == "m1"))
            .cloned()
            .unwrap_or_default();
        assert_eq!(m1["caught_up"], true, "{status}");
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_connection_drops_mid_way_loses_no_message() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("dlq-drop");
    let (stack, n) = poisoned(&ns).await?;
    let outcome = async {
        stack.target_faults(&json!({"reject_ids": ""})).await?;
        let broker = broker_args(&ns).await;
        let client = std::sync::Arc::new(Client::connect(&broker, "orderflow-dlq-test").await?);
        let topology = Topology::new(ns.clone());
        let options = orderflow_cli::dlq::ReplayOptions {
            stage: Stage::Writer,
            filter: orderflow_cli::dlq::Filter::default(),
            limit: None,
            rate: Some(20.0),
            dry_run: false,
            force: false,
            max_replays: 3,
            progress: false,
        };
        let replay = {
            let (c, t) = (client.clone(), topology.clone());
            tokio::spawn(async move { orderflow_cli::dlq::replay(&c, &t, &options).await })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        client.close().await;
        let result = replay.await?;
        eprintln!("replay after the connection dropped: {result:?}");
        // Everything replayed gets written; everything else is still a dead letter. Nothing is lost.
        let confirmed = stack.confirmed_ids().await?;
        let poisoned: Vec<String> = confirmed.iter().filter(|id| id.ends_with('7')).cloned().collect();
        assert_eq!(poisoned.len(), n);
        wait_for(
            "every poisoned record to be written or dead",
            Duration::from_secs(60),
            Duration::from_millis(300),
            || async {
                let written = stack.written_ids().await?;
                let written_poisoned = poisoned.iter().filter(|id| written.contains(*id)).count();
                let dead_now = dead(&ns).await? as usize;
                Ok(if written_poisoned + dead_now >= n && written_poisoned > 0 && dead_now > 0 {
                    Ok(())
                } else {
                    Err(format!("{written_poisoned} written + {dead_now} dead of {n}"))
                })
            },
        )
        .await?;
        // And a second replay finishes the job.
        let (code, done, text) = orderflow(&ns, &broker.amqp_url, &["dlq", "replay", "--stage", "writer", "--json"]);
        assert_eq!(code, 0, "{text}");
        assert!(done["replayed"].as_u64().unwrap_or(0) > 0);
        wait_synced(&stack, Duration::from_secs(60)).await?;
        assert_eq!(stack.written_ids().await?, confirmed);
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_the_whole_pipeline_and_reports_written_equal_confirmed() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let url = broker_url().await;
    let (code, summary, text) =
        orderflow("orderflow", &url, &["demo", "--orders", "3000", "--replicas", "2", "--json"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(summary["synced"], true, "{summary}");
    assert!(summary["confirmed"].as_u64().unwrap_or(0) > 2000);
    assert_eq!(summary["written"], summary["confirmed"]);
    assert_eq!(summary["dead_lettered"], 0);
    for key in ["seconds", "orders_per_sec"] {
        assert!(summary[key].is_number(), "{key}: {summary}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_whose_replica_cannot_start_names_it_and_leaves_no_queues_behind() -> anyhow::Result<()> {
    let ns = unique_ns("stack-start-fails");
    let broker = broker_args(&ns).await;
    let topology = Topology::new(ns.clone());
    // What the replicas started before the failing one declare.
    let client = Client::connect(&broker, "test").await?;
    client.declare(&topology).await?;
    let mut options = StackOptions::new(&broker.amqp_url, &ns, &log_dir(&ns));
    options.orders = 10;
    options.env = vec![("FETCH_INTERVAL".into(), "not-a-duration".into())];
    let error = match Stack::start(options).await {
        Ok(stack) => {
            teardown(stack).await;
            panic!("a fetcher with FETCH_INTERVAL=not-a-duration started");
        }
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("fetcher #0") && error.contains("exited at start"), "{error}");
    let mut left = Vec::new();
    for name in topology.queue_names() {
        if client.queue_state(&name).await?.is_some() {
            left.push(name);
        }
    }
    client.close().await;
    assert!(left.is_empty(), "queues left behind: {left:?}");
    Ok(())
}

/// Hostile values in flags and environment variables are errors that name the setting, never a
/// panic (a huge duration, an infinite rate, a zero share, a malformed success rule).
#[test]
fn hostile_settings_are_refused_by_name_and_nothing_panics() {
    ensure_binaries();
    let bin = orderflow_lab::stack::default_bin_dir();
    type Case<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 8] = [
        ("writer", &["--timeout", "99999999999999999999999d"], &[], "--timeout"),
        ("writer", &[], &[("TARGET_SUCCESS", "success")], "--target-success"),
        ("writer", &[], &[("HOLD_LIMIT", "1e400s")], "--hold-limit"),
        ("fetcher", &[], &[("FETCH_SWEEP_BUDGET", "0%")], "--sweep-budget"),
        ("fetcher", &[], &[("FETCH_INTERVAL", "-5s")], "--interval"),
        ("orderflow", &["dlq", "replay", "--stage", "writer", "--rate", "inf"], &[], "--rate"),
        ("orderflow", &["dlq", "replay", "--stage", "writer", "--rate", "0"], &[], "--rate"),
        ("target-sim", &["--failure-rate", "2"], &[], "failure_rate"),
    ];
    for (binary, args, env, names) in cases {
        let out = Command::new(bin.join(binary))
            .args(args)
            .envs(env.iter().copied())
            .env("TARGET_URL", "http://127.0.0.1:9/data/write")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("AMQP_URL", "amqp://127.0.0.1:1/%2f")
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{binary} {args:?} {env:?} panicked: {stderr}");
        assert!(matches!(out.status.code(), Some(1 | 2)), "{binary} {args:?} {env:?}: exit {:?}: {stderr}", out.status);
        assert!(stderr.contains(names), "{binary} {args:?} {env:?}: the error names {names}: {stderr}");
    }
}

/// The ledger tells an order's whole story. Orders whose id ends in 7 first fail (HTTP 503,
/// retried through the 1 s tier) while a fifth of every write fails inside an HTTP 200
/// (`success:false`); then the sevens are refused for good (business code 40001 inside a 200:
/// dead-lettered), the rest written; once the rule is lifted a `dlq replay` writes them. `orderflow trace` of such an order shows, in order: fetched,
/// transformed, the failed attempt with the target's answer, the retry tier, the permanent
/// refusal, the dead letter with its reason, the replay, written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_a_replayed_orders_journey_through_failures_a_dead_letter_and_the_replay() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("trace");
    let url = broker_url().await;
    let mut options = StackOptions::new(&url, &ns, &log_dir(&ns));
    options.orders = 300;
    options.env = [
        ("FETCH_INTERVAL", "1s"),
        ("RETRY_TIERS", "1s"),
        ("WRITER_RETRY_IN_PLACE", "0"),
        ("TARGET_PERMANENT_CODES", "40001"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec();
    options.target_args = ["--soft-failure-rate", "0.2", "--fail-ids", "*7"].map(String::from).to_vec();
    let stack = Stack::start(options).await?;
    let outcome = async {
        let confirmed = stack.confirmed_ids().await?;
        let sevens: Vec<String> = confirmed.iter().filter(|id| id.ends_with('7')).cloned().collect();
        anyhow::ensure!(!sevens.is_empty(), "the seed has orders ending in 7");
        // Every seven fails a few times (so each went through the retry tier) …
        wait_for("the sevens to fail and be retried", Duration::from_secs(120), Duration::from_millis(300), || async {
            let stats = stack.target_stats().await?;
            let failed = stats["stats"]["failures_injected"].as_u64().unwrap_or(0);
            let soft = stats["stats"]["soft_failures_injected"].as_u64().unwrap_or(0);
            Ok(if failed >= 3 * sevens.len() as u64 && soft > 0 {
                Ok(())
            } else {
                Err(format!("{failed} failures, {soft} soft failures"))
            })
        })
        .await?;
        // … then is refused for good.
        stack.target_faults(&json!({"fail_ids": "", "soft_reject_ids": "*7"})).await?;
        wait_for("the sevens dead-lettered", Duration::from_secs(120), Duration::from_millis(300), || async {
            let (d, w) = (dead(&ns).await? as usize, stack.written_ids().await?.len());
            Ok(if d == sevens.len() && w == confirmed.len() - sevens.len() {
                Ok(())
            } else {
                Err(format!("{d} dead, {w} written"))
            })
        })
        .await?;
        stack.target_faults(&json!({"soft_reject_ids": "", "soft_failure_rate": 0.0})).await?;
        let (code, done, text) = orderflow(&ns, &url, &["dlq", "replay", "--stage", "writer", "--json"]);
        assert_eq!((code, done["replayed"].as_u64()), (0, Some(sevens.len() as u64)), "{text}");
        wait_synced(&stack, Duration::from_secs(60)).await?;

        let id = &sevens[0];
        let (code, trace, text) = orderflow(&ns, &url, &["trace", id, "--json"]);
        assert_eq!(code, 0, "{text}");
        let orders = trace["orders"].as_array().cloned().unwrap_or_default();
        assert_eq!(orders.len(), 1, "{trace}");
        // Found through the ledger's index: every batch it named, read where it said.
        let read = &trace["read"];
        assert_eq!(read["how"], "index", "{read}");
        assert!(read["sought"].as_u64() >= Some(4) && read["found"] == read["sought"], "{read}");
        let steps: Vec<Value> = orders[0]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|v| v["steps"].as_array().cloned().unwrap_or_default())
            .collect();
        let kinds: Vec<&str> = steps.iter().filter_map(|s| s["kind"].as_str()).collect();
        let expected =
            ["fetched", "transformed", "attempt", "retry", "attempt", "dead_lettered", "replayed", "written"];
        let mut at = 0;
        for kind in kinds.iter() {
            if at < expected.len() && *kind == expected[at] {
                at += 1;
            }
        }
        assert_eq!(at, expected.len(), "the journey in order, got {kinds:?}");
        assert_eq!(kinds.first(), Some(&"fetched"));
        assert_eq!(kinds.last(), Some(&"written"), "{kinds:?}");
        let first_failure = steps.iter().find(|s| s["kind"] == "attempt").cloned().unwrap_or_default();
        assert_eq!(first_failure["outcome"].as_str(), Some("transient"), "{first_failure}");
        assert!(matches!(first_failure["status"].as_u64(), Some(503 | 200)), "the target's answer: {first_failure}");
        let refusal =
            steps.iter().find(|s| s["kind"] == "attempt" && s["outcome"] == "permanent").cloned().unwrap_or_default();
        assert_eq!(refusal["code"].as_str(), Some("40001"), "the target's code: {refusal}");
        assert!(refusal["message"].as_str().unwrap_or("").contains("数据校验失败"), "the target's message: {refusal}");
        let dead_letter = steps.iter().find(|s| s["kind"] == "dead_lettered").cloned().unwrap_or_default();
        assert_eq!(
            (dead_letter["class"].as_str(), dead_letter["reason"].as_str()),
            (Some("permanent"), Some("target_rejected"))
        );
        let retry = steps.iter().find(|s| s["kind"] == "retry").cloned().unwrap_or_default();
        assert_eq!(retry["tier"].as_str(), Some("1s"), "{retry}");
        let stages: Vec<&str> = steps.iter().filter_map(|s| s["stage"].as_str()).collect();
        assert!(
            stages.contains(&"fetcher") && stages.contains(&"transformer") && stages.contains(&"orderflow"),
            "{stages:?}"
        );
        // For a person: the same, as lines; and an id the ledger never saw says so and exits 1.
        let (code, _, text) = orderflow(&ns, &url, &["trace", id]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("code 40001") && text.contains("dead-lettered (permanent): target_rejected"), "{text}");
        let (code, _, text) = orderflow(&ns, &url, &["trace", "999999999"]);
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("No trace of 999999999"), "{text}");
        Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}
