//! Dead-lettering by our own hand: the message goes to `<ns>.dead` (routed to the stage's
//! terminal dead queue) with its body and headers, the reason, its class, and where it came from,
//! so a person can read why and `orderflow dlq replay` can send it back. Broker death headers
//! are dropped (they can make a replay look like a dead-letter cycle).

use lapin::{BasicProperties, types::ShortString};
use serde::Serialize;

use super::{
    headers::{clip, headers_of, set_i64, set_str, strip_broker_death_headers},
    settle::Outgoing,
    topology::{Stage, Topology},
};
use crate::messages::{header, now_ms};

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    /// Will never succeed as it is (bad data, rejected by the target): dead-lettered at once.
    Permanent,
    /// Kept failing transiently until the attempts ran out.
    Exhausted,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Permanent => "permanent",
            ErrorClass::Exhausted => "exhausted",
        }
    }
}

/// Longest error text kept in a header.
const MAX_ERROR_BYTES: usize = 2000;

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub stage: Stage,
    pub class: ErrorClass,
    /// A fixed, label-safe reason (`invalid_record`, `poison_page`, `target_rejected`, …) that
    /// `orderflow dlq replay --reason` filters on.
    pub reason: String,
    /// A person-readable reason naming the field/value or the last error.
    pub error: String,
    /// Where a replay should publish it.
    pub origin_exchange: String,
    pub origin_routing_key: String,
}

impl DeadLetter {
    /// The dead letter's properties: the original's, minus broker death headers, plus ours.
    pub fn properties(&self, original: &BasicProperties) -> BasicProperties {
        let mut headers = strip_broker_death_headers(&headers_of(original));
        set_str(&mut headers, header::STAGE, self.stage.as_str());
        set_str(&mut headers, header::ERROR_CLASS, self.class.as_str());
        set_str(&mut headers, header::REASON, &self.reason);
        set_str(&mut headers, header::ERROR, &clip(&self.error, MAX_ERROR_BYTES));
        set_str(&mut headers, header::ORIGIN_EXCHANGE, &self.origin_exchange);
        set_str(&mut headers, header::ORIGIN_ROUTING_KEY, &self.origin_routing_key);
        set_i64(&mut headers, header::DEAD_AT_MS, now_ms());
        let mut props = original.clone().with_headers(headers).with_delivery_mode(2);
        if props.content_type().is_none() {
            props = props.with_content_type(ShortString::from("application/json"));
        }
        props
    }

    /// Publishes the dead letter (confirmed). Only after this succeeds may the caller ack the
    /// original.
    /// The dead letter of a message with this body and these properties, ready to publish.
    pub fn outgoing(&self, topology: &Topology, body: Vec<u8>, original: &BasicProperties) -> Outgoing {
        Outgoing {
            exchange: topology.dead_exchange(),
            routing_key: self.stage.as_str().to_string(),
            body,
            properties: self.properties(original),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::get_str;
    use lapin::types::{AMQPValue, FieldTable};

    #[test]
    fn a_dead_letter_keeps_the_message_and_says_why_and_whence() {
        let mut h = FieldTable::default();
        h.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        set_str(&mut h, "traceparent", "00-abc-def-01");
        let original = BasicProperties::default().with_message_id("acme:1:2".into()).with_headers(h);
        let dl = DeadLetter {
            stage: Stage::Writer,
            class: ErrorClass::Permanent,
            reason: "target_rejected".into(),
            error: "target said 422: bad id".into(),
            origin_exchange: "ns.records".into(),
            origin_routing_key: "record".into(),
        };
        let props = dl.properties(&original);
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some("acme:1:2"));
        assert_eq!(get_str(&props, header::ERROR_CLASS).as_deref(), Some("permanent"));
        assert_eq!(get_str(&props, header::ERROR).as_deref(), Some("target said 422: bad id"));
        assert_eq!(get_str(&props, header::REASON).as_deref(), Some("target_rejected"));
        assert_eq!(get_str(&props, header::ORIGIN_EXCHANGE).as_deref(), Some("ns.records"));
        assert_eq!(get_str(&props, header::STAGE).as_deref(), Some("writer"));
        assert_eq!(get_str(&props, "traceparent").as_deref(), Some("00-abc-def-01"));
        assert!(crate::amqp::headers::get(&props, "x-death").is_none());
        assert_eq!(*props.delivery_mode(), Some(2));
    }
}
