//! Confirmed, mandatory, persistent publishing. A publish succeeds only on a broker `Ack`
//! without a returned message; a `Nack`, a return (unroutable), a lost channel or a confirm that
//! does not come within the confirm timeout is an error, so the caller never acks its input on a
//! publish that did not land.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionStatus,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

/// `AMQP_CONFIRM_TIMEOUT`'s default.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a confirm wait looks at the connection's blocked state.
const CONFIRM_TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker channel error: {0}")]
    Channel(#[from] lapin::Error),
    #[error("broker refused the message (nack)")]
    Nacked,
    #[error("message was unroutable and returned: {0}")]
    Returned(String),
    #[error("publish was not confirmed (channel not in confirm mode)")]
    NotConfirmed,
    #[error("the broker did not confirm the publish within {0:?} (AMQP_CONFIRM_TIMEOUT); the broker session is ended")]
    ConfirmTimeout(Duration),
}

impl PublishError {
    /// A fixed, label-safe reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Channel(_) => "channel",
            PublishError::Nacked => "nacked",
            PublishError::Returned(_) => "returned",
            PublishError::NotConfirmed => "not_confirmed",
            PublishError::ConfirmTimeout(_) => "confirm_timeout",
        }
    }

    /// True when the broker session is no longer trustworthy: the caller ends it (its unacked
    /// input is redelivered) instead of retrying on it.
    pub fn ends_session(&self) -> bool {
        matches!(self, PublishError::Channel(_) | PublishError::ConfirmTimeout(_))
    }
}

/// A channel in confirm mode. Clone freely: clones share the channel, and concurrent
/// publishes on it are pipelined (await many at once for throughput).
///
/// A confirm that does not come within the confirm timeout fails the publish
/// ([`PublishError::ConfirmTimeout`]: a half-open connection, a stuck queue), but time while the
/// broker blocks the connection (a resource alarm) does not count: that wait is the broker's
/// flow control, shown in `/readyz`, and ends when the alarm clears.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    /// One publish at a time enters lapin's numbering (see [`Publisher::send`]).
    order: std::sync::Arc<tokio::sync::Mutex<()>>,
    status: ConnectionStatus,
    confirm_timeout: Duration,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        Self::on(connection.create_channel().await?, connection).await
    }

    /// A confirmed publisher on an existing channel of `connection` (one that also consumes: a
    /// publish there fails once the broker has closed that channel).
    pub async fn on(channel: Channel, connection: &Connection) -> Result<Self, lapin::Error> {
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self {
            channel,
            order: std::sync::Arc::default(),
            status: connection.status().clone(),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        })
    }

    /// The same publisher with another confirm timeout (`AMQP_CONFIRM_TIMEOUT`).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(exchange, routing_key, body, properties).await?.await
    }

    /// Sends the message now and returns the wait for its confirm, so a caller keeping several
    /// publishes in flight gets each on the wire at once (a lazy future would sit unsent until
    /// polled).
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<impl Future<Output = Result<(), PublishError>> + Send + 'static, PublishError> {
        let mut publish = Box::pin(self.channel.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
            body,
            properties,
        ));
        // lapin numbers a publish for its confirm when `basic_publish` starts and queues its
        // frames a moment later; the broker numbers publishes in wire order. Two tasks racing on
        // two threads could swap places on the wire and receive each other's confirms (a refused
        // publish reported as confirmed: tests/tests/publisher.rs saw 641 "confirmed" into a
        // queue that stored 63). The first poll runs both steps without yielding, so one poll at
        // a time per channel keeps the two orders the same; waiting for the frames to be written
        // happens outside the lock, so publishes stay pipelined.
        let first = {
            let _turn = self.order.lock().await;
            futures_util::poll!(publish.as_mut())
        };
        let confirm = match first {
            std::task::Poll::Ready(result) => result?,
            std::task::Poll::Pending => publish.await?,
        };
        let (status, timeout) = (self.status.clone(), self.confirm_timeout);
        Ok(async move {
            let blocked = move || status.blocked();
            check(within(confirm, timeout, CONFIRM_TICK, blocked).await??)
        })
    }
}

/// Awaits `future` for at most `timeout` of time during which `blocked()` was false (checked
/// every `tick`); `Err(ConfirmTimeout)` after that.
async fn within<T>(
    future: impl Future<Output = T>,
    timeout: Duration,
    tick: Duration,
    blocked: impl Fn() -> bool,
) -> Result<T, PublishError> {
    let mut future = std::pin::pin!(future);
    let mut unblocked = Duration::ZERO;
    loop {
        match tokio::time::timeout(tick, &mut future).await {
            Ok(value) => return Ok(value),
            Err(_) if blocked() => {}
            Err(_) => {
                unblocked += tick;
                if unblocked >= timeout {
                    return Err(PublishError::ConfirmTimeout(timeout));
                }
            }
        }
    }
}

/// Turns a broker confirmation into success or the precise failure.
pub fn check(confirmation: Confirmation) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(PublishError::Returned(returned.reply_text.as_str().to_string())),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_clean_ack_counts_as_published() {
        assert!(check(Confirmation::Ack(None)).is_ok());
        assert!(matches!(check(Confirmation::Nack(None)), Err(PublishError::Nacked)));
        assert!(matches!(check(Confirmation::NotRequested), Err(PublishError::NotConfirmed)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirm_that_never_comes_times_out_and_ends_the_session() {
        let never = std::future::pending::<()>();
        let started = tokio::time::Instant::now();
        let err = within(never, Duration::from_secs(30), CONFIRM_TICK, || false).await.expect_err("times out");
        assert!(matches!(err, PublishError::ConfirmTimeout(_)) && err.ends_session(), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(err.to_string().contains("AMQP_CONFIRM_TIMEOUT"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn time_blocked_by_a_broker_alarm_does_not_count_toward_the_confirm_timeout() {
        // Blocked for the first 60 s (an alarm), then the confirm comes 10 s after it cleared.
        let started = tokio::time::Instant::now();
        let blocked = move || started.elapsed() < Duration::from_secs(60);
        let confirm = tokio::time::sleep(Duration::from_secs(70));
        within(confirm, Duration::from_secs(30), CONFIRM_TICK, blocked).await.expect("30 s unblocked not reached");
        // Never unblocked: it waits as long as the alarm lasts.
        let forever_blocked = within(std::future::pending::<()>(), Duration::from_secs(1), CONFIRM_TICK, || true);
        assert!(tokio::time::timeout(Duration::from_secs(3600), forever_blocked).await.is_err());
    }

    #[test]
    fn only_a_lost_channel_or_a_missing_confirm_ends_the_session() {
        assert!(!PublishError::Nacked.ends_session());
        assert!(!PublishError::Returned("NO_ROUTE".into()).ends_session());
        assert!(PublishError::ConfirmTimeout(Duration::from_secs(1)).ends_session());
    }
}
