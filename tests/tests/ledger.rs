//! The ledger stream against a real broker (issue 17, first part): stages' batches are appended
//! with confirms to `<ns>.ledger`, a stream, and read back from a point in time, in order, with
//! messages that are not ledger batches skipped.

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use orderflow_shared::{
    amqp::{
        Publisher,
        headers::json_properties,
        ledger::{StreamSink, declare, read},
        topology::{Topology, ledger_stream},
    },
    ledger::{Event, Ledger, Options, What, run},
};
use orderflow_tests::*;
use tokio_util::sync::CancellationToken;

fn dropped() -> prometheus::IntCounter {
    prometheus::IntCounter::new("orderflow_ledger_dropped_events_total", "test").expect("test value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_appended_to_the_stream_and_read_back_in_order_from_a_time() -> anyhow::Result<()> {
    let ns = unique_ns("ledger");
    let broker = broker_args(&ns).await;
    let connection = orderflow_shared::amqp::connect(&broker, "test").await?;
    let channel = connection.create_channel().await?;
    let stream = Topology::new(ns.clone()).ledger_stream();
    declare(&channel, &ledger_stream(stream.clone(), Duration::from_secs(3600), 100 << 20)).await?;
    let since = orderflow_shared::messages::now_ms() / 1000 - 1;

    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut ledgers = Vec::new();
    for stage in ["transformer", "writer"] {
        let options = Options::new(stage, "r1");
        let (ledger, drain) = Ledger::new(&options, dropped());
        let sink = StreamSink::new(Publisher::open(&connection).await?, stream.clone());
        tasks.push(tokio::spawn(run(drain, sink, options, shutdown.clone())));
        ledgers.push(ledger);
    }
    for n in 0..1200u32 {
        let event = |what| Event::new(what, "m1", format!("rec-{n}")).order(Some(n.to_string()), None, None);
        ledgers[0].record(event(What::Transformed));
        ledgers[1].record(event(What::Written));
    }
    // Something else in the stream is skipped, not fatal.
    let publisher = Publisher::open(&connection).await?;
    publisher.publish("", &stream, b"not a batch", json_properties("junk", Default::default())).await?;
    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task).await??;
    }
    for ledger in &ledgers {
        assert_eq!((ledger.dropped_count(), ledger.failure()), (0, None));
    }

    let mut seen: Vec<(String, String)> = Vec::new();
    let mut batches = 0;
    let summary = read(&connection, &stream, since, |batch| {
        batches += 1;
        assert!(batch.events.len() <= 500, "batches are capped");
        seen.extend(batch.events.iter().map(|e| (batch.stage.clone(), e.o_id.clone().unwrap_or_default())));
    })
    .await?;
    assert!(summary.complete && summary.other == 1, "read to its own marker, the junk skipped: {summary:?}");
    assert_eq!(summary.batches, batches);
    for stage in ["transformer", "writer"] {
        let ids: Vec<u32> = seen.iter().filter(|(s, _)| s == stage).map(|(_, id)| id.parse().expect("an id")).collect();
        assert_eq!(ids, (0..1200).collect::<Vec<_>>(), "{stage}: every event once, in order");
    }
    // A second read sees the same, and skips the first read's marker too; one from the future
    // reads from now (and still ends at its marker).
    let again = read(&connection, &stream, since, |_| {}).await?;
    assert_eq!((again.complete, again.batches, again.other), (true, batches, 2), "{again:?}");
    let future = orderflow_shared::messages::now_ms() / 1000 + 3600;
    let later = tokio::time::timeout(Duration::from_secs(60), read(&connection, &stream, future, |_| {})).await??;
    assert!(later.complete, "{later:?}");
    channel.queue_delete(stream.as_str().into(), QueueDeleteOptions::default()).await?;
    Ok(())
}
