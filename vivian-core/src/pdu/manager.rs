//! The PDUs of a farm, built from MarsDB and kept in step with its edits.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{DriverRegistry, PduError, PduHandle, PduOptions, PduSnapshot};

/// A PDU as MarsDB describes it (`pdus.<name>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PduSpec {
    /// The PDU's name (the MarsDB key).
    pub name: String,
    /// The registry name of the driver.
    pub driver: String,
    /// The driver's configuration, verbatim.
    #[serde(default)]
    pub config: serde_json::Value,
    /// Ports that refuse changes (ids as strings).
    #[serde(default)]
    pub reserved_port_ids: Vec<String>,
    /// Hidden PDUs are not polled in the background.
    #[serde(default)]
    pub hidden: bool,
}

struct Entry {
    spec: PduSpec,
    handle: PduHandle,
}

/// Owns every PDU of the farm: one [`PduHandle`] (one task) per PDU.
///
/// [`PduManager::sync`] takes the PDU entries of MarsDB each time it is
/// (re)loaded: new PDUs are started, removed ones stopped, a PDU whose
/// driver or config changed is restarted, and a PDU whose only change is
/// its reserved ports keeps its task.
pub struct PduManager {
    registry: Arc<DriverRegistry>,
    options: PduOptions,
    pdus: Mutex<IndexMap<String, Entry>>,
}

impl std::fmt::Debug for PduManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PduManager")
            .field("pdus", &self.names())
            .finish()
    }
}

impl PduManager {
    /// A manager with no PDU, building drivers from `registry`.
    pub fn new(registry: Arc<DriverRegistry>, options: PduOptions) -> Self {
        Self {
            registry,
            options,
            pdus: Mutex::new(IndexMap::new()),
        }
    }

    /// The driver registry.
    pub fn registry(&self) -> &DriverRegistry {
        &self.registry
    }

    /// Brings the PDUs in line with `specs` (all PDUs of MarsDB). Returns
    /// the errors of drivers that could not be built; such PDUs are still
    /// listed, in ERROR with that error text. Must be called within a Tokio
    /// runtime.
    pub async fn sync(&self, specs: impl IntoIterator<Item = PduSpec>) -> Vec<PduError> {
        let mut errors = Vec::new();
        let mut to_stop = Vec::new();
        let mut to_update = Vec::new();
        {
            let mut pdus = self.pdus.lock().unwrap();
            let mut old = std::mem::take(&mut *pdus);
            for spec in specs {
                let reuse = match old.shift_remove(&spec.name) {
                    Some(entry)
                        if entry.spec.driver == spec.driver
                            && entry.spec.config == spec.config
                            && entry.spec.hidden == spec.hidden =>
                    {
                        Some(entry)
                    }
                    Some(entry) => {
                        to_stop.push(entry.handle);
                        None
                    }
                    None => None,
                };
                let entry = match reuse {
                    Some(mut entry) => {
                        if as_set(&entry.spec.reserved_port_ids) != as_set(&spec.reserved_port_ids)
                        {
                            to_update.push((entry.handle.clone(), spec.reserved_port_ids.clone()));
                        }
                        entry.spec = spec;
                        entry
                    }
                    None => {
                        let handle = self.start(&spec, &mut errors);
                        Entry { spec, handle }
                    }
                };
                pdus.insert(entry.spec.name.clone(), entry);
            }
            to_stop.extend(old.into_values().map(|e| {
                info!(pdu = %e.spec.name, "PDU removed");
                e.handle
            }));
        }
        for handle in to_stop {
            handle.stop().await;
        }
        for (handle, ids) in to_update {
            handle.replace_reserved(ids).await;
        }
        errors
    }

    fn start(&self, spec: &PduSpec, errors: &mut Vec<PduError>) -> PduHandle {
        let mut options = self.options.clone();
        if spec.hidden {
            options.poll = false;
        }
        let reserved = spec.reserved_port_ids.clone();
        info!(pdu = %spec.name, driver = %spec.driver, "starting PDU");
        match self.registry.build(&spec.name, &spec.driver, &spec.config) {
            Ok(driver) => PduHandle::spawn(spec.name.clone(), driver, reserved, options),
            Err(e) => {
                errors.push(e.clone());
                PduHandle::spawn_failed(spec.name.clone(), e, reserved, options)
            }
        }
    }

    /// The PDU of that name.
    pub fn get(&self, name: &str) -> Option<PduHandle> {
        self.pdus
            .lock()
            .unwrap()
            .get(name)
            .map(|e| e.handle.clone())
    }

    /// The MarsDB entry a PDU was built from.
    pub fn spec(&self, name: &str) -> Option<PduSpec> {
        self.pdus.lock().unwrap().get(name).map(|e| e.spec.clone())
    }

    /// The PDU names, in MarsDB order.
    pub fn names(&self) -> Vec<String> {
        self.pdus.lock().unwrap().keys().cloned().collect()
    }

    /// Every PDU's cached snapshot, by name, in MarsDB order (hidden PDUs
    /// included; see [`PduManager::spec`]).
    pub fn snapshots(&self) -> IndexMap<String, PduSnapshot> {
        self.pdus
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| (n.clone(), e.handle.snapshot()))
            .collect()
    }

    /// Stops every PDU.
    pub async fn shutdown(&self) {
        let handles: Vec<PduHandle> = {
            let mut pdus = self.pdus.lock().unwrap();
            std::mem::take(&mut *pdus)
                .into_values()
                .map(|e| e.handle)
                .collect()
        };
        for h in handles {
            h.stop().await;
        }
    }
}

fn as_set(ids: &[String]) -> BTreeSet<&str> {
    ids.iter().map(String::as_str).collect()
}
