//! Job hand-over: DUT selection (EX A.15), the [`JobRunner`] trait the job
//! engine implements, cancellation, and the hooks the engine calls as a job
//! progresses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use super::{DutState, Farm, FarmError, TrainingInfo};
use crate::marsdb::MacAddr;

/// A cancellation flag shared by the farm and the job engine. Cheap to
/// clone; every clone sees the cancellation.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<(AtomicBool, Notify)>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels (idempotent) and wakes every waiter.
    pub fn cancel(&self) {
        self.0 .0.store(true, Ordering::SeqCst);
        self.0 .1.notify_waiters();
    }

    /// Whether it was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0 .0.load(Ordering::SeqCst)
    }

    /// Resolves once cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0 .1.notified();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// What kind of job occupies a DUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A job submitted through `POST /api/v1/jobs`.
    User,
    /// A training job (registration or qualification boot loop).
    Training,
    /// A quick check.
    QuickCheck,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobPhase {
    /// Accepted; being set up (the DUT shows QUEUED).
    Queued,
    /// Running (the DUT shows RUNNING).
    Running,
}

/// The job queued or running on a DUT (part of its runtime record).
#[derive(Debug, Clone)]
pub struct RunningJob {
    /// The job's id (`job_id` of the metadata, or generated).
    pub job_id: String,
    /// What kind of job.
    pub kind: JobKind,
    /// Queued or running.
    pub phase: JobPhase,
    /// Cancelling it.
    pub cancel: CancelToken,
    /// What the DUT boots while the job runs (kernel and initrd default to
    /// `BOOTS_DEFAULT_*` when missing), set by the job engine.
    pub boot: Option<BootSpec>,
    /// The DUT asked for its boot script (iPXE or U-Boot: its firmware
    /// and bootloader ran) since the engine set up the current boot
    /// ([`Farm::set_job_boot`]).
    pub firmware_booted: bool,
}

/// The boot configuration a running job gives its DUT: the netboot
/// module's [`Deployment`](crate::netboot::Deployment).
pub type BootSpec = crate::netboot::Deployment;

/// Which DUT a job asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobTarget {
    /// A DUT id or full name.
    pub id: Option<String>,
    /// Tags the DUT must all have.
    pub tags: Vec<String>,
}

/// A job submission as the API accepted it (EX C.1), validated: the job
/// text parses, the metadata is well-formed.
#[derive(Debug, Clone, Default)]
pub struct JobSubmission {
    /// Protocol version (1; 0 for the deprecated JSON form).
    pub version: u32,
    /// The job's id.
    pub job_id: String,
    /// Where the client listens for the callback connection.
    pub callback_host: String,
    /// Its port.
    pub callback_port: u16,
    /// The DUT asked for (metadata target, else the job's `target:`).
    pub target: JobTarget,
    /// The raw, untemplated job description.
    pub job_text: String,
    /// The optional tarball to extract into the job bucket.
    pub tarball: Option<Vec<u8>>,
    /// MinIO credentials and groups, verbatim (`minio` of the metadata).
    pub minio: Option<serde_json::Value>,
    /// Extra environment (`environ` of the metadata).
    pub environ: BTreeMap<String, String>,
}

/// A submission accepted for a DUT: the farm has marked the DUT QUEUED with
/// this job; the engine runs it.
#[derive(Debug, Clone)]
pub struct AcceptedJob {
    /// The submission.
    pub submission: JobSubmission,
    /// The DUT it runs on.
    pub dut: MacAddr,
    /// Cancelled by `cancel_job`, removal of the DUT, etc.
    pub cancel: CancelToken,
}

/// The job engine: runs accepted jobs.
///
/// Contract: [`Farm::submit_job`] selects the DUT, marks it QUEUED (a
/// [`RunningJob`] of kind [`JobKind::User`]) and calls
/// [`JobRunner::start_job`]. The engine returns quickly (it spawns the job)
/// or refuses with an error, in which case the farm clears the DUT's job
/// and the API answers with that error. While the job runs, the engine
/// calls [`Farm::job_running`], optionally [`Farm::set_job_boot`], watches
/// `cancel`, and finally calls [`Farm::job_finished`].
#[async_trait]
pub trait JobRunner: Send + Sync {
    /// Starts `job` (see the trait documentation).
    async fn start_job(&self, farm: Arc<Farm>, job: AcceptedJob) -> Result<(), FarmError>;

    /// Runs a job the farm itself started on a DUT (a training or
    /// quick-check job of Sergent Hartman) to its end and reports how it
    /// ended. There is no client: the console goes to the job's log only.
    ///
    /// Contract: the caller has marked the DUT busy with this job
    /// ([`Farm::begin_job`]) and clears it afterwards
    /// ([`Farm::job_finished`]); the engine may call [`Farm::job_running`]
    /// and [`Farm::set_job_boot`], must watch `job.cancel`, must leave the
    /// DUT's port OFF when it returns, and does not act on
    /// `machine_unfit_for_service` (the caller decides). The default
    /// implementation refuses with [`FarmError::Unavailable`].
    async fn run_internal_job(
        &self,
        farm: Arc<Farm>,
        job: InternalJob,
    ) -> Result<InternalJobReport, FarmError> {
        let _ = farm;
        Err(FarmError::Unavailable(format!(
            "This job engine cannot run internal jobs: {} was not started on {}",
            job.job_id, job.dut
        )))
    }
}

/// A job the farm runs on its own behalf (training, quick check): no
/// submitter, no callback.
#[derive(Debug, Clone)]
pub struct InternalJob {
    /// The DUT it runs on.
    pub dut: MacAddr,
    /// The job's id (unique among the DUT's jobs).
    pub job_id: String,
    /// [`JobKind::Training`] or [`JobKind::QuickCheck`].
    pub kind: JobKind,
    /// The raw job description (a Jinja2 template, rendered for the DUT).
    pub job_text: String,
    /// Template variables added to the usual ones (they win over
    /// `EXECUTOR_JOB__*` variables of the same name).
    pub vars: BTreeMap<String, serde_json::Value>,
    /// Cancelling it.
    pub cancel: CancelToken,
    /// `SERGENT_HARTMAN_QUIET`: the job leaves nothing in the executor's
    /// output (its messages are logged at debug level) and writes no job
    /// log file; its report still carries the end of its log.
    pub quiet: bool,
}

/// How an [`InternalJob`] ended.
#[derive(Debug, Clone, PartialEq)]
pub struct InternalJobReport {
    /// The verdict (`SETUP_FAIL` when it could not be set up); `None` when
    /// it was cancelled.
    pub status: Option<crate::job::JobStatus>,
    /// The DUT printed something on its console.
    pub console_data_received: bool,
    /// From the start of the job to its end.
    pub elapsed: std::time::Duration,
    /// The job's log (console output and control messages), possibly
    /// shortened to its end.
    pub log: String,
}

/// The default engine: refuses every job with 503 "job engine not
/// available" (the job engine is installed with [`Farm::set_job_runner`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoJobEngine;

#[async_trait]
impl JobRunner for NoJobEngine {
    async fn start_job(&self, _farm: Arc<Farm>, job: AcceptedJob) -> Result<(), FarmError> {
        Err(FarmError::Unavailable(format!(
            "The job engine is not available: job {} was not started on {}",
            job.submission.job_id, job.dut
        )))
    }
}

/// A DUT as job selection sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Its id.
    pub id: MacAddr,
    /// Its full name.
    pub full_name: &'a str,
    /// `tags ∪ manual_tags ∪ {farm:<FARM_NAME>}`.
    pub all_tags: Vec<String>,
    /// Retired.
    pub is_retired: bool,
    /// Current state.
    pub state: DutState,
}

/// Whether the transition table lets a DUT in `state` take a job.
fn accepts_job(state: DutState) -> bool {
    crate::state::find_transition(state, crate::state::EventKind::JobQueued).is_some()
}

fn tag_set(tags: &[String]) -> String {
    let mut t: Vec<&str> = tags.iter().map(String::as_str).collect();
    t.sort();
    t.dedup();
    format!(
        "{{{}}}",
        t.iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Picks the DUT for `target` among `candidates` (in MarsDB order), with
/// the V2024 rules of EX A.15:
/// * with an id: unknown → 404; tags not all on the DUT → 406; retired or
///   not IDLE → 409;
/// * without: non-retired DUTs having all the tags; none → 406; the first
///   IDLE one wins, else 409.
pub fn select_dut(
    candidates: &[Candidate<'_>],
    target: &JobTarget,
    find: impl Fn(&str) -> Option<MacAddr>,
) -> Result<MacAddr, FarmError> {
    let has_tags = |c: &Candidate<'_>| target.tags.iter().all(|t| c.all_tags.contains(t));
    if let Some(id) = &target.id {
        let c = find(id)
            .and_then(|mac| candidates.iter().find(|c| c.id == mac))
            .ok_or_else(|| FarmError::NotFound(format!("Unknown machine with ID {id}")))?;
        if !has_tags(c) {
            return Err(FarmError::NoMatch(format!(
                "The machine {id} does not have all the tags {}",
                tag_set(&target.tags)
            )));
        }
        if c.is_retired {
            return Err(FarmError::Conflict(format!(
                "The machine {id} is unavailable: it is retired"
            )));
        }
        if !accepts_job(c.state) {
            return Err(FarmError::Conflict(format!(
                "The machine {id} is unavailable: Current state is {}",
                c.state
            )));
        }
        return Ok(c.id);
    }
    let matching: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| !c.is_retired && has_tags(c))
        .collect();
    if matching.is_empty() {
        return Err(FarmError::NoMatch(format!(
            "No active machines found matching the tags {}.",
            tag_set(&target.tags)
        )));
    }
    matching
        .iter()
        .find(|c| accepts_job(c.state))
        .map(|c| c.id)
        .ok_or_else(|| {
            FarmError::Conflict(format!(
                "All machines matching the tags {} are busy",
                tag_set(&target.tags)
            ))
        })
}

impl Farm {
    /// Selects a DUT for `submission` (EX A.15), marks it QUEUED and hands
    /// the job to the [`JobRunner`]. On any refusal (no DUT: 404/406/409;
    /// the engine refused: its error) nothing stays changed. Returns the
    /// DUT chosen.
    pub async fn submit_job(
        self: &Arc<Self>,
        submission: JobSubmission,
    ) -> Result<MacAddr, FarmError> {
        let (dut, cancel) = {
            let _w = self.write_lock.lock().await;
            let view = self.view();
            let candidates: Vec<Candidate<'_>> = view
                .duts
                .iter()
                .map(|(id, v)| Candidate {
                    id: *id,
                    full_name: &v.full_name,
                    all_tags: view.db.duts[id].all_tags(self.farm_name()),
                    is_retired: v.is_retired,
                    state: v.state,
                })
                .collect();
            let dut = select_dut(&candidates, &submission.target, |key| {
                view.find_dut(key).and_then(|v| v.id.parse().ok())
            })?;
            let cancel = CancelToken::new();
            let mut rt = self.runtime.lock().unwrap();
            let record = rt.duts.entry(dut).or_default();
            record.job = Some(RunningJob {
                job_id: submission.job_id.clone(),
                kind: JobKind::User,
                phase: JobPhase::Queued,
                cancel: cancel.clone(),
                boot: None,
                firmware_booted: false,
            });
            (dut, cancel)
        };
        self.bump();
        tracing::info!(dut = %dut, job = %submission.job_id, "job accepted");
        let job_id = submission.job_id.clone();
        let runner = self.job_runner();
        let accepted = AcceptedJob {
            submission,
            dut,
            cancel: cancel.clone(),
        };
        if let Err(e) = runner.start_job(self.clone(), accepted).await {
            self.clear_job(&dut, &job_id);
            tracing::warn!(dut = %dut, job = %job_id, "the job engine refused the job: {e}");
            return Err(e);
        }
        Ok(dut)
    }

    /// Marks a DUT as occupied by an engine-started job (training or quick
    /// check) if it has none. Returns the job's cancel token, or a 409 if
    /// the DUT already has a job. 404 for an unknown DUT.
    pub fn begin_job(
        &self,
        dut: &MacAddr,
        job_id: &str,
        kind: JobKind,
    ) -> Result<CancelToken, FarmError> {
        if !self.db.snapshot().duts.contains_key(dut) {
            return Err(FarmError::NotFound(format!("Unknown machine ID '{dut}'")));
        }
        let cancel = CancelToken::new();
        {
            let mut rt = self.runtime.lock().unwrap();
            let record = rt.duts.entry(*dut).or_default();
            if let Some(j) = &record.job {
                return Err(FarmError::Conflict(format!(
                    "The machine {dut} already has the job {}",
                    j.job_id
                )));
            }
            record.job = Some(RunningJob {
                job_id: job_id.to_string(),
                kind,
                phase: JobPhase::Running,
                cancel: cancel.clone(),
                boot: None,
                firmware_booted: false,
            });
        }
        self.bump();
        Ok(cancel)
    }

    /// Engine hook: the job `job_id` on `dut` is now running.
    pub fn job_running(&self, dut: &MacAddr, job_id: &str) {
        self.update_job(dut, job_id, |j| j.phase = JobPhase::Running);
    }

    /// Engine hook: what `dut` boots while `job_id` runs, set before each
    /// boot's power cycle (the DUT has not fetched this boot's script yet).
    pub fn set_job_boot(&self, dut: &MacAddr, job_id: &str, boot: BootSpec) {
        self.update_job(dut, job_id, |j| {
            j.boot = Some(boot);
            j.firmware_booted = false;
        });
    }

    /// Engine hook: the job `job_id` on `dut` is over (whatever its end).
    pub fn job_finished(&self, dut: &MacAddr, job_id: &str) {
        self.clear_job(dut, job_id);
    }

    /// Engine hook: replaces a DUT's training progress.
    pub fn set_training(&self, dut: &MacAddr, training: TrainingInfo) {
        let changed = {
            let mut rt = self.runtime.lock().unwrap();
            match rt.duts.get_mut(dut) {
                Some(r) => {
                    r.training = training;
                    true
                }
                None => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    /// Engine hook: clears a DUT's queued quick check (it ran, or is
    /// disabled).
    pub fn clear_quick_check(&self, dut: &MacAddr) {
        let changed = {
            let mut rt = self.runtime.lock().unwrap();
            rt.duts
                .get_mut(dut)
                .map(|r| std::mem::replace(&mut r.quick_check_queued, false))
                .unwrap_or(false)
        };
        if changed {
            self.bump();
        }
    }

    /// The boot configuration of the job running on `dut`, if it gave one.
    pub fn job_boot(&self, dut: &MacAddr) -> Option<BootSpec> {
        let rt = self.runtime.lock().unwrap();
        rt.duts.get(dut)?.job.as_ref()?.boot.clone()
    }

    fn update_job(&self, dut: &MacAddr, job_id: &str, f: impl FnOnce(&mut RunningJob)) {
        let changed = {
            let mut rt = self.runtime.lock().unwrap();
            match rt.duts.get_mut(dut).and_then(|r| r.job.as_mut()) {
                Some(j) if j.job_id == job_id => {
                    f(j);
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    fn clear_job(&self, dut: &MacAddr, job_id: &str) {
        let changed = {
            let mut rt = self.runtime.lock().unwrap();
            match rt.duts.get_mut(dut) {
                Some(r) if r.job.as_ref().is_some_and(|j| j.job_id == job_id) => {
                    r.job = None;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }
}

/// The farm is the netboot module's source of job deployments: a DUT
/// running a job that set one ([`Farm::set_job_boot`]) boots it.
#[async_trait]
impl crate::netboot::DeploymentProvider for Farm {
    async fn deployment(
        &self,
        dut_id: &str,
        _request: &crate::netboot::BootRequest,
    ) -> Option<crate::netboot::Deployment> {
        let (id, _) = self.resolve_dut(dut_id).ok()?;
        // The DUT's firmware asks for its boot script: it booted (the
        // training loops' `firmware_booted_check`).
        let mut rt = self.runtime.lock().unwrap();
        let job = rt.duts.get_mut(&id)?.job.as_mut()?;
        job.firmware_booted = true;
        job.boot.clone()
    }
}
