//! # vivian-core
//!
//! The domain of Vivian, a service that time-shares CI test machines (DUTs):
//! the typed configuration, the MarsDB farm database, the DUT state machine
//! and the traits that drivers and servers implement (`PduDriver`, `Netboot`,
//! `RunnerRegistry`, console sources).
//!
//! Invariant: this crate never opens a network socket itself; transports live
//! in the driver crates and in `bins`.

#![warn(missing_docs)]

pub mod config;
pub mod console;
pub mod farm;
#[cfg(feature = "http-client")]
pub mod http_client;
pub mod job;
pub mod marsdb;
pub mod netboot;
pub mod pdu;
pub mod protocol;
pub mod runner;
pub mod state;
pub mod storage;
