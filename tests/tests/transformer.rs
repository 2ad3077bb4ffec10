//! The transformer against a real broker: records go out confirmed, an invalid order is
//! dead-lettered with a reason naming the field and value while the rest of its page goes
//! through, poison pages are dead-lettered with their reason; and `check-mapping` works offline.

use std::{process::Command, time::Duration};

use clap::Parser;
use orderflow_shared::{
    amqp::{Stage, Topology, ops::Client, topology::PAGE_ROUTING_KEY},
    messages::header,
};
use orderflow_tests::*;
use serde_json::json;

fn order(o_id: i64, io_date: &str) -> serde_json::Value {
    json!({"o_id": o_id, "ts": 1000 + o_id, "io_date": io_date, "receiver_name": "张三", "items": [{"sku_id": "A", "qty": 2, "sale_price": 50.25}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_order_is_dead_lettered_with_its_reason_and_the_rest_of_the_page_goes_through() -> anyhow::Result<()> {
    let ns = unique_ns("transformer");
    let broker = broker_args(&ns).await;
    let config = transformer::Config::parse_from([
        "transformer",
        "--ns",
        &ns,
        "--amqp-url",
        &broker.amqp_url,
        "--admin-addr",
        "127.0.0.1:0",
    ]);
    let (stop, handle) = spawn_service(|token| Box::pin(transformer::run(config, token)));
    let connection = orderflow_shared::amqp::connect(&broker, "test").await?;
    let topology = Topology::new(ns.clone());
    topology.declare(&connection.create_channel().await?).await?;

    let page = json!({"schema": "orderflow.page.v1", "account": "acme", "cursor": {}, "fetched_at": "2023-10-01T10:00:00+08:00",
        "orders": [order(1, "2023-10-01 10:00:00"), order(2, "31/12/2023"), order(3, "2023-10-02 08:00:00.250")]});
    publish(&connection, &topology.pages_exchange(), PAGE_ROUTING_KEY, "page-1", &serde_json::to_vec(&page)?).await?;
    publish(&connection, &topology.pages_exchange(), PAGE_ROUTING_KEY, "page-2", b"{not json").await?;
    publish(
        &connection,
        &topology.pages_exchange(),
        PAGE_ROUTING_KEY,
        "page-3",
        br#"{"schema":"orderflow.page.v7","orders":[]}"#,
    )
    .await?;

    let records = take(&broker, &topology.records_queue(), 2, Duration::from_secs(30)).await?;
    let mut ids: Vec<String> =
        records.iter().map(|r| r.json()["id"].as_str().unwrap_or_default().to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["1", "3"]);
    assert_eq!(records[0].properties.message_id().as_ref().map(|s| s.as_str().starts_with("acme:")), Some(true));
    assert!(records.iter().all(|r| r.header(header::TRACEPARENT).is_some()));

    let dead = take(&broker, &topology.dead_queue(Stage::Transformer), 3, Duration::from_secs(30)).await?;
    let by_reason = |reason: &str| dead.iter().find(|d| d.header(header::REASON).as_deref() == Some(reason)).cloned();
    let invalid = by_reason("invalid_record").expect("the bad order is dead-lettered");
    let error = invalid.header(header::ERROR).unwrap_or_default();
    assert!(error.contains("io_date") && error.contains("31/12/2023"), "{error}");
    assert_eq!(invalid.header(header::ERROR_CLASS).as_deref(), Some("permanent"));
    assert_eq!(invalid.header(header::ORIGIN_EXCHANGE), Some(topology.pages_exchange()));
    assert_eq!(invalid.json()["orders"][0]["o_id"], 2, "the dead letter is a one-order page");
    assert!(by_reason("poison_page").is_some_and(|d| d.body == b"{not json"));
    assert!(
        by_reason("unknown_schema")
            .is_some_and(|d| d.header(header::ERROR).unwrap_or_default().contains("orderflow.page.v7"))
    );

    stop.cancel();
    handle.await??;
    let client = Client::connect(&broker, "test").await?;
    client.delete_namespace(&topology, &[]).await?;
    client.close().await;
    Ok(())
}

fn transformer_bin() -> std::path::PathBuf {
    ensure_binaries();
    orderflow_lab::stack::default_bin_dir().join("transformer")
}

fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn check_mapping_prints_the_mapped_sample_without_a_broker() {
    let examples = repo("services/transformer/tests/data/seed-mapping-examples.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(examples).expect("fixture")).expect("json");
    let input = std::env::temp_dir().join(format!("check-mapping-input-{}.json", std::process::id()));
    std::fs::write(&input, fixture["examples"][0]["input"].to_string()).expect("write");
    let out = Command::new(transformer_bin())
        .args([
            "check-mapping",
            &repo("services/transformer/mappings/examples/rename-reformat-recompute.json"),
            "--input",
        ])
        .arg(&input)
        .env_remove("AMQP_URL")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["results"][0]["data"], fixture["examples"][0]["output"]);

    let out = Command::new(transformer_bin())
        .args(["check-mapping", &repo("services/transformer/mappings/jushuitan-default.json")])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("items_detail"));
}

#[test]
fn check_mapping_names_the_broken_rule() {
    let bad = std::env::temp_dir().join(format!("bad-mapping-{}.json", std::process::id()));
    std::fs::write(&bad, r#"{"fields": [{"to": "id", "from": "o_id"}, {"to": "amount", "sum": {"over": "items"}}]}"#)
        .expect("write");
    let out = Command::new(transformer_bin()).arg("check-mapping").arg(&bad).output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fields[1]") && err.contains("amount"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_records_queue_holds_pages_back_without_dead_letters_or_reconnects() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("backpressure");
    let topology = Topology::new(ns.clone());
    // An operator's length cap on the records queue; with nobody writing, it fills and the
    // broker refuses (nacks) further records (the queue's overflow is reject-publish).
    let policy = Policy(format!("{ns}-records-cap"));
    let pattern = format!("^{}$", topology.records_queue().replace('.', "\\."));
    rabbitmqctl(&["set_policy", "--apply-to", "queues", &policy.0, &pattern, r#"{"max-length":100}"#])?;
    let mut options = StackOptions::new(&broker_url().await, &ns, &log_dir(&ns));
    options.orders = 1500;
    options.writers = 0;
    options.env = vec![("FETCH_INTERVAL".into(), "1s".into())];
    let mut stack = Stack::start(options).await?;
    let outcome = async {
        let transformer = stack.replicas(Role::Transformer)[0].admin.expect("admin");
        let retries = || metric(transformer, "orderflow_transform_publish_retries_total", None);
        wait_for("the broker to refuse records", Duration::from_secs(60), Duration::from_millis(200), || async {
            let n = retries().await?;
            Ok(if n > 0.0 { Ok(()) } else { Err("no publish retried yet".to_string()) })
        })
        .await?;
        // Held back for 15 s, far longer than a few quick retries: the pages wait unacked in the
        // transformer; none is failed back to the broker (which would count towards its delivery
        // limit and end as a dead letter) and the session is not torn down.
        let client = Client::connect(&broker_args(&ns).await, "test").await?;
        let dead = topology.dead_queue(Stage::Transformer);
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            let reconnects = metric(transformer, "orderflow_broker_reconnects_total", None).await?;
            let dead_letters = client.queue_state(&dead).await?.map_or(0, |q| q.messages);
            anyhow::ensure!(
                (reconnects, dead_letters) == (0.0, 0),
                "while the records queue was full: {reconnects} reconnects, {dead_letters} dead letters"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let held = retries().await?;
        // A writer drains the queue: every Confirmed order is written.
        stack.spawn_stage(Role::Writer, 0).await?;
        let progress = wait_synced(&stack, Duration::from_secs(180)).await?;
        let reconnects = metric(transformer, "orderflow_broker_reconnects_total", None).await?;
        let dead_letters = client.queue_state(&dead).await?.map_or(0, |q| q.messages);
        client.close().await;
        anyhow::ensure!(
            (reconnects, dead_letters) == (0.0, 0),
            "after the queue drained: {reconnects} reconnects, {dead_letters} dead letters; {progress:?}"
        );
        anyhow::ensure!(held > 10.0, "only {held} retried publishes while the queue was full");
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}

/// Two merchants whose order ids overlap (jst-sim `--overlapping-ids`), one target: with record ids
/// that name the account, every order of both is written. (With the default `o_id` ids the
/// target's idCheck answers one merchant's order as the other's duplicate: the test's control
/// below shows that loss.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_merchants_with_overlapping_order_ids_into_one_target_lose_nothing_with_account_ids() -> anyhow::Result<()>
{
    let _heavy = heavy().await;
    let ns = unique_ns("t-overlap");
    let dir = log_dir(&ns);
    let default = transformer::mapping::DEFAULT_MAPPING;
    let mapping = default.replace(r#""record": {"id": "o_id""#, r#""record": {"id": "{account}:{o_id}""#).replace(
        r#"{"to": "id", "from": "o_id", "type": "string", "required": true}"#,
        r#"{"to": "id", "template": "{account}:{o_id}"}"#,
    );
    anyhow::ensure!(
        mapping != default && mapping.matches("{account}").count() == 2,
        "the shipped mapping changed shape"
    );
    let mapping_file = dir.join("mapping.json");
    std::fs::write(&mapping_file, mapping)?;
    let mut options = StackOptions::new(&broker_url().await, &ns, &dir);
    options.accounts = 2;
    options.orders = 1500;
    options.jst_args = vec!["--overlapping-ids".into()];
    options.env =
        vec![("FETCH_INTERVAL".into(), "1s".into()), ("MAPPING_FILE".into(), mapping_file.display().to_string())];
    let stack = Stack::start(options).await?;
    let outcome = async {
        let truth = truth_pairs(&stack).await?;
        let o_ids: std::collections::HashSet<i64> = truth.iter().map(|(_, id)| *id).collect();
        anyhow::ensure!(
            o_ids.len() < truth.len() * 3 / 4,
            "the merchants' ids overlap: {} ids for {} orders",
            o_ids.len(),
            truth.len()
        );
        let want: std::collections::HashSet<String> = truth.iter().map(|(a, id)| format!("{a}:{id}")).collect();
        wait_for(
            "every order of both merchants written",
            Duration::from_secs(180),
            Duration::from_millis(500),
            || async {
                let written = stack.written_ids().await?;
                let missing = want.difference(&written).count();
                Ok(if missing == 0 { Ok(()) } else { Err(format!("{missing} of {} not written", want.len())) })
            },
        )
        .await?;
        let stats = stack.target_stats().await?;
        eprintln!(
            "overlapping ids: {} orders of 2 merchants ({} distinct o_ids) all written; {} duplicates suppressed",
            want.len(),
            o_ids.len(),
            stats["stats"]["duplicates_suppressed"]
        );
        // The control: these orders under o_id alone would have been this many distinct target ids.
        anyhow::ensure!(
            o_ids.len() < want.len(),
            "with o_id alone {} of {} orders would be lost",
            want.len() - o_ids.len(),
            want.len()
        );
        anyhow::Ok(())
    }
    .await;
    teardown(stack).await;
    outcome
}
