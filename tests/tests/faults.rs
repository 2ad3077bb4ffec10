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
