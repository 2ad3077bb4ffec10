//! Many accounts from one file (`ORDERFLOW_ACCOUNTS`, TOML or JSON): a `[defaults]` table and one
//! `[[accounts]]` entry per merchant, each with its own credentials, request config, cursor
//! (through its request config), budget and interval. Errors name the account and the key.
//!
//! ```toml
//! [defaults]
//! base_url = "https://openapi.jushuitan.com"
//! rate_per_sec = 5
//! rate_per_min = 100
//!
//! [[accounts]]
//! name = "shop-a"
//! app_key = "…"
//! app_secret = "…"
//! access_token = "…"
//! refresh_token = "…"
//! request_config = "config/seed-request-config.json"   # optional; relative to this file
//! ```

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    account::{Account, SyncStart, parse_account_name},
    client::{ApiGeneration, Credentials},
    config::load_request_config,
};

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    api: Option<ApiGeneration>,
    base_url: Option<String>,
    app_key: Option<String>,
    app_secret: Option<String>,
    access_token: Option<String>,
    refresh_token: Option<String>,
    partner_id: Option<String>,
    partner_key: Option<String>,
    token: Option<String>,
    request_config: Option<PathBuf>,
    sync_start: Option<String>,
    rate_per_sec: Option<u32>,
    rate_per_min: Option<u32>,
    interval: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Entry,
    accounts: Vec<Entry>,
}

/// Values used when neither the entry nor `[defaults]` gives one (the fetcher's own settings).
pub struct Fallbacks {
    pub rate_per_sec: u32,
    pub rate_per_min: u32,
    pub interval: Duration,
    pub sync_start: String,
}

pub fn load(path: &Path, fallbacks: &Fallbacks) -> Result<Vec<Account>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let file: File = if is_json {
        serde_json::from_str(&text).map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?
    } else {
        toml::from_str(&text).map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?
    };
    if file.accounts.is_empty() {
        return Err(format!("ORDERFLOW_ACCOUNTS {}: no [[accounts]]", path.display()));
    }
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(file.accounts.len());
    for (i, entry) in file.accounts.iter().enumerate() {
        let at = |key: &str| {
            format!(
                "ORDERFLOW_ACCOUNTS {}: accounts[{i}]{}: {key}",
                path.display(),
                entry.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
            )
        };
        let d = &file.defaults;
        macro_rules! pick {
            ($field:ident) => {
                entry.$field.clone().or_else(|| d.$field.clone())
            };
        }
        let need = |value: Option<String>, key: &str| {
            value.filter(|v| !v.trim().is_empty()).ok_or_else(|| format!("{} is required", at(key)))
        };
        let name =
            parse_account_name(&need(entry.name.clone(), "name")?).map_err(|e| format!("{}: {e}", at("name")))?;
        if !names.insert(name.clone()) {
            return Err(format!("{} {name:?} appears twice", at("name")));
        }
        let api = pick!(api).unwrap_or(ApiGeneration::Open);
        let credentials = match api {
            ApiGeneration::Open => Credentials {
                app_key: need(pick!(app_key), "app_key")?,
                app_secret: need(pick!(app_secret), "app_secret")?,
                access_token: need(pick!(access_token), "access_token")?,
                refresh_token: pick!(refresh_token).unwrap_or_default(),
                ..Credentials::default()
            },
            ApiGeneration::Legacy => Credentials {
                partner_id: need(pick!(partner_id), "partner_id")?,
                partner_key: need(pick!(partner_key), "partner_key")?,
                token: need(pick!(token), "token")?,
                ..Credentials::default()
            },
        };
        let request_path = pick!(request_config).map(|p| if p.is_relative() { base_dir.join(p) } else { p });
        let request =
            load_request_config(request_path.as_ref()).map_err(|e| format!("{}: {e}", at("request_config")))?;
        let interval = match pick!(interval) {
            Some(text) => {
                orderflow_shared::settings::parse_duration(&text).map_err(|e| format!("{}: {e}", at("interval")))?
            }
            None => fallbacks.interval,
        };
        let sync_start = SyncStart::parse(&pick!(sync_start).unwrap_or_else(|| fallbacks.sync_start.clone()))
            .map_err(|e| format!("{}: {e}", at("sync_start")))?;
        let account = Account {
            name,
            api,
            base_url: need(pick!(base_url), "base_url")?,
            credentials,
            request,
            sync_start,
            rate_per_sec: pick!(rate_per_sec).unwrap_or(fallbacks.rate_per_sec),
            rate_per_min: pick!(rate_per_min).unwrap_or(fallbacks.rate_per_min),
            interval,
        };
        account.validate().map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?;
        out.push(account);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fallbacks() -> Fallbacks {
        Fallbacks { rate_per_sec: 5, rate_per_min: 100, interval: Duration::from_secs(60), sync_start: "7d".into() }
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("orderflow-accounts-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn toml_accounts_take_defaults_and_overrides() {
        let path = write(
            "accounts.toml",
            r#"
            [defaults]
            base_url = "http://127.0.0.1:8081"
            rate_per_min = 90
            [[accounts]]
            name = "a"
            app_key = "k1"
            app_secret = "s1"
            access_token = "t1"
            [[accounts]]
            name = "b"
            api = "legacy"
            partner_id = "p"
            partner_key = "pk"
            token = "t"
            rate_per_min = 50
            interval = "5s"
            "#,
        );
        let accounts = load(&path, &fallbacks()).expect("loads");
        assert_eq!(accounts.len(), 2);
        assert_eq!(accounts[0].rate_per_min, 90);
        assert_eq!(accounts[1].rate_per_min, 50);
        assert_eq!(accounts[1].api, ApiGeneration::Legacy);
        assert_eq!(accounts[1].interval, Duration::from_secs(5));
    }

    #[test]
    fn json_works_too_and_errors_name_the_account_and_key() {
        let path = write(
            "accounts.json",
            r#"{"accounts": [{"name": "a", "base_url": "http://x", "app_key": "k", "app_secret": "s"}]}"#,
        );
        let e = load(&path, &fallbacks()).expect_err("missing token");
        assert!(e.contains("accounts[0] (a)") && e.contains("access_token"), "{e}");
        let path = write(
            "dup.json",
            r#"{"accounts": [{"name": "a", "base_url": "http://x", "app_key": "k", "app_secret": "s", "access_token": "t"}, {"name": "a", "base_url": "http://x", "app_key": "k", "app_secret": "s", "access_token": "t"}]}"#,
        );
        assert!(load(&path, &fallbacks()).expect_err("duplicate").contains("twice"));
        let path = write("typo.toml", "[[accounts]]\nname = \"a\"\napp_kee = \"k\"\n");
        assert!(load(&path, &fallbacks()).expect_err("unknown key").contains("app_kee"));
    }
}
