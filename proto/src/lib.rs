//! Tandem's wire protocol, generated from `proto/tandem.proto` at build time.
#![allow(clippy::all)]

tonic::include_proto!("tandem.v1");

/// Bumped on any incompatible change; the primary refuses other versions.
pub const PROTOCOL_VERSION: u32 = 1;
