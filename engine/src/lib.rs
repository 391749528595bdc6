//! The database-engine side of Sixfold: connections to storage nodes (and, in later issues,
//! quorum tracking, VCL/VDL, commits and reads).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod client;
pub mod tls;

pub use client::NodeClient;
