//! The seed's request config format, accepted verbatim:
//! `{"api","method","number","id","pagination":{"pageSize"},"idCheck","request":[{"field","label","type","value","parser"}]}`
//! with the placeholders `{{LAST_SYNC_TIME|datetime}}`, `{{CURRENT_TIME|datetime}}`,
//! `{PAGINATION_START_PAGE}`, `{PAGINATION_PAGE_SIZE}` (and our `{{START_TS}}`), and the
//! `StringToArray` parser. Compiled once at start (errors name the field); rendered per call.

use jiff::Timestamp;
use orderflow_shared::{jst::MAX_PAGE_SIZE, time::china};
use serde_json::{Map, Value};

/// The one API this project fetches.
pub const SUPPORTED_API: &str = "orders.out.simple.query";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    /// `yyyy-MM-dd HH:mm:ss` China time.
    Datetime,
    /// `yyyy-MM-dd` China time.
    Date,
    /// Unix seconds.
    Unix,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    LastSyncTime(TimeFormat),
    CurrentTime(TimeFormat),
    PageIndex,
    PageSize,
    StartTs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    String,
    Int,
    Bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parser {
    /// Split a string on the separator into an array of non-empty, trimmed strings.
    StringToArray(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub label: Option<String>,
    pub kind: FieldKind,
    pub value: Vec<Piece>,
    pub parser: Option<Parser>,
}

/// How the fetcher walks the source, decided by the placeholders the config uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorKind {
    /// `{{START_TS}}`: the row-version cursor (recommended).
    StartTs,
    /// `{{LAST_SYNC_TIME|…}}` + `{{CURRENT_TIME|…}}`: modified-time windows.
    Modified,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestConfig {
    pub api: String,
    pub method: String,
    /// Source field used as the record's business number (the seed: `o_id`).
    pub number_field: String,
    /// Source field used as the record id (the seed: `o_id`).
    pub id_field: String,
    /// Effective page size (clamped to the API maximum).
    pub page_size: u32,
    /// What the config asked for, to warn once when it was clamped.
    pub requested_page_size: u32,
    pub id_check: bool,
    pub fields: Vec<Field>,
    pub cursor: CursorKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request config: {path}: {message}")]
pub struct ConfigError {
    /// Where in the document, e.g. `request[3].value`.
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { path: path.into(), message: message.into() }
}

/// What one call's values are rendered from.
#[derive(Debug, Clone, Default)]
pub struct RenderContext {
    pub last_sync: Option<Timestamp>,
    pub current: Option<Timestamp>,
    pub page_index: u32,
    pub page_size: u32,
    pub start_ts: Option<i64>,
}

impl RequestConfig {
    pub fn parse_str(text: &str) -> Result<Self, ConfigError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| err("(document)", format!("not valid JSON: {e}")))?;
        Self::from_value(&doc)
    }

    pub fn from_value(doc: &Value) -> Result<Self, ConfigError> {
        let obj = doc.as_object().ok_or_else(|| err("(document)", "must be a JSON object"))?;
        let api = text(obj, "api", None)?;
        if api != SUPPORTED_API {
            return Err(err("api", format!("{api:?} is not supported; only {SUPPORTED_API:?} is")));
        }
        let method = text(obj, "method", Some("POST"))?;
        if !method.eq_ignore_ascii_case("POST") {
            return Err(err("method", format!("{method:?}: the API is called with POST")));
        }
        let number_field = text(obj, "number", Some("o_id"))?;
        let id_field = text(obj, "id", Some("o_id"))?;
        let requested_page_size = requested_page_size(obj)?;
        let id_check = id_check(obj)?;
        let fields = parse_fields(obj)?;
        let cursor = cursor_kind(&fields)?;
        check_unique_names(&fields)?;
        Ok(Self {
            api,
            method,
            number_field,
            id_field,
            page_size: requested_page_size.min(MAX_PAGE_SIZE),
            requested_page_size,
            id_check,
            fields,
            cursor,
        })
    }

    /// The same request reading modified windows instead of the `start_ts` cursor (for the
    /// lagging sweep): the `{{START_TS}}` field and any `is_get_total` are replaced by
    /// `modified_begin`/`modified_end` and `is_get_total=true` (a window walk needs the totals).
    pub fn for_windows(&self) -> RequestConfig {
        let field = |name: &str, kind: FieldKind, value: Vec<Piece>| Field {
            name: name.to_string(),
            label: None,
            kind,
            value,
            parser: None,
        };
        let replaced = ["modified_begin", "modified_end", "is_get_total", "date_type"];
        let mut fields: Vec<Field> = self
            .fields
            .iter()
            .filter(|f| !f.value.contains(&Piece::StartTs) && !replaced.contains(&f.name.as_str()))
            .cloned()
            .collect();
        fields.push(field("modified_begin", FieldKind::String, vec![Piece::LastSyncTime(TimeFormat::Datetime)]));
        fields.push(field("modified_end", FieldKind::String, vec![Piece::CurrentTime(TimeFormat::Datetime)]));
        fields.push(field("is_get_total", FieldKind::Bool, vec![Piece::Text("true".into())]));
        RequestConfig { fields, cursor: CursorKind::Modified, ..self.clone() }
    }

    /// The same request as the audit reads the source: modified windows (as [`for_windows`]),
    /// Confirmed orders only.
    ///
    /// [`for_windows`]: Self::for_windows
    pub fn for_audit(&self) -> RequestConfig {
        let mut audit = self.for_windows();
        audit.fields.retain(|f| f.name != "status");
        audit.fields.push(Field {
            name: "status".into(),
            label: None,
            kind: FieldKind::String,
            value: vec![Piece::Text("Confirmed".into())],
            parser: None,
        });
        audit
    }

    /// The same request asking for these orders by id (`o_ids`, at most 50), whatever their
    /// time or status: the cursor, window and status fields are left out.
    pub fn for_ids(&self, o_ids: &[String]) -> RequestConfig {
        let left_out = ["modified_begin", "modified_end", "is_get_total", "date_type", "status", "start_ts", "o_ids"];
        let time = |p: &Piece| matches!(p, Piece::StartTs | Piece::LastSyncTime(_) | Piece::CurrentTime(_));
        let mut fields: Vec<Field> = self
            .fields
            .iter()
            .filter(|f| !left_out.contains(&f.name.as_str()) && !f.value.iter().any(time))
            .cloned()
            .collect();
        fields.push(Field {
            name: "o_ids".into(),
            label: None,
            kind: FieldKind::String,
            value: vec![Piece::Text(o_ids.join(","))],
            parser: Some(Parser::StringToArray(",".into())),
        });
        RequestConfig { fields, ..self.clone() }
    }

    pub fn was_clamped(&self) -> bool {
        self.requested_page_size > self.page_size
    }

    /// The business parameters of one call; empty values are left out.
    pub fn render(&self, ctx: &RenderContext) -> Map<String, Value> {
        let mut out = Map::with_capacity(self.fields.len());
        for field in &self.fields {
            if let Some(value) = render_field(field, ctx) {
                out.insert(field.name.clone(), value);
            }
        }
        out
    }

    /// The name of the field carrying `{{LAST_SYNC_TIME}}` etc. (for logs).
    pub fn field_names(&self) -> Vec<&str> {
        self.fields.iter().map(|f| f.name.as_str()).collect()
    }
}

/// A top-level string (non-empty); `default` when absent, if there is one.
fn text(obj: &Map<String, Value>, key: &str, default: Option<&str>) -> Result<String, ConfigError> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None if default.is_some() => Ok(default.unwrap_or_default().to_string()),
        Some(other) => Err(err(key, format!("must be a non-empty string, got {other}"))),
        None => Err(err(key, "is required")),
    }
}

/// `pagination.pageSize` as asked (the API maximum when absent).
fn requested_page_size(obj: &Map<String, Value>) -> Result<u32, ConfigError> {
    Ok(match obj.get("pagination").map(|p| p.get("pageSize")) {
        None | Some(None) => MAX_PAGE_SIZE,
        Some(Some(v)) => orderflow_shared::json::lenient_i64(v)
            .filter(|n| *n >= 1 && *n <= 100_000)
            .ok_or_else(|| err("pagination.pageSize", format!("must be a positive integer, got {v}")))?
            as u32,
    })
}

/// `idCheck` (true when absent).
fn id_check(obj: &Map<String, Value>) -> Result<bool, ConfigError> {
    match obj.get("idCheck") {
        None => Ok(true),
        Some(v) => orderflow_shared::json::lenient_bool(v)
            .ok_or_else(|| err("idCheck", format!("must be true or false, got {v}"))),
    }
}

/// Every entry of `request`, compiled.
fn parse_fields(obj: &Map<String, Value>) -> Result<Vec<Field>, ConfigError> {
    let request = obj
        .get("request")
        .and_then(Value::as_array)
        .ok_or_else(|| err("request", "must be an array of {field, type, value, parser}"))?;
    let mut fields = Vec::with_capacity(request.len());
    for (i, item) in request.iter().enumerate() {
        fields.push(parse_field(i, item)?);
    }
    Ok(fields)
}

/// The cursor the placeholders ask for: `{{START_TS}}`, or both window ends, never a mix.
fn cursor_kind(fields: &[Field]) -> Result<CursorKind, ConfigError> {
    let uses = |want: fn(&Piece) -> bool| fields.iter().any(|f| f.value.iter().any(want));
    let start_ts = uses(|p| matches!(p, Piece::StartTs));
    let last_sync = uses(|p| matches!(p, Piece::LastSyncTime(_)));
    let current = uses(|p| matches!(p, Piece::CurrentTime(_)));
    match (start_ts, last_sync, current) {
        (true, false, false) => Ok(CursorKind::StartTs),
        (false, true, true) => Ok(CursorKind::Modified),
        (false, true, false) => Err(err(
            "request",
            "{{LAST_SYNC_TIME}} needs a field with {{CURRENT_TIME}} to close the window (modified_end)",
        )),
        (true, _, _) => Err(err("request", "use either {{START_TS}} or {{LAST_SYNC_TIME}}/{{CURRENT_TIME}}, not both")),
        _ => Err(err(
            "request",
            "no cursor: a field must use {{START_TS}} (start_ts) or {{LAST_SYNC_TIME|datetime}} and {{CURRENT_TIME|datetime}} (modified window)",
        )),
    }
}

fn check_unique_names(fields: &[Field]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, f) in fields.iter().enumerate() {
        if !names.insert(f.name.as_str()) {
            return Err(err(format!("request[{i}].field"), format!("{:?} appears twice", f.name)));
        }
    }
    Ok(())
}

fn parse_field(i: usize, item: &Value) -> Result<Field, ConfigError> {
    let obj = item.as_object().ok_or_else(|| err(format!("request[{i}]"), "must be an object"))?;
    let name = obj
        .get("field")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err(format!("request[{i}].field"), "is required (the API parameter name)"))?
        .to_string();
    let kind = match obj.get("type").and_then(Value::as_str).unwrap_or("string") {
        "string" | "text" | "array" => FieldKind::String,
        "int" | "integer" | "number" | "long" => FieldKind::Int,
        "bool" | "boolean" => FieldKind::Bool,
        other => {
            return Err(err(format!("request[{i}].type"), format!("unknown type {other:?} (use string, int or bool)")));
        }
    };
    let value = match obj.get("value") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => parse_template(s).map_err(|m| err(format!("request[{i}].value"), m))?,
        Some(v @ (Value::Number(_) | Value::Bool(_))) => vec![Piece::Text(v.to_string())],
        Some(other) => return Err(err(format!("request[{i}].value"), format!("must be a string, got {other}"))),
    };
    let parser = match obj.get("parser") {
        None | Some(Value::Null) => None,
        Some(p) => {
            let pname = p.get("name").and_then(Value::as_str).unwrap_or("");
            match pname {
                "StringToArray" => {
                    let sep = p.get("params").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(",");
                    Some(Parser::StringToArray(sep.to_string()))
                }
                other => {
                    return Err(err(
                        format!("request[{i}].parser.name"),
                        format!("unknown parser {other:?} (supported: StringToArray)"),
                    ));
                }
            }
        }
    };
    if kind != FieldKind::String
        && let [Piece::Text(t)] = value.as_slice()
    {
        let ok = match kind {
            FieldKind::Int => t.trim().parse::<i64>().is_ok(),
            FieldKind::Bool => matches!(t.trim(), "true" | "false"),
            FieldKind::String => true,
        };
        if !ok {
            return Err(err(format!("request[{i}].value"), format!("{t:?} is not a valid {kind:?}")));
        }
    }
    Ok(Field { name, label: obj.get("label").and_then(Value::as_str).map(str::to_string), kind, value, parser })
}

/// Splits a value into literal text and placeholders. `{{NAME|format}}` and `{NAME}` forms.
pub fn parse_template(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            pieces.push(Piece::Text(rest[..start].to_string()));
        }
        let double = rest[start..].starts_with("{{");
        let (open, close) = if double { (2, "}}") } else { (1, "}") };
        let inner_start = start + open;
        let end =
            rest[inner_start..].find(close).ok_or_else(|| format!("unclosed placeholder in {text:?}"))? + inner_start;
        let inner = rest[inner_start..end].trim();
        let (name, format) = match inner.split_once('|') {
            Some((n, f)) => (n.trim(), Some(f.trim())),
            None => (inner, None),
        };
        let time_format = |f: Option<&str>| -> Result<TimeFormat, String> {
            match f.unwrap_or("datetime") {
                "datetime" => Ok(TimeFormat::Datetime),
                "date" => Ok(TimeFormat::Date),
                "timestamp" | "unix" => Ok(TimeFormat::Unix),
                other => Err(format!("unknown time format {other:?} in {text:?} (use datetime, date or timestamp)")),
            }
        };
        pieces.push(match name {
            "LAST_SYNC_TIME" => Piece::LastSyncTime(time_format(format)?),
            "CURRENT_TIME" => Piece::CurrentTime(time_format(format)?),
            "PAGINATION_START_PAGE" | "PAGINATION_PAGE" | "PAGE_INDEX" => Piece::PageIndex,
            "PAGINATION_PAGE_SIZE" | "PAGE_SIZE" => Piece::PageSize,
            "START_TS" => Piece::StartTs,
            other => return Err(format!("unknown placeholder {other:?} in {text:?}")),
        });
        rest = &rest[end + close.len()..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Text(rest.to_string()));
    }
    Ok(pieces)
}

fn format_time(ts: Timestamp, format: &TimeFormat) -> String {
    match format {
        TimeFormat::Datetime => orderflow_shared::time::format_china(ts),
        TimeFormat::Date => ts.to_zoned_datetime(china()).strftime("%Y-%m-%d").to_string(),
        TimeFormat::Unix => ts.as_second().to_string(),
    }
}

fn render_field(field: &Field, ctx: &RenderContext) -> Option<Value> {
    let mut text = String::new();
    for piece in &field.value {
        match piece {
            Piece::Text(t) => text.push_str(t),
            Piece::LastSyncTime(f) => text.push_str(&format_time(ctx.last_sync?, f)),
            Piece::CurrentTime(f) => text.push_str(&format_time(ctx.current?, f)),
            Piece::PageIndex => text.push_str(&ctx.page_index.to_string()),
            Piece::PageSize => text.push_str(&ctx.page_size.to_string()),
            Piece::StartTs => text.push_str(&ctx.start_ts?.to_string()),
        }
    }
    if text.trim().is_empty() {
        return None;
    }
    if let Some(Parser::StringToArray(sep)) = &field.parser {
        let items: Vec<Value> = text
            .split(sep.as_str())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::String(s.to_string()))
            .collect();
        return (!items.is_empty()).then_some(Value::Array(items));
    }
    Some(match field.kind {
        FieldKind::String => Value::String(text),
        FieldKind::Int => text.trim().parse::<i64>().map(Value::from).unwrap_or(Value::String(text)),
        FieldKind::Bool => Value::Bool(text.trim() == "true"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../config/seed-request-config.json");
    const DEFAULT: &str = include_str!("../config/default-request-config.json");

    fn ts(text: &str) -> Timestamp {
        orderflow_shared::time::parse_china(text).expect("valid")
    }

    #[test]
    fn the_start_ts_config_reads_windows_for_the_sweep() {
        let c = RequestConfig::parse_str(DEFAULT).expect("parses").for_windows();
        assert_eq!(c.cursor, CursorKind::Modified);
        let biz = c.render(&RenderContext {
            last_sync: Some(ts("2023-10-01 00:00:00")),
            current: Some(ts("2023-10-01 02:00:00")),
            page_index: 3,
            page_size: 50,
            start_ts: None,
        });
        assert_eq!(biz.get("modified_begin"), Some(&Value::String("2023-10-01 00:00:00".into())));
        assert_eq!(biz.get("modified_end"), Some(&Value::String("2023-10-01 02:00:00".into())));
        assert_eq!(biz.get("is_get_total"), Some(&Value::Bool(true)), "a window walk needs the totals");
        assert_eq!(biz.get("status"), Some(&Value::String("Confirmed".into())), "the account's own filters stay");
        assert!(biz.get("start_ts").is_none());
    }

    #[test]
    fn the_audit_reads_confirmed_orders_by_window_and_a_repair_asks_by_id() {
        let seed = RequestConfig::parse_str(SEED).expect("parses");
        let window = RenderContext {
            last_sync: Some(ts("2023-10-01 00:00:00")),
            current: Some(ts("2023-10-02 00:00:00")),
            page_index: 2,
            page_size: 50,
            start_ts: None,
        };
        let biz = seed.for_audit().render(&window);
        assert_eq!(biz.get("status"), Some(&Value::String("Confirmed".into())), "Confirmed, whatever the config asks");
        assert_eq!(biz.get("modified_end"), Some(&Value::String("2023-10-02 00:00:00".into())));
        let ids = ["11".to_string(), "12".to_string()];
        for config in [seed, RequestConfig::parse_str(DEFAULT).expect("parses")] {
            let biz = config.for_ids(&ids).render(&RenderContext { page_index: 1, page_size: 50, ..window.clone() });
            assert_eq!(biz.get("o_ids"), Some(&serde_json::json!(["11", "12"])), "{biz:?}");
            for absent in ["modified_begin", "modified_end", "start_ts", "status"] {
                assert!(biz.get(absent).is_none(), "{absent} in {biz:?}");
            }
            assert_eq!(biz.get("page_index"), Some(&Value::String("1".into())));
        }
    }

    #[test]
    fn the_seed_config_is_accepted_verbatim_as_a_modified_window_config() {
        let c = RequestConfig::parse_str(SEED).expect("seed config parses");
        assert_eq!(c.cursor, CursorKind::Modified);
        assert_eq!(c.id_field, "o_id");
        assert_eq!(c.number_field, "o_id");
        assert!(c.id_check);
        assert_eq!(c.requested_page_size, 100);
        assert_eq!(c.page_size, 50, "clamped to the API maximum");
        assert!(c.was_clamped());
    }

    #[test]
    fn the_seed_config_renders_a_valid_call_leaving_out_empty_values() {
        let c = RequestConfig::parse_str(SEED).expect("parses");
        let biz = c.render(&RenderContext {
            last_sync: Some(ts("2023-10-01 00:00:00")),
            current: Some(ts("2023-10-02 00:00:00")),
            page_index: 1,
            page_size: c.page_size,
            start_ts: None,
        });
        assert_eq!(biz["status"], "Confirmed");
        assert_eq!(biz["modified_begin"], "2023-10-01 00:00:00");
        assert_eq!(biz["modified_end"], "2023-10-02 00:00:00");
        assert_eq!(biz["page_index"], "1");
        assert_eq!(biz["page_size"], "50");
        for empty in ["shop_id", "is_offline_shop", "so_ids"] {
            assert!(!biz.contains_key(empty), "{empty} has no value and must not be sent");
        }
    }

    #[test]
    fn string_to_array_splits_and_trims() {
        let doc = serde_json::json!({
            "api": SUPPORTED_API,
            "request": [
                {"field": "so_ids", "type": "string", "value": "SO123, SO124,,", "parser": {"name": "StringToArray", "params": ","}},
                {"field": "start_ts", "type": "int", "value": "{{START_TS}}"}
            ]
        });
        let c = RequestConfig::from_value(&doc).expect("parses");
        let biz =
            c.render(&RenderContext { start_ts: Some(5), page_index: 1, page_size: 50, ..RenderContext::default() });
        assert_eq!(biz["so_ids"], serde_json::json!(["SO123", "SO124"]));
        assert_eq!(biz["start_ts"], serde_json::json!(5));
    }

    #[test]
    fn the_shipped_default_uses_the_start_ts_cursor() {
        let c = RequestConfig::parse_str(DEFAULT).expect("parses");
        assert_eq!(c.cursor, CursorKind::StartTs);
        let biz =
            c.render(&RenderContext { start_ts: Some(0), page_index: 1, page_size: 50, ..RenderContext::default() });
        assert_eq!(biz["start_ts"], serde_json::json!(0));
        assert_eq!(biz["is_get_total"], serde_json::json!(false));
    }

    #[test]
    fn a_malformed_config_names_the_field() {
        let bad = |doc: serde_json::Value| RequestConfig::from_value(&doc).expect_err("invalid").to_string();
        assert!(bad(serde_json::json!({"api": "orders.query", "request": []})).contains("api"));
        let e = bad(serde_json::json!({"api": SUPPORTED_API, "request": [{"field": "x", "value": "{{NOPE}}"}]}));
        assert!(e.contains("request[0].value") && e.contains("NOPE"), "{e}");
        let e = bad(
            serde_json::json!({"api": SUPPORTED_API, "request": [{"field": "start_ts", "type": "decimal", "value": "{{START_TS}}"}]}),
        );
        assert!(e.contains("request[0].type"), "{e}");
        let e = bad(serde_json::json!({"api": SUPPORTED_API, "pagination": {"pageSize": "lots"}, "request": []}));
        assert!(e.contains("pagination.pageSize"), "{e}");
        let e = bad(serde_json::json!({"api": SUPPORTED_API, "request": [{"field": "status", "value": "Confirmed"}]}));
        assert!(e.contains("no cursor"), "{e}");
        let e = bad(
            serde_json::json!({"api": SUPPORTED_API, "request": [{"field": "p", "parser": {"name": "Magic"}, "value": "{{START_TS}}"}]}),
        );
        assert!(e.contains("request[0].parser.name"), "{e}");
    }

    #[test]
    fn templates_parse_both_brace_styles_and_formats() {
        assert_eq!(
            parse_template("{{LAST_SYNC_TIME|date}}x{PAGINATION_PAGE_SIZE}").expect("ok"),
            vec![Piece::LastSyncTime(TimeFormat::Date), Piece::Text("x".into()), Piece::PageSize]
        );
        assert!(parse_template("{{CURRENT_TIME|weird}}").is_err());
        assert!(parse_template("{{CURRENT_TIME").is_err());
    }
}
