//! The confirmed publisher against a real broker: when many tasks publish on one channel at once,
//! each publish gets its own confirm. The broker numbers publishes in the order they reach the
//! wire; lapin numbers them when `basic_publish` starts and queues the frames a moment later, so
//! two tasks racing on two threads could swap places on the wire and receive each other's
//! confirms: a publish the broker refused (a full queue) would then look confirmed, and the
//! stage would ack the input of a message that was never stored. Before the publisher kept the
//! two orders the same, this test saw 641 publishes "confirmed" into a queue that stored 63.

use std::{sync::Arc, time::Duration};

use lapin::{
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use orderflow_shared::amqp::{Publisher, headers::json_properties, ops::Client};
use orderflow_tests::*;

async fn declare(channel: &lapin::Channel, name: &str, max_length: Option<i64>) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if let Some(max) = max_length {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    }
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    channel.queue_declare(name.into(), options, args).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_one_channel_each_get_their_own_confirm() -> anyhow::Result<()> {
    let ns = unique_ns("confirms");
    let broker = broker_args(&ns).await;
    let connection = orderflow_shared::amqp::connect(&broker, "test").await?;
    let channel = connection.create_channel().await?;
    let (full, open) = (format!("{ns}.full"), format!("{ns}.open"));
    declare(&channel, &full, Some(10)).await?;
    declare(&channel, &open, None).await?;
    let publisher = Publisher::open(&connection).await?;
    let client = Client::connect(&broker, "test").await?;
    let outcome = async {
        let mut tasks = tokio::task::JoinSet::new();
        let big = Arc::new(vec![b'x'; 32 * 1024]);
        for i in 0..2000u32 {
            let (publisher, big) = (publisher.clone(), big.clone());
            // Small messages to a queue that refuses all but 10; large ones (their frames take
            // longer to build) to a queue that takes everything.
            let (queue, body) = if i % 2 == 0 { (full.clone(), b"small".to_vec()) } else { (open.clone(), big.to_vec()) };
            tasks.spawn(async move {
                let props = json_properties(&format!("m{i}"), FieldTable::default());
                let ok = publisher.publish("", &queue, &body, props).await.is_ok();
                (queue, ok)
            });
        }
        let (mut acked_full, mut acked_open) = (0u32, 0u32);
        while let Some(joined) = tasks.join_next().await {
            let (queue, ok) = joined?;
            if ok {
                if queue == full { acked_full += 1 } else { acked_open += 1 }
            }
        }
        let depth = |q: String| {
            let client = &client;
            async move { Ok::<u32, anyhow::Error>(client.queue_state(&q).await?.map_or(0, |s| s.messages)) }
        };
        let (in_full, in_open) = (depth(full.clone()).await?, depth(open.clone()).await?);
        eprintln!("confirmed: {acked_full} to the full queue (holds {in_full}), {acked_open} to the open one (holds {in_open})");
        anyhow::ensure!(acked_full == in_full, "{acked_full} publishes to the full queue confirmed, {in_full} stored");
        anyhow::ensure!(acked_open == in_open && in_open == 1000, "{acked_open} publishes to the open queue confirmed, {in_open} stored");
        anyhow::Ok(())
    }
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        for q in [&full, &open] {
            let _ = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        orderflow_shared::amqp::connect::close(&connection).await;
    })
    .await;
    outcome
}
