//! The database-engine side of Sixfold: the writer's quorum state machine (VCL, VDL, LAL),
//! the buffer cache, the volume file and placement, and the driver that runs them over QUIC.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod client;
pub mod core;
pub mod driver;
pub mod quorum;
pub mod tls;
pub mod volume;

pub use client::NodeClient;
pub use driver::{VolumeClient, VolumeConfig, VolumeError};
pub use volume::VolumeFile;
