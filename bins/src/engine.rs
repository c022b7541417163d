//! The job engine: runs the jobs the farm accepted (EX D.6, D.7).
//!
//! One tokio task per job. The sequence:
//!
//! 1. connect back to the submitter (the callback of the submission) and
//!    open the job's log file (its path is the first control message);
//! 2. render the job template for the DUT and parse it; refuse a job past
//!    its deadline;
//! 3. attach to the DUT's console (before power, so nothing is lost);
//! 4. for each boot: publish the deployment (`start`, then `continue`) for
//!    `boot.ipxe`, power the port OFF then ON (the PDU layer waits out the
//!    minimum off time), then stream the console to the client, match the
//!    console patterns line by line and apply the timeouts;
//! 5. a `session_end` match, an exhausted retry budget, the overall timeout
//!    or a cancel ends the session: power OFF, `session_end` with the
//!    verdict (except on cancel: the client then reports INCOMPLETE);
//! 6. teardown: the connection is half-closed after `session_end` and the
//!    engine waits for the client to close it (it may be downloading the
//!    job bucket), at most the job's `infra_teardown`, then closes it; the
//!    DUT goes back to IDLE, or to TRAINING when it matched
//!    `machine_unfit_for_service`.
//!
//! Failures are reported to the client as control messages that say whose
//! fault they are: `infrastructure error` (PDU, console, ...), `job
//! definition error` (the job description) or the DUT's own doing
//! (timeouts, patterns).
//!
//! The farm's own jobs (Sergent Hartman's registration, boot loops and
//! quick checks, [`JobRunner::run_internal_job`]) run the same session
//! without a client: there is no callback connection, everything goes to
//! the job's log file (and a bounded copy of its end is returned with the
//! verdict), and `machine_unfit_for_service` is left to the caller. With
//! `SERGENT_HARTMAN_QUIET` ([`InternalJob::quiet`]) they write no log file
//! and log at debug level only.
//!
//! Only the console output that follows a boot's power-on is matched
//! against the job's patterns: what the console yields before (the end of
//! an earlier boot still in its buffers, output while the port is being
//! switched) goes to the client and the log but decides nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use vivian_core::console::ConsoleSource;
use vivian_core::farm::{
    AcceptedJob, Farm, FarmError, InternalJob, InternalJobReport, JobRunner, JobSubmission,
};
use vivian_core::job::{
    ConsoleEvent, DeploymentState, Job, JobStatus, MachineVars, ParseOptions, RetryDecision,
    TemplateVars, TimeoutName,
};
use vivian_core::marsdb::MarsDbExt;
use vivian_core::netboot::Deployment as BootDeployment;
use vivian_core::pdu::PortState;
use vivian_core::protocol::{self, Message, Payload, Severity};

/// How long the engine tries to connect back to a client.
const CALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The built-in registration job of Sergent Hartman, used unless
/// `EXECUTOR_REGISTRATION_JOB` names a file
/// (`examples/jobs/registration.yml.j2`).
pub const REGISTRATION_JOB: &str = include_str!("../../examples/jobs/registration.yml.j2");

/// The built-in boot-loop job of Sergent Hartman (training loops and quick
/// checks), used unless `EXECUTOR_BOOTLOOP_JOB` names a file
/// (`examples/jobs/bootloop.yml.j2`).
pub const BOOTLOOP_JOB: &str = include_str!("../../examples/jobs/bootloop.yml.j2");

/// Sergent Hartman's options from the configuration (`SERGENT_HARTMAN_*`),
/// with the built-in job templates unless `EXECUTOR_REGISTRATION_JOB` /
/// `EXECUTOR_BOOTLOOP_JOB` name files.
pub fn training_options(
    config: &vivian_core::config::Config,
) -> vivian_core::farm::TrainingOptions {
    vivian_core::farm::TrainingOptions::from_config(config, REGISTRATION_JOB, BOOTLOOP_JOB)
}

/// The most of an internal job's log returned with its report (its end is
/// kept; the log file has everything).
const INTERNAL_LOG_MAX: usize = 1024 * 1024;

/// Options of the [`JobEngine`].
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// `MINIO_URL`, for the `minio_url` template variable.
    pub minio_url: String,
    /// `EXECUTOR_JOB__*` variables, lower-case names without the prefix.
    pub job_env: BTreeMap<String, String>,
    /// Parse options (default `machine_unfit_for_service` pattern).
    pub parse: ParseOptions,
    /// Folder of the per-job log files.
    pub log_dir: PathBuf,
    /// The artifact cache (`EXECUTOR_ARTIFACT_CACHE_ROOT`), if enabled.
    pub artifacts: Option<Arc<crate::artifacts::Artifacts>>,
}

/// The job engine: a [`JobRunner`] that runs jobs on the farm's DUTs.
pub struct JobEngine {
    console: Arc<dyn ConsoleSource>,
    options: EngineOptions,
    job_buckets: Option<Arc<crate::job_bucket::JobBuckets>>,
}

impl JobEngine {
    /// An engine reading DUT consoles from `console`.
    pub fn new(console: Arc<dyn ConsoleSource>, options: EngineOptions) -> Self {
        JobEngine {
            console,
            options,
            job_buckets: None,
        }
    }

    /// Gives every user job a bucket on `buckets` (EX C.4); `None`: jobs
    /// run without one and MinIO groups are refused.
    pub fn with_job_buckets(mut self, buckets: Option<Arc<crate::job_bucket::JobBuckets>>) -> Self {
        self.job_buckets = buckets;
        self
    }
}

#[async_trait]
impl JobRunner for JobEngine {
    async fn start_job(&self, farm: Arc<Farm>, job: AcceptedJob) -> Result<(), FarmError> {
        crate::job_bucket::check_submission(self.job_buckets.as_ref(), &job.submission).await?;
        let span = tracing::info_span!("job", dut = %job.dut, job = %job.submission.job_id);
        let session = Session {
            farm,
            console: self.console.clone(),
            options: self.options.clone(),
            job,
            internal: None,
            bucket: crate::job_bucket::SessionBucket::new(self.job_buckets.clone()),
        };
        tokio::spawn(session.run().instrument(span));
        Ok(())
    }

    async fn run_internal_job(
        &self,
        farm: Arc<Farm>,
        job: InternalJob,
    ) -> Result<InternalJobReport, FarmError> {
        let span = tracing::info_span!("job", dut = %job.dut, job = %job.job_id);
        let (tx, rx) = oneshot::channel();
        let session = Session {
            farm,
            console: self.console.clone(),
            options: self.options.clone(),
            job: AcceptedJob {
                submission: JobSubmission {
                    version: 1,
                    job_id: job.job_id,
                    job_text: job.job_text,
                    ..JobSubmission::default()
                },
                dut: job.dut,
                cancel: job.cancel,
            },
            internal: Some(Internal {
                quiet: job.quiet,
                vars: job.vars,
                capture: Arc::new(Mutex::new(Capture::default())),
                report: Mutex::new(Some(tx)),
            }),
            bucket: crate::job_bucket::SessionBucket::new(None),
        };
        // A task of its own: the session ends (port OFF) even if the
        // caller stops waiting.
        tokio::spawn(session.run().instrument(span));
        rx.await.map_err(|_| {
            FarmError::Internal("the internal job's task ended without a report".into())
        })
    }
}

/// What a job the farm runs itself (no client) adds to a session.
struct Internal {
    /// `SERGENT_HARTMAN_QUIET`: no job log file, messages at debug level.
    quiet: bool,
    /// Extra template variables.
    vars: BTreeMap<String, serde_json::Value>,
    /// The end of the log, and whether the console said anything.
    capture: Arc<Mutex<Capture>>,
    /// Where the report goes.
    report: Mutex<Option<oneshot::Sender<InternalJobReport>>>,
}

/// A bounded copy of the end of a job's log.
#[derive(Default)]
struct Capture {
    text: Vec<u8>,
    console_data: bool,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        self.text.extend_from_slice(data);
        if self.text.len() > 2 * INTERNAL_LOG_MAX {
            let cut = self.text.len() - INTERNAL_LOG_MAX;
            self.text.drain(..cut);
        }
    }

    fn log(&self) -> String {
        let start = self.text.len().saturating_sub(INTERNAL_LOG_MAX);
        String::from_utf8_lossy(&self.text[start..]).into_owned()
    }
}

/// Where a control message's problem comes from.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Infrastructure,
    JobDefinition,
}

impl Fault {
    fn prefix(self) -> &'static str {
        match self {
            Fault::Infrastructure => "infrastructure error",
            Fault::JobDefinition => "job definition error",
        }
    }
}

/// Sends messages to the client and to the job's log file. Writes to the
/// client stop at the first failure (a client that went away); the log
/// file gets everything.
struct Reporter {
    tx: mpsc::UnboundedSender<Message>,
}

impl Reporter {
    fn ctrl(&self, text: impl Into<String>, severity: Severity) {
        let _ = self.tx.send(Message::control(text, severity));
    }
    fn info(&self, text: impl Into<String>) {
        self.ctrl(text, Severity::Info);
    }
    fn error(&self, fault: Fault, text: impl std::fmt::Display) {
        self.ctrl(format!("{}: {text}", fault.prefix()), Severity::Error);
    }
    fn io(&self, data: &[u8]) {
        let _ = self.tx.send(Message::job_io(data.to_vec()));
    }
    fn session_end(&self, status: JobStatus) {
        let _ = self.tx.send(Message::session_end(status));
    }
}

/// Writes every message to `log` (console bytes raw, control messages as
/// `[vivian] ...` lines), to `capture` and to the client until it fails.
async fn pump_messages(
    mut rx: mpsc::UnboundedReceiver<Message>,
    mut client: Option<tokio::net::tcp::OwnedWriteHalf>,
    mut log: Option<tokio::fs::File>,
    capture: Option<Arc<Mutex<Capture>>>,
) {
    while let Some(msg) = rx.recv().await {
        if log.is_some() || capture.is_some() {
            let text: Vec<u8> = match &msg.payload {
                Payload::JobIo(data) => data.clone(),
                Payload::Control(c) => {
                    format!("\n[vivian {:?}] {}\n", c.severity, c.msg).into_bytes()
                }
                Payload::SessionEnd(s) => {
                    format!("\n[vivian] session end: {}\n", s.status).into_bytes()
                }
            };
            if let Some(c) = &capture {
                c.lock().unwrap().push(&text);
            }
            if let Some(file) = log.as_mut() {
                if file.write_all(&text).await.is_err() {
                    log = None;
                }
            }
        }
        if let Some(w) = client.as_mut() {
            if protocol::write_message(w, &msg).await.is_err() {
                tracing::info!("the client went away; the job goes on, logged to its file");
                client = None;
            } else if matches!(msg.payload, Payload::SessionEnd(_)) {
                // `session_end` is the last message: half-close (EX C.4);
                // what follows (teardown) goes to the log only.
                let _ = w.shutdown().await;
                client = None;
            }
        }
    }
    if let Some(mut f) = log {
        let _ = f.flush().await;
        let _ = f.sync_all().await;
    }
    if let Some(mut w) = client {
        let _ = w.shutdown().await;
    }
}

/// Replaces what cannot go in a file name.
fn safe_file_name(job_id: &str) -> String {
    let s: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("job{s}")
    } else {
        s
    }
}

struct Session {
    farm: Arc<Farm>,
    console: Arc<dyn ConsoleSource>,
    options: EngineOptions,
    job: AcceptedJob,
    /// Set for a job the farm runs itself (no client).
    internal: Option<Internal>,
    /// The job's bucket (EX C.4).
    bucket: crate::job_bucket::SessionBucket,
}

/// How a boot ended.
enum BootEnd {
    SessionEnd,
    Reboot {
        expired: Vec<TimeoutName>,
        requested: bool,
    },
    Overall,
    Cancelled,
}

impl Session {
    async fn run(self) {
        let dut = self.job.dut;
        let job_id = self.job.submission.job_id.clone();
        let started = std::time::Instant::now();
        let outcome = self.run_inner().await;
        if let Some(internal) = &self.internal {
            // The caller (Sergent Hartman) applies the result and releases
            // the DUT.
            let c = internal.capture.lock().unwrap();
            let report = InternalJobReport {
                status: match outcome {
                    Some(Outcome::Verdict { status, .. }) => Some(status),
                    Some(Outcome::SetupFail) | None => Some(JobStatus::SetupFail),
                    Some(Outcome::Cancelled) => None,
                },
                console_data_received: c.console_data,
                elapsed: started.elapsed(),
                log: c.log(),
            };
            drop(c);
            if let Some(tx) = internal.report.lock().unwrap().take() {
                let _ = tx.send(report);
            }
            if internal.quiet {
                tracing::debug!("job over");
            } else {
                tracing::info!("job over");
            }
            return;
        }
        let unfit = matches!(outcome, Some(Outcome::Verdict { unfit: true, .. }));
        if unfit {
            let r = self
                .farm
                .db()
                .update(move |db| -> Result<(), std::convert::Infallible> {
                    if let Some(d) = db.duts.get_mut(&dut) {
                        d.ready_for_service = false;
                    }
                    Ok(())
                })
                .await;
            match r {
                Ok(()) => {
                    tracing::warn!("the DUT matched machine_unfit_for_service: back to training")
                }
                Err(e) => tracing::error!("cannot mark the DUT unfit for service: {e}"),
            }
        }
        self.farm.job_finished(&dut, &job_id);
        tracing::info!("job over");
    }

    /// Runs the job; returns how it ended (`None`: the client could not be
    /// reached, nothing ran).
    async fn run_inner(&self) -> Option<Outcome> {
        let sub = &self.job.submission;
        let dut = self.job.dut;

        // 1. The client (none for internal jobs) and the log file.
        let client = match &self.internal {
            Some(_) => None,
            None => Some(connect_client(&sub.callback_host, sub.callback_port).await),
        };
        let (client_read, client_write) = match client {
            None => (None, None),
            Some(Ok(s)) => {
                tracing::debug!("connected back to the client");
                let (r, w) = s.into_split();
                (Some(r), Some(w))
            }
            Some(Err(e)) => {
                tracing::warn!("cannot connect back to the client: {e}");
                (None, None)
            }
        };
        let (log_path, log) = if self.internal.as_ref().is_some_and(|i| i.quiet) {
            (PathBuf::from("none, SERGENT_HARTMAN_QUIET"), None)
        } else {
            open_log(
                &self.options.log_dir,
                &format!(
                    "{}.{}",
                    safe_file_name(&sub.job_id),
                    dut.to_string().replace(':', "")
                ),
            )
            .await
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let capture = self.internal.as_ref().map(|i| i.capture.clone());
        let pump = tokio::spawn(pump_messages(rx, client_write, log, capture));
        let report = Reporter { tx };
        report.info(format!(
            "Job {} on {} (log: {})",
            sub.job_id,
            dut,
            log_path.display()
        ));
        if client_read.is_none() && self.internal.is_none() {
            // Nobody to stream to: the reference gives up on such jobs.
            report.error(Fault::Infrastructure, "cannot connect back to the client");
            drop(report);
            let _ = pump.await;
            return None;
        }

        // Client input, forwarded to the console by the boot loop; the
        // reader also tells when the client closed the connection.
        let (input_tx, input_rx) = mpsc::channel::<Vec<u8>>(64);
        let client_reader = client_read.map(|r| tokio::spawn(read_client(r, input_tx)));
        let mut teardown_limit = vivian_core::job::Timeouts::default()
            .infra_teardown
            .duration();
        let outcome = self.session(&report, input_rx, &mut teardown_limit).await;
        match &outcome {
            Outcome::Verdict { status, .. } => {
                report.info(format!("Job finished with status {status}"));
                let _ = report
                    .tx
                    .send(self.bucket.session_end_message(*status, None).await);
            }
            Outcome::SetupFail => {
                report.session_end(JobStatus::SetupFail);
            }
            Outcome::Cancelled => {
                report.ctrl("The job was cancelled", Severity::Warn);
            }
        }
        // Teardown (EX C.4): after `session_end` the connection is
        // half-closed; the client closes it once it has what it needs (the
        // job bucket), bounded by `infra_teardown` or a cancel.
        if let Some(reader) = client_reader {
            if matches!(outcome, Outcome::Cancelled) {
                reader.abort();
            } else {
                wait_for_client_close(reader, teardown_limit, &self.job.cancel, &report).await;
            }
        }
        drop(report);
        let _ = pump.await;
        self.bucket.teardown().await;
        Some(outcome)
    }

    async fn session(
        &self,
        report: &Reporter,
        mut input_rx: mpsc::Receiver<Vec<u8>>,
        teardown_limit: &mut Option<Duration>,
    ) -> Outcome {
        let sub = &self.job.submission;
        let dut = self.job.dut;
        let db = self.farm.db().snapshot();
        let Some(record) = db.duts.get(&dut).cloned() else {
            report.error(
                Fault::Infrastructure,
                format!("the DUT {dut} is gone from MarsDB"),
            );
            return Outcome::SetupFail;
        };

        // 2. The job description, rendered for this DUT.
        let machine = MachineVars {
            id: dut.to_string(),
            base_name: Some(record.base_name.clone()),
            full_name: db.full_name(&dut, self.farm.farm_name()),
            hostname: None,
            tags: record.tags.clone(),
            manual_tags: record.manual_tags.clone(),
            mac_address: Some(record.mac_address.to_string()),
            ip_address: Some(record.ip_address.to_string()),
            local_tty_device: record.local_tty_device.clone(),
            firmware_boot_time: None,
            boot_sequence_power: None,
            ready_for_service: record.ready_for_service,
            comment: record.comment.clone(),
        };
        let bucket_vars = match self
            .bucket
            .setup(sub, &dut.to_string(), record.ip_address.into())
            .await
        {
            Ok(v) => v,
            Err(e) => {
                report.error(Fault::Infrastructure, e);
                return Outcome::SetupFail;
            }
        };
        let mut vars =
            TemplateVars::for_dut(&machine, &self.options.minio_url, bucket_vars.as_ref());
        // `EXECUTOR_JOB__*` variables, already stripped of their prefix
        // (they do not replace the variables set above).
        for (k, v) in &self.options.job_env {
            if !k.is_empty() && vars.get(k).is_none() {
                vars.set(k, v);
            }
        }
        if let Some(internal) = &self.internal {
            for (k, v) in &internal.vars {
                vars.set(k, v);
            }
        }
        let job = match Job::from_template(&sub.job_text, &vars, &self.options.parse) {
            Ok(j) => j,
            Err(e) => {
                report.error(Fault::JobDefinition, e);
                return Outcome::SetupFail;
            }
        };
        tracing::debug!("job rendered and parsed");
        *teardown_limit = job.timeouts.infra_teardown.duration();
        if job.is_past(chrono::Utc::now()) {
            report.error(
                Fault::JobDefinition,
                "the job's deadline has passed: it was not started",
            );
            return Outcome::SetupFail;
        }
        if sub.tarball.is_some() && !self.bucket.enabled() {
            report.ctrl(
                "This executor has no job bucket support yet: the share directory was not \
                 uploaded to the DUT and nothing will be mirrored back",
                Severity::Warn,
            );
        }

        // 3. Power and console.
        let Some((pdu_name, port)) = record.pdu_port() else {
            report.error(
                Fault::Infrastructure,
                format!("the DUT {dut} has no PDU port"),
            );
            return Outcome::SetupFail;
        };
        let Some(pdu) = self.farm.pdus().get(pdu_name) else {
            report.error(Fault::Infrastructure, format!("unknown PDU {pdu_name}"));
            return Outcome::SetupFail;
        };
        let port = port.as_str().to_string();
        let attachment = match self.console.attach(&dut.to_string()).await {
            Ok(a) => a,
            Err(e) => {
                report.error(Fault::Infrastructure, format!("console of {dut}: {e}"));
                return Outcome::SetupFail;
            }
        };
        tracing::debug!("console attached");
        let mut console_read = attachment.reader;
        let mut console_write = attachment.writer;

        self.farm.job_running(&dut, &sub.job_id);
        let mut timeouts = job.timeouts.clone();
        let mut matcher = job.console_matcher();
        timeouts.on_job_start(std::time::Instant::now());

        let mut first = true;
        let mut buf = vec![0u8; 16 * 1024];
        let mut console_open = true;
        // The DUT printed something since a power-on of this job.
        let mut console_data = false;
        let outcome = 'job: loop {
            let state: &DeploymentState = if first {
                &job.deployment.start
            } else {
                &job.deployment.continue_
            };
            // With an artifact cache: fetch the boot's artifacts, boot from the cache.
            let boot = match crate::artifacts::job_boot(
                self.options.artifacts.as_ref(),
                &dut.to_string(),
                state,
                boot_of(state),
                &job.timeouts,
                &self.job.cancel,
                &|m| report.info(m),
            )
            .await
            {
                Ok(boot) => boot,
                Err(e) if e.is_cancelled() => break 'job Outcome::Cancelled,
                Err(e) => {
                    report.error(Fault::Infrastructure, e);
                    break 'job Outcome::SetupFail;
                }
            };
            self.farm.set_job_boot(&dut, &sub.job_id, boot);
            report.info(if first {
                "Powering the DUT off, then on, with the start deployment".to_string()
            } else {
                "Rebooting the DUT with the continue deployment".to_string()
            });
            first = false;
            // The console is read all along the power cycle, but only what
            // comes after the power-on is matched: lines the DUT printed
            // before (in an earlier boot, e.g. "Registration complete" of
            // the discovery boot, still in the console's buffers) must not
            // decide this boot's verdict. They still reach the client and
            // the log.
            let mut pre_boot = PreBoot {
                console: &mut console_read,
                open: &mut console_open,
                buf: &mut buf,
                report,
                bytes: 0,
            };
            if let Err(e) = pre_boot
                .during(pdu.set_port_state(&port, PortState::Off))
                .await
            {
                report.error(
                    Fault::Infrastructure,
                    format!("cannot switch {pdu_name}/{port} OFF: {e}"),
                );
                break 'job Outcome::SetupFail;
            }
            pre_boot.drain_ready().await;
            if let Err(e) = pre_boot
                .during(pdu.set_port_state(&port, PortState::On))
                .await
            {
                report.error(
                    Fault::Infrastructure,
                    format!("cannot switch {pdu_name}/{port} ON: {e}"),
                );
                let _ = pdu.set_port_state(&port, PortState::Off).await;
                break 'job Outcome::SetupFail;
            }
            if pre_boot.bytes > 0 {
                report.info(format!(
                    "{} bytes of console output from before the power-on were not matched \
                     against the console patterns",
                    pre_boot.bytes
                ));
            }
            timeouts.on_power_on(std::time::Instant::now());
            matcher.reset_per_boot();

            let end = loop {
                let sleep_until = timeouts
                    .next_expiry()
                    .map(Instant::from_std)
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                tokio::select! {
                    _ = self.job.cancel.cancelled() => break BootEnd::Cancelled,
                    _ = tokio::time::sleep_until(sleep_until) => {
                        let expired = timeouts.expired(std::time::Instant::now());
                        if expired.contains(&TimeoutName::Overall) {
                            break BootEnd::Overall;
                        }
                        if !expired.is_empty() {
                            break BootEnd::Reboot { expired, requested: false };
                        }
                    }
                    n = console_read.read(&mut buf), if console_open => match n {
                        Ok(0) | Err(_) => {
                            tracing::debug!("console stream closed");
                            console_open = false;
                        }
                        Ok(n) => {
                            let data = &buf[..n];
                            if !console_data {
                                console_data = true;
                                if let Some(i) = &self.internal {
                                    i.capture.lock().unwrap().console_data = true;
                                }
                            }
                            let now = std::time::Instant::now();
                            let feed = matcher.feed(data);
                            if feed.activity {
                                timeouts.on_console_activity(now);
                            }
                            let mut end = None;
                            // The client gets the console bytes up to the
                            // end of each matched line, then the match's
                            // message: a message never cuts a line in two
                            // (the rest of the chunk follows it).
                            let mut sent = 0;
                            for m in feed.matches {
                                report.io(&data[sent..m.end]);
                                sent = m.end;
                                report.info(m.control_text());
                                for ev in m.events {
                                    match ev {
                                        ConsoleEvent::SessionEnd => end = Some(BootEnd::SessionEnd),
                                        ConsoleEvent::SessionReboot if end.is_none() => {
                                            end = Some(BootEnd::Reboot { expired: vec![], requested: true });
                                        }
                                        ConsoleEvent::Watchdog { name, action } => {
                                            timeouts.apply_watchdog(&name, &action, now)
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            if sent < data.len() {
                                report.io(&data[sent..]);
                            }
                            if let Some(e) = end {
                                break e;
                            }
                        }
                    },
                    Some(input) = input_rx.recv() => {
                        let _ = console_write.write_all(&input).await;
                        let _ = console_write.flush().await;
                    }
                }
            };

            // Every boot ends with the power cut.
            if let Err(e) = pdu.set_port_state(&port, PortState::Off).await {
                report.error(
                    Fault::Infrastructure,
                    format!("cannot switch {pdu_name}/{port} OFF: {e}"),
                );
            }
            match end {
                BootEnd::SessionEnd => {
                    break 'job Outcome::Verdict {
                        status: matcher.status(),
                        unfit: matcher.machine_unfit_for_service(),
                    }
                }
                BootEnd::Cancelled => break 'job Outcome::Cancelled,
                BootEnd::Overall => {
                    report.ctrl("The overall timeout expired", Severity::Error);
                    break 'job Outcome::Verdict {
                        status: matcher.status(),
                        unfit: matcher.machine_unfit_for_service(),
                    };
                }
                BootEnd::Reboot { expired, requested } => {
                    let (decision, hits) = timeouts.end_boot(&expired, requested);
                    for hit in &hits {
                        let what = match &hit.name {
                            TimeoutName::BootCycle if requested && !expired.contains(&hit.name) => {
                                "session_reboot requested".to_string()
                            }
                            name => format!("timeout {name} expired"),
                        };
                        report.ctrl(
                            format!(
                                "Hit: {what} (retry {}/{}){}",
                                hit.retried,
                                hit.retries,
                                if hit.is_retrying {
                                    ""
                                } else {
                                    ": no retries left"
                                }
                            ),
                            Severity::Warn,
                        );
                    }
                    match decision {
                        RetryDecision::Reboot => continue 'job,
                        RetryDecision::Abort { .. } => {
                            break 'job Outcome::Verdict {
                                status: matcher.status(),
                                unfit: matcher.machine_unfit_for_service(),
                            }
                        }
                    }
                }
            }
        };
        outcome
    }
}

/// Reads a DUT's console while its port is being switched, before the
/// boot's power-on: the bytes go to the client and the log (as console
/// output) but are never matched against the console patterns.
struct PreBoot<'a> {
    console: &'a mut vivian_core::console::ConsoleReader,
    open: &'a mut bool,
    buf: &'a mut [u8],
    report: &'a Reporter,
    /// Bytes read so far.
    bytes: usize,
}

impl PreBoot<'_> {
    fn forward(&mut self, n: std::io::Result<usize>) {
        match n {
            Ok(0) | Err(_) => {
                tracing::debug!("console stream closed");
                *self.open = false;
            }
            Ok(n) => {
                self.report.io(&self.buf[..n]);
                self.bytes += n;
            }
        }
    }

    /// Runs `op` (a PDU command) while reading the console.
    async fn during<F: std::future::Future>(&mut self, op: F) -> F::Output {
        tokio::pin!(op);
        loop {
            if !*self.open {
                return op.await;
            }
            // Unbiased: a console that never stops talking cannot starve
            // the PDU command.
            tokio::select! {
                out = &mut op => return out,
                n = self.console.read(self.buf) => self.forward(n),
            }
        }
    }

    /// Reads what the console already holds, without waiting (bounded, for
    /// a console that never stops talking).
    async fn drain_ready(&mut self) {
        for _ in 0..1024 {
            if !*self.open {
                return;
            }
            tokio::select! {
                biased;
                n = self.console.read(self.buf) => self.forward(n),
                _ = std::future::ready(()) => return,
            }
        }
    }
}

enum Outcome {
    Verdict { status: JobStatus, unfit: bool },
    SetupFail,
    Cancelled,
}

fn boot_of(state: &DeploymentState) -> BootDeployment {
    BootDeployment {
        kernel: state.kernel.url.clone(),
        initrd: state.initramfs.first().map(|a| a.url.clone()),
        cmdline: state.cmdline(),
    }
}

async fn connect_client(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(CALLBACK_CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{host}:{port}: timed out"),
            )
        })??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Creates a new log file `<dir>/<stem>.log` (`<stem>-<n>.log` when that
/// exists: job ids given by clients need not be unique).
async fn open_log(dir: &Path, stem: &str) -> (PathBuf, Option<tokio::fs::File>) {
    let _ = tokio::fs::create_dir_all(dir).await;
    let mut path = dir.join(format!("{stem}.log"));
    for n in 1..1000 {
        match tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
        {
            Ok(f) => return (path, Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                path = dir.join(format!("{stem}-{n}.log"));
            }
            Err(e) => {
                tracing::warn!("cannot create the job log {}: {e}", path.display());
                return (path, None);
            }
        }
    }
    (path, None)
}

/// Waits for the client to close its connection after `session_end`
/// (`reader` ends), at most `limit` (the job's `infra_teardown`; `None`:
/// no limit) and until `cancel`. On expiry the connection is dropped and
/// the log says so.
async fn wait_for_client_close(
    reader: tokio::task::JoinHandle<()>,
    limit: Option<Duration>,
    cancel: &vivian_core::farm::CancelToken,
    report: &Reporter,
) {
    let abort = reader.abort_handle();
    let expiry = async {
        match limit {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = expiry => {
            abort.abort();
            report.ctrl(
                format!(
                    "The infra_teardown timeout ({} s) expired: the client did not close \
                     the connection after session_end; closing it",
                    limit.unwrap_or_default().as_secs_f64()
                ),
                Severity::Warn,
            );
        }
        _ = cancel.cancelled() => abort.abort(),
    }
}

/// Reads the client's frames and forwards `job_io` bytes as console input
/// (dropped once the session is over); ends when the client closes.
async fn read_client<R: AsyncRead + Unpin>(mut r: R, input: mpsc::Sender<Vec<u8>>) {
    loop {
        match protocol::read_message(&mut r).await {
            Ok(Some(msg)) => {
                if let Payload::JobIo(data) = msg.payload {
                    // After the session the input has nowhere to go.
                    let _ = input.send(data).await;
                }
            }
            Ok(None) => return,
            Err(e) if e.is_recoverable() => continue,
            Err(_) => return,
        }
    }
}
