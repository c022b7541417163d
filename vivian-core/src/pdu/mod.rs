//! Power delivery units (PDUs): the driver trait, the driver registry, the
//! port-semantics layer and the per-PDU task.
//!
//! # Layers
//!
//! * [`PduDriver`] is what a driver author implements: list the ports, read a
//!   port's state, write a port's state. A driver knows nothing about
//!   reservations, minimum off times, retries or timeouts.
//! * [`DriverRegistry`] builds a driver from the MarsDB `driver` name and its
//!   `config` map. Third-party crates add their constructors to it.
//! * [`PduHandle`] is one PDU in service: a Tokio task owns the driver,
//!   serialises every command (cheap PDUs break under parallel requests),
//!   polls the port states in the background and applies the port semantics
//!   (see below) to every driver. Reads of the cached [`PduSnapshot`] never
//!   wait on the PDU.
//! * [`PduManager`] owns the PDUs built from MarsDB and follows its edits.
//!
//! # Port semantics (invariants)
//!
//! * Setting a port to the state it is already in writes nothing.
//! * A port is never switched from OFF to ON before its minimum off time
//!   (the DUT's `pdu_off_delay`) has elapsed since it was last seen or made
//!   OFF; the command waits out the remainder, without blocking the other
//!   ports of the PDU.
//! * A reserved port refuses every change ([`PduError::PortReserved`]).
//! * REBOOT is done as OFF then ON (honouring the minimum off time) unless
//!   the driver has a native reboot ([`PduDriver::supports_reboot`]).
//! * Every driver call has a timeout; a failed command is attempted 3 times
//!   with a backoff; a PDU that keeps failing is reported in error with the
//!   error text.
//!
//! This module never opens a socket: network drivers live in `vivian-pdu`.

mod driver;
pub mod dummy;
mod error;
mod handle;
mod manager;
mod marsdb;
mod registry;
mod types;

pub use driver::PduDriver;
pub use error::PduError;
pub use handle::{PduHandle, PduOptions, PduSnapshot, PduStatus, PortSnapshot};
pub use manager::{PduManager, PduSpec};
pub use marsdb::{min_off_times_from_marsdb, specs_from_marsdb};
pub use registry::{DriverConstructor, DriverRegistry};
pub use types::{PortInfo, PortState};

#[cfg(test)]
mod tests;
