//! Fills a namespace's ledger the way the stages do — one batch of 500 events per stage at a
//! time, each appended with its index entry through the stages' own sink — with made-up orders
//! shaped like real ones, until the ledger holds a given size. `bench ledger --fill` uses it to
//! put `orderflow trace` in front of a full ledger: a day at the bench's rate (about 8,000
//! orders/s, some 2 KB of ledger each) is far more than the default `LEDGER_MAX_BYTES` keeps, so
//! the ledger a trace reads after a day is the capped one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use orderflow_shared::{
    amqp::{Publisher, Topology, ledger::StreamSink, ops::Client},
    ledger::{Batch, Encoded, Event, LEDGER_SCHEMA, Sink, What},
    settings::BrokerArgs,
};

/// What a fill appended.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Filled {
    pub orders: u64,
    pub ledger_bytes: u64,
    pub index_bytes: u64,
    pub seconds: f64,
}

/// Orders numbered from here: far from the bench's own (jst-sim's start at 100,000,000).
const FIRST_ORDER: u64 = 900_000_000;

/// Appends batches to `namespace`'s ledger (and index) until the ledger bodies add up to `bytes`.
pub async fn fill(broker: &BrokerArgs, namespace: &str, bytes: u64) -> anyhow::Result<Filled> {
    let args = BrokerArgs { ns: namespace.to_string(), ..broker.clone() };
    let client = Client::connect(&args, "orderflow-bench-fill").await?;
    let topology = Topology::new(namespace.to_string());
    let started = Instant::now();
    let (ledger_bytes, index_bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    let per_stage = bytes / 3;
    for stage in ["fetcher", "transformer", "writer"] {
        let sink = StreamSink::new(Publisher::open(client.connection()).await?, &topology);
        let (ledger_bytes, index_bytes) = (ledger_bytes.clone(), index_bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut sink = Counted { sink, ledger: ledger_bytes, index: index_bytes, mine: 0 };
            let mut next = FIRST_ORDER;
            while sink.mine < per_stage {
                let events = (next..next + 500).map(|n| event(stage, n)).collect();
                next += 500;
                let batch = Batch { schema: LEDGER_SCHEMA.into(), stage: stage.into(), replica: "fill".into(), events };
                sink.append(&Encoded::of(&batch)?).await?;
            }
            anyhow::Ok(next - FIRST_ORDER)
        }));
    }
    let mut orders = 0;
    for task in tasks {
        orders = orders.max(task.await??);
    }
    client.close().await;
    Ok(Filled {
        orders,
        ledger_bytes: ledger_bytes.load(Ordering::Relaxed),
        index_bytes: index_bytes.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A sink that counts what goes through it.
struct Counted {
    sink: StreamSink,
    ledger: Arc<AtomicU64>,
    index: Arc<AtomicU64>,
    mine: u64,
}

impl Counted {
    async fn append(&mut self, batch: &Encoded) -> anyhow::Result<()> {
        self.sink.append(batch).await?;
        let entry = orderflow_shared::ledger_index::Entry::new("ledger:fill:0000000000000:0000000000", 0, &batch.keys);
        self.index.fetch_add(serde_json::to_vec(&entry)?.len() as u64, Ordering::Relaxed);
        self.ledger.fetch_add(batch.body.len() as u64, Ordering::Relaxed);
        self.mine += batch.body.len() as u64;
        Ok(())
    }
}

/// One stage's event of made-up order `n`, with the fields and sizes the stages write.
fn event(stage: &str, n: u64) -> Event {
    let what = match stage {
        "fetcher" => What::Fetched { page: (n % 40) as u32 + 1, cursor: format!("ts:{}", 1_000_000 + n / 50 * 50) },
        "transformer" => What::Transformed,
        _ => What::Written { attempt: 1, status: 200, duplicate: false },
    };
    let message_id = match stage {
        "fetcher" => format!("m1:page:ts:{}:{}", 1_000_000 + n / 50 * 50, n % 40 + 1),
        _ => format!("m1:{n}:{}", 1_000_000 + n),
    };
    Event::new(what, "m1", message_id)
        .order(Some(n.to_string()), Some(format!("SO{n:011}")), Some((n + 7_000_000_000).to_string()))
        .version(Some((1_000_000 + n).to_string()))
}
