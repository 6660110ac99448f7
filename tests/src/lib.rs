//! Shared by the integration tests, the demo, the benchmarks and the fault
//! campaign: the real BDB workload and checker ([`bdb`]), the process
//! harness ([`harness`]) and the campaign itself ([`faults`]).

pub mod bdb;
pub mod faults;
pub mod harness;
