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

/// No `Debug`: an entry holds secrets as plain strings until they become `Credentials`.
#[derive(Default, Clone, Deserialize)]
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

#[derive(Deserialize)]
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
    let file = read(path)?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(file.accounts.len());
    for (index, entry) in file.accounts.iter().enumerate() {
        let spot = Spot { path, index, name: entry.name.as_deref() };
        let entry = entry.clone().or(&file.defaults);
        let name = parse_account_name(&spot.need(entry.name.clone(), "name")?)
            .map_err(|e| format!("{}: {e}", spot.at("name")))?;
        if !names.insert(name.clone()) {
            return Err(format!("{} {name:?} appears twice", spot.at("name")));
        }
        let account = account(name, entry, &spot, base_dir, fallbacks)?;
        account.validate().map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?;
        out.push(account);
    }
    Ok(out)
}

/// The file, parsed (JSON by its extension or its first character, else TOML); at least one account.
fn read(path: &Path) -> Result<File, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?;
    let is_json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    let file: File = if is_json {
        serde_json::from_str(&text).map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {e}", path.display()))?
    } else {
        toml::from_str(&text)
            .map_err(|e| format!("ORDERFLOW_ACCOUNTS {}: {}", path.display(), toml_error(&text, &e)))?
    };
    if file.accounts.is_empty() {
        return Err(format!("ORDERFLOW_ACCOUNTS {}: no [[accounts]]", path.display()));
    }
    Ok(file)
}

/// A TOML error without the source line toml quotes (the line may hold a secret): where, and why.
fn toml_error(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("not valid TOML at line {line}, column {column}: {}", error.message())
        }
        None => format!("not valid TOML: {}", error.message()),
    }
}

impl Entry {
    /// This entry with `[defaults]` filling what it leaves out (not its name: each entry names itself).
    fn or(self, d: &Entry) -> Entry {
        Entry {
            name: self.name,
            api: self.api.or(d.api),
            base_url: self.base_url.or_else(|| d.base_url.clone()),
            app_key: self.app_key.or_else(|| d.app_key.clone()),
            app_secret: self.app_secret.or_else(|| d.app_secret.clone()),
            access_token: self.access_token.or_else(|| d.access_token.clone()),
            refresh_token: self.refresh_token.or_else(|| d.refresh_token.clone()),
            partner_id: self.partner_id.or_else(|| d.partner_id.clone()),
            partner_key: self.partner_key.or_else(|| d.partner_key.clone()),
            token: self.token.or_else(|| d.token.clone()),
            request_config: self.request_config.or_else(|| d.request_config.clone()),
            sync_start: self.sync_start.or_else(|| d.sync_start.clone()),
            rate_per_sec: self.rate_per_sec.or(d.rate_per_sec),
            rate_per_min: self.rate_per_min.or(d.rate_per_min),
            interval: self.interval.or_else(|| d.interval.clone()),
        }
    }
}

/// Where an entry is in the file, for error messages.
struct Spot<'a> {
    path: &'a Path,
    index: usize,
    name: Option<&'a str>,
}

impl Spot<'_> {
    /// `ORDERFLOW_ACCOUNTS <file>: accounts[<i>] (<name>): <key>`.
    fn at(&self, key: &str) -> String {
        format!(
            "ORDERFLOW_ACCOUNTS {}: accounts[{}]{}: {key}",
            self.path.display(),
            self.index,
            self.name.map(|n| format!(" ({n})")).unwrap_or_default()
        )
    }

    /// A value that must be there and not blank.
    fn need(&self, value: Option<String>, key: &str) -> Result<String, String> {
        value.filter(|v| !v.trim().is_empty()).ok_or_else(|| format!("{} is required", self.at(key)))
    }
}

/// The account an entry (with its defaults) describes; `name` is already checked.
fn account(name: String, entry: Entry, spot: &Spot, base_dir: &Path, fallbacks: &Fallbacks) -> Result<Account, String> {
    let api = entry.api.unwrap_or(ApiGeneration::Open);
    let credentials = credentials(api, &entry, spot)?;
    let request_path = entry.request_config.map(|p| if p.is_relative() { base_dir.join(p) } else { p });
    let request =
        load_request_config(request_path.as_ref()).map_err(|e| format!("{}: {e}", spot.at("request_config")))?;
    let interval = match entry.interval {
        Some(text) => {
            orderflow_shared::settings::parse_duration(&text).map_err(|e| format!("{}: {e}", spot.at("interval")))?
        }
        None => fallbacks.interval,
    };
    let sync_start = SyncStart::parse(&entry.sync_start.unwrap_or_else(|| fallbacks.sync_start.clone()))
        .map_err(|e| format!("{}: {e}", spot.at("sync_start")))?;
    Ok(Account {
        name,
        api,
        base_url: spot.need(entry.base_url, "base_url")?,
        credentials,
        request,
        sync_start,
        rate_per_sec: entry.rate_per_sec.unwrap_or(fallbacks.rate_per_sec),
        rate_per_min: entry.rate_per_min.unwrap_or(fallbacks.rate_per_min),
        interval,
    })
}

/// The credentials the entry's API generation needs.
fn credentials(api: ApiGeneration, entry: &Entry, spot: &Spot) -> Result<Credentials, String> {
    Ok(match api {
        ApiGeneration::Open => Credentials {
            app_key: spot.need(entry.app_key.clone(), "app_key")?,
            app_secret: spot.need(entry.app_secret.clone(), "app_secret")?.into(),
            access_token: spot.need(entry.access_token.clone(), "access_token")?,
            refresh_token: entry.refresh_token.clone().unwrap_or_default(),
            ..Credentials::default()
        },
        ApiGeneration::Legacy => Credentials {
            partner_id: spot.need(entry.partner_id.clone(), "partner_id")?,
            partner_key: spot.need(entry.partner_key.clone(), "partner_key")?.into(),
            token: spot.need(entry.token.clone(), "token")?,
            ..Credentials::default()
        },
    })
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
    fn a_broken_line_is_located_without_quoting_it() {
        let path = write(
            "broken.toml",
            "[[accounts]]\nname = \"a\"\nbase_url = \"http://x\"\napp_key = \"k\"\napp_secret = hunter2-unquoted\n",
        );
        let error = load(&path, &fallbacks()).expect_err("broken");
        assert!(error.contains("line 5") && error.contains("ORDERFLOW_ACCOUNTS"), "{error}");
        assert!(!error.contains("hunter2"), "the secret's line must not be quoted: {error}");
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
