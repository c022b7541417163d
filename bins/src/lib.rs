//! Vivian's binaries share this library: the REST API routes (mountable by an
//! embedding program) and the wiring of the executor.
#![warn(missing_docs)]
pub mod simdut;
pub mod client;
pub mod vpdu;
pub mod api;
pub mod serve;
pub mod engine;
pub mod demo;
