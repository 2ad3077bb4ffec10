//! `transformer check-mapping FILE [--input SAMPLE.json]`: compile a mapping and show what it makes
//! of a sample, without a broker.

use std::path::Path;

use serde_json::{Value, json};

use crate::mapping::{Mapping, eval::Outcome};

/// A realistic Jushuitan order used when no sample is given.
pub const BUILTIN_SAMPLE: &str = include_str!("../tests/data/jushuitan-order.json");

/// Runs the check; returns the report to print and whether everything mapped.
pub fn check_mapping(file: &Path, input: Option<&Path>) -> Result<(String, bool), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mapping = Mapping::parse_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let sample_text = match input {
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => BUILTIN_SAMPLE.to_string(),
    };
    let sample: Value = serde_json::from_str(&sample_text).map_err(|e| format!("sample is not JSON: {e}"))?;
    // A page's account fills `{account}`; a bare order or list gets a stand-in name.
    let account = sample.get("account").and_then(Value::as_str).unwrap_or("sample-account").to_string();
    let orders = match sample {
        Value::Array(items) => items,
        Value::Object(ref o) if o.get("orders").is_some_and(Value::is_array) => {
            o["orders"].as_array().cloned().unwrap_or_default()
        }
        other => vec![other],
    };
    let mut ok = true;
    let results: Vec<Value> = orders
        .iter()
        .map(|order| match mapping.apply(order, &account) {
            Ok(Outcome::Mapped(m)) => json!({"id": m.id, "version": m.version, "data": m.data}),
            Ok(Outcome::Dropped(rule)) => json!({"dropped_by": rule}),
            Err(reject) => {
                ok = false;
                json!({"rejected": reject.reason.as_str(), "detail": reject.detail})
            }
        })
        .collect();
    let report = serde_json::to_string_pretty(
        &json!({"mapping": file.display().to_string(), "valid": true, "results": results}),
    )
    .unwrap_or_default();
    Ok((report, ok))
}
