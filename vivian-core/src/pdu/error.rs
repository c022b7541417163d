//! The PDU error type.

use std::time::Duration;

use thiserror::Error;

/// Everything that can go wrong with a PDU, a driver or a port.
///
/// Drivers mostly return [`PduError::Config`], [`PduError::Transport`],
/// [`PduError::Protocol`] and [`PduError::Timeout`]; the per-PDU task adds
/// the names of the PDU and port.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum PduError {
    /// MarsDB names a driver that no registered crate provides.
    #[error("PDU \"{pdu}\": unknown driver \"{driver}\" (known drivers: {known})")]
    UnknownDriver {
        /// The PDU's name in MarsDB.
        pdu: String,
        /// The driver name that is not registered.
        driver: String,
        /// The registered driver names, comma-separated.
        known: String,
    },
    /// A driver's configuration is invalid (raised by driver constructors).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Building the driver of a PDU failed.
    #[error("PDU \"{pdu}\" (driver \"{driver}\"): {source}")]
    Build {
        /// The PDU's name in MarsDB.
        pdu: String,
        /// The driver name.
        driver: String,
        /// Why the constructor refused.
        #[source]
        source: Box<PduError>,
    },
    /// A port id that the PDU does not have.
    #[error("PDU \"{pdu}\" has no port \"{port}\"")]
    UnknownPort {
        /// The PDU's name.
        pdu: String,
        /// The port id asked for.
        port: String,
    },
    /// A change was asked of a reserved port.
    #[error("port \"{port}\" of PDU \"{pdu}\" is reserved")]
    PortReserved {
        /// The PDU's name.
        pdu: String,
        /// The reserved port.
        port: String,
    },
    /// A state that cannot be requested (UNKNOWN) or cannot be parsed.
    #[error("invalid port state: {0}")]
    InvalidState(String),
    /// The driver does not support this operation.
    #[error("not supported by the driver: {0}")]
    Unsupported(String),
    /// The PDU did not answer in time.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        /// What was being done ("SNMP GET 1.3.6…", "set port 3 ON").
        operation: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The PDU could not be reached or the connection broke.
    #[error("communication failed: {0}")]
    Transport(String),
    /// The PDU answered something the driver does not understand.
    #[error("unexpected answer from the PDU: {0}")]
    Protocol(String),
    /// A command failed on every attempt.
    #[error("PDU \"{pdu}\": {operation} failed {attempts} times in a row, last error: {last}")]
    Failed {
        /// The PDU's name.
        pdu: String,
        /// The command ("set port 3 ON").
        operation: String,
        /// How many attempts were made.
        attempts: u32,
        /// The error of the last attempt.
        last: Box<PduError>,
    },
    /// A later command on the same port replaced this one while it was
    /// waiting out the minimum off time.
    #[error("PDU \"{pdu}\": the command on port \"{port}\" was superseded by a later one")]
    Superseded {
        /// The PDU's name.
        pdu: String,
        /// The port.
        port: String,
    },
    /// The PDU could not be initialised (its ports could not be listed).
    #[error("PDU \"{pdu}\" is not ready: {reason}")]
    NotReady {
        /// The PDU's name.
        pdu: String,
        /// The last initialisation error.
        reason: String,
    },
    /// The PDU's task has stopped (the PDU was removed from MarsDB).
    #[error("PDU \"{0}\" is stopped")]
    Stopped(String),
}

impl PduError {
    /// A configuration error, for driver constructors.
    pub fn config(message: impl Into<String>) -> Self {
        Self::Config(message.into())
    }
}
