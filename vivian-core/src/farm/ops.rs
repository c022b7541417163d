//! The farm's mutations: DUT registration (EX A.2), PATCH (A.4), removal
//! (A.5), quick checks (A.6), job cancellation (A.7) and port changes
//! (A.13). Each validates all its input first; MarsDB changes are atomic.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::{DutState, Farm, FarmError};
use crate::marsdb::{Dut, MacAddr, MarsDbExt, PortId};
use crate::pdu::{PduError, PortState};

/// The JSON type of a value, for error messages ("a boolean", ...).
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A 400 error: the field `name` must be `expected`, not what `v` is.
pub fn wrong(name: &str, expected: &str, v: &Value) -> FarmError {
    FarmError::Invalid(format!(
        "The field '{name}' must be {expected}, not {}",
        json_type_name(v)
    ))
}

/// Field `name` as a string.
pub fn get_string(name: &str, v: &Value) -> Result<String, FarmError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| wrong(name, "a string", v))
}

/// Field `name` as a string or null.
pub fn get_opt_string(name: &str, v: &Value) -> Result<Option<String>, FarmError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        _ => Err(wrong(name, "a string or null", v)),
    }
}

/// Field `name` as a boolean.
pub fn get_bool(name: &str, v: &Value) -> Result<bool, FarmError> {
    v.as_bool().ok_or_else(|| wrong(name, "a boolean", v))
}

/// Field `name` as a list of strings.
pub fn get_tags(name: &str, v: &Value) -> Result<Vec<String>, FarmError> {
    let arr = v
        .as_array()
        .ok_or_else(|| wrong(name, "a list of strings", v))?;
    arr.iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str().map(str::to_owned).ok_or_else(|| {
                FarmError::Invalid(format!(
                    "The field '{name}' must be a list of strings: item {i} is {}",
                    json_type_name(item)
                ))
            })
        })
        .collect()
}

fn parse_mac(name: &str, s: &str) -> Result<MacAddr, FarmError> {
    s.parse().map_err(|_| {
        FarmError::Invalid(format!(
            "The field '{name}' must be a MAC address (like 52:54:00:11:22:0a), got {s:?}"
        ))
    })
}

/// The fields of a registration (`POST|PUT /api/v1/dut/`, EX A.2), typed.
/// Absent fields are `None`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DutRegistration {
    /// The DUT id (a MAC address); defaults to `mac_address`.
    pub id: Option<MacAddr>,
    /// Base name (required at creation).
    pub base_name: Option<String>,
    /// Tags (required at creation).
    pub tags: Option<Vec<String>>,
    /// Manual tags.
    pub manual_tags: Option<Vec<String>>,
    /// MAC address (defaults to the id).
    pub mac_address: Option<MacAddr>,
    /// IPv4 address (required at creation).
    pub ip_address: Option<Ipv4Addr>,
    /// Serial console device (`null` clears it).
    pub local_tty_device: Option<Option<String>>,
    /// Ready for service.
    pub ready_for_service: Option<bool>,
    /// Retired.
    pub is_retired: Option<bool>,
}

impl DutRegistration {
    /// The keys a registration may set.
    pub const ALLOWED: &'static [&'static str] = &[
        "id",
        "base_name",
        "tags",
        "manual_tags",
        "mac_address",
        "ip_address",
        "local_tty_device",
        "ready_for_service",
        "is_retired",
    ];

    /// Validates a JSON object: only [`DutRegistration::ALLOWED`] keys,
    /// each with its type; the id (or the MAC) is required.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, FarmError> {
        let mut r = DutRegistration::default();
        for (k, v) in obj {
            match k.as_str() {
                "id" => r.id = Some(parse_mac("id", &get_string(k, v)?)?),
                "base_name" => {
                    let s = get_string(k, v)?;
                    if s.trim().is_empty() {
                        return Err(FarmError::Invalid(
                            "The field 'base_name' cannot be empty".into(),
                        ));
                    }
                    r.base_name = Some(s);
                }
                "tags" => r.tags = Some(get_tags(k, v)?),
                "manual_tags" => r.manual_tags = Some(get_tags(k, v)?),
                "mac_address" => r.mac_address = Some(parse_mac(k, &get_string(k, v)?)?),
                "ip_address" => {
                    let s = get_string(k, v)?;
                    r.ip_address = Some(s.parse().map_err(|_| {
                        FarmError::Invalid(format!(
                            "The field 'ip_address' must be an IPv4 address, got {s:?}"
                        ))
                    })?)
                }
                "local_tty_device" => r.local_tty_device = Some(get_opt_string(k, v)?),
                "ready_for_service" => r.ready_for_service = Some(get_bool(k, v)?),
                "is_retired" => r.is_retired = Some(get_bool(k, v)?),
                other => {
                    return Err(FarmError::Invalid(format!(
                        "The field '{other}' cannot be set/modified (allowed: {})",
                        Self::ALLOWED.join(", ")
                    )))
                }
            }
        }
        if r.id.is_none() && r.mac_address.is_none() {
            return Err(FarmError::Invalid(
                "The fields 'id' and 'mac_address' are both missing: one is required".into(),
            ));
        }
        Ok(r)
    }

    /// The DUT id: `id`, else `mac_address`.
    pub fn dut_id(&self) -> Option<MacAddr> {
        self.id.or(self.mac_address)
    }
}

/// The fields of `PATCH /api/v1/dut/<id>` (EX A.4), typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DutPatch {
    /// Admin comment (`null` clears it).
    pub comment: Option<Option<String>>,
    /// Retired.
    pub is_retired: Option<bool>,
    /// Minimum off time of the DUT's port, seconds (>= 0).
    pub pdu_off_delay: Option<f64>,
    /// Ready for service.
    pub ready_for_service: Option<bool>,
    /// Manual tags (replaced as a whole).
    pub manual_tags: Option<Vec<String>>,
}

impl DutPatch {
    /// The keys a PATCH may set.
    pub const ALLOWED: &'static [&'static str] = &[
        "comment",
        "is_retired",
        "pdu_off_delay",
        "ready_for_service",
        "manual_tags",
    ];

    /// Validates a JSON object: only [`DutPatch::ALLOWED`] keys, each with
    /// its type.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, FarmError> {
        let mut p = DutPatch::default();
        for (k, v) in obj {
            match k.as_str() {
                "comment" => p.comment = Some(get_opt_string(k, v)?),
                "is_retired" => p.is_retired = Some(get_bool(k, v)?),
                "pdu_off_delay" => {
                    let f = v
                        .as_f64()
                        .filter(|f| f.is_finite())
                        .ok_or_else(|| wrong(k, "a number of seconds", v))?;
                    if f < 0.0 {
                        return Err(FarmError::Invalid(format!(
                            "The field 'pdu_off_delay' must be >= 0, got {f}"
                        )));
                    }
                    p.pdu_off_delay = Some(f);
                }
                "ready_for_service" => p.ready_for_service = Some(get_bool(k, v)?),
                "manual_tags" => p.manual_tags = Some(get_tags(k, v)?),
                other => {
                    return Err(FarmError::Invalid(format!(
                        "The field '{other}' cannot be set/modified (allowed: {})",
                        Self::ALLOWED.join(", ")
                    )))
                }
            }
        }
        Ok(p)
    }
}

/// The fields of `PATCH /api/v1/pdu/<name>/port/<id>` (EX A.13), typed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortPatch {
    /// Switch the port ON or OFF.
    pub state: Option<PortState>,
    /// Reserve or free the port (persisted in MarsDB).
    pub reserved: Option<bool>,
}

impl PortPatch {
    /// Validates a JSON object: `state` is "on"/"off" (any case);
    /// `reserved` a boolean or the string "true"/"false" (any case); at
    /// least one of them.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, FarmError> {
        let mut p = PortPatch::default();
        for (k, v) in obj {
            match k.as_str() {
                "state" => {
                    let s = v.as_str().ok_or_else(|| wrong(k, "\"on\" or \"off\"", v))?;
                    p.state = Some(match s.to_ascii_lowercase().as_str() {
                        "on" => PortState::On,
                        "off" => PortState::Off,
                        _ => {
                            return Err(FarmError::Invalid(format!(
                                "The field 'state' must be \"on\" or \"off\", got {s:?}"
                            )))
                        }
                    });
                }
                "reserved" => {
                    p.reserved = Some(match v {
                        Value::Bool(b) => *b,
                        Value::String(s) if s.eq_ignore_ascii_case("true") => true,
                        Value::String(s) if s.eq_ignore_ascii_case("false") => false,
                        _ => {
                            return Err(FarmError::Invalid(format!(
                                "The field 'reserved' must be true or false, got {v}"
                            )))
                        }
                    });
                }
                other => {
                    return Err(FarmError::Invalid(format!(
                        "The field '{other}' is invalid (allowed: state, reserved)"
                    )))
                }
            }
        }
        if p.state.is_none() && p.reserved.is_none() {
            return Err(FarmError::Invalid(
                "Nothing to change: give 'state' and/or 'reserved'".into(),
            ));
        }
        Ok(p)
    }
}

fn pdu_err(e: PduError) -> FarmError {
    match e {
        PduError::UnknownPort { .. } => FarmError::NotFound(e.to_string()),
        PduError::PortReserved { .. } => FarmError::Conflict(e.to_string()),
        _ => FarmError::Pdu(e.to_string()),
    }
}

impl Farm {
    /// Resolves a DUT id or full name to its id and full name (404 else).
    pub fn resolve_dut(&self, key: &str) -> Result<(MacAddr, String), FarmError> {
        let db = self.db.snapshot();
        let (id, _) = db
            .find_dut(key, self.farm_name())
            .ok_or_else(|| FarmError::NotFound(format!("Unknown machine ID '{key}'")))?;
        let name = db.full_name(id, self.farm_name()).unwrap_or_default();
        Ok((*id, name))
    }

    /// Registers a DUT (EX A.2): creates it (consuming a running discovery:
    /// `pdu`, `pdu_port_id`, and `pdu_off_delay` from the driver's default
    /// minimum off time) or merges the given fields into the known one.
    /// Returns the id and whether it was created.
    pub async fn register_dut(&self, reg: DutRegistration) -> Result<(MacAddr, bool), FarmError> {
        let id = reg
            .dut_id()
            .ok_or_else(|| FarmError::Invalid("The DUT id is missing".into()))?;
        let _w = self.write_lock.lock().await;
        let db = self.db.snapshot();
        let creating = !db.duts.contains_key(&id);
        if creating {
            let mut missing = Vec::new();
            if reg.base_name.is_none() {
                missing.push("base_name");
            }
            if reg.ip_address.is_none() {
                missing.push("ip_address");
            }
            if reg.tags.is_none() {
                missing.push("tags");
            }
            if !missing.is_empty() {
                return Err(FarmError::Invalid(format!(
                    "Cannot create the DUT {id}: missing field(s) {}",
                    missing.join(", ")
                )));
            }
        }
        let discovery = if creating {
            self.take_discovery()
        } else {
            None
        };
        // Where the discovery leads, from the PDU's cached snapshot.
        let wiring = discovery.as_ref().and_then(|d| {
            let snap = self.pdus.get(&d.pdu)?.snapshot();
            let port = snap.ports.get(d.port_id.as_str())?;
            Some((d.pdu.clone(), d.port_id.clone(), port.min_off_time))
        });
        if let (Some(d), None) = (&discovery, &wiring) {
            tracing::error!(pdu = %d.pdu, port = %d.port_id, "the discovery's PDU port is gone: registering {id} without a PDU");
        }
        if creating && discovery.is_none() {
            tracing::warn!(dut = %id, "a new DUT registered with no discovery running: it waits for its PDU to be configured");
        }
        let reg2 = reg.clone();
        let wiring2 = wiring.clone();
        let res = self
            .db
            .update(move |db| {
                let reg = reg2;
                let dut = match db.duts.get_mut(&id) {
                    Some(d) => d,
                    None => {
                        let mut d = Dut::new(
                            reg.mac_address.unwrap_or(id),
                            reg.base_name.clone().unwrap_or_default(),
                            reg.ip_address.unwrap_or(Ipv4Addr::UNSPECIFIED),
                            reg.tags.clone().unwrap_or_default(),
                        );
                        if let Some((pdu, port, off)) = wiring2 {
                            d.pdu = Some(pdu);
                            d.pdu_port_id = Some(port);
                            d.pdu_off_delay = off;
                        }
                        db.duts.insert(id, d);
                        db.duts.get_mut(&id).expect("just inserted")
                    }
                };
                if let Some(v) = reg.base_name {
                    dut.base_name = v;
                }
                if let Some(v) = reg.tags {
                    dut.tags = v;
                }
                if let Some(v) = reg.manual_tags {
                    dut.manual_tags = v;
                }
                if let Some(v) = reg.mac_address {
                    dut.mac_address = v;
                }
                if let Some(v) = reg.ip_address {
                    dut.ip_address = v;
                }
                if let Some(v) = reg.local_tty_device {
                    dut.local_tty_device = v;
                }
                if let Some(v) = reg.ready_for_service {
                    dut.ready_for_service = v;
                }
                if let Some(v) = reg.is_retired {
                    dut.is_retired = v;
                }
                Ok::<_, FarmError>(())
            })
            .await;
        match res {
            Ok(()) => {
                if let Some(d) = &discovery {
                    tracing::info!(dut = %id, pdu = %d.pdu, port = %d.port_id, "discovery consumed by the registration");
                }
                self.after_write();
                Ok((id, creating))
            }
            Err(e) => {
                if let Some(d) = discovery {
                    self.restore_discovery(d);
                }
                Err(e.into())
            }
        }
    }

    /// Applies a PATCH (EX A.4) to a DUT. Un-retiring queues a quick check;
    /// retiring it, or making it ready, while it trains or quick-checks
    /// cancels that job (see [`Farm`]'s MarsDB sync). Returns the
    /// reference's answer text.
    pub async fn patch_dut(&self, key: &str, patch: DutPatch) -> Result<String, FarmError> {
        let _w = self.write_lock.lock().await;
        let (id, full_name) = self.resolve_dut(key)?;
        if !self.db.snapshot().duts.contains_key(&id) {
            return Err(FarmError::NotFound(format!("Unknown machine ID '{key}'")));
        }
        let p = patch.clone();
        self.db
            .update(move |db| {
                let dut = db
                    .duts
                    .get_mut(&id)
                    .ok_or_else(|| FarmError::NotFound(format!("Unknown machine ID '{id}'")))?;
                if let Some(v) = p.comment {
                    dut.comment = v;
                }
                if let Some(v) = p.is_retired {
                    dut.is_retired = v;
                }
                if let Some(v) = p.pdu_off_delay {
                    dut.pdu_off_delay = v;
                }
                if let Some(v) = p.ready_for_service {
                    dut.ready_for_service = v;
                }
                if let Some(v) = p.manual_tags {
                    dut.manual_tags = v;
                }
                Ok::<_, FarmError>(())
            })
            .await?;
        // Side effects (a quick check queued on activation, a training or
        // quick-check job cancelled on retirement, ...) are applied by the
        // sync with MarsDB, the same way for API changes and file edits.
        self.after_write();
        let mut changes = Map::new();
        if let Some(v) = &patch.comment {
            changes.insert(
                "comment".into(),
                v.clone().map_or(Value::Null, Value::String),
            );
        }
        if let Some(v) = patch.is_retired {
            changes.insert("is_retired".into(), Value::Bool(v));
        }
        if let Some(v) = patch.pdu_off_delay {
            changes.insert("pdu_off_delay".into(), serde_json::json!(v));
        }
        if let Some(v) = patch.ready_for_service {
            changes.insert("ready_for_service".into(), Value::Bool(v));
        }
        if let Some(v) = &patch.manual_tags {
            changes.insert("manual_tags".into(), serde_json::json!(v));
        }
        Ok(format!("Updated {full_name}: {}\n", Value::Object(changes)))
    }

    /// Removes a DUT from MarsDB (EX A.5) and cancels its job.
    pub async fn remove_dut(&self, key: &str) -> Result<String, FarmError> {
        let _w = self.write_lock.lock().await;
        let (id, full_name) = self.resolve_dut(key)?;
        self.db
            .update(move |db| {
                db.duts
                    .shift_remove(&id)
                    .map(|_| ())
                    .ok_or_else(|| FarmError::NotFound(format!("Unknown machine ID '{id}'")))
            })
            .await?;
        {
            let mut rt = self.runtime.lock().unwrap();
            if let Some(r) = rt.duts.remove(&id) {
                if let Some(job) = r.job {
                    tracing::info!(dut = %id, job = %job.job_id, "DUT removed: cancelling its job");
                    job.cancel.cancel();
                }
            }
        }
        self.after_write();
        tracing::info!(dut = %id, "DUT removed");
        Ok(format!("The machine {full_name} was removed\n"))
    }

    /// Whether a quick check is queued for the DUT.
    pub fn quick_check_queued(&self, key: &str) -> Result<bool, FarmError> {
        let (id, _) = self.resolve_dut(key)?;
        Ok(self
            .runtime
            .lock()
            .unwrap()
            .duts
            .get(&id)
            .is_some_and(|r| r.quick_check_queued))
    }

    /// Queues a quick check (idempotent).
    pub async fn queue_quick_check(&self, key: &str) -> Result<String, FarmError> {
        let _w = self.write_lock.lock().await;
        let (id, full_name) = self.resolve_dut(key)?;
        self.runtime
            .lock()
            .unwrap()
            .duts
            .entry(id)
            .or_default()
            .quick_check_queued = true;
        self.bump();
        Ok(format!("Quick check queued for machine {full_name}\n"))
    }

    /// Cancels the job queued or running on the DUT (including training
    /// and quick-check jobs); 409 when it has none.
    pub async fn cancel_job(&self, key: &str) -> Result<String, FarmError> {
        let (id, full_name) = self.resolve_dut(key)?;
        let job = self
            .runtime
            .lock()
            .unwrap()
            .duts
            .get(&id)
            .and_then(|r| r.job.clone());
        match job {
            Some(job) => {
                tracing::warn!(dut = %id, job = %job.job_id, "The job got cancelled at the infra admin's request");
                job.cancel.cancel();
                self.bump();
                Ok(format!("Canceling current job in machine {full_name}\n"))
            }
            None => {
                let state = self.dut_state(&id).unwrap_or(DutState::WaitForConfig);
                Err(FarmError::Conflict(format!(
                    "Machine {full_name} isn't running a job. Current state is {state}"
                )))
            }
        }
    }

    /// Switches a port ON/OFF and/or reserves or frees it (EX A.13; the
    /// reservation is persisted in MarsDB). Refused (409) on a reserved
    /// port unless the request changes the reservation, and on a port used
    /// by a DUT that is not retired.
    pub async fn patch_port(
        self: &Arc<Self>,
        pdu: &str,
        port_id: &str,
        patch: PortPatch,
    ) -> Result<String, FarmError> {
        let port = PortId::new(port_id);
        let handle = {
            let _w = self.write_lock.lock().await;
            let db = self.db.snapshot();
            let entry = db
                .pdus
                .get(pdu)
                .ok_or_else(|| FarmError::NotFound(format!("PDU \"{pdu}\" does not exist")))?;
            let handle = self
                .pdus
                .get(pdu)
                .ok_or_else(|| FarmError::NotFound(format!("PDU \"{pdu}\" does not exist")))?;
            let snap = handle.snapshot();
            if !snap.ports.contains_key(port_id) {
                if snap.ports.is_empty() {
                    return Err(FarmError::Conflict(format!(
                        "PDU \"{pdu}\" is not ready, its ports are unknown"
                    )));
                }
                return Err(FarmError::NotFound(format!(
                    "Port {port_id} does not exist on PDU \"{pdu}\""
                )));
            }
            let reserved = entry.is_reserved(&port);
            if reserved && patch.reserved.is_none() {
                return Err(FarmError::Conflict(format!(
                    "The port {port_id} on PDU \"{pdu}\" is reserved!"
                )));
            }
            if let Some((id, dut)) = db.dut_on_port(pdu, &port) {
                if !dut.is_retired {
                    let name = db.full_name(id, self.farm_name()).unwrap_or_default();
                    return Err(FarmError::Conflict(format!(
                        "It's not possible to modify port {port_id} on PDU \"{pdu}\": it is in use by the machine {name}, which is not retired"
                    )));
                }
            }
            if patch.reserved == Some(false) && reserved {
                self.persist_reservation(pdu, &port, false).await?;
                let _ = handle.set_reserved(port_id, false).await;
            }
            handle
        };
        let mut out = String::new();
        if let Some(state) = patch.state {
            handle
                .set_port_state(port_id, state)
                .await
                .map_err(pdu_err)?;
            out.push_str(&format!(
                "Turning {} port {port_id} on PDU \"{pdu}\"\n",
                state.name().to_ascii_lowercase()
            ));
        }
        match patch.reserved {
            Some(true) => {
                let _w = self.write_lock.lock().await;
                self.persist_reservation(pdu, &port, true).await?;
                let _ = handle.set_reserved(port_id, true).await;
                out.push_str(&format!("Port {port_id} on PDU \"{pdu}\" is reserved\n"));
            }
            Some(false) => {
                out.push_str(&format!(
                    "Port {port_id} on PDU \"{pdu}\" is not reserved\n"
                ));
            }
            None => {}
        }
        self.bump();
        Ok(out)
    }

    async fn persist_reservation(
        &self,
        pdu: &str,
        port: &PortId,
        reserved: bool,
    ) -> Result<(), FarmError> {
        let pdu = pdu.to_string();
        let port = port.clone();
        self.db
            .update(move |db| {
                let entry = db
                    .pdus
                    .get_mut(&pdu)
                    .ok_or_else(|| FarmError::NotFound(format!("PDU \"{pdu}\" does not exist")))?;
                if reserved {
                    entry.reserved_port_ids.insert(port);
                } else {
                    entry.reserved_port_ids.shift_remove(&port);
                }
                Ok::<_, FarmError>(())
            })
            .await?;
        self.after_write();
        Ok(())
    }

    /// After a MarsDB write: sync the runtime records now (so the next read
    /// sees them) and bump the generation.
    pub(super) fn after_write(&self) {
        let db = self.db.snapshot();
        self.sync_runtime(&db);
        self.bump();
    }

    /// The minimum off time the PDU gives a port no DUT configured.
    pub fn port_min_off_time(&self, pdu: &str, port: &str) -> Option<Duration> {
        let snap = self.pdus.get(pdu)?.snapshot();
        snap.ports
            .get(port)
            .map(|p| Duration::from_secs_f64(p.min_off_time.max(0.0)))
    }
}
