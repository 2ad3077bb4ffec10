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
    let (tasks, ledgers) = stage_ledgers(&client, &topology, &["transformer", "writer"], &shutdown).await?;
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
    assert!(!readiness.details().contains_key("ledger"), "the failure is cleared once it appends again");
    stage.stop().await;
    let (seen, _) = read_all(&client, &topology, since).await?;
    let ids: Vec<u32> = seen.iter().map(|(_, id)| id.parse().expect("an id")).collect();
    assert_eq!(ids, (0..2000).collect::<Vec<_>>(), "every event once, in order");
    client.delete_namespace(&topology, &[]).await?;
    client.close().await;
    Ok(())
}

/// A ledger (replica `r1`) for each of `stages`, appending through its own publisher on
/// `client`'s connection until `shutdown`: the tasks and the handles to record on.
async fn stage_ledgers(
    client: &Client,
    topology: &Topology,
    stages: &[&str],
    shutdown: &CancellationToken,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<()>>, Vec<Ledger>)> {
    let (mut tasks, mut ledgers) = (Vec::new(), Vec::new());
    for stage in stages {
        let options = Options::new(*stage, "r1");
        let (ledger, drain) = Ledger::new(&options, dropped());
        let sink = StreamSink::new(Publisher::open(client.connection()).await?, topology);
        tasks.push(tokio::spawn(run(drain, sink, options, shutdown.clone())));
        ledgers.push(ledger);
    }
    Ok((tasks, ledgers))
}

/// Runs one ledger task per stage on `client`'s connection, records `events` of each order of
/// `orders` (o_id = the number, so_id = `SO-<n>`) and waits until every batch is appended.
async fn append_orders(client: &Client, topology: &Topology, orders: std::ops::Range<u32>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (tasks, ledgers) = stage_ledgers(client, topology, &["fetcher", "transformer", "writer"], &shutdown).await?;
    for n in orders {
        let event = |what| {
            Event::new(what, "m1", format!("m1:{n}:1")).order(Some(n.to_string()), Some(format!("SO-{n}")), None)
        };
        ledgers[0].record(event(What::Fetched { page: n / 50 + 1, cursor: "ts:0".into() }));
        ledgers[1].record(event(What::Transformed));
        ledgers[2].record(event(written()));
    }
    for ledger in &ledgers {
        anyhow::ensure!(ledger.flush(Duration::from_secs(60)).await, "appended");
        anyhow::ensure!(ledger.dropped_count() == 0, "nothing dropped");
    }
    shutdown.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task).await??;
    }
    Ok(())
}

/// Which stage recorded what, by stage (the three stages append side by side, in no set order).
fn kinds(events: &[orderflow_shared::amqp::ledger_index::Located]) -> Vec<(String, &'static str)> {
    let mut kinds: Vec<_> = events.iter().map(|(stage, _, e)| (stage.clone(), e.kind())).collect();
    kinds.sort();
    kinds
}

/// `orderflow trace`'s read: the index (`<ns>.ledger.index`, one small entry per batch, appended
/// before the batch) names the batches that hold an order, and the ledger is read only around
/// them — a fraction of what reading the window costs, with the same events. Where the index
/// cannot answer (it starts after the ledger: stages older than it wrote the start of the window;
/// or it is gone) the whole window is read instead, and the answer says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_found_through_the_index_reading_a_fraction_of_the_ledger() -> anyhow::Result<()> {
    use orderflow_shared::amqp::ledger_index::find;
    let _heavy = heavy().await;
    let ns = unique_ns("ledger-index");
    let broker = broker_args(&ns).await;
    let client = Client::connect(&broker, "test").await?;
    let topology = Topology::new(ns.clone());
    declare(client.connection(), &topology).await?;
    let now = orderflow_shared::messages::now_ms() / 1000;

    // A batch a stage older than the index appended an hour ago (its id carries its time).
    let old = orderflow_shared::ledger::Batch {
        schema: orderflow_shared::ledger::LEDGER_SCHEMA.into(),
        stage: "writer".into(),
        replica: "old".into(),
        events: vec![Event::new(written(), "m1", "m1:old:1").order(Some("old-1".into()), None, None)],
    };
    let publisher = Publisher::open(client.connection()).await?;
    let old_id = format!("ledger:old:{}:1", (now - 3600) * 1000);
    let properties = json_properties(&old_id, Default::default());
    publisher.publish(&topology.ledger_exchange(), "", &serde_json::to_vec(&old)?, properties).await?;

    // 20,000 orders, then (7 s later, so a seek from a little before it skips them) order 99999.
    let since = now - 1;
    append_orders(&client, &topology, 0..20_000).await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    append_orders(&client, &topology, 99_999..100_000).await?;

    let (all, _) = read_all(&client, &topology, since).await?;
    assert_eq!(all.len(), 3 * 20_001 + 1, "three events per order, and the old one");
    let whole = read(client.connection(), &topology, since, |_| None, |_| {}).await?;

    for id in ["99999", "SO-99999", "12345"] {
        let (events, found) = find(client.connection(), &topology, since, id).await?;
        assert_eq!(found.how, "index", "{id}: {found:?}");
        assert_eq!(
            kinds(&events),
            [("fetcher".into(), "fetched"), ("transformer".into(), "transformed"), ("writer".into(), "written")],
            "{id}"
        );
        assert!(events.iter().all(|(_, _, e)| e.is_of(id)), "only the order's own events");
        assert_eq!((found.sought, found.found), (3, 3), "{id}: {found:?}");
        if id != "12345" {
            let read = found.index.bytes + found.ledger.bytes;
            assert!(read * 10 < whole.bytes, "{id}: {read} bytes read of a {} byte window: {found:?}", whole.bytes);
        }
    }
    let (none, found) = find(client.connection(), &topology, since, "no-such-order").await?;
    assert!(none.is_empty() && found.how == "index" && found.sought == 0, "{found:?}");

    // An entry whose batch was never stored (its append failed and was tried again under another
    // id: the replica's next batch follows) is counted, not sought again, and not a reason to scan.
    let now_ms = orderflow_shared::messages::now_ms();
    let orphan = format!("ledger:r9:{now_ms}:1");
    append_raw(&publisher, &topology, &orphan, Some("orphan-1"), None).await?;
    let next = format!("ledger:r9:{}:2", now_ms + 1);
    append_raw(&publisher, &topology, &next, Some("orphan-2"), Some(&batch_of("orphan-2"))).await?;
    let (events, found) = find(client.connection(), &topology, now - 60, "orphan-1").await?;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!((found.how, found.sought, found.found, found.superseded), ("index", 1, 0, 1), "{found:?}");

    // A stage older than the index (mid-upgrade) appends near an indexed batch of the same order:
    // the seek meets a batch the index does not name, and the whole window is read.
    append_raw(
        &publisher,
        &topology,
        &format!("ledger:new:{}:1", now_ms + 2),
        Some("mixed-1"),
        Some(&batch_of("mixed-1")),
    )
    .await?;
    let unindexed = format!("ledger:old:{}:3", now_ms + 3);
    publisher
        .publish(&topology.ledger_exchange(), "", &batch_of("mixed-1"), json_properties(&unindexed, Default::default()))
        .await?;
    let (events, found) = find(client.connection(), &topology, now - 60, "mixed-1").await?;
    assert_eq!(found.how, "scan", "{found:?}");
    assert!(found.why.as_deref().unwrap_or("").contains("does not name"), "{found:?}");
    assert_eq!(events.len(), 2, "both batches' events: {events:?}");

    // A window that reaches back before the index began: the whole window is read.
    let (events, found) = find(client.connection(), &topology, now - 7200, "old-1").await?;
    assert_eq!(found.how, "scan", "{found:?}");
    assert!(found.why.as_deref().unwrap_or("").contains("starts later"), "{found:?}");
    assert_eq!(kinds(&events), [("writer".into(), "written")]);
    let (events, found) = find(client.connection(), &topology, now - 7200, "99999").await?;
    assert_eq!((found.how, events.len()), ("scan", 3), "{found:?}");

    // No index at all (deleted, or never declared by older stages): the same answer from a scan.
    let channel = client.connection().create_channel().await?;
    channel.queue_delete(topology.ledger_index_stream().as_str().into(), Default::default()).await?;
    channel.close(200, "deleted".into()).await?;
    let (events, found) = find(client.connection(), &topology, since, "SO-99999").await?;
    assert_eq!(found.how, "scan", "{found:?}");
    assert!(found.why.as_deref().unwrap_or("").contains("no index"), "{found:?}");
    assert_eq!(events.len(), 3);

    client.delete_namespace(&topology, &[]).await?;
    assert!(queue_state_of(&client, &topology.ledger_stream()).await?.is_none());
    client.close().await;
    Ok(())
}

/// A writer's batch with one `written` event of order `o_id`.
fn batch_of(o_id: &str) -> Vec<u8> {
    let batch = orderflow_shared::ledger::Batch {
        schema: orderflow_shared::ledger::LEDGER_SCHEMA.into(),
        stage: "writer".into(),
        replica: "raw".into(),
        events: vec![Event::new(written(), "m1", format!("m1:{o_id}:1")).order(Some(o_id.into()), None, None)],
    };
    serde_json::to_vec(&batch).expect("a batch")
}

/// Appends by hand what a stage's sink appends: the index entry of batch `id` naming `o_id`,
/// then (unless `None`: an append that failed after its entry) the batch.
async fn append_raw(
    publisher: &Publisher,
    topology: &Topology,
    id: &str,
    o_id: Option<&str>,
    body: Option<&[u8]>,
) -> anyhow::Result<()> {
    use orderflow_shared::ledger_index::{Entry, key};
    let keys: Vec<u32> = o_id.map(key).into_iter().collect();
    let entry = serde_json::to_vec(&Entry::new(id, orderflow_shared::messages::now_ms(), &keys))?;
    let properties = json_properties(&format!("index:{id}"), Default::default());
    publisher.publish(&topology.ledger_index_exchange(), "", &entry, properties).await?;
    if let Some(body) = body {
        publisher.publish(&topology.ledger_exchange(), "", body, json_properties(id, Default::default())).await?;
    }
    Ok(())
}
