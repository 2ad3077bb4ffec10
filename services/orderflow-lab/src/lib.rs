//! The lab around orderflow, kept out of the production image: the local stack runner (jst-sim,
//! target-sim and every stage as child processes; used by `demo` and by the tests), the demo, the
//! fault suite and the benchmarks. `orderflow demo|fault-suite|bench` run the `orderflow-lab`
//! binary.

pub mod alarms;
pub mod bench;
pub mod demo;
pub mod demo_broker;
pub mod e2e;
pub mod faults;
pub mod ledger_bench;
pub mod ledger_fill;
pub mod pace_bench;
pub mod rabbitmqctl;
pub mod relay;
pub mod scale;
pub mod stack;
