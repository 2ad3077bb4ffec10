//! Opening a broker connection: heartbeat on (so a dead peer is noticed within ~30 s), a
//! connection name for the management UI, optional private CA for `amqps://`.

use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder, tcp::OwnedTLSConfig, uri::AMQPUri};

use crate::settings::{BrokerArgs, redact_url};

/// Default heartbeat (seconds) when the URL does not set one.
const HEARTBEAT_SECS: u16 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("AMQP_URL {url} is not a valid AMQP URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("AMQP_CA_FILE {path}: {error}")]
    CaFile { path: String, error: std::io::Error },
    #[error("cannot connect to the broker at {url}: {error}")]
    Connect { url: String, error: lapin::Error },
}

/// Parses the URL once, so a bad `AMQP_URL` fails at start with a readable error.
pub fn parse_url(url: &str) -> Result<AMQPUri, ConnectError> {
    let mut uri: AMQPUri =
        url.parse().map_err(|reason: String| ConnectError::BadUrl { url: redact_url(url), reason })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(HEARTBEAT_SECS);
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout = Some(10_000);
    }
    Ok(uri)
}

/// The URL with `AMQP_PASSWORD`, when set, in place of its password.
pub fn broker_uri(args: &BrokerArgs) -> Result<AMQPUri, ConnectError> {
    let mut uri = parse_url(&args.amqp_url)?;
    if let Some(password) = args.password() {
        uri.authority.userinfo.password = password.to_string();
    }
    Ok(uri)
}

/// How long closing a connection waits for the broker's close-ok before the connection is just
/// dropped (the broker cleans up when the socket goes): a blocked connection sends nothing while
/// an alarm lasts, and lapin 4.12 can leave a close waiting forever when the socket went first
/// (the bench's raw relay hung on its sink's close after the broker logged "client unexpectedly
/// closed TCP connection": the last CI run was killed in it at 90 minutes).
pub const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes `connection` (reply 200), waiting at most [`CLOSE_TIMEOUT`]; a failure to close leaves
/// nothing to do, so it is not reported.
pub async fn close(connection: &lapin::Connection) {
    if connection.status().connected()
        && tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "bye".into())).await.is_err()
    {
        tracing::warn!(
            message = "The broker did not answer a connection close in time; dropping the connection.",
            waited_s = CLOSE_TIMEOUT.as_secs()
        );
    }
}

/// Closes `channel` with `why`, waiting at most [`CLOSE_TIMEOUT`] (as [`close`]).
pub async fn close_channel(channel: &lapin::Channel, why: &str) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, why.into())).await;
    }
}

/// Cancels consumer `tag` on `channel`, waiting at most [`CLOSE_TIMEOUT`]: a cancel the broker
/// does not answer in time is an error (`TimedOut`), as a stuck channel ends its session.
pub async fn cancel(channel: &lapin::Channel, tag: &str) -> Result<(), lapin::Error> {
    let cancel = channel.basic_cancel(tag.into(), lapin::options::BasicCancelOptions::default());
    match tokio::time::timeout(CLOSE_TIMEOUT, cancel).await {
        Ok(result) => result,
        Err(_) => {
            let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "basic.cancel timed out");
            Err(lapin::ErrorKind::IOError(std::sync::Arc::new(timed_out)).into())
        }
    }
}

pub async fn connect(args: &BrokerArgs, connection_name: &str) -> Result<Connection, ConnectError> {
    let uri = broker_uri(args)?;
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &args.amqp_ca_file {
        let pem = std::fs::read_to_string(path)
            .map_err(|error| ConnectError::CaFile { path: path.display().to_string(), error })?;
        tls.cert_chain = Some(pem);
    }
    let properties = ConnectionProperties::default().with_connection_name(connection_name.to_string().into());
    DefaultConnectionBuilder::new()
        .map_err(|error| ConnectError::Connect { url: redact_url(&args.amqp_url), error })?
        .with_uri(uri)
        .with_properties(properties)
        .with_tls_config(tls)
        .connect()
        .await
        .map_err(|error| ConnectError::Connect { url: redact_url(&args.amqp_url), error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_url_is_reported_without_its_password() {
        let err = parse_url("http://user:hunter2@host").expect_err("not amqp");
        let text = err.to_string();
        assert!(text.contains("AMQP_URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_named_before_any_connection_attempt() {
        let args = BrokerArgs {
            amqp_url: "amqps://u:secret@broker.invalid:5671/%2f".into(),
            amqp_password: None,
            amqp_ca_file: Some("/nonexistent/ca.pem".into()),
            ns: "t".into(),
            declare_topology: true,
            amqp_confirm_timeout: crate::amqp::publisher::DEFAULT_CONFIRM_TIMEOUT,
        };
        let err = connect(&args, "test").await.expect_err("no CA file");
        let text = err.to_string();
        assert!(text.contains("AMQP_CA_FILE") && text.contains("/nonexistent/ca.pem"), "{text}");
        assert!(!text.contains("secret"));
    }

    #[test]
    fn amqps_urls_parse_with_the_tls_port() {
        let uri = parse_url("amqps://u:p@broker:5671/prod").expect("valid");
        assert_eq!(uri.authority.port, 5671);
        assert_eq!(uri.vhost, "prod");
    }

    #[test]
    fn a_percent_encoded_password_in_the_url_is_decoded() {
        let uri = parse_url("amqp://writer:p%2F%3F%23%40%25%22%5C%24@rabbitmq:5672/%2f").expect("valid");
        assert_eq!(uri.authority.userinfo.password, r#"p/?#@%"\$"#);
    }

    #[test]
    fn amqp_password_replaces_the_urls_password_verbatim() {
        let args = BrokerArgs {
            amqp_url: "amqp://writer@rabbitmq:5672/%2f".into(),
            amqp_password: Some(r#"p/?#@%"\$ x"#.into()),
            amqp_ca_file: None,
            ns: "t".into(),
            declare_topology: true,
            amqp_confirm_timeout: crate::amqp::publisher::DEFAULT_CONFIRM_TIMEOUT,
        };
        let uri = broker_uri(&args).expect("valid");
        assert_eq!(uri.authority.userinfo.username, "writer");
        assert_eq!(uri.authority.userinfo.password, r#"p/?#@%"\$ x"#);
    }

    #[test]
    fn heartbeat_defaults_on() {
        let uri = parse_url("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(uri.query.heartbeat, Some(HEARTBEAT_SECS));
        let uri = parse_url("amqp://127.0.0.1/%2f?heartbeat=3").expect("valid");
        assert_eq!(uri.query.heartbeat, Some(3));
    }
}
