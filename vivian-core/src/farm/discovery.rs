//! The discovery slot (EX A.9, E.4): one discovery at a time; its port is
//! switched ON so the unknown machine behind it netboots and registers;
//! registration consumes it; when the timeout passes first, the port is
//! switched OFF again and the slot freed (active expiry, COMPAT.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Farm, FarmError};
use crate::marsdb::PortId;
use crate::pdu::{PduError, PortState};

/// Timeout of a discovery whose request gives none.
pub const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(150);

/// The running discovery.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The PDU.
    pub pdu: String,
    /// The port switched ON.
    pub port_id: PortId,
    /// When it started (wall clock).
    pub date: DateTime<Utc>,
    /// Its timeout.
    pub timeout: Duration,
    /// When it started (monotonic).
    pub started: Instant,
    /// Identifies this discovery (for its expiry task).
    pub(crate) epoch: u64,
}

/// The discovery object of the API: `GET /dut/discover` and the
/// `discover` of `full-state` (`null` when idle).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiscoveryView {
    /// The PDU.
    pub pdu: String,
    /// The port id.
    pub port_id: String,
    /// When it started (RFC 3339, UTC).
    pub date: DateTime<Utc>,
    /// Timeout in seconds.
    pub timeout: f64,
    /// When it started, in seconds of the farm's monotonic clock.
    pub started_at: f64,
    /// Seconds left before it expires.
    pub expires_in: f64,
}

fn pdu_err(e: PduError) -> FarmError {
    match e {
        PduError::UnknownPort { .. } => FarmError::NotFound(e.to_string()),
        PduError::PortReserved { .. } => FarmError::Conflict(e.to_string()),
        _ => FarmError::Pdu(e.to_string()),
    }
}

impl Farm {
    /// The running discovery, if any (never waits).
    pub fn discovery(&self) -> Option<DiscoveryView> {
        let rt = self.runtime.lock().unwrap();
        let d = rt.discovery.as_ref()?;
        let started_at = d.started.duration_since(self.started).as_secs_f64();
        let expires_in = d.timeout.saturating_sub(d.started.elapsed()).as_secs_f64();
        Some(DiscoveryView {
            pdu: d.pdu.clone(),
            port_id: d.port_id.as_str().to_string(),
            date: d.date,
            timeout: d.timeout.as_secs_f64(),
            started_at,
            expires_in,
        })
    }

    /// Starts a discovery on `pdu`/`port_id`: refused (409) while another
    /// runs, or when the port is reserved, assigned to a DUT or already
    /// ON; 404 for an unknown PDU or port. The port is switched ON; the
    /// discovery expires after `timeout` (default 150 s), switching the
    /// port OFF again. Returns the timeout.
    pub async fn start_discovery(
        self: &Arc<Self>,
        pdu: &str,
        port_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Duration, FarmError> {
        let timeout = timeout.unwrap_or(self.options.discovery_timeout);
        let port = PortId::new(port_id);
        let handle = {
            let _w = self.write_lock.lock().await;
            let db = self.db.snapshot();
            let Some(pdu_entry) = db.pdus.get(pdu) else {
                return Err(FarmError::NotFound(format!("PDU \"{pdu}\" does not exist")));
            };
            let handle = self
                .pdus
                .get(pdu)
                .ok_or_else(|| FarmError::NotFound(format!("PDU \"{pdu}\" does not exist")))?;
            let snap = handle.snapshot();
            let Some(port_snap) = snap.ports.get(port_id) else {
                if snap.ports.is_empty() {
                    return Err(FarmError::Conflict(format!(
                        "PDU \"{pdu}\" is not ready ({:?}{}), its ports are unknown",
                        snap.state,
                        snap.error.map(|e| format!(": {e}")).unwrap_or_default()
                    )));
                }
                return Err(FarmError::NotFound(format!(
                    "Port {port_id} does not exist on PDU \"{pdu}\""
                )));
            };
            let mut rt = self.runtime.lock().unwrap();
            if rt.discovery.is_some() || rt.discovery_pending {
                return Err(FarmError::Conflict(
                    "There is a discovery process running already.".into(),
                ));
            }
            if let Some((_, dut)) = db.dut_on_port(pdu, &port) {
                return Err(FarmError::Conflict(format!(
                    "Port {port_id} on PDU \"{pdu}\" is already assigned to the DUT {}",
                    dut.mac_address
                )));
            }
            if pdu_entry.is_reserved(&port) || port_snap.reserved {
                return Err(FarmError::Conflict(format!(
                    "Port {port_id} on PDU \"{pdu}\" is reserved"
                )));
            }
            if port_snap.state == PortState::On {
                return Err(FarmError::Conflict(format!(
                    "Port {port_id} on PDU \"{pdu}\" is already ON (in use?)"
                )));
            }
            rt.discovery_pending = true;
            handle
        };
        self.bump();
        let res = handle.set_port_state(port_id, PortState::On).await;
        let _w = self.write_lock.lock().await;
        let mut rt = self.runtime.lock().unwrap();
        rt.discovery_pending = false;
        if let Err(e) = res {
            drop(rt);
            self.bump();
            return Err(pdu_err(e));
        }
        rt.discovery_epoch += 1;
        let epoch = rt.discovery_epoch;
        rt.discovery = Some(Discovery {
            pdu: pdu.to_string(),
            port_id: port.clone(),
            date: Utc::now(),
            timeout,
            started: Instant::now(),
            epoch,
        });
        drop(rt);
        tracing::info!(%pdu, port = %port_id, ?timeout, "discovery started");
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if let Some(farm) = weak.upgrade() {
                farm.expire_discovery(epoch).await;
            }
        });
        self.bump();
        Ok(timeout)
    }

    /// The expiry of discovery `epoch`: if it is still the running one, it
    /// is dropped and its port switched OFF (unless a DUT took the port or
    /// it got reserved in the meantime).
    async fn expire_discovery(self: &Arc<Self>, epoch: u64) {
        let taken = {
            let _w = self.write_lock.lock().await;
            let mut rt = self.runtime.lock().unwrap();
            match &rt.discovery {
                Some(d) if d.epoch == epoch => rt.discovery.take(),
                _ => None,
            }
        };
        let Some(d) = taken else { return };
        tracing::warn!(pdu = %d.pdu, port = %d.port_id, "discovery timed out with no machine registered: switching the port OFF");
        self.bump();
        self.switch_off_if_free(&d.pdu, &d.port_id).await;
    }

    /// Switches a port OFF unless it is reserved or assigned to a DUT.
    /// Returns why it was left alone, if it was.
    async fn switch_off_if_free(&self, pdu: &str, port: &PortId) -> Option<String> {
        let db = self.db.snapshot();
        if db.pdus.get(pdu).is_some_and(|p| p.is_reserved(port)) {
            return Some(format!("port {port} on PDU \"{pdu}\" is reserved"));
        }
        if let Some((id, _)) = db.dut_on_port(pdu, port) {
            return Some(format!(
                "port {port} on PDU \"{pdu}\" is now assigned to the DUT {id}"
            ));
        }
        let h = self.pdus.get(pdu)?;
        if let Err(e) = h.set_port_state(port.as_str(), PortState::Off).await {
            tracing::error!(%pdu, %port, "cannot switch the discovery port OFF: {e}");
            return Some(format!("switching it OFF failed: {e}"));
        }
        None
    }

    /// Cancels the running discovery (409 if none) and switches its port
    /// OFF, unless the port got reserved or assigned to a DUT meanwhile
    /// (then it is left as is, and the message says so).
    pub async fn cancel_discovery(&self) -> Result<String, FarmError> {
        let d = {
            let _w = self.write_lock.lock().await;
            let mut rt = self.runtime.lock().unwrap();
            if rt.discovery_pending {
                return Err(FarmError::Conflict(
                    "The discovery process is still switching its port ON; try again".into(),
                ));
            }
            rt.discovery.take().ok_or_else(|| {
                FarmError::Conflict("There are no discovery processes in progress.".into())
            })?
        };
        self.bump();
        match self.switch_off_if_free(&d.pdu, &d.port_id).await {
            None => Ok("Discovery process canceled and port turned OFF.".to_string()),
            Some(why) => Ok(format!(
                "Discovery process canceled; the port was left as is: {why}."
            )),
        }
    }

    /// Takes the running discovery (registration consumes it).
    pub(crate) fn take_discovery(&self) -> Option<Discovery> {
        self.runtime.lock().unwrap().discovery.take()
    }

    /// Puts back a discovery taken by a registration that then failed.
    pub(crate) fn restore_discovery(&self, d: Discovery) {
        let mut rt = self.runtime.lock().unwrap();
        if rt.discovery.is_none() {
            rt.discovery = Some(d);
        }
    }
}
