//! Read-only views of the farm: the DUT, PDU and full-state objects of the
//! REST API (EX A.1, A.10, A.14), built from memory only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use indexmap::IndexMap;
use serde::Serialize;

use super::{DutRuntime, Farm, JobKind, JobPhase};
use crate::marsdb::{Database, Dut, MacAddr};
use crate::pdu::PduSnapshot;

pub use crate::state::DutState;

/// Computes a DUT's state (EX D.1, V2024 rules): a job decides first (a
/// training job shows TRAINING, a quick check QUICK_CHECK, a user job
/// QUEUED or RUNNING); otherwise the START rules of the transition table
/// ([`crate::state::start_state`]) apply to the DUT's facts, QUICK_CHECK
/// only while a quick check is queued.
///
/// The state is derived rather than stored because its inputs change
/// asynchronously (MarsDB edits, a PDU listing its ports); job operations
/// are checked against [`crate::state::TRANSITIONS`] from this state.
pub fn compute_state(dut: &Dut, rt: Option<&DutRuntime>, has_port: bool) -> DutState {
    if let Some(job) = rt.and_then(|r| r.job.as_ref()) {
        return match (job.kind, job.phase) {
            (JobKind::Training, _) => DutState::Training,
            (JobKind::QuickCheck, _) => DutState::QuickCheck,
            (JobKind::User, JobPhase::Queued) => DutState::Queued,
            (JobKind::User, JobPhase::Running) => DutState::Running,
        };
    }
    let facts = crate::state::DutFacts {
        has_pdu_port: has_port,
        is_retired: dut.is_retired,
        ready_for_service: dut.ready_for_service,
        quick_check_enabled: true,
    };
    match crate::state::start_state(&facts) {
        DutState::QuickCheck if !rt.is_some_and(|r| r.quick_check_queued) => DutState::Idle,
        s => s,
    }
}

/// State of the training helper (Sergent Hartman) for one DUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrainingState {
    /// Not training.
    #[default]
    Idle,
    /// Registering and running the qualification boot loops.
    Enrolling,
    /// Running a quick check.
    QuickCheck,
    /// Enrolling, but the last registration failed: waiting for
    /// `SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY` before the next try.
    RegistrationFailed,
}

/// One qualification boot loop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingLoop {
    /// The loop's job status (`PASS`, `FAIL`, ...).
    pub status: String,
    /// How long it took.
    pub seconds_elapsed: f64,
    /// Whether the DUT drew its boot sequence's power (V2025 power
    /// learning): always `null`, as the reference reports it for a PDU
    /// without power readings; none of our PDU drivers reads power.
    pub energy_consumed_check: Option<bool>,
    /// Whether the DUT's firmware booted: it fetched its boot script (iPXE
    /// or U-Boot) during the loop's last boot.
    pub firmware_booted_check: bool,
    /// Whether the DUT printed anything on its console after a power-on of
    /// the loop.
    pub console_data_received_check: bool,
    /// Whether a log of the loop was kept (loops that did not pass); it is
    /// served at `GET /api/v1/dut/<id>/training/loop/<n>`.
    pub has_log: bool,
    /// The kept log (console output and control messages), if any.
    #[serde(skip)]
    pub log: Option<Arc<str>>,
}

/// Training progress, shaped like EX A.1 `training` (V2025): only
/// `{"state": "IDLE"}` while inactive, the counters while active.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct TrainingInfo {
    /// What the helper is doing.
    pub state: TrainingState,
    /// Progress; absent while `state` is IDLE.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
}

/// Counters of an active training.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct TrainingProgress {
    /// The registration job succeeded.
    pub is_registered: bool,
    /// Boot loops to run (`SERGENT_HARTMAN_BOOT_COUNT`).
    pub boot_loop_counts: u32,
    /// PASSes needed (`SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT`).
    pub qualifying_rate: u32,
    /// Loops run so far.
    pub current_loop_count: u32,
    /// Count of loops per status.
    pub statuses: BTreeMap<String, u32>,
    /// Every job of the training so far, as the reference lists them: the
    /// registration at index 0 (the last attempt), then boot loop `n` at
    /// index `n`; a quick check lists its one boot loop at index 0.
    pub loops: Vec<TrainingLoop>,
}

/// `{"name": ..., "port_id": ...}` of a DUT object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DutPduRef {
    /// The PDU's name.
    pub name: Option<String>,
    /// The port id, as a string.
    pub port_id: Option<String>,
}

/// The DUT object of the API (EX A.1, V2024 shape).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DutView {
    /// The DUT id (its MAC address).
    pub id: String,
    /// Computed state.
    pub state: DutState,
    /// Qualified for jobs.
    pub ready_for_service: bool,
    /// Its PDU port resolves (the PDU lists it).
    pub has_pdu_assigned: bool,
    /// Serial console device on the gateway.
    pub local_tty_device: Option<String>,
    /// Tags found by registration.
    pub tags: Vec<String>,
    /// Tags set by the admin.
    pub manual_tags: Vec<String>,
    /// Base name.
    pub base_name: String,
    /// `<FARM_NAME>-<base_name>-<n>`.
    pub full_name: String,
    /// MAC address.
    pub mac_address: String,
    /// IPv4 address.
    pub ip_address: String,
    /// Retired by the admin.
    pub is_retired: bool,
    /// Training progress.
    pub training: TrainingInfo,
    /// PDU and port.
    pub pdu: DutPduRef,
    /// Minimum off time of its port, in seconds.
    pub pdu_off_delay: f64,
    /// Admin comment.
    pub comment: Option<String>,
    /// When it was first registered (RFC 3339, UTC).
    pub first_seen: chrono::DateTime<chrono::Utc>,
    /// Id of the job queued or running on it, if any.
    pub current_job: Option<String>,
    /// A quick check is queued.
    pub quick_check_queued: bool,
}

/// A PDU object of the API (EX A.10): ports, state, error.
pub type PduView = PduSnapshot;

/// A consistent view of the whole farm at one generation.
#[derive(Debug, Clone)]
pub struct FarmView {
    /// The generation it was built at ([`Farm::generation`]).
    pub generation: u64,
    /// The database it shows.
    pub db: Arc<Database>,
    /// The DUTs, in MarsDB order, by id.
    pub duts: IndexMap<MacAddr, DutView>,
    /// The PDUs, in MarsDB order, by name.
    pub pdus: IndexMap<String, PduView>,
    /// Full name → id, for lookups by full name.
    pub by_full_name: HashMap<String, MacAddr>,
    /// The MarsDB file's current error (an invalid edit), if any.
    pub db_error: Option<String>,
}

impl FarmView {
    /// Finds a DUT by id (a MAC in any accepted form) or full name.
    pub fn find_dut(&self, key: &str) -> Option<&DutView> {
        if let Ok(mac) = key.parse::<MacAddr>() {
            if let Some(v) = self.duts.get(&mac) {
                return Some(v);
            }
        }
        self.by_full_name.get(key).and_then(|id| self.duts.get(id))
    }
}

/// Full names of every DUT, computed in one pass (`n` counts DUTs of the
/// same base name with an earlier `first_seen`, ties by file order: the
/// rule of [`Database::full_name`]).
pub(crate) fn full_names(db: &Database, farm_name: &str) -> HashMap<MacAddr, String> {
    let mut groups: HashMap<&str, Vec<(usize, &MacAddr, &Dut)>> = HashMap::new();
    for (i, (id, dut)) in db.duts.iter().enumerate() {
        groups
            .entry(dut.base_name.as_str())
            .or_default()
            .push((i, id, dut));
    }
    let mut out = HashMap::with_capacity(db.duts.len());
    for (base, mut members) in groups {
        members.sort_by(|a, b| a.2.first_seen.cmp(&b.2.first_seen).then(a.0.cmp(&b.0)));
        for (n, (_, id, _)) in members.into_iter().enumerate() {
            out.insert(*id, format!("{farm_name}-{base}-{}", n + 1));
        }
    }
    out
}

impl Farm {
    /// Whether the PDU port of `dut` resolves in the cached PDU snapshots.
    pub(crate) fn port_resolves(pdus: &IndexMap<String, PduSnapshot>, dut: &Dut) -> bool {
        match dut.pdu_port() {
            Some((pdu, port)) => pdus
                .get(pdu)
                .is_some_and(|s| s.ports.contains_key(port.as_str())),
            None => false,
        }
    }

    /// Builds a view of the whole farm from memory (never waits on a PDU
    /// or a DUT).
    pub fn view(&self) -> FarmView {
        let generation = self.generation();
        let db = self.db.snapshot();
        let pdus = self.pdus.snapshots();
        let names = full_names(&db, self.farm_name());
        let rt = self.runtime.lock().unwrap();
        let mut duts = IndexMap::with_capacity(db.duts.len());
        for (id, dut) in &db.duts {
            let r = rt.duts.get(id);
            let has_port = Self::port_resolves(&pdus, dut);
            let full_name = names.get(id).cloned().unwrap_or_default();
            let state = compute_state(dut, r, has_port);
            // Sergent Hartman's progress belongs to a DUT that trains or is
            // quick-checked: derived from the state, it never shows next to
            // another one (the DUT leaves TRAINING in MarsDB a moment before
            // the helper clears its record).
            let training = match state {
                DutState::Training | DutState::QuickCheck => {
                    r.map(|r| r.training.clone()).unwrap_or_default()
                }
                _ => TrainingInfo::default(),
            };
            duts.insert(
                *id,
                DutView {
                    id: id.to_string(),
                    state,
                    ready_for_service: dut.ready_for_service,
                    has_pdu_assigned: has_port,
                    local_tty_device: dut.local_tty_device.clone(),
                    tags: dut.tags.clone(),
                    manual_tags: dut.manual_tags.clone(),
                    base_name: dut.base_name.clone(),
                    full_name,
                    mac_address: dut.mac_address.to_string(),
                    ip_address: dut.ip_address.to_string(),
                    is_retired: dut.is_retired,
                    training,
                    pdu: DutPduRef {
                        name: dut.pdu.clone(),
                        port_id: dut.pdu_port_id.as_ref().map(|p| p.as_str().to_string()),
                    },
                    pdu_off_delay: dut.pdu_off_delay,
                    comment: dut.comment.clone(),
                    first_seen: dut.first_seen,
                    current_job: r.and_then(|r| r.job.as_ref().map(|j| j.job_id.clone())),
                    quick_check_queued: r.is_some_and(|r| r.quick_check_queued),
                },
            );
        }
        drop(rt);
        let by_full_name = names.into_iter().map(|(id, n)| (n, id)).collect();
        // Only PDUs MarsDB lists, in its order.
        let mut ordered = IndexMap::with_capacity(db.pdus.len());
        let mut pdus = pdus;
        for name in db.pdus.keys() {
            if let Some(s) = pdus.shift_remove(name) {
                ordered.insert(name.clone(), s);
            }
        }
        FarmView {
            generation,
            db,
            duts,
            pdus: ordered,
            by_full_name,
            db_error: self.db.error().map(|e| e.to_string()),
        }
    }

    /// The state of one DUT, computed now.
    pub fn dut_state(&self, id: &MacAddr) -> Option<DutState> {
        let db = self.db.snapshot();
        let dut = db.duts.get(id)?;
        let pdus = self.pdus.snapshots();
        let rt = self.runtime.lock().unwrap();
        Some(compute_state(
            dut,
            rt.duts.get(id),
            Self::port_resolves(&pdus, dut),
        ))
    }
}
