//! Generated gRPC contracts from `proto/trellis/v1`.
#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("trellis.v1");
}
pub use v1::*;

/// Every proto file's descriptor (a `FileDescriptorSet`), for tests and
/// tools that enumerate services and methods.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trellis_descriptor.bin"));
