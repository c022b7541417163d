//! The farm's runtime state: what the REST API reads and writes and what the
//! job engine drives.
//!
//! MarsDB holds what is persisted (the PDUs and DUTs of the farm); a
//! [`Farm`] adds what only lives while the executor runs:
//!
//! * one [`DutRuntime`] record per DUT: the queued quick check, the current
//!   job (with its cancellation token), the training progress;
//! * the single discovery slot ([`Discovery`]), with its active expiry that
//!   switches the port back OFF;
//! * the hand-over of accepted job submissions to a [`JobRunner`];
//! * Sergent Hartman ([`TrainingOptions`]): registration, training boot
//!   loops and quick checks, run as internal jobs of the [`JobRunner`].
//!
//! It also keeps the [`PduManager`] in step with MarsDB (PDUs started and
//! stopped, reserved ports, each DUT's `pdu_off_delay` as its port's minimum
//! off time).
//!
//! # Invariants
//!
//! * Reads never wait on a PDU or a DUT: [`Farm::view`] combines the current
//!   MarsDB snapshot, the PDU manager's cached snapshots and the runtime
//!   records, all in memory.
//! * Nothing polls per DUT: every change (MarsDB, a PDU snapshot, a runtime
//!   record) bumps one generation counter that readers and the job engine
//!   can watch ([`Farm::subscribe`], [`Farm::generation`]).
//! * A rejected request changes nothing: each mutation validates its whole
//!   input before it touches MarsDB, a PDU or a runtime record, and MarsDB
//!   changes are atomic.
//! * Mutations are serialised by one farm-wide lock; a PDU command made on
//!   behalf of a request (discovery, port PATCH) is not made under it.

mod discovery;
mod job;
mod ops;
mod training;
mod view;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::marsdb::{Database, MacAddr, MarsDb, MarsDbError, UpdateError};
use crate::pdu::{PduManager, PduSpec};

pub use discovery::{Discovery, DiscoveryView, DEFAULT_DISCOVERY_TIMEOUT};
pub use job::{
    select_dut, AcceptedJob, BootSpec, CancelToken, Candidate, InternalJob, InternalJobReport,
    JobKind, JobPhase, JobRunner, JobSubmission, JobTarget, NoJobEngine, RunningJob,
};
pub use ops::{DutPatch, DutRegistration, PortPatch};
pub use training::{JobTemplate, TrainingOptions, VAR_TRAINING_KIND, VAR_TRAINING_LOOP};

/// Typed accessors of JSON request fields whose errors name the field and
/// the expected type (shared by the farm's mutations and the REST layer).
pub mod field {
    pub use super::ops::{get_bool, get_opt_string, get_string, get_tags, json_type_name, wrong};
}
pub use view::{
    compute_state, DutPduRef, DutState, DutView, FarmView, PduView, TrainingInfo, TrainingLoop,
    TrainingProgress, TrainingState,
};

/// Why a farm operation was refused. Each variant maps to one HTTP status
/// in the REST API; the message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FarmError {
    /// Invalid input: a wrong type, an unknown or read-only field (400).
    #[error("{0}")]
    Invalid(String),
    /// An unknown DUT, PDU or port (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is understood but refused for its credentials (403),
    /// e.g. MinIO groups the submitter is not a member of.
    #[error("{0}")]
    Forbidden(String),
    /// No DUT matches the job's tags (406).
    #[error("{0}")]
    NoMatch(String),
    /// Valid, but it clashes with the current state (409): a busy DUT, a
    /// running discovery, a reserved or used port, an invalid MarsDB file.
    #[error("{0}")]
    Conflict(String),
    /// A PDU did not do what was asked (502).
    #[error("{0}")]
    Pdu(String),
    /// A service the request needs is not available (503), e.g. no job
    /// engine.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (500): I/O errors writing MarsDB.
    #[error("{0}")]
    Internal(String),
}

impl<E: Into<FarmError>> From<UpdateError<E>> for FarmError {
    fn from(e: UpdateError<E>) -> Self {
        match e {
            UpdateError::Rejected(e) => e.into(),
            UpdateError::Db(e) => e.into(),
        }
    }
}

impl From<MarsDbError> for FarmError {
    fn from(e: MarsDbError) -> Self {
        match e {
            MarsDbError::Invalid(v) => FarmError::Invalid(format!("Invalid value: {v}")),
            MarsDbError::InvalidFile(_) => FarmError::Conflict(e.to_string()),
            MarsDbError::Rejected(r) => FarmError::Invalid(r.to_string()),
            MarsDbError::Io { .. } => FarmError::Internal(e.to_string()),
        }
    }
}

/// Options of a [`Farm`].
#[derive(Debug, Clone)]
pub struct FarmOptions {
    /// `FARM_NAME`: used in full names and the `farm:<name>` tag.
    pub farm_name: String,
    /// Timeout of a discovery whose request gives none (150 s).
    pub discovery_timeout: Duration,
    /// Quick checks are enabled (`SERGENT_HARTMAN_QUICK_CHECK`): a DUT
    /// created ready for service, or un-retired, gets one queued.
    pub quick_check_enabled: bool,
    /// Sergent Hartman: when set, the farm runs the registration, training
    /// and quick-check jobs itself (through the [`JobRunner`]). When `None`
    /// (the default), DUTs that are TRAINING or QUICK_CHECK wait for the
    /// embedding program to drive them ([`Farm::begin_job`],
    /// [`Farm::clear_quick_check`], ...).
    pub training: Option<TrainingOptions>,
}

impl FarmOptions {
    /// Options with the reference defaults for farm `farm_name`.
    pub fn new(farm_name: impl Into<String>) -> Self {
        Self {
            farm_name: farm_name.into(),
            discovery_timeout: DEFAULT_DISCOVERY_TIMEOUT,
            quick_check_enabled: true,
            training: None,
        }
    }
}

/// What only lives while the executor runs, for one DUT.
#[derive(Debug, Clone, Default)]
pub struct DutRuntime {
    /// A quick check is queued (D.4): the job engine runs it when the DUT
    /// would otherwise be IDLE.
    pub quick_check_queued: bool,
    /// The job queued or running on the DUT, if any.
    pub job: Option<RunningJob>,
    /// Training (Sergent Hartman) progress.
    pub training: TrainingInfo,
    /// The MarsDB facts last seen for the DUT, to notice edits (API or
    /// file) that must queue a quick check or stop a training job.
    seen: Option<SeenFacts>,
}

/// The MarsDB facts of a DUT that trigger Sergent Hartman's side effects
/// when they change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SeenFacts {
    is_retired: bool,
    ready_for_service: bool,
    has_port: bool,
}

#[derive(Default)]
struct Runtime {
    duts: HashMap<MacAddr, DutRuntime>,
    discovery: Option<Discovery>,
    /// A discovery request is switching its port ON: the slot is taken.
    discovery_pending: bool,
    discovery_epoch: u64,
}

/// The farm's runtime state. Create it with [`Farm::new`], then call
/// [`Farm::start`] from within a Tokio runtime.
pub struct Farm {
    options: FarmOptions,
    db: Arc<dyn MarsDb>,
    pdus: Arc<PduManager>,
    runner: RwLock<Arc<dyn JobRunner>>,
    /// A job engine was installed ([`Farm::set_job_runner`]): Sergent
    /// Hartman waits for one.
    runner_set: std::sync::atomic::AtomicBool,
    runtime: Mutex<Runtime>,
    /// Serialises mutations (see the module documentation).
    write_lock: tokio::sync::Mutex<()>,
    generation: watch::Sender<u64>,
    started: Instant,
    /// The database the runtime records and PDUs were last synced with.
    synced: Mutex<Option<Arc<Database>>>,
    /// The task following MarsDB.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// One task per PDU, bumping the generation at each new snapshot.
    pdu_followers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The Sergent Hartman supervisor task.
    sh_supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The Sergent Hartman task of each DUT that has one.
    sh_tasks: Mutex<HashMap<MacAddr, tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Farm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Farm")
            .field("farm_name", &self.options.farm_name)
            .finish_non_exhaustive()
    }
}

impl Farm {
    /// A farm over `db` and `pdus`, with no job engine ([`NoJobEngine`]).
    /// Nothing runs until [`Farm::start`].
    pub fn new(db: Arc<dyn MarsDb>, pdus: Arc<PduManager>, options: FarmOptions) -> Arc<Farm> {
        let (generation, _) = watch::channel(0);
        Arc::new(Farm {
            options,
            db,
            pdus,
            runner: RwLock::new(Arc::new(NoJobEngine)),
            runner_set: std::sync::atomic::AtomicBool::new(false),
            runtime: Mutex::new(Runtime::default()),
            write_lock: tokio::sync::Mutex::new(()),
            generation,
            started: Instant::now(),
            synced: Mutex::new(None),
            follower: Mutex::new(None),
            pdu_followers: Mutex::new(Vec::new()),
            sh_supervisor: Mutex::new(None),
            sh_tasks: Mutex::new(HashMap::new()),
        })
    }

    /// Syncs the PDUs and runtime records with the current database, then
    /// follows MarsDB (edits of the file, API changes) and the PDUs'
    /// snapshots in one background task. Must be called within a Tokio
    /// runtime; calling it twice does nothing more.
    pub async fn start(self: &Arc<Self>) {
        if self.follower.lock().unwrap().is_some() {
            return;
        }
        self.sync_with(self.db.snapshot()).await;
        let weak = Arc::downgrade(self);
        let mut db_rx = self.db.subscribe();
        let mut err_rx = self.db.subscribe_error();
        let follow = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = db_rx.changed() => {
                        if r.is_err() { break; }
                        let snap = db_rx.borrow_and_update().clone();
                        let Some(farm) = weak.upgrade() else { break };
                        farm.sync_with(snap).await;
                    }
                    r = err_rx.changed() => {
                        if r.is_err() { break; }
                        err_rx.borrow_and_update();
                        let Some(farm) = weak.upgrade() else { break };
                        farm.bump();
                    }
                }
            }
        });
        *self.follower.lock().unwrap() = Some(follow);
        self.start_sergent_hartman();
    }

    /// Stops the background tasks (cancelling training and quick-check
    /// jobs) and every PDU's task.
    pub async fn shutdown(&self) {
        self.stop_sergent_hartman();
        if let Some(t) = self.follower.lock().unwrap().take() {
            t.abort();
        }
        for t in std::mem::take(&mut *self.pdu_followers.lock().unwrap()) {
            t.abort();
        }
        self.pdus.shutdown().await;
    }

    /// The farm's options.
    pub fn options(&self) -> &FarmOptions {
        &self.options
    }

    /// `FARM_NAME`.
    pub fn farm_name(&self) -> &str {
        &self.options.farm_name
    }

    /// The farm database.
    pub fn db(&self) -> &Arc<dyn MarsDb> {
        &self.db
    }

    /// The PDU manager.
    pub fn pdus(&self) -> &Arc<PduManager> {
        &self.pdus
    }

    /// Installs the job engine that accepted submissions are handed to.
    pub fn set_job_runner(&self, runner: Arc<dyn JobRunner>) {
        *self.runner.write().unwrap() = runner;
        self.runner_set
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.bump();
    }

    /// The installed job engine.
    pub fn job_runner(&self) -> Arc<dyn JobRunner> {
        self.runner.read().unwrap().clone()
    }

    /// The generation counter: it changes whenever anything a view shows
    /// may have changed.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// A receiver notified at every generation change (event-driven
    /// consumers: the job engine, caches).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Seconds since the farm was created (monotonic; `started_at` of a
    /// discovery uses this clock).
    pub fn uptime(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub(crate) fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// A copy of a DUT's runtime record (None for an unknown DUT).
    pub fn dut_runtime(&self, id: &MacAddr) -> Option<DutRuntime> {
        self.runtime.lock().unwrap().duts.get(id).cloned()
    }

    /// Brings the PDU manager and the runtime records in line with `db`.
    async fn sync_with(self: &Arc<Self>, db: Arc<Database>) {
        {
            let mut synced = self.synced.lock().unwrap();
            if let Some(prev) = synced.as_ref() {
                if Arc::ptr_eq(prev, &db) {
                    return;
                }
            }
            *synced = Some(db.clone());
        }
        let specs: Vec<PduSpec> = db
            .pdus
            .iter()
            .map(|(name, p)| PduSpec {
                name: name.clone(),
                driver: p.driver.clone(),
                config: serde_json::Value::Object(p.config.clone()),
                reserved_port_ids: p
                    .reserved_port_ids
                    .iter()
                    .map(|id| id.as_str().to_string())
                    .collect(),
                hidden: false,
            })
            .collect();
        for e in self.pdus.sync(specs).await {
            tracing::error!("{e}");
        }
        // Each DUT's pdu_off_delay is its port's minimum off time. Sent in
        // the background: a PDU's queue may be busy with a slow PDU.
        let mut settings = Vec::new();
        for dut in db.duts.values() {
            if let Some((pdu, port)) = dut.pdu_port() {
                if let Some(h) = self.pdus.get(pdu) {
                    let d = Duration::from_secs_f64(dut.pdu_off_delay.max(0.0));
                    settings.push((h, port.as_str().to_string(), d));
                }
            }
        }
        if !settings.is_empty() {
            tokio::spawn(async move {
                for (h, port, d) in settings {
                    // The port may not be listed yet; the next sync retries.
                    let _ = h.set_min_off_time(&port, Some(d)).await;
                }
            });
        }
        self.follow_pdus();
        self.sync_runtime(&db);
        self.bump();
    }

    /// Starts one small task per PDU that bumps the generation at each new
    /// snapshot of that PDU (replacing the previous set of such tasks).
    fn follow_pdus(self: &Arc<Self>) {
        let mut tasks = self.pdu_followers.lock().unwrap();
        for t in tasks.drain(..) {
            t.abort();
        }
        for name in self.pdus.names() {
            let Some(h) = self.pdus.get(&name) else {
                continue;
            };
            let mut rx = h.subscribe();
            let weak = Arc::downgrade(self);
            tasks.push(tokio::spawn(async move {
                let mut ports: Vec<String> = Vec::new();
                while rx.changed().await.is_ok() {
                    let now: Vec<String> = rx.borrow_and_update().ports.keys().cloned().collect();
                    let Some(farm) = weak.upgrade() else { break };
                    farm.bump();
                    if now != ports {
                        // The PDU listed its ports (again): give the DUTs'
                        // ports their minimum off times.
                        ports = now;
                        let db = farm.db.snapshot();
                        for dut in db.duts.values() {
                            if let Some((pdu, port)) = dut.pdu_port() {
                                if pdu == name && ports.iter().any(|p| p == port.as_str()) {
                                    let d = Duration::from_secs_f64(dut.pdu_off_delay.max(0.0));
                                    let _ = h.set_min_off_time(port.as_str(), Some(d)).await;
                                }
                            }
                        }
                    }
                }
            }));
        }
    }

    /// Creates the runtime records of new DUTs (queuing a quick check for a
    /// DUT that is ready and not retired, as D.4) and drops those of
    /// removed DUTs, cancelling their jobs. For known DUTs, applies the
    /// side effects of MarsDB changes, whether they came from the API or
    /// from an edit of the file:
    /// * activated (`is_retired` true → false) or given a PDU port while
    ///   ready: a quick check is queued;
    /// * retired, or its PDU port removed: its training or quick-check job
    ///   is cancelled;
    /// * made ready while training: the training job is cancelled;
    /// * made unfit while quick-checking: the quick check is cancelled.
    fn sync_runtime(&self, db: &Database) {
        let qc = self.options.quick_check_enabled;
        let mut rt = self.runtime.lock().unwrap();
        for (id, dut) in &db.duts {
            let now = SeenFacts {
                is_retired: dut.is_retired,
                ready_for_service: dut.ready_for_service,
                has_port: dut.pdu_port().is_some(),
            };
            let r = rt.duts.entry(*id).or_insert_with(|| DutRuntime {
                quick_check_queued: qc && dut.available(),
                ..DutRuntime::default()
            });
            let Some(before) = r.seen.replace(now) else {
                continue;
            };
            if before == now {
                continue;
            }
            let activated = before.is_retired && !now.is_retired;
            let wired = !before.has_port && now.has_port;
            if qc && (activated || wired) && dut.available() && !r.quick_check_queued {
                tracing::info!(dut = %id, "{}: quick check queued", if activated { "activated" } else { "PDU port assigned" });
                r.quick_check_queued = true;
            }
            if let Some(job) = &r.job {
                let retired = !before.is_retired && now.is_retired;
                let unwired = before.has_port && !now.has_port;
                let readied = !before.ready_for_service && now.ready_for_service;
                let unfit = before.ready_for_service && !now.ready_for_service;
                let stop = match job.kind {
                    JobKind::Training => retired || unwired || readied,
                    JobKind::QuickCheck => retired || unwired || unfit,
                    JobKind::User => false,
                };
                if stop {
                    tracing::info!(dut = %id, job = %job.job_id, "MarsDB changed (retired: {}, ready: {}, PDU port: {}): cancelling the job", now.is_retired, now.ready_for_service, now.has_port);
                    job.cancel.cancel();
                }
            }
        }
        rt.duts.retain(|id, r| {
            let keep = db.duts.contains_key(id);
            if !keep {
                if let Some(job) = &r.job {
                    tracing::info!(dut = %id, job = %job.job_id, "DUT removed from MarsDB: cancelling its job");
                    job.cancel.cancel();
                }
            }
            keep
        });
    }
}
