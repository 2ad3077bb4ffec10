//! The ledger's index: which ledger batch names which orders, small enough to read a day of in
//! seconds. Reading the ledger itself for one order means reading every batch of the window
//! (RabbitMQ 3.10 streams have no server-side filter over AMQP 0-9-1); the index is a second
//! stream, `<ns>.ledger.index`, with one small entry per batch — the batch's message id, when it
//! was appended, and a 32-bit key of every o_id, so_id and io_id it names — a few percent of the
//! ledger's bytes. `orderflow trace` reads the index, then seeks into the ledger only around
//! the batches whose entries hold the id's key (see `amqp::ledger_index`).
//!
//! Wire format (`orderflow.ledger.index.v1`), one JSON object per stream message:
//! `{"schema":"orderflow.ledger.index.v1","batch":"ledger:host-1:1733570000123:42","at_ms":1733570000123,"keys":"/ssXq2Ab…"}`;
//! `keys` is every key's four bytes (big-endian, sorted) in standard base64. A stage sends a
//! batch's entry, then the batch, and counts the batch appended only when both are confirmed
//! (else both go again under a new id), so every event is in a batch the index names; a batch
//! stored without its entry is a duplicate, an entry without its batch costs a reader a look.

use base64::{Engine, engine::general_purpose::STANDARD};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::ledger::{Batch, Event};

pub const INDEX_SCHEMA: &str = "orderflow.ledger.index.v1";

/// An order id's key in the index: the first 32 bits of its MD5. Ids may share a key (a full
/// 4 GiB ledger names some 19 million ids: one of them shares the key looked for about once in
/// 230 traces): a reader checks the batch itself, so a shared key costs a look, never a wrong
/// answer. (24 bits, tried first, made that a look or more in every trace of a full ledger.)
pub fn key(id: &str) -> u32 {
    let digest = Md5::digest(id.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// A batch ready for the sink: its body and the keys of every order id its events name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub body: Vec<u8>,
    /// Sorted, without repeats.
    pub keys: Vec<u32>,
}

impl Encoded {
    pub fn of(batch: &Batch) -> serde_json::Result<Encoded> {
        Ok(Encoded { body: serde_json::to_vec(batch)?, keys: keys_of(&batch.events) })
    }
}

/// The keys of every o_id, so_id and io_id in `events`, sorted, without repeats.
pub fn keys_of(events: &[Event]) -> Vec<u32> {
    let mut keys: Vec<u32> =
        events.iter().flat_map(|e| [&e.o_id, &e.so_id, &e.io_id]).filter_map(|id| id.as_deref().map(key)).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// One index entry: the ledger batch `batch` (its AMQP message id) names the orders of `keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub schema: String,
    pub batch: String,
    /// When the stage appended the entry (its clock, ms since the epoch); the batch reaches the
    /// ledger just after.
    pub at_ms: i64,
    pub keys: String,
}

impl Entry {
    pub fn new(batch: &str, at_ms: i64, keys: &[u32]) -> Entry {
        let bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_be_bytes()).collect();
        Entry { schema: INDEX_SCHEMA.into(), batch: batch.into(), at_ms, keys: STANDARD.encode(bytes) }
    }

    /// Whether the entry holds `key` (at a key's boundary, not straddling two).
    pub fn holds(&self, key: u32) -> bool {
        let wanted = key.to_be_bytes();
        STANDARD.decode(&self.keys).is_ok_and(|bytes| bytes.chunks_exact(4).any(|chunk| chunk == wanted))
    }
}

/// Where to look in the ledger: batches appended close together, read in one pass from a little
/// before the first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// The earliest and latest `at_ms` of its entries.
    pub from_ms: i64,
    pub to_ms: i64,
    /// The batches' message ids.
    pub batches: Vec<String>,
}

/// Groups entries (batch id, `at_ms`) into spans: entries less than `gap_ms` apart share one, so
/// one read covers an order's fetch, transform and write (milliseconds to seconds apart) while a
/// retry an hour later gets a read of its own. A batch named by several entries (its append was
/// tried again) is sought from its first.
pub fn spans(mut entries: Vec<(String, i64)>, gap_ms: i64) -> Vec<Span> {
    entries.sort_by_key(|(_, at)| *at);
    let mut spans: Vec<Span> = Vec::new();
    for (batch, at) in entries {
        if spans.iter().any(|s| s.batches.contains(&batch)) {
            continue;
        }
        match spans.last_mut() {
            Some(span) if at - span.to_ms < gap_ms => {
                span.to_ms = at;
                span.batches.push(batch);
            }
            _ => spans.push(Span { from_ms: at, to_ms: at, batches: vec![batch] }),
        }
    }
    spans
}

/// `<head>:<ms>:<random>`: the head and the time (ms since the epoch).
fn split_id(message_id: &str) -> Option<(&str, i64)> {
    let mut parts = message_id.rsplitn(3, ':');
    let _random = parts.next()?;
    let ms = parts.next()?.parse().ok()?;
    Some((parts.next()?, ms))
}

/// The time a stage's batch id (`ledger:<replica>:<ms>:<random>`) or a reader's marker
/// (`ledger-read:<ms>:<random>`) carries, in ms since the epoch.
pub fn id_time_ms(message_id: &str) -> Option<i64> {
    split_id(message_id).map(|(_, ms)| ms)
}

/// A stage's batch id, `ledger:<replica>:<ms>:<random>`: its replica and time.
pub fn batch_origin(message_id: &str) -> Option<(&str, i64)> {
    split_id(message_id.strip_prefix("ledger:")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{LEDGER_SCHEMA, What};

    fn event(o_id: &str, so_id: Option<&str>) -> Event {
        Event::new(What::Transformed, "m1", "x").order(Some(o_id.into()), so_id.map(str::to_string), None)
    }

    #[test]
    fn keys_are_stable_and_name_every_id_once() {
        // The wire format: a reader of another version must compute the same key.
        assert_eq!(key("100000183"), 0xfecb_1770, "MD5 fecb1770…: its first four bytes");
        assert_eq!(key("SO10000000183"), key("SO10000000183"));
        let events = vec![event("1", Some("SO-1")), event("1", Some("SO-1")), event("2", None)];
        let keys = keys_of(&events);
        assert_eq!(keys.len(), 3, "1, SO-1 and 2, once each");
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted");
        let batch =
            Batch { schema: LEDGER_SCHEMA.into(), stage: "writer".into(), replica: "r".into(), events: events.clone() };
        assert_eq!(Encoded::of(&batch).expect("encodes").keys, keys);
    }

    #[test]
    fn an_entry_holds_exactly_its_keys() {
        let keys = keys_of(&[event("1", Some("SO-1")), event("2", None)]);
        let entry = Entry::new("ledger:r:5:1", 5, &keys);
        assert_eq!(entry.keys.len(), 16, "12 bytes in base64");
        for id in ["1", "SO-1", "2"] {
            assert!(entry.holds(key(id)), "{id}");
        }
        assert!(!entry.holds(key("3")));
        // A key made of the end of one and the start of the next is not held.
        let bytes = STANDARD.decode(&entry.keys).expect("base64");
        let straddling = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
        assert!(!keys.contains(&straddling) && !entry.holds(straddling));
        let json = serde_json::to_value(&entry).expect("json");
        assert_eq!(json["schema"], INDEX_SCHEMA);
        assert_eq!(serde_json::from_value::<Entry>(json).expect("back"), entry);
    }

    #[test]
    fn entries_close_together_share_a_span_and_a_repeated_batch_is_sought_from_its_first_entry() {
        let entries = vec![
            ("w1".to_string(), 10_400),
            ("f1".to_string(), 10_000),
            ("t1".to_string(), 10_100),
            ("w1".to_string(), 10_900),
            ("r1".to_string(), 3_610_000),
        ];
        let spans = spans(entries, 10_000);
        assert_eq!(spans.len(), 2, "{spans:?}");
        assert_eq!((spans[0].from_ms, spans[0].to_ms), (10_000, 10_400));
        assert_eq!(spans[0].batches, ["f1", "t1", "w1"]);
        assert_eq!(spans[1].batches, ["r1"]);
    }

    #[test]
    fn ids_carry_their_time() {
        assert_eq!(id_time_ms("ledger:host-1:1733570000123:42"), Some(1_733_570_000_123));
        assert_eq!(id_time_ms("ledger:a:b:c:1733570000123:42"), Some(1_733_570_000_123), "a replica name with ':'");
        assert_eq!(id_time_ms("ledger-read:1733570000999:7"), Some(1_733_570_000_999));
        assert_eq!(id_time_ms("junk"), None);
        assert_eq!(batch_origin("ledger:a:b:1733570000123:42"), Some(("a:b", 1_733_570_000_123)));
        assert_eq!(batch_origin("ledger-read:1733570000999:7"), None, "a marker is no batch");
    }
}
