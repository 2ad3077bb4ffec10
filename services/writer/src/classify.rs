//! What a write's result means: written, transient (retry later, honouring `Retry-After`), or
//! permanent (dead-letter now). And which retry tier a transient failure goes to.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    Written,
    Transient {
        /// Fixed label: http_5xx, http_429, http_408, timeout, connect, transport.
        reason: &'static str,
        detail: String,
        retry_after: Option<Duration>,
        /// Connection refused/failed: counts double toward opening the breaker.
        connection: bool,
    },
    Permanent {
        detail: String,
    },
}

impl WriteOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            WriteOutcome::Written => "written",
            WriteOutcome::Transient { reason, .. } => reason,
            WriteOutcome::Permanent { .. } => "rejected",
        }
    }
}

/// Classifies an HTTP answer.
pub fn classify_status(status: u16, retry_after: Option<&str>, body_excerpt: &str) -> WriteOutcome {
    match status {
        200..=299 => WriteOutcome::Written,
        408 | 429 | 500..=599 => WriteOutcome::Transient {
            reason: match status {
                408 => "http_408",
                429 => "http_429",
                _ => "http_5xx",
            },
            detail: format!("HTTP {status}: {body_excerpt}"),
            retry_after: retry_after.and_then(parse_retry_after),
            connection: false,
        },
        _ => WriteOutcome::Permanent { detail: format!("HTTP {status}: {body_excerpt}") },
    }
}

/// `Retry-After` as seconds, or an HTTP date (RFC 2822 form).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(24 * 3600)));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    let now = jiff::Timestamp::now();
    let ms = (at.as_millisecond() - now.as_millisecond()).max(0) as u64;
    Some(Duration::from_millis(ms.min(24 * 3600 * 1000)))
}

/// The tier for a record that has been tried `attempts` times: the tier for its attempt number,
/// raised to the smallest tier that honours `Retry-After`.
pub fn choose_tier(tiers: &[Duration], attempts: u32, retry_after: Option<Duration>) -> Option<Duration> {
    let last = *tiers.last()?;
    let base = tiers.get(attempts.saturating_sub(1) as usize).copied().unwrap_or(last);
    let want = base.max(retry_after.unwrap_or_default());
    Some(tiers.iter().copied().find(|t| *t >= want).unwrap_or(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_classified_as_the_contract_says() {
        assert_eq!(classify_status(200, None, ""), WriteOutcome::Written);
        assert_eq!(classify_status(201, None, ""), WriteOutcome::Written);
        for transient in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify_status(transient, None, ""), WriteOutcome::Transient { .. }), "{transient}");
        }
        for permanent in [400, 401, 403, 404, 409, 422] {
            assert!(matches!(classify_status(permanent, None, ""), WriteOutcome::Permanent { .. }), "{permanent}");
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT").is_some());
        assert_eq!(parse_retry_after("soon"), None);
        let WriteOutcome::Transient { retry_after, .. } = classify_status(429, Some("3"), "") else {
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
