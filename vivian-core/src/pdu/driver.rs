//! The trait every PDU driver implements.

use std::time::Duration;

use async_trait::async_trait;

use super::{PduError, PortInfo, PortState};

/// A PDU driver: talks to one physical (or virtual) PDU.
///
/// Implement this in your own crate and register a constructor in a
/// [`DriverRegistry`](super::DriverRegistry); see the crate
/// `examples/pdu-http-relay` for a complete out-of-tree driver.
///
/// A driver is simple on purpose. The per-PDU task ([`PduHandle`](super::PduHandle))
/// calls it one request at a time, wraps every call in a timeout, retries
/// failures, and applies the port semantics (no-op on the current state,
/// minimum off time, reservations, REBOOT as OFF then ON). So a driver:
///
/// * never sees two calls at once from Vivian (it still takes `&self`, so it
///   needs interior mutability for connection state);
/// * must be cancel-safe: a call that times out is dropped, and the next
///   call must work (reconnect if needed);
/// * does no I/O in its constructor: the first I/O is [`PduDriver::ports`].
///
/// Port ids are strings; drivers with numbered outlets use the decimal
/// number (`"1"`, `"2"`…).
#[async_trait]
pub trait PduDriver: Send + Sync + 'static {
    /// Lists the ports, in the PDU's order, with their labels.
    async fn ports(&self) -> Result<Vec<PortInfo>, PduError>;

    /// Reads the state of one port.
    async fn get_state(&self, port_id: &str) -> Result<PortState, PduError>;

    /// Writes the state of one port. `state` is ON, OFF, or REBOOT (only
    /// when [`PduDriver::supports_reboot`] says so).
    async fn set_state(&self, port_id: &str, state: PortState) -> Result<(), PduError>;

    /// Reads the states of several ports, in the same order. Used by the
    /// background poll; the default reads them one by one, a driver that can
    /// read them in one request should override it.
    async fn get_states(&self, ports: &[PortInfo]) -> Result<Vec<PortState>, PduError> {
        let mut states = Vec::with_capacity(ports.len());
        for port in ports {
            states.push(self.get_state(&port.id).await?);
        }
        Ok(states)
    }

    /// Whether the PDU power-cycles a port itself when REBOOT is written.
    /// When false (the default), REBOOT is done as OFF, the minimum off
    /// time, then ON.
    fn supports_reboot(&self) -> bool {
        false
    }

    /// The minimum off time of a port whose DUT does not give one
    /// (`pdu_off_delay`). 30 s by default; the virtual PDU uses 0.1 s.
    fn default_min_off_time(&self) -> Duration {
        Duration::from_secs(30)
    }

    /// How long the PDU needs after a write before it takes the next
    /// command (1 s for SNMP PDUs, 5 s for Cyberpower). The per-PDU task
    /// waits this long after each successful write. Zero by default.
    fn state_transition_delay(&self) -> Duration {
        Duration::ZERO
    }
}
