//! The writer against target-sim: retries through the tiers until everything is written under
//! 5xx and 429, waits out a 60 s outage behind its breaker without dead letters, dead-letters a
//! permanent reject on its first attempt with the reason, and loses nothing on kill -9 or SIGTERM.

use std::time::Duration;

use orderflow_shared::{
    amqp::{Stage, Topology, ops::Client},
    messages::header,
};
use orderflow_tests::*;
use serde_json::json;

fn pipeline(ns: &str, amqp_url: &str, orders: u64) -> StackOptions {
    let mut o = StackOptions::new(amqp_url, ns, &log_dir(ns));
    o.orders = orders;
    o.env = vec![("FETCH_INTERVAL".into(), "1s".into()), ("RETRY_TIERS".into(), "200ms,500ms,1s,2s".into())];
    o
}

async fn dead_count(ns: &str, stage: Stage) -> anyhow::Result<u32> {
    let client = Client::connect(&broker_args(ns).await, "test").await?;
    let q = client.queue_state(&Topology::new(ns.to_string()).dead_queue(stage)).await;
    client.close().await;
    let q = q?;
    Ok(q.map(|q| q.messages).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_written_through_20_percent_5xx_and_1_percent_429() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-faults");
    let mut options = pipeline(&ns, &broker_url().await, 3000);
    // Each 429's `Retry-After: 1` pauses every write for a second (the target asked everyone to
    // wait): at 1% that is about 30 pauses.
    options.target_args =
        ["--failure-rate", "0.2", "--throttle-rate", "0.01", "--retry-after", "1"].map(String::from).to_vec();
    // 25% transient failures: the chance a record fails 12 times in a row is 6e-8 (with the default
    // 8 it would be 1.5e-5 per record, a flaky test over thousands).
    options.env.push(("WRITER_MAX_ATTEMPTS".into(), "12".into()));
    let stack = Stack::start(options).await?;
    let outcome = async {
        wait_synced(&stack, Duration::from_secs(180)).await?;
        let stats = stack.target_stats().await?;
        assert!(stats["stats"]["failures_injected"].as_u64().unwrap_or(0) > 200, "{stats}");
        assert!(stats["stats"]["throttled"].as_u64().unwrap_or(0) > 10, "{stats}");
        assert_eq!(dead_count(&ns, Stage::Writer).await?, 0, "nothing dead-lettered");
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        // Most failures are retried in place; the few that fail three times in a row go to a tier.
        assert!(metric(writer, "orderflow_write_retries_in_place_total", None).await? > 200.0);
        assert!(metric(writer, "orderflow_write_retries_total", None).await? > 0.0);
        assert_eq!(
            metric(writer, "orderflow_write_breaker_transitions_total", Some("open")).await?,
            0.0,
            "scattered failures keep the breaker closed"
        );
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// A target over its quota answers 429 + `Retry-After`: that is "not so fast", not "this record
/// failed". With one attempt allowed, a record that spent attempts on 429s would be dead-lettered as
/// exhausted (as the writer before this rule did); every record is written instead, none through a
/// retry tier, and the writes pause for the target (fixed 64 in flight against 200/s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_from_a_target_over_its_quota_spends_no_attempt() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-quota");
    let mut options = pipeline(&ns, &broker_url().await, 600);
    options.target_args = ["--capacity-per-sec", "200", "--retry-after", "1"].map(String::from).to_vec();
    options.env.push(("WRITER_MAX_ATTEMPTS".into(), "1".into()));
    let stack = Stack::start(options).await?;
    let outcome = async {
        wait_synced(&stack, Duration::from_secs(180)).await?;
        let stats = stack.target_stats().await?;
        assert!(stats["stats"]["over_capacity"].as_u64().unwrap_or(0) > 0, "the quota was hit: {stats}");
        assert_eq!(dead_count(&ns, Stage::Writer).await?, 0, "no record dead-lettered for a 429");
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        assert_eq!(metric(writer, "orderflow_write_retries_total", None).await?, 0.0, "no 429 sent a record to a tier");
        assert!(metric(writer, "orderflow_write_throttled_total", None).await? > 0.0);
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_second_outage_dead_letters_nothing_and_the_breaker_opens_and_closes() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-outage");
    let mut options = pipeline(&ns, &broker_url().await, 3000);
    options.rate_per_sec = 5;
    options.rate_per_min = 300;
    let stack = Stack::start(options).await?;
    let outcome = async {
        wait_for("the first writes", Duration::from_secs(60), Duration::from_millis(100), || async {
            let n = stack.written_ids().await?.len();
            Ok(if n >= 100 { Ok(()) } else { Err(format!("{n} written")) })
        })
        .await?;
        stack.target_faults(&json!({"outage_secs": 60})).await?;
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        wait_for("the breaker to open", Duration::from_secs(30), Duration::from_millis(200), || async move {
            let open = metric(writer, "orderflow_write_breaker_state", None).await?;
            Ok(if open >= 1.0 { Ok(()) } else { Err(format!("state {open}")) })
        })
        .await?;
        let synced = wait_synced(&stack, Duration::from_secs(240)).await?;
        assert_eq!(dead_count(&ns, Stage::Writer).await?, 0, "no dead letters after a 60 s outage");
        assert!(metric(writer, "orderflow_write_breaker_transitions_total", Some("to=\"open\"")).await? >= 1.0);
        assert!(metric(writer, "orderflow_write_breaker_transitions_total", Some("to=\"closed\"")).await? >= 1.0);
        assert_eq!(metric(writer, "orderflow_write_breaker_state", None).await?, 0.0, "closed again");
        assert!(metric(writer, "orderflow_write_held_during_outage_total", None).await? > 0.0);
        let refusals = stack.target_stats().await?["stats"]["outage_refusals"].as_u64().unwrap_or(0);
        assert!(refusals < 2_000, "the breaker kept the writer from hammering the target: {refusals} refused writes");
        eprintln!("outage: {} orders written, {refusals} writes refused during 60 s", synced.written_confirmed);
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanently_rejected_records_are_dead_lettered_on_their_first_attempt_with_the_reason() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-reject");
    let mut options = pipeline(&ns, &broker_url().await, 2000);
    options.target_args = ["--reject-ids", "*7"].map(String::from).to_vec();
    let stack = Stack::start(options).await?;
    let outcome = async {
        let confirmed = stack.confirmed_ids().await?;
        let rejected: usize = confirmed.iter().filter(|id| id.ends_with('7')).count();
        let others: std::collections::HashSet<String> =
            confirmed.iter().filter(|id| !id.ends_with('7')).cloned().collect();
        wait_for("all other records written", Duration::from_secs(120), Duration::from_millis(300), || async {
            let written = stack.written_ids().await?;
            Ok(if written == others { Ok(()) } else { Err(format!("{} of {} written", written.len(), others.len())) })
        })
        .await?;
        let broker = broker_args(&ns).await;
        let dead =
            take(&broker, &Topology::new(ns.clone()).dead_queue(Stage::Writer), rejected, Duration::from_secs(30))
                .await?;
        for d in &dead {
            assert_eq!(d.header(header::REASON).as_deref(), Some("target_rejected"));
            assert_eq!(d.header(header::ERROR_CLASS).as_deref(), Some("permanent"));
            assert!(d.header(header::ERROR).unwrap_or_default().contains("422"));
            assert_eq!(d.header(header::ATTEMPT).as_deref(), Some("0"), "dead-lettered on the first attempt");
            assert!(d.json()["id"].as_str().is_some_and(|id| id.ends_with('7')));
        }
        let stats = stack.target_stats().await?;
        assert_eq!(stats["stats"]["rejected_by_rule"].as_u64(), Some(rejected as u64), "each rejected once: {stats}");
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_sigterm_of_writers_with_writes_in_flight_lose_nothing() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-kill");
    let mut options = pipeline(&ns, &broker_url().await, 4000);
    options.writers = 2;
    options.target_args = ["--latency-ms", "150"].map(String::from).to_vec();
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        wait_for("writes in flight", Duration::from_secs(60), Duration::from_millis(100), || async {
            let n = stack.written_ids().await?.len();
            Ok(if n >= 300 { Ok(()) } else { Err(format!("{n} written")) })
        })
        .await?;
        stack.kill9(Role::Writer, 0).await?;
        let proc = stack.proc_mut(Role::Writer, 1).expect("writer 1");
        let status = Stack::terminate(proc, Duration::from_secs(30)).await;
        assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM finishes in-flight writes and exits 0");
        stack.spawn_stage(Role::Writer, 0).await?;
        stack.spawn_stage(Role::Writer, 1).await?;
        let p = wait_synced(&stack, Duration::from_secs(180)).await?;
        assert_eq!(dead_count(&ns, Stage::Writer).await?, 0);
        let stats = stack.target_stats().await?;
        eprintln!(
            "after kill -9 and SIGTERM: {} written, {} duplicates suppressed by idCheck",
            p.written_confirmed, stats["stats"]["duplicates_suppressed"]
        );
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_failing_is_dead_lettered_as_exhausted_after_its_attempts() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-exhaust");
    let mut options = pipeline(&ns, &broker_url().await, 1000);
    options.target_args = ["--fail-ids", "*3"].map(String::from).to_vec();
    let stack = Stack::start(options).await?;
    let outcome = async {
        let confirmed = stack.confirmed_ids().await?;
        let failing = confirmed.iter().filter(|id| id.ends_with('3')).count();
        let broker = broker_args(&ns).await;
        // Eight attempts through the 200ms..2s tiers take about ten seconds per record.
        let dead =
            take(&broker, &Topology::new(ns.clone()).dead_queue(Stage::Writer), failing, Duration::from_secs(120))
                .await?;
        for d in &dead {
            assert_eq!(d.header(header::ERROR_CLASS).as_deref(), Some("exhausted"));
            assert_eq!(d.header(header::REASON).as_deref(), Some("exhausted"));
            let error = d.header(header::ERROR).unwrap_or_default();
            assert!(error.contains("8 attempts") && error.contains("503"), "{error}");
            assert_eq!(d.header(header::ATTEMPT).as_deref(), Some("7"), "the attempt count is our own header");
            assert!(
                d.properties.headers().as_ref().is_none_or(|h| !h.inner().contains_key("x-death")),
                "no broker death history"
            );
        }
        let written = stack.written_ids().await?;
        assert_eq!(written.len(), confirmed.len() - failing, "every other record is written");
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// Platform APIs answer "busy" with HTTP 200 and `success:false`: the writer reads the answer and
/// retries it. Under the old rule (any 2xx is written; `TARGET_SUCCESS=status` reproduces it)
/// this test loses about a tenth of the orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_inside_an_http_200_are_retried_and_business_rejects_dead_lettered_with_the_targets_message()
-> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-soft");
    let mut options = pipeline(&ns, &broker_url().await, 3000);
    options.target_args =
        ["--soft-failure-rate", "0.1", "--failure-rate", "0.05", "--soft-reject-ids", "*7"].map(String::from).to_vec();
    options.env.push(("WRITER_MAX_ATTEMPTS".into(), "12".into()));
    options.env.push(("TARGET_PERMANENT_CODES".into(), "40001".into()));
    if let Ok(rule) = std::env::var("ORDERFLOW_TEST_TARGET_SUCCESS") {
        options.env.push(("TARGET_SUCCESS".into(), rule)); // `status`: the old classification, to see it fail
    }
    let stack = Stack::start(options).await?;
    let outcome = async {
        let confirmed = stack.confirmed_ids().await?;
        let rejected = confirmed.iter().filter(|id| id.ends_with('7')).count();
        let others: std::collections::HashSet<String> =
            confirmed.iter().filter(|id| !id.ends_with('7')).cloned().collect();
        wait_for(
            "every other Confirmed order written",
            Duration::from_secs(180),
            Duration::from_millis(500),
            || async {
                let written = stack.written_ids().await?;
                let missing = others.difference(&written).count();
                Ok(if missing == 0 { Ok(()) } else { Err(format!("{missing} of {} not written", others.len())) })
            },
        )
        .await?;
        let broker = broker_args(&ns).await;
        let dead =
            take(&broker, &Topology::new(ns.clone()).dead_queue(Stage::Writer), rejected, Duration::from_secs(30))
                .await?;
        anyhow::ensure!(dead.len() == rejected, "{} of {rejected} business rejects dead-lettered", dead.len());
        for d in &dead {
            let error = d.header(header::ERROR).unwrap_or_default();
            anyhow::ensure!(
                d.header(header::REASON).as_deref() == Some("target_rejected"),
                "{:?}",
                d.header(header::REASON)
            );
            anyhow::ensure!(
                error.contains("code 40001") && error.contains("数据校验失败"),
                "the target's code and message: {error}"
            );
            anyhow::ensure!(d.json()["id"].as_str().is_some_and(|id| id.ends_with('7')), "only the rejected ids");
        }
        anyhow::ensure!(dead_count(&ns, Stage::Writer).await? == 0, "nothing else dead-lettered");
        let stats = stack.target_stats().await?;
        let soft = stats["stats"]["soft_failures_injected"].as_u64().unwrap_or(0);
        anyhow::ensure!(soft > 150, "the target hid failures in 200s: {stats}");
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        anyhow::ensure!(metric(writer, "orderflow_write_requests_total", Some("soft_failure")).await? > 150.0);
        eprintln!(
            "soft failures: {soft} answered 200 + failure, all retried; {rejected} business rejects dead-lettered"
        );
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// Expired target credentials are the target's answer to everyone, not a verdict on each record:
/// the breaker opens, `/readyz` says unauthorized, records wait (and are parked when held past
/// HOLD_LIMIT), and writing resumes by itself when the target accepts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_second_401_window_dead_letters_nothing_and_writing_resumes_by_itself() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-auth");
    let mut options = pipeline(&ns, &broker_url().await, 3000);
    options.rate_per_sec = 5;
    options.rate_per_min = 300;
    options.env.push(("HOLD_LIMIT".into(), "20s".into()));
    let stack = Stack::start(options).await?;
    let outcome = async {
        wait_for("the first writes", Duration::from_secs(60), Duration::from_millis(100), || async {
            let n = stack.written_ids().await?.len();
            Ok(if n >= 100 { Ok(()) } else { Err(format!("{n} written")) })
        })
        .await?;
        stack.target_faults(&json!({"auth_failure_secs": 60})).await?;
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        let why = wait_for(
            "/readyz to say unauthorized",
            Duration::from_secs(30),
            Duration::from_millis(200),
            || async move {
                let answer = reqwest::get(format!("http://{writer}/readyz")).await?;
                let status = answer.status().as_u16();
                let body = answer.text().await?;
                Ok(if status == 503 && body.contains("http_401") { Ok(body) } else { Err(format!("{status} {body}")) })
            },
        )
        .await?;
        anyhow::ensure!(why.contains("TARGET_AUTH_HEADER"), "it says what to do: {why}");
        anyhow::ensure!(metric(writer, "orderflow_write_target_unauthorized", None).await? == 1.0);
        anyhow::ensure!(metric(writer, "orderflow_write_breaker_state", None).await? >= 1.0, "the breaker is open");
        let synced = wait_synced(&stack, Duration::from_secs(240)).await?;
        anyhow::ensure!(dead_count(&ns, Stage::Writer).await? == 0, "no dead letters after a 401 window");
        anyhow::ensure!(readyz(writer).await == 200, "ready again");
        anyhow::ensure!(metric(writer, "orderflow_write_target_unauthorized", None).await? == 0.0);
        let parked = metric(writer, "orderflow_write_parked_total", None).await?;
        anyhow::ensure!(parked > 0.0, "records held past HOLD_LIMIT were parked");
        let refusals = stack.target_stats().await?["stats"]["auth_refusals"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            refusals < 500,
            "the writer did not hammer a target that refuses it: {refusals} refused writes"
        );
        eprintln!("401 window: {} written, {refusals} writes refused, {parked} parked", synced.written_confirmed);
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// A retry tier that refuses publishes (a length cap on it, as an operator may set) is
/// backpressure: the writer holds the record and publishes it again with backoff instead of
/// ending its broker session (before the settlement change, the refused publish ended the session
/// and every record in flight went back to the queue, a step toward its delivery limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_tier_that_refuses_publishes_holds_records_without_reconnecting() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("w-refused-tier");
    let pattern = format!("^{}\\.writer\\.retry\\.", ns.replace('.', "\\."));
    let name = format!("{ns}-retry-cap");
    let cap = Policy::set(name.clone(), &pattern, r#"{"max-length":0}"#)?;
    let mut options = pipeline(&ns, &broker_url().await, 400);
    options.target_args = ["--fail-ids", "*3"].map(String::from).to_vec();
    let stack = Stack::start(options).await?;
    let outcome = async {
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        // (The code before the settlement change has no publish-retries metric; it reconnects.)
        wait_for("the broker to refuse a retry", Duration::from_secs(90), Duration::from_millis(200), || async {
            let refused = metric(writer, "orderflow_write_publish_retries_total", None).await.unwrap_or(0.0);
            let reconnects = metric(writer, "orderflow_broker_reconnects_total", None).await?;
            Ok(if refused + reconnects > 0.0 { Ok(()) } else { Err("no retry publish refused yet".to_string()) })
        })
        .await?;
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            let reconnects = metric(writer, "orderflow_broker_reconnects_total", None).await?;
            anyhow::ensure!(reconnects == 0.0, "the refused retry publish ended the broker session ({reconnects})");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The cap is raised (on RabbitMQ 3.10 clearing it can leave refused publishers refused):
        // the held records go through their tiers and, always failing, end exhausted.
        let _raised = Policy::set(name.clone(), &pattern, r#"{"max-length":10000000}"#)?;
        let confirmed = stack.confirmed_ids().await?;
        let failing = confirmed.iter().filter(|id| id.ends_with('3')).count();
        let dead = take(
            &broker_args(&ns).await,
            &Topology::new(ns.clone()).dead_queue(Stage::Writer),
            failing,
            Duration::from_secs(180),
        )
        .await?;
        assert!(dead.iter().all(|d| d.header(header::REASON).as_deref() == Some("exhausted")));
        let written = stack.written_ids().await?;
        assert_eq!(written.len(), confirmed.len() - failing, "every other record is written");
        let reconnects = metric(writer, "orderflow_broker_reconnects_total", None).await?;
        anyhow::ensure!(reconnects == 0.0, "{reconnects} reconnects");
        anyhow::Ok(())
    }
    .await;
    drop(cap);
    teardown(stack).await;
    outcome
}
