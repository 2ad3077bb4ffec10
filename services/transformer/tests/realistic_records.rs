//! The default mapping on realistic jst-sim records: every seeded order maps, amounts equal an
//! independent exact sum, dates are the China-time day, and the simulator's pay_amount agrees
//! with the recomputed amount plus freight minus discount (the optional business check).

use jiff::{SignedDuration, Timestamp};
use jst_sim::store::{Credentials, Merchant, Query};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use transformer::mapping::{Mapping, eval::Outcome};

fn seeded_rows(count: u64) -> Vec<Value> {
    let creds = Credentials::placeholder();
    let merchant = Merchant::seed("m1".into(), 0, creds, count, 7, Timestamp::now(), SignedDuration::from_hours(48));
    let page =
        merchant.query(&Query { window: Some((0, i64::MAX)), page_index: 1, page_size: u32::MAX, ..Query::default() });
    page.rows.iter().map(|r| serde_json::from_str(r).expect("row is JSON")).collect()
}

fn dec(v: &Value) -> Decimal {
    v.to_string().parse().expect("decimal")
}

#[test]
fn every_seeded_order_maps_with_exact_amounts_and_china_dates() {
    let rows = seeded_rows(2000);
    assert_eq!(rows.len(), 2000);
    let mapping = Mapping::default_jushuitan();
    let mut masked = 0;
    for row in &rows {
        let Ok(Outcome::Mapped(record)) = mapping.apply(row, "acme") else { panic!("maps: {row}") };
        let data = &record.data;
        assert_eq!(record.id, row["o_id"].to_string());
        assert_eq!(record.version, row["ts"].to_string());
        let items = row["items"].as_array().expect("items");
        let expected: Decimal = items.iter().map(|i| dec(&i["qty"]) * dec(&i["sale_price"])).sum();
        assert_eq!(dec(&data["amount"]), expected, "amount of {}", record.id);
        assert_eq!(data["amount"].to_string().split('.').nth(1).map(str::len), Some(2), "two decimals");
        let io_date = row["io_date"].as_str().expect("io_date");
        assert_eq!(data["date"], json!(io_date[..10].replace('-', "")));
        assert_eq!(data["items_detail"].as_array().map(Vec::len), Some(items.len()));
        assert_eq!(data["name"], row["receiver_name"]);
        if row["receiver_name"].as_str().is_some_and(|n| n.contains('*')) {
            masked += 1;
        }
        let modified = data["modified"].as_str().expect("modified");
        assert!(modified.ends_with("+08:00"), "{modified}");
    }
    assert!(masked > 100, "the sample has masked receivers ({masked})");
}

#[test]
fn the_simulators_pay_amount_passes_the_amount_check() {
    let mut doc: Value = serde_json::from_str(transformer::mapping::DEFAULT_MAPPING).expect("json");
    doc["amount_check"] = json!({"field": "amount", "against": "pay_amount", "plus": ["freight"], "minus": ["free_amount"], "tolerance": "0.00"});
    let mapping = Mapping::compile(&doc).expect("compiles");
    for row in seeded_rows(500) {
        assert!(matches!(mapping.apply(&row, "acme"), Ok(Outcome::Mapped(_))), "{row}");
    }
}
