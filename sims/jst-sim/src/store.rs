//! One merchant's data: orders with the indexes the API's queries need (row version `ts`,
//! `modified` + `io_id`), pre-rendered JSON rows (so a page is a concatenation, fast enough never to
//! be the bottleneck), and the mutations churn makes. Every change bumps `ts`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use jiff::{SignedDuration, Timestamp};
use orderflow_shared::rng::Rng;

use crate::model::{Order, Seeding, Shop, Status, generate, seeded_status};

/// The API's business filters and paging, already validated.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub status: Option<Status>,
    pub shop_id: Option<i64>,
    pub is_offline_shop: bool,
    pub so_ids: Option<Vec<String>>,
    pub o_ids: Option<Vec<i64>>,
    pub io_ids: Option<Vec<i64>>,
    /// 0 = modified (default), 2 = io_date.
    pub date_type: i64,
    /// Inclusive window on `modified` (or `io_date` with date_type 2), milliseconds.
    pub window: Option<(i64, i64)>,
    pub start_ts: Option<i64>,
    pub page_index: u32,
    pub page_size: u32,
    pub get_total: bool,
}

#[derive(Debug)]
pub struct PageResult {
    pub rows: Vec<Arc<str>>,
    /// The largest `ts` among the rows (0 for none): what a `start_ts` client has now seen.
    pub max_ts: i64,
    pub data_count: u64,
    pub page_count: u64,
    pub has_next: bool,
}

#[derive(Debug, Clone)]
pub struct Credentials {
    pub app_key: String,
    pub app_secret: String,
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token stops working (`None`: never).
    pub token_expires_at: Option<Timestamp>,
    /// Legacy API credentials.
    pub partner_id: String,
    pub partner_key: String,
    pub legacy_token: String,
}

impl Credentials {
    /// Fixed dummy credentials, for generating orders outside a running simulator (tests, benches).
    pub fn placeholder() -> Self {
        Credentials {
            app_key: "k".into(),
            app_secret: "s".into(),
            access_token: "t".into(),
            refresh_token: "r".into(),
            token_expires_at: None,
            partner_id: "p".into(),
            partner_key: "pk".into(),
            legacy_token: "lt".into(),
        }
    }
}

/// A confirmed order as `/admin/truth` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TruthRow {
    pub o_id: i64,
    pub io_id: i64,
    pub modified: String,
    pub ts: i64,
}

pub struct Merchant {
    pub name: String,
    pub creds: Credentials,
    pub co_id: i64,
    pub shops: Vec<Shop>,
    id_base: i64,
    orders: Vec<Order>,
    rendered: Vec<Arc<str>>,
    by_io: HashMap<i64, usize>,
    by_ts: BTreeMap<i64, usize>,
    /// Versions handed to late-committed rows, counting down below every seeded version.
    next_low_ts: i64,
    /// The largest `ts` served to any client so far.
    max_served_ts: i64,
    by_modified: BTreeSet<(i64, i64)>,
    next_ts: i64,
    next_n: i64,
    ever_confirmed: BTreeSet<i64>,
    rng: Rng,
}

impl Merchant {
    /// Seeds `count` orders with `modified` spread over `[now - history, now - 1 min]`; every
    /// merchant numbers its orders from its own base, so ids never collide across merchants.
    pub fn seed(
        name: String,
        index: u32,
        creds: Credentials,
        count: u64,
        seed: u64,
        now: Timestamp,
        history: SignedDuration,
    ) -> Self {
        let id_base = (i64::from(index) + 1) * 100_000_000;
        Self::seed_numbered(name, index, creds, count, seed, now, history, id_base)
    }

    /// [`Merchant::seed`] numbering orders from `id_base` (the same base for several merchants
    /// makes their `o_id`s overlap, as real merchants' may).
    #[allow(clippy::too_many_arguments)]
    pub fn seed_numbered(
        name: String,
        index: u32,
        creds: Credentials,
        count: u64,
        seed: u64,
        now: Timestamp,
        history: SignedDuration,
        id_base: i64,
    ) -> Self {
        let mut rng = Rng::new(seed ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9));
        let co_id = 10_000 + i64::from(index);
        let shops = (0..3 + rng.below(3))
            .map(|k| Shop {
                id: 100_000 + i64::from(index) * 100 + k as i64, name: format!("{name}的{}号店", k + 1)
            })
            .collect();
        let mut merchant = Merchant {
            name,
            creds,
            co_id,
            shops,
            id_base,
            orders: Vec::with_capacity(count as usize),
            rendered: Vec::with_capacity(count as usize),
            by_io: HashMap::with_capacity(count as usize),
            by_ts: BTreeMap::new(),
            by_modified: BTreeSet::new(),
            next_ts: 1_000_000,
            next_low_ts: 1_000_000,
            max_served_ts: 0,
            next_n: 1,
            ever_confirmed: BTreeSet::new(),
            rng,
        };
        let span_ms = (history.as_millis() as i64 - 60_000).max(1);
        let start = now.as_millisecond() - history.as_millis() as i64;
        let mut times: Vec<i64> = (0..count).map(|_| start + merchant.rng.below(span_ms as u64) as i64).collect();
        times.sort_unstable();
        for ms in times {
            let status = seeded_status(&mut merchant.rng);
            let modified = Timestamp::from_millisecond(ms).unwrap_or(now);
            merchant.insert(modified, status);
        }
        merchant
    }

    fn seeding(&self) -> Seeding<'_> {
        Seeding { co_id: self.co_id, shops: &self.shops, id_base: self.id_base }
    }

    /// Adds a new order, visible now with a fresh `ts`. Returns its slot.
    pub fn insert(&mut self, modified: Timestamp, status: Status) -> usize {
        let n = self.next_n;
        self.next_n += 1;
        let mut rng = self.rng.clone();
        let mut order = generate(&mut rng, &self.seeding(), n, modified, status);
        self.rng = rng;
        if !order.modified_ms {
            order.modified = truncate_to_second(order.modified);
        }
        order.ts = self.bump_ts();
        if status == Status::Confirmed {
            self.ever_confirmed.insert(order.o_id);
        }
        let slot = self.orders.len();
        self.by_io.insert(order.io_id, slot);
        self.by_ts.insert(order.ts, slot);
        self.by_modified.insert((order.modified.as_millisecond(), order.io_id));
        self.rendered.push(render(&order));
        self.orders.push(order);
        slot
    }

    /// Notes the largest `ts` a client was served.
    pub fn note_served(&mut self, max_ts: i64) {
        self.max_served_ts = self.max_served_ts.max(max_ts);
    }

    /// A Confirmed order from a transaction that committed late: its row version was taken when
    /// it was written, so it becomes visible now with a `ts` *below* rows already served (and a
    /// modified time `lag` in the past). A pure `start_ts` cursor never sees it. `None` until
    /// something has been served (there is nothing to be below yet).
    pub fn insert_late_ts(&mut self, now: Timestamp, lag: SignedDuration) -> Option<(usize, i64)> {
        let below = self.max_served_ts;
        if below <= 0 {
            return None;
        }
        // A version never handed out before (row versions are never reused), below every
        // version issued so far and so below what was served.
        self.next_low_ts -= 1;
        let ts = self.next_low_ts;
        let modified = now.checked_sub(lag).unwrap_or(now);
        let slot = self.insert(modified, Status::Confirmed);
        let order = &mut self.orders[slot];
        self.by_ts.remove(&order.ts);
        order.ts = ts;
        self.by_ts.insert(ts, slot);
        self.rendered[slot] = render(&self.orders[slot]);
        Some((slot, ts))
    }

    fn bump_ts(&mut self) -> i64 {
        let ts = self.next_ts;
        self.next_ts += 1;
        ts
    }

    /// Changes an order (status and/or modified time); it gets a new `ts`.
    pub fn update(&mut self, slot: usize, status: Option<Status>, modified: Timestamp) {
        let new_ts = self.bump_ts();
        let Some(order) = self.orders.get_mut(slot) else { return };
        self.by_ts.remove(&order.ts);
        self.by_modified.remove(&(order.modified.as_millisecond(), order.io_id));
        if let Some(status) = status {
            order.status = status;
            if status == Status::Confirmed {
                self.ever_confirmed.insert(order.o_id);
            }
        }
        order.modified = if order.modified_ms { modified } else { truncate_to_second(modified) };
        order.ts = new_ts;
        self.by_ts.insert(order.ts, slot);
        self.by_modified.insert((order.modified.as_millisecond(), order.io_id));
        self.rendered[slot] = render(order);
    }

    pub fn len(&self) -> usize {
        self.orders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    pub fn order(&self, slot: usize) -> Option<&Order> {
        self.orders.get(slot)
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn matches(&self, order: &Order, q: &Query) -> bool {
        if let Some(status) = q.status
            && order.status != status
        {
            return false;
        }
        if let Some(shop) = q.shop_id {
            if shop == 0 && q.is_offline_shop {
                if !order.is_offline {
                    return false;
                }
            } else if order.shop_id != shop || order.is_offline {
                return false;
            }
        }
        if let Some(ids) = &q.so_ids
            && !ids.contains(&order.so_id)
        {
            return false;
        }
        if let Some(ids) = &q.o_ids
            && !ids.contains(&order.o_id)
        {
            return false;
        }
        if let Some(ids) = &q.io_ids
            && !ids.contains(&order.io_id)
        {
            return false;
        }
        if let Some((begin, end)) = q.window {
            let at = if q.date_type == 2 { order.io_date } else { order.modified }.as_millisecond();
            if at < begin || at > end {
                return false;
            }
        }
        if let Some(start) = q.start_ts
            && order.ts <= start
        {
            return false;
        }
        true
    }

    /// Runs a query: rows in the API's order (by `ts` for `start_ts`, else by modified then
    /// io_id), one page of them, and the totals when asked.
    pub fn query(&self, q: &Query) -> PageResult {
        let size = q.page_size.max(1) as usize;
        let skip = (q.page_index.max(1) as usize - 1) * size;
        let candidates: Box<dyn Iterator<Item = usize> + '_> = if let Some(start) = q.start_ts {
            Box::new(self.by_ts.range(start + 1..).map(|(_, slot)| *slot))
        } else if let (Some((begin, end)), 0) = (q.window, q.date_type) {
            Box::new(
                self.by_modified
                    .range((begin, i64::MIN)..=(end, i64::MAX))
                    .filter_map(|(_, io)| self.by_io.get(io).copied()),
            )
        } else {
            let mut slots: Vec<usize> = (0..self.orders.len()).collect();
            let key = |slot: &usize| {
                let o = &self.orders[*slot];
                let at = if q.date_type == 2 { o.io_date } else { o.modified };
                (at.as_millisecond(), o.io_id)
            };
            slots.sort_unstable_by_key(key);
            Box::new(slots.into_iter())
        };
        let mut matching = candidates.filter(|slot| self.matches(&self.orders[*slot], q));
        let slots: Vec<usize> = matching.by_ref().skip(skip).take(size).collect();
        let max_ts = slots.iter().map(|slot| self.orders[*slot].ts).max().unwrap_or(0);
        let rows: Vec<Arc<str>> = slots.iter().map(|slot| self.rendered[*slot].clone()).collect();
        let (data_count, has_next) = if q.get_total {
            let seen = (skip + rows.len()) as u64;
            let rest = matching.count() as u64;
            let total = if rows.is_empty() { self.count_all(q) } else { seen + rest };
            (total, rest > 0)
        } else {
            (0, matching.next().is_some())
        };
        let page_count = if q.get_total { data_count.div_ceil(size as u64) } else { 0 };
        PageResult { rows, max_ts, data_count, page_count, has_next }
    }

    fn count_all(&self, q: &Query) -> u64 {
        self.orders.iter().filter(|o| self.matches(o, q)).count() as u64
    }

    /// Every order now Confirmed.
    pub fn truth(&self) -> Vec<TruthRow> {
        let mut rows: Vec<TruthRow> = self
            .orders
            .iter()
            .filter(|o| o.status == Status::Confirmed)
            .map(|o| TruthRow {
                o_id: o.o_id,
                io_id: o.io_id,
                modified: crate::model::fmt_dt(o.modified, o.modified_ms),
                ts: o.ts,
            })
            .collect();
        rows.sort_unstable_by_key(|r| r.o_id);
        rows
    }

    pub fn ever_confirmed(&self) -> Vec<i64> {
        self.ever_confirmed.iter().copied().collect()
    }

    pub fn max_ts(&self) -> i64 {
        self.next_ts - 1
    }
}

fn render(order: &Order) -> Arc<str> {
    Arc::from(order.render().to_string())
}

fn truncate_to_second(ts: Timestamp) -> Timestamp {
    Timestamp::from_second(ts.as_second()).unwrap_or(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merchant(count: u64) -> Merchant {
        let creds = Credentials::placeholder();
        let now = Timestamp::from_second(1_700_000_000).expect("valid");
        Merchant::seed("m1".into(), 0, creds, count, 42, now, SignedDuration::from_hours(72))
    }

    fn row_ts(row: &str) -> i64 {
        let v: serde_json::Value = serde_json::from_str(row).expect("json");
        v["ts"].as_i64().expect("ts")
    }

    #[test]
    fn start_ts_returns_newer_rows_in_ts_order() {
        let m = merchant(200);
        let q = Query { start_ts: Some(1_000_010), page_index: 1, page_size: 50, ..Query::default() };
        let page = m.query(&q);
        let ts: Vec<i64> = page.rows.iter().map(|r| row_ts(r)).collect();
        assert_eq!(ts.len(), 50);
        assert_eq!(ts[0], 1_000_011);
        assert!(ts.windows(2).all(|w| w[0] < w[1]));
        assert!(page.has_next);
    }

    #[test]
    fn an_update_moves_the_row_to_a_new_ts() {
        let mut m = merchant(10);
        let before = m.max_ts();
        let now = Timestamp::from_second(1_700_000_100).expect("valid");
        m.update(0, Some(Status::Confirmed), now);
        let q = Query { start_ts: Some(before), page_index: 1, page_size: 50, ..Query::default() };
        let page = m.query(&q);
        assert_eq!(page.rows.len(), 1);
        assert_eq!(row_ts(&page.rows[0]), before + 1);
        assert!(m.ever_confirmed().contains(&m.order(0).expect("order").o_id));
    }

    #[test]
    fn totals_and_page_counts_match_the_filter() {
        let m = merchant(120);
        let confirmed = m.truth().len() as u64;
        let q = Query {
            status: Some(Status::Confirmed),
            window: Some((0, i64::MAX)),
            page_index: 1,
            page_size: 50,
            get_total: true,
            ..Query::default()
        };
        let page = m.query(&q);
        assert_eq!(page.data_count, confirmed);
        assert_eq!(page.page_count, confirmed.div_ceil(50));
        assert_eq!(page.has_next, confirmed > 50);
    }

    #[test]
    fn the_same_seed_gives_the_same_merchant() {
        let a = merchant(50);
        let b = merchant(50);
        let all = Query { start_ts: Some(0), page_index: 1, page_size: 100, ..Query::default() };
        assert_eq!(a.query(&all).rows, b.query(&all).rows);
    }

    #[test]
    fn shop_id_and_offline_filters_select_their_orders() {
        let m = merchant(400);
        let shop = m.shops[0].id;
        let q = |shop_id: i64, offline: bool| Query {
            shop_id: Some(shop_id),
            is_offline_shop: offline,
            start_ts: Some(0),
            page_index: 1,
            page_size: 500,
            ..Query::default()
        };
        let rows: Vec<serde_json::Value> =
            m.query(&q(shop, false)).rows.iter().map(|r| serde_json::from_str(r).expect("json")).collect();
        assert!(!rows.is_empty());
        assert!(rows.iter().all(|r| r["shop_id"] == shop));
        let offline: Vec<serde_json::Value> =
            m.query(&q(0, true)).rows.iter().map(|r| serde_json::from_str(r).expect("json")).collect();
        assert!(!offline.is_empty(), "some seeded orders are offline-store documents");
        assert!(offline.iter().all(|r| r["shop_id"] == 0));
    }

    #[test]
    fn id_lists_select_exactly_those_orders() {
        let m = merchant(100);
        let o = m.order(5).expect("order").clone();
        let by_o = Query { o_ids: Some(vec![o.o_id]), page_index: 1, page_size: 50, ..Query::default() };
        let by_so = Query { so_ids: Some(vec![o.so_id.clone()]), page_index: 1, page_size: 50, ..Query::default() };
        let by_io = Query { io_ids: Some(vec![o.io_id, -1]), page_index: 1, page_size: 50, ..Query::default() };
        for q in [by_o, by_so, by_io] {
            let rows = m.query(&q).rows;
            assert_eq!(rows.len(), 1);
            assert!(rows[0].contains(&format!("\"o_id\":{}", o.o_id)));
        }
    }

    #[test]
    fn date_type_2_windows_on_io_date() {
        let mut m = merchant(50);
        let later = Timestamp::from_second(1_700_000_500).expect("valid");
        m.update(3, None, later);
        let io_date = m.order(3).expect("order").io_date.as_millisecond();
        let q = |date_type| Query {
            date_type,
            window: Some((io_date, io_date)),
            page_index: 1,
            page_size: 50,
            ..Query::default()
        };
        assert_eq!(m.query(&q(2)).rows.len(), 1, "io_date did not change with modified");
        assert!(
            m.query(&q(0)).rows.iter().all(|r| !r.contains(&format!("\"o_id\":{}", m.order(3).expect("order").o_id)))
        );
    }

    #[test]
    fn modified_windows_are_ordered_by_modified_then_io_id() {
        let m = merchant(100);
        let q = Query { window: Some((0, i64::MAX)), page_index: 2, page_size: 30, ..Query::default() };
        let rows = m.query(&q).rows;
        let keys: Vec<(String, i64)> = rows
            .iter()
            .map(|r| {
                let v: serde_json::Value = serde_json::from_str(r).expect("json");
                (v["modified"].as_str().expect("modified").to_string(), v["io_id"].as_i64().expect("io_id"))
            })
            .collect();
        assert_eq!(keys.len(), 30);
        // Lexicographic order of the text equals time order (milliseconds sort after seconds).
        assert!(keys.windows(2).all(|w| w[0] <= w[1]), "{keys:?}");
    }

    #[test]
    fn a_late_committed_row_hides_below_the_served_versions_from_a_start_ts_cursor() {
        let mut m = merchant(100);
        let now = Timestamp::now();
        assert!(m.insert_late_ts(now, SignedDuration::from_secs(5)).is_none(), "nothing served yet");
        let q = Query { start_ts: Some(0), page_index: 1, page_size: 200, ..Query::default() };
        let page = m.query(&q);
        m.note_served(page.max_ts);
        let cursor = page.max_ts;
        let (slot, ts) = m.insert_late_ts(now, SignedDuration::from_secs(5)).expect("late row");
        assert!(ts < cursor, "visible with a version below what was served");
        let o_id = m.order(slot).expect("order").o_id;
        let after = m.query(&Query { start_ts: Some(cursor), page_index: 1, page_size: 200, ..Query::default() });
        assert!(after.rows.is_empty(), "the start_ts cursor never sees it");
        let begin = now.as_millisecond() - 60_000;
        let window = m.query(&Query {
            window: Some((begin, now.as_millisecond())),
            page_index: 1,
            page_size: 200,
            ..Query::default()
        });
        assert!(window.rows.iter().any(|r| r.contains(&format!("\"o_id\":{o_id}"))), "a modified window does");
        assert!(m.truth().iter().any(|t| t.o_id == o_id && t.ts == ts));
    }
}
