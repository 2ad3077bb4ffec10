//! Finding one order's events through the ledger's index (`crate::ledger_index`): read the index
//! stream over the window, keep the entries that hold the id's key, then seek into the ledger
//! stream only around those batches (by time: the broker attaches a reader at a chunk boundary
//! near a second, so a seek starts a few seconds early) and read until each is found. What the
//! index cannot answer — it does not exist (stages older than it), it starts later than the
//! ledger's window, a seek meets a batch it does not name (a stage older than it, mid-upgrade), or
//! a batch is not where its entry says (clock skew) — falls back to reading the whole window, and
//! the summary says why. A named batch older than the ledger's oldest (retention) or shown never
//! stored (its replica appended a later one first: the append was tried again under another id)
//! is counted, not sought.

use std::collections::{HashMap, HashSet};

use lapin::Connection;
use serde::Serialize;

use super::{
    ledger::{Flow, INDEX_PREFETCH, READ_PREFETCH, ReadSummary, consume, mark, needle, parse, read_events},
    topology::Topology,
};
use crate::{
    ledger::{Event, LEDGER_SCHEMA},
    ledger_index::{Entry, Span, batch_origin, id_time_ms, key, spans},
};

/// A seek starts this much before its first entry's time: the stage's clock against the
/// broker's, whose timestamps are whole seconds.
const SEEK_BEFORE_SECS: i64 = 2;

/// Entries closer than this share one read of the ledger.
const SPAN_GAP_MS: i64 = 10_000;

/// A seek gives up on the batches it has not found once it reads batches this much younger than
/// its span's last entry.
const SEEK_PAST_MS: i64 = 30_000;

/// Once a seek has found every batch of its span, it reads on until batches this much younger:
/// a stage that does not index (older than the index, mid-upgrade) appending beside them is
/// noticed there.
const SEEK_TAIL_MS: i64 = 2_000;

/// The index is taken to cover the window when it starts at most this long after the ledger does.
const COVER_SLACK_MS: i64 = 60_000;

/// How a [`find`] read the ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Found {
    /// `index` (the index, then seeks) or `scan` (the whole window).
    pub how: &'static str,
    /// Why the whole window was read, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
    /// The index read.
    pub index: ReadSummary,
    /// The ledger reads (the seeks, or the scan), added up.
    pub ledger: ReadSummary,
    /// Ledger batches the index named for the id, and how many of them the seeks found.
    pub sought: u64,
    pub found: u64,
    /// Named batches older than the ledger's oldest (retention removed them).
    pub gone: u64,
    /// Named batches never stored: their append failed and was tried again under another id.
    pub superseded: u64,
}

/// One event with the stage and replica whose batch held it.
pub type Located = (String, String, Event);

/// Every event since `since` (seconds since the epoch) of the batches that name `id`, through
/// the index where it can answer, else from the whole window.
pub async fn find(
    connection: &Connection,
    topology: &Topology,
    since: i64,
    id: &str,
) -> anyhow::Result<(Vec<Located>, Found)> {
    match through_index(connection, topology, since, id).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err((why, index))) => scan(connection, topology, since, id, why, index).await,
        Err(error) => scan(connection, topology, since, id, format!("{error:#}"), ReadSummary::default()).await,
    }
}

/// The whole window, for when the index cannot answer.
async fn scan(
    connection: &Connection,
    topology: &Topology,
    since: i64,
    id: &str,
    why: String,
    index: ReadSummary,
) -> anyhow::Result<(Vec<Located>, Found)> {
    let mut events = Vec::new();
    let ledger = read_events(connection, topology, since, &[needle(id)], |stage, replica, event| {
        if event.is_of(id) {
            events.push((stage.to_string(), replica.to_string(), event));
        }
    })
    .await?;
    Ok((events, Found { how: "scan", why: Some(why), index, ledger, ..Found::default() }))
}

/// Ok(Ok): answered through the index; Ok(Err(why)): the index cannot answer; Err: a read failed.
type Attempt = Result<(Vec<Located>, Found), (String, ReadSummary)>;

/// A batch id as the set of everything the index names keeps it.
fn fingerprint(batch: &str) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static STATE: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    STATE.get_or_init(RandomState::new).hash_one(batch)
}

async fn through_index(connection: &Connection, topology: &Topology, since: i64, id: &str) -> anyhow::Result<Attempt> {
    let stream = topology.ledger_index_stream();
    // The ledger's marker first, then the index's: a batch before the one has its entry (appended
    // first) before the other, so the index names everything the seeks may meet.
    let ledger_marker = mark(connection, &topology.ledger_exchange(), "the ledger").await?;
    let index_marker = match mark(connection, &topology.ledger_index_exchange(), &format!("the index {stream}")).await {
        Ok(marker) => marker,
        Err(error) => return Ok(Err((format!("no index to read ({error:#})"), ReadSummary::default()))),
    };
    let wanted_key = key(id);
    let (mut entries, mut first_ms, mut named) = (Vec::new(), None::<i64>, HashSet::new());
    // Never from later than a minute ago: a reader's clock ahead of the broker's would attach
    // past its own marker.
    let start = since.min(crate::messages::now_ms() / 1000 - 60);
    let index = consume(connection, &stream, start, &index_marker, INDEX_PREFETCH, |message_id, body| {
        let Some(batch) = message_id.strip_prefix("index:") else { return Flow::Go };
        named.insert(fingerprint(batch));
        if let Some((_, at)) = batch_origin(batch) {
            first_ms = Some(first_ms.map_or(at, |f| f.min(at)));
        }
        if let Ok(entry) = serde_json::from_slice::<Entry>(body)
            && entry.holds(wanted_key)
        {
            entries.push((entry.batch, entry.at_ms));
        }
        Flow::Go
    })
    .await?;
    if !index.complete {
        return Ok(Err(("the index read did not reach its end".into(), index)));
    }
    // Stages older than the index wrote the start of the window: only the ledger has it.
    let ledger_first = first_in_ledger(connection, topology, since, &ledger_marker).await?;
    if let Some(ledger_first) = ledger_first
        && first_ms.is_none_or(|f| f > ledger_first.max(since * 1000) + COVER_SLACK_MS)
    {
        return Ok(Err(("the index starts later than the ledger in this window".into(), index)));
    }
    let sought: HashSet<String> = entries.iter().map(|(batch, _)| batch.clone()).collect();
    let mut found = Found { how: "index", index, sought: sought.len() as u64, ..Found::default() };
    let mut events = Vec::new();
    for span in spans(entries, SPAN_GAP_MS) {
        // Older than the ledger's oldest batch: retention removed them.
        if ledger_first.is_some_and(|first| span.to_ms + SEEK_PAST_MS < first) {
            found.gone += span.batches.len() as u64;
            continue;
        }
        let seek = seek(connection, topology, &span, &ledger_marker, &named, id, &mut events).await?;
        found.ledger.messages += seek.read.messages;
        found.ledger.bytes += seek.read.bytes;
        found.found += seek.found;
        found.superseded += seek.superseded;
        if let Some(why) = seek.why {
            return Ok(Err((why, found.index)));
        }
    }
    found.ledger.complete = true;
    found.ledger.batches = found.found;
    Ok(Ok((events, found)))
}

/// What one seek into the ledger found.
struct Seek {
    read: ReadSummary,
    found: u64,
    superseded: u64,
    /// Why the index cannot answer, when the seek showed it.
    why: Option<String>,
}

/// Reads the ledger from a little before `span` until each of its batches is found (their events
/// of `id` go to `events`), shown never stored, or passed.
async fn seek(
    connection: &Connection,
    topology: &Topology,
    span: &Span,
    marker: &str,
    named: &HashSet<u64>,
    id: &str,
    events: &mut Vec<Located>,
) -> anyhow::Result<Seek> {
    let mut wanted: HashMap<&str, (&str, i64)> =
        span.batches.iter().filter_map(|b| batch_origin(b).map(|origin| (b.as_str(), origin))).collect();
    let (mut found, mut superseded, mut unindexed) = (0, 0, None::<String>);
    let read = consume(
        connection,
        &topology.ledger_stream(),
        span.from_ms / 1000 - SEEK_BEFORE_SECS,
        marker,
        READ_PREFETCH,
        |message_id, body| {
            if wanted.remove(message_id).is_some() {
                if let Some(batch) = parse(body).filter(|b| b.schema == LEDGER_SCHEMA) {
                    let (stage, replica, batch_events) = batch.known();
                    events.extend(
                        batch_events.into_iter().filter(|e| e.is_of(id)).map(|e| (stage.clone(), replica.clone(), e)),
                    );
                }
                found += 1;
            } else if let Some((replica, ms)) = batch_origin(message_id) {
                // A replica appends in order: a later batch of the same replica means a wanted one
                // before it was never stored (its append failed and was tried again under a new id).
                let before = wanted.len();
                wanted.retain(|_, (r, at)| !(*r == replica && *at < ms));
                superseded += (before - wanted.len()) as u64;
                let near = span.from_ms - SEEK_BEFORE_SECS * 1000 <= ms && ms <= span.to_ms + SEEK_PAST_MS;
                if near && !named.contains(&fingerprint(message_id)) {
                    unindexed = Some(message_id.to_string());
                    return Flow::Stop;
                }
            }
            // Found them all: read on a moment (a stage older than the index appending beside
            // them shows here), then stop; not found by long after: stop too.
            let at = id_time_ms(message_id);
            let done = wanted.is_empty() && at.is_some_and(|at| at > span.to_ms + SEEK_TAIL_MS);
            if done || at.is_some_and(|at| at > span.to_ms + SEEK_PAST_MS) { Flow::Stop } else { Flow::Go }
        },
    )
    .await?;
    let why = match unindexed {
        Some(batch) => {
            Some(format!("the ledger holds a batch the index does not name ({batch}: a stage older than the index?)"))
        }
        // Read up to the marker without them: not in the ledger (never stored), nothing to scan for.
        None if read.complete => None,
        None if !wanted.is_empty() => {
            Some(format!("{} batch(es) the index names were not where it puts them (clock skew?)", wanted.len()))
        }
        None => None,
    };
    Ok(Seek { read, found, superseded, why })
}

/// The time (ms) of the first stage batch at or after `since`, or `None` when the window is
/// empty up to `marker`.
async fn first_in_ledger(
    connection: &Connection,
    topology: &Topology,
    since: i64,
    marker: &str,
) -> anyhow::Result<Option<i64>> {
    let mut first = None;
    let start = since.min(crate::messages::now_ms() / 1000 - 60);
    consume(connection, &topology.ledger_stream(), start, marker, READ_PREFETCH, |message_id, _| {
        match batch_origin(message_id) {
            // A batch from before the window (the broker attaches at a chunk boundary): go on.
            Some((_, at)) if at < since * 1000 => Flow::Go,
            Some((_, at)) => {
                first = Some(at);
                Flow::Stop
            }
            // Readers' markers, junk.
            None => Flow::Go,
        }
    })
    .await?;
    Ok(first)
}
