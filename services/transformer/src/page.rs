//! The transformer's pure step: one page body in, records / rejects / drops out. No broker here.

use std::collections::HashMap;

use orderflow_shared::{
    ledger::OrderIds,
    messages::{PAGE_SCHEMA, Page, RECORD_SCHEMA, Record, schema_of},
};
use serde_json::Value;

use crate::mapping::{
    Mapping,
    eval::{Outcome, RejectReason},
};

/// An order that could not be mapped, with the reason a person reads.
#[derive(Debug, Clone)]
pub struct RejectedOrder {
    pub index: usize,
    pub order: Value,
    pub reason: RejectReason,
    pub detail: String,
}

#[derive(Debug)]
pub enum PageOutcome {
    /// The whole page is unusable (not JSON, unknown schema, wrong shape).
    Poison {
        reason: &'static str,
        detail: String,
    },
    Transformed(Transformed),
}

#[derive(Debug, Default)]
pub struct Transformed {
    /// The page as parsed (its account and cursor go into dead letters).
    pub account: String,
    pub cursor: Value,
    pub records: Vec<Record>,
    /// The source's ids of each record's order (same order as `records`).
    pub sources: Vec<OrderIds>,
    pub rejects: Vec<RejectedOrder>,
    pub dropped: usize,
    /// The orders a filter left out: their ids, version and the rule.
    pub drops: Vec<(OrderIds, Option<String>, String)>,
    /// Orders that repeated inside the page; the highest version was kept.
    pub duplicates: usize,
}

/// Parses and transforms one page. The page is parsed once (the common case: a valid page); only
/// a page that does not parse is looked at again, to say why it is poison.
pub fn transform_page(mapping: &Mapping, body: &[u8]) -> PageOutcome {
    let page: Page = match serde_json::from_slice::<Page>(body) {
        Ok(p) if p.schema == PAGE_SCHEMA => p,
        Ok(p) => return unknown_schema(&p.schema),
        Err(e) => return poison(body, e),
    };
    let mut out = Transformed { account: page.account.clone(), cursor: page.cursor.clone(), ..Transformed::default() };
    let mut by_id: HashMap<String, usize> = HashMap::with_capacity(page.orders.len());
    for (index, order) in page.orders.into_iter().enumerate() {
        match mapping.apply(&order, &page.account) {
            Ok(Outcome::Mapped(m)) => {
                let record = Record {
                    schema: RECORD_SCHEMA.to_string(),
                    account: page.account.clone(),
                    id: m.id,
                    version: m.version,
                    data: m.data,
                };
                match by_id.get(&record.id) {
                    Some(&at) => {
                        out.duplicates += 1;
                        if newer(&record.version, &out.records[at].version) {
                            out.records[at] = record;
                            out.sources[at] = OrderIds::of_row(&order);
                        }
                    }
                    None => {
                        by_id.insert(record.id.clone(), out.records.len());
                        out.records.push(record);
                        out.sources.push(OrderIds::of_row(&order));
                    }
                }
            }
            Ok(Outcome::Dropped(rule)) => {
                out.dropped += 1;
                out.drops.push((OrderIds::of_row(&order), OrderIds::row_version(&order), rule));
            }
            Err(reject) => {
                out.rejects.push(RejectedOrder { index, order, reason: reject.reason, detail: reject.detail })
            }
        }
    }
    PageOutcome::Transformed(out)
}

fn unknown_schema(schema: &str) -> PageOutcome {
    PageOutcome::Poison {
        reason: "unknown_schema",
        detail: format!("unknown page schema {schema:?} (this transformer reads {PAGE_SCHEMA:?})"),
    }
}

/// Why a body that is not a page is poison: an unknown schema (whatever its shape), no schema,
/// not JSON, or a page-schema body of the wrong shape.
fn poison(body: &[u8], error: serde_json::Error) -> PageOutcome {
    match schema_of(body) {
        Some(s) if s == PAGE_SCHEMA => PageOutcome::Poison {
            reason: "poison_page",
            detail: format!("the page does not match {PAGE_SCHEMA}: {error}"),
        },
        Some(other) => unknown_schema(&other),
        None => {
            let detail = match serde_json::from_slice::<Value>(body) {
                Err(e) => format!("the page is not JSON: {e}"),
                Ok(_) => "the page has no \"schema\" string".to_string(),
            };
            PageOutcome::Poison { reason: "poison_page", detail }
        }
    }
}

/// Version order: numerically when both are integers (`ts`), else as text (datetimes sort as text).
pub fn newer(candidate: &str, current: &str) -> bool {
    match (candidate.parse::<i64>(), current.parse::<i64>()) {
        (Ok(a), Ok(b)) => a > b,
        _ => candidate > current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn page(orders: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"schema": PAGE_SCHEMA, "account": "acme", "cursor": {}, "fetched_at": "x", "orders": orders}),
        )
        .expect("json")
    }

    fn order(o_id: i64, ts: i64) -> Value {
        json!({"o_id": o_id, "ts": ts, "io_date": "2023-10-01 10:00:00", "items": [{"sku_id": "A", "qty": 1, "sale_price": 1.00}]})
    }

    #[test]
    fn duplicates_inside_a_page_keep_the_highest_version() {
        let PageOutcome::Transformed(t) = transform_page(
            &Mapping::default_jushuitan(),
            &page(json!([order(1, 5), order(1, 9), order(2, 3), order(1, 7)])),
        ) else {
            panic!("transformed")
        };
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.records[0].version, "9");
        assert_eq!(t.records[0].message_id(), "acme:1:9");
    }

    #[test]
    fn an_invalid_record_is_rejected_and_the_rest_goes_through() {
        let mut bad = order(3, 1);
        bad["io_date"] = json!("not a date");
        let PageOutcome::Transformed(t) =
            transform_page(&Mapping::default_jushuitan(), &page(json!([order(1, 1), bad, order(2, 1)])))
        else {
            panic!("transformed")
        };
        assert_eq!(t.records.len(), 2);
        assert_eq!(t.rejects.len(), 1);
        assert_eq!(t.rejects[0].index, 1);
        assert!(
            t.rejects[0].detail.contains("io_date") && t.rejects[0].detail.contains("not a date"),
            "{}",
            t.rejects[0].detail
        );
    }

    #[test]
    fn poison_pages_are_named() {
        let m = Mapping::default_jushuitan();
        assert!(matches!(transform_page(&m, b"{{{"), PageOutcome::Poison { reason: "poison_page", .. }));
        assert!(matches!(
            transform_page(&m, br#"{"schema":"orderflow.page.v9"}"#),
            PageOutcome::Poison { reason: "unknown_schema", .. }
        ));
        assert!(matches!(
            transform_page(&m, br#"{"schema":"orderflow.page.v1","orders":5}"#),
            PageOutcome::Poison { reason: "poison_page", .. }
        ));
    }

    #[test]
    fn versions_compare_numerically_or_as_text() {
        assert!(newer("10", "9"));
        assert!(!newer("9", "10"));
        assert!(newer("2024-01-02 00:00:00", "2024-01-01 23:59:59"));
    }
}
