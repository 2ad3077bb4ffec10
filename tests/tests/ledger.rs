//! The ledger stream against a real broker: stages' batches are appended with confirms to
//! `<ns>.ledger`, a stream, and read back from a point in time, in order, with messages that are
//! not ledger batches skipped; a stage's ledger follows the broker through a lost connection
//! without dropping what it recorded meanwhile; a stream declared with other retention is kept.

use std::time::Duration;

use orderflow_shared::{
    admin::Readiness,
    amqp::{
        Publisher,
        headers::json_properties,
        ledger::{StageLedger, StreamSink, declare, parse, read},
        ops::Client,
        topology::Topology,
    },
    ledger::{Event, Ledger, Options, What, run},
    settings::LedgerArgs,
};
use orderflow_tests::*;
use tokio_util::sync::CancellationToken;

fn dropped() -> prometheus::IntCounter {
    prometheus::IntCounter::new("orderflow_ledger_dropped_events_total", "test").expect("test value")
}

fn written() -> What {
    What::Written { attempt: 1, status: 200, duplicate: false }
}

/// Every (stage, o_id) the ledger holds since `since`, in stream order.
async fn read_all(client: &Client, topology: &Topology, since: i64) -> anyhow::Result<(Vec<(String, String)>, u64)> {
    let mut seen = Vec::new();
    let summary = read(client.connection(), topology, since, parse, |batch| {
        let (stage, _, events) = batch.known();
        assert!(events.len() <= 500, "batches are capped");
        seen.extend(events.into_iter().map(|e| (stage.clone(), e.o_id.unwrap_or_default())));
    })
    .await?;
    anyhow::ensure!(summary.complete, "the read reached its marker: {summary:?}");
    Ok((seen, summary.batches))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_appended_to_the_stream_and_read_back_in_order_from_a_time() -> anyhow::Result<()> {
    let ns = unique_ns("ledger");
    let broker = broker_args(&ns).await;
    let client = Client::connect(&broker, "test").await?;
    let topology = Topology::new(ns.clone());
    declare(client.connection(), &topology).await?;
    let since = orderflow_shared::messages::now_ms() / 1000 - 1;

    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut ledgers = Vec::new();
    for stage in ["transformer", "writer"] {
        let options = Options::new(stage, "r1");
        let (ledger, drain) = Ledger::new(&options, dropped());
        let sink = StreamSink::new(Publisher::open(client.connection()).await?, &topology);
        tasks.push(tokio::spawn(run(drain, sink, options, shutdown.clone())));
        ledgers.push(ledger);
    }
    for n in 0..1200u32 {
        let event = |what| Event::new(what, "m1", format!("rec-{n}")).order(Some(n.to_string()), None, None);
        ledgers[0].record(event(What::Transformed));
        ledgers[1].record(event(written()));
    }
    // Something else in the stream is skipped, not fatal.
    let publisher = Publisher::open(client.connection()).await?;
    let junk = json_properties("junk", Default::default());
    publisher.publish(&topology.ledger_exchange(), "", b"not a batch", junk).await?;
    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task).await??;
    }
    for ledger in &ledgers {
        assert_eq!((ledger.dropped_count(), ledger.failure()), (0, None));
    }

    let (seen, batches) = read_all(&client, &topology, since).await?;
    for stage in ["transformer", "writer"] {
        let ids: Vec<u32> = seen.iter().filter(|(s, _)| s == stage).map(|(_, id)| id.parse().expect("an id")).collect();
        assert_eq!(ids, (0..1200).collect::<Vec<_>>(), "{stage}: every event once, in order");
    }
    // A second read sees the same, and skips the first read's marker too; one from the future
    // reads from now (and still ends at its marker).
    let again = read(client.connection(), &topology, since, parse, |_| {}).await?;
    assert_eq!((again.complete, again.batches), (true, batches), "{again:?}");
    assert_eq!(again.other, 0, "markers and junk are not batches: {again:?}");
    assert_eq!(again.messages, batches + 2, "the junk and the first read's marker were read past: {again:?}");
    let future = orderflow_shared::messages::now_ms() / 1000 + 3600;
    let later =
        tokio::time::timeout(Duration::from_secs(60), read(client.connection(), &topology, future, parse, |_| {}))
            .await??;
    assert!(later.complete, "{later:?}");

    // Declared again with another retention (LEDGER_MAX_AGE changed): the stream is kept as it
    // is, and declaring does not fail.
    let changed = LedgerArgs { ledger_max_age: Duration::from_secs(60), ..LedgerArgs::default() };
    declare(client.connection(), &Topology::new(ns.clone()).with_ledger(&changed)).await?;
    let (kept, _) = read_all(&client, &topology, since).await?;
    assert_eq!(kept.len(), 2400, "the stream and its entries are still there");
    client.delete_namespace(&topology, &[]).await?;
    assert!(
        queue_state_of(&client, &topology.ledger_stream()).await?.is_none(),
        "the namespace's stream is deleted with it"
    );
    client.close().await;
    Ok(())
}

async fn queue_state_of(
    client: &Client,
    name: &str,
) -> anyhow::Result<Option<orderflow_shared::amqp::ops::QueueState>> {
    client.queue_state(name).await
}

/// A broker that closes the ledger's connection (a restart, a network cut, an operator) costs
/// nothing: the batches refused meanwhile are kept and appended once it reconnects, and `/readyz`
/// shows the failure in its details while it lasts. (Before, a refused batch was dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_ledger_keeps_what_it_recorded_through_a_lost_connection() -> anyhow::Result<()> {
    let _heavy = heavy().await;
    let ns = unique_ns("ledger-reconnect");
    let broker = broker_args(&ns).await;
    let client = Client::connect(&broker, "test").await?;
    let topology = Topology::new(ns.clone());
    let since = orderflow_shared::messages::now_ms() / 1000 - 1;
    let registry = prometheus::Registry::new();
    let readiness = Readiness::new();
    let name = format!("test-ledger-{ns}");
    let stage = StageLedger::start("writer", &LedgerArgs::default(), &broker, &name, &registry, &readiness);
    let ledger = stage.ledger.clone();
    let event = |n: u32| Event::new(written(), "m1", format!("rec-{n}")).order(Some(n.to_string()), None, None);
    for n in 0..1000 {
        ledger.record(event(n));
    }
    assert!(ledger.flush(Duration::from_secs(30)).await, "the first thousand appended");
    let closed =
        wait_for("the ledger's connection closed", Duration::from_secs(30), Duration::from_millis(500), || {
            let needle = format!("{name}/ledger");
            async move {
                Ok(match close_connections(&needle)? {
                    0 => Err("no such connection yet".to_string()),
                    n => Ok(n),
                })
            }
        })
        .await?;
    assert_eq!(closed, 1);
    for n in 1000..2000 {
        ledger.record(event(n));
        if n == 1000 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    assert!(ledger.flush(Duration::from_secs(60)).await, "the rest appended after reconnecting");
    assert_eq!(ledger.dropped_count(), 0, "nothing dropped");
    assert!(readiness.details().get("ledger").is_none(), "the failure is cleared once it appends again");
    stage.stop().await;
    let (seen, _) = read_all(&client, &topology, since).await?;
    let ids: Vec<u32> = seen.iter().map(|(_, id)| id.parse().expect("an id")).collect();
    assert_eq!(ids, (0..2000).collect::<Vec<_>>(), "every event once, in order");
    client.delete_namespace(&topology, &[]).await?;
    client.close().await;
    Ok(())
}
