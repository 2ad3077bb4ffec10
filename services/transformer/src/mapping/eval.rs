//! Applying a compiled mapping to one source order: a mapped record, a drop (filtered on
//! purpose), or a rejection whose detail names the field and the value.

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::{
    AmountCheck, Condition, DateRule, DropRule, Mapping, Part, Rule, Source, Template,
    values::{self, decimal, decimal_value, get, is_missing, set, show},
};

#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub id: String,
    pub version: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Mapped(Mapped),
    /// A drop rule matched (the rule, for logs and metrics).
    Dropped(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    InvalidRecord,
    AmountMismatch,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidRecord => "invalid_record",
            RejectReason::AmountMismatch => "amount_mismatch",
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

fn invalid(detail: String) -> Reject {
    Reject { reason: RejectReason::InvalidRecord, detail }
}

fn path_text(path: &[String]) -> String {
    path.join(".")
}

impl Mapping {
    /// Maps one order of `account` (the source account, for `{account}` in templates).
    pub fn apply(&self, order: &Value, account: &str) -> Result<Outcome, Reject> {
        if !order.is_object() {
            return Err(invalid(format!("the order is not a JSON object: {}", show(order))));
        }
        if let Some(rule) = self.drop_if.iter().find(|r| drop_matches(r, order)) {
            return Ok(Outcome::Dropped(rule.text.clone()));
        }
        let id = render(&self.id, order, account).map_err(|e| invalid(format!("record id {}: {e}", self.id.text)))?;
        let version = self
            .version
            .iter()
            .find_map(|p| get(order, p).filter(|v| !is_missing(Some(v))).and_then(orderflow_shared::json::scalar_text))
            .unwrap_or_else(|| "0".to_string());
        let data = eval_fields(&self.fields, order, "", account)?;
        if let Some(check) = &self.amount_check {
            check_amount(check, &data, order)?;
        }
        Ok(Outcome::Mapped(Mapped { id, version, data: Value::Object(data) }))
    }
}

fn drop_matches(rule: &DropRule, order: &Value) -> bool {
    rule.conditions.iter().all(|(path, condition)| {
        let value = get(order, path);
        let same = |want: &Value| value.is_some_and(|v| loose_eq(v, want));
        match condition {
            Condition::Eq(want) => same(want),
            Condition::Ne(want) => !same(want),
            Condition::In(list) => list.iter().any(same),
            Condition::NotIn(list) => !list.iter().any(same),
            Condition::Missing => is_missing(value),
            Condition::Exists => !is_missing(value),
            Condition::Gt(limit) => value.and_then(decimal).is_some_and(|d| d > *limit),
            Condition::Lt(limit) => value.and_then(decimal).is_some_and(|d| d < *limit),
        }
    })
}

/// Equality that treats `12` and `"12"` (and `1.50` and `1.5`) as the same.
fn loose_eq(a: &Value, b: &Value) -> bool {
    if a == b {
        return true;
    }
    match (decimal(a), decimal(b)) {
        (Some(x), Some(y)) => x == y,
        _ => match (a, b) {
            (Value::String(s), other) | (other, Value::String(s)) => {
                orderflow_shared::json::scalar_text(other).is_some_and(|t| &t == s)
            }
            _ => false,
        },
    }
}

/// The template's text for this order; an error names the field that is missing or not a scalar.
fn render(template: &Template, order: &Value, account: &str) -> Result<String, String> {
    let mut out = String::new();
    for part in &template.parts {
        match part {
            Part::Lit(text) => out.push_str(text),
            Part::Account => out.push_str(account),
            Part::Field(path) => match get(order, path) {
                Some(v) if !is_missing(Some(v)) => out.push_str(
                    &orderflow_shared::json::scalar_text(v)
                        .ok_or_else(|| format!("{} = {} is not a scalar", path_text(path), show(v)))?,
                ),
                _ => return Err(format!("{} is missing", path_text(path))),
            },
        }
    }
    Ok(out)
}

fn eval_fields(rules: &[Rule], scope: &Value, prefix: &str, account: &str) -> Result<Map<String, Value>, Reject> {
    let mut out = Map::with_capacity(rules.len());
    for rule in rules {
        if let Some(value) = eval_rule(rule, scope, prefix, account)? {
            set(&mut out, &rule.to, value);
        }
    }
    Ok(out)
}

fn source_text(rule: &Rule, prefix: &str) -> String {
    let name = match &rule.source {
        Source::From(p) => path_text(p),
        Source::Const(_) => "(constant)".into(),
        Source::SumProduct { over, .. } => format!("sum over {}", path_text(over)),
        Source::SumOf(_) => "sum".into(),
        Source::Each { over, .. } => path_text(over),
        Source::Template(t) => format!("template {:?}", t.text),
    };
    format!("{prefix}{name}")
}

fn eval_rule(rule: &Rule, scope: &Value, prefix: &str, account: &str) -> Result<Option<Value>, Reject> {
    let whence = || format!("{} ← {}", rule.to_text, source_text(rule, prefix));
    let Some(value) = or_default(rule, source_value(rule, scope, prefix, account)?, &whence)? else {
        return Ok(None);
    };
    convert(rule, value, &whence).map(Some)
}

/// The rule's value as its source gives it, before defaults and conversions.
fn source_value(rule: &Rule, scope: &Value, prefix: &str, account: &str) -> Result<Option<Value>, Reject> {
    Ok(match &rule.source {
        Source::From(path) => get(scope, path).cloned(),
        Source::Const(value) => Some(value.clone()),
        Source::Template(t) => {
            Some(Value::String(render(t, scope, account).map_err(|e| invalid(format!("{}: {e}", rule.to_text)))?))
        }
        Source::SumProduct { over, product } => match get(scope, over) {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(decimal_value(sum_product(rule, items, over, product, prefix)?)),
            Some(other) => return Err(not_a_list(rule, prefix, over, other)),
        },
        Source::SumOf(fields) => Some(decimal_value(sum_of(rule, scope, fields, prefix)?)),
        Source::Each { over, fields } => match get(scope, over) {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(each(items, over, fields, prefix, account)?),
            Some(other) => return Err(not_a_list(rule, prefix, over, other)),
        },
    })
}

fn not_a_list(rule: &Rule, prefix: &str, over: &[String], other: &Value) -> Reject {
    invalid(format!("{}: {prefix}{} = {} is not a list", rule.to_text, path_text(over), show(other)))
}

/// The sum over `items` of the product of each item's `product` fields.
fn sum_product(
    rule: &Rule,
    items: &[Value],
    over: &[String],
    product: &[Vec<String>],
    prefix: &str,
) -> Result<Decimal, Reject> {
    let mut total = Decimal::ZERO;
    for (i, item) in items.iter().enumerate() {
        let mut term = Decimal::ONE;
        for factor in product {
            let at = format!("{prefix}{}[{i}].{}", path_text(over), path_text(factor));
            let v = get(item, factor).ok_or_else(|| invalid(format!("{}: {at} is missing", rule.to_text)))?;
            let d =
                decimal(v).ok_or_else(|| invalid(format!("{}: {at} = {} is not a number", rule.to_text, show(v))))?;
            term = term
                .checked_mul(d)
                .ok_or_else(|| invalid(format!("{}: {at} = {} overflows", rule.to_text, show(v))))?;
        }
        total = total.checked_add(term).ok_or_else(|| invalid(format!("{}: the sum overflows", rule.to_text)))?;
    }
    Ok(total)
}

/// The sum of the `fields` present in `scope` (missing ones count as zero).
fn sum_of(rule: &Rule, scope: &Value, fields: &[Vec<String>], prefix: &str) -> Result<Decimal, Reject> {
    let mut total = Decimal::ZERO;
    for field in fields {
        let at = format!("{prefix}{}", path_text(field));
        if let Some(v) = get(scope, field).filter(|v| !is_missing(Some(v))) {
            let d =
                decimal(v).ok_or_else(|| invalid(format!("{}: {at} = {} is not a number", rule.to_text, show(v))))?;
            total = total.checked_add(d).ok_or_else(|| invalid(format!("{}: the sum overflows", rule.to_text)))?;
        }
    }
    Ok(total)
}

/// Each item mapped by the nested `fields`, into a list.
fn each(items: &[Value], over: &[String], fields: &[Rule], prefix: &str, account: &str) -> Result<Value, Reject> {
    let mut mapped = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let element_prefix = format!("{prefix}{}[{i}].", path_text(over));
        mapped.push(Value::Object(eval_fields(fields, item, &element_prefix, account)?));
    }
    Ok(Value::Array(mapped))
}

/// A missing value becomes the default, a rejection (required) or no field (`None`).
fn or_default(rule: &Rule, raw: Option<Value>, whence: &impl Fn() -> String) -> Result<Option<Value>, Reject> {
    Ok(match raw {
        Some(v) if !is_missing(Some(&v)) => Some(v),
        _ => match (&rule.default, rule.required) {
            (Some(default), _) => Some(default.clone()),
            (None, true) => return Err(invalid(format!("{} is required but missing", whence()))),
            (None, false) => None,
        },
    })
}

/// The rule's conversions in order: date/time reformatting, rounding to a scale, type coercion.
fn convert(rule: &Rule, mut value: Value, whence: &impl Fn() -> String) -> Result<Value, Reject> {
    if let Some(date) = &rule.date {
        value = reformat_date(date, &value, whence)?;
    }
    if let Some(scale) = rule.scale {
        let d = decimal(&value).ok_or_else(|| invalid(format!("{}: {} is not a number", whence(), show(&value))))?;
        value = decimal_value(rule.rounding.apply(d, scale));
    }
    if let Some(coerce) = rule.coerce {
        value = coerce.apply(value).map_err(|e| invalid(format!("{}: {e}", whence())))?;
    }
    Ok(value)
}

fn reformat_date(date: &DateRule, value: &Value, whence: &impl Fn() -> String) -> Result<Value, Reject> {
    let text = orderflow_shared::json::scalar_text(value)
        .ok_or_else(|| invalid(format!("{}: {} is not a date", whence(), show(value))))?;
    let parsed = values::parse_datetime(&text, &date.from_formats, &date.zone)
        .ok_or_else(|| invalid(format!("{}: {} is not a date/time in the expected format", whence(), show(value))))?;
    let zoned = parsed.with_time_zone(date.to_zone.clone());
    Ok(Value::String(zoned.strftime(&date.to_format).to_string()))
}

fn check_amount(check: &AmountCheck, data: &Map<String, Value>, order: &Value) -> Result<(), Reject> {
    let data_value = Value::Object(data.clone());
    let mapped = get(&data_value, &check.field)
        .and_then(decimal)
        .ok_or_else(|| invalid(format!("amount_check: mapped field {} is not a number", path_text(&check.field))))?;
    let against_value = get(order, &check.against);
    let against = against_value.and_then(decimal).ok_or_else(|| {
        invalid(format!(
            "amount_check: {} = {} is not a number",
            path_text(&check.against),
            against_value.map(show).unwrap_or_else(|| "missing".into())
        ))
    })?;
    let mut expected = mapped;
    let mut terms = format!("{} {mapped}", path_text(&check.field));
    for (sign, list) in [(Decimal::ONE, &check.plus), (Decimal::NEGATIVE_ONE, &check.minus)] {
        for path in list {
            let v = match get(order, path) {
                Some(v) if !is_missing(Some(v)) => decimal(v).ok_or_else(|| {
                    invalid(format!("amount_check: {} = {} is not a number", path_text(path), show(v)))
                })?,
                _ => Decimal::ZERO,
            };
            expected = expected
                .checked_add(sign * v)
                .ok_or_else(|| invalid(format!("amount_check: {} = {v} overflows", path_text(path))))?;
            terms.push_str(&format!(" {} {} {v}", if sign.is_sign_negative() { "−" } else { "+" }, path_text(path)));
        }
    }
    let diff = expected
        .checked_sub(against)
        .map(|d| d.abs())
        .ok_or_else(|| invalid("amount_check: the difference overflows".to_string()))?;
    if diff > check.tolerance {
        return Err(Reject {
            reason: RejectReason::AmountMismatch,
            detail: format!(
                "{terms} = {expected} but {} is {against} (off by {diff}, tolerance {})",
                path_text(&check.against),
                check.tolerance
            ),
        });
    }
    Ok(())
}
