//! Vivian's binaries share this library: the REST API routes (mountable by an
//! embedding program) and the wiring of the executor.
#![warn(missing_docs)]
pub mod api;
pub mod artifacts;
pub mod client;
pub mod demo;
pub mod engine;
pub mod job_bucket;
pub mod memory;
pub mod qemu;
pub mod serve;
pub mod simdut;
pub mod vpdu;
