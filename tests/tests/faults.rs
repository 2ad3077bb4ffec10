//! The fault suite's short profile (`orderflow fault-suite`), one test per scenario: each runs the
//! whole pipeline (2 accounts, 2 replicas of every stage) against the real broker and both
//! simulators while its faults are injected, and fails when a Confirmed order is missing from the
//! target, a work queue does not drain, a dead letter has no reason, or an injected bad message
//! was not dead-lettered.

use orderflow_cli::faults::{Profile, run_scenario};
use orderflow_tests::*;

async fn scenario(n: u8) {
    let _guard = heavy().await;
    let url = broker_url().await;
    let mut profile = Profile::short();
    profile.rabbitmqctl = rabbitmqctl_command();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(1);
    let bin_dir = orderflow_cli::stack::default_bin_dir();
    let result = run_scenario(n, &profile, &url, &bin_dir, seed)
        .await
        .unwrap_or_else(|e| panic!("scenario {n} could not run: {e:#}"));
    eprintln!("{}", orderflow_cli::faults::table(std::slice::from_ref(&result)));
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
    let bin_dir = orderflow_cli::stack::default_bin_dir();
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
