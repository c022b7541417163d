//! gitlab-runner's `config.toml`, rendered from MarsDB with a minijinja
//! template and written atomically, only when its content changes.
//!
//! # Template context
//!
//! The default template ([`DEFAULT_TEMPLATE`], shipped in this crate as
//! `templates/gitlab_runner_config.toml.j2`) follows the reference's
//! fields. A custom template (`GITLAB_CONF_TEMPLATE_FILE`) sees:
//!
//! | Variable | Type | Meaning |
//! |---|---|---|
//! | `farm_name` | string | `FARM_NAME` |
//! | `cpu_count` | int | logical CPUs of the gateway |
//! | `ram_total_MB` | float | gateway RAM in MB (bytes / 10⁶) |
//! | `environment` | list of `"K=V"` | the job environment (`MINIO_URL`, `EXECUTOR_JOB__*`) |
//! | `gateway_runners` | list | one per instance exposing its gateway runner: `instance`, `name`, `url`, `token`, `tags`, `limit`, `cpus`, `memory_mb`, `memory_swap_mb`, `memory_reservation_mb` |
//! | `dut_runners` | list | one per available DUT × instance where it is exposed and registered: `instance`, `dut_id`, `name`, `url`, `token`, `tags` |
//!
//! The `toml` filter renders any value as a TOML value with proper quoting
//! and escaping (`name = {{ runner.name | toml }}`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use vivian_core::marsdb::Database;
use vivian_core::runner::Secret;

/// The default template, the one the reference ships (`concurrent = 128`,
/// docker executor, gateway resource limits, ...).
pub const DEFAULT_TEMPLATE: &str = include_str!("../templates/gitlab_runner_config.toml.j2");

/// Errors of config.toml generation.
#[derive(Debug, thiserror::Error)]
pub enum RunnerConfigError {
    /// The template file cannot be read.
    #[error("cannot read the gitlab-runner config template {path}: {source}")]
    ReadTemplate {
        /// The template path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The template does not parse or render.
    #[error("gitlab-runner config template {name}: {message}")]
    Template {
        /// The template's name (its path, or `<built-in>`).
        name: String,
        /// minijinja's message, with the line when known.
        message: String,
    },
    /// The rendered file is not valid TOML.
    #[error("the gitlab-runner config rendered from {name} is not valid TOML: {message}")]
    InvalidToml {
        /// The template's name.
        name: String,
        /// The TOML parser's message.
        message: String,
    },
    /// The file cannot be written.
    #[error("cannot write the gitlab-runner config {path}: {source}")]
    Write {
        /// The config path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What the gateway machine has, for the gateway runner's limits and tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostResources {
    /// Logical CPUs.
    pub cpu_count: u32,
    /// Physical cores (the gateway runner's `cpu:cores:` tag).
    pub physical_cores: u32,
    /// Total RAM in bytes.
    pub ram_total_bytes: u64,
    /// Machine architecture as `uname -m` says it (`x86_64`, `aarch64`).
    pub arch: String,
}

impl HostResources {
    /// Reads this machine's resources (`/proc/cpuinfo`, `/proc/meminfo`);
    /// falls back to the logical CPU count for physical cores, and to 0 RAM
    /// when `/proc/meminfo` cannot be read.
    pub fn detect() -> Self {
        let cpu_count = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let physical_cores = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| physical_cores_from_cpuinfo(&s))
            .unwrap_or(cpu_count);
        let ram_total_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| mem_total_from_meminfo(&s))
            .unwrap_or(0);
        HostResources {
            cpu_count,
            physical_cores,
            ram_total_bytes,
            arch: std::env::consts::ARCH.to_string(),
        }
    }

    /// RAM in MB (bytes / 10⁶), as the reference's `ram_total_MB`.
    pub fn ram_total_mb(&self) -> f64 {
        self.ram_total_bytes as f64 / 1e6
    }
}

/// Number of distinct (physical id, core id) pairs in `/proc/cpuinfo`.
fn physical_cores_from_cpuinfo(text: &str) -> Option<u32> {
    let mut cores = std::collections::BTreeSet::new();
    let (mut phys, mut core) = (None::<String>, None::<String>);
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let Some(c) = core.take() {
                cores.insert((phys.take().unwrap_or_default(), c));
            }
            phys = None;
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = Some(v.trim().to_string()),
                "core id" => core = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    (!cores.is_empty()).then_some(cores.len() as u32)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total_from_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The docker limits of the gateway runner (reference formulas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayLimits {
    /// Concurrent jobs: `max(1, cpu_count / 8)`.
    pub limit: u32,
    /// `cpus`: every logical CPU.
    pub cpus: u32,
    /// `memory` in MB: `int(max(ram / 2, ram - 4096))`.
    pub memory_mb: u64,
    /// `memory_swap` in MB: `int(memory × 1.2)`.
    pub memory_swap_mb: u64,
    /// `memory_reservation` in MB: `int(memory / 2)`.
    pub memory_reservation_mb: u64,
}

impl GatewayLimits {
    /// The limits for a gateway with `cpu_count` logical CPUs and
    /// `ram_total_mb` MB of RAM.
    pub fn compute(cpu_count: u32, ram_total_mb: f64) -> Self {
        let memory = (ram_total_mb / 2.0)
            .max(ram_total_mb - 4096.0)
            .max(0.0)
            .floor();
        GatewayLimits {
            limit: (cpu_count / 8).max(1),
            cpus: cpu_count,
            memory_mb: memory as u64,
            memory_swap_mb: (memory * 1.2).floor() as u64,
            memory_reservation_mb: (memory / 2.0).floor() as u64,
        }
    }
}

/// The gateway runner's tags: `<FARM_NAME>-gateway`, `CI-gateway`,
/// `cpu:arch:<arch>`, `cpu:cores:<physical cores>` (plus `8+`, `16+`,
/// `32+`), `mem:size:<RAM rounded up to a power of two>GiB` (plus `8+GiB`,
/// `32+GiB`), and `farm:<FARM_NAME>` like every runner of the farm. Sorted.
pub fn gateway_tags(farm_name: &str, host: &HostResources) -> Vec<String> {
    let mut tags = vec![
        format!("{farm_name}-gateway"),
        "CI-gateway".to_string(),
        format!("cpu:arch:{}", host.arch),
        format!("cpu:cores:{}", host.physical_cores),
        format!("farm:{farm_name}"),
    ];
    for t in [8, 16, 32] {
        if host.physical_cores >= t {
            tags.push(format!("cpu:cores:{t}+"));
        }
    }
    let gib = host.ram_total_bytes as f64 / (1u64 << 30) as f64;
    let mut size = 1u64;
    while (size as f64) < gib {
        size *= 2;
    }
    tags.push(format!("mem:size:{size}GiB"));
    for t in [8, 32] {
        if size >= t {
            tags.push(format!("mem:size:{t}+GiB"));
        }
    }
    tags.sort();
    tags.dedup();
    tags
}

/// One `[[runners]]` entry of the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunnerConfigEntry {
    /// MarsDB instance name.
    pub instance: String,
    /// Runner name (the DUT's full name, or `<FARM_NAME>-gateway`).
    pub name: String,
    /// The instance URL.
    pub url: String,
    /// The runner's authentication token.
    pub token: Secret,
    /// The runner's tags.
    pub tags: Vec<String>,
    /// The DUT id, for DUT runners.
    pub dut_id: Option<String>,
}

/// Everything a config.toml is made of.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RunnerConfigInput {
    /// `FARM_NAME`.
    pub farm_name: String,
    /// Gateway runners, one per instance that exposes it.
    pub gateway_runners: Vec<RunnerConfigEntry>,
    /// DUT runners.
    pub dut_runners: Vec<RunnerConfigEntry>,
}

/// Whether an instance URL may be used: `https://`, or `http://` when
/// `allow_insecure` (`GITLAB_ALLOW_INSECURE`).
pub fn url_allowed(url: &str, allow_insecure: bool) -> bool {
    url.starts_with("https://") || (allow_insecure && url.starts_with("http://"))
}

impl RunnerConfigInput {
    /// The runners MarsDB says gitlab-runner must serve:
    /// * the gateway runner of every instance with `expose_runners`, whose
    ///   `gateway_runner` is `exposed` and registered;
    /// * for every available DUT (ready for service, not retired), in file
    ///   order, each instance (file order) with `expose_runners` where the
    ///   DUT's entry is `exposed` and registered.
    ///
    /// "Registered" = the token looks valid (8 characters or more, not the
    /// placeholder). Instances whose URL is not allowed (see
    /// [`url_allowed`]) are left out.
    pub fn from_database(
        db: &Database,
        farm_name: &str,
        host: &HostResources,
        allow_insecure: bool,
    ) -> Self {
        let mut out = RunnerConfigInput {
            farm_name: farm_name.to_string(),
            ..Default::default()
        };
        let instances: Vec<_> = db
            .gitlab
            .iter()
            .filter(|(_, gl)| gl.expose_runners && url_allowed(&gl.url, allow_insecure))
            .collect();
        for (name, gl) in &instances {
            if let Some(gw) = &gl.gateway_runner {
                if gw.exposed && gw.token_looks_valid() {
                    out.gateway_runners.push(RunnerConfigEntry {
                        instance: name.to_string(),
                        name: format!("{farm_name}-gateway"),
                        url: gl.url.clone(),
                        token: Secret::new(gw.token.clone()),
                        tags: gateway_tags(farm_name, host),
                        dut_id: None,
                    });
                }
            }
        }
        for (id, dut) in &db.duts {
            if !dut.available() {
                continue;
            }
            let Some(full_name) = db.full_name(id, farm_name) else {
                continue;
            };
            for (name, gl) in &instances {
                let Some(entry) = dut.gitlab.get(name.as_str()) else {
                    continue;
                };
                if entry.exposed && entry.token_looks_valid() {
                    out.dut_runners.push(RunnerConfigEntry {
                        instance: name.to_string(),
                        name: full_name.clone(),
                        url: gl.url.clone(),
                        token: Secret::new(entry.token.clone()),
                        tags: dut.all_tags(farm_name),
                        dut_id: Some(id.to_string()),
                    });
                }
            }
        }
        out
    }
}

/// Where the template comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// [`DEFAULT_TEMPLATE`].
    BuiltIn,
    /// A file, read at each rendering (edits apply at the next sync).
    File(PathBuf),
}

/// The job environment given to the runners: `MINIO_URL=<minio_url>`
/// followed by every `EXECUTOR_JOB__X=v` of `vars` as `X=v` (sorted by
/// name). Pass the process environment (`std::env::vars()`).
pub fn job_environment(
    vars: impl IntoIterator<Item = (String, String)>,
    minio_url: &str,
) -> Vec<(String, String)> {
    let mut extra: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in vars {
        if let Some(name) = k.strip_prefix("EXECUTOR_JOB__") {
            if !name.is_empty() {
                extra.insert(name.to_string(), v);
            }
        }
    }
    let mut out = vec![("MINIO_URL".to_string(), minio_url.to_string())];
    out.extend(extra);
    out
}

/// Renders and writes gitlab-runner's config.toml.
#[derive(Clone, Debug)]
pub struct RunnerConfigWriter {
    path: PathBuf,
    template: TemplateSource,
    environment: Vec<(String, String)>,
    host: HostResources,
    /// The last rendering: (input, template text, output). Rendering a
    /// thousand runners costs more than comparing inputs.
    last: LastRendering,
}

/// The cache of [`RunnerConfigWriter`]; its `Debug` hides the rendered text
/// (it holds the tokens).
#[derive(Clone, Default)]
struct LastRendering(std::sync::Arc<std::sync::Mutex<Option<(RunnerConfigInput, String, String)>>>);

impl std::fmt::Debug for LastRendering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastRendering(..)")
    }
}

#[derive(Serialize)]
struct GatewayCtx<'a> {
    instance: &'a str,
    name: &'a str,
    url: &'a str,
    token: &'a str,
    tags: &'a [String],
    #[serde(flatten)]
    limits: GatewayLimits,
}

#[derive(Serialize)]
struct DutCtx<'a> {
    instance: &'a str,
    dut_id: Option<&'a str>,
    name: &'a str,
    url: &'a str,
    token: &'a str,
    tags: &'a [String],
}

#[derive(Serialize)]
#[allow(non_snake_case)]
struct Ctx<'a> {
    farm_name: &'a str,
    cpu_count: u32,
    ram_total_MB: f64,
    environment: Vec<String>,
    gateway_runners: Vec<GatewayCtx<'a>>,
    dut_runners: Vec<DutCtx<'a>>,
}

/// The `toml` filter: a value as a TOML value.
fn toml_filter(value: minijinja::Value) -> Result<String, minijinja::Error> {
    let v = toml::Value::try_from(&value).map_err(|e| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("cannot render this value as TOML: {e}"),
        )
    })?;
    Ok(v.to_string())
}

impl RunnerConfigWriter {
    /// A writer of `path` (`GITLAB_CONF_FILE`) from `template`
    /// (`GITLAB_CONF_TEMPLATE_FILE`, or built-in), with the job
    /// `environment` (see [`job_environment`]) and the gateway's `host`
    /// resources.
    pub fn new(
        path: impl Into<PathBuf>,
        template: TemplateSource,
        environment: Vec<(String, String)>,
        host: HostResources,
    ) -> Self {
        RunnerConfigWriter {
            path: path.into(),
            template,
            environment,
            host,
            last: Default::default(),
        }
    }

    /// The config file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The gateway resources used.
    pub fn host(&self) -> &HostResources {
        &self.host
    }

    /// Renders the config for `input`, and checks that it is valid TOML.
    pub fn render(&self, input: &RunnerConfigInput) -> Result<String, RunnerConfigError> {
        let (name, source) = self.template_source()?;
        self.render_source(&name, &source, input)
    }

    /// The template's name and text.
    fn template_source(&self) -> Result<(String, String), RunnerConfigError> {
        Ok(match &self.template {
            TemplateSource::BuiltIn => ("<built-in>".to_string(), DEFAULT_TEMPLATE.to_string()),
            TemplateSource::File(p) => (
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| RunnerConfigError::ReadTemplate {
                    path: p.clone(),
                    source,
                })?,
            ),
        })
    }

    fn render_source(
        &self,
        name: &str,
        source: &str,
        input: &RunnerConfigInput,
    ) -> Result<String, RunnerConfigError> {
        let name = name.to_string();
        let limits = GatewayLimits::compute(self.host.cpu_count, self.host.ram_total_mb());
        let ctx = Ctx {
            farm_name: &input.farm_name,
            cpu_count: self.host.cpu_count,
            ram_total_MB: self.host.ram_total_mb(),
            environment: self
                .environment
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            gateway_runners: input
                .gateway_runners
                .iter()
                .map(|r| GatewayCtx {
                    instance: &r.instance,
                    name: &r.name,
                    url: &r.url,
                    token: r.token.expose(),
                    tags: &r.tags,
                    limits,
                })
                .collect(),
            dut_runners: input
                .dut_runners
                .iter()
                .map(|r| DutCtx {
                    instance: &r.instance,
                    dut_id: r.dut_id.as_deref(),
                    name: &r.name,
                    url: &r.url,
                    token: r.token.expose(),
                    tags: &r.tags,
                })
                .collect(),
        };
        let template_error = |e: minijinja::Error| RunnerConfigError::Template {
            name: name.clone(),
            message: match e.line() {
                Some(line) => format!("line {line}: {e}"),
                None => e.to_string(),
            },
        };
        let mut env = minijinja::Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .keep_trailing_newline(true)
                .trim_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_filter("toml", toml_filter);
        let tmpl = env
            .template_from_named_str(&name, source)
            .map_err(template_error)?;
        let text = tmpl
            .render(minijinja::Value::from(minijinja::value::Serde(&ctx)))
            .map_err(template_error)?;
        if let Err(e) = text.parse::<toml::Table>() {
            // The TOML error quotes the offending line, which may hold a
            // token: keep only the message head.
            let msg = e.message().to_string();
            let span = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            return Err(RunnerConfigError::InvalidToml {
                name,
                message: format!("{msg}{span}"),
            });
        }
        Ok(text)
    }

    /// Renders the config for `input` and writes it if it differs from the
    /// file's content. Returns whether the file was written.
    pub fn write(&self, input: &RunnerConfigInput) -> Result<bool, RunnerConfigError> {
        let (name, source) = self.template_source()?;
        let cached = {
            let last = self.last.0.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref()
                .filter(|(i, t, _)| i == input && *t == source)
                .map(|(_, _, out)| out.clone())
        };
        let text = match cached {
            Some(text) => text,
            None => {
                let text = self.render_source(&name, &source, input)?;
                *self.last.0.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((input.clone(), source, text.clone()));
                text
            }
        };
        write_if_changed(&self.path, text.as_bytes()).map_err(|source| RunnerConfigError::Write {
            path: self.path.clone(),
            source,
        })
    }
}

/// Writes `content` to `path` atomically (temporary file in the same
/// folder, fsync, rename, fsync of the folder), with mode 0600 on a new
/// file (it holds tokens), unless the file already has this content.
/// Returns whether it wrote.
pub fn write_if_changed(path: &Path, content: &[u8]) -> std::io::Result<bool> {
    match std::fs::read(path) {
        Ok(old) if old == content => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    let tmp = dir.join(format!(".{file_name}.vivian-{}.tmp", std::process::id()));
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        // Keep the permissions of an existing file (an admin may have
        // chosen them).
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(content)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_limits_match_the_reference_vectors() {
        for (cpus, limit) in [(4, 1), (8, 1), (32, 4), (1, 1), (16, 2)] {
            assert_eq!(
                GatewayLimits::compute(cpus, 4096.0).limit,
                limit,
                "{cpus} CPUs"
            );
        }
        for (ram, mem, swap, res) in [
            (4096.0, 2048, 2457, 1024),
            (16384.0, 12288, 14745, 6144),
            (131072.0, 126976, 152371, 63488),
        ] {
            let l = GatewayLimits::compute(4, ram);
            assert_eq!(
                (l.memory_mb, l.memory_swap_mb, l.memory_reservation_mb),
                (mem, swap, res),
                "{ram} MB"
            );
        }
    }

    #[test]
    fn default_template_renders_the_reference_gateway_lines() {
        for (cpus, ram_mb, lines) in [
            (
                4u32,
                4096u64,
                [
                    "limit = 1",
                    "cpus = \"4\"",
                    "memory = \"2048 MB\" # Gateway runner memory allocation",
                    "memory_swap = \"2457 MB\"",
                    "memory_reservation = \"1024 MB\"",
                ],
            ),
            (
                32,
                131072,
                [
                    "limit = 4",
                    "cpus = \"32\"",
                    "memory = \"126976 MB\" # Gateway runner memory allocation",
                    "memory_swap = \"152371 MB\"",
                    "memory_reservation = \"63488 MB\"",
                ],
            ),
        ] {
            let host = HostResources {
                cpu_count: cpus,
                physical_cores: cpus,
                ram_total_bytes: ram_mb * 1_000_000,
                arch: "x86_64".into(),
            };
            let w = RunnerConfigWriter::new("/nonexistent", TemplateSource::BuiltIn, vec![], host);
            let input = RunnerConfigInput {
                farm_name: "f".into(),
                gateway_runners: vec![RunnerConfigEntry {
                    instance: "gl".into(),
                    name: "f-gateway".into(),
                    url: "https://gitlab.example".into(),
                    token: Secret::new("glrt-0123456789"),
                    tags: vec![],
                    dut_id: None,
                }],
                dut_runners: vec![],
            };
            let text = w.render(&input).unwrap();
            for line in lines {
                assert!(text.contains(line), "{line:?} missing from:\n{text}");
            }
            let table: toml::Table = text.parse().unwrap();
            let r = &table["runners"].as_array().unwrap()[0];
            assert_eq!(r["token"].as_str(), Some("glrt-0123456789"));
            assert_eq!(r["docker"]["network_mode"].as_str(), Some("host"));
        }
    }

    #[test]
    fn write_restores_an_edited_file_and_debug_hides_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let w = RunnerConfigWriter::new(
            &path,
            TemplateSource::BuiltIn,
            vec![],
            HostResources::detect(),
        );
        let input = RunnerConfigInput {
            farm_name: "f".into(),
            gateway_runners: vec![],
            dut_runners: vec![RunnerConfigEntry {
                instance: "gl".into(),
                name: "f-x-1".into(),
                url: "https://gitlab.example".into(),
                token: Secret::new("glrt-supersecret"),
                tags: vec![],
                dut_id: Some("52:54:00:00:00:01".into()),
            }],
        };
        assert!(w.write(&input).unwrap());
        assert!(!w.write(&input).unwrap());
        let good = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, "edited by hand\n").unwrap();
        assert!(
            w.write(&input).unwrap(),
            "the same input still restores the file"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), good);
        let dbg = format!("{w:?}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
    }

    #[test]
    fn gateway_tags_match_the_reference_vector() {
        let host = HostResources {
            cpu_count: 8,
            physical_cores: 4,
            ram_total_bytes: 3_540_000_000,
            arch: "x86_64".into(),
        };
        let tags = gateway_tags("helloworld", &host);
        let mut expected = vec![
            "helloworld-gateway",
            "CI-gateway",
            "cpu:arch:x86_64",
            "cpu:cores:4",
            "mem:size:4GiB",
            "farm:helloworld",
        ];
        expected.sort();
        assert_eq!(tags, expected);

        let big = HostResources {
            cpu_count: 64,
            physical_cores: 32,
            ram_total_bytes: 60 * (1 << 30),
            arch: "aarch64".into(),
        };
        let tags = gateway_tags("f", &big);
        for t in [
            "cpu:cores:8+",
            "cpu:cores:16+",
            "cpu:cores:32+",
            "mem:size:64GiB",
            "mem:size:8+GiB",
            "mem:size:32+GiB",
            "cpu:arch:aarch64",
        ] {
            assert!(tags.contains(&t.to_string()), "{t} missing from {tags:?}");
        }
    }

    #[test]
    fn proc_parsing() {
        let cpuinfo = "processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\nprocessor\t: 1\nphysical id\t: 0\ncore id\t: 0\n\nprocessor\t: 2\nphysical id\t: 0\ncore id\t: 1\n\nprocessor\t: 3\nphysical id\t: 1\ncore id\t: 0\n";
        assert_eq!(physical_cores_from_cpuinfo(cpuinfo), Some(3));
        assert_eq!(physical_cores_from_cpuinfo("processor : 0\n"), None);
        assert_eq!(
            mem_total_from_meminfo("MemTotal:       16318480 kB\nMemFree: 1 kB\n"),
            Some(16318480 * 1024)
        );
        let host = HostResources::detect();
        assert!(host.cpu_count >= 1 && host.physical_cores >= 1);
        assert!(host.ram_total_bytes > 0);
    }

    #[test]
    fn job_environment_strips_the_prefix_and_starts_with_minio() {
        let env = job_environment(
            vec![
                ("PATH".to_string(), "/bin".to_string()),
                ("EXECUTOR_JOB__NTP_PEER".to_string(), "10.0.0.1".to_string()),
                ("EXECUTOR_JOB__A".to_string(), "x=y".to_string()),
                ("EXECUTOR_JOB__".to_string(), "ignored".to_string()),
            ],
            "http://ci-gateway:9000",
        );
        assert_eq!(
            env,
            vec![
                (
                    "MINIO_URL".to_string(),
                    "http://ci-gateway:9000".to_string()
                ),
                ("A".to_string(), "x=y".to_string()),
                ("NTP_PEER".to_string(), "10.0.0.1".to_string()),
            ]
        );
    }

    #[test]
    fn write_if_changed_is_atomic_and_skips_identical_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        assert!(write_if_changed(&path, b"a = 1\n").unwrap());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(!write_if_changed(&path, b"a = 1\n").unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        assert!(write_if_changed(&path, b"a = 2\n").unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"a = 2\n");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn template_errors_name_the_template_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.j2");
        std::fs::write(&t, "a = 1\n{% for x in %}\n").unwrap();
        let w = RunnerConfigWriter::new(
            dir.path().join("c.toml"),
            TemplateSource::File(t.clone()),
            vec![],
            HostResources::detect(),
        );
        let err = w.render(&RunnerConfigInput::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t.j2") && msg.contains("line 2"), "{msg}");

        std::fs::write(&t, "a = {{ farm_name }}\n").unwrap();
        let err = w
            .render(&RunnerConfigInput {
                farm_name: "not toml".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(err, RunnerConfigError::InvalidToml { .. }),
            "{err}"
        );

        let w2 = RunnerConfigWriter::new(
            dir.path().join("c.toml"),
            TemplateSource::File(dir.path().join("missing.j2")),
            vec![],
            HostResources::detect(),
        );
        assert!(matches!(
            w2.render(&RunnerConfigInput::default()),
            Err(RunnerConfigError::ReadTemplate { .. })
        ));
    }
}
