//! Settings every binary shares, parsed by clap from flags and environment variables (flags
//! win). Values are validated at start; an invalid one exits naming the setting.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Broker connection and naming, shared by the three stages and the CLI.
#[derive(Clone, Args)]
pub struct BrokerArgs {
    /// AMQP broker URL; `amqps://` for TLS. The password is never logged. A URL with a password
    /// is taken only from the environment (AMQP_URL), never from the flag: a flag shows in `ps`.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true,
          hide_default_value = true)]
    pub amqp_url: String,

    /// AMQP_PASSWORD, from the environment only (never a flag, so it never shows in the process
    /// list): the password for the user in AMQP_URL, used instead of the URL's, any characters,
    /// no percent-encoding (in AMQP_URL itself `/ ? # @ %` and the like must be percent-encoded).
    #[arg(skip = secret_env("AMQP_PASSWORD"))]
    pub amqp_password: Option<SecretString>,

    /// PEM file with extra CA certificates for `amqps://` (a private broker CA).
    #[arg(long, env = "AMQP_CA_FILE")]
    pub amqp_ca_file: Option<PathBuf>,

    /// Prefix of every exchange and queue name; tests use a unique one each.
    #[arg(long = "ns", env = "ORDERFLOW_NS", default_value = "orderflow", value_parser = parse_namespace)]
    pub ns: String,

    /// Declare the shared topology at every (re)connect. Set false when a least-privilege broker
    /// user may not configure it and `orderflow topology --declare` ran as an admin instead.
    #[arg(long, env = "ORDERFLOW_DECLARE_TOPOLOGY", default_value_t = true, action = clap::ArgAction::Set)]
    pub declare_topology: bool,

    /// How long a publish waits for the broker's confirm (time the broker blocks publishing under
    /// a resource alarm does not count) before the broker session is ended and its unacked input
    /// redelivered: a half-open connection never hangs a stage.
    #[arg(long, env = "AMQP_CONFIRM_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub amqp_confirm_timeout: std::time::Duration,
}

/// The ledger (`<ns>.ledger`, a RabbitMQ stream): what happened to each order at every stage, for
/// `orderflow trace` and `orderflow audit`. Shared by the three stages and the CLI.
#[derive(Debug, Clone, Args)]
pub struct LedgerArgs {
    /// Record what happens to each order in the ledger stream <ns>.ledger: on or off. Off, trace
    /// and audit have nothing to read.
    #[arg(long = "ledger", env = "LEDGER", default_value = "on", value_parser = parse_on_off)]
    pub ledger: bool,
    /// How long the broker keeps ledger entries (the stream's x-max-age, set when it is first
    /// declared; see the README to change it later).
    #[arg(long, env = "LEDGER_MAX_AGE", default_value = "7d", value_parser = parse_duration)]
    pub ledger_max_age: std::time::Duration,
    /// The most the ledger stream may hold on the broker's disk (x-max-length-bytes), e.g. 4GiB,
    /// 500MB; the oldest entries go first.
    #[arg(long, env = "LEDGER_MAX_BYTES", default_value = "4GiB", value_parser = parse_bytes)]
    pub ledger_max_bytes: u64,
}

impl Default for LedgerArgs {
    fn default() -> Self {
        LedgerArgs {
            ledger: true,
            ledger_max_age: std::time::Duration::from_secs(7 * 86_400),
            ledger_max_bytes: 4 << 30,
        }
    }
}

/// `on`/`off` (also true/false, 1/0, yes/no).
pub fn parse_on_off(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("{text:?} must be on or off")),
    }
}

/// A size as people write it (`bytesize`): `4GiB`, `500MB`, `64 MiB`, or a bare number of bytes;
/// at least 1 MiB.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let size = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{text:?} is not a size ({e}; e.g. 4GiB, 500MB)"))?
        .as_u64();
    if size < 1 << 20 {
        return Err(format!("{text:?} is too small: at least 1MiB"));
    }
    Ok(size)
}

/// Logging: `LOG_FORMAT=json|pretty|auto` (auto: pretty on a terminal, JSON otherwise) and `RUST_LOG`.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format: json (containers), pretty (terminals), auto (pretty when stderr is a terminal).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

/// A namespace becomes part of queue names: keep it to characters RabbitMQ and shells accept.
pub fn parse_namespace(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 100
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(value.to_string()) } else { Err(format!("{value:?} must be 1-100 characters of [A-Za-z0-9._-]")) }
}

/// The secrets every binary reads, named in each `--help`.
pub const SECRETS_HELP: &str = "Secrets are read from the environment only, never from flags (a flag shows in the \
process list): AMQP_PASSWORD, or a password inside AMQP_URL.";

/// A secret from the environment variable `name`; unset or empty is `None`. Secrets are never
/// flags: a flag's value shows in the process list.
pub fn secret_env(name: &str) -> Option<SecretString> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(SecretString::from)
}

/// By hand: the URL's password never shows in `Debug`.
impl std::fmt::Debug for BrokerArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerArgs")
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_password", &self.amqp_password)
            .field("amqp_ca_file", &self.amqp_ca_file)
            .field("ns", &self.ns)
            .field("declare_topology", &self.declare_topology)
            .field("amqp_confirm_timeout", &self.amqp_confirm_timeout)
            .finish()
    }
}

impl BrokerArgs {
    /// Refuses a broker password given on the command line (`--amqp-url amqp://u:p@h`): it would
    /// show in `ps`. The same URL in `AMQP_URL`, or the well-known default, is fine.
    pub fn check_no_secret_flags(&self) -> Result<(), String> {
        let from_env = std::env::var("AMQP_URL").is_ok_and(|env| env == self.amqp_url);
        let has_password = url::Url::parse(&self.amqp_url).is_ok_and(|u| u.password().is_some());
        if has_password && !from_env && self.amqp_url != DEFAULT_AMQP_URL {
            return Err(format!(
                "--amqp-url {} carries a password, which would show in the process list: set AMQP_URL \
                 in the environment, or AMQP_PASSWORD beside a URL without one",
                redact_url(&self.amqp_url)
            ));
        }
        Ok(())
    }

    /// Exits with status 2, naming the problem, when a broker password was given as a flag.
    pub fn exit_on_secret_flags(&self, binary: &str) {
        if let Err(error) = self.check_no_secret_flags() {
            eprintln!("{binary}: {error}");
            std::process::exit(2);
        }
    }

    /// The broker password from `AMQP_PASSWORD`, if one is set.
    pub fn password(&self) -> Option<&str> {
        self.amqp_password.as_ref().map(ExposeSecret::expose_secret).filter(|p| !p.is_empty())
    }
}

/// Replaces the password of a URL (`scheme://user:password@host`) with `***`, for logs and errors.
/// A text that is not a URL is returned as it is, unless it looks like it holds userinfo, which is
/// cut down to its scheme.
pub fn redact_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Setting a password fails only for URLs that cannot have one (no host).
                let _ = url.set_password(Some("***"));
            }
            url.to_string().replace(":%2A%2A%2A@", ":***@")
        }
        Err(_) if text.contains('@') => match text.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".to_string(),
        },
        Err(_) => text.to_string(),
    }
}

/// Parses a duration as people write it (`humantime`): `250ms`, `5s`, `10m`, `2h`, `7d`, `1.5s`,
/// `1h 30m`; a bare number is seconds (`0` turns a periodic task off).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let seconds = text.parse::<f64>().ok().filter(|_| text.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
    match seconds {
        // `try_from`: a huge value is an error naming the input, never a panic.
        Some(s) => std::time::Duration::try_from_secs_f64(s).map_err(|_| format!("{text:?} is not a valid duration")),
        None => humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration ({e}; e.g. 500ms, 5s, 10m, 1h 30m, 7d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(redact_url("amqp://orderflow:s3cret@rabbit:5672/%2f"), "amqp://orderflow:***@rabbit:5672/%2f");
        assert_eq!(redact_url("amqp://rabbit:5672"), "amqp://rabbit:5672");
        assert_eq!(redact_url("amqps://u:p@a@h/v"), "amqps://u:***@h/v");
        assert_eq!(redact_url("amqp://u:p%2F%40x@h:5672/prod?heartbeat=5"), "amqp://u:***@h:5672/prod?heartbeat=5");
        assert_eq!(redact_url("amqp://writer@h/%2f"), "amqp://writer@h/%2f");
        assert_eq!(redact_url("not a url: u:pw@host"), "***");
    }

    fn broker(url: &str) -> BrokerArgs {
        BrokerArgs {
            amqp_url: url.into(),
            amqp_password: None,
            amqp_ca_file: None,
            ns: "t".into(),
            declare_topology: true,
            amqp_confirm_timeout: std::time::Duration::from_secs(30),
        }
    }

    #[test]
    fn a_broker_password_on_the_command_line_is_refused_without_echoing_it() {
        // No test sets AMQP_URL to this value, so it can only have come from the flag.
        let error = broker("amqp://orderflow:hunter2@rabbit.test:5672/%2f").check_no_secret_flags().expect_err("flag");
        assert!(error.contains("process list") && error.contains("AMQP_PASSWORD"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(broker("amqp://orderflow@rabbit.test:5672/%2f").check_no_secret_flags().is_ok());
        assert!(broker(DEFAULT_AMQP_URL).check_no_secret_flags().is_ok(), "the well-known guest default");
        let mut args = broker("amqp://orderflow:hunter2@rabbit.test:5672/%2f");
        args.amqp_password = Some("hunter3".into());
        let debug = format!("{args:?}");
        assert!(!debug.contains("hunter2") && !debug.contains("hunter3") && debug.contains("rabbit.test"), "{debug}");
    }

    #[test]
    fn namespaces_are_restricted_to_safe_characters() {
        assert!(parse_namespace("test-1a2b.x_y").is_ok());
        assert!(parse_namespace("").is_err());
        assert!(parse_namespace("a b").is_err());
        assert!(parse_namespace("a/b").is_err());
    }

    #[test]
    fn durations_accept_the_usual_units() {
        use std::time::Duration;
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 20m "), Ok(Duration::from_secs(1200)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1e400").is_err());
        assert!(parse_duration("99999999999999999999999d").is_err(), "overflow is an error, not a panic");
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn ledger_sizes_and_switches_parse_or_name_the_input() {
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("2000000"), Ok(2_000_000));
        assert!(parse_bytes("1KiB").expect_err("too small").contains("at least"));
        assert!(parse_bytes("lots").expect_err("not a size").contains("lots"));
        assert_eq!((parse_on_off("on"), parse_on_off("OFF"), parse_on_off("false")), (Ok(true), Ok(false), Ok(false)));
        assert!(parse_on_off("maybe").is_err());
    }
}
