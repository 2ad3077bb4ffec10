//! Micro-benchmark of the pure mapping on one core:
//!   cargo run --release -p transformer --example mapping_bench [-- ORDERS ROUNDS]
//! Orders are realistic jst-sim rows (items, masked receivers, millisecond datetimes). It reports
//! `apply` alone (orders already parsed) and the whole page step (parse + map + dedupe), per core.

use std::time::Instant;

use jiff::{SignedDuration, Timestamp};
use jst_sim::store::{Credentials, Merchant, Query};
use orderflow_shared::messages::PAGE_SCHEMA;
use serde_json::{Value, json};
use transformer::{mapping::Mapping, page::transform_page};

fn main() {
    let mut args = std::env::args().skip(1);
    let orders: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(30);
    let creds = Credentials::placeholder();
    let merchant = Merchant::seed("m1".into(), 0, creds, orders, 42, Timestamp::now(), SignedDuration::from_hours(72));
    let mut rows: Vec<Value> = Vec::with_capacity(orders as usize);
    let mut start_ts = 0;
    loop {
        let page =
            merchant.query(&Query { start_ts: Some(start_ts), page_index: 1, page_size: 50, ..Query::default() });
        if page.rows.is_empty() {
            break;
        }
        for row in &page.rows {
            let v: Value = serde_json::from_str(row).expect("row is JSON");
            start_ts = start_ts.max(v["ts"].as_i64().expect("ts"));
            rows.push(v);
        }
    }
    let mapping = match std::env::var("MAPPING_FILE") {
        Ok(path) => {
            Mapping::parse_str(&std::fs::read_to_string(&path).expect("mapping file")).expect("mapping compiles")
        }
        Err(_) => Mapping::default_jushuitan(),
    };

    let started = Instant::now();
    let mut mapped = 0usize;
    for _ in 0..rounds {
        for row in &rows {
            if mapping.apply(row, "acme").is_ok() {
                mapped += 1;
            }
        }
    }
    let apply_secs = started.elapsed().as_secs_f64();

    let pages: Vec<Vec<u8>> = rows
        .chunks(50)
        .map(|chunk| {
            serde_json::to_vec(
                &json!({"schema": PAGE_SCHEMA, "account": "m1", "cursor": {}, "fetched_at": "x", "orders": chunk}),
            )
            .expect("page")
        })
        .collect();
    let started = Instant::now();
    let mut records = 0usize;
    for _ in 0..rounds {
        for page in &pages {
            if let transformer::page::PageOutcome::Transformed(t) = transform_page(&mapping, page) {
                records += t.records.len();
            }
        }
    }
    let page_secs = started.elapsed().as_secs_f64();
    let n = rows.len() * rounds;
    println!("orders: {} realistic jst-sim rows × {rounds} rounds, one core", rows.len());
    println!("mapping.apply (parsed order → record):   {:>9.0} records/s  ({mapped} mapped)", n as f64 / apply_secs);
    println!("page step (parse JSON + map + dedupe):    {:>9.0} records/s  ({records} records)", n as f64 / page_secs);
}
