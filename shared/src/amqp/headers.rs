//! Reading and writing message headers, and the message properties every publish uses.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

/// Persistent JSON message with a deterministic id and the given headers.
pub fn json_properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message_id))
        .with_timestamp(jiff::Timestamp::now().as_second().max(0) as u64)
        .with_headers(headers)
}

/// The message id, or empty when the publisher set none.
pub fn message_id(props: &BasicProperties) -> String {
    props.message_id().as_ref().map(|s| s.as_str().to_string()).unwrap_or_default()
}

pub fn get<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref().and_then(|h| h.inner().get(key))
}

/// A header as text (strings, and numbers rendered as text).
pub fn get_str(props: &BasicProperties, key: &str) -> Option<String> {
    value_str(get(props, key)?)
}

/// A header as an integer, whatever integer width (or numeric string) the publisher used.
pub fn get_i64(props: &BasicProperties, key: &str) -> Option<i64> {
    value_i64(get(props, key)?)
}

pub fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        other => value_i64(other).map(|n| n.to_string()),
    }
}

pub fn value_i64(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

pub fn set_str(table: &mut FieldTable, key: &str, value: &str) {
    table.insert(ShortString::from(key), AMQPValue::LongString(LongString::from(value)));
}

pub fn set_i64(table: &mut FieldTable, key: &str, value: i64) {
    table.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

/// A copy of the message's headers (empty if none).
pub fn headers_of(props: &BasicProperties) -> FieldTable {
    props.headers().clone().unwrap_or_default()
}

/// Drops the broker's own dead-letter history (`x-death`, `x-first-death-*`, `x-last-death-*`).
/// Kept, it can make RabbitMQ take a replayed or retried message for a dead-letter cycle and
/// drop it silently.
pub fn strip_broker_death_headers(table: &FieldTable) -> FieldTable {
    let mut out = FieldTable::default();
    for (key, value) in table.inner() {
        let k = key.as_str();
        if k == "x-death" || k.starts_with("x-first-death-") || k.starts_with("x-last-death-") {
            continue;
        }
        out.insert(key.clone(), value.clone());
    }
    out
}

/// Truncates text for a header, on a character boundary.
pub fn clip(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_read_whatever_width_was_used() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongInt(3));
        t.insert("b".into(), AMQPValue::ShortShortUInt(4));
        t.insert("c".into(), AMQPValue::LongString("5".into()));
        let props = BasicProperties::default().with_headers(t);
        assert_eq!(get_i64(&props, "a"), Some(3));
        assert_eq!(get_i64(&props, "b"), Some(4));
        assert_eq!(get_i64(&props, "c"), Some(5));
        assert_eq!(get_i64(&props, "missing"), None);
        assert_eq!(get_str(&props, "a").as_deref(), Some("3"));
    }

    #[test]
    fn broker_death_headers_are_stripped_and_ours_kept() {
        let mut t = FieldTable::default();
        t.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        t.insert("x-first-death-queue".into(), AMQPValue::LongString("q".into()));
        t.insert("x-last-death-reason".into(), AMQPValue::LongString("expired".into()));
        set_i64(&mut t, "x-orderflow-attempt", 2);
        let out = strip_broker_death_headers(&t);
        assert_eq!(out.inner().len(), 1);
        assert!(out.inner().contains_key("x-orderflow-attempt"));
    }

    #[test]
    fn clipping_respects_character_boundaries() {
        assert_eq!(clip("订单编号", 4), "订…");
        assert_eq!(clip("short", 10), "short");
    }
}
