//! A minimal signed client and an in-process simulator, for the simulator's own tests and benchmark.
#![allow(dead_code)]

use std::sync::Arc;

use clap::Parser;
use jst_sim::{Config, Sim};
use orderflow_shared::jst::{sign_legacy, sign_open};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct Running {
    pub url: String,
    pub sim: Arc<Sim>,
    pub stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a simulator in this process with the given flags (plus `--listen 127.0.0.1:0`).
pub async fn start(args: &[&str]) -> Running {
    orderflow_shared::init_process();
    let mut argv = vec!["jst-sim", "--listen", "127.0.0.1:0"];
    argv.extend_from_slice(args);
    let config = Config::parse_from(argv);
    let sim = Sim::build(&config).expect("sim builds");
    let listener = tokio::net::TcpListener::bind(config.listen).await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(jst_sim::serve(listener, sim.clone(), stop.clone()));
    Running { url, sim, stop }
}

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub app_key: String,
    pub app_secret: String,
    pub access_token: String,
}

/// Overrides for building a deliberately wrong call.
#[derive(Default)]
pub struct Tweak<'a> {
    pub timestamp_offset: i64,
    pub sign: Option<&'a str>,
    pub access_token: Option<&'a str>,
}

impl Client {
    pub fn demo(base: &str) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: base.to_string(),
            app_key: "demo-app-key".into(),
            app_secret: "demo-app-secret".into(),
            access_token: "demo-access-token".into(),
        }
    }

    pub fn form(&self, biz: &Value, tweak: &Tweak<'_>) -> String {
        let ts = (jiff::Timestamp::now().as_second() + tweak.timestamp_offset).to_string();
        let biz = biz.to_string();
        let token = tweak.access_token.unwrap_or(&self.access_token);
        let mut form: Vec<(&str, &str)> = vec![
            ("app_key", &self.app_key),
            ("access_token", token),
            ("timestamp", &ts),
            ("version", "2"),
            ("charset", "utf-8"),
            ("biz", &biz),
        ];
        let sign = sign_open(&self.app_secret, form.iter().copied());
        form.push(("sign", tweak.sign.unwrap_or(&sign)));
        serde_urlencoded::to_string(&form).expect("form")
    }

    /// The JSON answer, or `{"http_status": N}` for a non-200 answer, or `{"transport": "..."}`.
    pub async fn call(&self, biz: Value, tweak: Tweak<'_>) -> Value {
        let body = self.form(&biz, &tweak);
        let sent = self
            .http
            .post(format!("{}/open/orders/out/simple/query", self.base))
            .header("content-type", "application/x-www-form-urlencoded;charset=UTF-8")
            .body(body)
            .send()
            .await;
        match sent {
            Err(e) => json!({"transport": e.to_string()}),
            Ok(r) if r.status() != 200 => json!({"http_status": r.status().as_u16()}),
            Ok(r) => match r.bytes().await {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| json!({"transport": e.to_string()})),
                Err(e) => json!({"transport": e.to_string()}),
            },
        }
    }

    pub async fn query(&self, biz: Value) -> Value {
        self.call(biz, Tweak::default()).await
    }

    pub async fn legacy(&self, biz: Value, partner_key: &str) -> Value {
        let ts = jiff::Timestamp::now().as_second();
        let method = "orders.out.simple.query";
        let sign = sign_legacy(method, "demo-partner", "demo-legacy-token", ts, partner_key);
        let url = format!(
            "{}/api/open/query.aspx?method={method}&partnerid=demo-partner&token=demo-legacy-token&ts={ts}&sign={sign}",
            self.base
        );
        let r = self.http.post(url).body(biz.to_string()).send().await.expect("legacy call");
        r.json().await.expect("json")
    }

    pub async fn refresh(&self, refresh_token: &str) -> Value {
        let ts = jiff::Timestamp::now().as_second().to_string();
        let mut form: Vec<(&str, &str)> = vec![
            ("app_key", &self.app_key),
            ("timestamp", &ts),
            ("grant_type", "refresh_token"),
            ("charset", "utf-8"),
            ("refresh_token", refresh_token),
            ("scope", "all"),
        ];
        let sign = sign_open(&self.app_secret, form.iter().copied());
        form.push(("sign", &sign));
        let body = serde_urlencoded::to_string(&form).expect("form");
        let r = self
            .http
            .post(format!("{}/openWeb/auth/refreshToken", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("refresh call");
        r.json().await.expect("json")
    }
}

pub fn code(answer: &Value) -> i64 {
    answer["code"].as_i64().unwrap_or(-1)
}
