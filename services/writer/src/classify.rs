//! What a write's answer means: written, transient (retry later, honouring `Retry-After`),
//! permanent (dead-letter now), or target-level (the target or our configuration is wrong, not
//! the record: hold everything until the target accepts again). A 2xx is read, not trusted:
//! platform APIs answer business errors with HTTP 200 and `{"success": false, "code", "message"}`.

use std::{collections::HashSet, time::Duration};

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    Written,
    Transient {
        /// Fixed label: http_5xx, http_429, http_408, timeout, connect, transport, soft_failure.
        reason: &'static str,
        detail: String,
        retry_after: Option<Duration>,
        /// Connection refused/failed: counts double toward opening the breaker.
        connection: bool,
        /// The target is overloaded (408, 429, 503, a timeout): adaptive concurrency backs off.
        refused: bool,
    },
    Permanent {
        detail: String,
    },
    /// Not this record's fault: every record would get the same answer (401/403/407, 404 on the
    /// endpoint, TLS or DNS failure). Opens the breaker at once; no attempt is spent.
    TargetDown {
        /// Fixed label: http_401, http_403, http_404, http_407, tls, dns.
        reason: &'static str,
        detail: String,
        /// 401/403/407: the credentials (TARGET_AUTH_HEADER) are refused.
        unauthorized: bool,
    },
}

impl WriteOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            WriteOutcome::Written => "written",
            WriteOutcome::Transient { reason, .. } | WriteOutcome::TargetDown { reason, .. } => reason,
            WriteOutcome::Permanent { .. } => "rejected",
        }
    }

    /// What the write tells adaptive concurrency about the target's load.
    pub fn signal(&self) -> crate::pace::Signal {
        use crate::pace::Signal;
        match self {
            WriteOutcome::Written | WriteOutcome::Permanent { .. } => Signal::Answered,
            WriteOutcome::Transient { refused: true, .. } => Signal::Refused,
            WriteOutcome::Transient { .. } | WriteOutcome::TargetDown { .. } => Signal::Other,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            WriteOutcome::Written => None,
            WriteOutcome::Transient { detail, .. }
            | WriteOutcome::Permanent { detail }
            | WriteOutcome::TargetDown { detail, .. } => Some(detail),
        }
    }
}

/// When a 2xx answer means written (`TARGET_SUCCESS`).
///
/// `status`: any 2xx, the body is not read. Otherwise a comma-separated list of conditions on the
/// answer's JSON object, every one of which must hold: `path=v1|v2` (present and one of the
/// values), `path?=v1|v2` (absent, or one of the values), `path!=v1|v2` (absent, or none of them).
/// A path is dot-separated keys (`data.status`); a value is a JSON scalar (`0`, `"0"`, `false`)
/// or a bare word taken as a string. A body that is not a JSON object satisfies `?=` and `!=` but
/// not `=`. The default is [`DEFAULT_SUCCESS`].
#[derive(Debug, Clone, PartialEq)]
pub enum SuccessRule {
    Status,
    Body(Vec<Condition>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    path: Vec<String>,
    op: Op,
    values: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Is,
    IsIfPresent,
    IsNot,
}

/// The issue's rule (`success` not false, `code` if present 0/200/"0") plus `errcode`, which the
/// other common answer shape (`{"errcode","errmsg"}`) uses for the same thing.
pub const DEFAULT_SUCCESS: &str = r#"success!=false,code?=0|200|"0",errcode?=0|"0""#;

impl SuccessRule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        match text {
            "status" => return Ok(SuccessRule::Status),
            "" | "default" => return Self::parse(DEFAULT_SUCCESS),
            _ => {}
        }
        let conditions = text.split(',').map(str::trim).filter(|c| !c.is_empty()).map(Condition::parse);
        let conditions = conditions.collect::<Result<Vec<_>, _>>()?;
        if conditions.is_empty() {
            return Err("give `status`, `default`, or conditions such as `success=true,code=0`".into());
        }
        Ok(SuccessRule::Body(conditions))
    }

    pub fn reads_body(&self) -> bool {
        matches!(self, SuccessRule::Body(_))
    }

    /// The first condition the answer breaks, as text for a person; `None` when it is a success.
    pub fn broken_by(&self, body: Option<&Value>) -> Option<String> {
        let SuccessRule::Body(conditions) = self else { return None };
        let object = body.filter(|b| b.is_object());
        conditions.iter().find(|c| !c.holds(object)).map(Condition::describe)
    }
}

impl Condition {
    fn parse(text: &str) -> Result<Self, String> {
        let (path, op, values) = if let Some((p, v)) = text.split_once("?=") {
            (p, Op::IsIfPresent, v)
        } else if let Some((p, v)) = text.split_once("!=") {
            (p, Op::IsNot, v)
        } else if let Some((p, v)) = text.split_once('=') {
            (p, Op::Is, v)
        } else {
            return Err(format!("{text:?} is not a condition (path=values, path?=values or path!=values)"));
        };
        let path: Vec<String> = path.trim().split('.').map(|k| k.trim().to_string()).collect();
        if path.iter().any(String::is_empty) {
            return Err(format!("{text:?}: the field path is empty"));
        }
        let values: Vec<Value> = values
            .split('|')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string())))
            .collect();
        if values.is_empty() {
            return Err(format!("{text:?}: give at least one value"));
        }
        Ok(Condition { path, op, values })
    }

    fn holds(&self, object: Option<&Value>) -> bool {
        let found = object.and_then(|o| self.path.iter().try_fold(o, |v, key| v.get(key)));
        let listed = found.is_some_and(|v| self.values.iter().any(|want| same_scalar(want, v)));
        match self.op {
            Op::Is => listed,
            Op::IsIfPresent => found.is_none() || listed,
            Op::IsNot => found.is_none() || !listed,
        }
    }

    fn describe(&self) -> String {
        let values: Vec<String> = self.values.iter().map(Value::to_string).collect();
        let op = match self.op {
            Op::Is => "=",
            Op::IsIfPresent => "?=",
            Op::IsNot => "!=",
        };
        format!("{}{op}{}", self.path.join("."), values.join("|"))
    }
}

/// JSON equality, with numbers compared by value (`0` and `0.0` are the same code).
fn same_scalar(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Number(a), Value::Number(b)) => a == b || a.as_f64().is_some_and(|x| b.as_f64() == Some(x)),
        _ => want == got,
    }
}

/// How the writer reads the target's answers.
#[derive(Debug, Clone)]
pub struct Rules {
    pub success: SuccessRule,
    /// Body codes that mean "this record will never be accepted" (`TARGET_PERMANENT_CODES`).
    pub permanent_codes: HashSet<String>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            success: SuccessRule::parse(DEFAULT_SUCCESS).unwrap_or(SuccessRule::Status),
            permanent_codes: HashSet::new(),
        }
    }
}

pub fn parse_codes(text: &str) -> Result<HashSet<String>, String> {
    Ok(text.split(',').map(|c| c.trim().trim_matches('"').to_string()).filter(|c| !c.is_empty()).collect())
}

/// The answer's business code and message, under the names platforms use for them.
pub fn code_and_message(body: Option<&Value>) -> (Option<String>, Option<String>) {
    let pick = |keys: &[&str]| {
        keys.iter().find_map(|k| body?.get(*k)).and_then(orderflow_shared::json::scalar_text).filter(|s| !s.is_empty())
    };
    (
        pick(&["code", "errcode", "errCode", "error_code", "errorCode"]),
        pick(&["message", "msg", "errmsg", "errMsg", "error_msg", "errorMessage", "error"]),
    )
}

/// What the target answered one write, as the ledger records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status; 0 when no answer came (a timeout, a connection error).
    pub status: u16,
    pub code: Option<String>,
    pub message: Option<String>,
    /// The answer says the record was there already (idCheck): `duplicate` or `data.duplicate`.
    pub duplicate: bool,
}

impl Answer {
    /// No answer: what happened instead.
    pub fn none(detail: &str) -> Answer {
        Answer { message: Some(orderflow_shared::amqp::headers::clip(detail, 300)), ..Answer::default() }
    }
}

/// Classifies an HTTP answer: its status, `Retry-After` and (at most the first 64 KiB of) its body.
pub fn classify(rules: &Rules, status: u16, retry_after: Option<&str>, body: &[u8]) -> WriteOutcome {
    classify_answer(rules, status, retry_after, body).0
}

/// [`classify`], and what the answer said (status, business code and message, duplicate).
pub fn classify_answer(rules: &Rules, status: u16, retry_after: Option<&str>, body: &[u8]) -> (WriteOutcome, Answer) {
    let parsed: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(body).ok() };
    let (code, mut message) = code_and_message(parsed.as_ref());
    let duplicate = parsed.as_ref().is_some_and(|b| {
        [b.get("duplicate"), b.get("data").and_then(|d| d.get("duplicate"))].into_iter().flatten().any(|v| v == true)
    });
    let outcome = classify_parsed(rules, status, retry_after, body, parsed.as_ref());
    if message.is_none() && !(200..300).contains(&status) && !body.is_empty() {
        message = Some(orderflow_shared::amqp::headers::clip(String::from_utf8_lossy(body).trim(), 200));
    }
    (outcome, Answer { status, code, message, duplicate })
}

fn classify_parsed(
    rules: &Rules,
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    parsed: Option<&Value>,
) -> WriteOutcome {
    let text = String::from_utf8_lossy(body);
    let excerpt = orderflow_shared::amqp::headers::clip(text.trim(), 300);
    match status {
        200..=299 => classify_2xx(rules, status, parsed, &excerpt),
        401 | 403 | 404 | 407 => WriteOutcome::TargetDown {
            reason: match status {
                401 => "http_401",
                403 => "http_403",
                404 => "http_404",
                _ => "http_407",
            },
            detail: format!("HTTP {status} from the write endpoint: {excerpt}"),
            unauthorized: status != 404,
        },
        408 | 429 | 500..=599 => WriteOutcome::Transient {
            reason: match status {
                408 => "http_408",
                429 => "http_429",
                _ => "http_5xx",
            },
            detail: format!("HTTP {status}: {excerpt}"),
            retry_after: retry_after.and_then(parse_retry_after),
            connection: false,
            refused: matches!(status, 408 | 429 | 503),
        },
        _ => WriteOutcome::Permanent { detail: format!("HTTP {status}: {excerpt}") },
    }
}

fn classify_2xx(rules: &Rules, status: u16, parsed: Option<&Value>, excerpt: &str) -> WriteOutcome {
    if !rules.success.reads_body() {
        return WriteOutcome::Written;
    }
    let Some(broken) = rules.success.broken_by(parsed) else { return WriteOutcome::Written };
    let (code, message) = code_and_message(parsed);
    let said = match (&code, &message) {
        (Some(c), Some(m)) => format!("code {c}: {m}"),
        (Some(c), None) => format!("code {c}"),
        (None, Some(m)) => m.clone(),
        (None, None) => excerpt.to_string(),
    };
    let detail = format!("HTTP {status} but the answer says it was not written ({broken} does not hold): {said}");
    if code.as_ref().is_some_and(|c| rules.permanent_codes.contains(c)) {
        return WriteOutcome::Permanent { detail };
    }
    WriteOutcome::Transient { reason: "soft_failure", detail, retry_after: None, connection: false, refused: false }
}

/// `Retry-After` as seconds, or an HTTP date (RFC 2822 form).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let now = jiff::Timestamp::now();
    let ms = u64::try_from(at.as_millisecond() - now.as_millisecond()).unwrap_or(0);
    Some(Duration::from_millis(ms.min(24 * 3600 * 1000)))
}

/// The tier for a record that has been tried `attempts` times: the tier for its attempt number,
/// raised to the smallest tier that honours `Retry-After`.
pub fn choose_tier(tiers: &[Duration], attempts: u32, retry_after: Option<Duration>) -> Option<Duration> {
    let last = *tiers.last()?;
    let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    let base = tiers.get(index).copied().unwrap_or(last);
    let want = base.max(retry_after.unwrap_or_default());
    Some(tiers.iter().copied().find(|t| *t >= want).unwrap_or(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_rules() -> Rules {
        Rules::default()
    }

    fn answer(status: u16, body: &str) -> WriteOutcome {
        classify(&default_rules(), status, None, body.as_bytes())
    }

    #[test]
    fn status_codes_are_classified_as_the_contract_says() {
        assert_eq!(answer(200, ""), WriteOutcome::Written);
        assert_eq!(answer(201, ""), WriteOutcome::Written);
        for transient in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(answer(transient, ""), WriteOutcome::Transient { .. }), "{transient}");
        }
        for permanent in [400, 409, 422] {
            assert!(matches!(answer(permanent, ""), WriteOutcome::Permanent { .. }), "{permanent}");
        }
    }

    #[test]
    fn auth_and_endpoint_failures_are_the_targets_fault_not_the_records() {
        for (status, unauthorized) in [(401, true), (403, true), (407, true), (404, false)] {
            match answer(status, r#"{"success":false,"message":"token expired"}"#) {
                WriteOutcome::TargetDown { unauthorized: u, detail, .. } => {
                    assert_eq!(u, unauthorized, "{status}");
                    assert!(detail.contains("token expired"), "{detail}");
                }
                other => panic!("{status}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_200_that_says_failed_is_not_written() {
        let busy = answer(200, r#"{"success":false,"code":50001,"message":"系统繁忙"}"#);
        let WriteOutcome::Transient { reason, detail, .. } = busy else { panic!("{busy:?}") };
        assert_eq!(reason, "soft_failure");
        assert!(detail.contains("50001") && detail.contains("系统繁忙"), "{detail}");
        // No `success`, a failing code as a string, another name for the message.
        assert!(matches!(answer(200, r#"{"code":"E1001","msg":"db down"}"#), WriteOutcome::Transient { .. }));
        assert!(matches!(answer(200, r#"{"success":true,"code":500}"#), WriteOutcome::Transient { .. }));
        assert!(matches!(answer(200, r#"{"errcode":40013,"errmsg":"invalid"}"#), WriteOutcome::Transient { .. }));
        for ok in [
            r#"{"success":true,"code":0,"message":"ok"}"#,
            r#"{"success":true}"#,
            r#"{"code":200}"#,
            r#"{"code":"0","data":{"id":"1"}}"#,
            r#"{"code":0.0}"#,
            r#"{"errcode":0,"errmsg":"ok"}"#,
            "OK",
            "",
            "[1,2]",
        ] {
            assert_eq!(answer(200, ok), WriteOutcome::Written, "{ok}");
        }
    }

    #[test]
    fn listed_business_codes_are_permanent_with_the_targets_message() {
        let rules = Rules { permanent_codes: parse_codes(r#"40001, "40002""#).expect("codes"), ..default_rules() };
        let body = r#"{"success":false,"code":40002,"message":"字段 amount 无效"}"#;
        match classify(&rules, 200, None, body.as_bytes()) {
            WriteOutcome::Permanent { detail } => assert!(detail.contains("40002: 字段 amount 无效"), "{detail}"),
            other => panic!("{other:?}"),
        }
        let body = br#"{"success":false,"code":50001,"message":"busy"}"#;
        assert!(matches!(classify(&rules, 200, None, body), WriteOutcome::Transient { .. }));
    }

    #[test]
    fn the_success_rule_is_configurable() {
        let strict = Rules {
            success: SuccessRule::parse("success=true, data.status=ok|done").expect("rule"),
            ..default_rules()
        };
        assert_eq!(
            classify(&strict, 200, None, br#"{"success":true,"data":{"status":"done"}}"#),
            WriteOutcome::Written
        );
        assert!(matches!(classify(&strict, 200, None, br#"{"success":true}"#), WriteOutcome::Transient { .. }));
        assert!(matches!(classify(&strict, 200, None, b"<html>maintenance</html>"), WriteOutcome::Transient { .. }));
        let status_only = Rules { success: SuccessRule::parse("status").expect("rule"), ..default_rules() };
        assert_eq!(classify(&status_only, 200, None, br#"{"success":false}"#), WriteOutcome::Written);
        assert_eq!(SuccessRule::parse("default"), SuccessRule::parse(DEFAULT_SUCCESS));
        for bad in ["success", "=1", "code=", "a..b=1", ","] {
            assert!(SuccessRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT").is_some());
        assert_eq!(parse_retry_after("soon"), None);
        let WriteOutcome::Transient { retry_after, .. } = classify(&default_rules(), 429, Some("3"), b"") else {
            panic!("transient")
        };
        assert_eq!(retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn tiers_grow_with_attempts_and_honour_retry_after() {
        let tiers = [1, 10, 60, 600].map(Duration::from_secs);
        assert_eq!(choose_tier(&tiers, 1, None), Some(Duration::from_secs(1)));
        assert_eq!(choose_tier(&tiers, 2, None), Some(Duration::from_secs(10)));
        assert_eq!(choose_tier(&tiers, 7, None), Some(Duration::from_secs(600)));
        assert_eq!(choose_tier(&tiers, 1, Some(Duration::from_secs(5))), Some(Duration::from_secs(10)));
        assert_eq!(choose_tier(&tiers, 1, Some(Duration::from_secs(9999))), Some(Duration::from_secs(600)));
        assert_eq!(choose_tier(&[], 1, None), None);
    }
}
