//! Rendering a job description template (EX B.1, B.6).
//!
//! A job file is a Jinja2 template rendered with [minijinja] before it is
//! parsed as YAML. Undefined variables render as empty strings, and
//! attribute lookups on them do not fail. An optional leading `#!jinja2`
//! line is removed first.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior};
use serde::Serialize;
use serde_json::Value;

use super::JobError;

/// Prefix of the environment variables exposed to job templates.
pub const JOB_ENV_PREFIX: &str = "EXECUTOR_JOB__";

/// The DUT's "safe attributes", exposed to templates as `machine` (and
/// partly as `machine_id`, `machine_tags`, `local_tty_device`,
/// `ready_for_service`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MachineVars {
    /// The DUT id (usually its MAC address).
    pub id: String,
    /// Base name (most significant characteristic).
    pub base_name: Option<String>,
    /// Full name, e.g. `myfarm-gfx10-1`.
    pub full_name: Option<String>,
    /// Hostname.
    pub hostname: Option<String>,
    /// Automatic tags.
    pub tags: Vec<String>,
    /// Tags set by the admin.
    pub manual_tags: Vec<String>,
    /// MAC address.
    pub mac_address: Option<String>,
    /// IP address.
    pub ip_address: Option<String>,
    /// Serial device on the DUT side (e.g. `ttyS0`).
    pub local_tty_device: Option<String>,
    /// Learnt firmware boot time in seconds.
    pub firmware_boot_time: Option<f64>,
    /// Learnt power during the boot sequence, in watts.
    pub boot_sequence_power: Option<f64>,
    /// Whether the DUT is ready for service.
    pub ready_for_service: bool,
    /// Admin comment.
    pub comment: Option<String>,
}

/// The job bucket's name and the DUT's credentials for it. `Debug`
/// masks the secret key.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JobBucketVars {
    /// Bucket name.
    pub name: String,
    /// Access key of the DUT's user.
    pub access_key: String,
    /// Secret key of the DUT's user.
    pub secret_key: String,
}

/// The variables a job template is rendered with. `Debug` masks the
/// values of variables whose name says they hold a secret (see
/// [`is_secret_name`]).
#[derive(Clone, Default, PartialEq)]
pub struct TemplateVars {
    vars: BTreeMap<String, Value>,
}

/// What `Debug` prints instead of a secret.
const MASK: &str = "<masked>";

/// Whether a variable's name says it holds a secret: it contains
/// `secret`, `password`, `token` or `private_key` (any case), as
/// `job_bucket_secret_key` and `EXECUTOR_JOB__*_TOKEN` variables do.
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    ["secret", "password", "token", "private_key"]
        .iter()
        .any(|w| n.contains(w))
}

impl std::fmt::Debug for JobBucketVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobBucketVars")
            .field("name", &self.name)
            .field("access_key", &self.access_key)
            .field("secret_key", &MASK)
            .finish()
    }
}

impl std::fmt::Debug for TemplateVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.vars {
            if is_secret_name(k) {
                m.entry(k, &MASK);
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

impl TemplateVars {
    /// No variables at all.
    pub fn new() -> Self {
        Self::default()
    }

    /// The variables of the job runner's render (EX B.6): `machine_id`,
    /// `machine`, `machine_tags`, `local_tty_device`, `ready_for_service`,
    /// `minio_url` and, with a bucket, `job_bucket`, `job_bucket_access_key`
    /// and `job_bucket_secret_key`.
    pub fn for_dut(machine: &MachineVars, minio_url: &str, bucket: Option<&JobBucketVars>) -> Self {
        let mut v = TemplateVars::new();
        v.set("machine_id", &machine.id);
        v.set("machine", machine);
        v.set("machine_tags", &machine.tags);
        v.set(
            "local_tty_device",
            machine.local_tty_device.as_deref().unwrap_or(""),
        );
        v.set("ready_for_service", machine.ready_for_service);
        v.set("minio_url", minio_url);
        if let Some(b) = bucket {
            v.set("job_bucket", &b.name);
            v.set("job_bucket_access_key", &b.access_key);
            v.set("job_bucket_secret_key", &b.secret_key);
        }
        v
    }

    /// The variables of the submission-time render, which has no DUT (EX
    /// B.1): `machine_id` is the literal `"machine_id"`, the tags are empty.
    /// Used only to find the job's target when the metadata has none.
    pub fn for_submission(minio_url: &str) -> Self {
        let mut v = TemplateVars::new();
        v.set("machine_id", "machine_id");
        v.set("machine_tags", Vec::<String>::new());
        v.set("minio_url", minio_url);
        v
    }

    /// Sets (or replaces) a variable. A value that cannot be represented
    /// (never the case for plain data) is set to null.
    pub fn set(&mut self, name: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.vars.insert(name.to_string(), value);
    }

    /// Adds every `EXECUTOR_JOB__<NAME>` of `env` as the variable `<name>`
    /// (lower-case), without replacing variables already set.
    pub fn add_job_env<I, K, V>(&mut self, env: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (k, v) in env {
            if let Some(name) = k.as_ref().strip_prefix(JOB_ENV_PREFIX) {
                if !name.is_empty() {
                    self.vars
                        .entry(name.to_lowercase())
                        .or_insert_with(|| Value::String(v.as_ref().to_string()));
                }
            }
        }
    }

    /// Adds variables by name, without replacing variables already set:
    /// for the executor's `EXECUTOR_JOB__*` variables once stripped of
    /// their prefix and lower-cased, as
    /// [`crate::config::Config::job_environment`] gives them.
    pub fn add_vars<I, K, V>(&mut self, vars: I)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        for (k, v) in vars {
            if !k.as_ref().is_empty() {
                self.vars
                    .entry(k.as_ref().to_string())
                    .or_insert_with(|| Value::String(v.as_ref().to_string()));
            }
        }
    }

    /// The value of a variable.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.vars.get(name)
    }
}

/// Removes an optional leading `#!jinja2` line.
pub fn strip_jinja2_shebang(text: &str) -> &str {
    match text.strip_prefix("#!jinja2") {
        Some(rest) if rest.is_empty() => rest,
        Some(rest) if rest.starts_with('\n') => &rest[1..],
        Some(rest) if rest.starts_with("\r\n") => &rest[2..],
        _ => text,
    }
}

/// Renders a job template with `vars`.
pub fn render(template: &str, vars: &TemplateVars) -> Result<String, JobError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.render_str(
        strip_jinja2_shebang(template),
        minijinja::Value::from(minijinja::value::Serde(&vars.vars)),
    )
    .map_err(|e| JobError::Template {
        line: e.line(),
        message: match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_masks_the_secrets() {
        let bucket = JobBucketVars {
            name: "job-bucket".into(),
            access_key: "DUTACCESS".into(),
            secret_key: "dut-secret-value".into(),
        };
        let dbg = format!("{bucket:?}");
        assert!(dbg.contains("DUTACCESS") && dbg.contains("job-bucket"));
        assert!(!dbg.contains("dut-secret-value"), "{dbg}");

        let machine = MachineVars::default();
        let mut v = TemplateVars::for_dut(&machine, "http://minio:9000", Some(&bucket));
        v.set("gitlab_token", "glpat-very-secret");
        v.set("kernel_url", "http://files/vmlinuz");
        let dbg = format!("{v:?}");
        assert!(dbg.contains("http://files/vmlinuz") && dbg.contains("DUTACCESS"));
        assert!(!dbg.contains("dut-secret-value"), "{dbg}");
        assert!(!dbg.contains("glpat-very-secret"), "{dbg}");
        // Rendering still sees the real values.
        assert_eq!(
            render("{{ job_bucket_secret_key }}", &v).unwrap(),
            "dut-secret-value"
        );
    }

    #[test]
    fn undefined_variables_render_empty_and_chain() {
        let v = TemplateVars::new();
        assert_eq!(
            render("a{{ nope }}b{{ nope.deeper.still }}c", &v).unwrap(),
            "abc"
        );
    }

    #[test]
    fn shebang_and_errors() {
        let mut v = TemplateVars::new();
        v.set("x", 3);
        assert_eq!(
            render("#!jinja2\nx={{ x }}", &v).unwrap(),
            "x={{ x }}".replace("{{ x }}", "3")
        );
        let e = render("a\n{% if %}", &v).unwrap_err();
        assert!(
            matches!(e, JobError::Template { line: Some(2), .. }),
            "{e:?}"
        );
    }

    #[test]
    fn job_env_is_lower_cased_and_does_not_override() {
        let mut v = TemplateVars::for_submission("http://m:9000");
        v.add_job_env([
            ("EXECUTOR_JOB__NTP_PEER", "10.0.0.1"),
            ("EXECUTOR_JOB__CUSTOM", "c"),
            ("EXECUTOR_JOB__MINIO_URL", "evil"),
            ("OTHER", "o"),
        ]);
        assert_eq!(
            render("{{ntp_peer}} {{custom}} {{minio_url}} {{other}}", &v).unwrap(),
            "10.0.0.1 c http://m:9000 "
        );
        assert_eq!(
            render("{{ machine_id }} {{ machine_tags }}", &v).unwrap(),
            "machine_id []"
        );
    }

    #[test]
    fn stripped_job_vars_are_added_without_override() {
        let mut v = TemplateVars::for_submission("http://m:9000");
        v.add_vars([("ntp_peer", "10.0.0.1"), ("minio_url", "evil"), ("", "x")]);
        assert_eq!(
            render("{{ntp_peer}} {{minio_url}}", &v).unwrap(),
            "10.0.0.1 http://m:9000"
        );
    }
}
