//! The `sixfold` admin CLI as a library, so tests and benchmarks use the same code.

pub mod certs;
pub mod chaos;
pub mod cluster;
pub mod dev;
pub mod inspect;
pub mod netfault;
pub mod procs;
pub mod s3server;
pub mod scrape;
