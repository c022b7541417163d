//! Sergent Hartman: registration, training and quick checks (EX D.2-D.4).
//!
//! A DUT that is not `ready_for_service` is TRAINING: it runs the
//! registration job until one passes (retried after
//! `SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY` on failure), then
//! `SERGENT_HARTMAN_BOOT_COUNT` boot loops; it is marked ready when at least
//! `SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT` of them PASS, else training starts
//! again from the registration. A DUT with a queued quick check is
//! QUICK_CHECK: it runs one boot loop; anything but a PASS sends it back to
//! training.
//!
//! # How it runs
//!
//! One supervisor task follows the farm's generation counter (no polling)
//! once a job engine is installed ([`Farm::set_job_runner`]):
//! at each change it looks for DUTs that are TRAINING or QUICK_CHECK with no
//! job and no Sergent Hartman task, and starts one task for each. That task
//! runs the DUT's training or quick check as a sequence of internal jobs
//! ([`JobRunner::run_internal_job`](super::JobRunner::run_internal_job)),
//! publishes the progress in the DUT's `training` object, and ends when the
//! DUT is neither TRAINING nor QUICK_CHECK any more.
//!
//! Outcomes go through the transition table ([`crate::state`]): a result
//! is applied only if its edge leaves the DUT's current state (a DUT retired
//! while its last boot loop ran is not marked ready).
//!
//! Retiring a DUT, making it ready, removing it or its PDU port while it
//! trains or quick-checks cancels the job (the farm does it as it syncs with
//! MarsDB, whether the change came through the API or a file edit); a job
//! cancelled by an admin (`cancel_job`) restarts the training, or fails the
//! quick check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::{
    Farm, FarmError, InternalJob, InternalJobReport, JobKind, TrainingInfo, TrainingLoop,
    TrainingProgress, TrainingState,
};
use crate::job::JobStatus;
use crate::marsdb::{MacAddr, MarsDbExt};
use crate::state::{DutEvent, DutState, DutStateMachine};

/// Where a training job description comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobTemplate {
    /// A template given as text (e.g. one compiled into the binary).
    Text(Arc<str>),
    /// A template file, read again for every job (edits apply to the next
    /// job).
    File(PathBuf),
}

impl JobTemplate {
    /// The template's text; the error names the file.
    pub fn load(&self) -> Result<String, String> {
        match self {
            JobTemplate::Text(t) => Ok(t.to_string()),
            JobTemplate::File(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the job template {}: {e}", p.display())),
        }
    }
}

/// Options of Sergent Hartman (the `SERGENT_HARTMAN_*`,
/// `EXECUTOR_REGISTRATION_JOB` and `EXECUTOR_BOOTLOOP_JOB` settings).
#[derive(Debug, Clone)]
pub struct TrainingOptions {
    /// Boot loops of a training (`SERGENT_HARTMAN_BOOT_COUNT`). 0: ready as
    /// soon as registration succeeds. Negative: no registration, training or
    /// quick check at all (a DUT that is not ready is marked ready at once,
    /// a queued quick check passes at once).
    pub boot_count: i64,
    /// PASSes needed to qualify (`SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT`).
    pub qualifying_boot_count: u32,
    /// Wait after a failed registration
    /// (`SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY`).
    pub registration_retrial_delay: Duration,
    /// Quick checks run a boot loop (`SERGENT_HARTMAN_QUICK_CHECK`); when
    /// false, a queued quick check passes without running anything.
    pub quick_check: bool,
    /// The registration job (`EXECUTOR_REGISTRATION_JOB`).
    pub registration_job: JobTemplate,
    /// The boot-loop job (`EXECUTOR_BOOTLOOP_JOB`), also run by quick checks.
    pub bootloop_job: JobTemplate,
    /// The longest log kept in memory for a loop that did not pass (its
    /// end is kept). The full log is in the job's log file.
    pub max_loop_log: usize,
    /// `SERGENT_HARTMAN_QUIET`: the registration, boot-loop and quick-check
    /// jobs leave nothing in the executor's output (their messages are
    /// logged at debug level) and write no job log file. The logs of loops
    /// that did not pass are still kept in memory and served. Sergent
    /// Hartman's own outcomes (a registration or training that failed, a
    /// DUT qualified) are still logged.
    pub quiet: bool,
}

impl TrainingOptions {
    /// The reference defaults (100 loops, 100 PASSes, 120 s, quick checks
    /// on) with the given job templates.
    pub fn new(registration_job: JobTemplate, bootloop_job: JobTemplate) -> Self {
        TrainingOptions {
            boot_count: 100,
            qualifying_boot_count: 100,
            registration_retrial_delay: Duration::from_secs(120),
            quick_check: true,
            registration_job,
            bootloop_job,
            max_loop_log: 1024 * 1024,
            quiet: false,
        }
    }

    /// Options from the executor's configuration; the job templates are the
    /// configured files, else the given built-in texts.
    pub fn from_config(
        config: &crate::config::Config,
        builtin_registration: &str,
        builtin_bootloop: &str,
    ) -> Self {
        let pick = |path: &Option<PathBuf>, builtin: &str| match path {
            Some(p) => JobTemplate::File(p.clone()),
            None => JobTemplate::Text(Arc::from(builtin)),
        };
        TrainingOptions {
            boot_count: config.sergent_hartman_boot_count,
            qualifying_boot_count: config.sergent_hartman_qualifying_boot_count,
            registration_retrial_delay: config.sergent_hartman_registration_retrial_delay,
            quick_check: config.sergent_hartman_quick_check,
            registration_job: pick(&config.executor_registration_job, builtin_registration),
            bootloop_job: pick(&config.executor_bootloop_job, builtin_bootloop),
            max_loop_log: 1024 * 1024,
            quiet: config.sergent_hartman_quiet,
        }
    }

    /// Whether registration, training and quick checks run at all
    /// (`boot_count` is not negative).
    pub fn enabled(&self) -> bool {
        self.boot_count >= 0
    }

    /// Whether quick checks run a boot loop.
    pub fn quick_checks_run(&self) -> bool {
        self.enabled() && self.quick_check
    }
}

/// Template variable naming the kind of a training job: `registration`,
/// `bootloop` or `quick_check`.
pub const VAR_TRAINING_KIND: &str = "training_kind";
/// Template variable: the 1-based boot-loop number (0 for a registration,
/// 1 for a quick check).
pub const VAR_TRAINING_LOOP: &str = "training_loop";

/// How one training job ended, as Sergent Hartman sees it.
enum RunOutcome {
    /// It ran to a verdict (or failed to set up).
    Ended(InternalJobReport),
    /// It was cancelled.
    Cancelled,
    /// It could not be started (the DUT is busy, the engine refused).
    NotStarted(String),
}

impl Farm {
    /// Starts the Sergent Hartman supervisor if the options ask for it and
    /// it does not run yet.
    pub(super) fn start_sergent_hartman(self: &Arc<Self>) {
        let Some(opts) = self.options.training.clone() else {
            return;
        };
        let mut sup = self.sh_supervisor.lock().unwrap();
        if sup.is_some() {
            return;
        }
        if opts.enabled() && u64::from(opts.qualifying_boot_count) > opts.boot_count as u64 {
            tracing::warn!(
                boot_count = opts.boot_count,
                qualifying = opts.qualifying_boot_count,
                "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT is larger than SERGENT_HARTMAN_BOOT_COUNT: \
                 no DUT can ever qualify"
            );
        }
        let weak = Arc::downgrade(self);
        let mut rx = self.subscribe();
        *sup = Some(tokio::spawn(async move {
            loop {
                {
                    let Some(farm) = weak.upgrade() else { break };
                    farm.sh_scan(&opts);
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }));
    }

    /// Stops the supervisor and every Sergent Hartman task, cancelling their
    /// jobs (the engine then switches the ports OFF).
    pub(super) fn stop_sergent_hartman(&self) {
        if let Some(t) = self.sh_supervisor.lock().unwrap().take() {
            t.abort();
        }
        let tasks: Vec<_> = self.sh_tasks.lock().unwrap().drain().collect();
        {
            let rt = self.runtime.lock().unwrap();
            for (id, _) in &tasks {
                if let Some(job) = rt.duts.get(id).and_then(|r| r.job.as_ref()) {
                    if job.kind != JobKind::User {
                        job.cancel.cancel();
                    }
                }
            }
        }
        for (_, t) in tasks {
            t.abort();
        }
    }

    /// Starts a task for every DUT that needs Sergent Hartman and has none.
    fn sh_scan(self: &Arc<Self>, opts: &TrainingOptions) {
        if !self.runner_set.load(std::sync::atomic::Ordering::SeqCst) {
            // Nothing can run before the job engine is installed.
            return;
        }
        let db = self.db.snapshot();
        let pdus = self.pdus.snapshots();
        let mut wanted = Vec::new();
        {
            let rt = self.runtime.lock().unwrap();
            let tasks = self.sh_tasks.lock().unwrap();
            for (id, dut) in &db.duts {
                if tasks.contains_key(id) {
                    continue;
                }
                let r = rt.duts.get(id);
                if r.is_some_and(|r| r.job.is_some()) {
                    continue;
                }
                let state = super::compute_state(dut, r, Self::port_resolves(&pdus, dut));
                if matches!(state, DutState::Training | DutState::QuickCheck) {
                    wanted.push(*id);
                }
            }
        }
        if wanted.is_empty() {
            return;
        }
        let mut tasks = self.sh_tasks.lock().unwrap();
        for id in wanted {
            if tasks.contains_key(&id) {
                continue;
            }
            let farm = self.clone();
            let opts = opts.clone();
            let span = tracing::info_span!("sergent_hartman", dut = %id);
            let handle = tokio::spawn(tracing::Instrument::instrument(
                async move {
                    Sergent {
                        farm: farm.clone(),
                        dut: id,
                        opts,
                    }
                    .run()
                    .await;
                    farm.sh_tasks.lock().unwrap().remove(&id);
                    // The DUT may need a new task already (a state change
                    // that came while this one was ending).
                    farm.bump();
                },
                span,
            ));
            tasks.insert(id, handle);
        }
    }

    /// The kept log of training loop `n` (0-based index in the DUT's
    /// `training.loops`): 404 for an unknown DUT, or when that loop has no
    /// log (it passed, or does not exist).
    pub fn training_loop_log(&self, key: &str, n: usize) -> Result<Arc<str>, FarmError> {
        let (id, _) = self.resolve_dut(key)?;
        let rt = self.runtime.lock().unwrap();
        rt.duts
            .get(&id)
            .and_then(|r| r.training.progress.as_ref())
            .and_then(|p| p.loops.get(n))
            .and_then(|l| l.log.clone())
            .ok_or_else(|| FarmError::NotFound("No log present".into()))
    }
}

/// The Sergent Hartman task of one DUT.
struct Sergent {
    farm: Arc<Farm>,
    dut: MacAddr,
    opts: TrainingOptions,
}

/// Whether a job ended with a PASS.
fn passed(r: &InternalJobReport) -> bool {
    r.status == Some(JobStatus::Pass)
}

fn status_name(r: &InternalJobReport) -> &'static str {
    r.status.map_or("CANCELLED", JobStatus::as_str)
}

impl Sergent {
    async fn run(self) {
        loop {
            match self.state() {
                Some(DutState::Training) => self.enrol().await,
                Some(DutState::QuickCheck) => self.quick_check().await,
                _ => break,
            }
        }
        self.farm.set_training(&self.dut, TrainingInfo::default());
    }

    fn state(&self) -> Option<DutState> {
        self.farm.dut_state(&self.dut)
    }

    fn still(&self, state: DutState) -> bool {
        self.state() == Some(state)
    }

    fn publish(&self, info: &TrainingInfo) {
        self.farm.set_training(&self.dut, info.clone());
    }

    fn fresh_progress(&self) -> TrainingProgress {
        TrainingProgress {
            is_registered: false,
            boot_loop_counts: self.opts.boot_count.max(0).try_into().unwrap_or(u32::MAX),
            qualifying_rate: self.opts.qualifying_boot_count,
            current_loop_count: 0,
            statuses: BTreeMap::new(),
            loops: Vec::new(),
        }
    }

    /// Waits up to `d`; returns early (false) when the DUT leaves `state`.
    async fn wait_in(&self, state: DutState, d: Duration) -> bool {
        let mut rx = self.farm.subscribe();
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if !self.still(state) {
                return false;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return self.still(state),
                Ok(Err(_)) => return false,
                Ok(Ok(())) => {}
            }
        }
    }

    /// Runs one training or quick-check job. The DUT is marked busy with
    /// it; the caller applies the result, then releases the DUT with
    /// [`Farm::job_finished`] (so that nothing sees the DUT free before the
    /// result is applied). Returns the job id and how it ended.
    async fn run_job(
        &self,
        kind: JobKind,
        what: &'static str,
        loop_no: u32,
    ) -> (String, RunOutcome) {
        let template = if what == "registration" {
            &self.opts.registration_job
        } else {
            &self.opts.bootloop_job
        };
        let job_id = format!(
            "{what}-{}-{}",
            self.dut.to_string().replace(':', ""),
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        );
        let text = match template.load() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(job = %job_id, "{e}");
                let report = InternalJobReport {
                    status: Some(JobStatus::SetupFail),
                    console_data_received: false,
                    elapsed: Duration::ZERO,
                    log: format!("{e}\n"),
                };
                return (job_id, RunOutcome::Ended(report));
            }
        };
        let cancel = match self.farm.begin_job(&self.dut, &job_id, kind) {
            Ok(c) => c,
            Err(e) => return (job_id, RunOutcome::NotStarted(e.to_string())),
        };
        if self.opts.quiet {
            tracing::debug!(job = %job_id, "starting the {what} job");
        } else {
            tracing::info!(job = %job_id, "starting the {what} job");
        }
        let vars = BTreeMap::from([
            (VAR_TRAINING_KIND.to_string(), Value::from(what)),
            (VAR_TRAINING_LOOP.to_string(), Value::from(loop_no)),
        ]);
        let job = InternalJob {
            dut: self.dut,
            job_id: job_id.clone(),
            kind,
            job_text: text,
            vars,
            cancel,
            quiet: self.opts.quiet,
        };
        let runner = self.farm.job_runner();
        let out = match runner.run_internal_job(self.farm.clone(), job).await {
            Ok(r) if r.status.is_none() => RunOutcome::Cancelled,
            Ok(r) => {
                if self.opts.quiet {
                    tracing::debug!(job = %job_id, "the {what} job ended with {}", status_name(&r));
                } else {
                    tracing::info!(job = %job_id, "the {what} job ended with {}", status_name(&r));
                }
                RunOutcome::Ended(r)
            }
            Err(e) => RunOutcome::NotStarted(e.to_string()),
        };
        (job_id, out)
    }

    /// Applies a result through the transition table: refused (and logged)
    /// when the DUT's state has no such edge any more. Returns whether it
    /// was applied.
    async fn apply(&self, event: DutEvent) -> bool {
        let _w = self.farm.write_lock.lock().await;
        let Some(state) = self.state() else {
            return false;
        };
        let change = match DutStateMachine::in_state(state).fire(event) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!("{e}: the result is not applied");
                return false;
            }
        };
        let id = self.dut;
        // None: leave ready_for_service alone.
        let ready = match event {
            DutEvent::TrainingPassed => Some(true),
            DutEvent::QuickCheckFailed | DutEvent::JobCancelled => Some(false),
            _ => None,
        };
        if let Some(ready) = ready {
            let r = self
                .farm
                .db
                .update(move |db| -> Result<(), FarmError> {
                    if let Some(d) = db.duts.get_mut(&id) {
                        d.ready_for_service = ready;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::error!(
                    "cannot set ready_for_service={ready} in MarsDB: {}",
                    FarmError::from(e)
                );
                return false;
            }
        }
        if matches!(state, DutState::QuickCheck) {
            if let Some(r) = self.farm.runtime.lock().unwrap().duts.get_mut(&id) {
                r.quick_check_queued = false;
            }
        }
        tracing::info!(from = %change.from, to = %change.to, "{}", change.event);
        self.farm.after_write();
        true
    }

    /// Registration, boot loops and verdict. Returns when the DUT is ready,
    /// left TRAINING, or must start training again.
    async fn enrol(&self) {
        if !self.opts.enabled() {
            // SERGENT_HARTMAN_BOOT_COUNT < 0: ready at once.
            self.apply(DutEvent::TrainingPassed).await;
            return;
        }
        let delay = self.opts.registration_retrial_delay;
        let mut info = TrainingInfo {
            state: TrainingState::Enrolling,
            progress: Some(self.fresh_progress()),
        };
        self.publish(&info);

        // 1. Registration, until one passes.
        loop {
            if !self.still(DutState::Training) {
                return;
            }
            let (job_id, out) = self.run_job(JobKind::Training, "registration", 0).await;
            if let RunOutcome::Ended(r) = &out {
                // As in the reference, the registration attempt is
                // `loops[0]` (boot loop n is `loops[n]`), so the log of a
                // failed registration is served at `training/loop/0`.
                let mut progress = self.fresh_progress();
                self.push_loop(&mut progress, &job_id, r);
                info.progress = Some(progress);
            }
            self.farm.job_finished(&self.dut, &job_id);
            match out {
                RunOutcome::Ended(r) if passed(&r) => break,
                RunOutcome::Ended(r) => {
                    tracing::warn!(
                        "the registration failed ({}): next try in {delay:?}",
                        status_name(&r)
                    );
                    info.state = TrainingState::RegistrationFailed;
                    self.publish(&info);
                    if !self.wait_in(DutState::Training, delay).await {
                        return;
                    }
                    info.state = TrainingState::Enrolling;
                    self.publish(&info);
                }
                RunOutcome::Cancelled => {
                    tracing::info!("the registration job was cancelled");
                    if !self.still(DutState::Training) {
                        return;
                    }
                }
                RunOutcome::NotStarted(e) => {
                    tracing::warn!("the registration job could not start: {e}");
                    self.wait_in(DutState::Training, NOT_STARTED_WAIT).await;
                    return;
                }
            }
        }
        let progress = info.progress.get_or_insert_with(|| self.fresh_progress());
        progress.is_registered = true;
        self.publish(&info);

        // 2. Boot loops.
        let count: u32 = self.opts.boot_count.try_into().unwrap_or(u32::MAX);
        for n in 1..=count {
            if !self.still(DutState::Training) {
                return;
            }
            if let Some(p) = info.progress.as_mut() {
                p.current_loop_count = n;
            }
            self.publish(&info);
            let (job_id, out) = self.run_job(JobKind::Training, "bootloop", n).await;
            let report = match out {
                RunOutcome::Ended(r) => r,
                RunOutcome::Cancelled => {
                    self.farm.job_finished(&self.dut, &job_id);
                    tracing::info!("boot loop {n} was cancelled: the training starts again");
                    return;
                }
                RunOutcome::NotStarted(e) => {
                    self.farm.job_finished(&self.dut, &job_id);
                    tracing::warn!("boot loop {n} could not start: {e}");
                    self.wait_in(DutState::Training, NOT_STARTED_WAIT).await;
                    return;
                }
            };
            if let Some(p) = info.progress.as_mut() {
                self.record(p, &job_id, &report);
            }
            self.publish(&info);
            self.farm.job_finished(&self.dut, &job_id);
        }

        // 3. Verdict.
        let passes = info
            .progress
            .as_ref()
            .and_then(|p| p.statuses.get(JobStatus::Pass.as_str()).copied())
            .unwrap_or(0);
        if count == 0 || passes >= self.opts.qualifying_boot_count {
            tracing::info!(
                "training passed: {passes}/{count} boot loops passed, {} needed",
                self.opts.qualifying_boot_count
            );
            if !self.apply(DutEvent::TrainingPassed).await && self.still(DutState::Training) {
                // MarsDB refused the write: try again later.
                self.wait_in(DutState::Training, delay).await;
            }
        } else {
            tracing::warn!(
                "training failed: {passes}/{count} boot loops passed, {} needed; training again",
                self.opts.qualifying_boot_count
            );
            self.apply(DutEvent::TrainingFailed).await;
        }
    }

    /// One boot loop; a PASS returns the DUT to IDLE, anything else to
    /// TRAINING.
    async fn quick_check(&self) {
        if !self.opts.quick_checks_run() {
            self.apply(DutEvent::QuickCheckPassed).await;
            return;
        }
        let mut info = TrainingInfo {
            state: TrainingState::QuickCheck,
            progress: Some(TrainingProgress {
                is_registered: true,
                boot_loop_counts: 1,
                qualifying_rate: 1,
                current_loop_count: 1,
                statuses: BTreeMap::new(),
                loops: Vec::new(),
            }),
        };
        self.publish(&info);
        let (job_id, out) = self.run_job(JobKind::QuickCheck, "quick_check", 1).await;
        match out {
            RunOutcome::Ended(r) => {
                // The reference counts no status for a quick check.
                if let Some(p) = info.progress.as_mut() {
                    self.push_loop(p, &job_id, &r);
                }
                self.publish(&info);
                if passed(&r) {
                    tracing::info!("quick check passed");
                    self.apply(DutEvent::QuickCheckPassed).await;
                } else {
                    tracing::warn!("quick check failed ({}): back to training", status_name(&r));
                    self.apply(DutEvent::QuickCheckFailed).await;
                }
            }
            RunOutcome::Cancelled => {
                // Cancelled because the DUT was retired, made unfit, removed
                // or lost its port: those edges already say where it goes.
                // Cancelled by an admin: it did not pass.
                let db = self.farm.db.snapshot();
                let admin = db.duts.get(&self.dut).is_some_and(|d| {
                    !d.is_retired && d.ready_for_service && d.pdu_port().is_some()
                });
                if admin {
                    tracing::warn!("the quick check was cancelled: back to training");
                    self.apply(DutEvent::JobCancelled).await;
                }
            }
            RunOutcome::NotStarted(e) => {
                tracing::warn!("the quick check could not start: {e}");
                self.wait_in(DutState::QuickCheck, NOT_STARTED_WAIT).await;
            }
        }
        self.farm.job_finished(&self.dut, &job_id);
    }

    /// Adds a loop's report to the progress (keeping the end of its log
    /// when it did not pass).
    /// Adds a boot loop's report to the progress: its status is counted
    /// and the loop listed ([`Self::push_loop`]).
    fn record(&self, progress: &mut TrainingProgress, job_id: &str, r: &InternalJobReport) {
        *progress
            .statuses
            .entry(status_name(r).to_string())
            .or_default() += 1;
        self.push_loop(progress, job_id, r);
    }

    /// Lists a job's report in `progress.loops` (keeping the end of its log
    /// when it did not pass). Called before the job `job_id` is released,
    /// while its runtime record still says whether the DUT fetched its boot
    /// script.
    fn push_loop(&self, progress: &mut TrainingProgress, job_id: &str, r: &InternalJobReport) {
        let status = status_name(r).to_string();
        let keep = !passed(r);
        let firmware_booted = self
            .farm
            .dut_runtime(&self.dut)
            .and_then(|rt| rt.job)
            .is_some_and(|j| j.job_id == job_id && j.firmware_booted);
        progress.loops.push(TrainingLoop {
            status,
            seconds_elapsed: r.elapsed.as_secs_f64(),
            energy_consumed_check: None,
            firmware_booted_check: firmware_booted,
            console_data_received_check: r.console_data_received,
            has_log: keep,
            log: keep.then(|| Arc::from(tail(&r.log, self.opts.max_loop_log))),
        });
    }
}

/// How long to wait before trying again when a job could not start (no
/// job engine, the DUT busy).
const NOT_STARTED_WAIT: Duration = Duration::from_secs(5);

/// The last `max` bytes of `s` (at a character boundary).
fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn tail_keeps_the_end_at_a_char_boundary() {
        assert_eq!(tail("abcdef", 10), "abcdef");
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aéb", 2), "b");
    }

    #[test]
    fn file_templates_are_read_at_each_load_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.yml.j2");
        let t = JobTemplate::File(p.clone());
        let e = t.load().unwrap_err();
        assert!(e.contains("t.yml.j2"), "{e}");
        std::fs::write(&p, "one").unwrap();
        assert_eq!(t.load().unwrap(), "one");
        std::fs::write(&p, "two").unwrap();
        assert_eq!(t.load().unwrap(), "two");
        assert_eq!(JobTemplate::Text(Arc::from("x")).load().unwrap(), "x");
    }
}
