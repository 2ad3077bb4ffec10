//! The declarative mapping: a JSON file (documented in the README) compiled once at start into
//! rules, then applied to every source order. Errors at compile time name the rule; errors at
//! apply time name the field and the value.
//!
//! ```json
//! {
//!   "schema": "orderflow.mapping.v1",
//!   "record": {"id": "o_id", "version": ["ts", "modified"]},   // or "id": "{account}:{o_id}"
//!   "drop_if": [{"field": "status", "in": ["Cancelled", "Delete"]}],
//!   "fields": [
//!     {"to": "id", "from": "o_id", "type": "string", "required": true},
//!     {"to": "date", "from": "io_date", "date": {"from": "auto", "zone": "+08:00", "to": "%Y%m%d"}},
//!     {"to": "amount", "sum": {"over": "items", "product": ["qty", "sale_price"]}, "scale": 2, "rounding": "half_even"},
//!     {"to": "items_detail", "each": "items", "fields": [{"to": "product_id", "from": "sku_id"}]},
//!     {"to": "source", "const": "jushuitan"}
//!   ],
//!   "amount_check": {"field": "amount", "against": "pay_amount", "plus": ["freight"], "minus": ["free_amount"], "tolerance": "0.01"}
//! }
//! ```

pub mod eval;
pub mod values;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use values::{Coerce, Rounding, parse_zone, split_path};

pub const MAPPING_SCHEMA: &str = "orderflow.mapping.v1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mapping: {rule}: {message}")]
pub struct MappingError {
    /// Which rule, e.g. `fields[3] (to "amount")`.
    pub rule: String,
    pub message: String,
}

fn err(rule: impl Into<String>, message: impl Into<String>) -> MappingError {
    MappingError { rule: rule.into(), message: message.into() }
}

#[derive(Debug, Clone)]
pub enum Source {
    From(Vec<String>),
    Const(Value),
    /// Σ over the array at `over` of the product of `product` fields of each element.
    SumProduct {
        over: Vec<String>,
        product: Vec<Vec<String>>,
    },
    /// Σ of fields of the record itself.
    SumOf(Vec<Vec<String>>),
    Each {
        over: Vec<String>,
        fields: Vec<Rule>,
    },
    /// Text built from the source account and order fields, e.g. `{account}:{o_id}`.
    Template(Template),
}

/// `{account}` (the source account's name) and `{field.path}` placeholders between literal text.
/// A plain path (no braces) is the template of that one field.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub text: String,
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Lit(String),
    Account,
    Field(Vec<String>),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        if text.trim().is_empty() {
            return Err("is empty".into());
        }
        if !text.contains(['{', '}']) {
            return Ok(Template { text: text.to_string(), parts: vec![Part::Field(split_path(text))] });
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if rest[..open].contains('}') {
                return Err(format!("{text:?} has a '}}' without its '{{'"));
            }
            if open > 0 {
                parts.push(Part::Lit(rest[..open].to_string()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("{text:?} has a '{{' without its '}}'"))? + open;
            let name = rest[open + 1..close].trim();
            if name.is_empty() || name.contains('{') {
                return Err(format!("{text:?} has an empty or nested placeholder"));
            }
            parts.push(if name == "account" { Part::Account } else { Part::Field(split_path(name)) });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("{text:?} has a '}}' without its '{{'"));
        }
        if !rest.is_empty() {
            parts.push(Part::Lit(rest.to_string()));
        }
        Ok(Template { text: text.to_string(), parts })
    }

    /// Whether the text names the source account (ids unique across merchants).
    pub fn uses_account(&self) -> bool {
        self.parts.contains(&Part::Account)
    }
}

#[derive(Debug, Clone)]
pub struct DateRule {
    pub from_formats: Vec<String>,
    pub zone: jiff::tz::TimeZone,
    pub to_format: String,
    pub to_zone: jiff::tz::TimeZone,
}

#[derive(Debug, Clone)]
pub struct Rule {
    /// Display name for errors: the target path as written.
    pub to_text: String,
    pub to: Vec<String>,
    pub source: Source,
    pub date: Option<DateRule>,
    pub scale: Option<u32>,
    pub rounding: Rounding,
    pub coerce: Option<Coerce>,
    pub default: Option<Value>,
    pub required: bool,
}

#[derive(Debug, Clone)]
pub enum Condition {
    Eq(Value),
    Ne(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Missing,
    Exists,
    Gt(Decimal),
    Lt(Decimal),
}

/// A record is dropped when every condition of any one rule holds.
#[derive(Debug, Clone)]
pub struct DropRule {
    pub text: String,
    pub conditions: Vec<(Vec<String>, Condition)>,
}

#[derive(Debug, Clone)]
pub struct AmountCheck {
    pub field: Vec<String>,
    pub against: Vec<String>,
    pub plus: Vec<Vec<String>>,
    pub minus: Vec<Vec<String>>,
    pub tolerance: Decimal,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub id: Template,
    pub version: Vec<Vec<String>>,
    pub drop_if: Vec<DropRule>,
    pub fields: Vec<Rule>,
    pub amount_check: Option<AmountCheck>,
}

/// The mapping shipped for Jushuitan outbound orders.
pub const DEFAULT_MAPPING: &str = include_str!("../../mappings/jushuitan-default.json");

impl Mapping {
    pub fn parse_str(text: &str) -> Result<Mapping, MappingError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        Mapping::compile(&doc)
    }

    pub fn default_jushuitan() -> Mapping {
        Mapping::parse_str(DEFAULT_MAPPING).unwrap_or_else(|e| panic!("the shipped mapping must compile: {e}"))
    }

    pub fn compile(doc: &Value) -> Result<Mapping, MappingError> {
        let obj = doc.as_object().ok_or_else(|| err("(document)", "must be a JSON object"))?;
        for key in obj.keys() {
            if !["schema", "about", "record", "drop_if", "fields", "amount_check"].contains(&key.as_str()) {
                return Err(err(
                    key.clone(),
                    "unknown key (expected schema, about, record, drop_if, fields, amount_check)",
                ));
            }
        }
        match obj.get("schema").and_then(Value::as_str) {
            Some(MAPPING_SCHEMA) | None => {}
            Some(other) => return Err(err("schema", format!("{other:?} is not {MAPPING_SCHEMA:?}"))),
        }
        let record = obj.get("record");
        let id_text = record.and_then(|r| r.get("id")).and_then(Value::as_str).unwrap_or("o_id").to_string();
        let version = match record.and_then(|r| r.get("version")) {
            None => vec![split_path("ts"), split_path("modified")],
            Some(Value::String(s)) => vec![split_path(s)],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(split_path).ok_or_else(|| err("record.version", "must be a path or a list of paths"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(err("record.version", "must be a path or a list of paths")),
        };
        let drop_if = match obj.get("drop_if") {
            None => Vec::new(),
            Some(Value::Array(rules)) => {
                rules.iter().enumerate().map(|(i, r)| compile_drop(i, r)).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(err("drop_if", "must be a list of conditions")),
        };
        let fields = obj
            .get("fields")
            .and_then(Value::as_array)
            .ok_or_else(|| err("fields", "is required: a list of field rules"))?;
        let fields = compile_rules(fields, "fields")?;
        let amount_check = obj.get("amount_check").map(compile_amount_check).transpose()?;
        let id = Template::parse(&id_text).map_err(|e| err("record.id", e))?;
        Ok(Mapping { id, version, drop_if, fields, amount_check })
    }
}

fn compile_rules(rules: &[Value], prefix: &str) -> Result<Vec<Rule>, MappingError> {
    rules.iter().enumerate().map(|(i, r)| compile_rule(r, &format!("{prefix}[{i}]"))).collect()
}

fn paths(value: &Value, rule: &str, key: &str) -> Result<Vec<Vec<String>>, MappingError> {
    value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| err(rule, format!("{key} must be a non-empty list of field paths")))?
        .iter()
        .map(|v| v.as_str().map(split_path).ok_or_else(|| err(rule, format!("{key} must hold field paths (strings)"))))
        .collect()
}

fn compile_rule(value: &Value, at: &str) -> Result<Rule, MappingError> {
    let obj = value.as_object().ok_or_else(|| err(at, "must be an object"))?;
    let to_text = obj
        .get("to")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(at, "needs \"to\": the target field name"))?;
    let rule = format!("{at} (to {to_text:?})");
    check_rule_keys(obj, &rule)?;
    let source = compile_source(obj, at, &rule)?;
    if obj.contains_key("fields") && !matches!(source, Source::Each { .. }) {
        return Err(err(&rule, "\"fields\" belongs to an \"each\" rule"));
    }
    Ok(Rule {
        to: split_path(to_text),
        to_text: to_text.to_string(),
        source,
        date: obj.get("date").map(|d| compile_date(d, &rule)).transpose()?,
        scale: compile_scale(obj, &rule)?,
        rounding: compile_rounding(obj, &rule)?,
        coerce: compile_coerce(obj, &rule)?,
        default: obj.get("default").cloned(),
        required: compile_required(obj, &rule)?,
    })
}

/// No unknown key, and exactly one source key.
fn check_rule_keys(obj: &Map<String, Value>, rule: &str) -> Result<(), MappingError> {
    for key in obj.keys() {
        const KNOWN: &[&str] = &[
            "to", "from", "const", "sum", "each", "template", "fields", "date", "scale", "rounding", "type", "default",
            "required", "label", "about",
        ];
        if !KNOWN.contains(&key.as_str()) {
            return Err(err(rule, format!("unknown key {key:?}")));
        }
    }
    let kinds = ["from", "const", "sum", "each", "template"].iter().filter(|k| obj.contains_key(**k)).count();
    if kinds != 1 {
        return Err(err(rule, "needs exactly one of \"from\", \"const\", \"sum\", \"each\", \"template\""));
    }
    Ok(())
}

/// The rule's one source (`from`, `const`, `template`, `sum` or `each`).
fn compile_source(obj: &Map<String, Value>, at: &str, rule: &str) -> Result<Source, MappingError> {
    Ok(if let Some(from) = obj.get("from") {
        Source::From(split_path(
            from.as_str().filter(|s| !s.is_empty()).ok_or_else(|| err(rule, "\"from\" must be a field path"))?,
        ))
    } else if let Some(c) = obj.get("const") {
        Source::Const(c.clone())
    } else if let Some(t) = obj.get("template") {
        let text = t.as_str().ok_or_else(|| err(rule, "\"template\" must be text like \"{account}:{o_id}\""))?;
        Source::Template(Template::parse(text).map_err(|e| err(rule, format!("template {e}")))?)
    } else if let Some(sum) = obj.get("sum") {
        compile_sum(sum, rule)?
    } else {
        compile_each(obj, at, rule)?
    })
}

fn compile_sum(sum: &Value, rule: &str) -> Result<Source, MappingError> {
    match (sum.get("over"), sum.get("product"), sum.get("of")) {
        (Some(over), Some(product), None) => Ok(Source::SumProduct {
            over: split_path(over.as_str().ok_or_else(|| err(rule, "sum.over must be the path of an array"))?),
            product: paths(product, rule, "sum.product")?,
        }),
        (None, None, Some(of)) => Ok(Source::SumOf(paths(of, rule, "sum.of")?)),
        _ => Err(err(rule, "sum needs {\"over\": array, \"product\": [fields]} or {\"of\": [fields]}")),
    }
}

fn compile_each(obj: &Map<String, Value>, at: &str, rule: &str) -> Result<Source, MappingError> {
    let over =
        obj.get("each").and_then(Value::as_str).ok_or_else(|| err(rule, "\"each\" must be the path of an array"))?;
    let fields = obj
        .get("fields")
        .and_then(Value::as_array)
        .ok_or_else(|| err(rule, "\"each\" needs \"fields\": the element's rules"))?;
    Ok(Source::Each { over: split_path(over), fields: compile_rules(fields, &format!("{at}.fields"))? })
}

fn compile_scale(obj: &Map<String, Value>, rule: &str) -> Result<Option<u32>, MappingError> {
    match obj.get("scale") {
        None => Ok(None),
        Some(v) => {
            Ok(Some(v.as_u64().filter(|s| *s <= 28).ok_or_else(|| err(rule, "scale must be an integer 0-28"))? as u32))
        }
    }
}

fn compile_rounding(obj: &Map<String, Value>, rule: &str) -> Result<Rounding, MappingError> {
    match obj.get("rounding") {
        None => Ok(Rounding::HalfEven),
        Some(v) => v.as_str().and_then(Rounding::parse).ok_or_else(|| {
            err(rule, format!("unknown rounding {v} (half_even, half_up, half_down, down, up, floor, ceiling)"))
        }),
    }
}

fn compile_coerce(obj: &Map<String, Value>, rule: &str) -> Result<Option<Coerce>, MappingError> {
    match obj.get("type") {
        None => Ok(None),
        Some(v) => Ok(Some(
            v.as_str()
                .and_then(Coerce::parse)
                .ok_or_else(|| err(rule, format!("unknown type {v} (string, number, integer, bool)")))?,
        )),
    }
}

fn compile_required(obj: &Map<String, Value>, rule: &str) -> Result<bool, MappingError> {
    match obj.get("required") {
        None => Ok(false),
        Some(v) => v.as_bool().ok_or_else(|| err(rule, "required must be true or false")),
    }
}

fn compile_date(value: &Value, rule: &str) -> Result<DateRule, MappingError> {
    let obj = value.as_object().ok_or_else(|| err(rule, "date must be {\"from\", \"zone\", \"to\", \"to_zone\"}"))?;
    let from_formats = match obj.get("from") {
        None => values::AUTO_FORMATS.iter().map(|s| s.to_string()).collect(),
        Some(Value::String(s)) if s == "auto" => values::AUTO_FORMATS.iter().map(|s| s.to_string()).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| err(rule, "date.from must hold format strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err(rule, "date.from must be \"auto\", a format, or a list of formats")),
    };
    let zone = parse_zone(obj.get("zone").and_then(Value::as_str).unwrap_or("+08:00"))
        .map_err(|e| err(rule, format!("date.zone: {e}")))?;
    let to_zone = match obj.get("to_zone").and_then(Value::as_str) {
        Some(z) => parse_zone(z).map_err(|e| err(rule, format!("date.to_zone: {e}")))?,
        None => zone.clone(),
    };
    let to_format = obj
        .get("to")
        .and_then(Value::as_str)
        .ok_or_else(|| err(rule, "date.to (the output format, e.g. %Y%m%d) is required"))?
        .to_string();
    // Reject a broken output format now rather than on the first record.
    let probe = jiff::Timestamp::UNIX_EPOCH.to_zoned_datetime(to_zone.clone());
    jiff::fmt::strtime::format(to_format.as_bytes(), &probe)
        .map_err(|e| err(rule, format!("date.to {to_format:?}: {e}")))?;
    Ok(DateRule { from_formats, zone, to_format, to_zone })
}

fn compile_drop(i: usize, value: &Value) -> Result<DropRule, MappingError> {
    let at = format!("drop_if[{i}]");
    let obj =
        value.as_object().ok_or_else(|| err(&at, "must be an object like {\"field\": \"status\", \"in\": [...]}"))?;
    let field = obj.get("field").and_then(Value::as_str).ok_or_else(|| err(&at, "needs \"field\""))?;
    let path = split_path(field);
    let mut conditions = Vec::new();
    for (key, v) in obj {
        let condition = match key.as_str() {
            "field" | "about" => continue,
            "eq" => Condition::Eq(v.clone()),
            "ne" => Condition::Ne(v.clone()),
            "in" => Condition::In(v.as_array().cloned().ok_or_else(|| err(&at, "\"in\" must be a list"))?),
            "not_in" => Condition::NotIn(v.as_array().cloned().ok_or_else(|| err(&at, "\"not_in\" must be a list"))?),
            "missing" if v == &Value::Bool(true) => Condition::Missing,
            "exists" if v == &Value::Bool(true) => Condition::Exists,
            "gt" => Condition::Gt(values::decimal(v).ok_or_else(|| err(&at, "\"gt\" must be a number"))?),
            "lt" => Condition::Lt(values::decimal(v).ok_or_else(|| err(&at, "\"lt\" must be a number"))?),
            other => {
                return Err(err(
                    &at,
                    format!("unknown condition {other:?} (eq, ne, in, not_in, missing, exists, gt, lt)"),
                ));
            }
        };
        conditions.push((path.clone(), condition));
    }
    if conditions.is_empty() {
        return Err(err(&at, "needs a condition (eq, ne, in, not_in, missing, exists, gt, lt)"));
    }
    Ok(DropRule { text: value.to_string(), conditions })
}

fn compile_amount_check(value: &Value) -> Result<AmountCheck, MappingError> {
    let at = "amount_check";
    let path = |key: &str, default: &str| split_path(value.get(key).and_then(Value::as_str).unwrap_or(default));
    let list = |key: &str| -> Result<Vec<Vec<String>>, MappingError> {
        match value.get(key) {
            None => Ok(Vec::new()),
            Some(v) => paths(v, at, key),
        }
    };
    let tolerance = match value.get("tolerance") {
        None => Decimal::new(1, 2),
        Some(v) => values::decimal(v)
            .filter(|d| !d.is_sign_negative())
            .ok_or_else(|| err(at, "tolerance must be a non-negative number"))?,
    };
    Ok(AmountCheck {
        field: path("field", "amount"),
        against: path("against", "pay_amount"),
        plus: list("plus")?,
        minus: list("minus")?,
        tolerance,
    })
}

#[cfg(test)]
mod tests;
