//! Shared by the integration tests, the demo, the benchmarks and the fault
//! campaign: the real BDB workload and checker ([`bdb`]), the process
//! harness ([`harness`]), the archive commands ([`archive_cmd`]), the
//! helpers of the refusal tests ([`refusal`]), a misbehaving TCP proxy for
//! network faults ([`faulty_link`]), the campaign itself ([`faults`]) and
//! the etcd world of the switchover tests ([`etcd_trio`]),
//! the S3 server the archive_s3 tests archive to ([`s3_server`]) with a
//! proxy in front of it that fails requests on command ([`s3_proxy`]).

pub mod archive_cmd;
pub mod bdb;
pub mod etcd;
pub mod etcd_trio;
pub mod faults;
pub mod faulty_link;
pub mod harness;
pub mod refusal;
pub mod s3_proxy;
pub mod s3_server;
