//! Shared by the integration tests, the demo and the benchmarks: the real
//! BDB workload and checker ([`bdb`]) and the process harness ([`harness`]).

pub mod bdb;
pub mod harness;
