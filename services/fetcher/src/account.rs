//! A source account: one merchant's credentials, base URL, API generation, request config,
//! rate budget and sync settings.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::{
    client::{ApiGeneration, Credentials},
    request_config::RequestConfig,
};

#[derive(Debug, Clone)]
pub struct Account {
    /// Unique name; part of queue names and record message ids.
    pub name: String,
    pub api: ApiGeneration,
    pub base_url: String,
    pub credentials: Credentials,
    pub request: RequestConfig,
    pub sync_start: SyncStart,
    pub rate_per_sec: u32,
    pub rate_per_min: u32,
    pub interval: Duration,
}

impl Account {
    pub fn validate(&self) -> Result<(), String> {
        if self.rate_per_min == 0 || self.rate_per_sec == 0 {
            return Err(format!("account {}: JST_RATE_PER_SEC and JST_RATE_PER_MIN must be at least 1", self.name));
        }
        Ok(())
    }
}

/// Where a first modified-window sync starts.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncStart {
    At(Timestamp),
    Ago(SignedDuration),
}

impl SyncStart {
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(ts) = orderflow_shared::time::parse_china(text) {
            return Ok(SyncStart::At(ts));
        }
        if let Ok(ts) = text.parse::<Timestamp>() {
            return Ok(SyncStart::At(ts));
        }
        let d = orderflow_shared::settings::parse_duration(text).map_err(|_| {
            format!("{text:?} is neither a datetime (2024-01-01 00:00:00, China time) nor a duration (7d)")
        })?;
        SignedDuration::try_from(d).map(SyncStart::Ago).map_err(|e| e.to_string())
    }

    pub fn resolve(&self, now: Timestamp) -> Timestamp {
        match self {
            SyncStart::At(ts) => *ts,
            SyncStart::Ago(d) => now.checked_sub(*d).unwrap_or(now),
        }
    }
}

pub fn parse_account_name(name: &str) -> Result<String, String> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!("account name {name:?} must be 1-64 characters of [A-Za-z0-9_-]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_start_takes_a_datetime_or_a_duration() {
        let now = Timestamp::from_second(1_700_000_000).expect("valid");
        assert_eq!(
            SyncStart::parse("7d").expect("ok").resolve(now),
            now.checked_sub(SignedDuration::from_hours(168)).expect("ok")
        );
        assert_eq!(SyncStart::parse("2023-11-14 06:13:20").expect("ok").resolve(now).as_second(), 1_699_913_600);
        assert!(SyncStart::parse("last tuesday").is_err());
    }

    #[test]
    fn account_names_are_safe_for_queue_names() {
        assert!(parse_account_name("shop-1_a").is_ok());
        assert!(parse_account_name("a.b").is_err());
        assert!(parse_account_name("").is_err());
    }
}
