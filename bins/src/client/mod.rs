//! The executor client behind `executorctl`: job submission (EX C.1), the
//! callback session (EX C.2, C.3, C.5) and the DUT listings.
//!
//! * [`run_job`] submits a job and streams its session to the terminal; it
//!   returns the [`JobStatus`] whose code is `executorctl run`'s exit code.
//! * [`submit`] and [`session`] are its two halves, usable on their own.
//! * [`duts`] lists DUTs and shows one.
//!
//! The share directory (`-s`) travels as the submission's tarball part and
//! MinIO credentials and groups (`-a`, `-g`) as `minio.credentials` and
//! `minio.groups`, exactly as the reference client sends them. After
//! `session_end`, the job bucket is mirrored back into the share directory
//! ([`share::mirror_back`]), without any external `mcli`.

pub mod duts;
pub mod escape;
pub mod session;
pub mod share;
pub mod submit;
pub mod tty;

use std::path::PathBuf;
use std::time::Duration;

pub use vivian_core::job::JobStatus;

/// Default executor URL, as in the reference client.
pub const DEFAULT_EXECUTOR_URL: &str = "http://10.42.0.1/";

/// How long the client waits for the executor to connect back (reference:
/// 15 s).
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything `executorctl run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Executor base URL.
    pub executor_url: String,
    /// The job description file.
    pub job_path: PathBuf,
    /// `-w`: wait for a DUT when all are busy (retry on 409).
    pub wait: bool,
    /// `-c`: host the executor connects back to.
    pub callback_host: Option<String>,
    /// `-t`: tags (override the job's target).
    pub machine_tags: Vec<String>,
    /// `-i`: DUT id (overrides the job's target).
    pub machine_id: Option<String>,
    /// `-s`: share directory.
    pub share_directory: Option<PathBuf>,
    /// `-j`: job id.
    pub job_id: Option<String>,
    /// `-a`: `access_key:secret_key`.
    pub minio_auth: Option<String>,
    /// `-g`: MinIO groups.
    pub minio_groups: Vec<String>,
    /// How long to wait for the executor to connect back.
    pub callback_timeout: Duration,
    /// Forward stdin to the DUT when it is a terminal.
    pub interactive: bool,
}

impl RunOptions {
    /// Options for running `job_path` on `executor_url` with the defaults.
    pub fn new(executor_url: impl Into<String>, job_path: impl Into<PathBuf>) -> Self {
        RunOptions {
            executor_url: executor_url.into(),
            job_path: job_path.into(),
            wait: false,
            callback_host: None,
            machine_tags: Vec::new(),
            machine_id: None,
            share_directory: None,
            job_id: None,
            minio_auth: None,
            minio_groups: Vec::new(),
            callback_timeout: DEFAULT_CALLBACK_TIMEOUT,
            interactive: true,
        }
    }
}

/// Joins the executor base URL and an API path (`/api/v1/...`).
pub fn api_url(base: &str, path: &str) -> String {
    format!("{}{}", base.trim_end_matches('/'), path)
}

/// Submits the job and runs its session; prints the console to stdout and
/// problems to stderr. Never panics on executor input; every failure maps
/// to the reference's status (SETUP_FAIL for a refused or impossible
/// submission, UNKNOWN when the executor never connects back, INCOMPLETE
/// when the session ends without a verdict).
pub async fn run_job(opts: &RunOptions) -> JobStatus {
    let prepared = match submit::prepare(opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ERROR: {e:#}");
            return JobStatus::SetupFail;
        }
    };
    let accepted = match submit::submit(opts, prepared).await {
        Ok(a) => a,
        Err(status) => return status,
    };
    let stream = match accepted.wait_for_callback(opts.callback_timeout).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ERROR: {e}");
            return JobStatus::Unknown;
        }
    };
    let share_dir = opts.share_directory.clone();
    let outcome = session::run_then(stream, opts.interactive, |o| async move {
        if let Some(dir) = share_dir {
            share::mirror_back_reporting(&dir, o.job_bucket.as_ref()).await;
        }
    })
    .await;
    outcome.print_pattern_summary();
    outcome.status
}
