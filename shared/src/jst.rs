//! Pure Jushuitan protocol helpers shared by the fetcher (client) and `jst-sim` (server):
//! request signing for both API generations, and the error codes with their client action.

use md5::{Digest, Md5};

/// Lowercase hex MD5 of the UTF-8 bytes.
pub fn md5_hex(input: &str) -> String {
    let digest = Md5::digest(input.as_bytes());
    let mut out = String::with_capacity(32);
    for byte in digest {
        out.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    out
}

/// New open platform signature: drop `sign` and empty values, sort keys ascending (bytewise),
/// concatenate `key1value1key2value2…`, prepend the app secret, lowercase hex MD5.
pub fn sign_open<'a>(app_secret: &str, params: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut pairs: Vec<(&str, &str)> = params.into_iter().filter(|(k, v)| *k != "sign" && !v.is_empty()).collect();
    pairs.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut text =
        String::with_capacity(app_secret.len() + pairs.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
    text.push_str(app_secret);
    for (k, v) in pairs {
        text.push_str(k);
        text.push_str(v);
    }
    md5_hex(&text)
}

/// Legacy partner API signature: `md5(method + partnerid + "token" + token + "ts" + ts + partnerkey)`.
pub fn sign_legacy(method: &str, partner_id: &str, token: &str, ts: i64, partner_key: &str) -> String {
    md5_hex(&format!("{method}{partner_id}token{token}ts{ts}{partner_key}"))
}

/// Constant-time-ish comparison of two signatures (both are short hex strings).
pub fn signatures_match(expected: &str, given: &str) -> bool {
    let given = given.to_ascii_lowercase();
    expected.len() == given.len() && expected.bytes().zip(given.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Business result codes of the new platform (legacy uses 120 for a bad signature).
pub mod code {
    pub const OK: i64 = 0;
    pub const BAD_SIGN: i64 = 10;
    pub const BAD_SIGN_LEGACY: i64 = 120;
    pub const TOKEN_INVALID: i64 = 100;
    pub const IP_NOT_WHITELISTED: i64 = 110;
    pub const EMPTY_DATA: i64 = 130;
    pub const BAD_PARAMS: i64 = 140;
    pub const INTERNAL: i64 = 150;
    pub const INTERNAL_2: i64 = 160;
    pub const NO_SHOP: i64 = 170;
    pub const TIMESTAMP_SKEW: i64 = 180;
    pub const NO_PERMISSION: i64 = 190;
    pub const TOO_MANY_CONCURRENT: i64 = 199;
    pub const TOO_FREQUENT: i64 = 200;
}

/// What a client must do about a business code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeAction {
    Success,
    /// 199 / 200: over the merchant's rate limit; wait and retry the same page.
    RateLimited,
    /// 100: refresh the access token, then retry.
    RefreshToken,
    /// 180: re-sign with a fresh timestamp and retry (and look at the clock).
    Resign,
    /// 150 / 160 and unknown codes: retry with backoff.
    Transient,
    /// 10, 110, 120, 130, 140, 170, 190: configuration or request error; stop this account.
    Permanent,
}

pub fn classify_code(code: i64) -> CodeAction {
    use code::*;
    match code {
        OK => CodeAction::Success,
        TOO_MANY_CONCURRENT | TOO_FREQUENT => CodeAction::RateLimited,
        TOKEN_INVALID => CodeAction::RefreshToken,
        TIMESTAMP_SKEW => CodeAction::Resign,
        INTERNAL | INTERNAL_2 => CodeAction::Transient,
        BAD_SIGN | BAD_SIGN_LEGACY | IP_NOT_WHITELISTED | EMPTY_DATA | BAD_PARAMS | NO_SHOP | NO_PERMISSION => {
            CodeAction::Permanent
        }
        _ => CodeAction::Transient,
    }
}

/// The maximum page size the API accepts.
pub const MAX_PAGE_SIZE: u32 = 50;

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "e9c5ca33fecb404b8e6cdbd0ef4a6d25";
    const APP_KEY: &str = "5b53060f23d84ddf9703056e84fa5a2d";

    #[test]
    fn the_official_business_call_vector_signs_correctly() {
        let biz = r#"{"page_index":"1","page_size":"100","nicks":["老板"]}"#;
        let sign = sign_open(
            SECRET,
            [
                ("app_key", APP_KEY),
                ("access_token", "d7b01bf0842a4742a9450e21ffd95f60"),
                ("timestamp", "1639128407"),
                ("version", "2"),
                ("charset", "utf-8"),
                ("biz", biz),
            ],
        );
        assert_eq!(sign, "395f5a78b446be465ac03a02491296c7");
    }

    #[test]
    fn the_official_auth_call_vector_signs_correctly() {
        let sign = sign_open(
            SECRET,
            [
                ("app_key", APP_KEY),
                ("timestamp", "1639128407"),
                ("grant_type", "authorization_code"),
                ("charset", "utf-8"),
                ("code", "123456"),
            ],
        );
        assert_eq!(sign, "05e3a51e19e0883afd1882ccd309e0b9");
    }

    #[test]
    fn sign_and_empty_values_are_left_out_of_the_signature() {
        let base = sign_open(SECRET, [("a", "1"), ("b", "2")]);
        assert_eq!(sign_open(SECRET, [("b", "2"), ("sign", "x"), ("a", "1"), ("c", "")]), base);
        assert_ne!(sign_open(SECRET, [("a", "1"), ("b", "3")]), base);
    }

    #[test]
    fn the_official_legacy_vector_signs_correctly() {
        let sign = sign_legacy(
            "shops.query",
            "ywv5jGT8ge6Pvlq3FZSPol345asd",
            "181ee8952a88f5a57db52587472c3798",
            1540370062,
            "ywv5jGT8ge6Pvlq3FZSPol2323",
        );
        assert_eq!(sign, "aebf9d0146764d578d9c86e3b7783204");
    }

    #[test]
    fn signature_comparison_ignores_hex_case_but_not_content() {
        assert!(signatures_match("abc123", "ABC123"));
        assert!(!signatures_match("abc123", "abc124"));
        assert!(!signatures_match("abc123", "abc12"));
    }

    #[test]
    fn codes_map_to_the_documented_client_action() {
        assert_eq!(classify_code(0), CodeAction::Success);
        assert_eq!(classify_code(199), CodeAction::RateLimited);
        assert_eq!(classify_code(200), CodeAction::RateLimited);
        assert_eq!(classify_code(100), CodeAction::RefreshToken);
        assert_eq!(classify_code(180), CodeAction::Resign);
        assert_eq!(classify_code(150), CodeAction::Transient);
        for permanent in [10, 110, 120, 140, 170, 190] {
            assert_eq!(classify_code(permanent), CodeAction::Permanent, "code {permanent}");
        }
    }
}
