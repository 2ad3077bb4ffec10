//! Confirmed, mandatory, persistent publishing. A publish succeeds only on a broker `Ack`
//! without a returned message; a `Nack`, a return (unroutable) or a lost channel is an error,
//! so the caller never acks its input on a publish that did not land.

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

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
}

impl PublishError {
    /// A fixed, label-safe reason.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Channel(_) => "channel",
            PublishError::Nacked => "nacked",
            PublishError::Returned(_) => "returned",
            PublishError::NotConfirmed => "not_confirmed",
        }
    }
}

/// A channel in confirm mode. Clone freely: clones share the channel, and concurrent
/// publishes on it are pipelined (await many at once for throughput).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel })
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
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                body,
                properties,
            )
            .await?;
        Ok(async move { check(confirm.await?) })
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
}
