//! The `orderflow` operator CLI as a library: dead letters, status, the topology, and the entry
//! to the lab commands (run by the separate `orderflow-lab` binary).

pub mod audit;
pub mod dlq;
pub mod dlq_cmd;
pub mod lab;
pub mod status;
pub mod topology_cmd;
pub mod trace;
