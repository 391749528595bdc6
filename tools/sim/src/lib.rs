//! `sixfold-sim`: the deterministic simulator (DESIGN.md "The simulator"). One thread, one
//! seeded PRNG, a virtual clock; storage nodes in three AZs and the real `VolumeCore` over a
//! simulated network, under faults kept within AZ+1. A seed replays bit-exactly.

#![deny(clippy::disallowed_methods)]

pub mod core_node;
pub mod model;
pub mod rng;
pub mod storage;
pub mod world;

pub use world::{Bug, Options, Report, run_seed};
