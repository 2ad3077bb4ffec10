//! Small JSON helpers: exact numbers (serde_json keeps number text with `arbitrary_precision`),
//! and lenient readers for APIs that send numbers and booleans as strings too.

use serde_json::{Number, Value};

/// A JSON number with exactly this text (e.g. `"150.75"`); `None` if it is not a JSON number.
pub fn number(text: &str) -> Option<Value> {
    text.parse::<Number>().ok().map(Value::Number)
}

/// An integer given as a JSON number or a numeric string.
pub fn lenient_i64(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            let f = n.as_f64()?;
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean given as JSON `true`/`false` or the strings `"true"`/`"false"` (any case), `1`/`0`.
pub fn lenient_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

/// Text of a scalar: strings as they are, numbers and booleans rendered.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_keep_their_exact_text() {
        let v = number("150.70").expect("number");
        assert_eq!(serde_json::to_string(&v).expect("serializes"), "150.70");
        assert!(number("1,5").is_none());
    }

    #[test]
    fn lenient_readers_accept_strings_too() {
        assert_eq!(lenient_i64(&json!("12")), Some(12));
        assert_eq!(lenient_i64(&json!(12)), Some(12));
        assert_eq!(lenient_i64(&json!("x")), None);
        assert_eq!(lenient_bool(&json!("FALSE")), Some(false));
        assert_eq!(lenient_bool(&json!(true)), Some(true));
        assert_eq!(lenient_bool(&json!("maybe")), None);
    }
}
