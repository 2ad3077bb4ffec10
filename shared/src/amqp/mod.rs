//! The AMQP adapter: every lapin call in the project goes through here (connection, topology,
//! confirmed publishing, headers, dead-lettering, the reconnecting session loop).

pub mod connect;
pub mod consume;
pub mod deadletter;
pub mod headers;
pub mod lease;
pub mod ledger;
pub mod ledger_index;
pub mod ops;
pub mod publisher;
pub mod session;
pub mod settle;
pub mod topology;

pub use connect::connect;
pub use deadletter::{DeadLetter, ErrorClass};
pub use lease::{Connection, Lease, Owner, Presence};
pub use publisher::{PublishError, Publisher};
pub use session::{BrokerMetrics, Connections, Fatal, connection_name, supervise};
pub use settle::{Applied, Headers, Message, Outgoing, Properties, Settlement};
pub use topology::{Stage, Topology};

pub use lapin;

use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// The broker's soft error of a failed operation, if that is what it was.
pub fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// True when an exclusive queue is owned by another connection (405 RESOURCE_LOCKED).
pub fn is_resource_locked(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::RESOURCELOCKED))
}

/// True when a passive declare found no such queue (404 NOT_FOUND).
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::NOTFOUND))
}
