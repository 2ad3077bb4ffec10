//! Wire messages between the stages (JSON, persistent) and the header names they carry.
//! Parse at the boundary into these types; a new schema version is a new `schema` string.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const PAGE_SCHEMA: &str = "orderflow.page.v1";
pub const RECORD_SCHEMA: &str = "orderflow.record.v1";
pub const JOB_SCHEMA: &str = "orderflow.job.v1";

/// Header names. The attempt count is our own header, never `x-death`.
pub mod header {
    pub const ATTEMPT: &str = "x-orderflow-attempt";
    pub const TRACEPARENT: &str = "traceparent";
    pub const STAGE: &str = "x-orderflow-stage";
    pub const ERROR_CLASS: &str = "x-orderflow-error-class";
    pub const ERROR: &str = "x-orderflow-error";
    /// A fixed, label-safe reason (`invalid_record`, `target_rejected`, …) for filters and metrics.
    pub const REASON: &str = "x-orderflow-reason";
    pub const ORIGIN_EXCHANGE: &str = "x-orderflow-origin-exchange";
    pub const ORIGIN_ROUTING_KEY: &str = "x-orderflow-origin-routing-key";
    pub const REPLAYS: &str = "x-orderflow-replays";
    /// When the fetcher published the page this message came from (unix milliseconds): carried
    /// to the writer so fetch-to-write latency can be measured.
    pub const FETCHED_AT_MS: &str = "x-orderflow-fetched-at-ms";
    /// When the message was dead-lettered (unix milliseconds).
    pub const DEAD_AT_MS: &str = "x-orderflow-dead-at-ms";
    /// The record's id (the source's `o_id` by default), for finding one order in logs and dead letters.
    pub const ORDER_ID: &str = "x-orderflow-order-id";
    /// The source's ids of the order a record or a rejected order is (for the ledger and for
    /// people reading dead letters): `o_id`, `so_id` (the shop's order number), `io_id`.
    pub const SOURCE_O_ID: &str = "x-orderflow-o-id";
    pub const SOURCE_SO_ID: &str = "x-orderflow-so-id";
    pub const SOURCE_IO_ID: &str = "x-orderflow-io-id";
    /// How often a record was parked: held (the target refusing everyone) for longer than
    /// `HOLD_LIMIT`, then republished to a retry tier with its attempt count unchanged.
    pub const PARKED: &str = "x-orderflow-parked";
}

/// A raw page of Jushuitan orders as fetched (`<ns>.pages`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub schema: String,
    /// The source account (merchant) the page came from.
    pub account: String,
    /// Where in the source this page was read (mode-specific), for tracing a page back.
    pub cursor: Value,
    /// RFC 3339 with zone.
    pub fetched_at: String,
    /// The `datas[]` rows exactly as the API returned them.
    pub orders: Vec<Value>,
}

/// One mapped order (`<ns>.records`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema: String,
    pub account: String,
    /// The target record id (the source's `o_id` by default).
    pub id: String,
    /// The source row version (`ts`, else `modified`): a newer version has a new message id.
    pub version: String,
    /// The mapped record, posted as the write API's `data`.
    pub data: Value,
}

/// A record as the writer reads it: `data` stays the JSON text it arrived as (borrowed from the
/// message body), so it is posted without being parsed into a tree and serialized again.
#[derive(Debug, Deserialize)]
pub struct RawRecord<'a> {
    pub schema: String,
    pub account: String,
    pub id: String,
    pub version: String,
    #[serde(borrow)]
    pub data: &'a serde_json::value::RawValue,
}

impl Record {
    pub fn message_id(&self) -> String {
        record_message_id(&self.account, &self.id, &self.version)
    }
}

/// `<account>:<id>:<version>`: the same order version always has the same id, so every hop
/// can be repeated safely.
pub fn record_message_id(account: &str, id: &str, version: &str) -> String {
    format!("{account}:{id}:{version}")
}

/// Deterministic page id from account + cursor position + page number.
pub fn page_message_id(account: &str, cursor_key: &str, page_index: u32) -> String {
    format!("page:{account}:{cursor_key}:p{page_index}")
}

/// Reads just the `schema` string of a message body, for routing and for rejecting unknown
/// versions with a clear reason.
pub fn schema_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        schema: String,
    }
    serde_json::from_slice::<Probe>(body).ok().map(|p| p.schema)
}

pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_deterministic() {
        assert_eq!(record_message_id("acme", "42", "1001"), "acme:42:1001");
        assert_eq!(page_message_id("acme", "ts:17", 1), "page:acme:ts:17:p1");
    }

    #[test]
    fn schema_is_read_without_parsing_the_rest() {
        assert_eq!(schema_of(br#"{"schema":"orderflow.page.v1","orders":[1]}"#).as_deref(), Some(PAGE_SCHEMA));
        assert_eq!(schema_of(b"not json"), None);
        assert_eq!(schema_of(br#"{"schema":5}"#), None);
    }

    #[test]
    fn amounts_survive_a_round_trip_exactly() {
        let page: Page = serde_json::from_str(
            r#"{"schema":"orderflow.page.v1","account":"a","cursor":{},"fetched_at":"x","orders":[{"pay_amount":12345678901234567.89}]}"#,
        )
        .expect("parses");
        assert!(serde_json::to_string(&page).expect("serializes").contains("12345678901234567.89"));
    }
}
