//! One outbound order (出库单) as the simulator keeps it, its seeded generation, and its JSON
//! rendering in the shape of `orders.out.simple.query` `datas[]` rows. Amounts are integer cents
//! inside and 2-decimal JSON numbers outside; datetimes are China time, sometimes with milliseconds.

use jiff::Timestamp;
use orderflow_shared::{json::number, rng::Rng, time::china};
use serde_json::{Map, Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    WaitConfirm,
    Confirmed,
    Cancelled,
    Delete,
    OuterConfirming,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::WaitConfirm => "WaitConfirm",
            Status::Confirmed => "Confirmed",
            Status::Cancelled => "Cancelled",
            Status::Delete => "Delete",
            Status::OuterConfirming => "OuterConfirming",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Some(match text {
            "WaitConfirm" => Status::WaitConfirm,
            "Confirmed" => Status::Confirmed,
            "Cancelled" => Status::Cancelled,
            "Delete" => Status::Delete,
            "OuterConfirming" => Status::OuterConfirming,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Shop {
    pub id: i64,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub ioi_id: i64,
    pub oi_id: i64,
    pub sku_id: String,
    pub i_id: String,
    pub name: String,
    pub properties_value: String,
    pub qty: i64,
    /// Cents.
    pub sale_base_price: i64,
    pub sale_price: i64,
    pub is_gift: bool,
}

impl Item {
    pub fn sale_amount(&self) -> i64 {
        self.qty * self.sale_price
    }
}

#[derive(Debug, Clone)]
pub struct Order {
    pub co_id: i64,
    pub io_id: i64,
    pub o_id: i64,
    pub so_id: String,
    pub shop_id: i64,
    pub shop_name: String,
    pub is_offline: bool,
    pub created: Timestamp,
    /// Milliseconds precision; rendered with `.SSS` when `modified_ms` is set.
    pub modified: Timestamp,
    pub modified_ms: bool,
    pub io_date: Timestamp,
    pub status: Status,
    pub receiver_name: String,
    pub receiver_mobile: String,
    pub receiver_state: String,
    pub receiver_city: String,
    pub receiver_district: String,
    pub receiver_address: String,
    pub freight: i64,
    pub free_amount: i64,
    pub items: Vec<Item>,
    pub l_id: String,
    pub logistics_company: String,
    pub wms_co_id: i64,
    pub drp_co_id_from: i64,
    pub remark: String,
    /// Row version: strictly increasing per merchant on every change.
    pub ts: i64,
}

impl Order {
    pub fn items_total(&self) -> i64 {
        self.items.iter().map(Item::sale_amount).sum()
    }

    pub fn pay_amount(&self) -> i64 {
        self.items_total() + self.freight - self.free_amount
    }

    /// The row as the API returns it.
    pub fn render(&self) -> Value {
        let mut m = Map::with_capacity(64);
        let mut put = |k: &str, v: Value| {
            m.insert(k.to_string(), v);
        };
        put("co_id", json!(self.co_id));
        put("shop_id", json!(if self.is_offline { 0 } else { self.shop_id }));
        put("shop_name", json!(self.shop_name));
        put("io_id", json!(self.io_id));
        put("o_id", json!(self.o_id));
        put("so_id", json!(self.so_id));
        put("created", json!(fmt_dt(self.created, false)));
        put("modified", json!(fmt_dt(self.modified, self.modified_ms)));
        put("status", json!(self.status.as_str()));
        put("order_type", json!("普通订单"));
        put("invoice_title", json!(""));
        put("shop_buyer_id", json!(format!("buyer{}", self.o_id % 100_000)));
        put("open_id", json!(""));
        put("receiver_country", json!("中国"));
        put("receiver_state", json!(self.receiver_state));
        put("receiver_city", json!(self.receiver_city));
        put("receiver_district", json!(self.receiver_district));
        put("receiver_town", json!(""));
        put("receiver_address", json!(self.receiver_address));
        put("receiver_name", json!(self.receiver_name));
        put("receiver_phone", json!(""));
        put("receiver_mobile", json!(self.receiver_mobile));
        put("buyer_message", json!(""));
        put("remark", json!(self.remark));
        put("node", json!(""));
        put("is_cod", json!(false));
        put("pay_amount", cents(self.pay_amount()));
        put("paid_amount", cents(self.pay_amount()));
        put("free_amount", cents(self.free_amount));
        put("freight", cents(self.freight));
        put("pay_date", json!(fmt_dt(self.created, false)));
        put("currency", json!("CNY"));
        put("l_id", json!(self.l_id));
        put("lc_id", json!("ZTO"));
        put("logistics_company", json!(self.logistics_company));
        put("io_date", json!(fmt_dt(self.io_date, false)));
        put("stock_enabled", json!("Y"));
        put("drp_co_id_from", json!(self.drp_co_id_from));
        put("labels", json!(""));
        put("weight", number("0.50").unwrap_or(Value::Null));
        put("f_weight", number("0.60").unwrap_or(Value::Null));
        put("merge_so_id", json!(""));
        put("wms_co_id", json!(self.wms_co_id));
        put("business_staff", json!(""));
        put("wave_id", json!(0));
        put("seller_flag", json!(0));
        put("order_staff_id", json!(0));
        put("order_staff_name", json!(""));
        put("is_print_express", json!(true));
        put("is_print", json!(true));
        put("ts", json!(self.ts));
        let items: Vec<Value> = self
            .items
            .iter()
            .map(|it| {
                json!({
                    "ioi_id": it.ioi_id,
                    "oi_id": it.oi_id,
                    "outer_oi_id": format!("{}-{}", self.so_id, it.oi_id),
                    "raw_so_id": self.so_id,
                    "pic": format!("https://img.example.com/{}.jpg", it.sku_id),
                    "sku_id": it.sku_id,
                    "i_id": it.i_id,
                    "name": it.name,
                    "properties_value": it.properties_value,
                    "unit": "件",
                    "qty": it.qty,
                    "sale_base_price": cents(it.sale_base_price),
                    "sale_price": cents(it.sale_price),
                    "sale_amount": cents(it.sale_amount()),
                    "combine_sku_id": "",
                    "is_gift": it.is_gift,
                })
            })
            .collect();
        m.insert("items".into(), Value::Array(items));
        m.insert("batchs".into(), json!([]));
        m.insert("sns".into(), json!([]));
        Value::Object(m)
    }
}

/// Cents as an exact 2-decimal JSON number.
pub fn cents(value: i64) -> Value {
    let sign = if value < 0 { "-" } else { "" };
    let abs = value.unsigned_abs();
    number(&format!("{sign}{}.{:02}", abs / 100, abs % 100)).unwrap_or(Value::Null)
}

pub fn fmt_dt(ts: Timestamp, millis: bool) -> String {
    let zoned = ts.to_zoned_datetime(china());
    if millis {
        zoned.strftime("%Y-%m-%d %H:%M:%S%.3f").to_string()
    } else {
        zoned.strftime("%Y-%m-%d %H:%M:%S").to_string()
    }
}

const PROVINCES: &[(&str, &str, &str)] = &[
    ("上海", "上海市", "浦东新区"),
    ("浙江省", "杭州市", "西湖区"),
    ("广东省", "深圳市", "南山区"),
    ("北京", "北京市", "朝阳区"),
    ("江苏省", "南京市", "鼓楼区"),
    ("四川省", "成都市", "武侯区"),
];
const SURNAMES: &[&str] = &["张", "王", "李", "赵", "刘", "陈", "杨", "黄", "周", "吴"];
const GIVEN: &[&str] = &["伟", "芳", "娜", "敏", "静", "磊", "洋", "勇", "艳", "杰"];
const PRODUCTS: &[(&str, &str)] = &[
    ("纯棉T恤", "颜色:白色;尺码:L"),
    ("运动鞋", "颜色:黑色;尺码:42"),
    ("保温杯", "容量:500ml"),
    ("蓝牙耳机", "颜色:白色"),
    ("双肩包", "颜色:灰色"),
    ("护手霜", "规格:50g"),
];
const CARRIERS: &[&str] = &["中通快递", "圆通速递", "顺丰速运", "韵达快递"];

/// Everything a generated order needs from its merchant.
pub struct Seeding<'a> {
    pub co_id: i64,
    pub shops: &'a [Shop],
    /// First `o_id`/`io_id` of this merchant, so ids never collide across merchants.
    pub id_base: i64,
}

/// A deterministic order number `n` of a merchant, modified at `modified`.
pub fn generate(rng: &mut Rng, seeding: &Seeding<'_>, n: i64, modified: Timestamp, status: Status) -> Order {
    let shop = rng.pick(seeding.shops).clone();
    let (state, city, district) = *rng.pick(PROVINCES);
    let name = format!("{}{}", rng.pick(SURNAMES), rng.pick(GIVEN));
    let masked = rng.chance(0.2);
    let mobile = format!("1{}{:08}", rng.range(30, 89), rng.below(100_000_000));
    let (receiver_name, receiver_mobile) = if masked {
        let first: String = name.chars().take(1).collect();
        (format!("{first}**"), format!("{}****{}", &mobile[..3], &mobile[7..]))
    } else if rng.chance(0.02) {
        (String::new(), String::new())
    } else {
        (name, mobile)
    };
    let item_count = 1 + rng.below(4) as usize;
    let o_id = seeding.id_base + n;
    let items = (0..item_count)
        .map(|k| {
            let (pname, props) = *rng.pick(PRODUCTS);
            let is_gift = k > 0 && rng.chance(0.1);
            let sale_price = if is_gift { 0 } else { rng.range(100, 50_000) };
            let sku = rng.range(10_000, 99_999);
            Item {
                ioi_id: o_id * 10 + k as i64,
                oi_id: o_id * 10 + k as i64,
                sku_id: format!("SKU{sku}"),
                i_id: format!("I{}", sku / 10),
                name: pname.to_string(),
                properties_value: props.to_string(),
                qty: rng.range(1, 5),
                sale_base_price: sale_price + rng.range(0, 2_000) * i64::from(!is_gift),
                sale_price,
                is_gift,
            }
        })
        .collect();
    let created = modified.checked_sub(jiff::SignedDuration::from_secs(rng.range(60, 86_400))).unwrap_or(modified);
    Order {
        co_id: seeding.co_id,
        io_id: seeding.id_base + n,
        o_id,
        so_id: format!("SO{}{:06}", seeding.co_id, n),
        shop_id: shop.id,
        shop_name: shop.name,
        is_offline: rng.chance(0.03),
        created,
        modified,
        modified_ms: rng.chance(0.3),
        io_date: modified,
        status,
        receiver_name,
        receiver_mobile,
        receiver_state: state.to_string(),
        receiver_city: city.to_string(),
        receiver_district: district.to_string(),
        receiver_address: format!("{}{}{}号", city, district, rng.range(1, 999)),
        freight: if rng.chance(0.5) { 0 } else { rng.range(500, 2_000) },
        free_amount: if rng.chance(0.8) { 0 } else { rng.range(100, 1_000) },
        items,
        l_id: format!("ZT{}", rng.range(1_000_000_000, 9_999_999_999)),
        logistics_company: rng.pick(CARRIERS).to_string(),
        wms_co_id: 0,
        drp_co_id_from: 0,
        remark: String::new(),
        ts: 0,
    }
}

/// The status a freshly seeded order gets: mostly shipped, some waiting, a few cancelled.
pub fn seeded_status(rng: &mut Rng) -> Status {
    match rng.below(100) {
        0..=79 => Status::Confirmed,
        80..=91 => Status::WaitConfirm,
        92..=96 => Status::Cancelled,
        97..=98 => Status::Delete,
        _ => Status::OuterConfirming,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64) -> Order {
        let shops = vec![Shop { id: 1001, name: "旗舰店".into() }];
        let seeding = Seeding { co_id: 7, shops: &shops, id_base: 1_000_000 };
        let modified = Timestamp::from_second(1_700_000_000).expect("valid");
        generate(&mut Rng::new(seed), &seeding, 1, modified, Status::Confirmed)
    }

    #[test]
    fn generation_is_deterministic_from_the_seed() {
        assert_eq!(sample(5).render(), sample(5).render());
        assert_ne!(sample(5).render(), sample(6).render());
    }

    #[test]
    fn pay_amount_is_items_plus_freight_minus_discount_in_two_decimals() {
        let o = sample(9);
        let row = o.render();
        let expected = o.items.iter().map(|i| i.qty * i.sale_price).sum::<i64>() + o.freight - o.free_amount;
        assert_eq!(row["pay_amount"], cents(expected));
        let text = row["pay_amount"].to_string();
        assert_eq!(text.split('.').nth(1).map(str::len), Some(2), "{text}");
    }

    #[test]
    fn cents_render_exactly() {
        assert_eq!(cents(15075).to_string(), "150.75");
        assert_eq!(cents(5).to_string(), "0.05");
        assert_eq!(cents(-120).to_string(), "-1.20");
    }

    #[test]
    fn datetimes_are_china_time_optionally_with_milliseconds() {
        let ts = Timestamp::from_millisecond(1_631_934_139_807).expect("valid");
        assert_eq!(fmt_dt(ts, true), "2021-09-18 11:02:19.807");
        assert_eq!(fmt_dt(ts, false), "2021-09-18 11:02:19");
    }
}
