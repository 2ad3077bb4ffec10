//! Settings every binary shares, parsed by clap from flags and environment variables (flags
//! win). Values are validated at start; an invalid one exits naming the setting.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Broker connection and naming, shared by the three stages and the CLI.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// AMQP broker URL; `amqps://` for TLS. The password is never logged.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true,
          hide_default_value = true)]
    pub amqp_url: String,

    /// Password for the user in AMQP_URL, used instead of the URL's: any characters, no
    /// percent-encoding (in AMQP_URL itself `/ ? # @ %` and the like must be percent-encoded).
    /// Prefer the environment variable: a flag's value shows in the process list.
    #[arg(long, env = "AMQP_PASSWORD", hide_env_values = true)]
    pub amqp_password: Option<String>,

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

/// Replaces the password of a URL (`scheme://user:password@host`) with `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let redacted = if userinfo.contains(':') { format!("{user}:***") } else { user.to_string() };
            format!("{}{}{}", &url[..scheme_end + 3], redacted, &rest[at..])
        }
        None => url.to_string(),
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
}
