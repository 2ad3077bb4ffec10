//! The Jushuitan HTTP client: signs and sends one `orders.out.simple.query` call in either API
//! generation, refreshes tokens, and turns every answer into a page or a classified error.
//! URLs are stripped from transport errors (the legacy URL carries the token and sign).

use std::{fmt, time::Duration};

use orderflow_shared::jst::{CodeAction, classify_code, sign_legacy, sign_open};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ApiGeneration {
    /// New open platform (`/open/...`, form-encoded, md5 sign of all params).
    Open,
    /// Legacy partner API (`/api/open/query.aspx`, sign in the query).
    Legacy,
}

/// An account's credentials. `Debug` never prints a secret.
/// The largest answer read from the source (a page of 50 orders is ~100 KB).
const MAX_ANSWER_BYTES: usize = 64 << 20;

///
/// The signing keys are `SecretString`s (zeroed on drop, read only where a request is signed);
/// the tokens rotate and are compared and sealed into the job queue, so they stay `String`s, kept
/// out of `Debug` by hand.
#[derive(Clone, Default)]
pub struct Credentials {
    pub app_key: String,
    pub app_secret: SecretString,
    pub access_token: String,
    pub refresh_token: String,
    pub partner_id: String,
    pub partner_key: SecretString,
    pub token: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("app_key", &self.app_key)
            .field("partner_id", &self.partner_id)
            .finish_non_exhaustive()
    }
}

/// One page as the API returned it.
#[derive(Debug, Clone)]
pub struct ApiPage {
    pub page_index: u32,
    pub has_next: bool,
    pub data_count: u64,
    pub page_count: u64,
    pub datas: Vec<Value>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("Jushuitan answered code {code}: {msg}")]
    Api { code: i64, msg: String },
    #[error("HTTP {status} from Jushuitan: {excerpt}")]
    Http { status: u16, excerpt: String },
    #[error("transport error: {0}")]
    Transport(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("undecodable response: {0}")]
    Decode(String),
}

impl CallError {
    /// What the caller should do.
    pub fn action(&self) -> CodeAction {
        match self {
            CallError::Api { code, .. } => classify_code(*code),
            CallError::Http { status, .. } if *status == 429 || *status >= 500 || *status == 408 => {
                CodeAction::Transient
            }
            CallError::Http { .. } => CodeAction::Permanent,
            CallError::Transport(_) | CallError::Timeout(_) | CallError::Decode(_) => CodeAction::Transient,
        }
    }

    /// Fixed, label-safe outcome for metrics.
    pub fn outcome(&self) -> String {
        match self {
            CallError::Api { code, .. } => format!("code_{code}"),
            CallError::Http { status, .. } if *status >= 500 => "http_5xx".into(),
            CallError::Http { .. } => "http_4xx".into(),
            CallError::Transport(_) => "transport".into(),
            CallError::Timeout(_) => "timeout".into(),
            CallError::Decode(_) => "decode".into(),
        }
    }
}

/// A refreshed token pair.
#[derive(Debug, Clone)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
}

#[derive(Clone)]
pub struct JstClient {
    http: reqwest::Client,
    base_url: String,
    generation: ApiGeneration,
}

fn transport(error: reqwest::Error) -> CallError {
    let timeout = error.is_timeout();
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if timeout { CallError::Timeout(text) } else { CallError::Transport(text) }
}

/// `orderflow-fetcher/<version> (<replica>)`: the source (and jst-sim's `/admin/stats`) can tell
/// which replica made a call. Nothing secret: the crate version and the replica's name (any
/// character a header cannot carry, from an odd `HOSTNAME`, becomes `_`).
pub fn user_agent() -> String {
    let replica: String =
        orderflow_shared::replica::name().chars().map(|c| if (' '..='~').contains(&c) { c } else { '_' }).collect();
    format!("orderflow-fetcher/{} ({replica})", env!("CARGO_PKG_VERSION"))
}

impl JstClient {
    /// The HTTP client every account of a replica shares (one connection pool and one TLS
    /// configuration, not one per account: with 1,000 accounts that was ~130 MiB).
    pub fn http(timeout: Duration) -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .user_agent(user_agent())
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))
    }

    /// A client for one account on a shared HTTP client (see [`JstClient::http`]).
    pub fn with_http(http: reqwest::Client, base_url: &str, generation: ApiGeneration) -> Result<Self, String> {
        let base_url = base_url.trim_end_matches('/').to_string();
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(format!("JST_BASE_URL must start with http:// or https://, got {base_url:?}"));
        }
        Ok(Self { http, base_url, generation })
    }

    pub fn generation(&self) -> ApiGeneration {
        self.generation
    }

    /// One signed `orders.out.simple.query` call.
    pub async fn query(&self, api: &str, creds: &Credentials, biz: &Map<String, Value>) -> Result<ApiPage, CallError> {
        let now = jiff::Timestamp::now().as_second();
        let biz_text = Value::Object(biz.clone()).to_string();
        let request = match self.generation {
            ApiGeneration::Open => {
                let url = format!("{}/open/{}", self.base_url, api.replace('.', "/"));
                let timestamp = now.to_string();
                let mut form: Vec<(&str, &str)> = vec![
                    ("app_key", creds.app_key.as_str()),
                    ("access_token", creds.access_token.as_str()),
                    ("timestamp", timestamp.as_str()),
                    ("version", "2"),
                    ("charset", "utf-8"),
                    ("biz", biz_text.as_str()),
                ];
                let sign = sign_open(creds.app_secret.expose_secret(), form.iter().copied());
                form.push(("sign", sign.as_str()));
                let body = serde_urlencoded::to_string(&form).map_err(|e| CallError::Decode(e.to_string()))?;
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded;charset=UTF-8")
                    .body(body)
            }
            ApiGeneration::Legacy => {
                let url = format!("{}/api/open/query.aspx", self.base_url);
                let sign = sign_legacy(api, &creds.partner_id, &creds.token, now, creds.partner_key.expose_secret());
                let ts = now.to_string();
                self.http
                    .post(url)
                    .query(&[
                        ("method", api),
                        ("partnerid", &creds.partner_id),
                        ("token", &creds.token),
                        ("ts", &ts),
                        ("sign", &sign),
                    ])
                    .header(reqwest::header::CONTENT_TYPE, "application/json; charset=utf-8")
                    .body(biz_text)
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let (bytes, cut) = orderflow_shared::body::read_limited(response, MAX_ANSWER_BYTES).await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(CallError::Http { status, excerpt: excerpt(&bytes) });
        }
        if cut {
            return Err(CallError::Decode(format!("the answer is over {} MiB; not read", MAX_ANSWER_BYTES >> 20)));
        }
        parse_page(&bytes, self.generation)
    }

    /// `POST /openWeb/auth/refreshToken`.
    pub async fn refresh_token(&self, creds: &Credentials) -> Result<TokenPair, CallError> {
        let url = format!("{}/openWeb/auth/refreshToken", self.base_url);
        let timestamp = jiff::Timestamp::now().as_second().to_string();
        let mut form: Vec<(&str, &str)> = vec![
            ("app_key", creds.app_key.as_str()),
            ("timestamp", timestamp.as_str()),
            ("grant_type", "refresh_token"),
            ("charset", "utf-8"),
            ("refresh_token", creds.refresh_token.as_str()),
            ("scope", "all"),
        ];
        let sign = sign_open(creds.app_secret.expose_secret(), form.iter().copied());
        form.push(("sign", sign.as_str()));
        let body = serde_urlencoded::to_string(&form).map_err(|e| CallError::Decode(e.to_string()))?;
        let response = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded;charset=UTF-8")
            .body(body)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(CallError::Http { status, excerpt: excerpt(&bytes) });
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| CallError::Decode(e.to_string()))?;
        let code = v.get("code").and_then(orderflow_shared::json::lenient_i64).unwrap_or(-1);
        if code != 0 {
            return Err(CallError::Api { code, msg: msg_of(&v) });
        }
        let data = v.get("data").ok_or_else(|| CallError::Decode("refresh answer has no data".into()))?;
        let field = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| CallError::Decode(format!("refresh answer has no {k}")))
        };
        Ok(TokenPair {
            access_token: field("access_token")?,
            refresh_token: field("refresh_token")?,
            expires_in: data
                .get("expires_in")
                .and_then(orderflow_shared::json::lenient_i64)
                .and_then(|n| u64::try_from(n).ok())
                .unwrap_or(0),
        })
    }
}

fn msg_of(v: &Value) -> String {
    v.get("msg").and_then(Value::as_str).unwrap_or("").to_string()
}

fn excerpt(bytes: &[u8]) -> String {
    orderflow_shared::amqp::headers::clip(&String::from_utf8_lossy(bytes), 200)
}

/// Parses either envelope into a page or the business error.
pub fn parse_page(bytes: &[u8], generation: ApiGeneration) -> Result<ApiPage, CallError> {
    let mut v: Value =
        serde_json::from_slice(bytes).map_err(|e| CallError::Decode(format!("{e}: {}", excerpt(bytes))))?;
    let code = v.get("code").and_then(orderflow_shared::json::lenient_i64);
    if let Some(code) = code.filter(|c| *c != 0) {
        return Err(CallError::Api { code, msg: msg_of(&v) });
    }
    if generation == ApiGeneration::Legacy && v.get("issuccess").and_then(Value::as_bool) == Some(false) {
        return Err(CallError::Api { code: code.unwrap_or(-1), msg: msg_of(&v) });
    }
    let data = match generation {
        ApiGeneration::Open => v
            .get_mut("data")
            .filter(|d| d.is_object())
            .ok_or_else(|| CallError::Decode("no data object in the answer".into()))?,
        ApiGeneration::Legacy => &mut v,
    };
    let num = |k: &str| {
        data.get(k).and_then(orderflow_shared::json::lenient_i64).and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
    };
    let page_index = u32::try_from(num("page_index")).unwrap_or(u32::MAX);
    let (data_count, page_count) = (num("data_count"), num("page_count"));
    let has_next = data.get("has_next").and_then(orderflow_shared::json::lenient_bool).unwrap_or(false);
    // The rows are moved out of the parsed answer, not copied (a page is ~100 KB of orders).
    let datas = match data.get_mut("datas").map(Value::take) {
        Some(Value::Array(rows)) => rows,
        None | Some(Value::Null) => Vec::new(),
        Some(other) => {
            return Err(CallError::Decode(format!("datas is not an array: {}", excerpt(other.to_string().as_bytes()))));
        }
    };
    Ok(ApiPage { page_index, has_next, data_count, page_count, datas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_agent_names_the_version_and_the_replica() {
        let expected =
            format!("orderflow-fetcher/{} ({})", env!("CARGO_PKG_VERSION"), orderflow_shared::replica::name());
        assert_eq!(user_agent(), expected);
        assert!(reqwest::header::HeaderValue::from_str(&user_agent()).is_ok(), "a valid header value");
    }

    #[test]
    fn both_envelopes_parse_into_a_page() {
        let open = br#"{"code":0,"msg":"ok","data":{"page_index":1,"page_size":50,"data_count":0,"page_count":0,"has_next":true,"datas":[{"o_id":1}]}}"#;
        let page = parse_page(open, ApiGeneration::Open).expect("page");
        assert!(page.has_next);
        assert_eq!(page.datas.len(), 1);
        let legacy = br#"{"code":0,"issuccess":true,"page_index":"2","has_next":false,"datas":[]}"#;
        let page = parse_page(legacy, ApiGeneration::Legacy).expect("page");
        assert_eq!(page.page_index, 2);
        assert!(!page.has_next);
    }

    #[test]
    fn business_codes_become_classified_errors() {
        let e = parse_page(br#"{"code":199,"msg":"too many","data":null}"#, ApiGeneration::Open).expect_err("error");
        assert_eq!(e.action(), CodeAction::RateLimited);
        let e =
            parse_page(br#"{"code":120,"issuccess":false,"msg":"sign"}"#, ApiGeneration::Legacy).expect_err("error");
        assert_eq!(e.action(), CodeAction::Permanent);
        let e = parse_page(b"{\"code\":0,\"data\":{\"datas\":[", ApiGeneration::Open).expect_err("truncated");
        assert_eq!(e.action(), CodeAction::Transient);
    }

    #[test]
    fn http_errors_are_classified_like_the_write_api() {
        assert_eq!(CallError::Http { status: 503, excerpt: String::new() }.action(), CodeAction::Transient);
        assert_eq!(CallError::Http { status: 429, excerpt: String::new() }.action(), CodeAction::Transient);
        assert_eq!(CallError::Http { status: 404, excerpt: String::new() }.action(), CodeAction::Permanent);
    }

    #[test]
    fn credentials_never_print_their_secrets() {
        let c = Credentials {
            app_key: "k".into(),
            app_secret: "SECRET1".into(),
            access_token: "SECRET2".into(),
            token: "SECRET3".into(),
            ..Credentials::default()
        };
        let text = format!("{c:?}");
        assert!(!text.contains("SECRET"), "{text}");
    }
}
