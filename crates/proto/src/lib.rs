//! Generated gRPC contracts from `proto/trellis/v1`.
#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("trellis.v1");
}
pub use v1::*;
