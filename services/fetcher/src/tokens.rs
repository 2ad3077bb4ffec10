//! Token pairs that never go backwards. Jushuitan's refresh token is single-use: a refresh spends
//! it and hands back a new pair, so the newest pair must win everywhere — in this replica's
//! memory, in the job (checkpoint) in the broker, and against the pair the operator configured.
//!
//! - Every refreshed pair carries when it was issued and a fingerprint of the configured pair it
//!   descends from. Of the stored pair and the one in memory, the newer is used (a refresh whose
//!   commit failed is not undone by reloading the job).
//! - When the configured pair (JST_ACCESS_TOKEN/JST_REFRESH_TOKEN or the accounts file) is not the
//!   one the newest pair descends from, the operator has set new tokens: they are used.
//! - Tokens stored in the broker are sealed (ChaCha20-Poly1305) when `ORDERFLOW_SECRET_KEY` is set.

use std::sync::Mutex;

use base64::Engine as _;
use ring::{
    aead::{self, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey},
    digest,
    rand::{SecureRandom, SystemRandom},
};

use crate::{client::Credentials, job::Tokens};

/// A short fingerprint of a configured token pair (never the tokens themselves).
pub fn fingerprint(credentials: &Credentials) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for part in ["orderflow-token-pair\0", &credentials.access_token, "\0", &credentials.refresh_token] {
        ctx.update(part.as_bytes());
    }
    ctx.finish().as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Which pair to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Stored,
    Memory,
    Configured,
}

/// The newest of the stored and in-memory pairs, unless the configured pair changed since it was
/// derived (then the configured one). A pair with no fingerprint (stored before fingerprints
/// existed) counts as derived from the current configuration.
pub fn pick(stored: Option<&Tokens>, memory: Option<&Tokens>, configured_fp: &str) -> Pick {
    let newest = match (stored, memory) {
        (Some(s), Some(m)) if m.issued_at_ms > s.issued_at_ms => Some((Pick::Memory, m)),
        (Some(s), _) => Some((Pick::Stored, s)),
        (None, Some(m)) => Some((Pick::Memory, m)),
        (None, None) => None,
    };
    match newest {
        Some((which, t)) if t.from_config.is_empty() || t.from_config == configured_fp => which,
        _ => Pick::Configured,
    }
}

/// The account's token state in this replica: the configured pair and the newest pair known.
pub struct TokenBook {
    configured: Mutex<Credentials>,
    newest: Mutex<Option<Tokens>>,
}

impl TokenBook {
    pub fn new(configured: Credentials) -> Self {
        Self { configured: Mutex::new(configured), newest: Mutex::new(None) }
    }

    pub fn configured(&self) -> Credentials {
        self.configured.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The operator changed the configured pair (a re-read accounts file).
    pub fn set_configured(&self, credentials: Credentials) {
        *self.configured.lock().unwrap_or_else(|e| e.into_inner()) = credentials;
    }

    pub fn newest(&self) -> Option<Tokens> {
        self.newest.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A pair just issued by a refresh (or the configured pair adopted after the stored one was
    /// refused): it beats anything older.
    pub fn remember(&self, tokens: Tokens) {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if newest.as_ref().is_none_or(|n| tokens.issued_at_ms >= n.issued_at_ms) {
            *newest = Some(tokens);
        }
    }

    /// A new pair from a refresh, stamped now and with the lineage of the configured pair.
    pub fn issued(&self, access_token: String, refresh_token: String) -> Tokens {
        let tokens = Tokens {
            access_token,
            refresh_token,
            issued_at_ms: jiff::Timestamp::now().as_millisecond(),
            from_config: fingerprint(&self.configured()),
        };
        self.remember(tokens.clone());
        tokens
    }

    /// Makes the configured pair the newest (stamped now): it is used from the next pass on and
    /// stored with the next commit. For when the pair in use was refused or the configuration
    /// changed.
    pub fn adopt_configured(&self) -> Tokens {
        let configured = self.configured();
        let tokens = Tokens {
            access_token: configured.access_token.clone(),
            refresh_token: configured.refresh_token.clone(),
            issued_at_ms: jiff::Timestamp::now().as_millisecond(),
            from_config: fingerprint(&configured),
        };
        self.remember(tokens.clone());
        tokens
    }

    /// The credentials to call with for a job holding `stored`, and whether the job should store
    /// a newer pair than it has.
    pub fn choose(&self, stored: Option<&Tokens>) -> (Credentials, Pick) {
        let configured = self.configured();
        let memory = self.newest();
        let which = pick(stored, memory.as_ref(), &fingerprint(&configured));
        let mut credentials = configured;
        let chosen = match which {
            Pick::Stored => stored.cloned(),
            Pick::Memory => memory,
            Pick::Configured => None,
        };
        if let Some(t) = chosen {
            credentials.access_token = t.access_token;
            credentials.refresh_token = t.refresh_token;
        }
        (credentials, which)
    }
}

/// Seals and opens tokens stored in the broker with `ORDERFLOW_SECRET_KEY` (if set).
pub struct Sealer {
    key: Option<LessSafeKey>,
}

const SEALED_PREFIX: &str = "v1:";

impl Sealer {
    /// `None`: tokens are stored as they are. A key shorter than 16 characters is refused.
    pub fn new(secret: Option<&str>) -> Result<Self, String> {
        let Some(secret) = secret.filter(|s| !s.is_empty()) else { return Ok(Self { key: None }) };
        if secret.chars().count() < 16 {
            return Err("ORDERFLOW_SECRET_KEY must be at least 16 characters (e.g. `openssl rand -hex 32`)".into());
        }
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"orderflow-token-key\0");
        ctx.update(secret.as_bytes());
        let key = UnboundKey::new(&CHACHA20_POLY1305, ctx.finish().as_ref())
            .map_err(|_| "ORDERFLOW_SECRET_KEY: could not make a key".to_string())?;
        Ok(Self { key: Some(LessSafeKey::new(key)) })
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The sealed text of `tokens` (`v1:` + base64 of nonce and ciphertext).
    pub fn seal(&self, tokens: &Tokens) -> Result<Option<String>, String> {
        let Some(key) = &self.key else { return Ok(None) };
        let mut nonce = [0u8; aead::NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| "no randomness for a nonce".to_string())?;
        let mut data = serde_json::to_vec(tokens).map_err(|e| e.to_string())?;
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aead::Aad::empty(), &mut data)
            .map_err(|_| "sealing the tokens failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(Some(format!("{SEALED_PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(out))))
    }

    /// Opens sealed tokens; an error says why (no key, wrong key, damaged).
    pub fn open(&self, sealed: &str) -> Result<Tokens, String> {
        let Some(key) = &self.key else {
            return Err("the job's tokens are sealed and ORDERFLOW_SECRET_KEY is not set".into());
        };
        let bytes = sealed
            .strip_prefix(SEALED_PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .filter(|b| b.len() > aead::NONCE_LEN)
            .ok_or("the job's sealed tokens are damaged")?;
        let (nonce, rest) = bytes.split_at(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce")?;
        let mut data = rest.to_vec();
        let plain = key
            .open_in_place(nonce, aead::Aad::empty(), &mut data)
            .map_err(|_| "the job's tokens were sealed with another ORDERFLOW_SECRET_KEY".to_string())?;
        serde_json::from_slice(plain).map_err(|e| format!("the job's sealed tokens are not tokens: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(access: &str, issued_at_ms: i64, from: &str) -> Tokens {
        Tokens {
            access_token: access.into(),
            refresh_token: format!("{access}-r"),
            issued_at_ms,
            from_config: from.into(),
        }
    }

    #[test]
    fn the_newest_pair_wins_and_new_configured_tokens_beat_both() {
        let fp = "cfg1";
        let old = pair("old", 100, fp);
        let new = pair("new", 200, fp);
        assert_eq!(pick(Some(&old), Some(&new), fp), Pick::Memory, "a refresh whose commit failed is kept");
        assert_eq!(pick(Some(&new), Some(&old), fp), Pick::Stored, "another replica refreshed since");
        assert_eq!(pick(Some(&old), None, fp), Pick::Stored);
        assert_eq!(pick(None, None, fp), Pick::Configured);
        assert_eq!(pick(Some(&new), None, "cfg2"), Pick::Configured, "the operator set new tokens");
        let legacy = pair("legacy", 0, "");
        assert_eq!(pick(Some(&legacy), None, "cfg2"), Pick::Stored, "pairs stored before fingerprints are kept");
    }

    #[test]
    fn the_book_chooses_credentials_and_never_goes_back() {
        let configured =
            Credentials { access_token: "env-a".into(), refresh_token: "env-r".into(), ..Credentials::default() };
        let book = TokenBook::new(configured.clone());
        let (c, which) = book.choose(None);
        assert_eq!((c.access_token.as_str(), which), ("env-a", Pick::Configured));
        let refreshed = book.issued("a2".into(), "r2".into());
        assert_eq!(refreshed.from_config, fingerprint(&configured));
        let stale = Tokens { issued_at_ms: refreshed.issued_at_ms - 1, ..pair("a1", 0, &refreshed.from_config) };
        let (c, which) = book.choose(Some(&stale));
        assert_eq!((c.access_token.as_str(), which), ("a2", Pick::Memory));
        book.remember(stale);
        assert_eq!(
            book.newest().map(|t| t.access_token),
            Some("a2".into()),
            "an older pair never replaces a newer one"
        );
        book.set_configured(Credentials { access_token: "env-b".into(), refresh_token: "env-r2".into(), ..configured });
        assert_eq!(book.choose(Some(&refreshed)).0.access_token, "env-b");
        assert!(!format!("{:?}", refreshed).contains("a2"), "tokens never show in Debug");
    }

    #[test]
    fn sealed_tokens_open_only_with_their_key() {
        let tokens = pair("secret-access", 5, "fp");
        let sealer = Sealer::new(Some("0123456789abcdef-key")).expect("key");
        let sealed = sealer.seal(&tokens).expect("seals").expect("enabled");
        assert!(!sealed.contains("secret-access"));
        assert_eq!(sealer.open(&sealed).expect("opens"), tokens);
        let other = Sealer::new(Some("another key, 16+ chars")).expect("key");
        assert!(other.open(&sealed).expect_err("wrong key").contains("another ORDERFLOW_SECRET_KEY"));
        assert!(Sealer::new(None).expect("off").open(&sealed).expect_err("no key").contains("not set"));
        assert!(Sealer::new(Some("short")).is_err());
        assert_eq!(Sealer::new(None).expect("off").seal(&tokens).expect("ok"), None);
    }
}
