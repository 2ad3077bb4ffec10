//! The `orderflow` operator CLI as a library: the local stack runner (used by `demo` and by the
//! tests), broker helpers, and the subcommands.

pub mod alarms;
pub mod bench;
pub mod broker;
pub mod demo;
pub mod demo_broker;
pub mod dlq;
pub mod e2e;
pub mod faults;
pub mod pace_bench;
pub mod stack;
pub mod status;
pub mod topology_cmd;
