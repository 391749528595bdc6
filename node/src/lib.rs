//! The Sixfold storage node: receives redo records over QUIC, makes them durable in an
//! io_uring O_DIRECT journal with pipelined group commit, and acknowledges each batch with
//! its segment's SCL.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod io;
pub mod journal;
pub mod node;
pub mod persister;
pub mod segment;
pub mod server;
pub mod state;
pub mod tls;

pub use config::NodeConfig;
pub use node::Node;
