//! The Sixfold storage node: receives redo records over QUIC, makes them durable in an
//! io_uring O_DIRECT journal with pipelined group commit, and acknowledges each batch with
//! its segment's SCL.
//!
//! The protocol lives in [`core::NodeCore`], a pure state machine; [`driver`] feeds it and
//! carries out its I/O through the traits of [`io`]; [`server`] speaks QUIC.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backup;
pub mod config;
pub mod core;
pub mod driver;
pub mod io;
pub mod journal;
pub mod manifest;
pub mod metrics;
pub mod node;
pub mod pagestore;
pub mod peers;
pub mod segment;
pub mod server;
pub mod tls;

pub use config::NodeConfig;
pub use core::NodeCore;
pub use node::Node;
