//! Settlement as a type. A consuming stage's handler only decides what should happen to a
//! delivery ([`Settlement`]); [`Settler::settle`] is the one place that applies it: every publish
//! it causes is confirmed by the broker first, then the delivery is acked. A handler cannot ack,
//! so it cannot forget to, or ack before the confirm.
//!
//! One publisher policy for every stage:
//! - a **nack** (the broker refuses: a full queue with `reject-publish`, an alarm) is backpressure:
//!   retried with backoff while the delivery is held, until it has been held `HOLD_LIMIT`; then
//!   the delivery is **parked** (republished with its attempts unchanged and `x-orderflow-parked`
//!   counted, then acked), so the broker's ack timeout never closes the channel on it and holding
//!   never moves it toward the delivery limit;
//! - a **return** (unroutable: a topology fault) is retried a few times, then the broker session
//!   ends so the reconnect re-declares the topology (the delivery is redelivered);
//! - a lost channel or a confirm that never comes (`AMQP_CONFIRM_TIMEOUT`) ends the session at once.

use std::{future::Future, time::Duration};

use lapin::{BasicProperties, types::FieldTable};
use prometheus::IntCounter;
use tokio::time::Instant;

use super::{
    deadletter::DeadLetter,
    headers::{get_i64, get_str, headers_of, set_i64, strip_broker_death_headers},
    publisher::{PublishError, Publisher},
    topology::{Topology, tier_label},
};
use crate::{backoff::Backoff, messages::header};

/// A message's properties (content type, message id, headers).
pub type Properties = BasicProperties;
/// A message's headers.
pub type Headers = FieldTable;

/// One delivery as a stage sees it.
#[derive(Debug, Clone)]
pub struct Message {
    pub tag: u64,
    pub body: Vec<u8>,
    pub properties: Properties,
    /// When this consumer received it: holding is measured from here.
    pub received: Instant,
}

impl Message {
    pub fn new(tag: u64, body: Vec<u8>, properties: Properties) -> Self {
        Self { tag, body, properties, received: Instant::now() }
    }

    pub fn message_id(&self) -> String {
        super::headers::message_id(&self.properties)
    }

    pub fn header_i64(&self, key: &str) -> Option<i64> {
        get_i64(&self.properties, key)
    }

    pub fn header_str(&self, key: &str) -> Option<String> {
        get_str(&self.properties, key)
    }
}

/// One message a settlement publishes.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: Properties,
}

/// What should happen to a delivery.
#[derive(Debug)]
pub enum Settlement {
    /// Done (written, or nothing to do): ack.
    Ack,
    /// Publish these (each confirmed), then ack: the transformer's records and dead letters.
    Forward(Vec<Outgoing>),
    /// Republish the delivery to the retry tier `tier` with `attempts` recorded, then ack.
    Retry { tier: Duration, attempts: u32 },
    /// Dead-letter the delivery (confirmed), then ack.
    DeadLetter(DeadLetter),
    /// Held too long: republish it where this stage parks (attempts unchanged,
    /// `x-orderflow-parked` + 1), then ack.
    Park,
    /// Leave it unacked: the broker redelivers it when the channel closes (a stopping consumer).
    Requeue,
}

/// What [`Settler::settle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Everything the settlement asked for was confirmed, and the delivery acked.
    Done,
    /// Held past `HOLD_LIMIT`: parked (confirmed) and acked instead.
    Parked,
    /// Left unacked for redelivery.
    Requeued,
}

/// The broker calls a settlement makes; the live one is a [`Publisher`] and the consumer's acks.
pub trait Broker: Send + Sync {
    /// Publishes and waits for the broker's confirm.
    fn publish(&self, out: &Outgoing) -> impl Future<Output = Result<(), PublishError>> + Send;
    /// Acks the delivery (batched by the consumer); fails when the channel is gone.
    fn ack(&self, tag: u64) -> anyhow::Result<()>;
}

/// Counters the settler keeps for its stage.
#[derive(Clone)]
pub struct SettleMetrics {
    /// Publishes tried again after a nack or a return.
    pub publish_retries: IntCounter,
    /// Deliveries parked after being held `HOLD_LIMIT`.
    pub parked: IntCounter,
}

/// Where and how a stage settles.
#[derive(Clone)]
pub struct Policy {
    pub topology: Topology,
    /// Where a parked delivery goes: (exchange, routing key).
    pub park_to: (String, String),
    /// A delivery held this long (handler plus settlement) is parked.
    pub hold_limit: Duration,
    pub metrics: SettleMetrics,
}

/// A return is retried this many times before the session ends.
const RETURN_RETRIES: u32 = 5;

/// How soon a park the broker refused is tried again once the hold limit has passed.
pub const PARK_RETRY: Duration = Duration::from_secs(5);

/// Applies settlements through a [`Broker`].
pub struct Settler<B> {
    broker: B,
    policy: Policy,
}

/// Why a publish was given up: the session must end (the delivery is redelivered), or the hold
/// limit passed while the broker kept refusing.
enum GiveUp {
    Session(anyhow::Error),
    HoldLimit,
}

impl<B: Broker> Settler<B> {
    pub fn new(broker: B, policy: Policy) -> Self {
        Self { broker, policy }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Applies `settlement` to `message`: confirmed publishes first, then the ack. An `Err` ends
    /// the broker session (the delivery is redelivered).
    pub async fn settle(&self, message: &Message, settlement: Settlement) -> anyhow::Result<Applied> {
        let deadline = message.received + self.policy.hold_limit;
        let outgoing = match settlement {
            Settlement::Requeue => return Ok(Applied::Requeued),
            Settlement::Park => return self.park(message).await,
            Settlement::Ack => Vec::new(),
            Settlement::Forward(outgoing) => outgoing,
            Settlement::Retry { tier, attempts } => vec![self.retry(message, tier, attempts)],
            Settlement::DeadLetter(dead) => vec![self.dead_letter(message, &dead)],
        };
        let all = futures_util::future::try_join_all(outgoing.iter().map(|out| self.publish(out, Some(deadline))));
        match all.await {
            Ok(_) => {
                self.broker.ack(message.tag)?;
                Ok(Applied::Done)
            }
            Err(GiveUp::Session(error)) => Err(error),
            // The messages confirmed so far are published again with the parked one: the writer's
            // idempotency key and the target's idCheck absorb the repeat.
            Err(GiveUp::HoldLimit) => self.park(message).await,
        }
    }

    /// Publishes under the policy; with a deadline, a refusal that lasts past it gives up.
    async fn publish(&self, out: &Outgoing, deadline: Option<Instant>) -> Result<(), GiveUp> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut returns = 0u32;
        loop {
            let error = match self.broker.publish(out).await {
                Ok(()) => return Ok(()),
                Err(error) if error.ends_session() => return Err(GiveUp::Session(error.into())),
                Err(PublishError::Nacked) => PublishError::Nacked,
                Err(error) if returns < RETURN_RETRIES => {
                    returns += 1;
                    error
                }
                Err(error) => {
                    let context = format!("publishing to {} kept failing", out.exchange);
                    return Err(GiveUp::Session(anyhow::Error::from(error).context(context)));
                }
            };
            self.policy.metrics.publish_retries.inc();
            // The first refusal, then every 12th retry (under a minute apart) while it lasts.
            if backoff.attempts().is_multiple_of(12) {
                tracing::warn!(message = "Publish not confirmed; retrying.", %error, exchange = %out.exchange, attempts = backoff.attempts() + 1);
            }
            let wake = Instant::now() + backoff.next_delay();
            match deadline {
                Some(deadline) if wake >= deadline => {
                    tokio::time::sleep_until(deadline).await;
                    return Err(GiveUp::HoldLimit);
                }
                _ => tokio::time::sleep_until(wake).await,
            }
        }
    }

    /// Parks the delivery, retrying a refused park every [`PARK_RETRY`] (the ack timeout is not
    /// far off: there is nothing better to do with it), then acks it.
    async fn park(&self, message: &Message) -> anyhow::Result<Applied> {
        let parked = message.header_i64(header::PARKED).unwrap_or(0).saturating_add(1);
        let mut headers = strip_broker_death_headers(&headers_of(&message.properties));
        set_i64(&mut headers, header::PARKED, parked);
        let (exchange, routing_key) = self.policy.park_to.clone();
        let out = Outgoing {
            exchange,
            routing_key,
            body: message.body.clone(),
            properties: message.properties.clone().with_headers(headers),
        };
        loop {
            match self.publish(&out, Some(Instant::now() + PARK_RETRY)).await {
                Ok(()) => break,
                Err(GiveUp::Session(error)) => return Err(error.context("parking a delivery held too long")),
                Err(GiveUp::HoldLimit) => {
                    tracing::warn!(message = "Could not park a delivery held too long; trying again.", message_id = %message.message_id());
                }
            }
        }
        self.policy.metrics.parked.inc();
        tracing::warn!(message = "Delivery held too long; parked.", message_id = %message.message_id(), to = %out.exchange, routing_key = %out.routing_key, parked, hold_limit = ?self.policy.hold_limit);
        self.broker.ack(message.tag)?;
        Ok(Applied::Parked)
    }

    fn retry(&self, message: &Message, tier: Duration, attempts: u32) -> Outgoing {
        let mut headers = strip_broker_death_headers(&headers_of(&message.properties));
        set_i64(&mut headers, header::ATTEMPT, i64::from(attempts));
        Outgoing {
            exchange: self.policy.topology.retry_exchange(),
            routing_key: tier_label(tier),
            body: message.body.clone(),
            properties: message.properties.clone().with_headers(headers),
        }
    }

    fn dead_letter(&self, message: &Message, dead: &DeadLetter) -> Outgoing {
        dead.outgoing(&self.policy.topology, message.body.clone(), &message.properties)
    }
}

/// The live broker: confirmed publishes on the publishing connection, batched acks on the
/// consuming channel.
pub struct Live {
    pub publisher: Publisher,
    pub acks: super::consume::Acks,
}

impl Broker for Live {
    async fn publish(&self, out: &Outgoing) -> Result<(), PublishError> {
        self.publisher.publish(&out.exchange, &out.routing_key, &out.body, out.properties.clone()).await
    }

    fn ack(&self, tag: u64) -> anyhow::Result<()> {
        self.acks.ack(tag)
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Mutex};

    use super::*;
    use crate::amqp::{ErrorClass, Stage};

    /// What the fake broker was asked to do, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Publish { exchange: String, routing_key: String, attempt: Option<i64>, parked: Option<i64> },
        Ack(u64),
    }

    /// Publishes answer from a script (then Ok); every call is recorded.
    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<Call>>,
        answers: Mutex<VecDeque<Result<(), PublishError>>>,
    }

    impl Fake {
        fn answering(answers: Vec<Result<(), PublishError>>) -> Self {
            Self { calls: Mutex::default(), answers: Mutex::new(answers.into()) }
        }
    }

    impl Broker for &Fake {
        async fn publish(&self, out: &Outgoing) -> Result<(), PublishError> {
            self.calls.lock().expect("lock").push(Call::Publish {
                exchange: out.exchange.clone(),
                routing_key: out.routing_key.clone(),
                attempt: get_i64(&out.properties, header::ATTEMPT),
                parked: get_i64(&out.properties, header::PARKED),
            });
            // A confirm takes a moment, so concurrent publishes interleave as they would.
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.answers.lock().expect("lock").pop_front().unwrap_or(Ok(()))
        }

        fn ack(&self, tag: u64) -> anyhow::Result<()> {
            self.calls.lock().expect("lock").push(Call::Ack(tag));
            Ok(())
        }
    }

    fn settler(fake: &Fake) -> Settler<&Fake> {
        let topology = Topology::new("t");
        let park_to = (topology.retry_exchange(), "5m".to_string());
        let metrics = SettleMetrics {
            publish_retries: IntCounter::new("r", "r").expect("metric"),
            parked: IntCounter::new("p", "p").expect("metric"),
        };
        Settler::new(fake, Policy { topology, park_to, hold_limit: Duration::from_secs(60), metrics })
    }

    fn message(attempt: i64) -> Message {
        let mut headers = FieldTable::default();
        set_i64(&mut headers, header::ATTEMPT, attempt);
        Message::new(7, b"{}".to_vec(), BasicProperties::default().with_headers(headers))
    }

    fn publish(exchange: &str, routing_key: &str, attempt: Option<i64>, parked: Option<i64>) -> Call {
        Call::Publish { exchange: exchange.into(), routing_key: routing_key.into(), attempt, parked }
    }

    fn calls(fake: &Fake) -> Vec<Call> {
        fake.calls.lock().expect("lock").clone()
    }

    fn record(n: u8) -> Outgoing {
        Outgoing {
            exchange: "t.records".into(),
            routing_key: format!("r{n}"),
            body: vec![n],
            properties: BasicProperties::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_publish_is_confirmed_before_the_ack() {
        let fake = Fake::default();
        let applied = settler(&fake).settle(&message(0), Settlement::Forward(vec![record(1), record(2)])).await;
        assert_eq!(applied.expect("settled"), Applied::Done);
        assert_eq!(
            calls(&fake),
            vec![publish("t.records", "r1", None, None), publish("t.records", "r2", None, None), Call::Ack(7)]
        );
        let fake = Fake::default();
        settler(&fake)
            .settle(&message(2), Settlement::Retry { tier: Duration::from_secs(30), attempts: 3 })
            .await
            .expect("ok");
        assert_eq!(calls(&fake), vec![publish("t.retry", "30s", Some(3), None), Call::Ack(7)]);
        let fake = Fake::default();
        settler(&fake).settle(&message(0), Settlement::Ack).await.expect("ok");
        assert_eq!(calls(&fake), vec![Call::Ack(7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_goes_to_the_dead_exchange_under_its_stage_then_the_ack() {
        let fake = Fake::default();
        let dead = DeadLetter {
            stage: Stage::Writer,
            class: ErrorClass::Permanent,
            reason: "target_rejected".into(),
            error: "no".into(),
            origin_exchange: "t.records".into(),
            origin_routing_key: "record".into(),
        };
        settler(&fake).settle(&message(1), Settlement::DeadLetter(dead)).await.expect("ok");
        assert_eq!(calls(&fake), vec![publish("t.dead", "writer", Some(1), None), Call::Ack(7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_nack_is_backpressure_retried_while_held_then_acked() {
        let fake = Fake::answering(vec![Err(PublishError::Nacked), Err(PublishError::Nacked)]);
        let s = settler(&fake);
        assert_eq!(s.settle(&message(0), Settlement::Forward(vec![record(1)])).await.expect("ok"), Applied::Done);
        let r1 = publish("t.records", "r1", None, None);
        assert_eq!(calls(&fake), vec![r1.clone(), r1.clone(), r1, Call::Ack(7)]);
        assert_eq!(s.policy.metrics.publish_retries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_that_outlasts_the_hold_limit_parks_the_delivery_with_its_attempts_unchanged() {
        let fake = Fake::answering((0..1000).map(|_| Err(PublishError::Nacked)).collect());
        let s = settler(&fake);
        let held = message(2);
        let refusing = s.settle(&held, Settlement::Retry { tier: Duration::from_secs(30), attempts: 3 });
        // Parking is refused too at first, then accepted.
        let applied = refusing.await.expect("settled");
        assert_eq!(applied, Applied::Parked);
        let all = calls(&fake);
        assert_eq!(all.last(), Some(&Call::Ack(7)), "acked only after the park is confirmed");
        assert_eq!(all[all.len() - 2], publish("t.retry", "5m", Some(2), Some(1)), "attempts unchanged, parked once");
        assert!(held.received.elapsed() >= Duration::from_secs(60), "held the whole HOLD_LIMIT first");
        assert!(all[..all.len() - 2].iter().all(|c| matches!(c, Call::Publish { .. })), "no ack before");
        assert_eq!(s.policy.metrics.parked.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_park_the_handler_decides_counts_the_park_and_acks() {
        let fake = Fake::default();
        let mut held = message(4);
        let mut headers = headers_of(&held.properties);
        set_i64(&mut headers, header::PARKED, 2);
        held.properties = held.properties.clone().with_headers(headers);
        assert_eq!(settler(&fake).settle(&held, Settlement::Park).await.expect("ok"), Applied::Parked);
        assert_eq!(calls(&fake), vec![publish("t.retry", "5m", Some(4), Some(3)), Call::Ack(7)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_return_is_a_topology_fault_retried_a_few_times_then_the_session_ends() {
        let returned = || Err(PublishError::Returned("NO_ROUTE".into()));
        let fake = Fake::answering((0..10).map(|_| returned()).collect());
        let error = settler(&fake).settle(&message(0), Settlement::Forward(vec![record(1)])).await.expect_err("ends");
        assert!(format!("{error:#}").contains("NO_ROUTE"), "{error:#}");
        let all = calls(&fake);
        assert_eq!(all.len(), 1 + RETURN_RETRIES as usize, "{all:?}");
        assert!(!all.contains(&Call::Ack(7)), "never acked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirm_timeout_ends_the_session_at_once_without_an_ack() {
        let fake = Fake::answering(vec![Ok(()), Err(PublishError::ConfirmTimeout(Duration::from_secs(30)))]);
        let error = settler(&fake).settle(&message(0), Settlement::Forward(vec![record(1), record(2)])).await;
        assert!(error.expect_err("ends").to_string().contains("AMQP_CONFIRM_TIMEOUT"));
        assert_eq!(calls(&fake), vec![publish("t.records", "r1", None, None), publish("t.records", "r2", None, None)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeue_touches_nothing() {
        let fake = Fake::default();
        assert_eq!(settler(&fake).settle(&message(0), Settlement::Requeue).await.expect("ok"), Applied::Requeued);
        assert!(calls(&fake).is_empty());
    }
}
