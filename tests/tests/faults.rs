//! The fault suite's short profile (`orderflow fault-suite`), one test per scenario: each runs the
//! whole pipeline (2 accounts, 2 replicas of every stage) against the real broker and both
//! simulators while its faults are injected, and fails when a Confirmed order is missing from the
//! target, a work queue does not drain, a dead letter has no reason, or an injected bad message
//! was not dead-lettered.

use orderflow_lab::faults::{Profile, run_scenario};
use orderflow_shared::amqp::ops::Client;
use orderflow_tests::*;

async fn scenario(n: u8) {
    let _guard = heavy().await;
    let url = broker_url().await;
    let mut profile = Profile::short();
    profile.rabbitmqctl = rabbitmqctl_command();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
    let bin_dir = orderflow_lab::stack::default_bin_dir();
    let result = run_scenario(n, &profile, &url, &bin_dir, seed)
        .await
        .unwrap_or_else(|e| panic!("scenario {n} could not run: {e:#}"));
    eprintln!("{}", orderflow_lab::faults::table(std::slice::from_ref(&result)));
    for note in &result.notes {
        eprintln!("scenario {n}: {note}");
    }
    assert!(result.crashes.is_empty(), "scenario {n}: stages exited on their own: {:#?}", result.crashes);
    assert!(result.orders > 0, "scenario {n}: the source confirmed no orders: {result:#?}");
    assert_eq!(result.lost, 0, "scenario {n}: Confirmed orders missing from the target: {result:#?}");
    assert!(result.queues_drained, "scenario {n}: work queues did not drain: {result:#?}");
    assert_eq!(result.dead_letters_without_reason, 0, "scenario {n}: dead letters without a reason: {result:#?}");
    assert!(
        result.dead_lettered >= result.injected_bad,
        "scenario {n}: {} bad messages injected, only {} dead-lettered: {result:#?}",
        result.injected_bad,
        result.dead_lettered
    );
    assert!(result.audit.agrees(), "scenario {n}: the audit disagrees with the oracle: {:#?}", result.audit);
    assert!(result.passed, "scenario {n} failed: {result:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_1_source_churn_and_late_commits() {
    scenario(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_2_source_storms_and_token_expiry() {
    scenario(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_3_target_errors_and_outage() {
    scenario(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_4_kill_9_of_random_replicas() {
    scenario(4).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_5_broker_connections_closed_and_restart() {
    scenario(5).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_6_malformed_oversized_unknown_schema() {
    scenario(6).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn scenario_7_all_at_once() {
    scenario(7).await;
}

/// A memory alarm and a disk alarm (each stage that publishes shows `broker_blocked` and resumes
/// within 30 s of the alarm clearing), then a 2-minute target outage under a 60 s broker ack
/// timeout: no broker session ends, nothing is dead-lettered, nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn scenario_8_broker_alarms_and_a_short_ack_timeout() {
    scenario(8).await;
}

async fn depth(client: &Client, queue: &str) -> anyhow::Result<u32> {
    Ok(client.queue_state(queue).await?.map_or(0, |q| q.messages))
}

/// RabbitMQ blocks a connection that publishes while a memory alarm lasts and stops reading from
/// it; a writer that acked on the connection it published dead letters on stopped acking, so it
/// stopped writing, until the alarm cleared. With records queued and a target that rejects one
/// record in a thousand (each rejection a dead-letter publish the alarm holds), the records queue
/// must keep draining through a 60 s alarm, and the writer must say it is blocked.
#[tokio::test(flavor = "multi_thread")]
async fn writers_keep_writing_and_acking_through_a_memory_alarm() -> anyhow::Result<()> {
    use orderflow_lab::alarms::{Alarm, Resource};
    use std::time::Duration;
    let _guard = heavy().await;
    let url = broker_url().await;
    let ns = unique_ns("alarm");
    let mut options = StackOptions::new(&url, &ns, &log_dir(&ns));
    options.orders = 12000;
    options.writers = 0;
    // 4 writes in flight at 40 ms: about 100 records a second, far slower than the backlog.
    options.target_args =
        ["--latency-ms", "40", "--latency-max-ms", "40", "--reject-ids", "*777"].map(String::from).to_vec();
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into()), ("WRITER_CONCURRENCY".into(), "4".into())];
    let mut stack = Stack::start(options).await?;
    let client = Client::connect(&broker_args(&ns).await, "test").await?;
    let records = stack.options.stage_topology().records_queue();
    let ctl = rabbitmqctl_command();
    let outcome = async {
        wait_for("a backlog of records", Duration::from_secs(180), Duration::from_millis(500), || async {
            let n = depth(&client, &records).await?;
            Ok(if n >= 7000 { Ok(()) } else { Err(format!("{n} records queued")) })
        })
        .await?;
        stack.spawn_stage(Role::Writer, 0).await?;
        let writer = stack.replicas(Role::Writer)[0].admin.expect("admin");
        wait_for("the writer's first dead letter", Duration::from_secs(60), Duration::from_millis(200), || async {
            let n = metric(writer, "orderflow_dead_letters_total", None).await?;
            Ok(if n >= 1.0 { Ok(()) } else { Err("none yet".to_string()) })
        })
        .await?;
        let alarm = Alarm::raise(&ctl, Resource::Memory).await?;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let early = depth(&client, &records).await?;
        let (mut blocked_seen, end) = (false, tokio::time::Instant::now() + Duration::from_secs(50));
        while tokio::time::Instant::now() < end {
            let body: serde_json::Value =
                stack.http().get(format!("http://{writer}/readyz")).send().await?.json().await?;
            blocked_seen |= body["checks"]["broker_blocked"].as_str().is_some_and(|c| c.contains("blocks publishing"));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let late = depth(&client, &records).await?;
        let gauge = metric(writer, "orderflow_broker_blocked", None).await?;
        alarm.clear().await?;
        eprintln!("records queued 5 s into the alarm: {early}; 55 s in: {late}; writer blocked gauge {gauge}");
        anyhow::ensure!(
            early.saturating_sub(late) >= 3000,
            "the records queue must keep draining through the alarm: {early} → {late} in 50 s"
        );
        anyhow::ensure!(
            blocked_seen && gauge == 1.0,
            "the writer shows it is blocked (readyz {blocked_seen}, gauge {gauge})"
        );
        wait_for("the writer unblocked and ready", Duration::from_secs(30), Duration::from_millis(250), || async {
            Ok(if readyz(writer).await == 200 { Ok(()) } else { Err("not ready".to_string()) })
        })
        .await?;
        wait_for("every record written or rejected", Duration::from_secs(240), Duration::from_secs(1), || async {
            let confirmed = stack.confirmed_ids().await?;
            let written = stack.written_ids().await?;
            let missing: Vec<&String> =
                confirmed.iter().filter(|id| !written.contains(*id) && !id.ends_with("777")).collect();
            Ok(if missing.is_empty() { Ok(()) } else { Err(format!("{} not written yet", missing.len())) })
        })
        .await?;
        anyhow::Ok(())
    }
    .await;
    client.close().await;
    teardown(stack).await;
    outcome
}

/// Pids of running processes of this binary (by `/proc/<pid>/exe`).
fn pids_of(binary: &std::path::Path) -> Vec<u32> {
    let want = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == want))
        .collect()
}

/// A stage that exits on its own is a failure even though the suite restarts it: here a
/// transformer is aborted from outside the suite (as a panic with abort, or a fatal error, would end
/// it) while scenario 1 runs, and the suite must fail the run naming the stage and its log.
#[tokio::test(flavor = "multi_thread")]
async fn the_suite_fails_a_run_in_which_a_stage_exits_on_its_own() {
    let _guard = heavy().await;
    let url = broker_url().await;
    // A small run: the point is the crash, not the load.
    let mut profile = Profile { orders: 1500, fault_secs: 8, ..Profile::short() };
    profile.rabbitmqctl = rabbitmqctl_command();
    let bin_dir = orderflow_lab::stack::default_bin_dir();
    let transformer = bin_dir.join("transformer");
    let run = tokio::spawn({
        let bin_dir = bin_dir.clone();
        async move { run_scenario(1, &profile, &url, &bin_dir, 7).await }
    });
    let pid = wait_for(
        "a transformer of the suite",
        std::time::Duration::from_secs(120),
        std::time::Duration::from_millis(200),
        || {
            let pids = pids_of(&transformer);
            async move { Ok(pids.first().copied().ok_or_else(|| "none running yet".to_string())) }
        },
    )
    .await
    .expect("the suite starts transformers");
    // The suite reads a replica's start line before it goes on: give it those few seconds (an exit
    // before that is a start failure, reported differently), then abort it as a panic would.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let status = std::process::Command::new("kill").args(["-ABRT", &pid.to_string()]).status().expect("kill");
    assert!(status.success(), "sent SIGABRT to transformer {pid}");
    let result = run.await.expect("joins").expect("scenario 1 runs");
    assert!(!result.passed, "a run with a crash must fail: {result:#?}");
    assert!(
        result.crashes.iter().any(|c| c.contains("transformer") && c.contains(".log")),
        "the crash names the stage and its log: {:#?}",
        result.crashes
    );
    assert_eq!(result.lost, 0, "the restarted replica still saw the run through: {result:#?}");
}

/// A records queue that refuses publishes (full: `max-length` with `reject-publish`) makes the
/// transformer hold its pages. Held past the broker's ack timeout, the broker closed the channel
/// and redelivered them, each time a step toward the delivery limit; held past `HOLD_LIMIT`
/// (below that timeout) a page is parked at the back of the pages queue instead. With the broker's
/// `consumer_timeout` at 15 s and a full records queue for 45 s: no broker session of the
/// transformer ends, pages are parked, and once the queue drains every order is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_records_queue_parks_pages_instead_of_outliving_the_ack_timeout() -> anyhow::Result<()> {
    use orderflow_lab::alarms::ConsumerTimeout;
    use std::time::Duration;
    let _guard = heavy().await;
    let url = broker_url().await;
    let ns = unique_ns("full");
    let ack_timeout = ConsumerTimeout::set(&rabbitmqctl_command(), Duration::from_secs(15))?;
    let records = format!("{ns}.records");
    let max_length = |n: u64| {
        let pattern = format!("^{}$", records.replace('.', "\\."));
        let definition = format!(r#"{{"max-length":{n}}}"#);
        rabbitmqctl(&["set_policy", "--apply-to", "queues", "--priority", "10", &ns, &pattern, &definition])
    };
    max_length(50)?;
    let _policy = Policy(ns.clone());
    let mut options = StackOptions::new(&url, &ns, &log_dir(&ns));
    options.orders = 1500;
    options.writers = 0;
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into()), ("HOLD_LIMIT".into(), "5s".into())];
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let transformer = stack.replicas(Role::Transformer)[0].admin.expect("admin");
        wait_for("a page parked", Duration::from_secs(60), Duration::from_millis(500), || async {
            let n = metric(transformer, "orderflow_transform_parked_total", None).await?;
            Ok(if n >= 1.0 { Ok(()) } else { Err("none yet".to_string()) })
        })
        .await?;
        // Well past the ack timeout: the broker checks it every 3 s here (see ConsumerTimeout).
        tokio::time::sleep(Duration::from_secs(45)).await;
        let reconnects = metric(transformer, "orderflow_broker_reconnects_total", None).await?;
        let parked = metric(transformer, "orderflow_transform_parked_total", None).await?;
        eprintln!("pages parked: {parked}; transformer reconnects: {reconnects}");
        anyhow::ensure!(reconnects == 0.0, "the broker closed the transformer's channel {reconnects} times");
        // RabbitMQ 3.10 keeps a quorum queue's max-length after its policy is cleared: raise it.
        max_length(10_000_000)?;
        stack.spawn_stage(Role::Writer, 0).await?;
        wait_synced(&stack, Duration::from_secs(180)).await?;
        let client = Client::connect(&broker_args(&ns).await, "test").await?;
        let dead = depth(&client, &format!("{ns}.transformer.dead")).await;
        client.close().await;
        let dead = dead?;
        anyhow::ensure!(dead == 0, "{dead} pages dead-lettered");
        anyhow::Ok(())
    }
    .await;
    drop(ack_timeout);
    teardown(stack).await;
    outcome
}

/// A connection the broker blocks (a resource alarm: it stops reading the socket) never answers
/// a close, and lapin 4.12 can leave a close unanswered after its socket went: every close of
/// ours waits at most `CLOSE_TIMEOUT` (5 s). Before that bound, `Client::close` here waited until
/// the alarm cleared, and the bench's raw relay once waited for ever (a CI run killed at 90 min).
#[tokio::test(flavor = "multi_thread")]
async fn closing_a_connection_the_broker_blocks_returns_within_the_close_timeout() -> anyhow::Result<()> {
    use orderflow_lab::alarms::{Alarm, Resource};
    use orderflow_shared::amqp::{Publisher, connect::CLOSE_TIMEOUT, headers::json_properties};
    use std::time::{Duration, Instant};
    let _guard = heavy().await;
    let ns = unique_ns("close");
    let broker = broker_args(&ns).await;
    let client = Client::connect(&broker, "test-blocked").await?;
    let publisher = Publisher::open(client.connection()).await?;
    let alarm = Alarm::raise(&rabbitmqctl_command(), Resource::Memory).await?;
    // A publish makes the broker block the connection (it stops reading it).
    let held = publisher.send("", &format!("{ns}.nowhere"), b"x", json_properties("x", Default::default())).await;
    wait_for("the broker to block the connection", Duration::from_secs(30), Duration::from_millis(100), || async {
        Ok(if client.connection().status().blocked() { Ok(()) } else { Err("not blocked yet".to_string()) })
    })
    .await?;
    let started = Instant::now();
    client.close().await;
    let took = started.elapsed();
    alarm.clear().await?;
    drop(held);
    assert!(took < CLOSE_TIMEOUT + Duration::from_secs(3), "close took {took:?} on a blocked connection");
    Ok(())
}
