//! Shared by the integration tests, the demo and the benchmarks: the real
//! BDB workload and checker ([`bdb`]), the process harness ([`harness`])
//! and a misbehaving TCP proxy for network faults ([`faulty_link`]).

pub mod bdb;
pub mod faulty_link;
pub mod harness;
