//! The executor's configuration: every environment variable of the seed
//! document (plus the few the reference also reads), parsed once into a
//! typed, validated [`Config`].
//!
//! * [`Config::from_env_map`] parses a map (tests never touch the process
//!   environment); [`Config::from_process_env`] reads the real one.
//! * Every problem is collected, so one run reports them all; each error names
//!   the variable, the value and what is accepted, e.g.
//!   `SERGENT_HARTMAN_BOOT_COUNT="abc": expected an integer`.
//! * A variable set to the empty string counts as unset (its default
//!   applies), except for the `BOOTS_DEFAULT_*` family (see
//!   [`boot_defaults`]) and `BOOTS_DISABLE_SERVERS`, which is true exactly
//!   when it is set to a non-empty value (as in the seed: even `false`
//!   disables the servers).
//! * Booleans accept `true`/`false`, `enabled`/`disabled`, `1`/`0`
//!   (case-insensitive).
//! * Secrets (`MINIO_ROOT_PASSWORD`, a password inside a URL, and
//!   `EXECUTOR_JOB__*` values whose name looks secret, see
//!   [`JobVars::is_secret_name`]) are masked in `Debug` and `Display` output.
//!
//! Invariant: a `Config` built by this module has passed every check below;
//! the service reads configuration nowhere else.

pub mod boot_defaults;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use regex::Regex;

pub use boot_defaults::{
    Arch, BootConfig, BootDefaults, BootDefaultsError, BootItem, Bootloader, MissingBootDefault,
    Platform, UnknownName,
};

/// Prefix of the job template variables (`EXECUTOR_JOB__NTP_PEER=x` becomes
/// the template variable `ntp_peer`).
pub const EXECUTOR_JOB_PREFIX: &str = "EXECUTOR_JOB__";

/// A secret string: `Debug` and `Display` print `********`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// An `http://` or `https://` URL with a host, kept as written without a
/// trailing slash so that `format!("{url}/boot/...")` is right.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    parsed: url::Url,
}

impl HttpUrl {
    /// Parses and validates a base URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        let parsed =
            url::Url::parse(s.trim()).map_err(|e| format!("expected an http(s) URL ({e})"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "expected an http(s) URL (the scheme is {:?})",
                parsed.scheme()
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err("expected an http(s) URL with a host name".into());
        }
        let text = s.trim().trim_end_matches('/').to_string();
        Ok(HttpUrl { text, parsed })
    }

    /// The URL as written, without trailing slash.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed URL.
    pub fn url(&self) -> &url::Url {
        &self.parsed
    }

    /// The host part.
    pub fn host(&self) -> &str {
        self.parsed.host_str().unwrap_or_default()
    }

    /// The port, explicit or the scheme's default.
    pub fn port_or_default(&self) -> u16 {
        self.parsed.port_or_known_default().unwrap_or(80)
    }

    /// The URL with any password replaced by `********`, for display.
    pub fn masked(&self) -> String {
        if self.parsed.password().is_some() {
            let mut u = self.parsed.clone();
            let _ = u.set_password(Some("********"));
            u.as_str().trim_end_matches('/').to_string()
        } else {
            self.text.clone()
        }
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.masked())
    }
}

impl FromStr for HttpUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        HttpUrl::parse(s)
    }
}

/// A `host:port` pair (`EXECUTOR_VPDU_ENDPOINT`). The host is a name, an
/// IPv4 address or a bracketed IPv6 address; the port is 1-65535.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected host:port (e.g. localhost:9191)";
        let s = s.trim();
        let (host, port) = s.rsplit_once(':').ok_or_else(|| EXPECTED.to_string())?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{EXPECTED}: the port must be a number from 1 to 65535"))?;
        let host = if let Some(h) = host.strip_prefix('[') {
            let h = h
                .strip_suffix(']')
                .ok_or_else(|| format!("{EXPECTED}: unbalanced bracket in the host"))?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{EXPECTED}: {h:?} is not an IPv6 address"))?;
            h.to_string()
        } else {
            if !is_host_name_or_ipv4(host) {
                return Err(format!(
                    "{EXPECTED}: {host:?} is not a host name or IPv4 address"
                ));
            }
            host.to_string()
        };
        Ok(HostPort { host, port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn is_host_name_or_ipv4(s: &str) -> bool {
    if s.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// One invalid (or missing mandatory) environment variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvVarError {
    /// The value does not parse or is out of range.
    #[error("{var}={value:?}: {expected}")]
    Invalid {
        /// The variable's name.
        var: String,
        /// The value found (masked for secrets).
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// A mandatory variable is unset or empty.
    #[error("{var} is not set: {why}")]
    Missing {
        /// The variable's name.
        var: String,
        /// Why it is needed.
        why: String,
    },
}

impl EnvVarError {
    /// The variable this error is about.
    pub fn var(&self) -> &str {
        match self {
            EnvVarError::Invalid { var, .. } | EnvVarError::Missing { var, .. } => var,
        }
    }
}

/// The configuration is invalid: every problem found, in variable-name order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {}", .errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigError {
    /// Each bad variable (at least one).
    pub errors: Vec<EnvVarError>,
}

/// `EXECUTOR_JOB__*` template variables: lower-cased name (without the
/// prefix) → value. `Debug` masks values whose name looks secret.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JobVars(pub BTreeMap<String, String>);

impl JobVars {
    /// Whether the variable `name` holds a secret: its name contains
    /// `token`, `password`, `passwd`, `secret` or `credential`, or has a
    /// `_`-separated part `key` (`api_key`, `KEY_ID`).
    pub fn is_secret_name(name: &str) -> bool {
        let n = name.to_ascii_lowercase();
        ["token", "password", "passwd", "secret", "credential"]
            .iter()
            .any(|w| n.contains(w))
            || n.split('_').any(|part| part == "key")
    }

    /// The value for display: masked when secret.
    pub fn display_value<'a>(name: &str, value: &'a str) -> &'a str {
        if Self::is_secret_name(name) {
            "********"
        } else {
            value
        }
    }
}

impl fmt::Debug for JobVars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(k, v)| (k, JobVars::display_value(k, v))),
            )
            .finish()
    }
}

/// The executor's validated configuration. Field names are the variables'
/// names in lower case; the doc of each field gives the variable and default.
#[derive(Debug, Clone)]
pub struct Config {
    /// `FARM_NAME`: name of the farm (mandatory; non-empty, no whitespace).
    pub farm_name: String,

    /// `EXECUTOR_URL`: URL of this service as reached by the DUTs
    /// (default `http://ci-gateway`).
    pub executor_url: HttpUrl,
    /// `EXECUTOR_HOST`: address the HTTP service binds (default `0.0.0.0`;
    /// an IP address or a host name).
    pub executor_host: String,
    /// `EXECUTOR_PORT`: port the HTTP service binds (default 80).
    pub executor_port: u16,
    /// `EXECUTOR_HTTP_IPv4_SOCKET_NAME`: systemd socket name of the HTTP
    /// listener (default `http_ipv4`); overrides host/port when passed.
    pub executor_http_ipv4_socket_name: String,
    /// `EXECUTOR_ARTIFACT_CACHE_ROOT`: cache folder for job artifacts
    /// (default: none, no cache).
    pub executor_artifact_cache_root: Option<PathBuf>,
    /// `EXECUTOR_ARTIFACT_CACHE_MAX_SIZE`: bound of the artifact cache in
    /// bytes, written like `20G`, `500M` or a byte count (default: none,
    /// unbounded). See [`parse_size`].
    pub executor_artifact_cache_max_size: Option<u64>,
    /// `EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS`: cache entries unused for
    /// that long are dropped (a positive number of days; default
    /// [`DEFAULT_ARTIFACT_CACHE_MAX_UNUSED_DAYS`]).
    pub executor_artifact_cache_max_unused_days: f64,
    /// `VIVIAN_STORAGE_ADMIN_API`: the identity API of the job buckets'
    /// object storage, one of [`STORAGE_ADMIN_APIS`] (default `minio`).
    pub vivian_storage_admin_api: String,
    /// `EXECUTOR_REGISTRATION_JOB`: registration job template (default:
    /// none = the built-in template).
    pub executor_registration_job: Option<PathBuf>,
    /// `EXECUTOR_BOOTLOOP_JOB`: boot-loop job template (default: none = the
    /// built-in template).
    pub executor_bootloop_job: Option<PathBuf>,
    /// `EXECUTOR_VPDU_ENDPOINT`: `host:port` of a virtual PDU added to
    /// MarsDB as `VPDU` (default: none).
    pub executor_vpdu_endpoint: Option<HostPort>,
    /// `EXECUTOR_JOB__*`: job template variables (lower-cased names).
    pub executor_job_vars: JobVars,

    /// `MARS_DB_FILE`: path of MarsDB (default `/config/mars_db.yaml`).
    pub mars_db_file: PathBuf,

    /// `BOOTS_TFTP_ROOT`: folder served over TFTP (default `/cache/boots/tftp`).
    pub boots_tftp_root: PathBuf,
    /// `BOOTS_DISABLE_SERVERS`: true when set to any non-empty value
    /// (default: unset = false); disables DHCP and TFTP.
    pub boots_disable_servers: bool,
    /// `BOOTS_DHCP_IPv4_SOCKET_NAME` (default `dhcp_ipv4`).
    pub boots_dhcp_ipv4_socket_name: String,
    /// `BOOTS_TFTP_IPv4_SOCKET_NAME` (default `tftp_ipv4`).
    pub boots_tftp_ipv4_socket_name: String,
    /// `BOOTS_DEFAULT_*`: the default boot configuration table.
    pub boots_defaults: BootDefaults,

    /// `PRIVATE_INTERFACE`: network interface of the DUT network (default `private`).
    pub private_interface: String,

    /// `SALAD_URL` (default `http://ci-gateway:8005`).
    pub salad_url: HttpUrl,

    /// `MINIO_URL` (default `http://ci-gateway:9000`).
    pub minio_url: HttpUrl,
    /// `MINIO_ROOT_USER` (default `minioadmin`).
    pub minio_root_user: String,
    /// `MINIO_ROOT_PASSWORD` (default `minio-root-password`; masked in output).
    pub minio_root_password: Secret,
    /// `MINIO_ADMIN_ALIAS` (default `local`).
    pub minio_admin_alias: String,

    /// `GITLAB_CONF_FILE`: gitlab-runner configuration written by the
    /// executor (default `/etc/gitlab-runner/config.toml`).
    pub gitlab_conf_file: PathBuf,
    /// `GITLAB_CONF_TEMPLATE_FILE`: template for it (default: none = the
    /// built-in template).
    pub gitlab_conf_template_file: Option<PathBuf>,
    /// `GITLAB_ALLOW_INSECURE`: allow `http://` GitLab URLs (default false).
    pub gitlab_allow_insecure: bool,

    /// `SERGENT_HARTMAN_BOOT_COUNT`: training boot loops (default 100);
    /// 0 = ready right after registration; negative = no registration,
    /// training or quick check at all.
    pub sergent_hartman_boot_count: i64,
    /// `SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT`: passing loops needed (default 100).
    pub sergent_hartman_qualifying_boot_count: u32,
    /// `SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY`: wait after a failed
    /// registration (default 120 s; seconds, may be fractional).
    pub sergent_hartman_registration_retrial_delay: Duration,
    /// `SERGENT_HARTMAN_QUICK_CHECK`: quick-check DUTs at start and on
    /// activation (default enabled).
    pub sergent_hartman_quick_check: bool,
    /// `SERGENT_HARTMAN_QUIET`: less console output from training jobs
    /// (default false).
    pub sergent_hartman_quiet: bool,

    /// `CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX`: default
    /// `machine_unfit_for_service` pattern for every job (default: none).
    pub console_pattern_default_machine_unfit_for_service_regex: Option<Regex>,

    /// `DUT_DEFAULT_BOOT_SEQUENCE_POWER`: expected boot power in watts
    /// (default 10).
    pub dut_default_boot_sequence_power: f64,
}

/// Where a displayed value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSource {
    /// The environment set it.
    Environment,
    /// The default applies.
    Default,
}

/// One line of the effective configuration, as printed by
/// `executor --check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// The variable's name.
    pub name: String,
    /// Its effective value, secrets masked (`(none)` / `(built-in)` for
    /// absent optional values).
    pub value: String,
    /// Whether the environment set it.
    pub source: ValueSource,
}

/// Reads variables from the map, collecting errors.
struct Reader<'a> {
    env: &'a BTreeMap<String, String>,
    errors: Vec<EnvVarError>,
}

const BOOL_EXPECTED: &str = "expected a boolean (true/false, enabled/disabled, 1/0)";

impl<'a> Reader<'a> {
    /// The non-empty value of `var`, if any.
    fn raw(&self, var: &'static str) -> Option<&'a str> {
        self.env
            .get(var)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn invalid(&mut self, var: &str, value: &str, expected: impl Into<String>) {
        self.errors.push(EnvVarError::Invalid {
            var: var.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        });
    }

    /// Parses with `parse`, falling back to `default` (also on error, the
    /// error being recorded).
    fn parsed<T>(
        &mut self,
        var: &'static str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        match self.raw(var) {
            None => default,
            Some(v) => match parse(v) {
                Ok(t) => t,
                Err(expected) => {
                    self.invalid(var, v, expected);
                    default
                }
            },
        }
    }

    fn optional<T>(
        &mut self,
        var: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match self.raw(var) {
            None => None,
            Some(v) => match parse(v) {
                Ok(t) => Some(t),
                Err(expected) => {
                    self.invalid(var, v, expected);
                    None
                }
            },
        }
    }

    fn string(&mut self, var: &'static str, default: &str) -> String {
        self.raw(var).unwrap_or(default).to_string()
    }

    fn url(&mut self, var: &'static str, default: &str) -> HttpUrl {
        let d = HttpUrl::parse(default).expect("built-in default URL is valid");
        self.parsed(var, d, HttpUrl::parse)
    }

    fn path(&mut self, var: &'static str, default: &str) -> PathBuf {
        PathBuf::from(self.raw(var).unwrap_or(default))
    }

    fn bool(&mut self, var: &'static str, default: bool) -> bool {
        self.parsed(var, default, |v| {
            parse_bool(v).ok_or_else(|| BOOL_EXPECTED.to_string())
        })
    }

    fn socket_name(&mut self, var: &'static str, default: &str) -> String {
        self.parsed(var, default.to_string(), |v| {
            if v.len() <= 255 && v.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
                Ok(v.to_string())
            } else {
                Err("expected a systemd socket name (at most 255 printable ASCII characters, no ':' or spaces)".into())
            }
        })
    }
}

/// Parses a boolean as the reference does: `true`/`false`,
/// `enabled`/`disabled`, `1`/`0`, case-insensitive, surrounding spaces ignored.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "enabled" | "1" => Some(true),
        "false" | "disabled" | "0" => Some(false),
        _ => None,
    }
}

fn parse_interface(v: &str) -> Result<String, String> {
    if !v.is_empty()
        && v.len() <= 15
        && v != "."
        && v != ".."
        && v.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
    {
        Ok(v.to_string())
    } else {
        Err("expected a network interface name (1-15 characters, no '/', ':' or spaces)".into())
    }
}

fn parse_host(v: &str) -> Result<String, String> {
    if v.parse::<IpAddr>().is_ok() || is_host_name_or_ipv4(v) {
        Ok(v.to_string())
    } else {
        Err("expected an IP address or a host name to bind".into())
    }
}

fn parse_seconds(v: &str) -> Result<Duration, String> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e12)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| "expected a number of seconds (0 or more)".into())
}

/// Parses a size such as `500M`, `20G`, `1.5T`, `64KiB` or a plain byte
/// count (units are powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = t[i..].trim().to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return None,
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n.is_finite() && n >= 0.0 && n * (mult as f64) < u64::MAX as f64)
        .then_some((n * mult as f64) as u64)
}

/// Default of `EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS`.
pub const DEFAULT_ARTIFACT_CACHE_MAX_UNUSED_DAYS: f64 = 60.0;

/// The values `VIVIAN_STORAGE_ADMIN_API` accepts: `minio` (MinIO's admin
/// API), `iam` (AWS IAM with Allow + Deny policies), `iam-allow-only`
/// (IAM without Deny support, e.g. SeaweedFS).
pub const STORAGE_ADMIN_APIS: &[&str] = &["minio", "iam", "iam-allow-only"];

/// Variables the executor reads, for [`Config::entries`] and for
/// `--check-config`'s listing.
pub const KNOWN_VARIABLES: &[&str] = &[
    "FARM_NAME",
    "EXECUTOR_URL",
    "EXECUTOR_HOST",
    "EXECUTOR_PORT",
    "EXECUTOR_HTTP_IPv4_SOCKET_NAME",
    "EXECUTOR_ARTIFACT_CACHE_ROOT",
    "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE",
    "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS",
    "EXECUTOR_REGISTRATION_JOB",
    "EXECUTOR_BOOTLOOP_JOB",
    "EXECUTOR_VPDU_ENDPOINT",
    "MARS_DB_FILE",
    "BOOTS_TFTP_ROOT",
    "BOOTS_DISABLE_SERVERS",
    "BOOTS_DHCP_IPv4_SOCKET_NAME",
    "BOOTS_TFTP_IPv4_SOCKET_NAME",
    "PRIVATE_INTERFACE",
    "SALAD_URL",
    "MINIO_URL",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "MINIO_ADMIN_ALIAS",
    "VIVIAN_STORAGE_ADMIN_API",
    "GITLAB_CONF_FILE",
    "GITLAB_CONF_TEMPLATE_FILE",
    "GITLAB_ALLOW_INSECURE",
    "SERGENT_HARTMAN_BOOT_COUNT",
    "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT",
    "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY",
    "SERGENT_HARTMAN_QUICK_CHECK",
    "SERGENT_HARTMAN_QUIET",
    "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
    "DUT_DEFAULT_BOOT_SEQUENCE_POWER",
];

impl Config {
    /// Parses and validates the configuration from an environment map.
    /// Returns every problem found at once.
    pub fn from_env_map(env: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let mut r = Reader {
            env,
            errors: Vec::new(),
        };

        let farm_name = match r.raw("FARM_NAME") {
            None => {
                r.errors.push(EnvVarError::Missing {
                    var: "FARM_NAME".into(),
                    why: "the name of the farm is mandatory (it names the runners and the `farm:` tag)".into(),
                });
                String::new()
            }
            Some(v)
                if v.trim().is_empty()
                    || v.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                r.invalid("FARM_NAME", v, "expected a farm name without spaces");
                String::new()
            }
            Some(v) => v.to_string(),
        };

        let executor_url = r.url("EXECUTOR_URL", "http://ci-gateway");
        let executor_host = r.parsed("EXECUTOR_HOST", "0.0.0.0".to_string(), parse_host);
        let executor_port = r.parsed("EXECUTOR_PORT", 80u16, |v| {
            v.trim()
                .parse::<u16>()
                .map_err(|_| "expected a port number (0-65535)".to_string())
        });
        let executor_http_ipv4_socket_name =
            r.socket_name("EXECUTOR_HTTP_IPv4_SOCKET_NAME", "http_ipv4");
        let executor_artifact_cache_root = r.raw("EXECUTOR_ARTIFACT_CACHE_ROOT").map(PathBuf::from);
        let executor_artifact_cache_max_size =
            r.optional("EXECUTOR_ARTIFACT_CACHE_MAX_SIZE", |v| {
                parse_size(v).ok_or_else(|| {
                    "expected a size such as 20G, 500M or a number of bytes".to_string()
                })
            });
        let executor_artifact_cache_max_unused_days = r.parsed(
            "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS",
            DEFAULT_ARTIFACT_CACHE_MAX_UNUSED_DAYS,
            |v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|d| d.is_finite() && *d > 0.0 && *d < 1e6)
                    .ok_or_else(|| "expected a positive number of days".to_string())
            },
        );
        let vivian_storage_admin_api =
            r.parsed("VIVIAN_STORAGE_ADMIN_API", "minio".to_string(), |v| {
                let v = v.trim();
                STORAGE_ADMIN_APIS
                    .contains(&v)
                    .then(|| v.to_string())
                    .ok_or_else(|| format!("expected one of {}", STORAGE_ADMIN_APIS.join(", ")))
            });
        let executor_registration_job = r.raw("EXECUTOR_REGISTRATION_JOB").map(PathBuf::from);
        let executor_bootloop_job = r.raw("EXECUTOR_BOOTLOOP_JOB").map(PathBuf::from);
        let executor_vpdu_endpoint = r.optional("EXECUTOR_VPDU_ENDPOINT", HostPort::from_str);

        let mut job_vars = BTreeMap::new();
        for (k, v) in env.range(EXECUTOR_JOB_PREFIX.to_string()..) {
            let Some(name) = k.strip_prefix(EXECUTOR_JOB_PREFIX) else {
                break;
            };
            let valid = !name.is_empty()
                && !name.as_bytes()[0].is_ascii_digit()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if valid {
                let lower = name.to_ascii_lowercase();
                match job_vars.entry(lower) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(v.clone());
                    }
                    std::collections::btree_map::Entry::Occupied(e) => {
                        let shown = JobVars::display_value(name, v).to_string();
                        let expected = format!(
                            "another EXECUTOR_JOB__ variable already defines the template variable {:?} (names are case-insensitive)",
                            e.key()
                        );
                        r.invalid(k, &shown, expected);
                    }
                }
            } else {
                let shown = JobVars::display_value(name, v).to_string();
                r.invalid(
                    k,
                    &shown,
                    "the name after EXECUTOR_JOB__ must be a template variable name (letters, digits, '_'; not starting with a digit)",
                );
            }
        }

        let mars_db_file = r.path("MARS_DB_FILE", "/config/mars_db.yaml");

        let boots_tftp_root = r.path("BOOTS_TFTP_ROOT", "/cache/boots/tftp");
        let boots_disable_servers = r.raw("BOOTS_DISABLE_SERVERS").is_some();
        let boots_dhcp_ipv4_socket_name = r.socket_name("BOOTS_DHCP_IPv4_SOCKET_NAME", "dhcp_ipv4");
        let boots_tftp_ipv4_socket_name = r.socket_name("BOOTS_TFTP_IPv4_SOCKET_NAME", "tftp_ipv4");
        let boots_defaults = BootDefaults::from_env_map(env);

        let private_interface =
            r.parsed("PRIVATE_INTERFACE", "private".to_string(), parse_interface);

        let salad_url = r.url("SALAD_URL", "http://ci-gateway:8005");
        let minio_url = r.url("MINIO_URL", "http://ci-gateway:9000");
        let minio_root_user = r.string("MINIO_ROOT_USER", "minioadmin");
        let minio_root_password =
            Secret::new(r.string("MINIO_ROOT_PASSWORD", "minio-root-password"));
        let minio_admin_alias = r.string("MINIO_ADMIN_ALIAS", "local");

        let gitlab_conf_file = r.path("GITLAB_CONF_FILE", "/etc/gitlab-runner/config.toml");
        let gitlab_conf_template_file = r.raw("GITLAB_CONF_TEMPLATE_FILE").map(PathBuf::from);
        let gitlab_allow_insecure = r.bool("GITLAB_ALLOW_INSECURE", false);

        let sergent_hartman_boot_count = r.parsed("SERGENT_HARTMAN_BOOT_COUNT", 100i64, |v| {
            v.trim()
                .parse::<i64>()
                .map_err(|_| "expected an integer".to_string())
        });
        let sergent_hartman_qualifying_boot_count =
            r.parsed("SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT", 100u32, |v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| "expected a non-negative integer".to_string())
            });
        let sergent_hartman_registration_retrial_delay = r.parsed(
            "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY",
            Duration::from_secs(120),
            parse_seconds,
        );
        let sergent_hartman_quick_check = r.bool("SERGENT_HARTMAN_QUICK_CHECK", true);
        let sergent_hartman_quiet = r.bool("SERGENT_HARTMAN_QUIET", false);

        let console_pattern_default_machine_unfit_for_service_regex = r.optional(
            "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
            |v| Regex::new(v).map_err(|e| format!("expected a regular expression ({e})")),
        );

        let dut_default_boot_sequence_power =
            r.parsed("DUT_DEFAULT_BOOT_SEQUENCE_POWER", 10.0f64, |v| {
                v.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|w| w.is_finite() && *w >= 0.0)
                    .ok_or_else(|| "expected a power in watts (a number, 0 or more)".to_string())
            });

        if !r.errors.is_empty() {
            let mut errors = r.errors;
            errors.sort_by(|a, b| a.var().cmp(b.var()));
            return Err(ConfigError { errors });
        }

        Ok(Config {
            farm_name,
            executor_url,
            executor_host,
            executor_port,
            executor_http_ipv4_socket_name,
            executor_artifact_cache_root,
            executor_artifact_cache_max_size,
            executor_artifact_cache_max_unused_days,
            vivian_storage_admin_api,
            executor_registration_job,
            executor_bootloop_job,
            executor_vpdu_endpoint,
            executor_job_vars: JobVars(job_vars),
            mars_db_file,
            boots_tftp_root,
            boots_disable_servers,
            boots_dhcp_ipv4_socket_name,
            boots_tftp_ipv4_socket_name,
            boots_defaults,
            private_interface,
            salad_url,
            minio_url,
            minio_root_user,
            minio_root_password,
            minio_admin_alias,
            gitlab_conf_file,
            gitlab_conf_template_file,
            gitlab_allow_insecure,
            sergent_hartman_boot_count,
            sergent_hartman_qualifying_boot_count,
            sergent_hartman_registration_retrial_delay,
            sergent_hartman_quick_check,
            sergent_hartman_quiet,
            console_pattern_default_machine_unfit_for_service_regex,
            dut_default_boot_sequence_power,
        })
    }

    /// Parses the process environment (variables that are not valid UTF-8
    /// are reported as invalid).
    pub fn from_process_env() -> Result<Config, ConfigError> {
        let mut map = BTreeMap::new();
        let mut errors = Vec::new();
        for (k, v) in std::env::vars_os() {
            match (k.into_string(), v.into_string()) {
                (Ok(k), Ok(v)) => {
                    map.insert(k, v);
                }
                (Ok(k), Err(v)) if is_read_variable(&k) => errors.push(EnvVarError::Invalid {
                    var: k,
                    value: v.to_string_lossy().into_owned(),
                    expected: "expected valid UTF-8 text".into(),
                }),
                _ => {}
            }
        }
        match Config::from_env_map(&map) {
            Ok(c) if errors.is_empty() => Ok(c),
            Ok(_) => Err(ConfigError { errors }),
            Err(mut e) => {
                e.errors.extend(errors);
                e.errors.sort_by(|a, b| a.var().cmp(b.var()));
                Err(e)
            }
        }
    }

    /// The defaults of the seed with the given farm name (what
    /// `from_env_map` returns for an environment holding only `FARM_NAME`).
    /// Handy for tests and embedders, who may then change fields.
    pub fn with_farm_name(farm_name: &str) -> Result<Config, ConfigError> {
        let env = BTreeMap::from([("FARM_NAME".to_string(), farm_name.to_string())]);
        Config::from_env_map(&env)
    }

    /// Checks the files the configuration names, as start-up needs them:
    /// the job and gitlab-runner templates, when set, must be readable
    /// regular files; the folder of `MARS_DB_FILE` must exist (the file
    /// itself is created when missing); `MARS_DB_FILE`, when it exists,
    /// must be a regular file. Returns every problem.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let templates = [
            ("EXECUTOR_REGISTRATION_JOB", &self.executor_registration_job),
            ("EXECUTOR_BOOTLOOP_JOB", &self.executor_bootloop_job),
            ("GITLAB_CONF_TEMPLATE_FILE", &self.gitlab_conf_template_file),
        ];
        for (var, path) in templates {
            let Some(path) = path else { continue };
            let problem = match std::fs::metadata(path) {
                Ok(m) if m.is_file() => match std::fs::File::open(path) {
                    Ok(_) => None,
                    Err(e) => Some(format!("expected a readable template file ({e})")),
                },
                Ok(_) => Some("expected a template file (this is not a regular file)".to_string()),
                Err(e) => Some(format!("expected a template file ({e})")),
            };
            if let Some(expected) = problem {
                errors.push(EnvVarError::Invalid {
                    var: var.into(),
                    value: path.display().to_string(),
                    expected,
                });
            }
        }
        let db = &self.mars_db_file;
        let problem = match std::fs::metadata(db) {
            Ok(m) if m.is_file() => None,
            Ok(_) => {
                Some("expected the path of a YAML file (this is not a regular file)".to_string())
            }
            Err(_) => {
                let dir = db
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                if dir.is_dir() {
                    None
                } else {
                    Some(format!(
                        "expected a file in an existing folder ({} does not exist)",
                        dir.display()
                    ))
                }
            }
        };
        if let Some(expected) = problem {
            errors.push(EnvVarError::Invalid {
                var: "MARS_DB_FILE".into(),
                value: db.display().to_string(),
                expected,
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors })
        }
    }

    /// Whether Sergent Hartman (registration, training, quick checks) is
    /// enabled: `SERGENT_HARTMAN_BOOT_COUNT` is not negative.
    pub fn sergent_hartman_enabled(&self) -> bool {
        self.sergent_hartman_boot_count >= 0
    }

    /// Whether DUTs are quick-checked at start and on activation: Sergent
    /// Hartman is enabled and `SERGENT_HARTMAN_QUICK_CHECK` is on.
    pub fn quick_check_enabled(&self) -> bool {
        self.sergent_hartman_enabled() && self.sergent_hartman_quick_check
    }

    /// The job template variables (`EXECUTOR_JOB__*`, lower-cased, plus
    /// `minio_url` which is always present unless overridden).
    pub fn job_environment(&self) -> BTreeMap<String, String> {
        let mut m =
            BTreeMap::from([("minio_url".to_string(), self.minio_url.as_str().to_string())]);
        m.extend(self.executor_job_vars.0.clone());
        m
    }

    /// The effective configuration, one entry per variable, secrets masked.
    /// `env` tells which values came from the environment (pass the map the
    /// config was parsed from; an empty map marks everything as default).
    pub fn entries(&self, env: &BTreeMap<String, String>) -> Vec<ConfigEntry> {
        fn opt_path(p: &Option<PathBuf>, none: &str) -> String {
            p.as_ref()
                .map_or_else(|| none.to_string(), |p| p.display().to_string())
        }
        let values: Vec<(&str, String)> = vec![
            ("FARM_NAME", self.farm_name.clone()),
            ("EXECUTOR_URL", self.executor_url.to_string()),
            ("EXECUTOR_HOST", self.executor_host.clone()),
            ("EXECUTOR_PORT", self.executor_port.to_string()),
            (
                "EXECUTOR_HTTP_IPv4_SOCKET_NAME",
                self.executor_http_ipv4_socket_name.clone(),
            ),
            (
                "EXECUTOR_ARTIFACT_CACHE_ROOT",
                opt_path(&self.executor_artifact_cache_root, "(none)"),
            ),
            (
                "EXECUTOR_ARTIFACT_CACHE_MAX_SIZE",
                self.executor_artifact_cache_max_size
                    .map_or_else(|| "(unbounded)".to_string(), |b| b.to_string()),
            ),
            (
                "EXECUTOR_ARTIFACT_CACHE_MAX_UNUSED_DAYS",
                self.executor_artifact_cache_max_unused_days.to_string(),
            ),
            (
                "EXECUTOR_REGISTRATION_JOB",
                opt_path(&self.executor_registration_job, "(built-in)"),
            ),
            (
                "EXECUTOR_BOOTLOOP_JOB",
                opt_path(&self.executor_bootloop_job, "(built-in)"),
            ),
            (
                "EXECUTOR_VPDU_ENDPOINT",
                self.executor_vpdu_endpoint
                    .as_ref()
                    .map_or_else(|| "(none)".to_string(), |h| h.to_string()),
            ),
            ("MARS_DB_FILE", self.mars_db_file.display().to_string()),
            (
                "BOOTS_TFTP_ROOT",
                self.boots_tftp_root.display().to_string(),
            ),
            (
                "BOOTS_DISABLE_SERVERS",
                self.boots_disable_servers.to_string(),
            ),
            (
                "BOOTS_DHCP_IPv4_SOCKET_NAME",
                self.boots_dhcp_ipv4_socket_name.clone(),
            ),
            (
                "BOOTS_TFTP_IPv4_SOCKET_NAME",
                self.boots_tftp_ipv4_socket_name.clone(),
            ),
            ("PRIVATE_INTERFACE", self.private_interface.clone()),
            ("SALAD_URL", self.salad_url.to_string()),
            ("MINIO_URL", self.minio_url.to_string()),
            ("MINIO_ROOT_USER", self.minio_root_user.clone()),
            ("MINIO_ROOT_PASSWORD", self.minio_root_password.to_string()),
            ("MINIO_ADMIN_ALIAS", self.minio_admin_alias.clone()),
            (
                "VIVIAN_STORAGE_ADMIN_API",
                self.vivian_storage_admin_api.clone(),
            ),
            (
                "GITLAB_CONF_FILE",
                self.gitlab_conf_file.display().to_string(),
            ),
            (
                "GITLAB_CONF_TEMPLATE_FILE",
                opt_path(&self.gitlab_conf_template_file, "(built-in)"),
            ),
            (
                "GITLAB_ALLOW_INSECURE",
                self.gitlab_allow_insecure.to_string(),
            ),
            (
                "SERGENT_HARTMAN_BOOT_COUNT",
                self.sergent_hartman_boot_count.to_string(),
            ),
            (
                "SERGENT_HARTMAN_QUALIFYING_BOOT_COUNT",
                self.sergent_hartman_qualifying_boot_count.to_string(),
            ),
            (
                "SERGENT_HARTMAN_REGISTRATION_RETRIAL_DELAY",
                format!(
                    "{}",
                    self.sergent_hartman_registration_retrial_delay
                        .as_secs_f64()
                ),
            ),
            (
                "SERGENT_HARTMAN_QUICK_CHECK",
                self.sergent_hartman_quick_check.to_string(),
            ),
            (
                "SERGENT_HARTMAN_QUIET",
                self.sergent_hartman_quiet.to_string(),
            ),
            (
                "CONSOLE_PATTERN_DEFAULT_MACHINE_UNFIT_FOR_SERVICE_REGEX",
                self.console_pattern_default_machine_unfit_for_service_regex
                    .as_ref()
                    .map_or_else(|| "(none)".to_string(), |r| r.as_str().to_string()),
            ),
            (
                "DUT_DEFAULT_BOOT_SEQUENCE_POWER",
                self.dut_default_boot_sequence_power.to_string(),
            ),
        ];
        let source = |name: &str| {
            if env.get(name).is_some_and(|v| !v.is_empty()) {
                ValueSource::Environment
            } else {
                ValueSource::Default
            }
        };
        let mut out: Vec<ConfigEntry> = values
            .into_iter()
            .map(|(name, value)| ConfigEntry {
                name: name.to_string(),
                value,
                source: source(name),
            })
            .collect();
        for (name, value) in self.boots_defaults.vars() {
            out.push(ConfigEntry {
                name: name.clone(),
                value: value.clone(),
                source: source(name),
            });
        }
        for (name, value) in &self.executor_job_vars.0 {
            let var = format!("{EXECUTOR_JOB_PREFIX}{}", name.to_ascii_uppercase());
            out.push(ConfigEntry {
                source: if env.contains_key(&var) {
                    ValueSource::Environment
                } else {
                    ValueSource::Default
                },
                name: var,
                value: JobVars::display_value(name, value).to_string(),
            });
        }
        out
    }

    /// Non-fatal oddities worth telling the operator: `BOOTS_DEFAULT_*`
    /// names that no lookup reads, `EXECUTOR_*`/`SERGENT_HARTMAN_*`/`BOOTS_*`
    /// variables the executor does not know (likely typos).
    pub fn warnings(&self, env: &BTreeMap<String, String>) -> Vec<String> {
        let mut w: Vec<String> = self
            .boots_defaults
            .unrecognised_vars()
            .into_iter()
            .map(|n| format!("{n} is never read: it matches no BOOTS_DEFAULT_ lookup level"))
            .collect();
        for k in env.keys() {
            let family = [
                "EXECUTOR_",
                "SERGENT_HARTMAN_",
                "BOOTS_",
                "MINIO_",
                "GITLAB_",
            ]
            .iter()
            .any(|p| k.starts_with(p));
            if family && !is_read_variable(k) && !k.starts_with(boot_defaults::BOOTS_DEFAULT_PREFIX)
            {
                w.push(format!("{k} is not a variable the executor reads"));
            }
        }
        w
    }
}

fn is_read_variable(name: &str) -> bool {
    KNOWN_VARIABLES.contains(&name)
        || name.starts_with(EXECUTOR_JOB_PREFIX)
        || name.starts_with(boot_defaults::BOOTS_DEFAULT_PREFIX)
}

impl fmt::Display for Config {
    /// `NAME=value` lines, secrets masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in self.entries(&BTreeMap::new()) {
            writeln!(f, "{}={}", e.name, e.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
