//! How many page requests per second jst-sim serves with limits lifted (50 orders per page):
//!   cargo run --release -p jst-sim --example sim_bench [-- SECONDS CONCURRENCY ORDERS]
//! Clients run in the same process (signing, HTTP, reading the whole body), so the figure is a
//! lower bound for the server.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::json;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let orders: String = args.next().unwrap_or_else(|| "20000".into());
    let sim = common::start(&["--orders", &orders, "--rate-per-sec", "0", "--rate-per-min", "0"]).await;
    let client = common::Client::demo(&sim.url);
    let max_ts = sim.sim.lock(0).merchant.max_ts();
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (client, done, bytes, failures) = (client.clone(), done.clone(), bytes.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = orderflow_shared::rng::Rng::new(worker as u64);
            while Instant::now() < deadline {
                let start_ts = 1_000_000 + rng.below((max_ts - 1_000_000 - 60).max(1) as u64) as i64;
                let body = client.form(
                    &json!({"start_ts": start_ts, "is_get_total": false, "page_index": 1, "page_size": 50}),
                    &common::Tweak::default(),
                );
                let sent = client
                    .http
                    .post(format!("{}/open/orders/out/simple/query", client.base))
                    .header("content-type", "application/x-www-form-urlencoded;charset=UTF-8")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(b) if b.starts_with(br#"{"code":0"#) => {
                            bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!("jst-sim, limits lifted: {concurrency} concurrent clients for {secs:.1} s over {orders} orders");
    println!(
        "  page requests/s:  {:.0}  (50 orders each; {} failed)",
        n as f64 / secs,
        failures.load(Ordering::Relaxed)
    );
    println!("  orders/s served:  {:.0}", 50.0 * n as f64 / secs);
    println!("  MB/s:             {:.1}", bytes.load(Ordering::Relaxed) as f64 / secs / 1e6);
}
