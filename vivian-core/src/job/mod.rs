//! The job description (EX B): a Jinja2-templated YAML file, version 1.
//!
//! Pipeline: [`template::render`] with [`TemplateVars`], then
//! [`Job::parse`], which deserialises the YAML into wire structs that reject
//! unknown keys (the error names the path, e.g. `console_patterns.reboot`)
//! and validates them into [`Job`]: compiled [`Pattern`]s, [`Timeouts`], a
//! merged [`Deployment`].
//!
//! At run time the job runner drives two pure state machines built from a
//! job: [`Timeouts`] (start/stop/reset/expiry/retries, with `Instant`s
//! passed in) and [`ConsoleMatcher`] (console bytes in, matched patterns,
//! events and the verdict out).

use std::fmt;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

pub mod deployment;
pub mod patterns;
pub mod regex;
pub mod template;
pub mod timeouts;

pub use deployment::{
    Artifact, Cmdline, Deployment, DeploymentState, Fastboot, HttpStorageItem, Kernel,
};
pub use patterns::{
    verdict, ConsoleEvent, ConsoleFeed, ConsoleMatcher, ConsolePatterns, LineMatch, Pattern,
    WatchdogPatterns, DEFAULT_SESSION_END_REGEX,
};
pub use template::{is_secret_name, JobBucketVars, MachineVars, TemplateVars};
pub use timeouts::{RetryDecision, Timeout, TimeoutHit, TimeoutName, Timeouts, WatchdogAction};

/// Environment variable giving the default `machine_unfit_for_service`
/// console pattern.
pub const DEFAULT_UNFIT_ENV: &str = "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX";

/// Why a job description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The Jinja2 template does not render.
    #[error("the job template does not render{}: {message}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Template {
        /// Line of the template, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The rendered text is not valid YAML for the job schema: syntax
    /// error, unknown key, wrong type, missing field.
    #[error("invalid job description at {path}: {message}")]
    Schema {
        /// Dotted path of the offending key (`.` for the document).
        path: String,
        /// What is wrong, with the line and column when known.
        message: String,
    },
    /// A console pattern does not compile.
    #[error("Console pattern '{pattern}' is not a valid regular expression: {message}")]
    InvalidRegex {
        /// The pattern as written.
        pattern: String,
        /// The compiler's message.
        message: String,
    },
    /// A field has a well-typed but invalid value.
    #[error("invalid job description at {path}: {message}")]
    Invalid {
        /// Dotted path of the field.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// A job's final status, as sent in `session_end` and used as
/// `executorctl`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// `job_success` matched, `job_warn` did not.
    Pass = 0,
    /// `job_success` and `job_warn` matched.
    Warn = 1,
    /// The session ended and the job has no `job_success` pattern.
    Complete = 2,
    /// The session ended without `job_success` matching.
    Fail = 3,
    /// The session did not end properly.
    Incomplete = 4,
    /// The client could not tell (client-side failure).
    Unknown = 5,
    /// The job could not be set up.
    SetupFail = 6,
}

impl JobStatus {
    /// Every status, by exit code.
    pub const ALL: [JobStatus; 7] = [
        JobStatus::Pass,
        JobStatus::Warn,
        JobStatus::Complete,
        JobStatus::Fail,
        JobStatus::Incomplete,
        JobStatus::Unknown,
        JobStatus::SetupFail,
    ];

    /// The wire name (`PASS`, ..., `SETUP_FAIL`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pass => "PASS",
            JobStatus::Warn => "WARN",
            JobStatus::Complete => "COMPLETE",
            JobStatus::Fail => "FAIL",
            JobStatus::Incomplete => "INCOMPLETE",
            JobStatus::Unknown => "UNKNOWN",
            JobStatus::SetupFail => "SETUP_FAIL",
        }
    }

    /// Parses a wire name; unknown names give `UNKNOWN`, as in the reference.
    pub fn from_name(name: &str) -> JobStatus {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .unwrap_or(JobStatus::Unknown)
    }

    /// The process exit code (0 PASS ... 6 SETUP_FAIL).
    pub fn exit_code(self) -> i32 {
        self as i32
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which DUT may run the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// A DUT id (or full name).
    pub id: Option<String>,
    /// Tags the DUT must all have; empty means any DUT.
    pub tags: Vec<String>,
}

impl Target {
    /// Whether a DUT with these tags (for V2024+: `tags ∪ manual_tags ∪
    /// {"farm:<FARM_NAME>"}`) satisfies the target's tags (subset
    /// inclusion; no tags means any DUT). The id is checked by the caller.
    pub fn accepts_tags<S: AsRef<str>>(&self, dut_tags: &[S]) -> bool {
        self.tags
            .iter()
            .all(|t| dut_tags.iter().any(|d| d.as_ref() == t))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<Target: id={:?}, tags={:?}>", self.id, self.tags)
    }
}

/// The instant after which the job may not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub DateTime<Utc>);

impl Deadline {
    /// Whether `now` is past the deadline.
    pub fn is_past(&self, now: DateTime<Utc>) -> bool {
        now > self.0
    }

    /// Parses the forms a job may use: RFC 3339 / ISO 8601 with or without
    /// `T`, seconds, fraction and offset (no offset means UTC), a date alone,
    /// or a Unix timestamp.
    pub fn parse(text: &str) -> Option<Deadline> {
        let t = text.trim();
        if let Ok(d) = DateTime::parse_from_rfc3339(t) {
            return Some(Deadline(d.with_timezone(&Utc)));
        }
        for fmt in [
            "%Y-%m-%d %H:%M:%S%.f%:z",
            "%Y-%m-%dT%H:%M:%S%.f%:z",
            "%Y-%m-%d %H:%M:%S%.f%z",
            "%Y-%m-%dT%H:%M:%S%.f%z",
        ] {
            if let Ok(d) = DateTime::parse_from_str(t, fmt) {
                return Some(Deadline(d.with_timezone(&Utc)));
            }
        }
        for fmt in [
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M",
            "%Y-%m-%dT%H:%M",
        ] {
            if let Ok(d) = NaiveDateTime::parse_from_str(t, fmt) {
                return Some(Deadline(Utc.from_utc_datetime(&d)));
            }
        }
        if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
            return Some(Deadline(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?)));
        }
        let secs: f64 = t.parse().ok()?;
        if !secs.is_finite() {
            return None;
        }
        DateTime::from_timestamp_millis((secs * 1000.0) as i64).map(Deadline)
    }
}

/// Options of the parse that come from the executor's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// Default `machine_unfit_for_service` pattern (from
    /// `CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX`).
    pub default_machine_unfit_for_service: Option<String>,
}

impl ParseOptions {
    /// Reads the options from the process environment (an empty variable
    /// counts as unset).
    pub fn from_env() -> Self {
        ParseOptions {
            default_machine_unfit_for_service: std::env::var(DEFAULT_UNFIT_ENV)
                .ok()
                .filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetWire {
    id: Option<String>,
    tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobWire {
    version: Option<i64>,
    deadline: Option<Value>,
    target: Option<TargetWire>,
    timeouts: Option<timeouts::TimeoutsWire>,
    console_patterns: patterns::ConsolePatternsWire,
    deployment: deployment::DeploymentWire,
}

/// A validated job description.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Format version (1).
    pub version: u32,
    /// Deadline, if any.
    pub deadline: Option<Deadline>,
    /// Which DUT may run it.
    pub target: Target,
    /// Its timeouts, all stopped.
    pub timeouts: Timeouts,
    /// Its console patterns.
    pub console_patterns: ConsolePatterns,
    /// What the DUT boots.
    pub deployment: Deployment,
}

impl Job {
    /// Renders `template` with `vars`, then parses it.
    pub fn from_template(
        template: &str,
        vars: &TemplateVars,
        opts: &ParseOptions,
    ) -> Result<Job, JobError> {
        Job::parse(&template::render(template, vars)?, opts)
    }

    /// Parses an already rendered job description.
    pub fn parse(yaml: &str, opts: &ParseOptions) -> Result<Job, JobError> {
        let de = serde_yaml::Deserializer::from_str(yaml);
        let wire: JobWire = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let mut message = e.into_inner().to_string();
            // serde_yaml prefixes the path of the enclosing map; ours is
            // already in `path`.
            if let Some((prefix, rest)) = message.split_once(": ") {
                if path.starts_with(prefix) && !prefix.contains(' ') {
                    message = rest.to_string();
                }
            }
            JobError::Schema { path, message }
        })?;

        let version = match wire.version {
            None => 1,
            Some(v) if v >= 1 && v <= u32::MAX as i64 => v as u32,
            Some(v) => {
                return Err(JobError::Invalid {
                    path: "version".into(),
                    message: format!("the version must be a positive integer, got {v}"),
                })
            }
        };

        let deadline = match &wire.deadline {
            None | Some(Value::Null) => None,
            Some(v) => {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    other => format!("{other:?}"),
                };
                Some(Deadline::parse(&text).ok_or_else(|| JobError::Invalid {
                    path: "deadline".into(),
                    message: format!(
                        "'{text}' is not a date and time (expected e.g. \"2021-03-31 00:00:00\")"
                    ),
                })?)
            }
        };

        let target = match wire.target {
            None => {
                return Err(JobError::Invalid {
                    path: "target".into(),
                    message: "the job has no target. Use empty tags to mean 'any machines'.".into(),
                })
            }
            Some(t) => {
                let id = t.id.filter(|s| !s.is_empty());
                if id.is_none() && t.tags.is_none() {
                    return Err(JobError::Invalid {
                        path: "target".into(),
                        message: "The target is neither identified by tags or id. Use empty tags to mean 'any machines'."
                            .into(),
                    });
                }
                Target {
                    id,
                    tags: t.tags.unwrap_or_default(),
                }
            }
        };

        let timeouts = wire.timeouts.unwrap_or_default().validate()?;
        let console_patterns = wire
            .console_patterns
            .validate(opts.default_machine_unfit_for_service.as_deref())?;
        let deployment = wire.deployment.validate()?;

        Ok(Job {
            version,
            deadline,
            target,
            timeouts,
            console_patterns,
            deployment,
        })
    }

    /// Parses a job at submission time (EX B.1): rendered without a DUT
    /// ([`TemplateVars::for_submission`]) plus the executor's
    /// `EXECUTOR_JOB__*` variables from `env`. Used to find the target when
    /// the metadata has none and to refuse an invalid job or a past deadline
    /// before a DUT is chosen.
    pub fn parse_for_submission<I, K, V>(
        template: &str,
        minio_url: &str,
        env: I,
        opts: &ParseOptions,
    ) -> Result<Job, JobError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut vars = TemplateVars::for_submission(minio_url);
        vars.add_job_env(env);
        Job::from_template(template, &vars, opts)
    }

    /// Whether the job's deadline has passed at `now` (never without one).
    pub fn is_past(&self, now: DateTime<Utc>) -> bool {
        self.deadline.is_some_and(|d| d.is_past(now))
    }

    /// A fresh console matcher for this job; watchdogs without a timeout
    /// are inert.
    pub fn console_matcher(&self) -> ConsoleMatcher {
        ConsoleMatcher::new(
            self.console_patterns.clone(),
            self.timeouts.watchdogs.keys().cloned(),
        )
    }
}
