//! Value helpers for the mapping engine: dotted paths, exact decimals from JSON numbers or
//! strings, date/time reformatting with zones, and type coercion. Errors name the value.

use std::str::FromStr;

use jiff::{civil::DateTime, tz::TimeZone};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Map, Value};

/// Reads `a.b.c` (object keys; a numeric segment indexes an array).
pub fn get<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut current = value;
    for segment in path {
        current = match current {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// Absent, null, or an empty/blank string.
pub fn is_missing(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.trim().is_empty(),
        _ => false,
    }
}

/// Writes `value` at a dotted target path, creating objects on the way.
pub fn set(target: &mut Map<String, Value>, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut current = target;
    for segment in parents {
        let entry = current.entry(segment.clone()).or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { return };
        current = next;
    }
    current.insert(last.clone(), value);
}

pub fn split_path(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

/// Short rendering of a value for reasons (never the whole record).
pub fn show(value: &Value) -> String {
    let text = value.to_string();
    if text.len() > 80 {
        let mut end = 80;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    }
}

/// An exact decimal from a JSON number (its text) or a numeric string.
pub fn decimal(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => decimal_text(n.as_str()),
        Value::String(s) => decimal_text(s.trim()),
        _ => None,
    }
}

/// An exact decimal from number text (plain or with an exponent).
pub fn decimal_text(text: &str) -> Option<Decimal> {
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str_exact(text).or_else(|_| Decimal::from_str(text)).ok()
    }
}

/// A decimal as an exact JSON number.
pub fn decimal_value(d: Decimal) -> Value {
    orderflow_shared::json::number(&d.to_string()).unwrap_or(Value::Null)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    HalfEven,
    HalfUp,
    HalfDown,
    Down,
    Up,
    Floor,
    Ceiling,
}

impl Rounding {
    pub fn parse(text: &str) -> Option<Rounding> {
        Some(match text {
            "half_even" | "bankers" => Rounding::HalfEven,
            "half_up" => Rounding::HalfUp,
            "half_down" => Rounding::HalfDown,
            "down" | "truncate" => Rounding::Down,
            "up" => Rounding::Up,
            "floor" => Rounding::Floor,
            "ceiling" | "ceil" => Rounding::Ceiling,
            _ => return None,
        })
    }

    pub fn apply(self, d: Decimal, scale: u32) -> Decimal {
        let strategy = match self {
            Rounding::HalfEven => RoundingStrategy::MidpointNearestEven,
            Rounding::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            Rounding::HalfDown => RoundingStrategy::MidpointTowardZero,
            Rounding::Down => RoundingStrategy::ToZero,
            Rounding::Up => RoundingStrategy::AwayFromZero,
            Rounding::Floor => RoundingStrategy::ToNegativeInfinity,
            Rounding::Ceiling => RoundingStrategy::ToPositiveInfinity,
        };
        let mut rounded = d.round_dp_with_strategy(scale, strategy);
        rounded.rescale(scale);
        rounded
    }
}

/// Parses a zone: `+08:00`, `-05:30`, `UTC`/`Z`, or an IANA name (`Asia/Shanghai`).
pub fn parse_zone(text: &str) -> Result<TimeZone, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("utc") || t == "Z" {
        return Ok(TimeZone::UTC);
    }
    if let Some(sign) = t.chars().next().filter(|c| *c == '+' || *c == '-') {
        let rest = &t[1..];
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        let (h, m): (i32, i32) =
            (h.parse().map_err(|_| format!("bad zone {t:?}"))?, m.parse().map_err(|_| format!("bad zone {t:?}"))?);
        let secs = (h * 3600 + m * 60) * if sign == '-' { -1 } else { 1 };
        let offset = jiff::tz::Offset::from_seconds(secs).map_err(|e| format!("bad zone {t:?}: {e}"))?;
        return Ok(TimeZone::fixed(offset));
    }
    TimeZone::get(t).map_err(|e| format!("unknown time zone {t:?}: {e}"))
}

/// Input formats tried when a date rule says `"from": "auto"`: what Jushuitan sends.
pub const AUTO_FORMATS: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d",
    "%Y%m%d",
];

fn is_plain_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Fast path for what Jushuitan sends: `yyyy-MM-dd HH:mm:ss[.f…]` or `yyyy-MM-dd`.
fn parse_jushuitan(text: &str) -> Option<DateTime> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i32> {
        let part = b.get(range)?;
        if part.iter().all(u8::is_ascii_digit) { std::str::from_utf8(part).ok()?.parse().ok() } else { None }
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let date = jiff::civil::Date::new(num(0..4)? as i16, num(5..7)? as i8, num(8..10)? as i8).ok()?;
    if b.len() == 10 {
        return Some(date.to_datetime(jiff::civil::Time::midnight()));
    }
    if b.len() < 19 || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let mut nanos = 0i32;
    if b.len() > 19 {
        let frac = b.get(20..)?;
        if b[19] != b'.' || frac.is_empty() || frac.len() > 9 || !frac.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value: i32 = std::str::from_utf8(frac).ok()?.parse().ok()?;
        nanos = value * 10i32.pow(9 - frac.len() as u32);
    }
    let time = jiff::civil::Time::new(num(11..13)? as i8, num(14..16)? as i8, num(17..19)? as i8, nanos).ok()?;
    Some(date.to_datetime(time))
}

/// Parses `text` with the first matching format, as a civil time in `zone`.
pub fn parse_datetime(text: &str, formats: &[String], zone: &TimeZone) -> Option<jiff::ZonedDateTime> {
    let text = text.trim();
    if formats.first().is_some_and(|f| f == AUTO_FORMATS[0])
        && let Some(dt) = parse_jushuitan(text)
    {
        return dt.to_zoned_datetime(zone.clone()).ok();
    }
    for format in formats {
        if let Ok(dt) = DateTime::strptime(format, text) {
            return dt.to_zoned_datetime(zone.clone()).ok();
        }
        if let Ok(date) = jiff::civil::Date::strptime(format, text) {
            return date.to_datetime(jiff::civil::Time::midnight()).to_zoned_datetime(zone.clone()).ok();
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coerce {
    String,
    Number,
    Integer,
    Bool,
}

impl Coerce {
    pub fn parse(text: &str) -> Option<Coerce> {
        Some(match text {
            "string" | "text" => Coerce::String,
            "number" | "decimal" => Coerce::Number,
            "integer" | "int" => Coerce::Integer,
            "bool" | "boolean" => Coerce::Bool,
            _ => return None,
        })
    }

    /// Converts or explains why not.
    pub fn apply(self, value: Value) -> Result<Value, String> {
        match (self, value) {
            (_, Value::Null) => Ok(Value::Null),
            (Coerce::String, Value::String(s)) => Ok(Value::String(s)),
            (Coerce::String, v @ (Value::Number(_) | Value::Bool(_))) => Ok(Value::String(match &v {
                Value::Number(n) => n.to_string(),
                other => other.to_string(),
            })),
            // An exact JSON number is kept as it is (its text is already exact).
            (Coerce::Number, Value::Number(n)) if decimal_text(n.as_str()).is_some() => Ok(Value::Number(n)),
            (Coerce::Number, v) => {
                decimal(&v).map(decimal_value).ok_or_else(|| format!("{} is not a number", show(&v)))
            }
            (Coerce::Integer, Value::Number(n)) if is_plain_integer(n.as_str()) => Ok(Value::Number(n)),
            (Coerce::Integer, v) => {
                let d = decimal(&v).ok_or_else(|| format!("{} is not an integer", show(&v)))?;
                if d.fract() != Decimal::ZERO {
                    return Err(format!("{} is not an integer", show(&v)));
                }
                Ok(decimal_value(d.trunc()))
            }
            (Coerce::Bool, v) => orderflow_shared::json::lenient_bool(&v)
                .map(Value::Bool)
                .ok_or_else(|| format!("{} is not a boolean", show(&v))),
            (_, v) => Err(format!("{} cannot be converted", show(&v))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_are_exact_from_numbers_strings_and_exponents() {
        assert_eq!(decimal(&json!(50.25)), Some(Decimal::new(5025, 2)));
        assert_eq!(decimal(&json!("0.1")), Some(Decimal::new(1, 1)));
        assert_eq!(decimal(&orderflow_shared::json::number("1e2").expect("n")), Some(Decimal::new(100, 0)));
        assert_eq!(decimal(&json!("abc")), None);
        assert_eq!(decimal(&orderflow_shared::json::number("1e400").expect("n")), None);
    }

    #[test]
    fn rounding_modes_differ_where_they_should() {
        let d = Decimal::new(2345, 3); // 2.345
        assert_eq!(Rounding::HalfEven.apply(d, 2).to_string(), "2.34");
        assert_eq!(Rounding::HalfUp.apply(d, 2).to_string(), "2.35");
        assert_eq!(Rounding::Down.apply(d, 2).to_string(), "2.34");
        assert_eq!(Rounding::Ceiling.apply(d, 2).to_string(), "2.35");
        assert_eq!(Rounding::HalfUp.apply(Decimal::new(3, 0), 2).to_string(), "3.00");
    }

    #[test]
    fn paths_read_and_write_nested_values() {
        let v = json!({"a": {"b": [10, {"c": "x"}]}});
        assert_eq!(get(&v, &split_path("a.b.1.c")), Some(&json!("x")));
        assert_eq!(get(&v, &split_path("a.z")), None);
        let mut out = Map::new();
        set(&mut out, &split_path("shop.id"), json!(5));
        assert_eq!(Value::Object(out), json!({"shop": {"id": 5}}));
    }

    #[test]
    fn coercion_converts_or_names_the_value() {
        assert_eq!(Coerce::String.apply(json!(12345)), Ok(json!("12345")));
        assert_eq!(Coerce::Number.apply(json!("12.50")).expect("ok").to_string(), "12.50");
        assert!(Coerce::Integer.apply(json!("1.5")).expect_err("not int").contains("1.5"));
        assert_eq!(Coerce::Bool.apply(json!("true")), Ok(json!(true)));
    }

    #[test]
    fn the_fast_path_agrees_with_strptime() {
        let zone = parse_zone("+08:00").expect("zone");
        let auto: Vec<String> = AUTO_FORMATS.iter().map(|s| s.to_string()).collect();
        let strict: Vec<String> = AUTO_FORMATS[1..].iter().map(|s| s.to_string()).collect();
        for text in [
            "2021-09-18 11:02:19",
            "2021-09-18 11:02:19.807",
            "2021-09-18 11:02:19.5",
            "2023-10-01",
            "2024-02-29 23:59:59",
        ] {
            let fast = parse_datetime(text, &auto, &zone).expect("fast");
            let slow = parse_datetime(text, &strict, &zone)
                .or_else(|| parse_datetime(text, &["%Y-%m-%d %H:%M:%S%.f".to_string()], &zone))
                .expect("slow");
            assert_eq!(fast, slow, "{text}");
        }
        for bad in ["2023-02-30", "2023-10-01 25:00:00", "2023-10-01 10:00:00.", "2023-10-01x10:00:00", "2023-1-01"] {
            assert!(parse_jushuitan(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn zones_parse_offsets_and_names() {
        assert!(parse_zone("+08:00").is_ok());
        assert!(parse_zone("UTC").is_ok());
        assert!(parse_zone("Asia/Shanghai").is_ok());
        assert!(parse_zone("Mars/Base").is_err());
    }
}
