//! Tests for every rule kind, both fixture examples, and the default mapping.

use serde_json::{Value, json};

use super::{
    Mapping,
    eval::{Outcome, RejectReason},
};

fn compile(doc: Value) -> Mapping {
    Mapping::compile(&doc).unwrap_or_else(|e| panic!("compiles: {e}"))
}

fn mapped(m: &Mapping, order: Value) -> Value {
    match m.apply(&order, "acme") {
        Ok(Outcome::Mapped(r)) => r.data,
        other => panic!("expected a mapped record, got {other:?}"),
    }
}

fn rejected(m: &Mapping, order: Value) -> (RejectReason, String) {
    match m.apply(&order, "acme") {
        Err(r) => (r.reason, r.detail),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn both_seed_examples_are_reproduced_exactly() {
    let fixture: Value =
        serde_json::from_str(include_str!("../../tests/data/seed-mapping-examples.json")).expect("fixture");
    let files = [
        ("rename-reformat-recompute", include_str!("../../mappings/examples/rename-reformat-recompute.json")),
        ("chinese-labels", include_str!("../../mappings/examples/chinese-labels.json")),
    ];
    for (name, file) in files {
        let example =
            fixture["examples"].as_array().expect("examples").iter().find(|e| e["name"] == name).expect("example");
        let m = Mapping::parse_str(file).expect("mapping compiles");
        assert_eq!(mapped(&m, example["input"].clone()), example["output"], "example {name}");
    }
}

#[test]
fn rename_reads_nested_paths_and_writes_nested_targets() {
    let m = compile(json!({"fields": [{"to": "buyer.city", "from": "receiver.city"}, {"to": "id", "from": "o_id"}]}));
    assert_eq!(
        mapped(&m, json!({"o_id": 1, "receiver": {"city": "杭州"}})),
        json!({"buyer": {"city": "杭州"}, "id": 1})
    );
}

#[test]
fn constants_are_written_as_given() {
    let m = compile(json!({"fields": [{"to": "source", "const": "jushuitan"}, {"to": "v", "const": 2}]}));
    assert_eq!(mapped(&m, json!({"o_id": 1})), json!({"source": "jushuitan", "v": 2}));
}

#[test]
fn dates_are_reformatted_with_zones() {
    let m = compile(json!({"fields": [
        {"to": "d", "from": "io_date", "date": {"from": "auto", "zone": "+08:00", "to": "%Y%m%d"}},
        {"to": "utc", "from": "io_date", "date": {"from": "auto", "zone": "Asia/Shanghai", "to": "%Y-%m-%dT%H:%M:%S%:z", "to_zone": "UTC"}}
    ]}));
    let out = mapped(&m, json!({"o_id": 1, "io_date": "2021-09-18 01:02:19.807"}));
    assert_eq!(out["d"], "20210918");
    assert_eq!(out["utc"], "2021-09-17T17:02:19+00:00");
    let (reason, detail) = rejected(&m, json!({"o_id": 1, "io_date": "18/09/2021"}));
    assert_eq!(reason, RejectReason::InvalidRecord);
    assert!(detail.contains("io_date") && detail.contains("18/09/2021"), "{detail}");
}

#[test]
fn sums_of_products_are_exact_with_scale_and_rounding() {
    let doc = |rounding: &str| json!({"fields": [{"to": "amount", "sum": {"over": "items", "product": ["qty", "price"]}, "scale": 2, "rounding": rounding}]});
    let order = json!({"o_id": 1, "items": [{"qty": 3, "price": 0.1}, {"qty": 1, "price": "0.005"}]});
    assert_eq!(mapped(&compile(doc("half_even")), order.clone())["amount"].to_string(), "0.30");
    assert_eq!(mapped(&compile(doc("half_up")), order.clone())["amount"].to_string(), "0.31");
    assert_eq!(mapped(&compile(doc("down")), order)["amount"].to_string(), "0.30");
    let (_, detail) = rejected(&compile(doc("half_even")), json!({"o_id": 1, "items": [{"qty": 1, "price": "abc"}]}));
    assert!(detail.contains("items[0].price") && detail.contains("abc"), "{detail}");
}

#[test]
fn sum_of_plain_fields_is_exact() {
    let m = compile(json!({"fields": [{"to": "total", "sum": {"of": ["a", "b"]}}]}));
    assert_eq!(mapped(&m, json!({"o_id": 1, "a": 0.1, "b": "0.2"}))["total"].to_string(), "0.3");
}

#[test]
fn arrays_map_element_by_element() {
    let m = compile(
        json!({"fields": [{"to": "lines", "each": "items", "fields": [{"to": "sku", "from": "sku_id"}, {"to": "n", "from": "qty", "type": "string"}]}]}),
    );
    let out = mapped(&m, json!({"o_id": 1, "items": [{"sku_id": "A", "qty": 2}, {"sku_id": "B", "qty": 1}]}));
    assert_eq!(out["lines"], json!([{"sku": "A", "n": "2"}, {"sku": "B", "n": "1"}]));
}

#[test]
fn types_are_coerced_both_ways_or_rejected_with_the_value() {
    let m = compile(
        json!({"fields": [{"to": "s", "from": "n", "type": "string"}, {"to": "n", "from": "s", "type": "number"}, {"to": "i", "from": "i", "type": "integer"}]}),
    );
    let out = mapped(&m, json!({"o_id": 1, "n": 12345, "s": "12.50", "i": "7"}));
    assert_eq!(out["s"], "12345");
    assert_eq!(out["n"].to_string(), "12.50");
    assert_eq!(out["i"], json!(7));
    let (_, detail) = rejected(&m, json!({"o_id": 1, "n": 1, "s": "x1", "i": 1}));
    assert!(detail.contains("\"x1\""), "{detail}");
}

#[test]
fn defaults_fill_missing_optional_fields_and_required_fields_reject() {
    let m = compile(
        json!({"fields": [{"to": "name", "from": "receiver_name", "default": "未知"}, {"to": "shop", "from": "shop_id", "required": true}]}),
    );
    assert_eq!(mapped(&m, json!({"o_id": 1, "receiver_name": "", "shop_id": 5})), json!({"name": "未知", "shop": 5}));
    let (_, detail) = rejected(&m, json!({"o_id": 1}));
    assert!(detail.contains("shop") && detail.contains("required"), "{detail}");
}

#[test]
fn drop_rules_filter_records_without_rejecting_them() {
    let m = compile(json!({
        "drop_if": [{"field": "status", "in": ["Cancelled", "Delete"]}, {"field": "pay_amount", "lt": 0.01}],
        "fields": [{"to": "id", "from": "o_id"}]
    }));
    assert!(matches!(
        m.apply(&json!({"o_id": 1, "status": "Cancelled", "pay_amount": 5}), "acme"),
        Ok(Outcome::Dropped(_))
    ));
    assert!(matches!(
        m.apply(&json!({"o_id": 1, "status": "Confirmed", "pay_amount": "0.00"}), "acme"),
        Ok(Outcome::Dropped(_))
    ));
    assert!(matches!(
        m.apply(&json!({"o_id": 1, "status": "Confirmed", "pay_amount": 5}), "acme"),
        Ok(Outcome::Mapped(_))
    ));
}

#[test]
fn labels_may_be_in_any_language() {
    let m = compile(
        json!({"fields": [{"to": "订单编号", "from": "o_id", "type": "string"}, {"to": "金额", "from": "pay_amount"}]}),
    );
    assert_eq!(mapped(&m, json!({"o_id": 9, "pay_amount": 1.5})), json!({"订单编号": "9", "金额": 1.5}));
}

#[test]
fn the_amount_check_rejects_a_mismatch_beyond_tolerance() {
    let m = compile(json!({
        "fields": [{"to": "amount", "sum": {"over": "items", "product": ["qty", "sale_price"]}, "scale": 2}],
        "amount_check": {"field": "amount", "against": "pay_amount", "plus": ["freight"], "minus": ["free_amount"], "tolerance": "0.01"}
    }));
    let ok = json!({"o_id": 1, "items": [{"qty": 2, "sale_price": 50.25}], "freight": 10, "free_amount": 0.5, "pay_amount": 110.00});
    assert!(matches!(m.apply(&ok, "acme"), Ok(Outcome::Mapped(_))));
    let bad = json!({"o_id": 1, "items": [{"qty": 2, "sale_price": 50.25}], "freight": 10, "free_amount": 0.5, "pay_amount": 120.00});
    let (reason, detail) = rejected(&m, bad);
    assert_eq!(reason, RejectReason::AmountMismatch);
    assert!(detail.contains("120"), "{detail}");
}

#[test]
fn the_record_id_and_version_come_from_the_source() {
    let m = compile(
        json!({"record": {"id": "o_id", "version": ["ts", "modified"]}, "fields": [{"to": "id", "from": "o_id"}]}),
    );
    let Ok(Outcome::Mapped(r)) = m.apply(&json!({"o_id": 42, "ts": 1001, "modified": "x"}), "acme") else {
        panic!("maps")
    };
    assert_eq!((r.id.as_str(), r.version.as_str()), ("42", "1001"));
    let Ok(Outcome::Mapped(r)) = m.apply(&json!({"o_id": "42", "modified": "2024-01-01 00:00:00"}), "acme") else {
        panic!("maps")
    };
    assert_eq!(r.version, "2024-01-01 00:00:00");
    let (_, detail) = rejected(&m, json!({"ts": 1}));
    assert!(detail.contains("o_id"), "{detail}");
    let (_, detail) = rejected(&m, json!([1, 2]));
    assert!(detail.contains("not a JSON object"), "{detail}");
}

#[test]
fn an_invalid_mapping_fails_naming_the_rule() {
    let bad = |doc: Value| Mapping::compile(&doc).expect_err("invalid").to_string();
    assert!(bad(json!({"fields": [{"to": "a"}]})).contains("fields[0]"));
    assert!(bad(json!({"fields": [{"to": "a", "from": "b", "rounding": "sideways"}]})).contains("sideways"));
    assert!(bad(json!({"fields": [{"to": "a", "from": "b"}, {"to": "c", "each": "items", "fields": [{"to": "x", "from": "y", "type": "money"}]}]})).contains("fields[1].fields[0]"));
    assert!(
        bad(json!({"fields": [{"to": "a", "from": "b", "date": {"to": "%Y", "zone": "Mars/Base"}}]}))
            .contains("date.zone")
    );
    assert!(bad(json!({"fields": [], "drop_if": [{"field": "s", "like": "x"}]})).contains("drop_if[0]"));
    assert!(bad(json!({"feilds": []})).contains("feilds"));
    assert!(bad(json!({"fields": [{"to": "a", "from": "b", "const": 1}]})).contains("exactly one"));
}

#[test]
fn the_default_mapping_maps_a_jushuitan_order() {
    let m = Mapping::default_jushuitan();
    let order = json!({
        "o_id": 100000001, "io_id": 100000001, "so_id": "SO10000000001", "shop_id": 100001, "receiver_name": "张三",
        "io_date": "2023-10-01 09:30:00", "modified": "2023-10-01 09:30:00.123", "ts": 1000001,
        "items": [{"sku_id": "SKU1", "qty": 2, "sale_price": 50.25}, {"sku_id": "SKU2", "qty": 1, "sale_price": 50.25}]
    });
    let Ok(Outcome::Mapped(r)) = m.apply(&order, "acme") else { panic!("maps") };
    assert_eq!(r.id, "100000001");
    assert_eq!(r.version, "1000001");
    assert_eq!(
        r.data,
        json!({
            "id": "100000001", "name": "张三", "date": "20231001", "amount": 150.75,
            "items_detail": [{"product_id": "SKU1", "qty": 2, "unit_price": 50.25}, {"product_id": "SKU2", "qty": 1, "unit_price": 50.25}],
            "shop_id": "100001", "so_id": "SO10000000001", "io_id": "100000001", "modified": "2023-10-01T09:30:00.123+08:00"
        })
    );
}

#[test]
fn ids_can_carry_the_account_so_merchants_with_overlapping_order_ids_stay_apart() {
    let m = Mapping::compile(&json!({
        "record": {"id": "{account}:{o_id}"},
        "fields": [{"to": "id", "template": "{account}:{o_id}"}, {"to": "ref", "template": "SO-{so_id}/{shop.id}"}]
    }))
    .expect("compiles");
    assert!(m.id.uses_account());
    let order = json!({"o_id": 7, "so_id": "A1", "shop": {"id": 3}, "ts": 9});
    let Ok(Outcome::Mapped(a)) = m.apply(&order, "m1") else { panic!("maps") };
    let Ok(Outcome::Mapped(b)) = m.apply(&order, "m2") else { panic!("maps") };
    assert_eq!((a.id.as_str(), b.id.as_str()), ("m1:7", "m2:7"));
    assert_eq!(a.data, json!({"id": "m1:7", "ref": "SO-A1/3"}));
    let Err(reject) = m.apply(&json!({"so_id": "A1"}), "m1") else { panic!("rejects") };
    assert!(reject.detail.contains("o_id is missing"), "{}", reject.detail);
    assert!(!Mapping::default_jushuitan().id.uses_account(), "the shipped default keeps o_id (existing targets' ids)");
    for bad_template in ["{account", "x}", "{}", "{a{b}}"] {
        let doc = json!({"record": {"id": bad_template}, "fields": []});
        assert!(Mapping::compile(&doc).is_err(), "{bad_template}");
    }
}
